"""A real TorchServe 0.12 on loopback serving every example in every format, plus the test models.

One server for the module (token authorization on, as in production; model API off). Stopped afterwards
even when a test fails.
"""

from __future__ import annotations

import io
import json
import sys
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, Project, marpipe, serving, start_serve

from pipeline.spec.spec import load_spec
from pipeline.stages import inputs as gen
from pipeline.stages import load
from pipeline.torchserve import server as ts

pytestmark = pytest.mark.slow
EXAMPLES = ROOT / "examples"
FORMATS = ("eager", "torchscript", "onnx")  # aoti is served in tests/test_aoti.py


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    sys.path.insert(0, str(EXAMPLES))
    import make_checkpoints

    make_checkpoints.main(EXAMPLES / "checkpoints")
    project = Project(tmp_path_factory.mktemp("serving"))
    examples = sorted(p for p in EXAMPLES.glob("*.yaml") if p.stem != "bert")  # the BERT example: tests/test_models.py
    result = project.build("--format", ",".join(FORMATS), *examples)
    assert result.returncode == 0, result.stdout + result.stderr
    project.save(project.model("Linear").state_dict(), "tiny.pth")
    two, dict_out = project.multi_io_specs()
    batched = project.spec(name="batched", serve={"batch_size": 8, "max_batch_delay_ms": 300, "max_rows": 16})
    result = project.build("--format", ",".join(FORMATS), two, dict_out)
    assert result.returncode == 0, result.stdout + result.stderr
    assert project.build(batched).returncode == 0
    return project.store


@pytest.fixture(scope="module")
def server(store: Path):
    yield from serving(store, auth=True)


def _meta(archive: Path) -> dict:
    with zipfile.ZipFile(archive) as z:
        return json.loads(z.read("marpipe.json"))


def _eager(store: Path, name: str):
    """The eager model and spec, rebuilt from the archive's own source spec and checkpoint."""
    meta = _meta(store / f"{name}.mar")
    base = name.rsplit("_", 1)[0]
    spec_path = EXAMPLES / f"{base}.yaml" if (EXAMPLES / f"{base}.yaml").exists() else store.parent / f"{base}.yaml"
    spec = load_spec(spec_path)
    return load.run(spec).model, spec, meta


def _post(server: ts.Server, name: str, body: bytes, ctype: str, accept: str | None = None, auth: bool = True):
    headers = {"Content-Type": ctype}
    if accept:
        headers["Accept"] = accept
    return server.request("inference", f"/predictions/{name}", body, headers, auth=auth)


def _npz(arrays: dict) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def _served_names(store: Path) -> list[str]:
    return sorted(p.stem for p in store.glob("*.mar") if p.stem != "batched")


def test_every_archive_answers_like_eager(server: ts.Server, store: Path) -> None:
    names = _served_names(store)
    assert len(names) == 18  # 4 examples and 2 test models, in 3 formats
    for name in names:
        model, spec, meta = _eager(store, name)
        dims = {"batch": 3, **{d: v[-1] for d, v in spec.dims.items()}}
        tensors = gen.make(spec, dims, seed=123)
        with torch.inference_mode():
            from handlers.marpipe_serving.models import name_outputs

            expected = name_outputs(model(*tensors.values()), [o["name"] for o in meta["outputs"]])
        arrays = {k: v.numpy() for k, v in tensors.items()}
        body = json.dumps({"inputs": {k: v.tolist() for k, v in arrays.items()}}).encode()
        code, _, body = _post(server, name, body, "application/json", "application/json; raw=true")  # tensors, not labels
        assert code == 200, (name, body)
        got_json = json.loads(body)["outputs"]
        code, headers, body = _post(server, name, _npz(arrays), "application/x-npz", "application/x-npz")
        assert code == 200, (name, body)
        with np.load(io.BytesIO(body), allow_pickle=False) as npz:
            got_npz = {k: npz[k] for k in npz.files}
        for out, ref in expected.items():
            atol, rtol = spec.tolerance(out)
            np.testing.assert_allclose(np.asarray(got_json[out], dtype=ref.dtype), ref, atol=atol, rtol=rtol, err_msg=f"{name}/{out} json")
            np.testing.assert_allclose(got_npz[out], ref, atol=atol, rtol=rtol, err_msg=f"{name}/{out} npz")


def test_readme_example_request(server: ts.Server) -> None:
    body = json.dumps({"inputs": {"x": [[0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]]}}).encode()
    code, _, answer = _post(server, "simplenet_eager", body, "application/json")
    assert code == 200
    assert list(json.loads(answer)) == ["outputs"] and len(json.loads(answer)["outputs"]["y"]) == 1


def _batched_expected(store: Path, rows: list[list[float]]) -> np.ndarray:
    state = torch.load(store.parent / "tiny.pth", weights_only=True)
    return np.asarray(rows, dtype=np.float32) @ state["fc.weight"].numpy().T + state["fc.bias"].numpy()


def test_a_batch_mixing_good_and_malformed_requests(server: ts.Server, store: Path) -> None:
    """Sent at once, these land in one TorchServe batch (max_batch_delay 300 ms); only the bad ones fail."""
    good = [[[float(i), 1.0, 2.0, 3.0]] for i in range(5)]
    bad = [b'{"inputs": {"x": [[1, 2]]}}', b"not json", b'{"inputs": {"y": [[1, 2, 3, 4]]}}']
    jobs = [(json.dumps({"inputs": {"x": g}}).encode(), g) for g in good] + [(b, None) for b in bad]
    with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        answers = list(pool.map(lambda j: _post(server, "batched", j[0], "application/json"), jobs))
    for (_, rows), (code, _, answer) in zip(jobs, answers):
        if rows is None:
            assert code == 400 and "error" in json.loads(answer), answer
        else:
            assert code == 200, answer
            np.testing.assert_allclose(json.loads(answer)["outputs"]["output"], _batched_expected(store, rows), rtol=1e-6, atol=1e-6)


def test_unauthenticated_request_is_refused(server: ts.Server) -> None:
    code, _, body = _post(server, "simplenet_eager", b"[[0,0,0,0,0,0,0,0,0,0]]", "application/json", auth=False)
    assert code in (400, 401, 403)
    assert b"Token Authorization failed" in body


def test_registering_a_model_over_the_api_is_refused(server: ts.Server, store: Path) -> None:
    before = json.loads(server.request("management", "/models")[2])
    code, _, body = server.request("management", "/models?url=simplenet_eager.mar&model_name=intruder", b"", method="POST")
    assert code >= 400, body
    after = json.loads(server.request("management", "/models")[2])
    assert after == before and "intruder" not in json.dumps(after)


def _worker_pids(server: ts.Server, name: str) -> list[int]:
    return sorted(w["pid"] for w in json.loads(server.request("management", f"/models/{name}")[2])[0]["workers"])


def test_bad_requests_under_load(server: ts.Server, store: Path) -> None:
    """A bounded load (240 requests, 8 clients): every good answer right, every bad one 4xx, no worker restart."""
    pids = _worker_pids(server, "batched")
    rows = [[1.0, 2.0, 3.0, 4.0], [0.5, -1.0, 0.0, 2.0]]
    kinds = {
        "good": (json.dumps({"inputs": {"x": rows}}).encode(), "application/json", 200),
        "good_npz": (_npz({"x": np.asarray(rows, dtype=np.float32)}), "application/x-npz", 200),
        "bad_json": (b'{"inputs": {"x": [[1, 2, 3, 4]]', "application/json", 400),
        "wrong_shape": (json.dumps({"inputs": {"x": [[1, 2, 3]]}}).encode(), "application/json", 400),
        "wrong_dtype": (json.dumps({"inputs": {"x": [["a", "b", "c", "d"]]}}).encode(), "application/json", 400),
        "too_many_rows": (json.dumps({"inputs": {"x": [[0, 0, 0, 0]] * 17}}).encode(), "application/json", 413),
        "oversized": (b"", "application/json", 413),
    }
    plan = [k for k in kinds for _ in range(240 // len(kinds))]
    expected = _batched_expected(store, rows)

    def send(kind: str) -> tuple[str, int, bytes]:
        if kind == "oversized":
            return kind, _oversized(server, "batched", 10_000_000), b""
        body, ctype, _ = kinds[kind]
        accept = "application/x-npz" if kind == "good_npz" else None
        code, _, answer = _post(server, "batched", body, ctype, accept)
        return kind, code, answer

    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(send, plan))
    failures = []
    for kind, code, answer in results:
        if code != kinds[kind][2]:
            failures.append((kind, code, answer[:100]))
        elif kind == "good":
            np.testing.assert_allclose(json.loads(answer)["outputs"]["output"], expected, rtol=1e-6, atol=1e-6)
        elif kind == "good_npz":
            with np.load(io.BytesIO(answer), allow_pickle=False) as npz:
                np.testing.assert_allclose(npz["output"], expected, rtol=1e-6, atol=1e-6)
    assert not failures, failures[:5]
    assert _worker_pids(server, "batched") == pids
    print(f"load: {len(results)} requests, {sum(k.startswith('good') for k in plan)} good, 0 unexpected answers, worker pids unchanged")


def _oversized(server: ts.Server, name: str, size: int) -> int:
    """Announce a body over TorchServe's max_request_size: it answers before reading it (100-continue)."""
    import http.client

    conn = http.client.HTTPConnection(server.host, server.ports["inference"], timeout=30)
    try:
        conn.putrequest("POST", f"/predictions/{name}")
        for key, value in (
            ("Content-Type", "application/json"),
            ("Content-Length", str(size)),
            ("Expect", "100-continue"),
            ("Authorization", f"Bearer {server.key('inference')}"),
        ):
            conn.putheader(key, value)
        conn.endheaders()
        return conn.getresponse().status
    finally:
        conn.close()


def test_smoke_command_on_the_store(store: Path) -> None:
    result = marpipe("smoke", "--store", str(store), timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    raw = 2 * 3  # the cifar example in 3 formats replays a PNG and a JPEG request
    assert result.stdout.count(" ok ") == 2 * len(list(store.glob("*.mar"))) + raw


def test_smoke_fails_on_a_wrong_answer_and_a_model_that_does_not_load(store: Path, tmp_path: Path) -> None:
    bad_store = tmp_path / "store"
    bad_store.mkdir()
    (bad_store / "simplenet_eager.mar").write_bytes((store / "simplenet_eager.mar").read_bytes())
    _rewrite(
        store / "simplenet_onnx.mar",
        bad_store / "simplenet_onnx.mar",
        "parity_outputs.npz",
        lambda d: _npz({"y": np.zeros((4, 1), dtype=np.float32) + 9}),
    )
    _rewrite(store / "simplenet_torchscript.mar", bad_store / "simplenet_torchscript.mar", "model.pt", lambda d: b"garbage")
    result = marpipe("smoke", "--store", str(bad_store), "--timeout", "90", timeout=600)
    assert result.returncode == 5, result.stdout + result.stderr
    lines = {ln.split()[0] + " " + ln.split()[2]: ln for ln in result.stdout.splitlines()[1:]}
    assert " ok " in lines["simplenet_eager json"] and " ok " in lines["simplenet_eager npz"]
    assert "FAIL" in lines["simplenet_onnx json"] and "max abs" in lines["simplenet_onnx json"]
    assert any("simplenet_torchscript" in ln and "not READY" in ln for ln in result.stdout.splitlines())


def _rewrite(src: Path, dst: Path, entry: str, change) -> None:
    with zipfile.ZipFile(src) as z, zipfile.ZipFile(dst, "w") as out:
        for info in z.infolist():
            data = z.read(info.filename)
            out.writestr(info.filename, change(data) if info.filename == entry else data)


def test_marpipe_serve_is_closed_by_default(store: Path, tmp_path: Path) -> None:
    """`marpipe serve` as an operator runs it: tokens on, key file announced, unauthenticated calls refused."""
    import signal

    one = tmp_path / "store"
    one.mkdir()
    (one / "simplenet_eager.mar").write_bytes((store / "simplenet_eager.mar").read_bytes())
    port = ts.free_ports(1)[0]
    workdir = tmp_path / "serve"
    proc, text = start_serve(one, port, workdir, f"--vmargs={ts.QUICK_JIT}", timeout=240)
    try:
        assert "READY" in text and f"keys in {workdir / 'key_file.json'}" in text, text
        assert "gRPC: inference 127.0.0.1:" in text and "own gRPC on loopback only: inference 127.0.0.1:" in text, text
        config = (workdir / "config.properties").read_text()
        for setting in (
            "inference_address=http://127.0.0.1:",
            "grpc_inference_address=127.0.0.1",
            "ts_open_inference_protocol=true",
            "disable_token_authorization=false",
            "enable_model_api=false",
            "install_py_dep_per_model=false",
            "load_models=simplenet_eager.mar",
            "vmargs=-XX:TieredStopAtLevel=1",
        ):
            assert setting in config
        frontend = _java_cmdline(f"-Djava.io.tmpdir={workdir.resolve() / 'tmp'}")
        assert "-XX:TieredStopAtLevel=1" in frontend, frontend  # TorchServe handed the option to its JVM
        import urllib.error
        import urllib.request

        req = urllib.request.Request(
            f"http://127.0.0.1:{port}/predictions/simplenet_eager",
            data=b"[[0,0,0,0,0,0,0,0,0,0]]",
            headers={"Content-Type": "application/json"},
        )
        try:
            urllib.request.urlopen(req, timeout=30)
            raise AssertionError("an unauthenticated request was answered")
        except urllib.error.HTTPError as exc:
            assert exc.code in (400, 401, 403)
        key = json.loads((workdir / "key_file.json").read_text())["inference"]["key"]
        req.add_header("Authorization", f"Bearer {key}")
        with urllib.request.urlopen(req, timeout=30) as resp:
            assert resp.status == 200
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0


def _java_cmdline(marker: str) -> list[str]:
    """The arguments of the running java process whose command line holds `marker`."""
    for proc in Path("/proc").iterdir():
        try:
            args = (proc / "cmdline").read_bytes().decode().split("\0")
        except OSError:
            continue
        if args[0].endswith("java") and marker in args:
            return args
    raise AssertionError(f"no java process with {marker}")


def test_jvm_options_are_none_by_default_and_one_line(tmp_path: Path) -> None:
    ports = dict.fromkeys(("inference", "management", "metrics", "grpc_inference", "grpc_management"), 1)
    assert "vmargs" not in ts.config_text(tmp_path, [], "127.0.0.1", ports, True, False)
    assert "vmargs" not in ts.config_text(tmp_path, [], "127.0.0.1", ports, True, False, vmargs=" ")
    text = ts.config_text(tmp_path, [], "127.0.0.1", ports, True, False, vmargs=ts.QUICK_JIT)
    assert "vmargs=-XX:TieredStopAtLevel=1" in text.splitlines()
    text = ts.config_text(tmp_path, [], "127.0.0.1", ports, True, False, vmargs="-Xmx2g\nenable_model_api=true")
    assert "vmargs=-Xmx2g enable_model_api=true" in text.splitlines()  # a newline cannot start a setting of its own
    assert "enable_model_api=true" not in text.splitlines()
