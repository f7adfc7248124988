"""`marpipe deploy` against one real TorchServe (model API on, token authorization on), step by step:
v1, v2 (the default switches, v1 still listed), a v3 whose answers are wrong (rolled back), v2 again (a
no-op), a v4 directory archive (served; v1 goes beyond --keep 2), refusals, a model that does not load,
and archives registered from a loopback http.server the server downloads from (allowed_urls).

The tests of this module run in order and share the server: each starts from the state the one before left.
"""

from __future__ import annotations

import functools
import hashlib
import http.server
import io
import json
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import Project, marpipe

from pipeline.torchserve import server as ts

pytestmark = pytest.mark.slow
ROWS = np.asarray([[1.0, 2.0, 3.0, 4.0], [0.5, -1.0, 0.0, 2.0]], dtype=np.float32)


def _state(seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {"fc.weight": torch.randn(2, 4, generator=gen), "fc.bias": torch.randn(2, generator=gen)}


def _expected(state: dict[str, torch.Tensor]) -> np.ndarray:
    return ROWS @ state["fc.weight"].numpy().T + state["fc.bias"].numpy()


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict:
    """tiny 1.0, 2.0, 3.0 (answers wrong: other weights, hashes fixed so it verifies), 4.0 as a folder,
    a 2.0 of other weights, a 5.0 whose weights do not load, and other 1.0 for the URL tests."""
    project = Project(tmp_path_factory.mktemp("deploy"))
    out: dict = {"states": {}}
    for version, seed, layout in (("1.0", 1, "mar"), ("2.0", 2, "mar"), ("3.0", 3, "mar"), ("4.0", 4, "dir")):
        project.save(_state(seed), "tiny.pth")
        out["states"][version] = _state(seed)
        store = project.root / f"v{version}"
        spec = project.spec(name="tiny", version=version, serve={"max_batch_delay_ms": 5})
        result = marpipe("build", "--store", str(store), "--layout", layout, str(spec))
        assert result.returncode == 0, result.stdout + result.stderr
        out[version] = store / ("tiny" if layout == "dir" else "tiny.mar")
    out["3.0-wrong"] = _rewrite_entry(out["3.0"], project.root / "wrong" / "tiny.mar", "weights.pt", _saved(_state(33)))
    out["2.0-other"] = _rewrite_entry(out["2.0"], project.root / "other2" / "tiny.mar", "weights.pt", _saved(_state(22)))
    broken = _rewrite_entry(out["3.0"], project.root / "broken" / "tiny.mar", "weights.pt", b"not a checkpoint")
    out["5.0-broken"] = _rewrite_entry(broken, project.root / "broken5" / "tiny.mar", "MAR-INF/MANIFEST.json", None, version="5.0")
    project.save(_state(7), "tiny.pth")
    result = marpipe("build", "--store", str(project.root / "other"), str(project.spec(name="other", version="1.0")))
    assert result.returncode == 0, result.stdout + result.stderr
    out["other"] = project.root / "other" / "other.mar"
    return out


def _saved(state: dict) -> bytes:
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


def _rewrite_entry(src: Path, dst: Path, entry: str, data: bytes | None, version: str | None = None) -> Path:
    """A copy of an archive with one entry replaced and marpipe.json's hash of it fixed, so `verify` passes
    (an archive that is sound as a file, but answers wrong or does not load). `version`: a new manifest version."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(src) as z:
        entries = {i.filename: z.read(i.filename) for i in z.infolist()}
    if data is not None:
        entries[entry] = data
    if version:
        manifest = json.loads(entries["MAR-INF/MANIFEST.json"])
        manifest["model"]["modelVersion"] = version
        entries["MAR-INF/MANIFEST.json"] = json.dumps(manifest).encode()
    meta = json.loads(entries["marpipe.json"])
    meta["files"] = {n: hashlib.sha256(entries[n]).hexdigest() for n in meta["files"]}
    entries["marpipe.json"] = json.dumps(meta).encode()
    with zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as out:
        for name, content in entries.items():
            out.writestr(name, content)
    return dst


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def web(tmp_path_factory):
    """A loopback http.server over a folder: the place archives are published for --url-base."""
    root = tmp_path_factory.mktemp("published")
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(root)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield root, f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.fixture(scope="module")
def server(tmp_path_factory, web):
    """TorchServe with no model, the model API on, tokens on, allowed to download from the web folder."""
    store = tmp_path_factory.mktemp("server_store")
    srv = ts.start(store, [], auth=True, model_api=True, allowed_urls=[f"{web[1]}/.*"])
    try:
        ts.wait_ready(srv, 180)
        yield srv, store
    finally:
        ts.stop(srv)


def _deploy(server, *archives: Path, token: bool = True, extra: tuple[str, ...] = ()):
    srv, store = server
    args = ["deploy", *map(str, archives), "--management", srv.url("management", ""), "--inference", srv.url("inference", "")]
    args += ["--model-store", str(store)] if "--url-base" not in extra else []
    args += ["--token-file", str(srv.workdir / "key_file.json")] if token else []
    return marpipe(*args, *extra, timeout=600)


def _versions(srv: ts.Server, name: str = "tiny") -> tuple[str, list[str]]:
    default = json.loads(srv.request("management", f"/models/{name}")[2])[0]["modelVersion"]
    every = sorted(v["modelVersion"] for v in json.loads(srv.request("management", f"/models/{name}/all")[2]))
    return default, every


def _answer(srv: ts.Server, path: str = "/predictions/tiny") -> np.ndarray:
    body = json.dumps({"inputs": {"x": ROWS.tolist()}}).encode()
    code, _, body = srv.request("inference", path, body, {"Content-Type": "application/json"})
    assert code == 200, body
    return np.asarray(json.loads(body)["outputs"]["output"], dtype=np.float32)


def _store_names(store: Path) -> list[str]:
    return sorted(p.name for p in store.iterdir() if not p.name.startswith("."))


def test_deploy_v1_on_an_empty_server(server, built, tmp_path) -> None:
    srv, store = server
    report = tmp_path / "report.json"
    result = _deploy(server, built["1.0"], extra=("--report", str(report)))
    assert result.returncode == 0, result.stdout + result.stderr
    assert _versions(srv) == ("1.0", ["1.0"])
    np.testing.assert_allclose(_answer(srv), _expected(built["states"]["1.0"]), rtol=1e-5, atol=1e-5)
    sha = hashlib.sha256(built["1.0"].read_bytes()).hexdigest()
    assert _store_names(store) == [f"tiny-1.0-{sha[:12]}.mar"]
    changes = json.loads(report.read_text())["changes"]
    assert [(c["model"], c["version"], c["action"]) for c in changes] == [("tiny", "1.0", "deployed")]
    assert "deployed" in result.stdout and "live check ok" in result.stderr


def test_deploy_v2_switches_the_default_and_keeps_v1(server, built) -> None:
    srv, _ = server
    result = _deploy(server, built["2.0"])
    assert result.returncode == 0, result.stdout + result.stderr
    assert _versions(srv) == ("2.0", ["1.0", "2.0"])
    np.testing.assert_allclose(_answer(srv), _expected(built["states"]["2.0"]), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(_answer(srv, "/predictions/tiny/1.0"), _expected(built["states"]["1.0"]), rtol=1e-5, atol=1e-5)
    assert "default (was 1.0)" in result.stdout


def test_a_wrong_v3_is_rolled_back(server, built) -> None:
    srv, store = server
    before = _store_names(store)
    log = srv.workdir / "logs" / "ts_log.log"
    offset = log.stat().st_size
    result = _deploy(server, built["3.0-wrong"])
    assert result.returncode == 5, result.stdout + result.stderr
    errors = [ln for ln in result.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "answers wrong" in errors[0] and "rolled back" in errors[0] and "default stays 2.0" in errors[0], errors
    assert _versions(srv) == ("2.0", ["1.0", "2.0"])
    np.testing.assert_allclose(_answer(srv), _expected(built["states"]["2.0"]), rtol=1e-5, atol=1e-5)
    assert _store_names(store) == before  # its file is gone from the store
    code, _, _ = srv.request("inference", "/predictions/tiny/3.0", ROWS.tobytes(), {"Content-Type": "application/x-npz"})
    assert code == 404
    sequence = [ln for ln in log.read_bytes()[offset:].decode(errors="replace").splitlines() if "tiny" in ln]
    print("ts_log.log during the rollback:\n" + "\n".join(sequence))
    assert any("Model tiny loaded" in ln for ln in sequence) and any("Model tiny unregistered" in ln for ln in sequence)


def test_deploying_the_default_again_is_a_no_op(server, built, tmp_path) -> None:
    srv, store = server
    before = (_versions(srv), _store_names(store))
    report = tmp_path / "report.json"
    result = _deploy(server, built["2.0"], extra=("--report", str(report)))
    assert result.returncode == 0, result.stdout + result.stderr
    assert (_versions(srv), _store_names(store)) == before
    assert [c["action"] for c in json.loads(report.read_text())["changes"]] == ["no-op"]


def test_refusals_change_nothing(server, built) -> None:
    """No token (exit 6), and another archive claiming the registered version 2.0 (exit 6)."""
    srv, store = server
    before = (_versions(srv), _store_names(store))
    result = _deploy(server, built["1.0"], token=False)
    assert result.returncode == 6 and "token refused" in result.stderr, result.stderr
    result = _deploy(server, built["2.0-other"])
    assert result.returncode == 6 and "already registered from" in result.stderr and "new version" in result.stderr, result.stderr
    assert (_versions(srv), _store_names(store)) == before


def test_a_model_that_does_not_load_is_rolled_back(server, built) -> None:
    srv, store = server
    before = (_versions(srv), _store_names(store))
    result = _deploy(server, built["5.0-broken"], extra=("--timeout", "120"))
    assert result.returncode == 5, result.stdout + result.stderr
    assert "did not load" in result.stderr or "not READY" in result.stderr, result.stderr
    assert (_versions(srv), _store_names(store)) == before, result.stderr
    np.testing.assert_allclose(_answer(srv), _expected(built["states"]["2.0"]), rtol=1e-5, atol=1e-5)


def test_a_directory_archive_is_deployed_and_v1_goes_beyond_keep(server, built) -> None:
    srv, store = server
    result = _deploy(server, built["4.0"], extra=("--keep", "2"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert _versions(srv) == ("4.0", ["2.0", "4.0"])
    np.testing.assert_allclose(_answer(srv), _expected(built["states"]["4.0"]), rtol=1e-5, atol=1e-5)
    names = _store_names(store)
    assert len(names) == 2 and not any(n.startswith("tiny-1.0-") for n in names)
    folder = next(store / n for n in names if n.startswith("tiny-4.0-"))
    assert folder.is_dir() and (folder / "MAR-INF" / "MANIFEST.json").is_file()
    assert "unregistered" in result.stdout and "beyond --keep 2" in result.stdout


def test_registering_from_urls_the_server_downloads(server, built, web) -> None:
    srv, store = server
    root, base = web
    sha = hashlib.sha256(built["other"].read_bytes()).hexdigest()
    name = f"other-1.0-{sha[:12]}.mar"
    result = _deploy(server, built["other"], extra=("--url-base", base))
    assert result.returncode == 6 and f"{base}/{name}: HTTP 404" in result.stderr, result.stderr  # not published yet
    (root / name).write_bytes(built["other"].read_bytes())
    elsewhere = base.replace("127.0.0.1", "localhost")  # the same server, but not matching allowed_urls
    result = _deploy(server, built["other"], extra=("--url-base", elsewhere))
    assert result.returncode == 6 and "does not match any allowed URL" in result.stderr, result.stderr
    result = _deploy(server, built["other"], extra=("--url-base", base, "--workers", "2"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert _versions(srv, "other") == ("1.0", ["1.0"])
    assert (store / name).is_file()  # TorchServe saved the download under the URL's file name
    described = json.loads(srv.request("management", "/models/other")[2])[0]
    assert described["modelUrl"] == f"{base}/{name}"
    # the archive's model-config.yaml says 1 worker, which TorchServe prefers to initial_workers: deploy scaled it
    assert [w["status"] for w in described["workers"]] == ["READY", "READY"]
    np.testing.assert_allclose(_answer(srv, "/predictions/other"), _expected(_state(7)), rtol=1e-5, atol=1e-5)
