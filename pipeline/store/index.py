"""The store's `index.json`: one entry per archive, rewritten atomically under the store's lock.

The index is the only file of a store that is neither an archive nor a signature. An archive is a `<name>.mar`
file (signed: with `<name>.mar.sig` beside it), or a directory `<name>/` holding `MAR-INF/MANIFEST.json` and
`marpipe.json` (the directory layout; signed: with `marpipe.sig` in it).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import zipfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pipeline
from pipeline.errors import PackageError
from pipeline.store import archive, layout, signing

INDEX = "index.json"
FORMAT = 1


def is_archive(path: Path) -> bool:
    if path.name.startswith("."):
        return False  # temporary files and folders of builds in progress
    if path.is_dir():
        return (path / archive.MANIFEST).is_file() and (path / archive.METADATA).is_file()
    return path.suffix == ".mar" and path.is_file()


def list_archives(folder: Path) -> list[Path]:
    """The archives of a store folder, sorted by name."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if is_archive(p))


def metadata(path: Path) -> dict[str, Any]:
    """An archive's marpipe.json, from the zip or the directory."""
    try:
        return json.loads(layout.read_entry(path, archive.METADATA))
    except (OSError, KeyError, ValueError, zipfile.BadZipFile) as exc:
        raise PackageError(f"{path}: cannot read {archive.METADATA} ({exc}); rebuild it or remove it from the store") from None


def entry(path: Path, meta: dict[str, Any] | None = None, known: dict[str, Any] | None = None) -> dict[str, Any]:
    """The index entry of one archive. Its digest is `known` (an `archive.Digest` as a dict, computed as the
    archive was written) while the file at `path` is still the one it was computed of, else read here.
    `signed`: a signature lies with it; `signer`: the fingerprint of the key it names (sha256 of the public key's
    PEM; read, not checked: `marpipe verify --key`)."""
    meta = meta if meta is not None else metadata(path)
    if known and tuple(known["identity"]) == identity(path):
        size, sha256 = known["size"], known["sha256"]
    else:
        size, sha256 = layout.digest(path)
    signature = signing.signature_path(path)
    outputs = (meta.get("parity") or {}).get("outputs") or {}
    return {
        "name": meta.get("name", path.stem),
        "version": meta.get("version"),
        "format": meta.get("format"),
        "file": path.name,
        "size": size,
        "sha256": sha256,
        "build_key": meta.get("build_key"),
        # below fp32 the accuracy gate's thresholds, and the precision (absent: fp32)
        "parity": {
            k: {m: v.get(m) for m in (("agreement", "cosine") if "agreement" in v else ("atol", "rtol"))}
            for k, v in sorted(outputs.items())
        },
        **({"precision": meta["precision"]} if meta.get("precision") else {}),
        "marpipe": (meta.get("versions") or {}).get("marpipe"),
        "signed": signature.is_file(),
        "signer": signing.signer(signature),
    }


def document(entries: Iterable[dict[str, Any]]) -> dict[str, Any]:
    return {"index": FORMAT, "marpipe": pipeline.__version__, "archives": sorted(entries, key=lambda e: e["file"])}


def merged(old: dict[str, Any] | None, new: Iterable[dict[str, Any]], present: set[str]) -> dict[str, Any]:
    """`old` with `new` entries replacing those of the same file, and entries of absent files dropped."""
    by_file = {e["file"]: e for e in (old or {}).get("archives", []) if isinstance(e, dict) and "file" in e}
    by_file.update({e["file"]: e for e in new})
    return document(e for f, e in by_file.items() if f in present)


def parse(data: bytes | None) -> dict[str, Any] | None:
    """An index document, or None when there is none or it is unreadable (it is then rebuilt from entries)."""
    if data is None:
        return None
    try:
        doc = json.loads(data)
    except ValueError:
        return None
    return doc if isinstance(doc, dict) and isinstance(doc.get("archives"), list) else None


def find(doc: dict[str, Any] | None, name: str) -> dict[str, Any] | None:
    return next((e for e in (doc or {}).get("archives", []) if e.get("name") == name), None)


def identity(path: Path) -> tuple[int, int, int, int]:
    """What changes when an archive is replaced (a rename brings another inode) or rewritten."""
    st = path.stat()
    return (st.st_ino, st.st_dev, st.st_size, st.st_mtime_ns)


def stamped(
    path: Path, meta: dict[str, Any] | None = None, known: dict[str, Any] | None = None
) -> tuple[Path, tuple[int, int, int, int], dict[str, Any]]:
    """An archive's entry with the identity of the file it was computed from (for `update`)."""
    before = identity(path)
    return path, before, entry(path, meta, known)


def update(store: Path, new: list[tuple[Path, tuple[int, int, int, int], dict[str, Any]]]) -> None:
    """Put `new` entries (see `stamped`) into `store/index.json`, under the store's lock so that parallel
    builders lose none, dropping entries of archives no longer there. An archive replaced since its entry was
    computed (another build of it renamed its own file into place meanwhile) is entered as it is now."""
    with _locked(store):
        fresh = []
        for path, before, e in new:
            if is_archive(path):
                fresh.append(e if identity(path) == before else entry(path))
        path = store / INDEX
        old = parse(path.read_bytes()) if path.is_file() else None
        _write(store, merged(old, fresh, {p.name for p in list_archives(store)}))


def regenerate(store: Path) -> dict[str, Any]:
    """Rebuild `store/index.json` from the archives themselves (`marpipe index STORE`)."""
    if not store.is_dir():
        raise PackageError(f"model store {store}: no such folder")
    with _locked(store):
        doc = document(entry(p) for p in list_archives(store))
        _write(store, doc)
    return doc


def encode(doc: dict[str, Any]) -> bytes:
    return (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode()


@contextlib.contextmanager
def _locked(store: Path):  # noqa: ANN202
    try:
        with archive.hold(store / f".{INDEX}.lock"):
            yield
    except OSError as exc:
        raise PackageError(f"model store {store}: cannot update {INDEX} ({exc.strerror or exc})") from None


def _write(store: Path, doc: dict[str, Any]) -> None:
    """Atomically: a temporary file beside it, fsync, rename. Called under the store's lock, so any other
    temporary index file is a killed builder's and goes."""
    pattern = re.compile(rf"^\.{re.escape(INDEX)}\.\d+\.tmp$")
    for p in store.iterdir():
        if pattern.match(p.name):
            with contextlib.suppress(OSError):
                p.unlink()
    tmp = store / f".{INDEX}.{os.getpid()}.tmp"
    try:
        with open(tmp, "wb") as f:
            f.write(encode(doc))
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, store / INDEX)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise PackageError(f"model store {store}: cannot write {INDEX} ({exc.strerror or exc})") from None
