"""The handler without a server: a small fake TorchServe context, a real archive folder, exact expectations."""

from __future__ import annotations

import io
import json
import os
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import FakeContext

from handlers.marpipe_serving import codecs, models, npz
from handlers.marpipe_serving import service as serving
from handlers.marpipe_serving.contract import Contract
from handlers.marpipe_serving.errors import BadRequest


def _extract(archive: Path, dest: Path) -> Path:
    with zipfile.ZipFile(archive) as z:
        z.extractall(dest)
    return dest


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A Linear(4, 2) with fixed weights, built and extracted as TorchServe would, with its handler Service."""
    from conftest import Project

    project = Project(tmp_path_factory.mktemp("handler"))
    model = project.model("Linear")
    with torch.no_grad():
        model.fc.weight.copy_(torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 2.0, 0.0, 1.0]]))
        model.fc.bias.copy_(torch.tensor([0.5, -1.0]))
    project.save(model.state_dict(), "tiny.pth")
    spec = project.spec(outputs=[{"name": "y"}], serve={"max_rows": 5})
    assert project.build(spec).returncode == 0
    folder = _extract(project.store / "tiny.mar", project.root / "extracted")
    return serving.Service(FakeContext(folder)), folder


def _expected(rows: list[list[float]]) -> list[list[float]]:
    return [[r[0] + 0.5, 2 * r[1] + r[3] - 1.0] for r in rows]


def _npz(**arrays) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def test_json_npz_and_bare_list(served) -> None:
    service, folder = served
    rows = [[1, 2, 3, 4], [0.5, 0, 0, 0]]
    ctx = FakeContext(
        folder, [{"Content-Type": "application/json"}, {"Content-Type": "application/x-npz", "Accept": "application/x-npz"}, {}]
    )
    data = [
        {"body": {"inputs": {"x": rows}}},  # TorchServe hands JSON over already decoded
        {"body": _npz(x=np.array(rows, dtype=np.float32))},
        {"body": json.dumps(rows).encode()},  # a bare nested list, as raw bytes
    ]
    out = service.handle(data, ctx)
    assert json.loads(out[0]) == {"outputs": {"y": _expected(rows)}}
    with np.load(io.BytesIO(out[1]), allow_pickle=False) as npz:
        np.testing.assert_array_equal(npz["y"], np.array(_expected(rows), dtype=np.float32))
    assert ctx.content_type[1] == "application/x-npz"
    assert json.loads(out[2])["outputs"]["y"] == _expected(rows)
    assert ctx.status == {}


BAD = {
    "not json": (b"{nope", 400, "not valid JSON"),
    "missing input": ({"inputs": {}}, 400, "missing input 'x'"),
    "unknown input": ({"inputs": {"x": [[1, 2, 3, 4]], "z": [1]}}, 400, "unknown inputs ['z']"),
    "wrong shape": ({"inputs": {"x": [[1, 2, 3]]}}, 400, "dimension 1 must be 4"),
    "wrong rank": ({"inputs": {"x": [1, 2, 3, 4]}}, 400, "expected 2 dimensions"),
    "ragged": ({"inputs": {"x": [[1, 2, 3, 4], [1]]}}, 400, "not a rectangular array"),
    "strings": ({"inputs": {"x": [["a", "b", "c", "d"]]}}, 400, "values must be numbers"),
    "too many rows": ({"inputs": {"x": [[0, 0, 0, 0]] * 6}}, 413, "at most 5 are allowed"),
    "not an object": (42, 400, 'expected {"inputs"'),
    "bad npz": (b"PK\x03\x04garbage", 400, "not a readable .npz"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_request_fails_alone(served, case: str) -> None:
    service, folder = served
    body, status, message = BAD[case]
    good = {"body": {"inputs": {"x": [[1, 1, 1, 1]]}}}
    ctx = FakeContext(folder)
    out = service.handle([good, {"body": body}, good], ctx)
    assert ctx.status[1][0] == status
    assert message in json.loads(out[1])["error"]
    assert 0 not in ctx.status and 2 not in ctx.status
    assert json.loads(out[0])["outputs"]["y"] == _expected([[1, 1, 1, 1]])
    assert json.loads(out[2]) == json.loads(out[0])


def test_casts_only_when_safe() -> None:
    spec_int = {"name": "ids", "shape": ["batch", 2], "dtype": "int64", "range": [0, 10]}
    spec_float = {"name": "x", "shape": ["batch", 2], "dtype": "float32", "range": None}
    floats, ints = _contract([spec_float]), _contract([spec_int])
    assert floats.from_json({"inputs": {"x": [[1, 2]]}})["x"].dtype == np.float32  # ints to floats: fine
    with pytest.raises(BadRequest, match="floating-point values"):
        ints.from_json({"inputs": {"ids": [[1.5, 2]]}})
    with pytest.raises(BadRequest, match=r"must lie in \[0, 10\)"):
        ints.from_json({"inputs": {"ids": [[1, 10]]}})
    assert ints.from_json({"inputs": {"ids": np.array([[1, 9]], dtype=np.int32)}})["ids"].dtype == np.int64


def _contract(inputs: list[dict], outputs: list[dict] | None = None, **meta) -> Contract:
    return Contract({"inputs": inputs, "outputs": outputs or [{"name": "y"}], **meta}, "/nonexistent")


def _bare_service(runner, inputs: list[dict], outputs: list[dict]) -> serving.Service:
    """A Service around a plain function, without an archive."""
    service = serving.Service.__new__(serving.Service)
    service.meta = {"inputs": inputs, "outputs": outputs}
    service.contract = Contract(service.meta, "/nonexistent")
    service.runner = runner
    return service


def test_batch_groups_by_dynamic_dims(tmp_path: Path) -> None:
    """Requests with different sequence lengths run in separate forward passes; results go back per request."""
    calls: list[tuple] = []

    def runner(arrays):
        calls.append(arrays["ids"].shape)
        return {"total": arrays["ids"].sum(axis=1, keepdims=True)}

    inputs = [{"name": "ids", "shape": ["batch", "seq"], "dtype": "int64", "range": [0, 100]}]
    service = _bare_service(runner, inputs, [{"name": "total"}])
    data = [
        {"body": {"inputs": {"ids": [[1, 2, 3]]}}},
        {"body": {"inputs": {"ids": [[1, 1], [2, 2]]}}},
        {"body": {"inputs": {"ids": [[5, 5, 5], [1, 1, 1]]}}},
    ]
    out = service.handle(data, FakeContext(tmp_path))
    assert sorted(calls) == [(2, 2), (3, 3)]
    assert [json.loads(o)["outputs"]["total"] for o in out] == [[[6]], [[2], [4]], [[15], [3]]]


def test_a_request_that_breaks_the_model_does_not_fail_its_batch(tmp_path: Path) -> None:
    def runner(arrays):
        if (arrays["x"] < 0).any():
            raise RuntimeError("negative input")
        return {"y": arrays["x"] * 2}

    service = _bare_service(runner, [{"name": "x", "shape": ["batch", 1], "dtype": "float32"}], [{"name": "y"}])
    ctx = FakeContext(tmp_path)
    out = service.handle([{"body": [[1.0]]}, {"body": [[-1.0]]}, {"body": [[3.0]]}], ctx)
    assert ctx.status[1][0] == 500 and "negative input" in json.loads(out[1])["error"]
    assert json.loads(out[0])["outputs"]["y"] == [[2.0]] and json.loads(out[2])["outputs"]["y"] == [[6.0]]


def test_handler_is_self_contained() -> None:
    """What travels in the archive imports nothing of marpipe's; at module level only the standard library and
    numpy (torch, onnxruntime and the optional libraries are imported where they are needed: transformers only
    for an eager archive of a Hugging Face model)."""
    import ast

    folder = Path(serving.__file__).parent
    # imported where an archive needs them; ts: TorchServe's own package, there wherever the handler runs
    lazy = {"torch", "onnxruntime", "transformers", "PIL", "tokenizers", "orjson", "ts"}
    for path in [folder.parent / "marpipe_handler.py", *sorted(folder.glob("*.py"))]:
        tree = ast.parse(path.read_text())
        top, anywhere = set(), set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = {node.module.split(".")[0]}
            else:
                continue
            anywhere |= names
            if node in tree.body:
                top |= names
        allowed = set(sys.stdlib_module_names) | {"__future__", "numpy", "marpipe_serving"}
        assert top <= allowed, (path.name, top - allowed)
        assert anywhere <= allowed | lazy, (path.name, anywhere - allowed - lazy)


def test_safetensors_reader_matches_the_library(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    tensors = {
        "f32": torch.randn(3, 4),
        "bf16": torch.randn(5).bfloat16(),
        "f16": torch.randn(2, 2).half(),
        "i64": torch.arange(6).reshape(2, 3),
        "b": torch.tensor([True, False]),
        "empty": torch.zeros(0, 3),
        "u8": torch.arange(4, dtype=torch.uint8),
    }
    save_file(tensors, str(tmp_path / "w.safetensors"), metadata={"format": "pt"})
    ours, theirs = models.read_safetensors(str(tmp_path / "w.safetensors")), load_file(str(tmp_path / "w.safetensors"))
    assert sorted(ours) == sorted(theirs)
    for name, value in theirs.items():
        assert ours[name].dtype == value.dtype and torch.equal(ours[name], value), name


def test_a_safetensors_checkpoint_is_served_as_it_is(project, tmp_path: Path) -> None:
    from safetensors.torch import save_file

    model = project.model("Linear")
    save_file(model.state_dict(), str(project.root / "w.safetensors"))
    assert project.build(project.spec(checkpoint={"path": "w.safetensors"})).returncode == 0
    folder = _extract(project.store / "tiny.mar", tmp_path / "x")
    assert (folder / "weights.safetensors").read_bytes() == (project.root / "w.safetensors").read_bytes()
    out = serving.Service(FakeContext(folder)).handle([{"body": {"inputs": {"x": [[1.0, 2.0, 3.0, 4.0]]}}}], FakeContext(folder))
    with torch.no_grad():
        expected = model(torch.tensor([[1.0, 2.0, 3.0, 4.0]])).tolist()
    assert json.loads(out[0])["outputs"]["output"] == expected


NPZ_CASES = {
    "float32 batch": {"image": np.random.default_rng(0).standard_normal((2, 3, 8, 8)).astype(np.float32)},
    "several inputs": {"ids": np.arange(10, dtype=np.int64).reshape(2, 5), "mask": np.array([[True, False]] * 2), "s": np.array(3.0)},
    "big-endian and fortran order": {"u": np.arange(6, dtype=">i4").reshape(2, 3), "f": np.asfortranarray(np.ones((3, 4)))},
    "empty and half": {"e": np.zeros((0, 4), np.float16)},
}


@pytest.mark.parametrize("arrays", NPZ_CASES.values(), ids=NPZ_CASES.keys())
def test_npz_read_and_written_without_zipfile_as_numpy_does(arrays: dict) -> None:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    fast = npz._read_stored_npz(buf.getvalue())
    assert fast is not None
    for k, v in arrays.items():
        assert fast[k].dtype == v.dtype and fast[k].shape == v.shape and np.array_equal(fast[k], v)
    with np.load(io.BytesIO(npz.write_npz(arrays)), allow_pickle=False) as z:
        for k, v in arrays.items():
            assert z[k].dtype == v.dtype and z[k].shape == v.shape and np.array_equal(z[k], v)


def _parse(body: bytes, ctype: str):
    return codecs.parse_json_or_npz(body, ctype, "body")


def test_npz_bodies_numpy_must_read_and_broken_ones() -> None:
    buf = io.BytesIO()
    np.savez_compressed(buf, x=np.ones((2, 4), np.float32))
    assert npz._read_stored_npz(buf.getvalue()) is None  # compressed: numpy's reader
    assert np.array_equal(_parse(buf.getvalue(), codecs.NPZ)["x"], np.ones((2, 4)))

    buf = io.BytesIO()
    np.savez(buf, x=np.ones((2, 4), np.float32))
    body = bytearray(buf.getvalue())
    body[-200] ^= 0xFF  # inside the data: the CRC no longer matches
    with pytest.raises(BadRequest, match="CRC"):
        _parse(bytes(body), codecs.NPZ)
    with pytest.raises(BadRequest, match="not a readable .npz"):
        _parse(buf.getvalue()[:-30], codecs.NPZ)  # truncated
    buf = io.BytesIO()
    np.savez(buf, x=np.array([{"a": 1}], dtype=object))
    with pytest.raises(BadRequest, match="not a readable .npz"):
        _parse(buf.getvalue(), codecs.NPZ)  # pickled objects are never loaded


def test_a_small_model_is_served_with_one_thread_and_a_large_one_keeps_them(served, monkeypatch) -> None:
    """A batch that takes a few ms gains nothing from intra-op threads, whose spinning takes CPU from TorchServe."""
    _, folder = served
    meta = json.loads((folder / "marpipe.json").read_text())
    runner = models.load_runner(str(folder), meta, "cpu")
    ms = models.batch_ms(runner, models.timing_batch(str(folder), meta, 8))
    assert ms is not None and 0 < ms < models.SMALL_BATCH_MS
    monkeypatch.setattr(models, "TIMED_BYTES", 0)  # as if the artifact were large: not timed, so threads stay
    assert models.timing_batch(str(folder), meta, 8) is None
    monkeypatch.undo()
    if (os.cpu_count() or 1) < 2:
        pytest.skip("one CPU: one thread either way")
    before = torch.get_num_threads()
    try:
        monkeypatch.delenv("MARPIPE_THREADS", raising=False)
        serving.Service(FakeContext(folder))
        assert torch.get_num_threads() == 1
        monkeypatch.setenv("MARPIPE_THREADS", "2")  # an operator's choice is kept
        serving.Service(FakeContext(folder))
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_hostile_npz_bodies_are_refused_before_the_work() -> None:
    """Central directory entries that all point at the same data would have every entry checked and read again."""
    import struct

    buf = io.BytesIO()
    np.savez(buf, x=np.ones((1000,), np.float32))
    body = buf.getvalue()
    end = body.rindex(b"PK\x05\x06")
    _, _, _, count, _, cd_size, cd_pos, _ = struct.unpack_from("<4s4H2LH", body, end)
    entry = body[cd_pos : cd_pos + cd_size]

    def copies(n: int) -> bytes:
        return body[:cd_pos] + entry * n + struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, n, n, cd_size * n, cd_pos, 0)

    with pytest.raises(BadRequest, match="entries overlap"):
        _parse(copies(50), codecs.NPZ)
    with pytest.raises(BadRequest, match="entries"):
        _parse(copies(npz.MAX_NPZ_ENTRIES + 1), codecs.NPZ)
    named = npz.write_npz({"größe": np.ones(2)})  # a non-ASCII name says it is UTF-8, as zipfile does
    with np.load(io.BytesIO(named)) as z:
        assert z.files == ["größe"]
    assert list(npz.read_npz(named)) == ["größe"]
    assert npz._NPY_DICT.fullmatch("{'descr': '<f4', 'fortran_order': False, 'shape': (1 2,), }") is None  # numpy refuses it too


JSON_CASES = [
    b'{"inputs": {"x": [[1.5, 2, 3, 4]]}}',
    b'{"inputs": {"x": [[true, false, 1, 2.5]]}}',
    b'{"inputs": {"x": [[1e300, 0, 0, 0]]}}',  # overflows float32: 400 either way
    b'{"inputs": {"x": [[1, 2, 3, 4], [1, 2]]}}',  # ragged
    b'{"inputs": {"x": [[1, 2, 3, null]]}}',
    b'{"inputs": {"x": [["1", 2, 3, 4]]}}',
    b'{"inputs": {"x": [[NaN, 2, 3, 4]]}}',  # not JSON, but Python's json reads it: still accepted
    b'{"inputs": {"x": [[[1, 2, 3, 4]]]}}',
    b"[[1, 2, 3, 4]]",
]


@pytest.mark.parametrize("body", JSON_CASES)
def test_json_fast_path_answers_exactly_like_the_general_one(body: bytes) -> None:
    """orjson and the dtype-given conversion (when only numbers can be inside) give the arrays and the 400s that
    the standard library and numpy's inference give."""
    import json as stdlib_json

    contract = _contract([{"name": "x", "shape": ["batch", 4], "dtype": "float32", "range": None}])

    def outcome(fn):
        try:
            return fn()["x"].tolist()
        except BadRequest as exc:
            return (exc.status, str(exc))

    fast = outcome(
        lambda: codecs.decode({"body": body}, FakeContext(Path("."), [{"Content-Type": "application/json"}]), 0, contract).arrays
    )
    slow = outcome(lambda: contract.from_json(stdlib_json.loads(body)))
    assert fast == slow or (np.isnan(fast).any() and np.isnan(slow).any()), (fast, slow)


def test_an_answer_over_the_servers_limit_fails_alone_with_how_to_shrink_it(tmp_path: Path) -> None:
    """TorchServe's frontend kills the worker for any answer over max_response_size (each answer on its own):
    the handler answers that request 413 instead, and the rest of the batch as usual."""
    inputs = [{"name": "x", "shape": ["batch", 1], "dtype": "float32"}]
    service = _bare_service(lambda a: {"y": np.repeat(a["x"], 20, axis=1), "z": a["x"]}, inputs, [{"name": "y"}, {"name": "z"}])
    exact = len(service.handle([{"body": [[1.0]] * 3}], FakeContext(tmp_path))[0])
    service.meta["serve"] = {"max_response_bytes": exact}
    service.contract = Contract(service.meta, "/nonexistent")
    ctx = FakeContext(tmp_path, [{}, {}, {}, {"Accept": "application/x-npz"}])
    out = service.handle([{"body": [[1.0]] * 3}, {"body": [[1.0]] * 8}, {"body": [[2.0]]}, {"body": [[1.0]] * 100}], ctx)
    assert set(ctx.status) == {1, 3} and ctx.status[1][0] == ctx.status[3][0] == 413
    assert len(out[0]) == exact and json.loads(out[0])["outputs"]["z"] == [[1.0]] * 3  # at the limit: sent
    assert json.loads(out[2])["outputs"]["y"] == [[2.0] * 20]
    message = json.loads(out[1])["error"]
    assert f"over the {exact:,} this server sends (serve.max_response_mb: {exact / 1e6:g})" in message, message
    assert "fewer rows (this request has 8; about" in message and "Accept: application/x-npz; about 1,072 bytes" in message
    assert 'the v2 form\'s "outputs" list' in message and ctx.content_type[1] == "application/json"
    npz_message = json.loads(out[3])["error"]
    assert "this request has 100" in npz_message and "Accept" not in npz_message  # it asked for npz already


def test_form_bodies_are_refused_naming_the_header_to_send(served) -> None:
    """What TorchServe hands over for curl -d (a form): nothing for JSON without '=' or '&', cut fields otherwise."""
    service, folder = served
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    rows = [
        {},  # curl -d '{"inputs": {"x": [[1,2,3,4]]}}'
        {'{"inputs": {"text": ["salt': bytearray(b""), 'pepper"]}, "k": "a': bytearray(b'b cA"}')},  # '&', '=', '+', '%41'
        {"x": bytearray(b"[[1, 2, 3, 4]]")},  # curl -d 'x=[[1,2,3,4]]': a field named after the input
        {"body": bytearray(b'{"inputs": {"x": [[1, 2, 3, 4]]}}')},  # JSON with no Content-Type at all
    ]
    ctx = FakeContext(folder, [form, form, form, {}])
    out = service.handle(rows, ctx)
    assert set(ctx.status) == {0, 1} and ctx.status[0][0] == ctx.status[1][0] == 400
    for i in (0, 1):
        error = json.loads(out[i])["error"]
        assert "Content-Type: application/x-www-form-urlencoded" in error and "-H 'Content-Type: application/json'" in error
    assert json.loads(out[2]) == json.loads(out[3]) == {"outputs": {"y": _expected([[1, 2, 3, 4]])}}
