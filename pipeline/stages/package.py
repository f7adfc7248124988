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
from pipeline import archive
from pipeline.errors import SpecError
from pipeline.spec import Spec
from pipeline.stages.export import ARTIFACTS, Exported
from pipeline.stages.load import Loaded
from pipeline.stages.parity import ParityResult

HANDLER = Path(__file__).resolve().parents[2] / "handlers" / "marpipe_handler.py"
SERVING = HANDLER.parent / "marpipe_serving"  # the handler's package: travels beside it in every archive
RESERVED = {archive.METADATA, "model-config.yaml", "parity_inputs.npz", "parity_outputs.npz", HANDLER.name, SERVING.name}
RESERVED |= {*ARTIFACTS.values(), "model.onnx.data", "weights.safetensors"}
LAYOUTS = ("mar", "dir")  # a .mar zip, or a folder (torch-model-archiver's no-archive format)


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
    files = {handler.name: handler, spec.architecture.file.name: spec.architecture.file}
    if spec.serve.handler is not None:
        files[HANDLER.name] = HANDLER  # a user handler may import ours
    files.update(handler_package())
    for i, extra in enumerate(spec.serve.extra_files):
        if extra.name in files or extra.name in RESERVED:
            raise SpecError(f"{spec.source}: serve.extra_files[{i}]: {extra.name!r} clashes with another archive entry; rename it")
        files[extra.name] = extra
    if spec.architecture.file.name in RESERVED:
        raise SpecError(
            f"{spec.source}: architecture.file: the name {spec.architecture.file.name!r} is reserved by marpipe; rename the file"
        )
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
        "architecture": {"file": spec.architecture.file.name, "class": spec.architecture.class_name, "kwargs": spec.architecture.kwargs},
        "inputs": [
            {"name": t.name, "shape": list(t.shape), "dtype": t.dtype, "range": list(t.range) if t.range else None} for t in spec.inputs
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


def target(spec: Spec, store: Path, layout: str = "mar") -> Path:
    """Where the archive goes: `<name>.mar`, or the folder `<name>/` for the directory layout."""
    return store / (spec.name if layout == "dir" else f"{spec.name}.mar")


def begin(spec: Spec, store: Path, loaded: Loaded, exported: Exported, layout: str = "mar") -> AbstractContextManager[archive.Draft]:
    """Start the archive before parity. When the artifact is the checkpoint used as it is, the load stage
    already computed its digests, so it is copied into the archive on a background thread meanwhile.
    Nothing is renamed into the store before `run`. `layout`: `mar` (a zip) or `dir` (a folder TorchServe
    serves without extracting it); the entries are the same, decided once in `run`."""
    artifact, ck = exported.files[0], loaded.checkpoint
    ahead = None
    if artifact.is_symlink() and artifact.resolve() == ck.path.resolve():
        ahead = (artifact.name, artifact, archive.Known(ck.sha256, ck.crc32, ck.stat))
    if layout not in LAYOUTS:
        raise SpecError(f"unknown archive layout {layout!r}; use {' or '.join(LAYOUTS)}")
    path = target(spec, store, layout)
    if layout == "dir":
        from pipeline import archive_dir

        return archive.begin(path, ahead, archive_dir.DirDraft)
    return archive.begin(path, ahead)


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
    for name, arrays in (("parity_inputs.npz", parity.reference_inputs), ("parity_outputs.npz", parity.reference_outputs)):
        archive.write_npz(workdir / name, arrays)
        files[name] = workdir / name
    meta = dict(meta, parity=dict(parity.record(), versions=meta["versions"]))
    handler = (spec.serve.handler or HANDLER).name
    entries = draft.finish(files, meta, archive.manifest(spec.name, spec.version, exported.files[0].name, handler))
    return Packaged(draft.target, _size(draft.target), entries, draft.copied_ahead)


def _size(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size
