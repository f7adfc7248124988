"""The client libraries users already have, against a real TorchServe serving a one-input, a two-input and a text
model: KServe's SDK (REST v1 and v2), tritonclient.http (binary tensors by default), TorchServe's own gRPC APIs
through stubs generated from the protos in its jar (Predictions, the Open Inference Protocol's ModelInfer), the
request forms KServe's wrapper sends, and the stream calls under concurrent load. Every answer is compared with
the HTTP JSON answer."""

from __future__ import annotations

import asyncio
import base64
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from conftest import Project, serving
from grpc_stubs import generate
from request_models import CLIENT_TEXTS, client_inputs, request_specs

from pipeline.torchserve import server as ts

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Project:
    project = Project(tmp_path_factory.mktemp("clients"))
    specs = request_specs(project)
    one = project.spec(name="one", serve={"batch_size": 8, "max_batch_delay_ms": 50})
    result = project.build("--format", "onnx", specs["text"])
    assert result.returncode == 0, result.stdout + result.stderr
    result = project.build(one, specs["two"])
    assert result.returncode == 0, result.stdout + result.stderr
    return project


@pytest.fixture(scope="module")
def server(project: Project):
    yield from serving(project.store, auth=True)


@pytest.fixture(scope="module")
def stubs(tmp_path_factory):
    return generate(tmp_path_factory.mktemp("stubs"))


def _auth(server: ts.Server) -> dict[str, str]:
    return {"Authorization": f"Bearer {server.key('inference')}"}


def _json_answer(server: ts.Server, model: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The HTTP JSON API's raw answer: what every client's answer is compared with."""
    body = json.dumps({"inputs": {k: v.tolist() for k, v in inputs.items()}}).encode()
    headers = {**_auth(server), "Content-Type": "application/json", "Accept": "application/json; raw=true"}
    code, _, answer = server.request("inference", f"/predictions/{model}", body, headers)
    assert code == 200, answer
    return {k: np.asarray(v, dtype=np.float32) for k, v in json.loads(answer)["outputs"].items()}


def _same(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    assert sorted(got) == sorted(want)
    for name in want:
        np.testing.assert_array_equal(np.asarray(got[name], dtype=np.float32), want[name], err_msg=name)


def _datatype(value: np.ndarray) -> str:
    return "BYTES" if value.dtype == object else "FP32"


def _pids(server: ts.Server) -> dict[str, list[int]]:
    found = {}
    for name in server.models:
        workers = json.loads(server.request("management", f"/models/{name}")[2])[0]["workers"]
        found[name] = sorted((w["pid"], w["status"]) for w in workers)
    return found


def test_kserve_sdk_rest_v2_and_v1_answer_like_json(server: ts.Server) -> None:
    from kserve import InferenceRESTClient, InferInput, InferRequest, RESTConfig

    base = server.url("inference", "")

    async def calls() -> None:
        v2 = InferenceRESTClient(RESTConfig(protocol="v2"))
        v1 = InferenceRESTClient(RESTConfig(protocol="v1"))
        assert await v2.is_server_live(base, headers=_auth(server))
        assert await v2.is_server_ready(base, headers=_auth(server))
        for model, inputs in client_inputs().items():
            want = _json_answer(server, model, inputs)
            tensors = []
            for name, value in inputs.items():
                tensor = InferInput(name, list(value.shape), _datatype(value))
                tensor.set_data_from_numpy(value, binary_data=False)
                tensors.append(tensor)
            answer = await v2.infer(base, InferRequest(model, tensors, request_id="r-1"), model, headers=_auth(server))
            assert answer.id == "r-1" and answer.model_name == model
            _same({o.name: o.as_numpy() for o in answer.outputs}, want)
            rows = [{k: (v[i] if v.dtype == object else v[i].tolist()) for k, v in inputs.items()} for i in range(2)]
            if len(inputs) == 1:
                rows = [next(iter(r.values())) for r in rows]
            doc = await v1.infer(base, {"instances": rows}, model, headers=_auth(server))
            (name,) = want if len(want) == 1 else (None,)
            got = {name: doc["predictions"]} if name else {k: [p[k] for p in doc["predictions"]] for k in want}
            _same(got, want)
        await v1.close()
        await v2.close()

    asyncio.run(calls())


def test_tritonclient_http_binary_by_default_and_json(server: ts.Server) -> None:
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(f"{server.host}:{server.ports['inference']}")
    assert client.is_server_live(headers=_auth(server)) and client.is_server_ready(headers=_auth(server))
    for model, inputs in client_inputs().items():
        want = _json_answer(server, model, inputs)
        for binary in (True, False):
            tensors = []
            for name, value in inputs.items():
                tensor = httpclient.InferInput(name, list(value.shape), _datatype(value))
                tensor.set_data_from_numpy(value, binary_data=binary)
                tensors.append(tensor)
            outputs = None if binary else [httpclient.InferRequestedOutput(n, binary_data=False) for n in want]
            result = client.infer(model, tensors, outputs=outputs, request_id="t-7", headers=_auth(server))
            assert result.get_response()["id"] == "t-7"
            _same({n: result.as_numpy(n) for n in want}, want)
    client.close()


def _model_infer(stubs, model: str, inputs: dict[str, np.ndarray], rid: str = "g-1", raw: bool = False):
    pb = stubs.open_inference_grpc_pb2
    request = pb.ModelInferRequest(model_name=model, id=rid)
    for name, value in inputs.items():
        tensor = request.inputs.add(name=name, datatype=_datatype(value), shape=list(value.shape))
        if raw:
            request.raw_input_contents.append(value.tobytes())
        elif value.dtype == object:
            tensor.contents.bytes_contents.extend(v.encode() for v in value.reshape(-1))
        else:
            tensor.contents.fp32_contents.extend(value.reshape(-1).tolist())
    return request


def test_open_inference_protocol_over_grpc(server: ts.Server, stubs) -> None:
    import grpc

    metadata = [("authorization", f"Bearer {server.key('inference')}")]
    pb, stub_module = stubs.open_inference_grpc_pb2, stubs.open_inference_grpc_pb2_grpc
    before = _pids(server)
    with grpc.insecure_channel(f"{server.host}:{server.ports['grpc_inference']}") as channel:
        stub = stub_module.GRPCInferenceServiceStub(channel)
        assert stub.ServerLive(pb.ServerLiveRequest(), metadata=metadata).live
        assert stub.ServerReady(pb.ServerReadyRequest(), metadata=metadata).ready
        for model, inputs in client_inputs().items():
            want = _json_answer(server, model, inputs)
            answer = stub.ModelInfer(_model_infer(stubs, model, inputs), metadata=metadata, timeout=30)
            assert answer.id == "g-1" and answer.model_name == model
            got = {o.name: np.asarray(o.contents.fp32_contents).reshape(o.shape) for o in answer.outputs}
            _same(got, want)
            with pytest.raises(grpc.RpcError) as raised:  # tritonclient's binary tensors: lost by TorchServe, said so
                stub.ModelInfer(_model_infer(stubs, model, inputs, raw=True), metadata=metadata, timeout=30)
            assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "raw_input_contents" in raised.value.details()
        with pytest.raises(grpc.RpcError) as raised:
            stub.ModelInfer(_model_infer(stubs, "one", {"y": np.zeros((1, 4), np.float32)}), metadata=metadata, timeout=30)
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "unknown inputs ['y']" in raised.value.details()
        # errors batched with good requests: the good ones answered, the bad one told in its answer, nobody killed
        good, bad = client_inputs()["one"], {"y": np.zeros((1, 4), np.float32)}
        with ThreadPoolExecutor(8) as pool:
            futures = [
                pool.submit(stub.ModelInfer, _model_infer(stubs, "one", bad if i % 2 else good, f"b-{i}"), metadata=metadata, timeout=30)
                for i in range(8)
            ]
            for i, future in enumerate(futures):
                try:
                    answer = future.result()
                except grpc.RpcError as exc:  # alone in its batch after all
                    assert i % 2 and exc.code() == grpc.StatusCode.INVALID_ARGUMENT
                    continue
                assert answer.id == f"b-{i}"
                names = [o.name for o in answer.outputs]
                assert names == (["error"] if i % 2 else ["output"]), names
    assert _pids(server) == before


def test_clients_of_inference_grpc_inference_service_meet_torchserves_package_name(server: ts.Server) -> None:
    """tritonclient.grpc calls inference.GRPCInferenceService; TorchServe 0.12 serves the same service under
    org.pytorch.serve.grpc.openinference, so on its own port it answers UNIMPLEMENTED (docs/requests.md#grpc); the
    port `marpipe serve` prints is a front that serves the standard name (tests/test_grpc_front.py). When a TorchServe
    serves the standard name itself, this test fails: then the front may go."""
    import subprocess
    import sys

    # in a process of its own: the kserve SDK (imported by the other tests) and tritonclient.grpc both define the
    # protobuf package `inference`, which one process cannot hold twice
    script = f"""
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException
client = grpcclient.InferenceServerClient("{server.host}:{server.ports["grpc_inference"]}")
try:
    client.is_server_live(headers={{"authorization": "Bearer {server.key("inference")}"}})
except InferenceServerException as exc:
    print(exc)
"""
    said = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert "UNIMPLEMENTED" in said.stdout and "inference.GRPCInferenceService" in said.stdout, said.stdout + said.stderr


def test_torchserve_grpc_predictions_in_every_body_form(server: ts.Server, stubs) -> None:
    import grpc

    metadata = [("authorization", f"Bearer {server.key('inference')}")]
    pb = stubs.inference_pb2
    before = _pids(server)
    with grpc.insecure_channel(f"{server.host}:{server.ports['grpc_inference']}") as channel:
        stub = stubs.inference_pb2_grpc.InferenceAPIsServiceStub(channel)

        def predict(model: str, entries: dict[str, bytes]) -> dict[str, np.ndarray]:
            answer = stub.Predictions(pb.PredictionsRequest(model_name=model, input=entries), metadata=metadata, timeout=30)
            return {k: np.asarray(v, dtype=np.float32) for k, v in json.loads(answer.prediction)["outputs"].items()}

        for model, inputs in client_inputs().items():
            want = _json_answer(server, model, inputs)
            body = json.dumps({"inputs": {k: v.tolist() for k, v in inputs.items()}}).encode()
            _same(predict(model, {"data": body}), want)
            _same(predict(model, {"body": body}), want)
            if model != "text":  # a text model's "text" entry is the text itself (below)
                _same(predict(model, {k: json.dumps(v.tolist()).encode() for k, v in inputs.items()}), want)
        one_text = _json_answer(server, "text", {"text": np.array(CLIENT_TEXTS[:1], dtype=object)})
        _same(predict("text", {"data": CLIENT_TEXTS[0].encode()}), one_text)  # plain text: gRPC has no content type
        _same(predict("text", {"text": CLIENT_TEXTS[0].encode()}), one_text)
        with pytest.raises(grpc.RpcError) as raised:
            stub.Predictions(pb.PredictionsRequest(model_name="one", input={"data": b"[[1, 2]]"}), metadata=metadata, timeout=30)
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "dimension 1 must be 4" in raised.value.details()
    assert _pids(server) == before


def test_stream_calls_never_wedge_or_kill_a_model(server: ts.Server, stubs) -> None:
    """StreamPredictions, alone and among concurrent HTTP requests (batched with them: batch_size 8), good and bad:
    each answered once and closed. StreamPredictions2 on a model without sequence batching fails inside
    TorchServe 0.12 itself (UNKNOWN: its getJobGroup throws) before any answer; held open as clients do, it
    costs nothing. The workers stay the same and the model answers within a second."""
    import grpc

    metadata = [("authorization", f"Bearer {server.key('inference')}")]
    pb = stubs.inference_pb2
    before = _pids(server)
    good = json.dumps({"inputs": {"x": [[1, 2, 3, 4]]}}).encode()
    bad = b'{"inputs": {"y": [[1]]}}'
    stop = threading.Event()
    failures: list[str] = []

    def load() -> None:
        while not stop.is_set():
            code, _, answer = server.request("inference", "/predictions/one", good, {**_auth(server), "Content-Type": "application/json"})
            if code != 200:
                failures.append(f"{code} {answer[:200]!r}")

    with grpc.insecure_channel(f"{server.host}:{server.ports['grpc_inference']}") as channel:
        stub = stubs.inference_pb2_grpc.InferenceAPIsServiceStub(channel)

        def stream(body: bytes) -> list:
            request = pb.PredictionsRequest(model_name="one", input={"data": body})
            return list(stub.StreamPredictions(request, metadata=metadata, timeout=20))

        def stream2(body: bytes) -> grpc.StatusCode:
            """One request on a StreamPredictions2 call, its request stream held open until the call ends."""
            ended = threading.Event()
            request = pb.PredictionsRequest(model_name="one", input={"data": body}, sequence_id=f"s-{threading.get_ident()}")

            def requests():
                yield request
                ended.wait(20)

            try:
                answers = list(stub.StreamPredictions2(requests(), metadata=metadata, timeout=20))
                return grpc.StatusCode.OK if answers else grpc.StatusCode.UNKNOWN
            except grpc.RpcError as exc:
                return exc.code()
            finally:
                ended.set()

        (answer,) = stream(good)  # alone
        assert "outputs" in json.loads(answer.prediction)
        assert stream2(good) == grpc.StatusCode.UNKNOWN
        threads = [threading.Thread(target=load) for _ in range(3)]
        for t in threads:
            t.start()
        try:
            with ThreadPoolExecutor(6) as pool:
                streams = [pool.submit(stream, body) for _ in range(6) for body in (good, bad)]
                seconds = [pool.submit(stream2, good) for _ in range(3)]
                for future in streams:
                    try:
                        answers = future.result()
                    except grpc.RpcError as exc:  # a bad body alone in its batch: its status
                        assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT, exc
                        continue
                    assert len(answers) == 1, answers
                assert {f.result() for f in seconds} == {grpc.StatusCode.UNKNOWN}
        finally:
            stop.set()
            for t in threads:
                t.join()
    assert not failures, failures[:3]
    assert _pids(server) == before
    start = time.monotonic()
    code, _, _ = server.request("inference", "/predictions/one", good, {**_auth(server), "Content-Type": "application/json"}, timeout=1)
    assert code == 200 and time.monotonic() - start < 1


def test_the_kserve_wrappers_request_forms(server: ts.Server, stubs) -> None:
    """What pytorch/serve's kubernetes/kserve/kserve_wrapper sends TorchServe, parsed as it parses the answers:
    v1 bodies to /predictions/NAME, v2 REST as InferRequest.to_rest() writes it, and v2 gRPC as its to_ts_grpc
    writes it (a JSON body under data of Predictions, BYTES base64, the first element only)."""
    import grpc
    from kserve import InferInput, InferRequest, InferResponse

    metadata = [("authorization", f"Bearer {server.key('inference')}")]
    headers = {**_auth(server), "Content-Type": "application/json"}
    with grpc.insecure_channel(f"{server.host}:{server.ports['grpc_inference']}") as channel:
        stub = stubs.inference_pb2_grpc.InferenceAPIsServiceStub(channel)
        for model, inputs in client_inputs().items():
            if model == "text":
                inputs = {"text": inputs["text"][:1]}  # the wrapper's gRPC carries one string per BYTES input
            want = _json_answer(server, model, inputs)
            tensors = [InferInput(n, list(v.shape), _datatype(v)) for n, v in inputs.items()]
            for tensor, value in zip(tensors, inputs.values()):
                tensor.set_data_from_numpy(value, binary_data=False)
            request = InferRequest(model, tensors, request_id="w-1")
            body, _ = request.to_rest()
            code, _, answer = server.request("inference", f"/predictions/{model}", json.dumps(body).encode(), headers)
            assert code == 200, answer
            parsed = InferResponse.from_rest(json.loads(answer))
            _same({o.name: o.as_numpy() for o in parsed.outputs}, want)
            ts_body = {
                "id": request.id,
                "inputs": [
                    {
                        "name": t.name,
                        "shape": list(t.shape),
                        "datatype": t.datatype,
                        "data": [base64.b64encode(t.data[0].encode()).decode()] if t.datatype == "BYTES" else list(t.data),
                    }
                    for t in tensors
                ],
            }
            reply = stub.Predictions(
                stubs.inference_pb2.PredictionsRequest(model_name=model, input={"data": json.dumps(ts_body).encode()}),
                metadata=metadata,
                timeout=30,
            )
            decoded = json.loads(reply.prediction.decode("utf-8"))
            assert decoded["model_name"] == model and decoded.get("id") == "w-1"
            _same({o["name"]: np.asarray(o["data"]).reshape(o["shape"]) for o in decoded["outputs"]}, want)
