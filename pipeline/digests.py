"""File digests and installed versions: what several floors need to name their inputs, kept on the ground floor.

The load stage hashes a checkpoint once (`remember`); the build key (`pipeline.build.cache`) then reads the hash
from here instead of reading the file again. `versions` reads installed package metadata (nothing is imported),
for the build key and for an archive's requirements.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import platform
from pathlib import Path
from typing import Any

CHUNK = 8 << 20  # read and copy size for large files (archives, checkpoints)
PACKAGES = {
    "torch": ("torch",),
    "onnx": ("onnx",),
    "onnxscript": ("onnxscript",),
    "onnxruntime": ("onnxruntime-gpu", "onnxruntime"),
    "numpy": ("numpy",),
    # what archives of some specs record or depend on: Hugging Face graphs, request forms' libraries
    "transformers": ("transformers",),
    "tokenizers": ("tokenizers",),
    "pillow": ("pillow",),
}
_file_hashes: dict[tuple[str, int, int], str] = {}


def remember(path: Path, st: Any, sha256: str) -> None:
    """A file's sha256 computed elsewhere (the load stage hashes the checkpoint): `file_sha256` takes it as it is."""
    _file_hashes[(str(path.resolve()), st.st_size, st.st_mtime_ns)] = sha256


def file_sha256(path: Path) -> str:
    """sha256 of a file's content, remembered per (path, size, mtime) for the formats of one spec."""
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _file_hashes:
        h = hashlib.sha256()
        with open(path, "rb", buffering=0) as f:
            buf = bytearray(CHUNK)
            while n := f.readinto(buf):
                h.update(memoryview(buf)[:n])
        _file_hashes[key] = h.hexdigest()
    return _file_hashes[key]


def tree_sha256(folder: Path, pattern: str) -> str:
    """sha256 over the relative names and content hashes of the files under `folder` matching `pattern`."""
    lines = []
    for p in sorted(folder.rglob(pattern)):
        if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc":
            lines.append(f"{file_sha256(p)}  {p.relative_to(folder).as_posix()}\n")
    return hashlib.sha256("".join(lines).encode()).hexdigest()


def versions() -> dict[str, str | None]:
    """The installed versions of python and of the packages that decide or constrain an archive's bytes."""
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name, dists in PACKAGES.items():
        out[name] = None
        for dist in dists:
            try:
                out[name] = importlib.metadata.version(dist)
                break
            except importlib.metadata.PackageNotFoundError:
                continue
    return out
