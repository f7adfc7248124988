"""`marpipe serve` on a reused workdir tells the truth about loading (issue 21, item 4): an earlier run's logs
never count as this run's, and a TorchServe still running on the workdir or ports is named, not fought with."""

from __future__ import annotations

import json
import os
import signal
import socket
import time
from pathlib import Path

import pytest
from conftest import Project, marpipe, start_serve

from pipeline.errors import PackageError
from pipeline.torchserve import server as ts
from pipeline.torchserve.workdir import claim, workdir_users

# What model_log.log of a run in which tiny's worker died holds (TorchServe appends to it, run after run)
EARLIER = """\
2026-01-01T10:00:00,000 [INFO ] W-9000-tiny_1.0-stdout MODEL_LOG - Backend worker process died.
2026-01-01T10:00:00,001 [INFO ] W-9000-tiny_1.0-stdout MODEL_LOG - Traceback (most recent call last):
2026-01-01T10:00:00,002 [INFO ] W-9000-tiny_1.0-stdout MODEL_LOG - BrokenPipeError: [Errno 32] Broken pipe
"""


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    project = Project(tmp_path_factory.mktemp("servework"))
    project.save(project.model("Linear").state_dict(), "tiny.pth")
    result = project.build(project.spec(name="tiny", version="1.0"))
    assert result.returncode == 0, result.stdout + result.stderr
    return project.store


def test_claim_moves_an_earlier_runs_logs_aside(tmp_path) -> None:
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "model_log.log").write_text(EARLIER)
    claim(tmp_path, "127.0.0.1", [])
    assert list((tmp_path / "logs").iterdir()) == []
    assert (tmp_path / "logs.previous" / "model_log.log").read_text() == EARLIER


def test_claim_names_who_holds_a_port(tmp_path) -> None:
    held = socket.socket()
    held.bind(("127.0.0.1", 0))
    held.listen()
    port = held.getsockname()[1]
    try:
        with pytest.raises(PackageError, match=rf"port {port} \(pid {os.getpid()}\) on 127.0.0.1 in use"):
            claim(tmp_path, "127.0.0.1", [port], wait=0.3)
    finally:
        held.close()


@pytest.mark.slow
def test_an_earlier_runs_dead_worker_is_not_a_load_failure(store, tmp_path) -> None:
    workdir = tmp_path / "serve"
    (workdir / "logs").mkdir(parents=True)
    (workdir / "logs" / "model_log.log").write_text(EARLIER)
    proc, text = start_serve(store, ts.free_ports(1)[0], workdir, timeout=240)
    try:
        assert "load failed" not in text and "READY" in text, text
        assert "Backend worker process died" not in (workdir / "logs" / "model_log.log").read_text()
        assert (workdir / "logs.previous" / "model_log.log").read_text() == EARLIER
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0


@pytest.mark.slow
def test_a_server_left_running_on_the_workdir_is_named(store, tmp_path) -> None:
    """`marpipe serve` killed with SIGKILL leaves its TorchServe running: the next serve on that workdir refuses,
    naming its pid, and leaves its key file alone (it used to delete it and report the new JVM's exit)."""
    workdir = tmp_path / "serve"
    port = ts.free_ports(1)[0]
    proc, text = start_serve(store, port, workdir, timeout=240)
    assert "serving" in text, text
    proc.kill()
    proc.wait(timeout=30)
    left = workdir_users(workdir)
    try:
        assert left, "TorchServe went with marpipe serve"
        keys = (workdir / "key_file.json").read_text()
        began = time.monotonic()
        result = marpipe("serve", "--store", str(store), "--port", str(port), "--workdir", str(workdir), timeout=120)
        assert result.returncode != 0 and "in use by a TorchServe still running (pid " in result.stderr, result.stderr
        assert any(f"pid {pid}:" in result.stderr for pid, _ in left), (left, result.stderr)
        assert time.monotonic() - began >= 5  # it waited for a server that might be stopping
        assert (workdir / "key_file.json").read_text() == keys
        key = json.loads(keys)["management"]["key"]
        code, _, _ = ts.http(f"http://127.0.0.1:{port + 1}/models", token=key)
        assert code == 200  # the earlier server still serves, undisturbed
    finally:
        for pgid in {os.getpgid(pid) for pid, _ in left if _alive(pid)}:
            os.killpg(pgid, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while workdir_users(workdir) and time.monotonic() < deadline:
            time.sleep(0.2)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
