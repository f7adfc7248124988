"""`marpipe deploy`: put archives on a running TorchServe as new versions, check each live, then switch.

For each archive: place it where the server finds it under a unique versioned name
(`<name>-<version>-<sha256[:12]>.mar`, or that folder for a directory archive), register it as a new
version (`POST /models?url=…&initial_workers=N&synchronous=true`), wait until its workers are READY, replay
the archive's stored parity inputs through `/predictions/{name}/{version}` and compare the answers with its
stored eager outputs within its own tolerances, and only then `PUT /models/{name}/{version}/set-default`;
then unregister the versions beyond the newest `keep`, each drained first (`drain.py`: nothing queued to it or
running on it is lost). Any failure rolls back: the new version is drained, unregistered and its file removed,
the default and the other versions keep serving.

Two ways to reach the server's model store: a folder it reads (`--model-store`, its own), or URLs it
downloads archives from (`--url-base`; TorchServe stores the download under the URL's file name and deletes
it when the version is unregistered).
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
import urllib.parse
from dataclasses import asdict, dataclass
from pathlib import Path

from pipeline.errors import PackageError, ParityError, PipelineError
from pipeline.torchserve.drain import drain
from pipeline.torchserve.placement import Archive, FolderTarget, Placement, UrlTarget, read_archive
from pipeline.torchserve.server import Client


@dataclass
class Row:
    """One line of the table of what changed."""

    model: str
    version: str
    action: str  # deployed | no-op | rolled back | failed | unregistered
    archive: str
    note: str = ""
    exit_code: int = 0


@dataclass
class Options:
    workers: int | None = None
    timeout: float = 300
    keep: int = 2
    drain_timeout: float = 60


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

    def _unregister(self, name: str, version: str, since: float | None = None) -> tuple[bool, str]:
        """Drain the version (`since`: when requests stopped being routed to it; default now), then unregister it."""
        drained = drain(self._call, name, version, time.monotonic() if since is None else since, self.opts.drain_timeout)
        if not drained.ok:
            return False, f"not drained within --drain-timeout {self.opts.drain_timeout:g} s ({drained.why}); left registered"
        _say(f"{name} {version}: drained ({drained.note()})")
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
            if not getattr(exc, "recorded", False):  # not already in the table (a rollback, a refused unregistration)
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
            switched = time.monotonic()  # from here no request is routed to the old default
            if code != 200:
                raise PackageError(f"set-default {a.name} {a.version}: HTTP {code}: {_text(body)}")
        except PipelineError as exc:
            why = self._rollback(a, place, default)
            exc.message = f"{a.path}: {exc.message}; {why}"
            self.rows.append(Row(a.name, a.version, "rolled back", a.file_name, exc.message, exc.exit_code))
            exc.recorded = True
            raise
        was = f" (was {default['modelVersion']})" if default else ""
        self.rows.append(Row(a.name, a.version, "deployed", a.file_name, f"default{was}; live check max abs err {worst:.3g}"))
        _say(f"{a.name} {a.version}: default{was}")
        self._prune(a, default, switched)

    def _register(self, a: Archive, place: Placement) -> None:
        expected = self._expected_workers(a)
        query = urllib.parse.urlencode({"url": place.url, "initial_workers": expected, "synchronous": "true"})
        _say(f"{a.name} {a.version}: registering {place.url}")
        # from here the version may exist, even after an error: TorchServe's own clean-up after workers that
        # failed to start can fail and leave it registered, so the rollback asks to unregister (404 = done)
        place.registered = True
        try:
            code, _, body = self.client.request("management", f"/models?{query}", method="POST", timeout=self.opts.timeout)
        except TimeoutError:  # a synchronous registration answers once the workers loaded
            raise ParityError(f"workers of {a.name} {a.version} not READY within {self.opts.timeout:g} s (registration pending)") from None
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
        """The archive's stored checks through the new version, exactly as `marpipe smoke` replays them (parity
        inputs as npz and JSON split to fit TorchServe's request size, the sample raw requests of an archive with
        image or text inputs or hooks); every answer within the archive's tolerances."""
        from pipeline.torchserve.smoke import check_archive

        route = f"/predictions/{_q(a.name)}/{_q(a.version)}"
        try:
            rows = check_archive(self.client, a.name, a.path, route=route)
        except OSError as exc:
            raise PackageError(f"live check: {route}: TorchServe not reachable ({exc})") from None
        bad = [r for r in rows if not r["ok"] and not r.get("skipped")]
        if bad:
            raise ParityError(f"live check: {a.name} {a.version} answers wrong ({bad[0]['transport']}): {bad[0]['why']}")
        worst = max((r["max_abs"] for r in rows if r["max_abs"] is not None), default=0.0)
        _say(f"{a.name} {a.version}: live check ok ({len(rows)} checks, max abs err {worst:.3g})")
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

    def _prune(self, a: Archive, previous: dict | None, switched: float) -> None:
        """Unregister versions beyond the newest `keep`: the new default, the previous one, then by version; each
        drained first (the previous default from the switch on)."""
        _, versions = self.versions(a.name)
        first = [a.version] + ([previous["modelVersion"]] if previous else [])
        rest = sorted((v["modelVersion"] for v in versions if v["modelVersion"] not in first), key=version_key, reverse=True)
        order = [*dict.fromkeys(first), *rest]
        urls = {v["modelVersion"]: v["modelUrl"] for v in versions}
        failed = []
        for version in order[max(1, self.opts.keep) :]:
            since = switched if previous and version == previous["modelVersion"] else None
            ok, detail = self._unregister(a.name, version, since)
            if not ok:
                failed.append(f"{version}: {detail}")
                self.rows.append(Row(a.name, version, "failed", _base(urls[version]), f"not unregistered: {detail}", 6))
                continue
            removed = _ours(a.name, version, urls[version]) and self.target.remove(urls[version])
            note = f"beyond --keep {self.opts.keep}" + ("; file removed" if removed else "")
            self.rows.append(Row(a.name, version, "unregistered", _base(urls[version]), note))
            _say(f"{a.name} {version}: unregistered ({note})")
        if failed:
            exc = PackageError(f"{a.name}: {a.version} is the default, but unregistering old versions failed: {'; '.join(failed)}")
            exc.recorded = True
            raise exc


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
