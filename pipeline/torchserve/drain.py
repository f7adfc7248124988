"""Draining a version before it is unregistered: nothing queued to it or running on it is lost.

TorchServe 0.12 unregisters a version by killing its workers at once: the batch a worker holds is answered
500 ("Worker scaled down." / "Worker died.") and jobs still in the version's queue are never answered (the
client waits until it gives up). So `marpipe deploy` drains a version first, once no new request is routed
to it (after `set-default`, or for a version that is not the default):

1. its queue: `GET /models/{name}/{version}` reports `jobQueueStatus.pendingRequests`, the jobs queued and not
   yet taken by a worker; it must read 0 on every look during `GRACE` seconds that begin no earlier than the
   switch (a request that read the old default just before the switch is queued a moment later);
2. what its workers hold: the describe API has no busy flag, so one probe per READY worker,
   `GET /models/{name}/{version}?customized=true`, which TorchServe queues behind every job before it and
   hands to a worker as a batch of its own: a worker takes it only once its batch in hand is answered. Any
   answer counts (the handler may answer it 400).

All within a bounded time; a version not drained in time is reported, never cut off.
"""

from __future__ import annotations

import json
import time
import urllib.parse
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from pipeline.errors import PipelineError

# Seconds the queue must read empty after the switch. A request resolves the default and joins that version's
# queue in one step of one frontend thread (microseconds; a descheduled thread on a busy host, a few ms).
GRACE = 0.2
POLL = 0.02

Call = Callable[..., tuple[int, bytes]]  # Deployer._call: (method, path, timeout=…) -> (status, body)


@dataclass
class Drained:
    ok: bool
    queued: int = 0  # jobs queued at the first look
    late: int = 0  # times the queue filled again after reading empty (requests routed just before the switch)
    probes: int = 0  # READY workers probed
    seconds: float = 0.0
    why: str = ""  # what was still there when the time ran out

    def note(self) -> str:
        return f"{self.queued} queued at the start, {self.late} late, {self.probes} workers probed, {self.seconds * 1000:.0f} ms"


def drain(call: Call, name: str, version: str, since: float, timeout: float) -> Drained:
    """Wait until `version` of `name` has no queued job and its workers hold none, for at most `timeout` seconds.

    `since`: time.monotonic() of the switch away from this version (no request routed to it after that)."""
    start = time.monotonic()
    deadline = start + timeout
    path = f"/models/{_q(name)}/{_q(version)}"
    result = Drained(ok=False)
    first, empty_since, ready = True, None, 0
    while True:
        code, body = call("GET", path, timeout=max(1.0, min(30.0, deadline - time.monotonic())))
        now = time.monotonic()
        if code == 404:  # gone already: nothing left to lose
            result.ok, result.seconds = True, now - start
            return result
        described = json.loads(body)[0] if code == 200 else {}
        pending = int((described.get("jobQueueStatus") or {}).get("pendingRequests") or 0)
        ready = sum(w.get("status") == "READY" for w in described.get("workers", []))
        if first:
            result.queued, first = pending, False
        if pending:
            result.late += empty_since is not None
            empty_since = None
        elif empty_since is None:
            empty_since = now
        if empty_since is not None and now - max(empty_since, since) >= GRACE:
            break
        if now >= deadline:
            result.why = f"{pending} requests still queued" if code == 200 else f"GET {path}: HTTP {code}"
            result.seconds = now - start
            return result
        time.sleep(POLL)
    result.probes = ready
    if ready:
        left = max(1.0, deadline - time.monotonic())
        with ThreadPoolExecutor(ready) as pool:
            answers = list(pool.map(lambda _: _probe(call, path, left), range(ready)))
        if not all(answers):
            result.why = f"{answers.count(False)} of {ready} workers still busy (a probe unanswered)"
            result.seconds = time.monotonic() - start
            return result
    result.ok, result.seconds = True, time.monotonic() - start
    return result


def _probe(call: Call, path: str, timeout: float) -> bool:
    """True once a worker answered a describe job queued behind everything before it (any status)."""
    try:
        call("GET", f"{path}?customized=true", timeout=timeout)
    except PipelineError:  # timed out or cut: the worker is not known to be idle
        return False
    return True


def _q(part: str) -> str:
    return urllib.parse.quote(part, safe="")
