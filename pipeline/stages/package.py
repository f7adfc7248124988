"""Stage package: the .mar archive, with our handler, the architecture source, the artifact, metadata."""

from __future__ import annotations

import importlib.metadata
import platform
import shutil
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pipeline
from handlers.marpipe_serving.architectures import ATTN_IMPLEMENTATION
from pipeline import archive
from pipeline.errors import SpecError
from pipeline.spec import Spec
from pipeline.stages.export import ARTIFACTS, Exported
from pipeline.stages.load import Loaded
from pipeline.stages.parity import ParityResult

HANDLER = Path(__file__).resolve().parents[2] / "handlers" / "marpipe_handler.py"
SERVING = HANDLER.parent / "marpipe_serving"  # the handler's package: travels beside it in every archive
RESERVED = {archive.METADATA, "model-config.yaml", "parity_inputs.npz", "parity_outputs.npz", HANDLER.name, SERVING.name}
RESERVED |= {*ARTIFACTS.values(), "model.onnx.data", "weights.safetensors", "config.json", "requirements.txt"}


@dataclass
class Packaged:
    archive: Path
    size: int
    entries: dict[str, str]  # name → sha256
    copied_ahead: str | None = None  # the entry copied into the archive while parity ran


def versions() -> dict[str, str]:
    import torch

    out = {"marpipe": pipeline.__version__, "torch": torch.__version__, "python": platform.python_version()}
    # from the installed metadata: importing onnx and onnxruntime would cost 0.1 s
    for name, dists in (("onnx", ("onnx",)), ("onnxruntime", ("onnxruntime-gpu", "onnxruntime")), ("numpy", ("numpy",))):
        for dist in dists:
            try:
                out[name] = importlib.metadata.version(dist)
                break
            except importlib.metadata.PackageNotFoundError:
                continue
    return out


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
    for i, extra in enumerate(spec.serve.extra_files):
        if extra.name in files or extra.name in RESERVED:
            raise SpecError(f"{spec.source}: serve.extra_files[{i}]: {extra.name!r} clashes with another archive entry; rename it")
        files[extra.name] = extra
    if arch_file is not None and arch_file.name in RESERVED:
        raise SpecError(f"{spec.source}: architecture.file: the name {arch_file.name!r} is reserved by marpipe; rename the file")
    for name, src in files.items():
        (workdir / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, workdir / name)
    return {name: workdir / name for name in files}


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
        # what the eager handler imports beyond torch and numpy; TorchScript and ONNX archives need none
        "requirements": loaded.source.requirements() if loaded.source and exported.format == "eager" else [],
        "inputs": [
            {"name": t.name, "shape": list(t.shape), "dtype": t.dtype, "range": list(t.range) if t.range else None, **_generate(t)}
            for t in spec.inputs
        ],
        "outputs": [dict(zip(("name", "atol", "rtol"), (n, *spec.tolerance(n)))) for n in exported.output_names],
        "dims": {k: list(v) for k, v in spec.dims.items()},
        "checkpoint": dict(
            loaded.summary(),
            path=spec.checkpoint.path.name,
            strict=spec.checkpoint.strict,
            strip_prefix=list(spec.checkpoint.strip_prefix),
            key_map=[{"regex" if k.regex else "prefix": k.pattern, "to": k.to} for k in spec.checkpoint.key_map],
            dtype=spec.checkpoint.dtype,
        ),
        "export": {"format": exported.format, "detail": exported.detail},
        "serve": {
            "batch_size": s.batch_size,
            "max_batch_delay_ms": s.max_batch_delay_ms,
            "min_workers": s.min_workers,
            "max_workers": s.max_workers,
            "response_timeout_s": s.response_timeout_s,
            "max_rows": s.max_rows,
        },
        "versions": versions(),
    }


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


def _generate(t: Any) -> dict[str, Any]:
    """How parity generated an input, when the spec says (`generate`): padding_mask or {range: [low, high]}."""
    if t.generate is None:
        return {}
    return {"generate": t.generate if isinstance(t.generate, str) else {"range": list(t.generate)}}


def begin(spec: Spec, store: Path, loaded: Loaded, exported: Exported) -> AbstractContextManager[archive.Draft]:
    """Start the archive before parity. When the artifact is the checkpoint used as it is, the load stage
    already computed its digests, so it is copied into the archive on a background thread meanwhile.
    Nothing is renamed into the store before `run`."""
    artifact, ck = exported.files[0], loaded.checkpoint
    ahead = None
    if artifact.is_symlink() and artifact.resolve() == ck.path.resolve():
        ahead = (artifact.name, artifact, archive.Known(ck.sha256, ck.crc32, ck.stat))
    return archive.begin(store / f"{spec.name}.mar", ahead)


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
    for name, arrays in (("parity_inputs.npz", parity.reference_inputs), ("parity_outputs.npz", parity.reference_outputs)):
        archive.write_npz(workdir / name, arrays)
        files[name] = workdir / name
    meta = dict(meta, parity=dict(parity.record(), versions=meta["versions"]))
    handler = (spec.serve.handler or HANDLER).name
    entries = draft.finish(files, meta, archive.manifest(spec.name, spec.version, exported.files[0].name, handler))
    ahead = draft.ahead[0].filename if draft.ahead else None
    return Packaged(draft.target, draft.target.stat().st_size, entries, ahead)
