"""`marpipe kserve`: the layout KServe's TorchServe runtime reads, served by TorchServe started exactly as
that runtime starts it (`torchserve --start --model-store … --ts-config …`; the test only rewrites the
addresses to free loopback ports), every archive replayed; the InferenceService checked with KServe's own
SDK models. The store holds a .mar and a directory archive (a two-input model with batching).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
import zipfile
from pathlib import Path

import pytest
import yaml
from conftest import Project, marpipe

from pipeline.torchserve import server as ts
from pipeline.torchserve.smoke import check_archive

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def layout(tmp_path_factory) -> tuple[Path, Path]:
    project = Project(tmp_path_factory.mktemp("kserve"))
    project.save(project.model("Linear").state_dict(), "tiny.pth")
    tiny = project.spec(name="tiny.mlp", version="2.1", serve={"batch_size": 4, "max_batch_delay_ms": 50, "max_response_mb": 12.5})
    result = project.build(tiny)
    assert result.returncode == 0, result.stdout + result.stderr
    two, _ = project.multi_io_specs()
    doc = yaml.safe_load(two.read_text())
    doc["serve"] = {"batch_size": 8, "max_batch_delay_ms": 30, "max_workers": 2}
    two.write_text(yaml.safe_dump(doc))
    result = project.build("--layout", "dir", two)
    assert result.returncode == 0, result.stdout + result.stderr
    out = project.root / "kserve-out"
    options = ("--storage-uri", "s3://models/marpipe", "--protocol", "v2", f"--vmargs={ts.QUICK_JIT}")
    result = marpipe("kserve", "--store", str(project.store), str(out), *options)
    assert result.returncode == 0, result.stdout + result.stderr
    return project.store, out


def _properties(path: Path) -> dict[str, str]:
    lines = [ln.split("=", 1) for ln in path.read_text().splitlines() if "=" in ln and not ln.startswith("#")]
    return {k.strip(): v.strip() for k, v in lines}


def test_config_is_what_the_runtime_expects(layout) -> None:
    store, out = layout
    props = _properties(out / "config" / "config.properties")
    assert props["inference_address"].endswith(":8085") and props["management_address"].endswith(":8085")
    assert props["metrics_address"].endswith(":8082")
    assert (props["grpc_inference_port"], props["grpc_management_port"]) == ("7070", "7071")
    assert props["model_store"] == "/mnt/models/model-store"
    assert props["install_py_dep_per_model"] == "false"
    assert "service_envelope" not in props and props["enable_envvars_config"] == "false"  # the kservev2 envelope stays off
    assert props["max_response_size"] == props["max_request_size"] == "12500000"  # the largest serve.max_response_mb asked
    assert props["vmargs"] == "-XX:TieredStopAtLevel=1"  # --vmargs: the frontend's quick compiler only
    snapshot = json.loads(props["model_snapshot"])
    assert snapshot["modelCount"] == 2 and sorted(snapshot["models"]) == ["tiny.mlp", "two"]
    tiny = snapshot["models"]["tiny.mlp"]["2.1"]
    assert tiny["marName"] == "tiny_mlp.mar" and (out / "model-store" / "tiny_mlp.mar").is_file()  # one suffix: KServe's wrapper finds it
    two = snapshot["models"]["two"]["1.0"]
    assert two["marName"] == "two" and (out / "model-store" / "two" / "MAR-INF" / "MANIFEST.json").is_file()
    # batch settings as the archives' own model-config.yaml says
    with zipfile.ZipFile(store / "tiny.mlp.mar") as z:
        tiny_config = yaml.safe_load(z.read("model-config.yaml"))
    two_config = yaml.safe_load((store / "two" / "model-config.yaml").read_text())
    for entry, config in ((tiny, tiny_config), (two, two_config)):
        for key in ("batchSize", "maxBatchDelay", "minWorkers", "maxWorkers", "responseTimeout"):
            assert entry[key] == config[key], key
        assert entry["defaultVersion"] is True
    assert (two["batchSize"], two["maxWorkers"], tiny["batchSize"]) == (8, 2, 4)


def test_inference_service_matches_kserve_models(layout) -> None:
    """Parsed into KServe's own V1beta1InferenceService and written back: nothing unknown, nothing lost."""
    from kserve import ApiClient, V1beta1InferenceService
    from kubernetes.client import ApiClient as K8sClient

    _, out = layout
    doc = yaml.safe_load((out / "inferenceservice.yaml").read_text())

    class Response:
        data = json.dumps(doc["spec"])

    spec = ApiClient().deserialize(Response, "V1beta1InferenceServiceSpec")
    meta = K8sClient().deserialize(json.dumps(doc["metadata"]), "V1ObjectMeta", "application/json")
    isvc = V1beta1InferenceService(api_version=doc["apiVersion"], kind=doc["kind"], metadata=meta, spec=spec)
    model = {**doc["spec"]["predictor"]["model"], "name": ""}  # the SDK's default for the container name
    assert ApiClient().sanitize_for_serialization(isvc) == {**doc, "spec": {"predictor": {"model": model}}}
    model = isvc.spec.predictor.model
    assert (model.model_format.name, model.protocol_version, model.storage_uri) == ("pytorch", "v2", "s3://models/marpipe")
    assert model.runtime == "kserve-torchserve" and model.runtime_version == "0.12.0"
    assert re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", isvc.metadata.name) and isvc.metadata.name == "kserve-out"


@pytest.fixture(scope="module")
def served(layout, tmp_path_factory):
    """TorchServe started as KServe's runtime starts it, on OUT/config/config.properties with free loopback ports."""
    store, out = layout
    work = tmp_path_factory.mktemp("kserve-ts")
    for sub in ("logs", "tmp"):
        (work / sub).mkdir()
    http, metrics, grpc_inf, grpc_man = ts.free_ports(4)
    text = (out / "config" / "config.properties").read_text()
    for key, value in (
        ("inference_address", f"http://127.0.0.1:{http}"),
        ("management_address", f"http://127.0.0.1:{http}"),
        ("metrics_address", f"http://127.0.0.1:{metrics}"),
        ("grpc_inference_port", str(grpc_inf)),
        ("grpc_management_port", str(grpc_man)),
    ):
        text, n = re.subn(rf"(?m)^{key}=.*$", f"{key}={value}", text)
        assert n == 1, key
    config = work / "config.properties"
    config.write_text(text)
    env = dict(os.environ, TMPDIR=str(work / "tmp"), TEMP=str(work / "tmp"))  # private: the launcher's pid file lives there
    env.update(LOG_LOCATION=str(work / "logs"), METRICS_LOCATION=str(work / "logs"))
    cmd = [ts._torchserve(), "--start", "--model-store", str(out / "model-store"), "--ts-config", str(config)]
    log = open(work / "logs" / "console.log", "wb")  # noqa: SIM115 (closed below)
    proc = subprocess.Popen(cmd, cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    log.close()
    assert proc.wait(timeout=120) == 0  # `torchserve --start` returns once it has launched the frontend
    frontend = _Daemon(int((work / "tmp" / ".model_server.pid").read_text()), proc.pid)
    ports = {"inference": http, "management": http}
    srv = ts.Server(frontend, work, "127.0.0.1", ports, {"tiny.mlp": "tiny_mlp.mar", "two": "two"}, auth=False)
    try:
        status = ts.wait_ready(srv, 300)
        assert all(s == "READY" for s in status.values()), (status, srv.log_tail(40))
        yield srv, store
    finally:
        ts.stop(srv)  # the frontend and its workers are in the launcher's process group


class _Daemon:
    """The frontend `torchserve --start` leaves running (the launcher's child, not ours): what ts.wait_ready and
    ts.stop use of a Popen. `pid` is the process group to signal (the launcher's), `frontend` the java pid."""

    def __init__(self, frontend: int, group: int) -> None:
        self.frontend, self.pid, self.returncode = frontend, group, None

    def poll(self) -> int | None:
        try:
            os.kill(self.frontend, 0)
        except ProcessLookupError:
            self.returncode = self.returncode if self.returncode is not None else -1
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = time.monotonic() + (timeout if timeout is not None else 1e9)
        while self.poll() is None:
            if time.monotonic() > deadline:
                raise subprocess.TimeoutExpired("torchserve", timeout or 0)
            time.sleep(0.1)
        return self.returncode


def test_the_runtime_starts_the_jvm_with_the_layouts_options(served) -> None:
    srv, _ = served
    args = (Path("/proc") / str(srv.proc.frontend) / "cmdline").read_bytes().decode().split("\0")
    assert args[0].endswith("java") and "-XX:TieredStopAtLevel=1" in args, args


def test_kserve_without_vmargs_leaves_the_jvm_alone(layout, tmp_path: Path) -> None:
    store, _ = layout
    result = marpipe("kserve", "--store", str(store), str(tmp_path / "out"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "vmargs" not in _properties(tmp_path / "out" / "config" / "config.properties")


def test_every_archive_answers_in_the_kserve_layout(served) -> None:
    srv, store = served
    rows = check_archive(srv, "tiny.mlp", store / "tiny.mlp.mar") + check_archive(srv, "two", store / "two")
    assert len(rows) == 4 and all(r["ok"] for r in rows), rows
    described = {m: json.loads(srv.request("management", f"/models/{m}")[2])[0] for m in ("tiny.mlp", "two")}
    assert (described["tiny.mlp"]["batchSize"], described["two"]["batchSize"], described["two"]["maxBatchDelay"]) == (4, 8, 30)
    assert described["tiny.mlp"]["modelVersion"] == "2.1"


def test_every_archive_answers_v2_in_the_kserve_layout(served) -> None:
    """The KServe layout with protocolVersion v2, no envelope: our handler answers `POST /v2/models/{name}/infer`
    itself, every input of the two-input model used."""
    import numpy as np

    from pipeline.store.layout import read_entry
    from pipeline.torchserve.smoke import _npz_bytes, judge

    srv, store = served
    datatypes = {"float32": "FP32", "float16": "FP16", "int64": "INT64", "int32": "INT32", "int8": "INT8", "uint8": "UINT8", "bool": "BOOL"}
    for name, path in (("tiny.mlp", store / "tiny.mlp.mar"), ("two", store / "two")):
        meta = json.loads(read_entry(path, "marpipe.json"))
        inputs, expected = (_npz_bytes(read_entry(path, n)) for n in ("parity_inputs.npz", "parity_outputs.npz"))
        tensors = [
            {"name": k, "shape": list(v.shape), "datatype": datatypes[str(v.dtype)], "data": v.ravel().tolist()} for k, v in inputs.items()
        ]
        body = json.dumps({"id": f"kserve-{name}", "inputs": tensors}).encode()
        code, _, answer = srv.request("inference", f"/v2/models/{name}/infer", body, {"Content-Type": "application/json"})
        assert code == 200, answer
        doc = json.loads(answer)
        assert doc["model_name"] == name and doc["id"] == f"kserve-{name}"
        got = {o["name"]: np.asarray(o["data"]).reshape(o["shape"]) for o in doc["outputs"]}
        worst, why = judge(meta, expected, got)
        assert not why, why
