"""`marpipe deploy`: put archives on a running TorchServe as new versions, check each live, then switch.

For each archive: place it where the server finds it under a unique versioned name
(`<name>-<version>-<sha256[:12]>.mar`, or that folder for a directory archive), register it as a new
version (`POST /models?url=…&initial_workers=N&synchronous=true`), wait until its workers are READY, replay
the archive's stored parity inputs through `/predictions/{name}/{version}` and compare the answers with its
stored eager outputs within its own tolerances, and only then `PUT /models/{name}/{version}/set-default`;
then unregister the versions beyond the newest `keep`. Any failure rolls back: the new version is
unregistered and its file removed, the default and the other versions keep serving.

Two ways to reach the server's model store: a folder it reads (`--model-store`, its own), or URLs it
downloads archives from (`--url-base`; TorchServe stores the download under the URL's file name and deletes
it when the version is unregistered).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import sys
import time
import urllib.parse
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from pipeline import archive, archive_dir
from pipeline.errors import PackageError, ParityError, PipelineError, SpecError
from pipeline.server import Client
from pipeline.smoke import judge

VERSION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")


@dataclass
class Archive:
    """One archive to deploy, read once: identity, digest, and what the live check replays."""

    path: Path
    name: str
    version: str
    sha256: str
    meta: dict
    inputs: dict[str, np.ndarray]
    expected: dict[str, np.ndarray]

    @property
    def is_dir(self) -> bool:
        return self.path.is_dir()

    @property
    def file_name(self) -> str:
        """The unique name in the server's store: a file name must never be reused there."""
        base = f"{self.name}-{self.version}-{self.sha256[:12]}"
        return base if self.is_dir else f"{base}.mar"


@dataclass
class Row:
    """One line of the table of what changed."""

    model: str
    version: str
    action: str  # deployed | no-op | rolled back | failed | unregistered | skipped
    archive: str
    note: str = ""
    exit_code: int = 0


@dataclass
class Options:
    workers: int | None = None
    timeout: float = 300
    keep: int = 2


@dataclass
class Placement:
    """Where the server finds an archive: `url` for the registration, and whether this run put it there."""

    url: str
    placed: bool = False
    registered: bool = False  # a registration was sent and not refused: the rollback unregisters


def read_archive(path: Path) -> Archive:
    """Verify an archive (.mar or folder) and read what deploying it needs; PackageError (6) if it is not sound."""
    path = Path(path)
    faults = archive.verify(path)
    if faults:
        raise PackageError(f"{path}: {faults[0]}; run marpipe verify {path}")
    manifest = json.loads(archive_dir.read_entry(path, archive.MANIFEST))["model"]
    name, version = manifest["modelName"], str(manifest.get("modelVersion") or "1.0")
    if not VERSION_RE.match(version) or ".." in version:
        raise SpecError(f"{path}: version {version!r} cannot name a file in the model store; use letters, digits, '.', '_', '-'")
    meta = json.loads(archive_dir.read_entry(path, archive.METADATA))
    inputs, expected = (_npz(archive_dir.read_entry(path, n)) for n in ("parity_inputs.npz", "parity_outputs.npz"))
    return Archive(path, name, version, _digest(path), meta, inputs, expected)


def _digest(path: Path) -> str:
    """sha256 of a .mar file, or of a folder as `archive_dir.tree_digest` defines it."""
    if path.is_dir():
        return archive_dir.tree_digest(path)[1]
    digest = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(archive.CHUNK)
        while n := f.readinto(buf):
            digest.update(memoryview(buf)[:n])
    return digest.hexdigest()


def _npz(data: bytes) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(data), allow_pickle=False) as f:
        return {k: f[k] for k in f.files}


def _to_npz(arrays: dict[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


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
        from pipeline.server import http

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


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class Deployer:
    """Deploys archives one after the other on one server; collects the table of what changed."""

    def __init__(self, client: Client, target: FolderTarget | UrlTarget, options: Options) -> None:
        self.client, self.target, self.opts = client, target, options
        self.rows: list[Row] = []

    # -- the management API ------------------------------------------------------------------------
    def _call(self, method: str, path: str, timeout: float = 60, api: str = "management", **kw) -> tuple[int, bytes]:
        try:
            code, _, body = self.client.request(api, path, method=method, timeout=timeout, **kw)
        except OSError as exc:
            raise PackageError(f"{method} {path}: TorchServe not reachable ({exc})") from None
        if code in (400, 401) and b"Token Authorization failed" in body:
            raise PackageError(
                f"{method} {path}: token refused; pass --token-file with the server's current key_file.json "
                "(keys expire after token_expiration_min, 60 by default)"
            )
        return code, body

    def versions(self, name: str) -> tuple[dict | None, list[dict]]:
        """(the default version's description or None, every version's) of a model; (None, []) if unknown."""
        code, body = self._call("GET", f"/models/{_q(name)}")
        if code == 404:
            return None, []
        if code != 200:
            raise PackageError(f"GET /models/{name}: HTTP {code}: {_text(body)}")
        default = json.loads(body)[0]
        code, body = self._call("GET", f"/models/{_q(name)}/all")
        if code != 200:
            raise PackageError(f"GET /models/{name}/all: HTTP {code}: {_text(body)}")
        return default, json.loads(body)

    def _unregister(self, name: str, version: str) -> tuple[bool, str]:
        code, body = self._call("DELETE", f"/models/{_q(name)}/{_q(version)}", timeout=self.opts.timeout)
        return code in (200, 404), f"HTTP {code}: {_text(body)}"

    # -- one archive ---------------------------------------------------------------------------------
    def deploy(self, path: Path) -> None:
        """Deploy one archive; a failure is rolled back, recorded in the table and raised."""
        a = None
        try:
            a = read_archive(path)
            self._deploy(a)
        except PipelineError as exc:
            if not self.rows or self.rows[-1].exit_code != exc.exit_code or self.rows[-1].note != exc.message:
                name, version, file = (a.name, a.version, a.file_name) if a else ("-", "-", str(path))
                self.rows.append(Row(name, version, "failed", file, exc.message, exc.exit_code))
            raise

    def _deploy(self, a: Archive) -> None:
        default, versions = self.versions(a.name)
        if default and default["modelVersion"] == a.version and _base(default["modelUrl"]) == a.file_name:
            self.rows.append(Row(a.name, a.version, "no-op", a.file_name, "already the default, same sha256"))
            _say(f"{a.name} {a.version}: already the default ({a.file_name}); nothing to do")
            return
        same = next((v for v in versions if v["modelVersion"] == a.version), None)
        if same and _base(same["modelUrl"]) != a.file_name:
            raise PackageError(
                f"{a.path}: version {a.version} of {a.name} is already registered from {same['modelUrl']}, a different archive; "
                "give the spec a new version"
            )
        in_use = {_base(v["modelUrl"]) for v in versions}
        place = self.target.place(a, in_use)
        try:
            if same is None:
                self._register(a, place)
            self._wait_ready(a)
            worst = self._replay(a)
            code, body = self._call("PUT", f"/models/{_q(a.name)}/{_q(a.version)}/set-default")
            if code != 200:
                raise PackageError(f"set-default {a.name} {a.version}: HTTP {code}: {_text(body)}")
        except PipelineError as exc:
            why = self._rollback(a, place, default)
            exc.message = f"{a.path}: {exc.message}; {why}"
            self.rows.append(Row(a.name, a.version, "rolled back", a.file_name, exc.message, exc.exit_code))
            raise
        was = f" (was {default['modelVersion']})" if default else ""
        self.rows.append(Row(a.name, a.version, "deployed", a.file_name, f"default{was}; live check max abs err {worst:.3g}"))
        _say(f"{a.name} {a.version}: default{was}")
        self._prune(a, default)

    def _register(self, a: Archive, place: Placement) -> None:
        expected = self._expected_workers(a)
        query = urllib.parse.urlencode({"url": place.url, "initial_workers": expected, "synchronous": "true"})
        _say(f"{a.name} {a.version}: registering {place.url}")
        # from here the version may exist, even after an error: TorchServe's own clean-up after workers that
        # failed to start can fail and leave it registered, so the rollback asks to unregister (404 = done)
        place.registered = True
        try:
            code, _, body = self.client.request("management", f"/models?{query}", method="POST", timeout=self.opts.timeout)
        except OSError as exc:
            raise PackageError(f"registering {place.url}: no answer ({exc})") from None
        text = _text(body)
        if code == 500 and "Failed to start workers" in text:
            raise ParityError(f"the model did not load (TorchServe: {text}); see the server's model_log.log")
        if 400 <= code < 500:
            place.registered = False  # refused: nothing of ours to unregister
        if code == 405:
            raise PackageError("the server refuses registrations: start it with --enable-model-api (enable_model_api=true)")
        if code not in (200, 201, 202, 206):
            raise PackageError(f"registration of {place.url} refused: HTTP {code}: {text}")
        serve = a.meta.get("serve", {})
        if self.opts.workers and self.opts.workers != serve.get("min_workers"):
            # the archive's model-config.yaml (minWorkers/maxWorkers) wins over initial_workers: scale explicitly
            n = self.opts.workers
            path = f"/models/{_q(a.name)}/{_q(a.version)}?min_worker={n}&max_worker={n}&synchronous=true"
            code, body = self._call("PUT", path, timeout=self.opts.timeout)
            if code not in (200, 202, 206):
                raise PackageError(f"scaling {a.name} {a.version} to {n} workers: HTTP {code}: {_text(body)}")

    def _expected_workers(self, a: Archive) -> int:
        return int(self.opts.workers or a.meta.get("serve", {}).get("min_workers") or 1)

    def _wait_ready(self, a: Archive) -> None:
        want = self._expected_workers(a)
        deadline, seen = time.monotonic() + self.opts.timeout, "not registered"
        while time.monotonic() < deadline:
            code, body = self._call("GET", f"/models/{_q(a.name)}/{_q(a.version)}", timeout=30)
            if code == 200:
                workers = json.loads(body)[0].get("workers", [])
                ready = sum(w.get("status") == "READY" for w in workers)
                if ready >= want:
                    return
                seen = ", ".join(sorted(str(w.get("status")) for w in workers)) or "no workers"
            elif code == 404:
                seen = "unregistered by the server (its workers failed)"
                break
            time.sleep(0.5)
        raise ParityError(f"workers of {a.name} {a.version} not READY within {self.opts.timeout:g} s ({seen})")

    def _replay(self, a: Archive) -> float:
        """The stored parity inputs through the new version; its answer within the archive's tolerances."""
        headers = {"Content-Type": "application/x-npz", "Accept": "application/x-npz"}
        path = f"/predictions/{_q(a.name)}/{_q(a.version)}"
        code, body = self._call("POST", path, api="inference", body=_to_npz(a.inputs), headers=headers, timeout=self.opts.timeout)
        if code != 200:
            raise ParityError(f"live check: {path} answered HTTP {code}: {_text(body)}")
        try:
            got = _npz(body)
        except (ValueError, OSError) as exc:
            raise ParityError(f"live check: unreadable answer from {path} ({exc})") from None
        worst, why = judge(a.meta, a.expected, got)
        if why:
            raise ParityError(f"live check: {a.name} {a.version} answers wrong: {'; '.join(why)}")
        _say(f"{a.name} {a.version}: live check ok (max abs err {worst:.3g})")
        return worst

    def _rollback(self, a: Archive, place: Placement, default: dict | None) -> str:
        """Undo what this run did for `a`; returns what was done, for the one error line."""
        done = []
        if place.registered:
            try:
                ok, detail = self._unregister(a.name, a.version)
                done.append(f"version {a.version} unregistered" if ok else f"version {a.version} NOT unregistered ({detail})")
            except PackageError as exc:
                done.append(f"version {a.version} NOT unregistered ({exc.message})")
        if place.placed and self.target.remove(place.url):
            done.append(f"{a.file_name} removed")
        kept = f"default stays {default['modelVersion']}" if default else "no default before"
        return "rolled back: " + ", ".join([*done, kept])

    def _prune(self, a: Archive, previous: dict | None) -> None:
        """Unregister versions beyond the newest `keep`: the new default, the previous one, then by version."""
        _, versions = self.versions(a.name)
        first = [a.version] + ([previous["modelVersion"]] if previous else [])
        rest = sorted((v["modelVersion"] for v in versions if v["modelVersion"] not in first), key=version_key, reverse=True)
        order = [*dict.fromkeys(first), *rest]
        urls = {v["modelVersion"]: v["modelUrl"] for v in versions}
        failed = []
        for version in order[max(1, self.opts.keep) :]:
            ok, detail = self._unregister(a.name, version)
            if not ok:
                failed.append(f"{version}: {detail}")
                self.rows.append(Row(a.name, version, "failed", _base(urls[version]), f"unregister refused: {detail}", 6))
                continue
            removed = _ours(a.name, version, urls[version]) and self.target.remove(urls[version])
            note = f"beyond --keep {self.opts.keep}" + ("; file removed" if removed else "")
            self.rows.append(Row(a.name, version, "unregistered", _base(urls[version]), note))
            _say(f"{a.name} {version}: unregistered ({note})")
        if failed:
            raise PackageError(f"{a.name}: {a.version} is the default, but unregistering old versions failed: {'; '.join(failed)}")


def _ours(name: str, version: str, url: str) -> bool:
    """A store entry named the way this command names them (others' files are left alone)."""
    return re.fullmatch(rf"{re.escape(name)}-{re.escape(version)}-[0-9a-f]{{12}}(\.mar)?", _base(url)) is not None


def _base(url: str) -> str:
    return Path(urllib.parse.urlparse(url).path).name if "://" in url else Path(url).name


def _q(part: str) -> str:
    return urllib.parse.quote(part, safe="")


def _text(body: bytes) -> str:
    text = body[:300].decode(errors="replace")
    try:
        doc = json.loads(body)
        if isinstance(doc, dict):
            text = str(doc.get("message") or doc.get("status") or doc.get("error") or text)
    except ValueError:
        pass
    return " ".join(text.split())


def version_key(version: str) -> list[tuple[int, int, str]]:
    """Natural order: 1.10 after 1.9; numbers before text at the same place."""
    return [(0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.findall(r"\d+|\D+", version)]


def deploy(paths: list[Path], client: Client, target: FolderTarget | UrlTarget, options: Options, report: Path | None) -> int:
    """Deploy each archive in turn (a failure rolls that one back; the others still go); prints the table."""
    deployer = Deployer(client, target, options)
    first: PipelineError | None = None
    for path in paths:
        try:
            deployer.deploy(path)
        except PipelineError as exc:
            print(f"error: {exc}", file=sys.stderr)
            first = first or exc
    _table(deployer.rows)
    code = first.exit_code if first else 0
    if report:
        changes = [asdict(r) for r in deployer.rows]
        doc = {"management": client.management, "inference": client.inference, "exit_code": code, "changes": changes}
        try:
            report.parent.mkdir(parents=True, exist_ok=True)
            tmp = report.with_name(f".{report.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(doc, indent=2) + "\n")
            os.replace(tmp, report)
        except OSError as exc:
            raise PackageError(f"--report {report}: cannot write it ({exc.strerror or exc})") from None
    return code


def _table(rows: list[Row]) -> None:
    print(f"{'model':<20} {'version':<10} {'action':<13} {'archive':<44} note")
    for r in rows:
        print(f"{r.model:<20} {r.version:<10} {r.action:<13} {r.archive:<44} {r.note}")
