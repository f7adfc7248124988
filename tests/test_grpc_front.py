"""`marpipe serve`'s public gRPC port (pipeline/torchserve/grpc_front.py): raw tensors moved into typed contents
(checked against stubs generated from TorchServe's protos), then the Triton and KServe gRPC clients with their
defaults against one `marpipe serve` of a one-input, a two-input and a text model, each answer compared with the
HTTP JSON answer; StreamPredictions2 refused on the public port, the worker untouched."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import Project, start_serve
from grpc_stubs import generate
from request_models import client_inputs, request_specs

from pipeline.torchserve import server as ts
from pipeline.torchserve.grpc_front import Invalid, raw_answer, typed_request

RAW = {  # datatype → (numpy type, the typed contents field, values)
    "FP32": (np.float32, "fp32_contents", [1.5, -2.25, 0.0, 3e38]),
    "FP64": (np.float64, "fp64_contents", [1.5, -2.25, 0.0, 1e300]),
    "INT64": (np.int64, "int64_contents", [1, -2, 2**62, -(2**63)]),
    "INT32": (np.int32, "int_contents", [1, -2, 2**31 - 1, -(2**31)]),
    "INT16": (np.int16, "int_contents", [1, -2, 300, -300]),
    "INT8": (np.int8, "int_contents", [1, -2, 127, -128]),
    "UINT64": (np.uint64, "uint64_contents", [1, 2, 2**64 - 1, 0]),
    "UINT32": (np.uint32, "uint_contents", [1, 2, 2**32 - 1, 0]),
    "UINT16": (np.uint16, "uint_contents", [1, 2, 65535, 0]),
    "UINT8": (np.uint8, "uint_contents", [1, 2, 255, 0]),
    "BOOL": (np.bool_, "bool_contents", [True, False, True, True]),
}


@pytest.fixture(scope="module")
def stubs(tmp_path_factory):
    return generate(tmp_path_factory.mktemp("stubs"))


def test_raw_input_contents_move_into_typed_contents(stubs) -> None:
    pb = stubs.open_inference_grpc_pb2
    request = pb.ModelInferRequest(model_name="m", model_version="1", id="r-9")
    request.parameters["p"].int64_param = 7
    request.outputs.add(name="out")
    for datatype, (dtype, _, values) in RAW.items():
        request.inputs.add(name=datatype.lower(), datatype=datatype, shape=[2, 2])
        request.raw_input_contents.append(np.asarray(values, dtype=dtype).tobytes())
    request.inputs.add(name="text", datatype="BYTES", shape=[3])
    request.raw_input_contents.append(b"".join(len(t).to_bytes(4, "little") + t for t in [b"ab", b"", "é".encode()]))
    got = pb.ModelInferRequest.FromString(typed_request(request.SerializeToString()))
    assert not got.raw_input_contents
    assert (got.model_name, got.model_version, got.id, got.parameters["p"].int64_param) == ("m", "1", "r-9", 7)
    assert [o.name for o in got.outputs] == ["out"]
    for tensor, (datatype, (dtype, field, values)) in zip(got.inputs, RAW.items()):
        assert (tensor.name, tensor.datatype, list(tensor.shape)) == (datatype.lower(), datatype, [2, 2])
        want = np.asarray(values, dtype=dtype).tolist()
        assert list(getattr(tensor.contents, field)) == want, datatype
    assert list(got.inputs[-1].contents.bytes_contents) == [b"ab", b"", "é".encode()]
    plain = pb.ModelInferRequest(model_name="m")  # no raw contents: the bytes as they came
    plain.inputs.add(name="x", datatype="FP32", shape=[1]).contents.fp32_contents.append(1.0)
    assert typed_request(plain.SerializeToString()) == plain.SerializeToString()


def test_typed_answers_move_into_raw_output_contents(stubs) -> None:
    """tritonclient reads an answer's tensors from raw_output_contents only (BYTES excepted): raw in, raw out."""
    pb = stubs.open_inference_grpc_pb2
    answer = pb.ModelInferResponse(model_name="m", id="r-9")
    for datatype, (_, field, values) in RAW.items():
        getattr(answer.outputs.add(name=datatype.lower(), datatype=datatype, shape=[4]).contents, field).extend(values)
    answer.outputs.add(name="text", datatype="BYTES", shape=[2]).contents.bytes_contents.extend([b"ab", b""])
    got = pb.ModelInferResponse.FromString(raw_answer(answer.SerializeToString()))
    assert (got.model_name, got.id, len(got.raw_output_contents)) == ("m", "r-9", len(RAW) + 1)
    for tensor, raw, (datatype, (dtype, _, values)) in zip(got.outputs, got.raw_output_contents, RAW.items()):
        assert (tensor.name, list(tensor.shape), tensor.HasField("contents")) == (datatype.lower(), [4], False)
        assert np.frombuffer(raw, dtype=dtype).tolist() == np.asarray(values, dtype=dtype).tolist(), datatype
    assert got.raw_output_contents[-1] == b"\x02\x00\x00\x00ab\x00\x00\x00\x00"
    half = pb.ModelInferResponse(model_name="m")  # an output with no raw form here: the answer as it came
    half.outputs.add(name="h", datatype="FP16", shape=[1])
    assert raw_answer(half.SerializeToString()) == half.SerializeToString()


@pytest.mark.parametrize(
    ("datatype", "shape", "raw", "said"),
    [
        ("FP16", [2], b"\0" * 4, "datatype FP16"),
        ("FP32", [3], b"\0" * 8, "8 bytes of raw contents, shape [3] of FP32 needs 12"),
        ("BYTES", [2], b"\1\0\0\0a", "BYTES raw contents hold 1 elements, shape [2] needs 2"),
        ("BYTES", [1], b"\x09\x00\x00", "inside a length prefix"),
        ("BYTES", [1], b"\x09\x00\x00\x00ab", "element 0 runs past"),
    ],
)
def test_raw_contents_that_cannot_be_carried_are_refused(stubs, datatype, shape, raw, said) -> None:
    pb = stubs.open_inference_grpc_pb2
    request = pb.ModelInferRequest(model_name="m")
    request.inputs.add(name="x", datatype=datatype, shape=shape)
    request.raw_input_contents.append(raw)
    with pytest.raises(Invalid, match=re.escape(said)):
        typed_request(request.SerializeToString())
    request.raw_input_contents.append(raw)
    with pytest.raises(Invalid, match="2 raw_input_contents for 1 inputs"):
        typed_request(request.SerializeToString())


# --- one `marpipe serve` for the clients


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    project = Project(tmp_path_factory.mktemp("front"))
    specs = request_specs(project)
    one = project.spec(name="one", serve={"batch_size": 8, "max_batch_delay_ms": 50})
    for args in (("--format", "onnx", specs["text"]), (one, specs["two"])):
        result = project.build(*args)
        assert result.returncode == 0, result.stdout + result.stderr
    port = ts.free_ports(1)[0]
    workdir = project.root / "serve"
    proc, text = start_serve(project.store, port, workdir, f"--vmargs={ts.QUICK_JIT}", timeout=300)
    try:
        assert text.count("READY") == 3, text
        found = re.search(r"gRPC: inference 127\.0\.0\.1:(\d+) .*own gRPC on loopback only: inference 127\.0\.0\.1:(\d+)", text)
        assert found and found[1] != found[2], text
        key = json.loads((workdir / "key_file.json").read_text())["inference"]["key"]
        yield {"http": port, "grpc": int(found[1]), "key": key, "workdir": workdir}
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0


def _json_answer(served: dict, model: str, inputs: dict[str, np.ndarray]) -> dict[str, list]:
    body = json.dumps({"inputs": {k: v.tolist() for k, v in inputs.items()}}).encode()
    headers = {"Content-Type": "application/json", "Accept": "application/json; raw=true"}
    code, _, answer = ts.http(f"http://127.0.0.1:{served['http']}/predictions/{model}", body, headers, token=served["key"])
    assert code == 200, answer
    return json.loads(answer)["outputs"]


def _pids(served: dict) -> list:
    doc = json.loads((served["workdir"] / "key_file.json").read_text())["management"]["key"]
    config = (served["workdir"] / "config.properties").read_text()
    management = re.search(r"management_address=(\S+)", config)[1]
    found = []
    for model in ("one", "two", "text"):
        code, _, body = ts.http(f"{management}/models/{model}", token=doc)
        found += [(model, w["pid"], w["status"]) for w in json.loads(body)[0]["workers"]]
    return sorted(found)


# each client in a process of its own: the kserve SDK and tritonclient.grpc both define the protobuf package `inference`
TRITON = """
import json, sys
import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException
url, key, doc = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
headers = {"authorization": f"Bearer {key}"}
client = grpcclient.InferenceServerClient(url)
said = {"live": client.is_server_live(headers=headers), "ready": client.is_server_ready(headers=headers), "answers": {}}
for model, inputs in doc.items():
    tensors = []
    for name, (datatype, data) in inputs.items():
        value = np.array(data, dtype=object if datatype == "BYTES" else np.float32)
        tensor = grpcclient.InferInput(name, list(value.shape), datatype)
        tensor.set_data_from_numpy(value)
        tensors.append(tensor)
    result = client.infer(model, tensors, request_id="t-1", headers=headers, client_timeout=30)
    outputs = result.get_response().outputs
    said["answers"][model] = {o.name: result.as_numpy(o.name).tolist() for o in outputs}
    said["id"] = result.get_response().id
try:
    client.get_model_repository_index(headers=headers)
except InferenceServerException as exc:
    said["index"] = str(exc)
print(json.dumps(said))
"""

KSERVE = """
import asyncio, json, sys
import numpy as np
from kserve import InferenceGRPCClient, InferInput, InferRequest
url, key, doc = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
headers = (("authorization", f"Bearer {key}"),)

async def main():
    client = InferenceGRPCClient(url, timeout=30)
    said = {"live": await client.is_server_live(headers=headers), "ready": await client.is_server_ready(headers=headers), "answers": {}}
    for model, inputs in doc.items():
        tensors = []
        for name, (datatype, data) in inputs.items():
            value = np.array(data, dtype=object if datatype == "BYTES" else np.float32)
            tensor = InferInput(name, list(value.shape), datatype)
            tensor.set_data_from_numpy(value, binary_data=True)
            tensors.append(tensor)
        answer = await client.infer(InferRequest(model, tensors, request_id="k-1"), headers=headers)
        said["answers"][model] = {o.name: o.as_numpy().tolist() for o in answer.outputs}
    await client.close()
    print(json.dumps(said))

asyncio.run(main())
"""


@pytest.mark.slow
@pytest.mark.parametrize("client", ["tritonclient", "kserve"])
def test_standard_grpc_clients_answer_like_json(served: dict, client: str) -> None:
    module = "tritonclient.grpc" if client == "tritonclient" else "kserve"
    if subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True).returncode:
        pytest.skip(f"{module} does not import here")
    doc = {m: {n: ["BYTES" if v.dtype == object else "FP32", v.tolist()] for n, v in ins.items()} for m, ins in client_inputs().items()}
    script = TRITON if client == "tritonclient" else KSERVE
    args = [sys.executable, "-c", script, f"127.0.0.1:{served['grpc']}", served["key"], json.dumps(doc)]
    run = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    said = json.loads(run.stdout.splitlines()[-1])
    assert said["live"] is True and said["ready"] is True
    for model, inputs in client_inputs().items():
        want = _json_answer(served, model, inputs)
        got = said["answers"][model]
        assert sorted(got) == sorted(want), (model, got)
        for name in want:
            np.testing.assert_array_equal(np.asarray(got[name], np.float32), np.asarray(want[name], np.float32), err_msg=f"{model} {name}")
    if client == "tritonclient":
        assert said["id"] == "t-1"
        assert "UNIMPLEMENTED" in said["index"] and "RepositoryIndex" in said["index"], said["index"]


@pytest.mark.slow
def test_stream_predictions2_is_refused_on_the_public_port(served: dict, stubs) -> None:
    import grpc

    metadata = [("authorization", f"Bearer {served['key']}")]
    pb = stubs.inference_pb2
    before = _pids(served)
    body = json.dumps({"inputs": {"x": [[1, 2, 3, 4]]}}).encode()
    with grpc.insecure_channel(f"127.0.0.1:{served['grpc']}") as channel:
        stub = stubs.inference_pb2_grpc.InferenceAPIsServiceStub(channel)
        request = pb.PredictionsRequest(model_name="one", input={"data": body}, sequence_id="s-1")
        with pytest.raises(grpc.RpcError) as raised:
            list(stub.StreamPredictions2(iter([request]), metadata=metadata, timeout=20))
        assert raised.value.code() == grpc.StatusCode.UNIMPLEMENTED and "sequence batching" in raised.value.details()
        calls = stub.StreamPredictions2(iter([request]), metadata=metadata, timeout=20)
        calls.cancel()  # a client that closes early
        start = time.monotonic()
        answer = stub.Predictions(pb.PredictionsRequest(model_name="one", input={"data": body}), metadata=metadata, timeout=1)
        assert "outputs" in json.loads(answer.prediction) and time.monotonic() - start < 1
        (streamed,) = stub.StreamPredictions(pb.PredictionsRequest(model_name="one", input={"data": body}), metadata=metadata, timeout=20)
        assert json.loads(streamed.prediction) == json.loads(answer.prediction)
        with pytest.raises(grpc.RpcError) as raised:  # TorchServe's own status, passed through
            stub.Predictions(pb.PredictionsRequest(model_name="one", input={"data": b"[[1, 2]]"}), metadata=metadata, timeout=30)
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "dimension 1 must be 4" in raised.value.details()
        with pytest.raises(grpc.RpcError) as raised:  # no token: refused by TorchServe behind the front
            stub.Predictions(pb.PredictionsRequest(model_name="one", input={"data": body}), timeout=30)
        assert raised.value.code() not in (grpc.StatusCode.OK, grpc.StatusCode.UNIMPLEMENTED)
    assert _pids(served) == before
