"""Requests as clients send them, through the handler without a server: images, text, labels, hooks, the Open
Inference Protocol v2, dims limits, and hostile bodies that must fail alone. Each expectation is computed
independently (Pillow, numpy, tokenizers, the eager model), not with the handler's own code."""

from __future__ import annotations

import base64
import io
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import FakeContext, Project
from request_models import (
    close_labels,
    eager_image,
    eager_text,
    picture,
    preprocess,
    request_specs,
    top_labels,
)

from handlers.marpipe_serving import service as serving


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    project = Project(tmp_path_factory.mktemp("requests"))
    specs = request_specs(project)
    result = project.build(*specs.values())
    assert result.returncode == 0, result.stdout + result.stderr
    services = {}
    for name in specs:
        folder = project.root / "extracted" / name
        with zipfile.ZipFile(project.store / f"{name}.mar") as z:
            z.extractall(folder)
        services[name] = (serving.Service(FakeContext(folder)), folder)
    return project, services


def _call(built, name: str, rows: list[dict], headers: list[dict]) -> tuple[list, FakeContext]:
    """The rows as HTTP requests with these headers (and Host, which every HTTP request to TorchServe has)."""
    service, folder = built[1][name]
    ctx = FakeContext(folder, [{"Host": "127.0.0.1", **h} for h in headers])
    return service.handle(rows, ctx), ctx


def test_image_bodies_answer_top_labels_like_eager(built) -> None:
    project = built[0]
    jpeg, png = picture("JPEG", (40, 30), 1), picture("PNG", (25, 50), 2)
    b64 = {"inputs": {"image": [{"b64": base64.b64encode(jpeg).decode()}, {"b64": base64.b64encode(png).decode()}]}}
    rows = [{"body": jpeg}, {"body": png}, {"image": png}, {"body": json.dumps(b64).encode()}, {"body": png}]
    headers = [
        {"Content-Type": "image/jpeg"},
        {"Content-Type": "image/png"},
        {"Content-Type": "multipart/form-data; boundary=x", "image": {"content-type": "image/png"}},
        {"Content-Type": "application/json"},
        {},  # no content type: the bytes say PNG
    ]
    out, ctx = _call(built, "image", rows, headers)
    assert ctx.status == {}, ctx.status
    expect_jpeg = top_labels(eager_image(project, preprocess(jpeg)))
    expect_png = top_labels(eager_image(project, preprocess(png)))
    answers = [json.loads(o)["outputs"]["logits"] for o in out]
    assert close_labels(answers[0], expect_jpeg) and close_labels(answers[1], expect_png) and close_labels(answers[2], expect_png)
    assert close_labels(answers[3], expect_jpeg + expect_png) and close_labels(answers[4], expect_png)
    assert len(answers[0][0]) == 3 and answers[0][0][0]["score"] >= answers[0][0][1]["score"]


def test_raw_tensors_on_request(built) -> None:
    project, png = built[0], picture("PNG", (25, 50), 2)
    out, _ = _call(
        built,
        "image",
        [{"body": png}, {"body": png}],
        [
            {"Content-Type": "image/png", "Accept": "application/json; raw=true"},
            {"Accept": "application/x-npz", "Content-Type": "image/png"},
        ],
    )
    expected = eager_image(project, preprocess(png))
    np.testing.assert_allclose(json.loads(out[0])["outputs"]["logits"], expected, atol=1e-5)
    with np.load(io.BytesIO(out[1])) as npz:
        np.testing.assert_allclose(npz["logits"], expected, atol=1e-5)


BAD_IMAGES = {
    "garbage claiming jpeg": ({"body": b"\xff\xd8\xffnot really a jpeg"}, {"Content-Type": "image/jpeg"}, 400, "input 'image'"),
    "text claiming png": ({"body": b"hello"}, {"Content-Type": "image/png"}, 400, "not a decodable image"),
    "bad base64": ({"body": b'{"inputs": {"image": {"b64": "@@@"}}}'}, {"Content-Type": "application/json"}, 400, "not valid base64"),
    "b64 without image": ({"body": b'{"inputs": {"image": {"b64": "aGVsbG8="}}}'}, {}, 400, "not a decodable image"),
    "truncated png": ({"body": None}, {"Content-Type": "image/png"}, 400, "input 'image'"),
    "bomb": ({"body": None}, {"Content-Type": "image/png"}, 413, "over the limit"),
}


@pytest.mark.parametrize("case", sorted(BAD_IMAGES))
def test_bad_images_fail_alone(built, case: str) -> None:
    row, header, status, message = BAD_IMAGES[case]
    if case == "truncated png":
        row = {"body": picture("PNG", (40, 30))[:120]}
    if case == "bomb":
        row = {"body": _png_header(60_000, 60_000)}
    good = picture("PNG")
    out, ctx = _call(
        built, "image", [{"body": good}, row, {"body": good}], [{"Content-Type": "image/png"}, header, {"Content-Type": "image/png"}]
    )
    assert ctx.status[1][0] == status, (ctx.status, out[1])
    assert message in json.loads(out[1])["error"]
    assert 0 not in ctx.status and 2 not in ctx.status and json.loads(out[0]) == json.loads(out[2])


def _png_header(width: int, height: int) -> bytes:
    """A PNG that declares width x height pixels in a few hundred bytes (a decompression bomb's first step)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 1000)) + chunk(b"IEND", b"")


def test_text_plain_and_lists_batched_together_like_eager(built) -> None:
    project = built[0]
    texts = ["the quick brown fox", "a", "the lazy dog jumps over the quick brown fox and on and on and on and on"]
    rows = [{"body": texts[0].encode()}, {"body": json.dumps({"inputs": {"text": texts}}).encode()}, {"body": texts[2].encode()}]
    out, ctx = _call(
        built,
        "text",
        rows,
        [{"Content-Type": "text/plain"}, {"Content-Type": "application/json"}, {"Content-Type": "text/plain; charset=utf-8"}],
    )
    assert ctx.status == {}
    expected = eager_text(project, texts)
    np.testing.assert_allclose(json.loads(out[0])["outputs"]["output"], expected[:1], atol=1e-5)
    np.testing.assert_allclose(json.loads(out[1])["outputs"]["output"], expected, atol=1e-5)
    np.testing.assert_allclose(json.loads(out[2])["outputs"]["output"], expected[2:], atol=1e-5)


def test_dims_max_refuses_a_long_sequence_alone(built) -> None:
    ids = [[2] + [4] * 18 + [3]]
    long = {"inputs": {"input_ids": ids, "attention_mask": [[1] * 20]}}
    out, ctx = _call(built, "text", [{"body": b"the fox"}, {"body": json.dumps(long).encode()}], [{"Content-Type": "text/plain"}, {}])
    assert ctx.status == {1: (400, ctx.status[1][1])} and "at most 16" in json.loads(out[1])["error"]
    assert "outputs" in json.loads(out[0])


def test_hooks_decode_encode_and_their_failures_fail_alone(built) -> None:
    state = torch.load(built[0].root / "tiny.pth", weights_only=True)
    w, b = state["fc.weight"].numpy(), state["fc.bias"].numpy()
    rows = [{"body": b"1,2,3,4\n"}, {"body": b"1,2"}, {"body": b"1e9,1e9,1e9,1e9\n"}, {"body": b"0,0,0,1\n"}, {"body": b"1,2,3,4"}]
    headers = [{"Content-Type": "text/csv"}, {"Content-Type": "text/csv"}, {"Content-Type": "text/csv"}, {"Content-Type": "text/csv"}, {}]
    out, ctx = _call(built, "hooks", rows, headers)
    assert ctx.status[1][0] == 400 and "dimension 1 must be 4" in json.loads(out[1])["error"]
    assert ctx.status[2][0] == 500 and "sums too large" in json.loads(out[2])["error"]
    assert ctx.status[4][0] == 400 and "decode hook: ValueError: expected text/csv" in json.loads(out[4])["error"]
    for i, x in ((0, [1, 2, 3, 4]), (3, [0, 0, 0, 1])):
        assert i not in ctx.status
        np.testing.assert_allclose(json.loads(out[i])["sums"], [(np.asarray(x, np.float32) @ w.T + b).sum()], rtol=1e-5)


def test_v2_requests_batched_with_others(built) -> None:
    rng = np.random.default_rng(3)
    x, seq = rng.standard_normal((2, 4)).astype(np.float32), rng.standard_normal((2, 5, 4)).astype(np.float32)
    v2 = {
        "id": "req-1",
        "inputs": [
            {"name": "x", "shape": [2, 4], "datatype": "FP32", "data": x.reshape(-1).tolist()},
            {"name": "seq", "shape": [2, 5, 4], "datatype": "FP32", "data": seq.tolist()},  # nested is accepted too
        ],
        "outputs": [{"name": "per_step"}],
    }
    ints = {
        "inputs": [
            {"name": "x", "shape": [1, 4], "datatype": "INT64", "data": [1, 2, 3, 4]},
            dict(v2["inputs"][1], shape=[1, 5, 4], data=seq[:1].reshape(-1).tolist()),
        ]
    }
    plain = {"inputs": {"x": x.tolist(), "seq": seq.tolist()}}
    bad = {"inputs": [{"name": "x", "shape": [2, 4], "datatype": "FP32", "data": [1.0, 2.0]}]}
    rows = [
        {"body": json.dumps(v2).encode()},
        {"body": json.dumps(plain).encode()},
        {"body": json.dumps(ints).encode()},
        {"body": json.dumps(bad).encode()},
    ]
    out, ctx = _call(built, "two", rows, [{}, {"Content-Type": "application/json"}, {}, {}])  # no content type, as tritonclient
    model = built[0].model("TwoInTwoOut")
    model.load_state_dict(torch.load(built[0].root / "two.pth", weights_only=True))
    with torch.no_grad():
        joint, per_step = (t.numpy() for t in model(torch.from_numpy(x), torch.from_numpy(seq)))
    answer = json.loads(out[0])
    assert answer["model_name"] == "two" and answer["model_version"] == "1.0" and answer["id"] == "req-1"
    assert [o["name"] for o in answer["outputs"]] == ["per_step"]
    o = answer["outputs"][0]
    assert o["shape"] == [2, 5, 3] and o["datatype"] == "FP32"
    np.testing.assert_allclose(np.asarray(o["data"]).reshape(o["shape"]), per_step, atol=1e-5)
    np.testing.assert_allclose(json.loads(out[1])["outputs"]["joint"], joint, atol=1e-5)
    assert [o["name"] for o in json.loads(out[2])["outputs"]] == ["joint", "per_step"]
    assert (
        ctx.status == {3: (400, ctx.status[3][1])}
        and "2 values" in json.loads(out[3])["error"]
        or "8 values" in json.loads(out[3])["error"]
    )


V2_BAD = {
    "float data for INT64": ({"name": "x", "shape": [1, 4], "datatype": "INT64", "data": [1.5, 2, 3, 4]}, "non-integer"),
    "unknown datatype": ({"name": "x", "shape": [1, 4], "datatype": "FP128", "data": [1, 2, 3, 4]}, "datatype 'FP128'"),
    "huge shape": ({"name": "x", "shape": [1, 1 << 40], "datatype": "FP32", "data": [1]}, "more than any request"),
    "uint8 overflow": ({"name": "x", "shape": [1, 4], "datatype": "UINT8", "data": [1, 2, 3, 300]}, "out of range for UINT8"),
    "strings": ({"name": "x", "shape": [1, 4], "datatype": "FP32", "data": ["a", "b", "c", "d"]}, "numbers"),
}


@pytest.mark.parametrize("case", sorted(V2_BAD))
def test_malformed_v2_is_a_400_in_v2_error_form(built, case: str) -> None:
    tensor, message = V2_BAD[case]
    seq = {"name": "seq", "shape": [1, 2, 4], "datatype": "FP32", "data": [0.0] * 8}
    out, ctx = _call(built, "two", [{"body": json.dumps({"inputs": [tensor, seq]}).encode()}], [{}])
    assert ctx.status[0][0] in (400, 413) and message in json.loads(out[0])["error"], out[0]
    assert list(json.loads(out[0])) == ["error"]


def test_hostile_bodies_mixed_with_good_ones(built) -> None:
    """Deep nesting, a huge declared npz shape, unknown content types, garbage: each its 4xx; the good ones answered."""
    good = json.dumps({"inputs": {"x": [[1.0, 2.0, 3.0, 4.0]], "seq": [[[0.0] * 4] * 2]}}).encode()
    hostile = [b"[" * 100_000, b'{"inputs": ' * 50_000, _huge_npz(), b"\x00\xff" * 500, "ünï".encode("utf-16"), b'{"inputs": {"x": NaN}}']
    rows, headers = [], []
    for body in hostile:
        rows += [{"body": good}, {"body": body}]
        headers += [{"Content-Type": "application/json"}, {"Content-Type": "application/x-unknown"}]
    out, ctx = _call(built, "two", rows, headers)
    for i in range(0, len(rows), 2):
        assert i not in ctx.status and "outputs" in json.loads(out[i])
        assert 400 <= ctx.status[i + 1][0] < 500 and "error" in json.loads(out[i + 1]), (i, out[i + 1][:200])


def _huge_npz() -> bytes:
    """A stored npz whose one entry's header declares 2**40 x 4 float32 values over 16 bytes of data."""
    header = "{'descr': '<f4', 'fortran_order': False, 'shape': (1099511627776, 4), }"
    header += " " * (63 - (10 + len(header)) % 64) + "\n"
    npy = b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header.encode() + b"\x00" * 16
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("x.npy", npy)
    return buf.getvalue()


def test_parity_requests_are_stored_with_eager_answers(built) -> None:
    project, services = built
    _, folder = services["image"]
    index = json.loads((folder / "parity_requests.json").read_text())
    assert [s["content_type"] for s in index] == ["image/png", "image/jpeg"]
    for s in index:
        body = (folder / s["body"]).read_bytes()
        with np.load(folder / s["outputs"]) as npz:
            np.testing.assert_allclose(npz["logits"], eager_image(project, preprocess(body)), atol=1e-5)
        assert close_labels(s["answer"]["outputs"]["logits"], top_labels(eager_image(project, preprocess(body))))
    meta = json.loads((folder / "marpipe.json").read_text())
    assert meta["outputs"][0]["labels"] == {"names": ["cat", "dog", "bird", "fish", "frog"], "topk": 3, "activation": "softmax"}
    assert meta["inputs"][0]["image"]["crop"] == 16 and meta["outputs"][0]["shape"] == ["batch", 5]
    text_meta = json.loads((services["text"][1] / "marpipe.json").read_text())
    assert text_meta["text"] == {"tokenizer": "tokenizer.json", "max_length": 12} and text_meta["dim_max"] == {"seq": 16}
    assert [(r["name"].lower(), r["for"]) for r in meta["requirements"]] == [("pillow", "image inputs")]
    assert [(r["name"], r["for"]) for r in text_meta["requirements"]] == [("tokenizers", "text inputs")]
    assert (services["text"][1] / "requirements.txt").read_text().startswith("tokenizers==")
    texts = json.loads((services["text"][1] / "parity_requests.json").read_text())
    assert [s["content_type"] for s in texts] == ["text/plain", "application/json"]


def test_a_wrong_label_count_is_a_spec_error(tmp_path: Path) -> None:
    project = Project(tmp_path)
    specs = request_specs(project)
    (project.root / "labels.json").write_text(json.dumps(["cat", "dog"]))
    result = project.build(specs["image"])
    assert result.returncode == 2 and "outputs[0].labels: 2 labels for an output with 5 values per row" in result.stderr


def _json_values():
    from hypothesis import strategies as st

    leaves = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8)
    return st.recursive(leaves, lambda c: st.lists(c, max_size=5) | st.dictionaries(st.text(max_size=6), c, max_size=4), max_leaves=40)


def _bodies():
    """Bytes of every kind a client (or an attacker) could send: noise, JSON of any shape, our request forms with
    random values inside, v2 with random datatypes and shapes, npz and images with flipped bytes."""
    from hypothesis import strategies as st

    values = _json_values()
    v2_tensor = st.fixed_dictionaries(
        {
            "name": st.sampled_from(["x", "seq", "image", "q"]),
            "datatype": st.sampled_from(["FP32", "INT64", "BOOL", "BYTES", "UINT8", "X"]),
        },
        optional={"shape": st.lists(st.integers(-2, 1 << 33), max_size=4), "data": values},
    )
    forms = st.one_of(
        st.binary(max_size=400),
        values.map(lambda v: json.dumps(v).encode()),
        st.dictionaries(st.sampled_from(["x", "seq", "image", "text", "input_ids", "attention_mask"]), values, max_size=3).map(
            lambda d: json.dumps({"inputs": d}).encode()
        ),
        st.lists(v2_tensor, min_size=1, max_size=3).map(lambda t: json.dumps({"inputs": t}).encode()),
        st.tuples(st.sampled_from([_npz_body(), picture("PNG"), picture("JPEG")]), st.integers(0, 10_000), st.integers(0, 255)).map(
            lambda t: t[0][: t[1] % len(t[0])] + bytes([t[2]]) + t[0][t[1] % len(t[0]) + 1 :]
        ),
    )
    return forms


def _npz_body() -> bytes:
    buf = io.BytesIO()
    np.savez(buf, x=np.ones((1, 4), np.float32), seq=np.zeros((1, 2, 4), np.float32))
    return buf.getvalue()


def test_fuzz_every_body_gets_an_answer_of_its_own(built) -> None:
    """Property: whatever the body and content type, decoding either succeeds with arrays the model can take or
    raises BadRequest with a 4xx; nothing else escapes (which would fail the whole batch)."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from handlers.marpipe_serving import codecs
    from handlers.marpipe_serving.errors import BadRequest

    contracts = {name: built[1][name][0].contract for name in ("image", "text", "two", "hooks")}
    ctypes = ["", "application/json", "application/x-npz", "image/png", "image/jpeg", "text/plain", "application/octet-stream", "text/csv"]

    @settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
    @given(body=_bodies(), ctype=st.sampled_from(ctypes), name=st.sampled_from(sorted(contracts)))
    def decode_one(body: bytes, ctype: str, name: str) -> None:
        contract = contracts[name]
        try:
            request = codecs.decode({"body": body}, FakeContext(Path("."), [{"Content-Type": ctype}]), 0, contract)
        except BadRequest as exc:
            assert 400 <= exc.status < 500 and str(exc)
            outcomes[exc.status] = outcomes.get(exc.status, 0) + 1
            return
        outcomes[200] = outcomes.get(200, 0) + 1
        assert set(request.arrays) == set(contract.names)
        assert all(isinstance(a, np.ndarray) and len(a) for a in request.arrays.values())

    outcomes: dict[int, int] = {}
    decode_one()
    print("fuzzed request outcomes by status:", dict(sorted(outcomes.items())))
    assert len(outcomes) >= 2  # the strategies reach both accepted and refused bodies


def test_client_text_never_reaches_the_status_line(built) -> None:
    """An npz entry named with CR LF (echoed in the error) gets the standard reason phrase; the detail stays in
    the JSON body, and the request batched after it is answered."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("x\r\nX-Injected: 1\r\n.npy", b"\x93NUMPY garbage")
    good = json.dumps({"inputs": {"x": [[1.0, 2.0, 3.0, 4.0]], "seq": [[[0.0] * 4] * 2]}}).encode()
    out, ctx = _call(built, "two", [{"body": buf.getvalue()}, {"body": good}], [{"Content-Type": "application/x-npz"}, {}])
    assert ctx.status[0] == (400, "Bad Request") and "error" in json.loads(out[0])
    assert 1 not in ctx.status and "outputs" in json.loads(out[1])


def test_text_inputs_declared_out_of_forward_order(tmp_path: Path) -> None:
    """Inputs declared in another order than forward's are passed by keyword everywhere, the eager answers to the
    sample raw requests included (a positional call would swap ids and mask, and parity would fail)."""
    import yaml

    project = Project(tmp_path)
    spec = request_specs(project)["text"]
    doc = yaml.safe_load(spec.read_text())
    doc["inputs"] = doc["inputs"][::-1]  # attention_mask first
    spec.write_text(yaml.safe_dump(doc))
    result = project.build(spec)
    assert result.returncode == 0, result.stdout + result.stderr
    with zipfile.ZipFile(project.store / "text.mar") as z:
        meta = json.loads(z.read("marpipe.json"))
    assert meta["call"] == "keyword" and [t["name"] for t in meta["inputs"]] == ["attention_mask", "input_ids"]


@pytest.mark.parametrize(
    ("body", "numeric"),
    [
        (b'{"inputs": {"x": [[1, 2.5, null, true]]}}', True),
        (b'{"x": [[1e3, -0.5]]}', True),
        (b'{"inputs": {"x": [["1", 2]]}}', False),  # a string value: the general path
        (b'{"inputs": {"x": [[1, 2]]}, "id": "a"}', False),
        (b'{"in\\"puts": {"x": [[1]]}}', False),  # an escaped quote in a key
        (b'{"inputs": {"x": [[1]], "y": {"z": 1}}}', False),  # a third level's key: a nested object
    ],
)
def test_numeric_only_counts_the_keys_quotes(body: bytes, numeric: bool) -> None:
    from handlers.marpipe_serving.codecs import numeric_only, parse_json_or_npz

    for raw in (body, bytearray(body)):  # TorchServe hands the handler a bytearray
        assert numeric_only(raw, parse_json_or_npz(raw, "application/json", "body")) is numeric
