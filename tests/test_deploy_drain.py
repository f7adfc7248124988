"""`marpipe deploy --keep 1` under continuous traffic loses nothing (issue 21, item 2).

Four client threads send to `/predictions/tiny` on one real TorchServe (loopback, tokens on) while tiny 2.0,
a 3.0 whose answers are wrong (rolled back), 3.0 and 4.0 are deployed, each switch unregistering the old
default. Every version has other weights, so each answer names the version that gave it. Every request is
counted: each must be answered 200 by a deployed version, and once a switch has completed (deploy returned)
only by the new default until the next deploy starts. Bounded: at most MAX_REQUESTS per thread and
MAX_SECONDS in all.
"""

from __future__ import annotations

import http.client
import json
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from conftest import Project, marpipe
from test_deploy import ROWS, _expected, _rewrite_entry, _saved, _state

from pipeline.torchserve import server as ts

pytestmark = pytest.mark.slow
CLIENTS, MAX_REQUESTS, MAX_SECONDS = 4, 20_000, 240
BATCH_DELAY_MS = 20  # the spec default: a worker gathers a batch that long, so requests are always in flight
GOOD = ("1.0", "2.0", "3.0", "4.0")


@dataclass
class Sent:
    sent: float
    answered: float
    status: int  # 0: no HTTP answer (refused, reset, timed out)
    version: str  # which version's weights gave the answer; "" none, "?" none of the deployed ones
    detail: str = ""


@pytest.fixture(scope="module")
def archives(tmp_path_factory) -> dict[str, Path]:
    project = Project(tmp_path_factory.mktemp("drain"))
    out = {}
    for version, seed in zip(GOOD, (11, 12, 13, 14)):
        project.save(_state(seed), "tiny.pth")
        spec = project.spec(name="tiny", version=version, serve={"max_batch_delay_ms": BATCH_DELAY_MS})
        result = marpipe("build", "--store", str(project.root / f"v{version}"), str(spec))
        assert result.returncode == 0, result.stdout + result.stderr
        out[version] = project.root / f"v{version}" / "tiny.mar"
    wrong = project.root / "wrong" / "tiny.mar"
    out["3.0-wrong"] = _rewrite_entry(out["3.0"], wrong, "weights.pt", _saved(_state(99)))
    return out


def _which(answer: np.ndarray) -> str:
    for version, seed in zip(GOOD, (11, 12, 13, 14)):
        if np.allclose(answer, _expected(_state(seed)), rtol=1e-5, atol=1e-5):
            return version
    return "?"


def _client(srv: ts.Server, stop: threading.Event, log: list[Sent]) -> None:
    body = json.dumps({"inputs": {"x": ROWS.tolist()}}).encode()
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {srv.key('inference')}"}
    conn = http.client.HTTPConnection(srv.host, srv.ports["inference"], timeout=30)
    while not stop.is_set() and len(log) < MAX_REQUESTS:
        sent = time.monotonic()
        try:
            conn.request("POST", "/predictions/tiny", body, headers)
            resp = conn.getresponse()
            status, data = resp.status, resp.read()
        except (OSError, http.client.HTTPException) as exc:
            log.append(Sent(sent, time.monotonic(), 0, "", repr(exc)))
            conn.close()
            conn = http.client.HTTPConnection(srv.host, srv.ports["inference"], timeout=30)
            continue
        answered = time.monotonic()
        if status != 200:
            log.append(Sent(sent, answered, status, "", data[:200].decode(errors="replace")))
            continue
        log.append(Sent(sent, answered, status, _which(np.asarray(json.loads(data)["outputs"]["output"], dtype=np.float32))))
    conn.close()


def test_deploys_under_traffic_lose_nothing(tmp_path, archives) -> None:
    store = tmp_path / "store"
    store.mkdir()
    srv = ts.start(store, [], auth=True, model_api=True)
    try:
        ts.wait_ready(srv, 180)

        def deploy(archive: Path) -> tuple[float, float, str]:
            args = ["--management", srv.url("management", ""), "--inference", srv.url("inference", "")]
            args += ["--model-store", str(store), "--token-file", str(srv.workdir / "key_file.json"), "--keep", "1"]
            start = time.monotonic()
            result = marpipe("deploy", str(archive), *args, timeout=300)
            return start, time.monotonic(), f"{result.returncode}\n{result.stdout}{result.stderr}"

        _, _, out = deploy(archives["1.0"])
        assert out.startswith("0\n"), out
        stop, logs = threading.Event(), [[] for _ in range(CLIENTS)]
        threads = [threading.Thread(target=_client, args=(srv, stop, log), daemon=True) for log in logs]
        for t in threads:
            t.start()
        began = time.monotonic()
        switches = [(began, began, "1.0")]  # (deploy started, deploy returned, default after it)
        outputs = []
        try:
            for name, code in (("2.0", "0"), ("3.0-wrong", "5"), ("3.0", "0"), ("4.0", "0")):
                time.sleep(1.0)
                start, done, out = deploy(archives[name])
                outputs.append(out)
                assert out.startswith(code + "\n"), out
                switches.append((start, done, name if code == "0" else switches[-1][2]))
                assert time.monotonic() - began < MAX_SECONDS
            time.sleep(1.0)
        finally:
            stop.set()
            for t in threads:
                t.join(60)
        every = sorted((s for log in logs for s in log), key=lambda s: s.sent)
        by_version = {v: sum(s.version == v for s in every) for v in ("", "?", *GOOD)}
        drains = [ln for out in outputs for ln in out.splitlines() if "drained (" in ln]
        print(f"\n{len(every)} requests in {time.monotonic() - began:.1f} s; answered by version: {by_version}")
        print("\n".join(drains))
        failed = [s for s in every if s.status != 200]
        assert not failed, f"{len(failed)} of {len(every)} requests failed, first: {failed[:3]}"
        assert by_version[""] == 0 and by_version["?"] == 0, by_version
        # between a deploy's return and the next deploy's start, only that default answers
        late = []
        for (_, done, default), (start_next, _, _) in zip(switches, [*switches[1:], (float("inf"), 0, "")]):
            late += [s for s in every if s.sent > done and s.answered < start_next and s.version != default]
        assert not late, f"{len(late)} answers not from the default of their time, first: {late[:3]}"
        assert all(n for v, n in by_version.items() if v in GOOD), by_version  # every deployed version answered
        described = json.loads(srv.request("management", "/models/tiny/all")[2])
        assert [d["modelVersion"] for d in described] == ["4.0"]
        assert len(drains) == 4, drains  # 1.0, 2.0 and 3.0 after their switches, the wrong 3.0 in its rollback
    finally:
        ts.stop(srv)


class _Fake:
    """The management API of one version, as drain() reads it: queue figures in turn, then the last forever."""

    def __init__(self, pending: list[int], workers: int = 1) -> None:
        self.pending, self.workers, self.calls = pending, workers, []

    def __call__(self, method: str, path: str, timeout: float = 60) -> tuple[int, bytes]:
        self.calls.append(path)
        if path.endswith("?customized=true"):
            return 400, b"{}"  # the handler answers a describe job 400: any answer counts
        n = self.pending.pop(0) if len(self.pending) > 1 else self.pending[0]
        doc = [{"workers": [{"status": "READY"}] * self.workers, "jobQueueStatus": {"remainingCapacity": 100 - n, "pendingRequests": n}}]
        return 200, json.dumps(doc).encode()


def test_drain_waits_for_the_queue_then_probes_every_worker() -> None:
    from pipeline.torchserve.drain import GRACE, drain

    fake = _Fake([3, 1, 0, 2, 0], workers=2)  # a request routed just before the switch joins after an empty look
    began = time.monotonic()
    result = drain(fake, "tiny", "1.0", began, timeout=10)
    assert result.ok and (result.queued, result.late, result.probes) == (3, 1, 2), result
    assert time.monotonic() - began >= GRACE
    assert fake.calls[-2:] == ["/models/tiny/1.0?customized=true"] * 2


def test_drain_gives_up_in_bounded_time_and_says_why() -> None:
    from pipeline.torchserve.drain import drain

    result = drain(_Fake([5]), "tiny", "1.0", time.monotonic(), timeout=0.3)
    assert not result.ok and result.why == "5 requests still queued", result
