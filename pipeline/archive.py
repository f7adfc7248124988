"""Writing and verifying .mar archives: atomic, reproducible, hashed, streamed without compression.

Weights do not compress, so entries are stored; each file is streamed into the archive in one pass that
also computes its sha256 (zipfile computes the CRC in the same pass). Entries are sorted, timestamps fixed
(``SOURCE_DATE_EPOCH`` when set), so the same inputs give byte-identical archives.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO, NamedTuple

from pipeline.errors import PackageError

MANIFEST = "MAR-INF/MANIFEST.json"
METADATA = "marpipe.json"
CHUNK = 8 << 20
EPOCH_1980 = 315532800  # the earliest time a zip entry can carry


def fixed_time() -> tuple[int, int, int, int, int, int]:
    epoch = os.environ.get("SOURCE_DATE_EPOCH", "")
    seconds = int(epoch) if epoch.isdigit() else EPOCH_1980
    t = time.gmtime(max(seconds, EPOCH_1980))
    return (t.tm_year, t.tm_mon, t.tm_mday, t.tm_hour, t.tm_min, t.tm_sec)


def _info(name: str) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name, date_time=fixed_time())
    info.compress_type = zipfile.ZIP_STORED
    info.create_system = 3
    info.external_attr = 0o100644 << 16
    return info


class Known(NamedTuple):
    """An entry's digests computed earlier, and the (size, mtime_ns) of the file when they were."""

    sha256: str
    crc32: int
    stat: tuple[int, int]


def _stream(z: zipfile.ZipFile, name: str, src: Path, known: Known | None = None) -> str:
    """Copy one file into the archive in one pass; with its digests known, the kernel copies it (no read here)."""
    with open(src, "rb", buffering=0) as f:
        st = os.fstat(f.fileno())
        info = _info(name)
        info.file_size = st.st_size
        if known:
            if (st.st_size, st.st_mtime_ns) != known.stat:
                raise PackageError(f"{src.resolve()} changed while the build was running; build again")
            _copy_stored(z, info, f, known.crc32)
            return known.sha256
        digest = hashlib.sha256()
        buf = bytearray(CHUNK)
        with z.open(info, "w", force_zip64=st.st_size > 2**31) as out:
            while n := f.readinto(buf):
                view = memoryview(buf)[:n]
                digest.update(view)
                out.write(view)
    return digest.hexdigest()


def _copy_stored(z: zipfile.ZipFile, info: zipfile.ZipInfo, src: BinaryIO, crc: int) -> None:
    """A stored entry whose CRC is known: header by zipfile, data by copy_file_range, directory by zipfile.

    This reaches into zipfile's writer state (fp, start_dir, filelist): the same steps ZipFile.write takes,
    minus reading the data through Python, which costs seconds per GiB.
    """
    size = info.file_size
    info.compress_size, info.CRC = size, crc
    zip64 = size > zipfile.ZIP64_LIMIT
    z.fp.seek(z.start_dir)
    info.header_offset = z.fp.tell()
    z.fp.write(info.FileHeader(zip64))
    z.fp.flush()
    dst, offset = z.fp.fileno(), z.fp.tell()
    copied = 0
    while copied < size:
        try:
            n = os.copy_file_range(src.fileno(), dst, size - copied, copied, offset + copied)
        except OSError:  # another file system, or an old kernel
            z.fp.seek(offset + copied)
            n = _copy_slow(src, z.fp, copied, size - copied)
        if n == 0:
            raise PackageError(f"{src.name} shrank while it was being archived; build again")
        copied += n
    z.fp.seek(offset + size)
    z.start_dir = z.fp.tell()
    z.filelist.append(info)
    z.NameToInfo[info.filename] = info
    z._didModify = True


def _copy_slow(src: BinaryIO, dst: BinaryIO, start: int, count: int) -> int:
    src.seek(start)
    buf = bytearray(CHUNK)
    done = 0
    while done < count:
        n = src.readinto(memoryview(buf)[: min(CHUNK, count - done)])
        if not n:
            break
        dst.write(memoryview(buf)[:n])
        done += n
    return done


def write_npz(path: Path, arrays: dict) -> None:
    """An .npz like numpy.savez writes, but with fixed timestamps (numpy stamps the current time)."""
    import io

    import numpy as np

    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        for name in sorted(arrays):
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.ascontiguousarray(arrays[name]), allow_pickle=False)
            z.writestr(_info(f"{name}.npy"), buf.getvalue())


def manifest(model_name: str, version: str, artifact: str, handler: str) -> bytes:
    """MAR-INF/MANIFEST.json as torch-model-archiver 0.12 writes it, with a fixed creation time."""
    created = time.strftime("%d/%m/%Y %H:%M:%S", (*fixed_time(), 0, 1, -1))
    doc = {
        "createdOn": created,
        "runtime": "python",
        "model": {
            "modelName": model_name,
            "serializedFile": artifact,
            "handler": handler,
            "modelVersion": version,
            "configFile": "model-config.yaml",
        },
        "archiverVersion": "0.12.0",
    }
    return json.dumps(doc, indent=2, sort_keys=True).encode()


def write_archive(
    target: Path,
    files: dict[str, Path],
    metadata: dict,
    manifest_bytes: bytes,
    known: dict[str, Known] | None = None,
) -> dict[str, str]:
    """Write `target` atomically: files (archive name → source) sorted, then marpipe.json, then the manifest.

    Returns the sha256 of every entry. A lock serialises builds of the same archive; the temporary file
    lives beside the target so the final rename is atomic, and a killed build's leftovers are removed.
    """
    with _lock(target):
        clean_leftovers(target)
        tmp = target.parent / f".{target.name}.{os.getpid()}.tmp"
        hashes: dict[str, str] = {}
        try:
            with open(tmp, "wb") as raw:
                with zipfile.ZipFile(raw, "w", zipfile.ZIP_STORED, allowZip64=True) as z:
                    for name in sorted(files):
                        hashes[name] = _stream(z, name, files[name], (known or {}).get(name))
                    meta = dict(metadata, files=dict(sorted(hashes.items())))
                    for name, data in ((METADATA, json.dumps(meta, indent=2, sort_keys=True).encode()), (MANIFEST, manifest_bytes)):
                        z.writestr(_info(name), data)
                        hashes[name] = hashlib.sha256(data).hexdigest()
                raw.flush()
                os.fsync(raw.fileno())
            os.chmod(tmp, 0o644)
            os.replace(tmp, target)
            _fsync_dir(target.parent)
        except OSError as exc:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise PackageError(f"writing {target}: {exc.strerror or exc}") from None
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
    return hashes


@contextlib.contextmanager
def _lock(target: Path) -> Iterator[None]:
    """An exclusive lock on `.<archive>.lock` beside the archive, creating the store folder if needed."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        f = open(target.parent / f".{target.name}.lock", "a")  # noqa: SIM115 (closed below)
    except OSError as exc:
        raise PackageError(f"model store {target.parent}: cannot write there ({exc.strerror or exc})") from None
    with f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def clean_leftovers(target: Path) -> None:
    """Remove temporary archives of `target` left by builds that were killed (their pid is gone)."""
    pattern = re.compile(rf"^\.{re.escape(target.name)}\.(\d+)\.tmp$")
    for p in target.parent.iterdir():
        m = pattern.match(p.name)
        if m and not alive(int(m.group(1))):
            with contextlib.suppress(OSError):
                p.unlink()


def alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # our own leftover from an earlier attempt in this process
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


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


def verify(path: Path) -> list[str]:
    """Every fault of one archive: zip integrity, entry names, manifest, metadata and each entry's hash."""
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
        if MANIFEST not in names:
            return faults + [f"no {MANIFEST}: TorchServe cannot load it"]
        try:
            man = json.loads(z.read(MANIFEST))
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
            listed = json.loads(z.read(METADATA))["files"]
        except (ValueError, KeyError, TypeError) as exc:
            return faults + [f"{METADATA} is not valid: {exc}"]
        for name in sorted(set(names) - {METADATA, MANIFEST} - set(listed)):
            faults.append(f"entry {name!r} is not listed in {METADATA}")
        for name, want in sorted(listed.items()):
            if name not in names:
                faults.append(f"{name!r} listed in {METADATA} but missing")
                continue
            digest = hashlib.sha256()
            try:
                with z.open(name) as f:
                    while chunk := f.read(CHUNK):
                        digest.update(chunk)
            except (zipfile.BadZipFile, OSError, EOFError):
                continue  # already reported by the CRC check
            if digest.hexdigest() != want:
                faults.append(f"{name!r}: sha256 {digest.hexdigest()[:12]}… does not match {want[:12]}…")
    return faults
