"""What is wrong with an archive: a `.mar`'s zip checks (`mar_faults`) and the content checks both layouts share
(`content_faults`: the manifest TorchServe reads, marpipe.json, every entry's sha256). `layout.verify` takes
either layout.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import zipfile
from collections.abc import Callable
from pathlib import Path

from pipeline.digests import CHUNK
from pipeline.store.archive import MANIFEST, METADATA


def _ends_with_directory(path: Path) -> bool:
    """The end-of-central-directory record (plus its comment) ends the file, as in every complete zip."""
    try:
        with open(path, "rb") as f:
            size = f.seek(0, os.SEEK_END)
            tail_len = min(size, 22 + 65535)
            f.seek(size - tail_len)
            tail = f.read(tail_len)
    except OSError:
        return False
    pos = tail.rfind(b"PK\x05\x06")
    while pos >= 0:
        comment = int.from_bytes(tail[pos + 20 : pos + 22], "little")
        if pos + 22 + comment == len(tail):
            return True
        pos = tail.rfind(b"PK\x05\x06", 0, pos)
    return False


def mar_faults(path: Path) -> list[str]:
    """Every fault of one `.mar`: zip integrity, entry names, manifest, metadata and each entry's hash
    (`layout.verify` takes either layout)."""
    faults: list[str] = []
    if not path.is_file():
        return ["no such file"]
    if not _ends_with_directory(path):
        # zipfile would happily find the directory of an .npz stored inside and call that the archive
        return ["truncated: the zip's end-of-central-directory record is not at the end of the file"]
    try:
        z = zipfile.ZipFile(path)
    except (OSError, zipfile.BadZipFile) as exc:
        return [f"not a readable zip: {exc}"]
    with z:
        names = z.namelist()
        for info in z.infolist():
            n = info.filename
            if n.startswith("/") or "\\" in n or ".." in n.split("/") or re.match(r"^[A-Za-z]:", n):
                faults.append(f"unsafe entry name {n!r}")
            if (info.external_attr >> 16) & 0o170000 == 0o120000:
                faults.append(f"entry {n!r} is a symbolic link")
        if len(set(names)) != len(names):
            faults.append("duplicate entry names")
        try:
            bad = z.testzip()
            if bad:
                faults.append(f"entry {bad!r} fails its CRC check")
        except (zipfile.BadZipFile, OSError, EOFError) as exc:
            return faults + [f"truncated or corrupt: {exc}"]

        def sha256(name: str) -> str | None:
            digest = hashlib.sha256()
            try:
                with z.open(name) as f:
                    while chunk := f.read(CHUNK):
                        digest.update(chunk)
            except (zipfile.BadZipFile, OSError, EOFError):
                return None  # already reported by the CRC check
            return digest.hexdigest()

        return faults + content_faults(set(names), z.read, sha256)


def content_faults(names: set[str], read: Callable[[str], bytes], sha256: Callable[[str], str | None]) -> list[str]:
    """The checks both layouts share: the manifest TorchServe reads, marpipe.json, and every entry's sha256
    against it. `read` returns an entry's bytes; `sha256` its digest, or None when it could not be read."""
    faults: list[str] = []
    if MANIFEST not in names:
        return [f"no {MANIFEST}: TorchServe cannot load it"]
    try:
        man = json.loads(read(MANIFEST))
        model = man["model"]
        for key in ("modelName", "handler"):
            if not isinstance(model.get(key), str):
                faults.append(f"{MANIFEST}: model.{key} missing")
        handler = str(model.get("handler", "")).split(":")[0]
        if handler and not handler.endswith(".py"):
            handler += ".py"
        for key, entry in (
            ("handler", handler),
            ("serializedFile", model.get("serializedFile")),
            ("configFile", model.get("configFile")),
        ):
            if entry and entry not in names:
                faults.append(f"{MANIFEST}: model.{key} {entry!r} is not in the archive")
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        faults.append(f"{MANIFEST} is not valid: {exc}")
    if METADATA not in names:
        return faults + [f"no {METADATA}: not built by marpipe (nothing to check hashes against)"]
    try:
        listed = json.loads(read(METADATA))["files"]
    except (ValueError, KeyError, TypeError) as exc:
        return faults + [f"{METADATA} is not valid: {exc}"]
    for name in sorted(names - {METADATA, MANIFEST} - set(listed)):
        faults.append(f"entry {name!r} is not listed in {METADATA}")
    for name, want in sorted(listed.items()):
        if name not in names:
            faults.append(f"{name!r} listed in {METADATA} but missing")
            continue
        got = sha256(name)
        if got is not None and got != want:
            faults.append(f"{name!r}: sha256 {got[:12]}… does not match {want[:12]}…")
    return faults
