"""Nothing lost in service, against a real TorchServe: an answer over the server's max_response_size fails alone
(not its batch, not the worker), form-encoded bodies get a 400 that names the header to send, and `marpipe serve
--enable-model-api` on an empty store waits for deploys."""

from __future__ import annotations

import http.client
import io
import json
import re
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import Project, marpipe, serving, start_serve

from pipeline.torchserve import server as ts

pytestmark = pytest.mark.slow
WIDE = 1000  # outputs per row: one row answers about 20 KB of JSON
FORM = "application/x-www-form-urlencoded"


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Project:
    project = Project(tmp_path_factory.mktemp("lost"))
    project.save(project.model("Linear", n_out=WIDE).state_dict(), "tiny.pth")
    serve = {"batch_size": 8, "max_batch_delay_ms": 300, "max_rows": 100, "max_response_mb": 0.1}
    result = project.build(project.spec(name="wide", kwargs={"n_out": WIDE}, serve=serve))
    assert result.returncode == 0, result.stdout + result.stderr
    return project


@pytest.fixture(scope="module")
def server(project: Project):
    yield from serving(project.store, auth=False)


def _post(server: ts.Server, body: bytes, ctype: str | None, accept: str | None = None) -> tuple[int, dict[str, str], bytes, float]:
    """POST to the wide model with exactly these headers (urllib would add a form Content-Type): (status, headers,
    body, seconds)."""
    headers = {k: v for k, v in (("Content-Type", ctype), ("Accept", accept)) if v}
    conn = http.client.HTTPConnection(server.host, server.ports["inference"], timeout=60)
    start = time.monotonic()
    try:
        conn.request("POST", "/predictions/wide", body=body, headers=headers)
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read(), time.monotonic() - start
    finally:
        conn.close()


def _rows(n: int, seed: int) -> list[list[float]]:
    return np.random.default_rng(seed).standard_normal((n, 4)).round(3).tolist()


def _eager(project: Project, rows: list[list[float]]) -> np.ndarray:
    model = project.model("Linear", n_out=WIDE)
    model.load_state_dict(torch.load(project.root / "tiny.pth", weights_only=True))
    with torch.no_grad():
        return model(torch.tensor(rows, dtype=torch.float32)).numpy()


def _pids(server: ts.Server) -> list[int]:
    return sorted(w["pid"] for w in json.loads(server.request("management", "/models/wide")[2])[0]["workers"])


def _batches(server: ts.Server) -> list[set[str]]:
    """The request ids of each batch the worker ran (TorchServe's PredictionTime metric names them)."""
    text = (server.workdir / "logs" / "model_metrics.log").read_text()
    return [set(ids.split(",")) for ids in re.findall(r"PredictionTime\.ms:[\d.]+\|#ModelName:wide,.*?requestID:([\w,-]+),timestamp", text)]


def test_an_answer_over_max_response_size_fails_alone_and_the_worker_lives(server: ts.Server, project: Project) -> None:
    """One 8-row request (about 160 KB of JSON, over serve.max_response_mb 0.1) sent with six 1-row ones: in one
    batch, it alone gets a 413 naming the limit; the six (about 20 KB each, 120 KB together: the limit holds for
    each answer, not for their sum) are answered like eager; the worker is the same one; the next answer is quick."""
    config = (server.workdir / "config.properties").read_text().splitlines()
    assert "max_response_size=100000" in config and "max_request_size=6553500" in config
    pids = _pids(server)
    small = [_rows(1, seed) for seed in range(6)]
    big = _rows(8, 99)
    jobs = [json.dumps({"inputs": {"x": rows}}).encode() for rows in [big, *small]]
    together = False
    for _ in range(3):  # on a busy machine the seven may straddle two batches: then again
        with ThreadPoolExecutor(len(jobs)) as pool:
            answers = list(pool.map(lambda body: _post(server, body, "application/json"), jobs))
        code, headers, body, _ = answers[0]
        assert code == 413 and headers["content-type"] == "application/json", (code, body[:300])
        error = json.loads(body)["error"]
        assert "bytes, over the 100,000 this server sends (serve.max_response_mb: 0.1)" in error, error
        assert "fewer rows (this request has 8; about" in error and "Accept: application/x-npz" in error, error
        for rows, (code, _, body, _) in zip(small, answers[1:]):
            assert code == 200, body[:300]
            np.testing.assert_allclose(json.loads(body)["outputs"]["output"], _eager(project, rows), rtol=1e-6, atol=1e-6)
        ids = {h["x-request-id"] for _, h, _, _ in answers}
        time.sleep(0.5)  # the metrics log is written by the frontend, a moment after the answers
        if any(ids <= batch for batch in _batches(server)):
            together = True
            break
    assert together, "the seven requests never ran in one batch"
    sizes = [len(body) for _, _, body, _ in answers[1:]]
    code, _, body, seconds = _post(server, json.dumps({"inputs": {"x": small[0]}}).encode(), "application/json")
    assert code == 200 and seconds < 1.5, (code, seconds)  # a restarted worker takes 2.5 s more (and the batch delay)
    assert _pids(server) == pids
    assert "Backend worker process died" not in (server.workdir / "logs" / "model_log.log").read_text()
    print(f"one batch: 413 for the 8-row answer, 200 for six of {min(sizes):,}-{max(sizes):,} bytes; next answer {seconds:.2f} s")
    code, _, body, _ = _post(server, jobs[0], "application/json", accept="application/x-npz")  # what the 413 advised
    with np.load(io.BytesIO(body), allow_pickle=False) as npz:
        np.testing.assert_allclose(npz["output"], _eager(project, big), rtol=1e-6, atol=1e-6)


def test_form_bodies_get_a_400_naming_the_header_and_json_without_a_type_works(server: ts.Server, project: Project) -> None:
    """curl -d sends a form: TorchServe's frontend parses it into fields, so the JSON in it never reaches the
    handler (nothing at all without '=' or '&'). Sent concurrently with valid requests, each gets its own answer."""
    rows = _rows(1, 7)
    json_body = json.dumps({"inputs": {"x": rows}}).encode()
    cases = {
        "curl -d json": (json_body, FORM, 400),
        "form json with & and =": (b'{"inputs": {"x": [[1, 2, 3, 4]]}, "note": "a=b & c"}', FORM, 400),
        "empty form": (b"", FORM, 400),
        "a field named after the input": (b"x=" + json.dumps(rows).encode(), FORM, 200),
        "json without content-type": (json_body, None, 200),
        "json": (json_body, "application/json", 200),
    }
    plan = [k for k in cases for _ in range(4)]
    pids = _pids(server)
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda k: (k, *_post(server, *cases[k][:2])), plan))
    want = _eager(project, rows)
    for kind, code, _, body, _ in results:
        assert code == cases[kind][2], (kind, code, body[:300])
        if code == 400:
            error = json.loads(body)["error"]
            assert f"Content-Type: {FORM}" in error and "-H 'Content-Type: application/json'" in error, error
        else:
            np.testing.assert_allclose(json.loads(body)["outputs"]["output"], want, rtol=1e-6, atol=1e-6)
    assert _pids(server) == pids


def test_serve_with_the_model_api_waits_on_an_empty_store_for_deploys(project: Project, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    refused = marpipe("serve", "--store", str(empty), "--workdir", str(tmp_path / "refused"), timeout=60)
    assert refused.returncode == 6 and "no archives in" in refused.stderr and "run marpipe build first" in refused.stderr
    store = tmp_path / "not-yet"  # not even the folder
    workdir = tmp_path / "serve"
    port = ts.free_ports(1)[0]
    proc, text = start_serve(store, port, workdir, "--enable-model-api", f"--vmargs={ts.QUICK_JIT}", timeout=240)
    try:
        assert "serving; Ctrl-C stops" in text and "no models yet" in text, text
        management, inference = f"http://127.0.0.1:{port + 1}", f"http://127.0.0.1:{port}"
        result = marpipe(
            "deploy", str(project.store / "wide.mar"), "--management", management, "--inference", inference,
            "--model-store", str(store), "--token-file", str(workdir / "key_file.json"), timeout=600,
        )  # fmt: skip
        assert result.returncode == 0, result.stdout + result.stderr
        key = json.loads((workdir / "key_file.json").read_text())["inference"]["key"]
        rows = _rows(2, 3)
        code, _, body = ts.http(
            f"{inference}/predictions/wide", json.dumps({"inputs": {"x": rows}}).encode(), {"Content-Type": "application/json"}, token=key
        )
        assert code == 200, body[:300]
        np.testing.assert_allclose(json.loads(body)["outputs"]["output"], _eager(project, rows), rtol=1e-6, atol=1e-6)
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0
