"""Models as users have them, served by a real TorchServe: a tiny BERT from a sharded save_pretrained folder in
every format, factories, a 3x224x224 image model; `marpipe smoke` on them, padded requests, SIGTERM to `serve`.

One build for the module: the BERT archives go to their own store, which `marpipe serve` serves (the last test
stops it with SIGTERM); `marpipe smoke` checks the others (and the .bin-sharded BERT) with its own server.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import ROOT, Project, marpipe, start_serve
from hf_models import bert_inputs, make_example, tiny_bert, to_bin_shards

from pipeline.torchserve import server as ts

pytestmark = pytest.mark.slow
BERT_INPUTS = [
    {"name": "input_ids", "shape": ["batch", "seq"], "dtype": "int64", "range": [0, 1000]},
    {"name": "attention_mask", "shape": ["batch", "seq"], "dtype": "int64", "range": [0, 2], "generate": "padding_mask"},
]
NEEDS_DEP = """import fakedep
from torch import nn


class Scaled(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(x) * fakedep.SCALE
"""


def _write(project: Project, name: str, doc: dict) -> Path:
    path = project.root / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"name": name, **doc}, sort_keys=False))
    return path


def _fake_distribution(site: Path) -> None:
    """An installed distribution `fakedep` 1.2.3, on the build's PYTHONPATH only (TorchServe will not have it)."""
    (site / "fakedep").mkdir(parents=True)
    (site / "fakedep" / "__init__.py").write_text("SCALE = 2.0\n")
    info = site / "fakedep-1.2.3.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: fakedep\nVersion: 1.2.3\n")
    (info / "top_level.txt").write_text("fakedep\n")


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Project:
    project = Project(tmp_path_factory.mktemp("models"))
    root = project.root
    # the Hugging Face example as `make build` makes it: its script writes the sharded folder, its spec builds it
    make_example(root / "checkpoints" / "bert")
    shutil.copy(ROOT / "examples" / "bert.yaml", root / "bert.yaml")
    result = marpipe("build", "--store", str(root / "bert_store"), "--format", "eager,torchscript,onnx", str(root / "bert.yaml"))
    assert result.returncode == 0, result.stdout + result.stderr
    to_bin_shards(root / "checkpoints" / "bert", root / "bert_bin")
    bert = {
        "architecture": {"transformers": "bert_bin"},
        "inputs": BERT_INPUTS,
        "dims": {"seq": [8, 16]},
        "parity": {"atol": 1e-4, "rtol": 1e-3},
    }
    print(result.stdout)

    shutil.copy(ROOT / "tests" / "models" / "factories.py", root / "models" / "factories.py")
    (root / "models" / "needsdep.py").write_text(NEEDS_DEP)
    _fake_distribution(root / "site")
    sys.path.insert(0, str(root / "models"))
    try:
        import factories
    finally:
        sys.path.remove(str(root / "models"))
    torch.manual_seed(0)
    project.save(factories.make_mlp().state_dict(), "mlp.pth")
    project.save(torch.nn.Linear(4, 2).state_dict(), "linear.pth")  # also fits needsdep's Scaled (its only weights: fc)
    project.save({f"fc.{k}": v for k, v in torch.nn.Linear(4, 2).state_dict().items()}, "scaled.pth")
    project.save(project.model("ImagePool").state_dict(), "img.pth")
    x4 = [{"name": "x", "shape": ["batch", 4]}]
    specs = [
        _write(project, "bertbin", bert),
        _write(
            project,
            "img224",
            {
                "architecture": {"file": "models/tiny.py", "class": "ImagePool"},
                "checkpoint": {"path": "img.pth"},
                "inputs": [{"name": "image", "shape": ["batch", 3, 224, 224]}],
            },
        ),
        _write(
            project,
            "mlp",
            {
                "architecture": {"factory": "factories:make_mlp"},
                "checkpoint": {"path": "mlp.pth"},
                "inputs": x4,
                "serve": {"extra_files": ["models/factories.py"]},
            },
        ),
        _write(
            project,
            "linear",
            {
                "architecture": {"factory": "torch.nn:Linear", "kwargs": {"in_features": 4, "out_features": 2}},
                "checkpoint": {"path": "linear.pth"},
                "inputs": [{"name": "input", "shape": ["batch", 4]}],
            },
        ),
        _write(
            project,
            "needsdep",
            {"architecture": {"file": "models/needsdep.py", "class": "Scaled"}, "checkpoint": {"path": "scaled.pth"}, "inputs": x4},
        ),
    ]
    env = {"PYTHONPATH": os.pathsep.join([str(ROOT), str(root / "models"), str(root / "site")])}
    result = project.build(*specs, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    print(result.stdout)
    return project


def test_every_bert_format_built_from_the_sharded_folder(project: Project) -> None:
    import zipfile

    for archive in [*sorted((project.root / "bert_store").glob("*.mar")), project.store / "bertbin.mar"]:
        with zipfile.ZipFile(archive) as z:
            meta = json.loads(z.read("marpipe.json"))
            assert "config.json" in z.namelist()
        assert meta["call"] == "keyword" and meta["architecture"]["source"] == "transformers"
        assert meta["inputs"][1]["generate"] == "padding_mask"
        assert len(meta["checkpoint"]["files"]) >= 4  # the index and its shards, each with its sha256
        assert all(r["passed"] for r in meta["parity"]["outputs"].values())
        eager, texts = meta["format"] == "eager", meta["text"] is not None  # the example takes text; bertbin does not
        assert [r["name"] for r in meta["requirements"]] == (["transformers"] if eager else []) + (["tokenizers"] if texts else [])
        assert ("requirements.txt" in z.namelist()) == (eager or texts)


def test_smoke_on_models_as_users_have_them(project: Project) -> None:
    """Every archive answers like eager over npz and JSON (the 224x224 batch split to fit 6.5 MB); the archive
    whose requirement is missing on the server fails to load, and smoke names package and version."""
    result = marpipe("smoke", "--store", str(project.store), "--timeout", "300", timeout=900)
    print(result.stdout, result.stderr[-3000:])
    assert result.returncode == 5, result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr.split("\n")[-2]
    lines = {(ln.split()[0], ln.split()[2]): ln for ln in result.stdout.splitlines()[1:] if len(ln.split()) > 3}
    names = sorted(p.stem for p in project.store.glob("*.mar") if p.stem != "needsdep")
    for name in names:
        for body in ("npz", "json"):
            assert " ok " in lines[(name, body)], lines[(name, body)]
    with zipfile.ZipFile(project.store / "img224.mar") as z:  # the parity batch of 4 rows is 2.4 MB: over the bound
        assert np.load(io.BytesIO(z.read("parity_inputs.npz")))["image"].shape == (2, 3, 224, 224)
    failed = next(ln for ln in result.stdout.splitlines() if ln.startswith("needsdep"))
    assert "not READY: load failed: " in failed and "MissingRequirementError" in failed and "fakedep==1.2.3" in failed, failed


@pytest.fixture(scope="module")
def serving(project: Project):
    """`marpipe serve` on the BERT archives, as an operator runs it; stopped by the SIGTERM test (or here)."""
    store = project.root / "bert_store"
    assert len(list(store.glob("*.mar"))) == 3
    port = ts.free_ports(1)[0]
    workdir = project.root / "serve"
    proc, text = start_serve(store, port, workdir)
    try:
        assert "serving; Ctrl-C stops" in text, text
        key = json.loads((workdir / "key_file.json").read_text())["inference"]["key"]
        yield proc, port, key
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=60)


RAW = "application/json; raw=true"  # the logits themselves, not the labels the example answers with


def _post(port: int, key: str, name: str, body: bytes, ctype: str, accept: str | None = None) -> tuple[int, bytes]:
    import urllib.error
    import urllib.request

    headers = {"Content-Type": ctype, "Authorization": f"Bearer {key}", **({"Accept": accept} if accept else {})}
    req = urllib.request.Request(f"http://127.0.0.1:{port}/predictions/{name}", data=body, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


@pytest.mark.parametrize("fmt", ["eager", "torchscript", "onnx"])
def test_padded_requests_answer_like_the_eager_model(project: Project, serving, fmt: str) -> None:
    _, port, key = serving
    reference = tiny_bert()
    lengths = [12, 7, 3, 1]
    padded = bert_inputs(lengths, 12, seed=5)
    with torch.inference_mode():
        expected = reference(**padded).logits.numpy()
    arrays = {k: v.numpy() for k, v in padded.items()}
    body = json.dumps({"inputs": {k: v.tolist() for k, v in arrays.items()}}).encode()
    code, body = _post(port, key, f"bert_{fmt}", body, "application/json", RAW)
    assert code == 200, body
    np.testing.assert_allclose(np.asarray(json.loads(body)["outputs"]["logits"]), expected, atol=1e-4, rtol=1e-3)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    code, body = _post(port, key, f"bert_{fmt}", buf.getvalue(), "application/x-npz", "application/x-npz")
    assert code == 200, body
    with np.load(io.BytesIO(body), allow_pickle=False) as npz:
        np.testing.assert_allclose(npz["logits"], expected, atol=1e-4, rtol=1e-3)
    # padding changes nothing: each row alone, unpadded, gets the same answer
    for i, n in enumerate(lengths):
        alone = {k: v[i : i + 1, :n].tolist() for k, v in arrays.items()}
        code, body = _post(port, key, f"bert_{fmt}", json.dumps({"inputs": alone}).encode(), "application/json", RAW)
        assert code == 200, body
        np.testing.assert_allclose(np.asarray(json.loads(body)["outputs"]["logits"])[0], expected[i], atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("fmt", ["eager", "onnx"])
def test_text_requests_answer_labels_like_eager(project: Project, serving, fmt: str) -> None:
    """The example's clients send text: tokenized by the folder's tokenizer.json, answered with the config's labels."""
    from tokenizers import Tokenizer

    _, port, key = serving
    tok = Tokenizer.from_file(str(project.root / "checkpoints" / "bert" / "tokenizer.json"))
    texts = ["The movie was GREAT!", "boring plot, bad acting and a slow ending", "fun"]
    reference, expected = tiny_bert(), []
    for text in texts:
        ids = torch.tensor([tok.encode(text).ids])  # unpadded, one at a time
        with torch.inference_mode():
            expected.append(torch.softmax(reference(input_ids=ids, attention_mask=torch.ones_like(ids)).logits, -1)[0].numpy())
    code, body = _post(port, key, f"bert_{fmt}", json.dumps({"inputs": {"text": texts}}).encode(), "application/json")
    assert code == 200, body
    code2, body2 = _post(port, key, f"bert_{fmt}", texts[1].encode(), "text/plain")
    assert code2 == 200, body2
    for row, want in zip([*json.loads(body)["outputs"]["logits"], *json.loads(body2)["outputs"]["logits"]], [*expected, expected[1]]):
        order = np.argsort(-want)
        assert [r["label"] for r in row] == [("negative", "neutral", "positive")[i] for i in order]
        np.testing.assert_allclose([r["score"] for r in row], want[order], atol=1e-4)


def test_range_stays_the_rule_for_requests(serving) -> None:
    _, port, key = serving
    arrays = {k: v.tolist() for k, v in bert_inputs([4, 2], 4).items()}
    arrays["attention_mask"][0][0] = 2
    code, body = _post(port, key, "bert_eager", json.dumps({"inputs": arrays}).encode(), "application/json")
    assert code == 400 and b"attention_mask" in body and b"[0, 2)" in body, body


def _children(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rpartition(")")[2].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                out.append(int(entry.name))
    return out


def test_sigterm_stops_torchserve_its_jvm_and_workers(serving) -> None:
    """What CI and process managers send: marpipe exits, and nothing of TorchServe's process group is left."""
    proc, port, _ = serving
    launchers = _children(proc.pid)
    assert len(launchers) == 1
    group = os.getpgid(launchers[0])
    assert len(ts._group(group)) >= 3  # the launcher, the JVM and at least one worker
    start = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0
    took = time.monotonic() - start
    left = ts._group(group)
    assert not left, f"left running: {left}"
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0, "the port still answers"
    assert "stopping TorchServe (SIGTERM)" in proc.stderr.read()
    print(f"marpipe serve stopped TorchServe in {took:.1f} s after SIGTERM; nothing left in process group {group}")


BLOCKED = """
import json, sys
sys.modules["transformers"] = None  # any import of it now fails
import numpy as np
from marpipe_serving.models import load_runner
from marpipe_serving.npz import read_npz
meta = json.load(open("marpipe.json"))
runner = load_runner(".", meta, "cpu")
inputs = read_npz(open("parity_inputs.npz", "rb").read())
expected = read_npz(open("parity_outputs.npz", "rb").read())
got = runner(inputs)
print(json.dumps({k: float(np.abs(got[k] - v).max()) for k, v in expected.items()}))
"""


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_torchscript_and_onnx_archives_need_no_transformers(project: Project, tmp_path: Path, fmt: str) -> None:
    """Loaded as TorchServe loads them (the archive's folder on sys.path), with transformers made unimportable."""
    import zipfile

    with zipfile.ZipFile(project.root / "bert_store" / f"bert_{fmt}.mar") as z:
        z.extractall(tmp_path)
    result = subprocess.run(
        [sys.executable, "-c", BLOCKED],
        cwd=tmp_path,
        env=dict(os.environ, PYTHONPATH=str(tmp_path)),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert max(json.loads(result.stdout).values()) < 1e-4
