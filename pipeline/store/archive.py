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
import threading
import time
import zipfile
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any, NamedTuple

from pipeline.digests import CHUNK
from pipeline.errors import PackageError
from pipeline.store import signing

MANIFEST = "MAR-INF/MANIFEST.json"
METADATA = "marpipe.json"
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


class Digest(NamedTuple):
    """A finished archive's size and sha256, with the identity (inode, device, size, mtime) of the file they are
    of: the index takes them as they are while the store's file is still that one."""

    size: int
    sha256: str
    identity: tuple[int, int, int, int]


class Known(NamedTuple):
    """An entry's digests computed earlier, and the (size, mtime_ns) of the file when they were."""

    sha256: str
    crc32: int
    stat: tuple[int, int]


def _stream(z: zipfile.ZipFile, name: str, src: Path) -> str:
    """Copy one file into the archive in one pass that also computes its sha256 (zipfile computes the CRC)."""
    with open(src, "rb", buffering=0) as f:
        size = os.fstat(f.fileno()).st_size
        info = _info(name)
        info.file_size = size
        digest = hashlib.sha256()
        buf = bytearray(CHUNK)
        with z.open(info, "w", force_zip64=size > 2**31) as out:
            while n := f.readinto(buf):
                view = memoryview(buf)[:n]
                digest.update(view)
                out.write(view)
    return digest.hexdigest()


def _register(z: zipfile.ZipFile, info: zipfile.ZipInfo) -> None:
    """Tell zipfile's writer about an entry whose header and data are already in the file."""
    z.start_dir = z.fp.tell()
    z.filelist.append(info)
    z.NameToInfo[info.filename] = info
    z._didModify = True


def _kernel_copy(
    src: int, dst: int, size: int, offset: int, label: str, stop: threading.Event | None = None, step: Callable[[], None] | None = None
) -> None:
    """Copy `size` bytes of `src` (from its start) to `dst` at `offset`: copy_file_range, or read/write where it is refused.

    `stop` ends the copy early; `step` is called after each 64 MiB.
    """
    copied = 0
    while copied < size:
        if stop is not None and stop.is_set():
            return
        if step is not None and copied:
            step()
        count = min(size - copied, 64 << 20)
        try:
            n = os.copy_file_range(src, dst, count, copied, offset + copied)
        except OSError:  # another file system, or an old kernel
            data = os.pread(src, min(count, CHUNK), copied)
            n = len(data)
            if n:
                n = os.pwrite(dst, data, offset + copied)
        if n == 0:
            raise PackageError(f"{label} shrank while it was being archived; build again")
        copied += n


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


def metadata_bytes(metadata: dict, hashes: dict[str, str]) -> bytes:
    """marpipe.json: the metadata with the sha256 of every other entry, as both layouts write it."""
    meta = dict(metadata, files=dict(sorted(hashes.items())))
    return json.dumps(meta, indent=2, sort_keys=True).encode()


def write_archive(
    target: Path,
    files: dict[str, Path],
    metadata: dict,
    manifest_bytes: bytes,
    ahead: tuple[str, Path, Known] | None = None,
) -> dict[str, str]:
    """Write `target` atomically in one go (see `Draft`); `ahead` names the entry whose digests are known."""
    with begin(target, ahead) as draft:
        return draft.finish(files, metadata, manifest_bytes)


@contextlib.contextmanager
def begin(
    target: Path, ahead: tuple[str, Path, Known] | None = None, kind: type[Draft] | None = None, sign_key: Path | None = None
) -> Iterator[Draft]:
    """An archive in the making; leaving the block without `finish` removes every trace of it.

    `kind`: the Draft class (`archive_dir.DirDraft` writes a directory archive). `sign_key`: a private key file
    (`pipeline.store.signing`); the archive is then signed before it is put in place, and its signature with it."""
    draft = (kind or Draft)(target, sign_key)
    try:
        draft.open(ahead)
        yield draft
    finally:
        draft.close()


class Draft:
    """An archive being written into a temporary file beside `target`, renamed into place by `finish`.

    The archive's lock is held from `open` to `close`: so no two builds of one archive ever write at once, and
    any other temporary file of this archive found under the lock is a dead build's, whatever its pid says (a
    pid tells nothing across containers sharing a store). `open` may start copying one large entry (a
    checkpoint whose digests the load stage computed) on a background thread, so that the copy and its flush
    to disk overlap the parity stage; that entry's data then comes first in the file, and the central
    directory still lists the entries in the usual order. Errors of `open` and of the copy are raised by
    `finish`, as packaging errors.
    """

    def __init__(self, target: Path, sign_key: Path | None = None) -> None:
        self.target = target
        self.tmp = target.parent / f".{target.name}.{os.getpid()}.tmp"
        self.sign_key = sign_key
        self.sig_tmp: Path | None = None  # the signature of the temporary archive, under a temporary name
        self._prefix: tuple[int, Any] | None = None  # (length, sha256 so far) of the file's first bytes, once copied
        self.digest: Digest | None = None  # the finished archive's, computed as it was written
        self.ahead: tuple[zipfile.ZipInfo, str] | None = None  # the entry copied ahead, and its sha256
        self._ahead_info: zipfile.ZipInfo | None = None  # its zip entry while it is being copied
        self._locked = contextlib.ExitStack()
        self._thread: threading.Thread | None = None
        self._error: PackageError | None = None
        self._stop = threading.Event()
        self._done = False

    def open(self, ahead: tuple[str, Path, Known] | None = None) -> None:
        try:
            self._locked.enter_context(_lock(self.target))
            self._prepare()
        except PackageError as exc:
            self._error = exc
            return
        if ahead:
            self._thread = threading.Thread(target=self._copy, args=ahead, name="marpipe-copy-ahead", daemon=True)
            self._thread.start()

    def _prepare(self) -> None:
        """Under the lock, before anything is written: a dead build's leftovers removed."""
        clean_leftovers(self.target, keep=self.tmp)
        signing.clean_leftovers(self.target)

    def _destination(self, name: str) -> Path:
        """The file the entry copied ahead is written into."""
        return self.tmp

    def _head(self, name: str, size: int, known: Known) -> bytes:
        """What goes before the copied data in that file: the entry's zip header (the CRC is the load stage's)."""
        info = _info(name)
        info.file_size = info.compress_size = size
        info.CRC, info.header_offset = known.crc32, 0
        self._ahead_info = info
        return info.FileHeader(size > zipfile.ZIP64_LIMIT)

    def _copied(self, name: str, sha256: str) -> None:
        self.ahead = (self._ahead_info, sha256)

    def _hash_ahead(self, head: bytes, src: Path) -> Future | None:
        """The archive's own sha256 over its first bytes (the entry's header, then the checkpoint, read from the
        page cache on a thread of its own while the kernel copies it): no pass over the whole archive is then left
        for the index after `finish`. The bytes are the source's, which the copy checks did not change."""

        def run() -> tuple[int, Any]:
            h = hashlib.sha256(head)
            return len(head) + os.path.getsize(src), _sha256_of(src, 0, os.path.getsize(src), h)

        future: Future = Future()
        threading.Thread(target=lambda: _settle_future(future, run), name="marpipe-archive-hash", daemon=True).start()
        return future

    def _copy(self, name: str, src: Path, known: Known) -> None:
        """The checkpoint, whose digests the load stage computed, copied in the kernel while parity runs."""
        try:
            try:
                f = open(src, "rb", buffering=0)  # noqa: SIM115 (closed by the with below)
            except OSError as exc:
                raise PackageError(f"{src}: cannot read it any more ({exc.strerror or exc}); build again") from None
            with f, open(self._destination(name), "wb", buffering=0) as out:
                st = os.fstat(f.fileno())
                if (st.st_size, st.st_mtime_ns) != known.stat:
                    raise PackageError(f"{src.resolve()} changed while the build was running; build again")
                head = self._head(name, st.st_size, known)
                prefix = self._hash_ahead(head, src)  # the archive's sha256 of these bytes, alongside the copy
                out.write(head)
                writeback = _Writeback(out.fileno())
                try:
                    _kernel_copy(f.fileno(), out.fileno(), st.st_size, len(head), str(src), self._stop, writeback.poke)
                finally:
                    writeback.close()
                after = os.fstat(f.fileno())
                if (after.st_size, after.st_mtime_ns) != known.stat:
                    raise PackageError(f"{src.resolve()} changed while it was being archived; build again")
                if not self._stop.is_set():
                    os.fdatasync(out.fileno())  # the bulk reaches the disk now, not in the final fsync
                    self._copied(name, known.sha256)
                    if prefix is not None:
                        self._prefix = prefix.result()
        except PackageError as exc:
            self._error = exc
        except OSError as exc:
            self._error = _write_error(self.target, exc)
        except Exception as exc:  # a bug: reported by finish, not by a thread's traceback
            self._error = PackageError(f"writing {self.target}: {type(exc).__name__}: {exc}")

    @property
    def copied_ahead(self) -> str | None:
        """The name of the entry copied while parity ran, if one was."""
        return self.ahead[0].filename if self.ahead else None

    def finish(self, files: dict[str, Path], metadata: dict, manifest_bytes: bytes) -> dict[str, str]:
        """Write the entries (sorted by name, then marpipe.json, then the manifest), fsync, rename into place.

        Returns the sha256 of every entry. The temporary file lives beside the target so the rename is atomic.
        """
        if self._thread:
            self._thread.join()
        if self._error:
            raise self._error
        order = [*sorted(files), METADATA, MANIFEST]
        hashes: dict[str, str] = {}
        try:
            with open(self.tmp, "r+b" if self.ahead else "wb") as raw:
                raw.seek(0, os.SEEK_END)
                with zipfile.ZipFile(raw, "w", zipfile.ZIP_STORED, allowZip64=True) as z:
                    if self.ahead:
                        info, hashes[info.filename] = self.ahead
                        if info.filename not in files:
                            raise ValueError(f"{info.filename} was copied ahead but is not among the files")
                        _register(z, info)
                    for name in sorted(files):
                        if name not in hashes:
                            hashes[name] = _stream(z, name, files[name])
                    for name, data in ((METADATA, metadata_bytes(metadata, hashes)), (MANIFEST, manifest_bytes)):
                        z.writestr(_info(name), data)
                        hashes[name] = hashlib.sha256(data).hexdigest()
                    z.filelist.sort(key=lambda i: order.index(i.filename))  # the directory in name order
                raw.flush()
                os.fsync(raw.fileno())
                self.digest = self._digest(raw.fileno())
            os.chmod(self.tmp, 0o644)
            if self.sign_key is not None:  # the very bytes that are renamed into place next
                self.sig_tmp = signing.temporary(self.target)
                signing.sign(self.tmp, self.sign_key, self.sig_tmp)
            signature = signing.signature_path(self.target)
            # the previous archive's signature goes first: never beside bytes it was not made for, even for a moment
            signature.unlink(missing_ok=True)
            os.replace(self.tmp, self.target)
            if self.sig_tmp is not None:
                os.replace(self.sig_tmp, signature)
            self._done = True
            _fsync_dir(self.target.parent)
        except OSError as exc:
            raise _write_error(self.target, exc) from None
        return hashes

    def _digest(self, fd: int) -> Digest:
        """(size, sha256) of the written archive, and the identity of the file: its first bytes were hashed when
        they were copied (`_copied`); the rest, a few hundred KB beside a large checkpoint, is read back now."""
        st = os.fstat(fd)
        start, h = self._prefix if self._prefix else (0, hashlib.sha256())
        _sha256_of(self.tmp, start, st.st_size, h)
        return Digest(st.st_size, h.hexdigest(), (st.st_ino, st.st_dev, st.st_size, st.st_mtime_ns))

    def close(self) -> None:
        """Stop a copy still running; without a finished archive, remove the temporary file; release the lock."""
        self._stop.set()
        if self._thread:
            self._thread.join()
        if not self._done:
            with contextlib.suppress(OSError):
                self.tmp.unlink()
            signing.discard(self.sig_tmp)
        self._locked.close()


class _Writeback:
    """fdatasync on a thread of its own whenever poked, so the disk writes overlap the copy and the last
    fdatasync finds little left (1 GiB here: copy then sync 0.8 s, overlapped 0.55 s)."""

    def __init__(self, fd: int) -> None:
        self.fd, self.wake, self.closed = fd, threading.Event(), False
        self.thread = threading.Thread(target=self._run, name="marpipe-writeback", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            self.wake.wait()
            self.wake.clear()
            if self.closed:
                return
            with contextlib.suppress(OSError):  # the final fdatasync reports a failure
                os.fdatasync(self.fd)

    def poke(self) -> None:
        self.wake.set()

    def close(self) -> None:
        self.closed = True
        self.wake.set()
        self.thread.join()


def _write_error(target: Path, exc: OSError) -> PackageError:
    if not target.parent.is_dir() or not os.access(target.parent, os.W_OK):
        return PackageError(f"model store {target.parent}: cannot write there ({exc.strerror or exc})")
    return PackageError(f"writing {target}: {exc.strerror or exc}")


@contextlib.contextmanager
def _lock(target: Path) -> Iterator[None]:
    """The archive's exclusive lock (`.<archive>.lock` beside it), creating the store folder if needed."""
    path = target.parent / f".{target.name}.lock"
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd = _acquire(path)
    except OSError as exc:
        raise _write_error(target, exc) from None
    try:
        yield
    finally:
        _release(path, fd)


@contextlib.contextmanager
def hold(path: Path) -> Iterator[None]:
    """An exclusive lock on the file `path`, which its owner removes when it lets go (see `_acquire`)."""
    fd = _acquire(path)
    try:
        yield
    finally:
        _release(path, fd)


def _acquire(path: Path) -> int:
    """Lock `path` (created if needed) and return its descriptor.

    An owner unlinks its lock file before unlocking it (`_release`), so a waiter may be granted the lock on
    a file that no longer has a name while a newcomer creates and locks a new one. So after `flock` the
    waiter checks that `path` still names the very file it locked (same inode), and otherwise starts again:
    a store keeps no lock files, and two holders are never inside at once.
    """
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            mine, now = os.fstat(fd), os.stat(path)
        except FileNotFoundError:
            os.close(fd)
            continue
        except BaseException:
            os.close(fd)
            raise
        if (now.st_ino, now.st_dev) == (mine.st_ino, mine.st_dev):
            return fd
        os.close(fd)


def _release(path: Path, fd: int) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)  # while still locked: see _acquire
    os.close(fd)  # unlocks


def _settle_future(future: Future, fn: Callable[[], Any]) -> None:
    try:
        future.set_result(fn())
    except BaseException as exc:  # raised where the result is read
        future.set_exception(exc)


def _sha256_of(path: Path, start: int, end: int, h: Any = None) -> Any:
    """`h` (a new sha256 when None) updated with bytes [start, end) of the file at `path`."""
    h = h if h is not None else hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        f.seek(start)
        buf, left = bytearray(CHUNK), end - start
        while left > 0 and (n := f.readinto(memoryview(buf)[: min(CHUNK, left)])):
            h.update(memoryview(buf)[:n])
            left -= n
    return h


def mar_digest(path: Path) -> tuple[int, str]:
    """(size, sha256) of a `.mar` file's bytes (`layout.digest` takes either layout)."""
    h, size = hashlib.sha256(), 0
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(CHUNK)
        while n := f.readinto(buf):
            h.update(memoryview(buf)[:n])
            size += n
    return size, h.hexdigest()


def clean_leftovers(target: Path, keep: Path | None = None) -> None:
    """Remove temporary files of `target` other than `keep`. Call it holding the archive's lock: every build
    holds it while its temporary file exists, so any other one found then is a killed build's."""
    pattern = re.compile(rf"^\.{re.escape(target.name)}\.\d+\.tmp$")
    for p in target.parent.iterdir():
        if pattern.match(p.name) and p != keep:
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
