"""What `marpipe deploy` puts on a server: archives read once (identity, digest, metadata), and
the two places a running TorchServe finds them: its own model store folder, or URLs it downloads from."""

from __future__ import annotations

import json
import os
import re
import shutil
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import PackageError, SpecError
from pipeline.store import archive, archive_dir, layout

VERSION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")


@dataclass
class Archive:
    """One archive to deploy, read once: identity, digest, metadata (the live check replays it as smoke does)."""

    path: Path
    name: str
    version: str
    sha256: str
    meta: dict

    @property
    def is_dir(self) -> bool:
        return self.path.is_dir()

    @property
    def file_name(self) -> str:
        """The unique name in the server's store: a file name must never be reused there."""
        base = f"{self.name}-{self.version}-{self.sha256[:12]}"
        return base if self.is_dir else f"{base}.mar"


@dataclass
class Placement:
    """Where the server finds an archive: `url` for the registration, and whether this run put it there."""

    url: str
    placed: bool = False
    registered: bool = False  # a registration was sent and not refused: the rollback unregisters


def read_archive(path: Path) -> Archive:
    """Verify an archive (.mar or folder) and read what deploying it needs; PackageError (6) if it is not sound."""
    path = Path(path)
    faults = layout.verify(path)
    if faults:
        raise PackageError(f"{path}: {faults[0]}; run marpipe verify {path}")
    manifest = json.loads(layout.read_entry(path, archive.MANIFEST))["model"]
    name, version = manifest["modelName"], str(manifest.get("modelVersion") or "1.0")
    if not VERSION_RE.match(version) or ".." in version:
        raise SpecError(f"{path}: version {version!r} cannot name a file in the model store; use letters, digits, '.', '_', '-'")
    meta = json.loads(layout.read_entry(path, archive.METADATA))
    return Archive(path, name, version, layout.digest(path)[1], meta)


class FolderTarget:
    """The server's own model store, reachable as a folder: archives are copied in under their unique name."""

    def __init__(self, store: Path) -> None:
        if not store.is_dir():
            raise SpecError(f"--model-store {store}: no such folder; pass the folder TorchServe was started with (model_store)")
        self.store = store

    def place(self, a: Archive, in_use: set[str]) -> Placement:
        dst = self.store / a.file_name
        if dst.exists():  # same name, same sha256: left by an earlier deploy; ours to remove unless registered
            return Placement(a.file_name, placed=a.file_name not in in_use)
        tmp = self.store / f".{a.file_name}.{os.getpid()}.tmp"
        try:
            if a.is_dir:
                shutil.copytree(a.path, tmp, ignore=shutil.ignore_patterns(archive_dir.PYCACHE))
            else:
                shutil.copyfile(a.path, tmp)
                with open(tmp, "rb") as f:
                    os.fsync(f.fileno())
            os.replace(tmp, dst)
        except OSError as exc:
            _remove(tmp)
            raise PackageError(f"--model-store {self.store}: cannot copy {a.path} there ({exc.strerror or exc})") from None
        return Placement(a.file_name, placed=True)

    def remove(self, url: str) -> bool:
        """Remove an archive this command put in the store (by its unique name); False if none."""
        p = self.store / Path(urllib.parse.urlparse(url).path).name
        if not p.exists():
            return False
        _remove(p)
        return True


class UrlTarget:
    """A server that downloads archives: each must be published at `<url base>/<unique name>` beforehand.

    TorchServe saves the download in its store under the URL's file name (refusing a name already there) and
    deletes it when the version is unregistered, so nothing is left to remove here."""

    def __init__(self, base: str) -> None:
        if not re.match(r"^https?://", base):
            raise SpecError(f"--url-base {base}: use an http:// or https:// URL")
        self.base = base.rstrip("/")

    def place(self, a: Archive, in_use: set[str]) -> Placement:
        if a.is_dir:
            raise SpecError(f"{a.path}: a directory archive cannot be downloaded by TorchServe; deploy it with --model-store")
        url = f"{self.base}/{a.file_name}"
        from pipeline.torchserve.server import http

        try:
            code = http(url, method="HEAD", timeout=30)[0]
        except OSError as exc:
            raise PackageError(f"{url}: not reachable ({exc}); publish the archive there first") from None
        if code != 200:
            raise PackageError(f"{url}: HTTP {code}; publish {a.path} there under its deploy name {a.file_name} first")
        return Placement(url)

    def remove(self, url: str) -> bool:
        return False


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        p.unlink(missing_ok=True)
