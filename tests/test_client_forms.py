"""The request forms of the standard clients, through the handler without a server (a fake context): v2 bodies
with model_name and parameters, the binary data extension, KServe v1 rows, and requests as TorchServe hands over
its gRPC ones (no headers). Against a real TorchServe with the client libraries: test_clients.py."""

from __future__ import annotations

import json
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest
from conftest import FakeContext, Project

from handlers.marpipe_serving import service as serving
from handlers.marpipe_serving import v2
from pipeline.torchserve import kserve, server


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    """The two-input model's handler, loaded from its archive as TorchServe loads it."""
    project = Project(tmp_path_factory.mktemp("forms"))
    two, _ = project.multi_io_specs()
    result = project.build(two)
    assert result.returncode == 0, result.stdout + result.stderr
    folder = tmp_path_factory.mktemp("two")
    with zipfile.ZipFile(project.store / "two.mar") as z:
        z.extractall(folder)
    return serving.Service(FakeContext(folder)), folder


X = np.arange(8, dtype=np.float32).reshape(2, 4) / 8
SEQ = np.linspace(-1, 1, 24, dtype=np.float32).reshape(2, 3, 4)


def _v2(**extra) -> dict:
    tensors = [
        {"name": "x", "shape": [2, 4], "datatype": "FP32", "data": X.reshape(-1).tolist()},
        {"name": "seq", "shape": [2, 3, 4], "datatype": "FP32", "data": SEQ.reshape(-1).tolist()},
    ]
    return {"inputs": tensors, **extra}


def _call(service, rows: list, headers: list[dict] | None = None, grpc: bool = False):
    svc, folder = service
    ctx = FakeContext(folder, headers, grpc=grpc)
    return svc.handle(rows, ctx), ctx


def _plain(service) -> dict:
    out, _ = _call(service, [{"body": json.dumps({"inputs": {"x": X.tolist(), "seq": SEQ.tolist()}}).encode()}])
    return {k: np.asarray(v, np.float32) for k, v in json.loads(out[0])["outputs"].items()}


def test_v2_bodies_as_clients_send_them(service) -> None:
    want = _plain(service)
    body = _v2(id="a-1", model_name="two", model_version="1.0", parameters={"priority": 0}, outputs=[{"name": "joint"}])
    out, ctx = _call(service, [{"body": json.dumps(body).encode()}])
    doc = json.loads(out[0])
    assert doc["id"] == "a-1" and doc["model_name"] == "two" and [o["name"] for o in doc["outputs"]] == ["joint"]
    np.testing.assert_array_equal(np.asarray(doc["outputs"][0]["data"], np.float32).reshape(2, -1), want["joint"])
    for bad, says in (
        (_v2(model_name="other"), "model_name 'other'"),
        (_v2(parameters={"classification": 2}), "classification"),
        (_v2(parameters=[1]), "parameters must be an object"),
    ):
        out, ctx = _call(service, [{"body": json.dumps(bad).encode()}])
        assert ctx.status[0][0] == 400 and says in json.loads(out[0])["error"], out


def _binary_body(outputs: list | None = None) -> tuple[bytes, str]:
    header = {"inputs": [], "parameters": {"binary_data_output": True}}
    blobs = []
    for name, value in (("x", X), ("seq", SEQ)):
        blob = value.astype("<f4").tobytes()
        header["inputs"].append(
            {"name": name, "shape": list(value.shape), "datatype": "FP32", "parameters": {"binary_data_size": len(blob)}}
        )
        blobs.append(blob)
    if outputs is not None:
        header["outputs"] = outputs
    head = json.dumps(header).encode()
    return head + b"".join(blobs), str(len(head))


def test_the_binary_data_extension_in_and_out(service) -> None:
    want = _plain(service)
    body, length = _binary_body()
    out, ctx = _call(service, [{"body": body}], [{"Host": "h", "Inference-Header-Content-Length": length}])
    size = int(ctx.response_headers[0]["Inference-Header-Content-Length"])
    assert ctx.content_type[0] == "application/octet-stream"
    doc, at = json.loads(out[0][:size]), size
    for o in doc["outputs"]:
        n = o["parameters"]["binary_data_size"]
        np.testing.assert_array_equal(np.frombuffer(out[0][at : at + n], "<f4").reshape(o["shape"]), want[o["name"]])
        at += n
    assert at == len(out[0])
    body, length = _binary_body([{"name": "joint", "parameters": {"binary_data": False}}])  # JSON where asked
    out, ctx = _call(service, [{"body": body}], [{"Host": "h", "Inference-Header-Content-Length": length}])
    assert json.loads(out[0])["outputs"][0]["name"] == "joint" and "Inference-Header-Content-Length" not in ctx.response_headers.get(0, {})
    for length, says in (("9999999", "Inference-Header-Content-Length is 9999999"), ("x", "not a number")):
        out, ctx = _call(service, [{"body": body}], [{"Host": "h", "Inference-Header-Content-Length": length}])
        assert ctx.status[0][0] == 400 and says in json.loads(out[0])["error"], out
    truncated = body[:-4]
    out, ctx = _call(service, [{"body": truncated}], [{"Host": "h", "Inference-Header-Content-Length": str(body.index(b"}]}") + 3)}])
    assert ctx.status[0][0] == 400, out


def test_bytes_tensors_length_prefixed() -> None:
    words = ["a dog", "ünï"]
    blob = b"".join(struct.pack("<I", len(w.encode())) + w.encode() for w in words)
    item = {"name": "text", "shape": [2], "datatype": "BYTES", "parameters": {"binary_data_size": len(blob)}}
    tensors, _ = v2.decode({"inputs": [item]}, {"name": "t", "outputs": []}, blobs=memoryview(blob))
    assert tensors["text"] == words


def test_kserve_v1_rows_answered_as_predictions(service) -> None:
    want = _plain(service)
    rows = [{"x": X[i].tolist(), "seq": SEQ[i].tolist()} for i in range(2)]
    out, ctx = _call(service, [{"body": json.dumps({"instances": rows}).encode()}])
    predictions = json.loads(out[0])["predictions"]
    assert len(predictions) == 2 and sorted(predictions[0]) == ["joint", "per_step"]
    np.testing.assert_array_equal(np.asarray([p["joint"] for p in predictions], np.float32), want["joint"])
    out, ctx = _call(service, [{"body": json.dumps({"instances": [X[0].tolist()]}).encode()}])
    assert ctx.status[0][0] == 400 and "each row of instances must be an object" in json.loads(out[0])["error"]


def test_grpc_requests_get_what_torchserve_can_send(service) -> None:
    """No request headers: TorchServe's gRPC. Every answer ends the stream; an error alone is raised (its gRPC
    status); inside a batch a ModelInfer error is a v2 answer with the id, a Predictions error stays in the body."""
    from ts.utils.util import PredictionException

    good = {"body": json.dumps({"inputs": {"x": X.tolist(), "seq": SEQ.tolist()}}).encode()}
    out, ctx = _call(service, [good], grpc=True)
    assert "outputs" in json.loads(out[0]) and ctx.response_headers[0]["ts_stream_next"] == "false"
    with pytest.raises(PredictionException) as raised:
        _call(service, [{"data": b"[[1, 2]]"}], grpc=True)
    assert raised.value.error_code == 400 and "input" in raised.value.message
    model_infer = _v2(id="g-9", model_name="two")
    model_infer["inputs"][0]["data"] = []  # tritonclient's raw_input_contents, dropped by TorchServe
    rows = [{"body": json.dumps(model_infer).encode()}, good, {"data": b"[[1, 2]]"}]
    parts = {"body": {"content-type": "application/json"}}
    out, ctx = _call(service, rows, [parts, {}, {}], grpc=True)
    doc = json.loads(out[0])
    assert doc["id"] == "g-9" and doc["model_version"] and doc["outputs"][0]["name"] == "error"
    assert "raw_input_contents" in doc["outputs"][0]["data"][0]
    assert "outputs" in json.loads(out[1]) and "error" in json.loads(out[2])
    out, ctx = _call(service, [good])  # HTTP: no stream header (TorchServe would answer it as a stream)
    assert "ts_stream_next" not in ctx.response_headers.get(0, {})


def test_configs_turn_on_the_open_inference_protocol(tmp_path: Path) -> None:
    ports = dict.fromkeys(("inference", "management", "metrics", "grpc_inference", "grpc_management"), 1)
    text = server.config_text(tmp_path, [], "0.0.0.0", ports, True, False).splitlines()
    assert "ts_open_inference_protocol=true" in text and "grpc_inference_address=127.0.0.1" in text
    assert "ts_open_inference_protocol=true" in kserve.config_properties({}).splitlines()
    assert [server.grpc_host(h) for h in ("127.0.0.1", "::1", "localhost", "0.0.0.0", "::")] == [
        "127.0.0.1",
        "::1",
        "localhost",
        "127.0.0.1",
        "::1",
    ]
