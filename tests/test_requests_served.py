"""Requests as clients send them, against a real TorchServe: image bodies, multipart uploads, base64 lists, text,
hooks, v2 on both routes, and a concurrent load where hostile bodies are mixed into valid ones."""

from __future__ import annotations

import base64
import http.client
import json
import random
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from conftest import Project, marpipe, serving
from request_models import close_labels, eager_image, eager_text, picture, preprocess, request_specs, top_labels

from pipeline.torchserve import server as ts

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Project:
    project = Project(tmp_path_factory.mktemp("served"))
    specs = request_specs(project)
    result = project.build("--format", "onnx", specs["text"])
    assert result.returncode == 0, result.stdout + result.stderr
    result = project.build("--format", "torchscript", specs["image"])
    assert result.returncode == 0, result.stdout + result.stderr
    result = project.build(specs["hooks"], specs["two"])
    assert result.returncode == 0, result.stdout + result.stderr
    return project


@pytest.fixture(scope="module")
def server(project: Project):
    yield from serving(project.store, auth=True)


def _post(server: ts.Server, route: str, body: bytes, ctype: str | None, accept: str | None = None) -> tuple[int, bytes]:
    """POST `body`; with no `ctype` no Content-Type header at all, as Triton's HTTP client sends it (urllib would
    add a form content type)."""
    headers = {"Authorization": f"Bearer {server.key('inference')}"}
    if ctype:
        headers["Content-Type"] = ctype
    if accept:
        headers["Accept"] = accept
    conn = http.client.HTTPConnection(server.host, server.ports["inference"], timeout=60)
    try:
        conn.request("POST", route, body=body, headers=headers)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def _multipart(name: str, filename: str, data: bytes, ctype: str) -> tuple[bytes, str]:
    boundary = "marpipe-test-boundary"
    head = f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{filename}"\r\nContent-Type: {ctype}\r\n\r\n'
    return head.encode() + data + f"\r\n--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def _pids(server: ts.Server, name: str) -> list[int]:
    return sorted(w["pid"] for w in json.loads(server.request("management", f"/models/{name}")[2])[0]["workers"])


def test_image_forms_answer_labels_like_eager(server: ts.Server, project: Project) -> None:
    jpeg, png = picture("JPEG", (48, 36), 5), picture("PNG", (30, 44), 6)
    want_jpeg, want_png = (top_labels(eager_image(project, preprocess(b))) for b in (jpeg, png))
    code, answer = _post(server, "/predictions/image", jpeg, "image/jpeg")
    assert code == 200 and close_labels(json.loads(answer)["outputs"]["logits"], want_jpeg), answer
    code, answer = _post(server, "/predictions/image", png, "image/png")
    assert code == 200 and close_labels(json.loads(answer)["outputs"]["logits"], want_png), answer
    body, ctype = _multipart("image", "cat.png", png, "image/png")
    code, answer = _post(server, "/predictions/image", body, ctype)
    assert code == 200 and close_labels(json.loads(answer)["outputs"]["logits"], want_png), answer
    rows = [{"b64": base64.b64encode(b).decode()} for b in (jpeg, png)]
    code, answer = _post(server, "/predictions/image", json.dumps({"inputs": {"image": rows}}).encode(), "application/json")
    assert code == 200 and close_labels(json.loads(answer)["outputs"]["logits"], want_jpeg + want_png), answer
    code, answer = _post(server, "/predictions/image", png, "image/png", "application/json; raw=true")
    np.testing.assert_allclose(json.loads(answer)["outputs"]["logits"], eager_image(project, preprocess(png)), atol=1e-4)


def test_texts_of_different_lengths_batched_together_like_eager(server: ts.Server, project: Project) -> None:
    texts = ["the quick brown fox", "a", "the lazy dog jumps over the quick brown fox and on and on and on and on", "dog"]
    jobs = [(t.encode(), "text/plain") for t in texts] + [(json.dumps({"inputs": {"text": texts}}).encode(), "application/json")]
    with ThreadPoolExecutor(len(jobs)) as pool:
        answers = list(pool.map(lambda j: _post(server, "/predictions/text", *j), jobs))
    expected = eager_text(project, texts)
    for i, (code, answer) in enumerate(answers):
        assert code == 200, answer
        want = expected if i == len(texts) else expected[i : i + 1]
        np.testing.assert_allclose(json.loads(answer)["outputs"]["output"], want, atol=1e-4)


def test_v2_on_both_routes_batched_with_other_requests(server: ts.Server, project: Project) -> None:
    rng = np.random.default_rng(9)
    model = project.model("TwoInTwoOut")
    model.load_state_dict(torch.load(project.root / "two.pth", weights_only=True))
    jobs = []
    for i in range(8):
        x, seq = rng.standard_normal((1, 4)).astype(np.float32), rng.standard_normal((1, 3, 4)).astype(np.float32)
        tensors = [
            {"name": "x", "shape": [1, 4], "datatype": "FP32", "data": x.reshape(-1).tolist()},
            {"name": "seq", "shape": [1, 3, 4], "datatype": "FP32", "data": seq.reshape(-1).tolist()},
        ]
        route = "/v2/models/two/infer" if i % 2 else "/predictions/two"
        body = {"id": str(i), "inputs": tensors} if i % 4 < 2 else {"inputs": {"x": x.tolist(), "seq": seq.tolist()}}
        with torch.no_grad():
            joint, _ = model(torch.from_numpy(x), torch.from_numpy(seq))
        jobs.append((route, json.dumps(body).encode(), joint.numpy(), i % 4 < 2))
    with ThreadPoolExecutor(len(jobs)) as pool:
        answers = list(pool.map(lambda j: _post(server, j[0], j[1], None), jobs))
    for (_, _, joint, is_v2), (code, answer) in zip(jobs, answers):
        assert code == 200, answer
        doc = json.loads(answer)
        if is_v2:
            out = {o["name"]: np.asarray(o["data"]).reshape(o["shape"]) for o in doc["outputs"]}
            assert doc["model_name"] == "two" and doc["id"] in {str(i) for i in range(8)}
            np.testing.assert_allclose(out["joint"], joint, atol=1e-5)
        else:
            np.testing.assert_allclose(doc["outputs"]["joint"], joint, atol=1e-5)
    code, answer = _post(
        server, "/v2/models/two/infer", b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1]}]}', None
    )
    assert code == 400 and list(json.loads(answer)) == ["error"]


def test_hooks_and_bad_images_get_their_status_and_the_workers_keep_serving(server: ts.Server) -> None:
    pids = {n: _pids(server, n) for n in ("hooks", "image")}
    cases = [
        ("/predictions/hooks", b"1,2,3,4\n", "text/csv", 200),
        ("/predictions/hooks", b"1,2\n", "text/csv", 400),
        ("/predictions/hooks", b"1e9,1e9,1e9,1e9\n", "text/csv", 500),
        ("/predictions/hooks", b'{"inputs": {"x": [[1, 2, 3, 4]]}}', "application/json", 400),
        ("/predictions/image", b"\xff\xd8\xff garbage", "image/jpeg", 400),
        ("/predictions/image", _bomb(), "image/png", 413),
        ("/predictions/image", b'{"inputs": {"image": {"b64": "%%%"}}}', "application/json", 400),
        ("/predictions/image", picture("GIF"), "image/gif", 200),
    ]
    for route, body, ctype, status in cases:
        code, answer = _post(server, route, body, ctype)
        assert code == status, (route, ctype, code, answer[:200])
        assert ("error" in json.loads(answer)) == (status != 200)
    assert json.loads(_post(server, "/predictions/hooks", b"0,0,0,1\n", "text/csv")[1])["sums"]
    assert {n: _pids(server, n) for n in pids} == pids


def _bomb() -> bytes:
    from test_requests import _png_header

    return _png_header(50_000, 50_000)


def _hostile() -> dict[str, tuple[str, bytes, str | None, int]]:
    from test_requests import _huge_npz

    too_long = json.dumps({"inputs": {"input_ids": [[4] * 40], "attention_mask": [[1] * 40]}}).encode()
    return {
        "deep json": ("/predictions/two", b"[" * 100_000, "application/json", 400),
        "deep v2": ("/predictions/two", b'{"inputs": [' + b"[" * 50_000, None, 400),
        "huge npz shape": ("/predictions/two", _huge_npz(), "application/x-npz", 400),
        "garbage": ("/predictions/two", bytes(range(256)) * 40, "application/octet-stream", 400),
        "unknown type": ("/predictions/two", b"<x>1</x>", "application/xml", 400),
        "jpeg lie": ("/predictions/image", b"\xff\xd8\xff" + b"\x00" * 5000, "image/jpeg", 400),
        "bomb": ("/predictions/image", _bomb(), "image/png", 413),
        "long text": ("/predictions/text", too_long, None, 400),
        "curl -d json": ("/predictions/two", b'{"inputs": {"x": [[1, 2, 3, 4]]}}', "application/x-www-form-urlencoded", 400),
        "curl -d json with &": ("/predictions/text", b'{"inputs": {"text": "salt & pepper"}}', "application/x-www-form-urlencoded", 400),
    }


def test_hostile_bodies_in_a_concurrent_load_never_fail_valid_ones(server: ts.Server, project: Project) -> None:
    """225 requests at concurrency 16, a third hostile: every valid one 200 and right, every hostile one its 4xx."""
    x, seq = np.ones((1, 4), np.float32), np.zeros((1, 2, 4), np.float32)
    model = project.model("TwoInTwoOut")
    model.load_state_dict(torch.load(project.root / "two.pth", weights_only=True))
    with torch.no_grad():
        joint = model(torch.from_numpy(x), torch.from_numpy(seq))[0].numpy()
    png = picture("PNG", (30, 44), 6)
    want_png = top_labels(eager_image(project, preprocess(png)))
    valid = {
        "two json": ("/predictions/two", json.dumps({"inputs": {"x": x.tolist(), "seq": seq.tolist()}}).encode(), "application/json", 200),
        "image png": ("/predictions/image", png, "image/png", 200),
        "text": ("/predictions/text", b"the quick brown fox", "text/plain", 200),
    }
    hostile = _hostile()
    plan = [k for k in valid for _ in range(50)] + [k for k in hostile for _ in range(75 // len(hostile) + 1)][:75]
    random.Random(0).shuffle(plan)
    cases = {**valid, **hostile}
    pids = {n: _pids(server, n) for n in ("two", "image", "text")}
    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(lambda k: (k, *_post(server, *cases[k][:3])), plan))
    text_want = eager_text(project, ["the quick brown fox"])
    wrong = []
    for kind, code, answer in results:
        if code != cases[kind][3]:
            wrong.append((kind, code, answer[:120]))
        elif kind == "two json":
            np.testing.assert_allclose(json.loads(answer)["outputs"]["joint"], joint, atol=1e-5)
        elif kind == "image png":
            assert close_labels(json.loads(answer)["outputs"]["logits"], want_png)
        elif kind == "text":
            np.testing.assert_allclose(json.loads(answer)["outputs"]["output"], text_want, atol=1e-4)
    assert not wrong, wrong[:5]
    assert {n: _pids(server, n) for n in pids} == pids
    n_valid = sum(k in valid for k in plan)
    print(f"mixed load: {len(results)} requests, {n_valid} valid all 200, {len(plan) - n_valid} hostile all 4xx")


def test_smoke_replays_the_raw_requests(project: Project, server: ts.Server) -> None:
    result = marpipe("smoke", "--store", str(project.store), timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    for name, sample in (("image", "png"), ("image", "jpeg"), ("text", "text_json"), ("hooks", "hook_0")):
        assert any(ln.split()[:3] == [name, ln.split()[1], sample] and " ok " in ln for ln in lines), (name, sample, result.stdout)
