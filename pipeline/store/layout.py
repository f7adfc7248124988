"""What either archive layout shares, for the code that takes both: a `.mar` (`archive`) or a directory archive
(`archive_dir`, torch-model-archiver's no-archive format) is found, read, digested, verified and signed here.
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Iterable
from pathlib import Path

from pipeline.errors import PackageError, SignatureError
from pipeline.store import archive, archive_dir, faults, signing
from pipeline.store.archive import MANIFEST


def digest(path: Path) -> tuple[int, str]:
    """(size, sha256) of an archive: a `.mar` file's bytes; for a directory archive, the total bytes of its
    files and the sha256 over the lines "<file sha256>  <relative path>\\n" sorted by path (sha256sum's format),
    the bytecode cache a served folder may gain left out (`archive_dir.tree_digest`: one rule for the index,
    the cache and deploy)."""
    return archive_dir.tree_digest(path) if path.is_dir() else archive.mar_digest(path)


def verify(path: Path) -> list[str]:
    """Every fault of one archive: zip integrity, entry names, manifest, metadata and each entry's hash.

    A directory archive (`marpipe build --layout dir`) gets the same content checks (`archive_dir.verify`)."""
    return archive_dir.verify(path) if path.is_dir() else faults.mar_faults(path)


def is_archive(path: Path) -> bool:
    """A `.mar` file, or a folder holding `MAR-INF/MANIFEST.json` (hidden names are temporary ones)."""
    if path.name.startswith("."):
        return False
    if path.is_dir():
        return (path / MANIFEST).is_file()
    return path.suffix == ".mar" and path.is_file()


def list_archives(store: Path) -> list[Path]:
    """Every archive in a store, of both layouts, sorted by name."""
    if not store.is_dir():
        return []
    return sorted(p for p in store.iterdir() if is_archive(p))


def read_entry(path: Path, name: str) -> bytes:
    """One entry of an archive of either layout."""
    if path.is_dir():
        return (path / name).read_bytes()
    with zipfile.ZipFile(path) as z:
        return z.read(name)


def sign(path: Path, key: Path) -> None:
    """Sign an archive where it lies (`marpipe sign`, or one the build cache kept): under the archive's lock, so no
    build replaces it meanwhile, and only when it checks out (a signature vouches for what it covers); the
    signature is written under a temporary name and renamed into place. PackageError (6) when it does not check out."""
    try:
        with archive.hold(path.parent / f".{path.name}.lock"):
            faults = verify(path)
            if faults:
                raise PackageError(f"{path}: {faults[0]}; not signed (a signature would vouch for it): rebuild it")
            signing.clean_leftovers(path)
            tmp = signing.temporary(path)
            try:
                signing.sign(path, key, tmp)
                os.replace(tmp, signing.signature_path(path))
            finally:
                signing.discard(tmp)
            archive._fsync_dir(path)
    except OSError as exc:
        raise PackageError(f"signing {path}: {exc.strerror or exc}") from None


def check_signatures(paths: Iterable[Path], public_key: Path, doing: str) -> None:
    """SignatureError (exit 6) naming every archive not signed by the key `public_key`, before anything is `doing`."""
    bad = [f"{p}: {why}" for p in paths if (why := signing.verify(Path(p), public_key))]
    if bad:
        raise SignatureError(f"{'; '.join(bad)}; nothing was {doing}")
