"""Stage package: the .mar archive, with our handler, the architecture source, the artifact, metadata."""

from __future__ import annotations

import importlib.metadata
import json
import platform
import shutil
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pipeline
from handlers.marpipe_serving.architectures import ATTN_IMPLEMENTATION
from pipeline.digests import versions as installed
from pipeline.errors import SpecError
from pipeline.sources.hf import fast_tokenizer
from pipeline.spec.precision import FP32
from pipeline.spec.requests import hook_functions
from pipeline.spec.spec import Spec, TensorSpec
from pipeline.stages import samples
from pipeline.stages.export import ARTIFACTS, Exported
from pipeline.stages.load import Loaded
from pipeline.stages.parity import ParityResult
from pipeline.store import archive, signing

HANDLER = Path(__file__).resolve().parents[2] / "handlers" / "marpipe_handler.py"
TOKENIZER = "tokenizer.json"
SERVING = HANDLER.parent / "marpipe_serving"  # the handler's package: travels beside it in every archive
RESERVED = {archive.METADATA, "model-config.yaml", "parity_inputs.npz", "parity_outputs.npz", HANDLER.name, SERVING.name}
RESERVED |= {*ARTIFACTS.values(), "model.onnx.data", "weights.safetensors", "config.json", "requirements.txt"}
RESERVED |= {TOKENIZER, samples.INDEX, "parity_requests"}
LAYOUTS = ("mar", "dir")  # a .mar zip, or a folder (torch-model-archiver's no-archive format)


@dataclass
class Packaged:
    archive: Path
    size: int
    entries: dict[str, str]  # name → sha256
    copied_ahead: str | None = None  # the entry copied into the archive while parity ran
    digest: archive.Digest | None = None  # the archive's size and sha256, computed as it was written


def versions() -> dict[str, str]:
    """What built the archive: marpipe, python, torch (as imported), and onnx, onnxruntime and numpy (from the
    installed metadata: importing onnx and onnxruntime would cost 0.1 s)."""
    import torch

    found = {k: v for k, v in installed().items() if k in ("onnx", "onnxruntime", "numpy") and v is not None}
    return {"marpipe": pipeline.__version__, "torch": torch.__version__, "python": platform.python_version(), **found}


def stage_sources(spec: Spec, workdir: Path) -> dict[str, Path]:
    """Copy the handler, the architecture source and extra files into the private staging folder."""
    handler = spec.serve.handler or HANDLER
    arch_file = spec.architecture.file
    files = {handler.name: handler}
    if arch_file is not None:  # a factory or transformers model has no source of its own to ship
        files[arch_file.name] = arch_file
    if spec.serve.handler is not None:
        files[HANDLER.name] = HANDLER  # a user handler may import ours
    files.update(handler_package())
    if spec.text and spec.text.folder:  # as transformers' fast tokenizer sets it up
        (workdir / TOKENIZER).write_text(fast_tokenizer(spec.text.tokenizer)[0], encoding="utf-8")
    elif spec.text:
        files[TOKENIZER] = spec.text.tokenizer
    if spec.serve.hooks:
        if spec.serve.hooks.name in files or spec.serve.hooks.name in RESERVED:
            raise SpecError(f"{spec.source}: serve.hooks: {spec.serve.hooks.name!r} clashes with another archive entry; rename it")
        files[spec.serve.hooks.name] = spec.serve.hooks
    for i, extra in enumerate(spec.serve.extra_files):
        if extra.name in files or extra.name in RESERVED:
            raise SpecError(f"{spec.source}: serve.extra_files[{i}]: {extra.name!r} clashes with another archive entry; rename it")
        files[extra.name] = extra
    if arch_file is not None and arch_file.name in RESERVED:
        raise SpecError(f"{spec.source}: architecture.file: the name {arch_file.name!r} is reserved by marpipe; rename the file")
    for name, src in files.items():
        (workdir / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, workdir / name)
    staged = {name: workdir / name for name in files}
    if spec.text and spec.text.folder:
        staged[TOKENIZER] = workdir / TOKENIZER
    return staged


def handler_package() -> dict[str, Path]:
    """The serving package's modules as archive entries (`marpipe_serving/<module>.py`)."""
    return {f"{SERVING.name}/{p.name}": p for p in sorted(SERVING.glob("*.py"))}


def metadata(spec: Spec, loaded: Loaded, exported: Exported) -> dict[str, Any]:
    """What the handler needs (and what a person auditing the archive wants to know)."""
    s = spec.serve
    return {
        "name": spec.name,
        "version": spec.version,
        "format": exported.format,
        "artifact": exported.files[0].name,
        "architecture": architecture(spec),
        "call": "keyword" if loaded.by_name else "positional",
        # what the eager handler imports beyond torch and numpy (TorchScript and ONNX archives need none); aoti: torch's version
        "requirements": requirements(spec, loaded, exported.format),
        "inputs": [_input(t) for t in spec.inputs],
        "outputs": [_output(spec, n) for n in exported.output_names],
        "dims": {k: list(v) for k, v in spec.dims.items()},
        "dim_max": dict(spec.dim_max),
        "text": text_record(spec),
        "hooks": _hooks(spec.serve.hooks) if spec.serve.hooks else None,
        "checkpoint": dict(
            loaded.summary(),
            path=spec.checkpoint.path.name,
            strict=spec.checkpoint.strict,
            strip_prefix=list(spec.checkpoint.strip_prefix),
            key_map=[{"regex" if k.regex else "prefix": k.pattern, "to": k.to} for k in spec.checkpoint.key_map],
            dtype=spec.checkpoint.dtype,
        ),
        "export": {"format": exported.format, "detail": exported.detail},
        **({"platform": exported.platform} if exported.platform else {}),  # aoti: what the package is compiled for
        **({"precision": spec.export.precision} if spec.export.precision != FP32 else {}),  # absent: fp32 (the handler's rule)
        "serve": {
            "batch_size": s.batch_size,
            "max_batch_delay_ms": s.max_batch_delay_ms,
            "min_workers": s.min_workers,
            "max_workers": s.max_workers,
            "response_timeout_s": s.response_timeout_s,
            "max_rows": s.max_rows,
            "max_response_bytes": s.max_response_bytes,  # the handler refuses a larger answer; serve and kserve set the server's
        },
        "versions": versions(),
    }


def text_record(spec: Spec) -> dict[str, Any] | None:
    """marpipe.json's `text`: the tokenizer entry and max_length; from a folder also what transformers' fast tokenizer
    does around tokenizers (pad id, padding and truncation side; max_length defaults to its model_max_length)."""
    if not spec.text:
        return None
    if not spec.text.folder:
        return {"tokenizer": TOKENIZER, "max_length": spec.text.max_length}
    settings = fast_tokenizer(spec.text.tokenizer)[1]
    limit = spec.dim_max.get(str(next(t for t in spec.inputs if t.name == "input_ids").shape[1]))
    max_length = spec.text.max_length or settings["model_max_length"] or 128
    if limit is not None and max_length > limit:
        if spec.text.max_length is None:
            max_length = limit
        else:
            raise SpecError(f"{spec.source}: text.max_length: {max_length} is over the dims' max ({limit})")
    record = {"tokenizer": TOKENIZER, "max_length": max_length, "folder": True}
    record.update({k: settings[k] for k in ("pad_id", "padding_side", "truncation_side")})
    return record


def _input(t: TensorSpec) -> dict[str, Any]:
    record = {"name": t.name, "shape": list(t.shape), "dtype": t.dtype, "range": list(t.range) if t.range else None, **_generate(t)}
    if t.image:
        record["image"] = t.image.record()
    return record


def _hooks(path: Path) -> dict[str, Any]:
    defined = hook_functions(path)
    return {"file": path.name, "decode": "decode" in defined, "encode": "encode" in defined}


def _output(spec: Spec, name: str) -> dict[str, Any]:
    atol, rtol = spec.tolerance(name)
    record: dict[str, Any] = {"name": name, "atol": atol, "rtol": rtol}
    if any(o.name == name and o.select for o in spec.outputs or ()):
        record["select"] = "last"
    labels = next((o.labels for o in spec.outputs or () if o.name == name and o.labels), None)
    if labels:
        names = labels.names if labels.names is not None else _config_labels(spec)
        record["labels"] = {"names": list(names), "topk": labels.topk, "activation": labels.activation}
    return record


def _config_labels(spec: Spec) -> tuple[str, ...]:
    """`labels: from_config`: a Hugging Face config's id2label, in index order."""
    folder = getattr(spec.architecture, "transformers", None)
    config = None if folder is None else (folder if folder.is_file() else folder / "config.json")
    if config is None or not config.is_file():
        raise SpecError(f"{spec.source}: outputs: labels: from_config needs architecture.transformers (a config.json with id2label)")
    id2label = json.loads(config.read_text(encoding="utf-8")).get("id2label") or {}
    try:
        return tuple(str(id2label[k]) for k in sorted(id2label, key=int))
    except (TypeError, ValueError) as exc:
        raise SpecError(f"{spec.source}: outputs: labels: from_config: {config.name} has an unreadable id2label ({exc})") from None


def architecture(spec: Spec) -> dict[str, Any]:
    """How the handler builds the model (handlers/marpipe_serving/architectures.py reads it)."""
    arch = spec.architecture
    if arch.source == "factory":
        return {"source": "factory", "factory": arch.factory, "kwargs": arch.kwargs}
    if arch.source == "transformers":
        return {
            "source": "transformers",
            "class": arch.class_name,
            "config": "config.json",
            "kwargs": arch.kwargs,  # already applied to config.json
            "attn_implementation": ATTN_IMPLEMENTATION,
        }
    return {"source": "file", "file": arch.file.name, "class": arch.class_name, "kwargs": arch.kwargs}


def requirements(spec: Spec, loaded: Loaded, fmt: str) -> list[dict[str, str]]:
    """What the server must have beyond torch, numpy (and onnxruntime for ONNX): the packages an eager archive's
    architecture imports, the torch an aoti package was compiled against (its version without the local label:
    `torch==2.13.0` takes 2.13.0+cpu and +cu128 alike; the handler checks the rest), and the libraries its request
    forms need (Pillow for images, tokenizers for text)."""
    found = [dict(r, **{"for": "architecture"}) for r in loaded.source.requirements()] if loaded.source and fmt == "eager" else []
    if fmt == "aoti":
        import torch

        found.append({"name": "torch", "version": torch.__version__.split("+")[0], "for": "aoti package"})
    for dist, why, needed in (("pillow", "image inputs", any(t.image for t in spec.inputs)), ("tokenizers", "text inputs", spec.text)):
        if needed and not any(r["name"].lower() == dist for r in found):
            meta = importlib.metadata.metadata(dist)
            found.append({"name": meta["Name"], "version": meta["Version"], "for": why})
    return found


def _generate(t: Any) -> dict[str, Any]:
    """How parity generated an input, when the spec says (`generate`): padding_mask or {range: [low, high]}."""
    if t.generate is None:
        return {}
    return {"generate": t.generate if isinstance(t.generate, str) else {"range": list(t.generate)}}


def target(spec: Spec, store: Path, layout: str = "mar") -> Path:
    """Where the archive goes: `<name>.mar`, or the folder `<name>/` for the directory layout."""
    return store / (spec.name if layout == "dir" else f"{spec.name}.mar")


def begin(
    spec: Spec, store: Path, loaded: Loaded, exported: Exported, layout: str = "mar", sign_key: Path | None = None
) -> AbstractContextManager[archive.Draft]:
    """Start the archive before parity. When the artifact is the checkpoint used as it is, the load stage
    already computed its digests, so it is copied into the archive on a background thread meanwhile.
    Nothing is renamed into the store before `run`. `layout`: `mar` (a zip) or `dir` (a folder TorchServe
    serves without extracting it); the entries are the same, decided once in `run`. `sign_key`: sign the archive
    as it is put in place (`pipeline.store.signing`)."""
    artifact, ck = exported.files[0], loaded.checkpoint
    ahead = None
    if artifact.is_symlink() and artifact.resolve() == ck.path.resolve():
        ahead = (artifact.name, artifact, archive.Known(ck.sha256, ck.crc32, ck.stat))
    if layout not in LAYOUTS:
        raise SpecError(f"unknown archive layout {layout!r}; use {' or '.join(LAYOUTS)}")
    path = target(spec, store, layout)
    if layout == "dir":
        from pipeline.store import archive_dir

        return archive.begin(path, ahead, archive_dir.DirDraft, sign_key)
    return archive.begin(path, ahead, sign_key=sign_key)


def model_config(spec: Spec) -> str:
    s = spec.serve
    return (
        f"minWorkers: {s.min_workers}\nmaxWorkers: {s.max_workers}\nbatchSize: {s.batch_size}\n"
        f"maxBatchDelay: {s.max_batch_delay_ms}\nresponseTimeout: {s.response_timeout_s}\n"
    )


def run(
    spec: Spec,
    draft: archive.Draft,
    workdir: Path,
    sources: dict[str, Path],
    exported: Exported,
    meta: dict[str, Any],
    parity: ParityResult,
) -> Packaged:
    files = dict(sources)
    files.update({p.name: p for p in exported.files})
    config = workdir / "model-config.yaml"
    config.write_text(model_config(spec))
    files[config.name] = config
    if meta.get("requirements"):  # pip install -r requirements.txt: what an eager archive's server needs
        reqs = workdir / "requirements.txt"
        reqs.write_text("".join(f"{r['name']}=={r['version']}\n" for r in meta["requirements"]))
        files[reqs.name] = reqs
    stored = _stored_batch(workdir, parity.reference_inputs, parity.reference_outputs)
    files.update(stored)
    if parity.requests:
        budget = samples.BOUND - sum(p.stat().st_size for p in stored.values())
        files.update(samples.write(parity.requests, workdir, budget))
    outputs = [dict(o, shape=parity.output_shapes.get(o["name"])) for o in meta["outputs"]]
    meta = dict(meta, outputs=outputs, parity=dict(parity.archived(), versions=meta["versions"]))
    handler = (spec.serve.handler or HANDLER).name
    entries = draft.finish(files, meta, archive.manifest(spec.name, spec.version, exported.files[0].name, handler))
    _drop_other_layout(draft.target)
    return Packaged(draft.target, _size(draft.target), entries, draft.copied_ahead, draft.digest)


def _stored_batch(workdir: Path, inputs: dict[str, Any], outputs: dict[str, Any]) -> dict[str, Path]:
    """parity_inputs.npz and parity_outputs.npz (for `marpipe smoke`): the parity batch, cut to its first two rows
    when it would take more than the samples' bound (`samples.BOUND`): two rows still check that the served model
    answers a batch of rows as it answers each (a 3x224x224 image model's batch of two is 1.2 MB)."""
    for rows in (None, 2):
        files = {}
        for name, arrays in (("parity_inputs.npz", inputs), ("parity_outputs.npz", outputs)):
            archive.write_npz(workdir / name, {k: v[:rows] for k, v in arrays.items()} if rows else arrays)
            files[name] = workdir / name
        if sum(p.stat().st_size for p in files.values()) <= samples.BOUND:
            break
    return files


def _drop_other_layout(built: Path) -> None:
    """A store holds one archive per model: a `.mar` replaces the model's folder archive and a folder its `.mar`
    (serving both would register one model twice, and the cache would look at the other one)."""
    other = built.parent / built.name.removesuffix(".mar") if built.suffix == ".mar" else built.parent / f"{built.name}.mar"
    if other.is_dir() and (other / archive.MANIFEST).is_file():
        shutil.rmtree(other, ignore_errors=True)
    elif other.is_file() and other.suffix == ".mar":
        other.unlink(missing_ok=True)
        signing.signature_path(other).unlink(missing_ok=True)


def _size(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size
