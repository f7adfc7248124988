"""Remote stores against a real S3 server over HTTP: moto's standalone server on a loopback port, started
here and stopped by pid. Publish, re-run unchanged, a killed upload, readers of the index, exit 6 cases."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import ROOT, Project, marpipe

s3fs = pytest.importorskip("s3fs", reason="the s3 extra (make setup installs it)")
pytest.importorskip("moto", reason="moto[server] is in the dev extra")

BUCKET = "releases"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_moto(extra_env: dict[str, str] | None = None) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        env=dict(os.environ, **(extra_env or {})),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return proc, f"http://127.0.0.1:{port}"
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError("moto server exited at start") from None
            time.sleep(0.2)
    _stop(proc)
    raise RuntimeError("moto server did not start in 60 s")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()


def _aws_env(endpoint: str, home: Path) -> dict[str, str]:
    """Credentials and endpoint as a CI job sets them; no machine-wide AWS files are read."""
    return {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_CONFIG_FILE": str(home / "aws-config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(home / "aws-credentials"),
    }


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    proc, endpoint = _start_moto()
    env = _aws_env(endpoint, tmp_path_factory.mktemp("aws"))
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # for the s3fs client of the tests themselves
    try:
        _fs().mkdir(BUCKET)
        yield env
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        _stop(proc)


def _fs() -> s3fs.S3FileSystem:
    return s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False)


def _listing(prefix: str) -> dict[str, int]:
    fs = _fs()
    try:
        return {info["name"].rsplit("/", 1)[-1]: info["size"] for info in fs.ls(f"{BUCKET}/{prefix}", detail=True)}
    except FileNotFoundError:
        return {}


def _in_subprocess_main(args: list[str], env: dict[str, str], cwd: Path) -> tuple[int, bool]:
    code = "import sys; from pipeline.cli import main; rc = main(sys.argv[1:]); print('RESULT', rc, 'torch' in sys.modules)"
    proc = subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        env=dict(os.environ, PYTHONPATH=str(ROOT), **env),
        cwd=cwd,
        timeout=300,
    )
    last = proc.stdout.strip().splitlines()[-1].split()
    assert last[0] == "RESULT", proc.stdout + proc.stderr
    return int(last[1]), last[2] == "True"


def test_publish_then_unchanged_verify_and_index(linear_project: Project, s3: dict[str, str]) -> None:
    spec = linear_project.spec()
    url = f"s3://{BUCKET}/v1"
    seen_missing: list[str] = []
    stop = threading.Event()

    def reader() -> None:  # a reader of the store while it is published: the index never names a missing archive
        fs = _fs()
        while not stop.is_set():
            try:
                doc = json.loads(fs.cat_file(f"{BUCKET}/v1/index.json"))
            except FileNotFoundError:
                time.sleep(0.05)
                continue
            for e in doc["archives"]:
                try:
                    if fs.info(f"{BUCKET}/v1/{e['file']}")["size"] != e["size"]:
                        seen_missing.append(f"{e['file']} partial")
                except FileNotFoundError:
                    seen_missing.append(e["file"])
            time.sleep(0.02)

    watcher = threading.Thread(target=reader, daemon=True)
    watcher.start()
    result = marpipe("build", "--store", url, "--format", "eager,torchscript", "-j", "2", str(spec), env=s3, cwd=linear_project.root)
    stop.set()
    watcher.join(10)
    assert result.returncode == 0, result.stdout + result.stderr
    assert seen_missing == []
    assert not (linear_project.root / "s3:").exists() and not (ROOT / "s3:").exists()  # nothing written locally
    remote = _listing("v1")
    assert sorted(remote) == ["index.json", "tiny_eager.mar", "tiny_torchscript.mar"]  # no temporary keys
    doc = json.loads(_fs().cat_file(f"{BUCKET}/v1/index.json"))
    for e in doc["archives"]:
        data = _fs().cat_file(f"{BUCKET}/v1/{e['file']}")
        assert (len(data), hashlib.sha256(data).hexdigest()) == (e["size"], e["sha256"])
    assert "publish  ok" in result.stdout and "(size and sha256 checked)" in result.stdout
    staging = [p for p in Path(tempfile.gettempdir()).glob("marpipe-*-store-*")]
    assert staging == []  # the private staging folder is gone

    rc, torch_imported = _in_subprocess_main(["build", "--store", url, "--format", "eager,torchscript", str(spec)], s3, linear_project.root)
    assert rc == 0 and not torch_imported  # the cache works against the remote index
    assert _listing("v1") == remote

    verify = marpipe("verify", f"{url}/tiny_torchscript.mar", env=s3)
    assert verify.returncode == 0 and verify.stdout.startswith(f"ok   {url}/tiny_torchscript.mar"), verify.stdout + verify.stderr
    _fs().rm_file(f"{BUCKET}/v1/index.json")
    regenerated = marpipe("index", url, env=s3)
    assert regenerated.returncode == 0 and "2 archives" in regenerated.stdout, regenerated.stderr
    assert json.loads(_fs().cat_file(f"{BUCKET}/v1/index.json"))["archives"] == doc["archives"]

    from pipeline.store.stores import open_store

    with open_store(url) as store:  # what `marpipe smoke --store s3://...` serves: the archives, downloaded
        store.check(write=False)
        assert sorted(p.name for p in store.fetch().iterdir()) == ["tiny_eager.mar", "tiny_torchscript.mar"]


def test_a_killed_upload_leaves_no_final_key_and_the_next_build_cleans_up(project: Project, s3: dict[str, str]) -> None:
    state = project.model("Linear", n_in=2048, n_out=4096).state_dict()  # 32 MiB: the upload takes a while
    project.save({f"module.{k}": v for k, v in state.items()}, "big.pth")
    spec = project.spec(
        name="big",
        checkpoint={"path": "big.pth"},
        kwargs={"n_in": 2048, "n_out": 4096},
        inputs=[{"name": "x", "shape": ["batch", 2048]}],
        parity={"batch_sizes": [2], "samples": 1, "atol": 1e-4},
    )
    url = f"s3://{BUCKET}/kill"
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline", "build", "--store", url, str(spec)],
        env=dict(os.environ, PYTHONPATH=str(ROOT), **s3),
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        cwd=project.root,
    )
    for line in proc.stdout:
        if line.split()[1:2] == ["publish"]:
            break  # the upload starts now
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stdout.close()
    assert "big.mar" not in _listing("kill") and "index.json" not in _listing("kill")
    killed_staging = list(Path(tempfile.gettempdir()).glob(f"marpipe-{proc.pid}-store-*"))
    assert killed_staging  # the killed build's staging folder, left for the next build to remove

    result = marpipe("build", "--store", url, str(spec), env=s3, cwd=project.root)
    assert result.returncode == 0, result.stdout + result.stderr
    assert sorted(_listing("kill")) == ["big.mar", "index.json"]  # any temporary key of the killed upload removed
    assert not any(p.exists() for p in killed_staging)
    doc = json.loads(_fs().cat_file(f"{BUCKET}/kill/index.json"))
    assert [e["file"] for e in doc["archives"]] == ["big.mar"] and doc["archives"][0]["size"] == _listing("kill")["big.mar"]


def test_unreachable_missing_or_denied_store_is_exit_6_before_any_build(linear_project: Project, s3: dict[str, str]) -> None:
    spec = linear_project.spec()
    denied_proc, denied_endpoint = _start_moto({"INITIAL_NO_AUTH_ACTION_COUNT": "0"})  # checks credentials: ours are unknown
    try:
        cases = {
            "missing bucket": (f"s3://no-such-bucket/{BUCKET}", s3, "bucket 'no-such-bucket' does not exist"),
            "unreachable": (f"s3://{BUCKET}/x", dict(s3, AWS_ENDPOINT_URL=f"http://127.0.0.1:{_free_port()}"), "Could not connect"),
            "denied": (f"s3://{BUCKET}/x", dict(s3, AWS_ENDPOINT_URL=denied_endpoint), "access denied"),
        }
        for what, (url, env, message) in cases.items():
            result = marpipe("build", "--store", url, str(spec), env=env, cwd=linear_project.root)
            assert result.returncode == 6, (what, result.stdout, result.stderr)
            lines = result.stderr.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith(f"error: store {url}: ") and message in lines[0], (what, lines)
            assert result.stdout == "", what  # before any model was built
        assert not (linear_project.root / "s3:").exists()
        result = marpipe("index", f"s3://no-such-bucket/{BUCKET}", env=s3)
        assert result.returncode == 6 and "does not exist" in result.stderr
    finally:
        _stop(denied_proc)


def test_signed_archives_travel_with_their_signatures(linear_project: Project, s3: dict[str, str], tmp_path: Path) -> None:
    """A signed build publishes `<name>.mar.sig` beside the archive; `verify --key` of a URL downloads it; another
    key publishes a new one; `sign` of a URL uploads one (into a directory archive too); a changed archive is exit 6."""
    from test_signing import _key_pair

    from pipeline.store import signing

    (key, pub), (other, other_pub) = _key_pair(tmp_path, "ours"), _key_pair(tmp_path, "other")
    spec, url = linear_project.spec(), f"s3://{BUCKET}/signed"

    def verify(target: str, public: Path) -> int:
        return marpipe("verify", "--key", str(public), target, env=s3).returncode

    result = marpipe("build", "--store", url, "--sign-key", str(key), str(spec), env=s3, cwd=linear_project.root)
    assert result.returncode == 0, result.stdout + result.stderr
    assert sorted(_listing("signed")) == ["index.json", "tiny.mar", "tiny.mar.sig"]  # no temporary keys
    entry = json.loads(_fs().cat_file(f"{BUCKET}/signed/index.json"))["archives"][0]
    assert entry["signed"] and entry["signer"] == signing.check_public_key(pub)
    assert verify(f"{url}/tiny.mar", pub) == 0 and verify(f"{url}/tiny.mar", other_pub) == 6

    result = marpipe("build", "--store", url, "--sign-key", str(other), str(spec), env=s3, cwd=linear_project.root)
    assert result.returncode == 0 and "1 built" in result.stdout, result.stdout + result.stderr  # published again, signed
    assert verify(f"{url}/tiny.mar", other_pub) == 0 and sorted(_listing("signed")) == ["index.json", "tiny.mar", "tiny.mar.sig"]

    _fs().rm_file(f"{BUCKET}/signed/tiny.mar.sig")
    assert verify(f"{url}/tiny.mar", pub) == 6
    signed = marpipe("sign", f"{url}/tiny.mar", "--key", str(key), env=s3)
    assert signed.returncode == 0 and f"{url}/tiny.mar.sig" in signed.stdout, signed.stdout + signed.stderr
    assert verify(f"{url}/tiny.mar", pub) == 0
    assert json.loads(_fs().cat_file(f"{BUCKET}/signed/index.json"))["archives"][0]["signer"] == signing.check_public_key(pub)
    data = bytearray(_fs().cat_file(f"{BUCKET}/signed/tiny.mar"))
    data[len(data) // 2] ^= 1
    _fs().pipe_file(f"{BUCKET}/signed/tiny.mar", bytes(data))
    assert verify(f"{url}/tiny.mar", pub) == 6

    # a directory archive put there by hand (publishing folders is not what this test is about), signed by URL
    local = tmp_path / "local"
    result = marpipe("build", "--store", str(local), "--layout", "dir", str(spec), cwd=linear_project.root)
    assert result.returncode == 0, result.stdout + result.stderr
    _fs().put(str(local / "tiny"), f"{BUCKET}/signed-dir/tiny", recursive=True)
    folder = f"s3://{BUCKET}/signed-dir/tiny"
    assert verify(folder, pub) == 6
    signed = marpipe("sign", folder, "--key", str(key), env=s3)
    assert signed.returncode == 0 and f"{folder}/marpipe.sig" in signed.stdout, signed.stdout + signed.stderr
    assert "marpipe.sig" in _listing("signed-dir/tiny") and verify(folder, pub) == 0
    assert sorted(_listing("signed-dir")) == ["index.json", "tiny"]  # no temporary keys
