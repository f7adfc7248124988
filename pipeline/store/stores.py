"""Model stores: a local folder, or an fsspec URL (`s3://bucket/prefix`, ...), behind one interface.

Builds always write into a local folder (`Store.local`): the store itself when it is local, else a private
staging folder, from which `publish` uploads each archive under a temporary key, checks its size and sha256
as stored, moves it to its final key, and only then rewrites `index.json` (itself uploaded under a
temporary key and moved). So a reader never sees an index naming a missing or partial archive. A `.mar`'s
signature (`<name>.mar.sig`) travels with it: the old one is removed before the archive is moved into place and
the new one (read back) after; a directory archive's is inside it. Credentials
and endpoint come from the standard AWS variables and files (`AWS_ENDPOINT_URL`, `AWS_PROFILE`, ...).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pipeline.errors import PackageError, first_line
from pipeline.store import index, layout, signing

URL_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
CHUNK = 8 << 20
BUCKETS = ("s3", "s3a", "gs", "gcs", "az", "abfs")  # protocols whose first path part is a bucket (container)


def is_url(store: str | Path) -> bool:
    return isinstance(store, str) and bool(URL_RE.match(store))


def open_store(store: str | Path) -> Store:
    """The store named on the command line: an fsspec URL (`scheme://...`) or a local folder."""
    return RemoteStore(str(store)) if is_url(store) else LocalStore(Path(store))


class Store:
    """What builds, the cache and `index`/`smoke` need of a store."""

    url: str
    local: Path  # the folder builds write archives into

    def check(self, write: bool) -> None:
        """Raise PackageError (exit 6, one line) when the store cannot be reached, read or (`write`) written."""
        raise NotImplementedError

    def unchanged(self, name: str, key: str, sign_key: Path | None = None) -> dict[str, Any] | None:
        """The index entry of archive `name` when the store holds it built with `key` and it checks out; with
        `sign_key`, signed with that key too (a local archive is signed where it lies)."""
        raise NotImplementedError

    def may_hold(self, name: str) -> bool:
        """Whether the store holds an archive `name` at all: when not, no key can match, and computing the build
        key (a pass over the checkpoint) waits until the load stage has hashed it anyway."""
        raise NotImplementedError

    def publish(self, path: Path, meta: dict[str, Any] | None = None, known: dict[str, Any] | None = None) -> dict[str, Any]:
        """Make the archive at `path` (under `local`) the store's, and enter it in the index (`meta`: its
        marpipe.json when already read; `known`: its `archive.Digest` as a dict, computed as it was written).
        Returns its index entry."""
        raise NotImplementedError

    def regenerate(self) -> dict[str, Any]:
        """Rebuild index.json from the archives themselves."""
        raise NotImplementedError

    def fetch(self) -> Path:
        """A local folder holding the store's archives (downloaded when remote)."""
        raise NotImplementedError

    def location(self, file: str) -> str:
        """Where an archive file of this store is, for people and reports."""
        raise NotImplementedError

    def close(self) -> None:
        """Remove whatever this object staged locally."""

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def archive_path(folder: Path, name: str) -> Path | None:
    """The archive of model `name` in a local folder: `<name>.mar`, or a `<name>/` directory archive."""
    for p in (folder / f"{name}.mar", folder / name):
        if index.is_archive(p):
            return p
    return None


class LocalStore(Store):
    def __init__(self, root: Path) -> None:
        self.root = self.local = root
        self.url = str(root)

    def check(self, write: bool) -> None:
        if write:
            try:
                self.root.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise PackageError(f"model store {self.root}: cannot write there ({exc.strerror or exc})") from None
            if not os.access(self.root, os.W_OK | os.X_OK):
                raise PackageError(f"model store {self.root}: cannot write there (permission denied)")
        elif not self.root.is_dir():
            raise PackageError(f"model store {self.root}: no such folder")

    def may_hold(self, name: str) -> bool:
        return archive_path(self.root, name) is not None

    def unchanged(self, name: str, key: str, sign_key: Path | None = None) -> dict[str, Any] | None:
        path = archive_path(self.root, name)
        if path is None:
            return None
        try:
            meta = index.metadata(path)
        except PackageError:
            return None
        if meta.get("build_key") != key or layout.verify(path):  # either layout: every entry and sha256
            return None
        if sign_key is not None and not signing.signed_by(path, sign_key):  # unsigned, or by another key
            layout.sign(path, sign_key)
        return self.publish(path, meta)  # the index names it even if it did not before

    def publish(self, path: Path, meta: dict[str, Any] | None = None, known: dict[str, Any] | None = None) -> dict[str, Any]:
        stamped = index.stamped(path, meta, known)
        index.update(self.root, [stamped])
        return stamped[2]

    def regenerate(self) -> dict[str, Any]:
        return index.regenerate(self.root)

    def fetch(self) -> Path:
        return self.root

    def location(self, file: str) -> str:
        return str(self.root / file)


class RemoteStore(Store):
    """An fsspec store. Builds write into a private staging folder (removed by `close`, or by the next build
    when this one was killed); `publish` uploads."""

    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")
        try:
            import fsspec
        except ImportError:
            raise PackageError(f"store {url}: remote stores need fsspec and s3fs: pip install 'torchserve-pipeline[s3]'") from None
        self.protocol = protocol = url.split("://", 1)[0]
        kwargs: dict[str, Any] = {"skip_instance_cache": True, "use_listings_cache": False}
        if protocol in ("s3", "s3a"):
            # fail in seconds on an unreachable endpoint, not after botocore's minutes of retries
            kwargs["config_kwargs"] = {"connect_timeout": 5, "read_timeout": 60, "retries": {"max_attempts": 2}}
        try:
            self.fs, self.root = fsspec.core.url_to_fs(self.url, **kwargs)
        except (ImportError, ValueError) as exc:
            raise PackageError(
                f"store {url}: {first_line(exc)}; for S3 install the s3 extra (pip install 'torchserve-pipeline[s3]')"
            ) from None
        self.root = self.root.rstrip("/")
        self._staging: Path | None = None
        self._index: dict[str, Any] | None = None

    @property
    def local(self) -> Path:  # type: ignore[override]
        if self._staging is None:
            self._staging = Path(tempfile.mkdtemp(prefix=f"marpipe-{os.getpid()}-store-"))
        return self._staging

    def _key(self, file: str) -> str:
        return f"{self.root}/{file}" if self.root else file

    def location(self, file: str) -> str:
        return f"{self.url}/{file}"

    @contextlib.contextmanager
    def _io(self, doing: str) -> Iterator[None]:
        """Any failure of the store as one PackageError line saying what to check."""
        try:
            yield
        except PackageError:
            raise
        except FileNotFoundError as exc:
            raise PackageError(f"store {self.url}: {doing}: not found ({first_line(exc)}); does the bucket exist?") from None
        except PermissionError as exc:
            raise PackageError(
                f"store {self.url}: {doing}: access denied ({first_line(exc)}); check the AWS credentials (AWS_PROFILE, AWS_ACCESS_KEY_ID)"
            ) from None
        except Exception as exc:  # botocore's connection and credential errors have no common OSError base
            raise PackageError(
                f"store {self.url}: {doing}: {type(exc).__name__}: {first_line(exc)}; check AWS_ENDPOINT_URL, the network and credentials"
            ) from None

    def check(self, write: bool) -> None:
        with self._io("reading"):
            if self.protocol in BUCKETS:
                bucket = self.root.split("/")[0]
                try:
                    self.fs.info(bucket)  # the bucket must exist (a write would not create it)
                except FileNotFoundError:
                    raise PackageError(f"store {self.url}: bucket {bucket!r} does not exist; create it or fix the URL") from None
            elif write:
                self.fs.makedirs(self.root, exist_ok=True)
            self._index = self._read_index()
        if write:
            probe = self._key(f".marpipe-probe-{uuid.uuid4().hex}")
            with self._io("writing"):
                self.fs.pipe_file(probe, b"")
                self.fs.rm_file(probe)

    def _read_index(self) -> dict[str, Any] | None:
        try:
            data = self.fs.cat_file(self._key(index.INDEX))
        except FileNotFoundError:
            return None
        return index.parse(data)

    def _size(self, key: str) -> int | None:
        try:
            info = self.fs.info(key)
        except FileNotFoundError:
            return None
        return int(self.fs.du(key)) if info.get("type") == "directory" else int(info.get("size") or 0)

    def may_hold(self, name: str) -> bool:
        return index.find(self._index, name) is not None

    def unchanged(self, name: str, key: str, sign_key: Path | None = None) -> dict[str, Any] | None:
        entry = index.find(self._index, name)
        if not entry or entry.get("build_key") != key:
            return None
        if sign_key is not None and entry.get("signer") != signing.check_private_key(sign_key):
            return None  # built again, and published with its signature
        with self._io("reading"):
            return entry if self._size(self._key(entry["file"])) == entry.get("size") else None

    def _remote_digest(self, key: str) -> tuple[int, str]:
        """(size, sha256) of an uploaded archive as stored, read back: `layout.digest`'s rule."""
        if self.fs.isdir(key):
            size, lines = 0, []
            for f in sorted(self.fs.find(key)):
                if f[len(key) + 1 :] == signing.SIGNATURE:  # not an entry: `archive_dir.entries` leaves it out too
                    continue
                n, sha = self._remote_digest(f)
                size += n
                lines.append(f"{sha}  {f[len(key) + 1 :]}\n")
            return size, hashlib.sha256("".join(lines).encode()).hexdigest()
        h, size = hashlib.sha256(), 0
        with self.fs.open(key, "rb", block_size=CHUNK) as f:
            while chunk := f.read(CHUNK):
                h.update(chunk)
                size += len(chunk)
        return size, h.hexdigest()

    def publish(self, path: Path, meta: dict[str, Any] | None = None, known: dict[str, Any] | None = None) -> dict[str, Any]:
        entry = index.entry(path, meta, known)
        file = path.name
        final, tmp = self._key(file), self._key(f".{file}.{uuid.uuid4().hex}.tmp")
        with self._io(f"uploading {file}"):
            for stale in self.fs.glob(self._key(f".{glob_escape(file)}.*.tmp")):  # a killed upload's
                self.fs.rm(stale, recursive=True)
            try:
                self.fs.put(str(path), tmp, recursive=path.is_dir())
                got = self._remote_digest(tmp)
                if got != (entry["size"], entry["sha256"]):
                    raise PackageError(
                        f"store {self.url}: {file} reads back as {got[0]} bytes, sha256 {got[1][:12]}…, "
                        f"not {entry['size']} bytes, {entry['sha256'][:12]}…; nothing was published, build again"
                    )
                if path.is_dir() and self.fs.exists(final):
                    self.fs.rm(final, recursive=True)
                elif not path.is_dir() and self.fs.exists(final + signing.SUFFIX):
                    self.fs.rm(final + signing.SUFFIX)  # never beside bytes it was not made for
                self.fs.mv(tmp, final, recursive=path.is_dir())
            except BaseException:
                with contextlib.suppress(Exception):
                    self.fs.rm(tmp, recursive=True)
                raise
            if self._size(final) != entry["size"]:
                raise PackageError(f"store {self.url}: {file} is not whole after the move; build again")
            self._put_signature(path)
            self._write_index([entry])
        if path.is_relative_to(self.local):
            shutil.rmtree(path) if path.is_dir() else path.unlink()  # staged copy no longer needed
            signing.discard(signing.signature_path(path))
        return entry

    def _put_signature(self, path: Path) -> None:
        """Upload an archive's signature where it belongs (a temporary key, then moved) unless it is there already
        (a directory archive's travels inside it); read back."""
        local = signing.signature_path(path)
        if not local.is_file():
            return
        final = self._key(f"{path.name}/{signing.SIGNATURE}" if path.is_dir() else path.name + signing.SUFFIX)
        data = local.read_bytes()
        try:
            there = self.fs.cat_file(final)
        except FileNotFoundError:
            there = None
        if there != data:
            tmp = self._key(f".{path.name}{signing.SUFFIX}.{uuid.uuid4().hex}.tmp")
            self.fs.put_file(str(local), tmp)
            self.fs.mv(tmp, final)
            if self.fs.cat_file(final) != data:
                raise PackageError(f"store {self.url}: {final} does not read back as written; sign it again (marpipe sign)")

    def _get(self, name: str, local: Path) -> None:
        """Download archive `name` to `local`, with its signature."""
        key = self._key(name)
        self.fs.get(key, str(local), recursive=self.fs.isdir(key))
        if not local.is_dir():
            with contextlib.suppress(FileNotFoundError):
                self.fs.get_file(key + signing.SUFFIX, str(signing.signature_path(local)))

    def sign(self, name: str, key: Path) -> str:
        """Sign archive `name` of the store: downloaded, checked and signed here, the signature uploaded where it
        belongs (read back), the index entry updated; if the archive changed meanwhile, the signature goes again.
        Returns the signature's location."""
        local = self.local / name
        with self._io(f"signing {name}"):
            self._get(name, local)
            before = layout.digest(local)
            layout.sign(local, key)
            where = f"{name}/{signing.SIGNATURE}" if local.is_dir() else name + signing.SUFFIX
            self._put_signature(local)
            if self._remote_digest(self._key(name)) != before:  # replaced by a build meanwhile
                self.fs.rm(self._key(where))
                raise PackageError(f"store {self.url}: {name} was replaced while it was being signed; sign it again")
            self._write_index([index.entry(local)])
        return self.location(where)

    def _present(self) -> set[str]:
        names = set()
        try:
            listing = self.fs.ls(self.root, detail=True)
        except FileNotFoundError:  # an empty prefix
            return names
        for info in listing:
            name = info["name"].rstrip("/").rsplit("/", 1)[-1]
            if not name.startswith(".") and (name.endswith(".mar") or info.get("type") == "directory"):
                names.add(name)
        return names

    def _write_index(self, entries: list[dict[str, Any]], replace: bool = False) -> dict[str, Any]:
        """index.json last: merged with what the store's index says now (another builder may have written
        it), entries of archives no longer there dropped; uploaded under a temporary key and moved."""
        old = None if replace else self._read_index()
        doc = index.merged(old, entries, self._present())
        tmp = self._key(f".{index.INDEX}.{uuid.uuid4().hex}.tmp")
        self.fs.pipe_file(tmp, index.encode(doc))
        self.fs.mv(tmp, self._key(index.INDEX))
        self._index = doc
        return doc

    def regenerate(self) -> dict[str, Any]:
        """Each archive is downloaded in turn into the staging folder, entered, and removed."""
        entries = []
        with self._io("reindexing"):
            for name in sorted(self._present()):
                local = self.local / name
                self._get(name, local)
                if index.is_archive(local):
                    entries.append(index.entry(local))
                shutil.rmtree(local) if local.is_dir() else local.unlink(missing_ok=True)
                signing.discard(signing.signature_path(local))
            return self._write_index(entries, replace=True)

    def fetch(self) -> Path:
        with self._io("downloading"):
            for name in sorted(self._present()):
                self._get(name, self.local / name)
        return self.local

    def close(self) -> None:
        if self._staging is not None:
            shutil.rmtree(self._staging, ignore_errors=True)
            self._staging = None


def sign(target: str, key: Path) -> str:
    """Sign the archive at a path or URL where it lies (`marpipe sign`); the store's index, if it has one, notes it.
    Returns where the signature is."""
    if is_url(target):
        parent, _, file = target.rstrip("/").rpartition("/")
        with RemoteStore(parent) as store:
            return store.sign(file, key)
    path = Path(target)
    layout.sign(path, key)
    if (path.parent / index.INDEX).is_file():
        index.update(path.parent, [index.stamped(path)])
    return str(signing.signature_path(path))


@contextlib.contextmanager
def local_copy(target: str) -> Iterator[Path]:
    """A local path for an archive named by path or URL (downloaded into a private folder, removed after)."""
    if not is_url(target):
        yield Path(target)
        return
    parent, _, file = target.rstrip("/").rpartition("/")
    store = RemoteStore(parent)
    try:
        with store._io(f"downloading {file}"):
            store._get(file, store.local / file)
        yield store.local / file
    finally:
        store.close()


def glob_escape(name: str) -> str:
    return re.sub(r"([*?\[\]])", r"[\1]", name)
