"""Directory archives (`marpipe build --layout dir`): `STORE/<name>/` holding the archive's entries and
`MAR-INF/MANIFEST.json`, torch-model-archiver's `no-archive` format.

TorchServe extracts a `.mar` into its temp folder before it starts a worker (about 2 s for 1 GiB); a
directory in its model store is symlinked instead. The entries are the ones `Draft.finish` writes into a
`.mar` (the package stage decides them once); only the way of writing differs. Same guarantees: the folder
is built under a temporary name beside the target, under the archive's lock, fsynced, then renamed into
place; an existing one is exchanged with it atomically (`renameat2(RENAME_EXCHANGE)` on Linux), so its name
never shows a half-written folder. Files get fixed permissions and timestamps, so builds are reproducible.

The helpers at the bottom read and list archives of both kinds, for `smoke`, `serve`, `deploy` and `kserve`.
"""

from __future__ import annotations

import calendar
import contextlib
import ctypes
import errno
import hashlib
import os
import re
import shutil
import sys
from pathlib import Path

from pipeline.errors import PackageError
from pipeline.store import archive, signing
from pipeline.store.archive import MANIFEST, METADATA, Known
from pipeline.store.faults import content_faults
from pipeline.store.signing import PYCACHE, SIGNATURE


class DirDraft(archive.Draft):
    """A directory archive being written into `.<name>.<pid>.tmp/` beside `target` (see `archive.Draft`)."""

    def __init__(self, target: Path, sign_key: Path | None = None) -> None:
        super().__init__(target, sign_key)
        self.ahead_dir: tuple[str, str] | None = None  # the entry copied ahead, and its sha256

    def _prepare(self) -> None:
        clean_leftovers(self.target)
        signing.clean_leftovers(self.target)
        try:
            self.tmp.mkdir()
        except OSError as exc:
            raise archive._write_error(self.target, exc) from None

    def _destination(self, name: str) -> Path:
        return self.tmp / name

    def _head(self, name: str, size: int, known: Known) -> bytes:
        return b""  # a plain file: the data alone

    def _copied(self, name: str, sha256: str) -> None:
        self.ahead_dir = (name, sha256)

    def _hash_ahead(self, head: bytes, src: Path) -> None:
        return None  # a folder's digest comes from its files' sha256s (`_digest`)

    @property
    def copied_ahead(self) -> str | None:
        return self.ahead_dir[0] if self.ahead_dir else None

    def finish(self, files: dict[str, Path], metadata: dict, manifest_bytes: bytes) -> dict[str, str]:
        """Write the entries, marpipe.json and the manifest into the temporary folder, then put it in place."""
        if self._thread:
            self._thread.join()
        if self._error:
            raise self._error
        hashes: dict[str, str] = {}
        try:
            if self.ahead_dir:
                name, hashes[name] = self.ahead_dir
                if name not in files:
                    raise ValueError(f"{name} was copied ahead but is not among the files")
            for name in sorted(files):
                if name not in hashes:
                    hashes[name] = _copy_file(files[name], self.tmp / name)
            for name, data in ((METADATA, archive.metadata_bytes(metadata, hashes)), (MANIFEST, manifest_bytes)):
                _write_file(self.tmp / name, data)
                hashes[name] = hashlib.sha256(data).hexdigest()
            if self.sign_key is not None:  # inside the folder, so it is put in place with it in one rename
                signing.sign(self.tmp, self.sign_key, self.tmp / SIGNATURE)
            _settle(self.tmp)
            put_in_place(self.tmp, self.target)
            self._done = True
            self.digest = _digest(self.target, hashes)  # under the archive's lock: the folder is still ours
        except OSError as exc:
            raise archive._write_error(self.target, exc) from None
        return hashes

    def close(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join()
        if not self._done:
            shutil.rmtree(self.tmp, ignore_errors=True)
        self._locked.close()


def _copy_file(src: Path, dst: Path) -> str:
    """Copy one file in one pass that also computes its sha256; fsynced."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    buf = bytearray(archive.CHUNK)
    with open(src, "rb", buffering=0) as f, open(dst, "wb", buffering=0) as out:
        while n := f.readinto(buf):
            view = memoryview(buf)[:n]
            digest.update(view)
            out.write(view)
        os.fsync(out.fileno())
    return digest.hexdigest()


def _write_file(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _settle(folder: Path) -> None:
    """Fixed modes and timestamps on everything (reproducible), every folder fsynced (durable before the rename)."""
    stamp = calendar.timegm(archive.fixed_time())
    for root, _, names in os.walk(folder, topdown=False):  # bottom-up: a folder after its contents
        for n in names:
            p = os.path.join(root, n)
            os.chmod(p, 0o644)
            os.utime(p, (stamp, stamp), follow_symlinks=False)
        os.chmod(root, 0o755)
        os.utime(root, (stamp, stamp))
        archive._fsync_dir(Path(root))


def put_in_place(tmp: Path, target: Path) -> None:
    """Rename the finished folder `tmp` to `target`, atomically replacing an existing folder there.

    An absent target is a plain rename. An existing one is swapped with `tmp` in one step
    (renameat2 RENAME_EXCHANGE) and the old tree, now under the temporary name, removed. Where the kernel or
    file system cannot exchange, the old folder is first renamed aside: the name is then briefly absent,
    never half-written."""
    try:
        os.rename(tmp, target)
    except OSError as exc:
        if exc.errno == errno.ENOTDIR:
            raise PackageError(f"{target} exists and is not a folder; remove it or build a .mar instead") from None
        if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
            raise
        if not exchange(tmp, target):
            aside = tmp.with_name(tmp.name[: -len(".tmp")] + ".old")
            os.rename(target, aside)
            try:
                os.rename(tmp, target)
            except OSError:
                os.rename(aside, target)  # the previous archive back under its name
                raise
            tmp = aside
        shutil.rmtree(tmp, ignore_errors=True)  # the previous archive
    archive._fsync_dir(target.parent)


def exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically with renameat2(RENAME_EXCHANGE); False where the system cannot."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # glibc < 2.28, or another libc
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):  # a file system (or kernel) without it
        return False
    raise OSError(err, os.strerror(err), str(b))


def clean_leftovers(target: Path) -> None:
    """Remove temporary folders of `target` left by killed builds (call it holding the archive's lock)."""
    pattern = re.compile(rf"^\.{re.escape(target.name)}\.\d+\.(tmp|old)$")
    for p in target.parent.iterdir():
        if pattern.match(p.name):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    p.unlink()


def entries(folder: Path) -> tuple[list[str], list[str]]:
    """(relative paths of the regular files, faults: links and special files), `__pycache__` and the signature
    (`marpipe.sig`: not an entry of the archive, but a statement about them) left out."""
    files, faults = [], []
    for root, dirs, names in os.walk(folder):
        rel_root = Path(root).relative_to(folder)
        if rel_root == Path("."):
            names = [n for n in names if n != SIGNATURE]
        dirs[:] = sorted(d for d in dirs if d != PYCACHE)
        for d in list(dirs):
            if os.path.islink(os.path.join(root, d)):
                faults.append(f"entry {(rel_root / d).as_posix()!r} is a symbolic link")
                dirs.remove(d)
        for n in names:
            rel = (rel_root / n).as_posix()
            p = os.path.join(root, n)
            if os.path.islink(p):
                faults.append(f"entry {rel!r} is a symbolic link")
            elif not os.path.isfile(p):
                faults.append(f"entry {rel!r} is not a regular file")
            else:
                files.append(rel)
    return sorted(files), faults


def _sha256(path: Path) -> str | None:
    digest = hashlib.sha256()
    try:
        with open(path, "rb", buffering=0) as f:
            buf = bytearray(archive.CHUNK)
            while n := f.readinto(buf):
                digest.update(memoryview(buf)[:n])
    except OSError:
        return None
    return digest.hexdigest()


def verify(folder: Path) -> list[str]:
    """Every fault of a directory archive: links or special files, the manifest, marpipe.json, every hash.

    `__pycache__` folders are left out: Python writes them there when the worker imports the archive's
    modules, since TorchServe serves the folder itself rather than a copy."""
    names, faults = entries(folder)

    def read(name: str) -> bytes:
        return (folder / name).read_bytes()

    def sha256(name: str) -> str | None:
        got = _sha256(folder / name)
        if got is None:
            faults.append(f"entry {name!r} cannot be read")
        return got

    return faults + content_faults(set(names), read, sha256)


def _digest(folder: Path, hashes: dict[str, str]) -> archive.Digest:
    """`tree_digest` of a folder just written, from the sha256 of each file computed as it was written."""
    lines = "".join(f"{hashes[name]}  {name}\n" for name in sorted(hashes))
    size = sum((folder / name).stat().st_size for name in hashes)
    st = folder.stat()
    return archive.Digest(size, hashlib.sha256(lines.encode()).hexdigest(), (st.st_ino, st.st_dev, st.st_size, st.st_mtime_ns))


def tree_digest(folder: Path) -> tuple[int, str]:
    """(total size, sha256) of a directory archive: sha256 over "<file sha256>  <relative path>\\n" lines
    sorted by path (`sha256sum` lines), `__pycache__` left out."""
    names, faults = entries(folder)
    if faults:
        raise PackageError(f"{folder}: {faults[0]}; rebuild it")
    lines, size = [], 0
    for name in names:
        sha = _sha256(folder / name)
        if sha is None:
            raise PackageError(f"{folder / name}: cannot read it")
        size += (folder / name).stat().st_size
        lines.append(f"{sha}  {name}\n")
    return size, hashlib.sha256("".join(lines).encode()).hexdigest()
