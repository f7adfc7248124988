"""Running a real TorchServe 0.12 on loopback: safe configuration, free ports, private folders, clean stop."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.errors import PackageError, SpecError
from pipeline.store.layout import list_archives, read_entry
from pipeline.torchserve.limits import DEFAULT_MAX_RESPONSE_SIZE, max_response_size, size_settings
from pipeline.torchserve.workdir import claim


@dataclass
class Server:
    proc: subprocess.Popen
    workdir: Path
    host: str
    ports: dict[str, int]
    models: dict[str, str]  # model name → archive file name
    auth: bool
    own_workdir: bool = False
    _keys: dict[str, str] = field(default_factory=dict)

    def url(self, api: str, path: str) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.ports[api]}{path}"

    def key(self, kind: str) -> str | None:
        """The token for `inference` or `management` when token authorization is on."""
        if not self.auth:
            return None
        if not self._keys:
            doc = json.loads((self.workdir / "key_file.json").read_text())
            self._keys = {k: v["key"] for k, v in doc.items() if isinstance(v, dict) and "key" in v}
        return self._keys.get(kind)

    def request(
        self,
        api: str,
        path: str,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
        method: str | None = None,
        timeout: float = 60,
        auth: bool = True,
    ) -> tuple[int, dict[str, str], bytes]:
        """One HTTP request; returns (status, headers, body) for every status, errors included."""
        token = self.key("management" if api == "management" else "inference") if auth else None
        return http(self.url(api, path), body, headers, method, timeout, token)

    def log_tail(self, lines: int = 20) -> str:
        out = []
        for name in ("model_log.log", "ts_log.log"):
            p = self.workdir / "logs" / name
            if p.exists():
                out += p.read_text(errors="replace").splitlines()[-lines:]
        return "\n".join(out)


def http(
    url: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
    method: str | None = None,
    timeout: float = 60,
    token: str | None = None,
) -> tuple[int, dict[str, str], bytes]:
    """One HTTP request; returns (status, headers, body) for every status, errors included. Transport
    failures (refused, reset, timed out) raise OSError."""
    headers = dict(headers or {})
    if token:
        headers["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(url, data=body, headers=headers, method=method)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers or {}), exc.read()


@dataclass
class Client:
    """A running TorchServe known only by its URLs (`marpipe deploy`): its management and inference APIs,
    and the keys of its key_file.json when token authorization is on."""

    management: str
    inference: str
    keys: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_key_file(cls, management: str, inference: str, key_file: Path | None) -> Client:
        """`key_file`: TorchServe's own key_file.json; without it no token is sent."""
        keys: dict[str, str] = {}
        if key_file is not None:
            try:
                doc = json.loads(Path(key_file).read_text())
                keys = {k: v["key"] for k, v in doc.items() if isinstance(v, dict) and isinstance(v.get("key"), str)}
            except (OSError, ValueError, AttributeError) as exc:
                raise SpecError(f"--token-file {key_file}: not TorchServe's key_file.json ({exc})") from None
            missing = [k for k in ("management", "inference") if k not in keys]
            if missing:
                raise SpecError(f"--token-file {key_file}: no {' or '.join(missing)} key in it; pass the key_file.json TorchServe wrote")
        return cls(management.rstrip("/"), inference.rstrip("/"), keys)

    def request(
        self,
        api: str,
        path: str,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
        method: str | None = None,
        timeout: float = 60,
    ) -> tuple[int, dict[str, str], bytes]:
        """`api`: management or inference; the matching key goes with it."""
        base = self.management if api == "management" else self.inference
        return http(base + path, body, headers, method, timeout, self.keys.get(api))


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
            s.bind((host, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def archive_model_name(path: Path) -> str:
    """The model name TorchServe registers for an archive (a .mar or a folder): its manifest's modelName."""
    try:
        return json.loads(read_entry(path, "MAR-INF/MANIFEST.json"))["model"]["modelName"]
    except (OSError, KeyError, ValueError, TypeError, zipfile.BadZipFile) as exc:
        raise PackageError(f"{path}: not a loadable archive ({exc}); run marpipe verify {path}") from None


# TorchServe's JVM with its quick compiler only: what `--vmargs` is for, not a default. On 2 cores the default
# tiered JIT spends the first ~9,000 requests of 600 KB compiling (its C2 thread took 3-4 ms of CPU a request
# beside a worker that needs the same cores); C1 alone is steady after a few hundred requests. But C1 has no
# SHA-1 intrinsic, and TorchServe digests every byte of a .mar it extracts: 11x slower (a 1 GiB .mar's cold
# start 6.3 -> 19.2 s), and C2 wins in the long run (small bodies: 0.35 against 0.6 ms a request).
QUICK_JIT = "-XX:TieredStopAtLevel=1"


def jvm_args(vmargs: str | None) -> str:
    """The `vmargs` line's value, on one line ('' for none: the JVM's defaults)."""
    return " ".join((vmargs or "").split())


def grpc_host(host: str) -> str:
    """Where TorchServe's gRPC APIs listen: loopback, whatever `host` the HTTP APIs use. TorchServe 0.12 cannot turn
    gRPC or its StreamPredictions2 off, and a StreamPredictions2 call whose client closes its side before the
    answer leaves the model's worker dead while the management API says READY (docs/requests.md)."""
    import ipaddress

    try:
        if host == "localhost" or ipaddress.ip_address(host).is_loopback:
            return host
    except ValueError:
        pass
    return "::1" if ":" in host else "127.0.0.1"


def config_text(
    store: Path,
    archives: list[str],
    host: str,
    ports: dict[str, int],
    auth: bool,
    model_api: bool,
    allowed_urls: list[str] | None = None,
    vmargs: str | None = None,
    max_response: int = DEFAULT_MAX_RESPONSE_SIZE,
) -> str:
    """A TorchServe config that is safe by default: loopback only, tokens on, no model registration API.
    `max_response`: the largest answer a worker may send (bytes; see `limits`)."""
    h = f"[{host}]" if ":" in host else host
    store = store.resolve()
    lines = {
        "inference_address": f"http://{h}:{ports['inference']}",
        "management_address": f"http://{h}:{ports['management']}",
        "metrics_address": f"http://{h}:{ports['metrics']}",
        "grpc_inference_address": grpc_host(host),
        "grpc_inference_port": ports["grpc_inference"],
        "grpc_management_address": grpc_host(host),
        "grpc_management_port": ports["grpc_management"],
        "model_store": str(store),
        "load_models": ",".join(archives) if archives else "",
        "disable_token_authorization": str(not auth).lower(),
        "enable_model_api": str(model_api).lower(),
        "allowed_urls": ",".join([f"file://{store}/.*", *(allowed_urls or [])]),  # TorchServe splits the list on commas
        "install_py_dep_per_model": "false",
        "decode_input_request": "false",  # the handler parses bodies itself: once, and faster (orjson)
        "enable_envvars_config": "false",
        # the Open Inference Protocol: v2 server live/ready over HTTP and the ModelInfer gRPC service (TorchServe's own
        # package name: org.pytorch.serve.grpc.openinference.GRPCInferenceService); see docs/requests.md
        "ts_open_inference_protocol": "true",
        "default_workers_per_model": 1,
        **size_settings(max_response),
    }
    if jvm := jvm_args(vmargs):
        lines["vmargs"] = jvm
    return "".join(f"{k}={v}\n" for k, v in lines.items())


def start(
    store: Path,
    archives: list[Path] | None = None,
    *,
    host: str = "127.0.0.1",
    port: int | None = None,
    auth: bool = True,
    model_api: bool = False,
    workdir: Path | None = None,
    allowed_urls: list[str] | None = None,
    vmargs: str | None = None,
) -> Server:
    """Start TorchServe in its own process group with its own config, logs and temp folder.

    `archives`: the archives (.mar files or folders) to load; default every one in the store; an empty
    list starts a server with no model (to register them over the model API, with `model_api`); so does a store
    with none (or none yet: the folder is made) when `model_api` is on.
    `allowed_urls`: regular expressions of more URLs it may register archives from.
    `vmargs`: options of TorchServe's JVM (default none: the JVM's own; see QUICK_JIT)."""
    if shutil.which("java") is None and not os.environ.get("JAVA_HOME"):
        raise PackageError("TorchServe needs Java 11+ and none was found; install it (apt-get install openjdk-17-jre-headless)")
    store = store.resolve()
    if archives is None:
        archives = list_archives(store)
        if not archives and not model_api:
            raise PackageError(f"no archives in {store}; run marpipe build first (or serve with --enable-model-api to deploy them later)")
    if model_api:
        try:
            store.mkdir(parents=True, exist_ok=True)  # where deploys put their archives
        except OSError as exc:
            raise PackageError(f"{store}: cannot make the model store there ({exc.strerror or exc})") from None
    archives = sorted(archives)
    models = {archive_model_name(a): a.name for a in archives}
    own = workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="marpipe-ts-")) if own else workdir.resolve()
    if not own:  # a reused workdir: an earlier run's server and logs are not this run's
        claim(workdir, host, [] if port is None else [port, port + 1, port + 2])
    for sub in ("logs", "tmp"):
        (workdir / sub).mkdir(parents=True, exist_ok=True)
    (workdir / "key_file.json").unlink(missing_ok=True)
    if port is None:
        numbers = free_ports(5, host)
    else:
        numbers = [port, port + 1, port + 2, *free_ports(2, host)]
    ports = dict(zip(("inference", "management", "metrics", "grpc_inference", "grpc_management"), numbers))
    config = workdir / "config.properties"
    names = [a.name for a in archives]
    config.write_text(config_text(store, names, host, ports, auth, model_api, allowed_urls, vmargs, max_response_size(archives)))
    env = dict(
        os.environ,
        TEMP=str(workdir / "tmp"),
        TMPDIR=str(workdir / "tmp"),
        LOG_LOCATION=str(workdir / "logs"),
        METRICS_LOCATION=str(workdir / "logs"),
    )
    env.pop("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", None)
    env.pop("TS_OPEN_INFERENCE_PROTOCOL", None)  # read even with enable_envvars_config=false; it would override the config
    cmd = [_torchserve(), "--start", "--foreground", "--ncs", "--model-store", str(store), "--ts-config", str(config)]
    if not auth:
        cmd.append("--disable-token-auth")
    if model_api:
        cmd.append("--enable-model-api")
    out = open(workdir / "logs" / "console.log", "wb")
    proc = subprocess.Popen(cmd, cwd=workdir, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    out.close()
    return Server(proc, workdir, host, ports, models, auth, own_workdir=own)


def _torchserve() -> str:
    here = Path(sys.executable).parent / "torchserve"
    return str(here) if here.exists() else (shutil.which("torchserve") or "torchserve")


def wait_ready(server: Server, timeout: float, poll: float = 0.5) -> dict[str, str]:
    """Wait until every model has a READY worker; returns name → status ('READY' or what went wrong).

    `poll`: seconds between looks (the benchmark's cold start asks every 0.05 s to time it closely)."""
    deadline = time.monotonic() + timeout
    status = {name: "not registered" for name in server.models}
    while not status and time.monotonic() < deadline:  # no model: wait until the management API answers
        with contextlib.suppress(OSError, ValueError):
            if server.request("management", "/models", timeout=5)[0] == 200:
                return status
        if server.proc.poll() is not None:
            raise PackageError(f"TorchServe exited ({server.proc.returncode}): {server.log_tail(5)}")
        time.sleep(poll)
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            return {n: s if s == "READY" else f"TorchServe exited ({server.proc.returncode})" for n, s in status.items()}
        failures = _load_failures(server)
        for name in status:
            if status[name] == "READY" or status[name].startswith("load failed"):
                continue
            status[name] = _model_status(server, name)
            if status[name] != "READY" and name in failures:
                # TorchServe retries a failing worker forever, with growing pauses: one death at load is enough
                status[name] = f"load failed: {failures[name][:300]}"
        if all(s == "READY" or s.startswith("load failed") for s in status.values()):
            return status
        time.sleep(poll)
    return status


def _load_failures(server: Server) -> dict[str, str]:
    """model name → why its worker died while loading (the worker's own last error line)."""
    log = server.workdir / "logs" / "model_log.log"
    text = log.read_text(errors="replace") if log.exists() else ""
    found: dict[str, str] = {}
    for name in server.models:
        worker = rf"W-\d+-{re.escape(name)}_\S*-stdout MODEL_LOG - "
        if re.search(worker + r"Backend worker process died", text):
            errors = re.findall(worker + r"((?:\w+\.)*\w*(?:Error|Exception)\b.*)", text)
            errors = [e for e in errors if not re.match(r"\w+: \d{3} - ", e)]  # TorchServe's own wrapper
            found[name] = errors[-1].strip() if errors else "the worker died while loading the model"
    return found


def _model_status(server: Server, name: str) -> str:
    try:
        code, _, body = server.request("management", f"/models/{name}", timeout=5)
    except (OSError, ValueError):
        return "server not answering yet"
    if code != 200:
        return "not registered" if code == 404 else f"management API answered {code}"
    try:
        workers = json.loads(body)[0].get("workers", [])
    except (ValueError, IndexError, AttributeError):
        return "unreadable model description"
    if any(w.get("status") == "READY" for w in workers):
        return "READY"
    return ", ".join(sorted({str(w.get("status")) for w in workers})) or "no workers"


def stop(server: Server, grace: float = 10.0) -> None:
    """Stop TorchServe and every process it started (its JVM and workers share its process group).

    The JVM and workers get SIGTERM, not the `torchserve` launcher: it waits for the JVM and reaps it, then
    exits (signalled first, it would orphan the JVM, which nothing might reap). Whatever is left after
    `grace` seconds is killed. Returns once no process of the group runs."""
    pgid = server.proc.pid
    members = _group(pgid)
    if members is None:  # no /proc: the whole group, the old way
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGTERM)
    for pid in members or ():
        if pid != pgid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
    if members is not None and members <= {pgid}:  # only the launcher left (or nothing)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pgid, signal.SIGTERM)
    if not _ended(server, grace):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)
        _ended(server, 5)
    if server.own_workdir:
        shutil.rmtree(server.workdir, ignore_errors=True)


def _group(pgid: int) -> set[int] | None:
    """The live (not zombie) processes of a process group, from /proc; None where there is no /proc."""
    proc = Path("/proc")
    if not (proc / "self" / "stat").exists():
        return None
    members = set()
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rpartition(")")[2].split()
        except OSError:  # it ended meanwhile
            continue
        if len(fields) > 2 and fields[0] != "Z" and int(fields[2]) == pgid:
            members.add(int(entry.name))
    return members


def _ended(server: Server, timeout: float) -> bool:
    """Wait until the launcher has exited (reaped) and no process of its group runs."""
    deadline = time.monotonic() + timeout
    while server.proc.poll() is None or _alive(server.proc.pid):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.1)
    return True


def _alive(pgid: int) -> bool:
    members = _group(pgid)
    if members is not None:
        return bool(members)
    try:  # no /proc: a zombie still counts here, but is rare where there is no /proc
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


@contextlib.contextmanager
def running(store: Path, archives: list[Path] | None = None, **kwargs: Any):
    server = start(store, archives, **kwargs)
    try:
        yield server
    finally:
        stop(server)
