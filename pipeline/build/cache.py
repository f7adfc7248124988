"""The build key: a sha256 over everything that decides an archive's bytes, computed without importing torch.

Two builds with the same key give byte-identical archives (see `pipeline/store/repro.py` and the reproducibility
tests), so an archive in the store whose recorded key equals the key of a build about to run is that build's
result already: the build is skipped and reported `unchanged`.

What enters the key: the spec's effective settings (every field of the parsed `Spec`, walked generically so
new spec keys count without a change here; a file the spec names counts by its name and content, never by
its location; the spec file's own path is left out), the format, the build options that change the bytes
(`options`), marpipe's version and the sha256 of its source (`pipeline/`, `handlers/`), the versions of
python, torch, onnx, onnxscript, onnxruntime, numpy, transformers, tokenizers and Pillow, and a factory's
distribution (or module source) (from package metadata: nothing is imported), the zip timestamp
(`SOURCE_DATE_EPOCH`), and where aoti may be built, the machine it compiles on (`pipeline.stages.aoti.key`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import importlib.util
import json
from pathlib import Path
from typing import Any

import pipeline
from pipeline.digests import file_sha256, tree_sha256, versions
from pipeline.sources.imports import distributions_of
from pipeline.spec.precision import split
from pipeline.spec.spec import AUTO, Spec
from pipeline.stages import aoti
from pipeline.store.archive import fixed_time

KEY_VERSION = 1  # bump when what enters the key changes shape
ROOT = Path(pipeline.__file__).resolve().parent
HANDLERS = ROOT.parent / "handlers"


def options(args: Any) -> dict[str, Any]:
    """The build options that change an archive's bytes: the one place to add such an option to the key.

    `layout` (a directory archive instead of a .mar) is read when the command line has it.
    """
    return {"device": getattr(args, "device", None), "layout": getattr(args, "layout", None)}


def build_key(spec: Spec, opts: dict[str, Any]) -> str:
    """The sha256 (hex) that names everything deciding the bytes of `spec`'s archive."""
    settings = dataclasses.asdict(spec)
    settings.pop("source")  # where the spec file lies does not change the archive
    device = opts.get("device") or spec.parity.device
    doc = {
        "key": KEY_VERSION,
        "spec": _canonical(settings),
        "format": spec.export.format,
        "options": _canonical(opts),
        # parity.device auto means cuda where there is a GPU: the device is recorded in the archive
        "gpu": Path("/dev/nvidiactl").exists() if device == "auto" else None,
        "marpipe": {"version": pipeline.__version__, "source": tree_sha256(ROOT, "*.py")},
        "handler": tree_sha256(HANDLERS, "*"),
        "factory": factory_source(spec.architecture.factory) if spec.architecture.factory else None,
        "versions": versions(),
        "zip_time": list(fixed_time()),
    }
    fmt = spec.export.format
    if fmt == "aoti" or (fmt == AUTO and any(split(c)[0] == "aoti" for c in spec.export.candidates)):  # native code: bound to this machine
        doc["aoti"] = aoti.key()
    return hashlib.sha256(json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def factory_source(ref: str) -> dict[str, str | None]:
    """What a factory's code is, without importing it: the version of the distribution that installs its top-level
    package, or else the content of the module file or package folder found on sys.path."""
    top = ref.split(":")[0].split(".")[0]
    dists = distributions_of(top)  # the scan of installed distributions the requirements use, kept on disk
    if dists:
        return {d: importlib.metadata.version(d) for d in sorted(set(dists))}
    found = importlib.util.find_spec(top)  # a top-level name: found on sys.path, nothing imported
    if found is None or not found.origin:
        return {top: None}
    origin = Path(found.origin)
    if found.submodule_search_locations:
        return {top: tree_sha256(origin.parent, "*.py")}
    return {top: file_sha256(origin)} if origin.is_file() else {top: None}


def _canonical(value: Any) -> Any:
    """JSON-ready form of a spec value: a path becomes its name and content hash (a folder: of every file)."""
    if isinstance(value, Path):
        if value.is_dir():
            return {"folder": value.name, "sha256": tree_sha256(value, "*")}
        return {"file": value.name, "sha256": file_sha256(value)}
    if isinstance(value, dict):
        return {str(k): _canonical(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        items = [_canonical(v) for v in value]
        return sorted(items, key=repr) if isinstance(value, (set, frozenset)) else items
    if isinstance(value, float):
        return repr(value)  # 1e-05 and 1.0e-5 alike; no float formatting surprises
    if value is None or isinstance(value, (str, int, bool)):
        return value
    if dataclasses.is_dataclass(value):
        return _canonical(dataclasses.asdict(value))
    return repr(value)
