"""The hostile and broken checkpoint corpus: exit 3, one or two plain lines, nothing run, the store unchanged."""

from __future__ import annotations

import argparse
import collections
import datetime
import os
import pickle
import random
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import Project, store_state
from safetensors.torch import save_file

ENV = {"TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1"}  # must not weaken marpipe's loading


class Exploit:
    marker: Path

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _valid(project: Project) -> dict:
    return project.model("Linear").state_dict()


def _torch_zip(project: Project, obj) -> bytes:
    path = project.root / "scratch.pth"
    torch.save(obj, path)
    return path.read_bytes()


def _flip_tensor_byte(project: Project) -> bytes:
    data = bytearray(_torch_zip(project, _valid(project)))
    with zipfile.ZipFile(project.root / "scratch.pth") as z:
        info = next(i for i in z.infolist() if "/data/" in i.filename and not i.filename.endswith("serialization_id"))
    h = info.header_offset  # the local header's own name and extra lengths (torch pads the extra field)
    offset = h + 30 + int.from_bytes(data[h + 26 : h + 28], "little") + int.from_bytes(data[h + 28 : h + 30], "little") + 3
    data[offset] ^= 0xFF
    return bytes(data)


def _onnx_bytes(project: Project) -> bytes:
    model = project.model("Linear")
    path = project.root / "scratch.onnx"
    torch.onnx.export(model, (torch.randn(2, 4),), str(path), dynamo=False)
    return path.read_bytes()


def _corrupt_safetensors(project: Project) -> bytes:
    save_file(_valid(project), str(project.root / "scratch.st"))
    data = bytearray((project.root / "scratch.st").read_bytes())
    data[9:20] = b"#not json!!"
    return bytes(data)


def _exploit_zip(project: Project) -> bytes:
    return _torch_zip(project, {"fc.weight": Exploit(), "fc.bias": torch.zeros(2)})


def _exploit_pickle(project: Project) -> bytes:
    return pickle.dumps({"fc.weight": Exploit()}, protocol=2)


CORPUS = {
    "truncated": (lambda p: _torch_zip(p, _valid(p))[:700], "truncated or corrupt"),
    "empty": (lambda p: b"", "the file is empty"),
    "random bytes": (lambda p: random.Random(1).randbytes(4096), "not a recognised checkpoint"),
    "flipped byte": (_flip_tensor_byte, "fails its CRC check"),
    "pickled module": (lambda p: _torch_zip(p, p.model("Linear")), "this is a pickled model"),
    "exploit in torch zip": (_exploit_zip, "refused: the pickle calls"),
    "exploit raw pickle": (_exploit_pickle, "refused: a raw pickle, not a torch zip; loading it would call posix.system"),
    "onnx file": (_onnx_bytes, "looks like an ONNX model"),
    "mar archive": (lambda p: (Path(p.root) / "good.mar").read_bytes(), "TorchServe .mar archive"),
    "corrupt safetensors header": (_corrupt_safetensors, "corrupt safetensors"),
    "shape mismatch": (lambda p: _torch_zip(p, {"fc.weight": torch.zeros(3, 4), "fc.bias": torch.zeros(3)}), "shape mismatches"),
    "missing keys": (lambda p: _torch_zip(p, {"fc.weight": torch.zeros(2, 4)}), "1 missing keys (fc.bias)"),
    "unexpected keys": (lambda p: _torch_zip(p, {**_valid(p), "head.bias": torch.zeros(2)}), "1 unexpected (head.bias)"),
    "integer weights": (lambda p: _torch_zip(p, {k: v.long() for k, v in _valid(p).items()}), "hold integers"),
    "nan weights": (lambda p: _torch_zip(p, {k: v * float("nan") for k, v in _valid(p).items()}), "contain NaN or Inf"),
    "not a dict": (lambda p: _torch_zip(p, [torch.zeros(2)]), "not a state_dict"),
}


@pytest.fixture(scope="module")
def corpus_project(tmp_path_factory) -> Project:
    project = Project(tmp_path_factory.mktemp("corpus"))
    project.save(_valid(project), "tiny.pth")
    result = project.build(project.spec(name="good"))
    assert result.returncode == 0, result.stderr
    (project.root / "good.mar").write_bytes((project.store / "good.mar").read_bytes())
    Exploit.marker = project.root / "PWNED"
    return project


@pytest.mark.parametrize("case", sorted(CORPUS))
def test_hostile_checkpoint(corpus_project: Project, case: str) -> None:
    make, expected = CORPUS[case]
    project = corpus_project
    name = case.replace(" ", "_")
    (project.root / f"{name}.pth").write_bytes(make(project))
    spec = project.spec(name="good", checkpoint={"path": f"{name}.pth"})
    before = store_state(project.store)
    result = project.build(spec, env=ENV)
    assert result.returncode == 3, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert 1 <= len(lines) <= 2, result.stderr
    assert f"{name}.pth" in lines[0] and expected in lines[0], lines[0]
    assert "\x1b[" not in result.stderr and "Traceback" not in result.stderr
    assert "weights_only=False" not in result.stderr and "weights_only" not in result.stderr.lower().replace("weights-only", "")
    assert store_state(project.store) == before
    assert not (project.root / "PWNED").exists()


def test_exploit_is_never_run_by_inspect(corpus_project: Project) -> None:
    from conftest import marpipe

    path = corpus_project.root / "exploit_inspect.pth"
    path.write_bytes(_exploit_zip(corpus_project))
    result = marpipe("inspect", str(path), env=ENV)
    assert result.returncode == 3
    assert not (corpus_project.root / "PWNED").exists()


def test_lightning_extras_with_numpy_and_argparse_load_safely(corpus_project: Project) -> None:
    project = corpus_project
    ckpt = {
        "state_dict": {f"model.{k}": v for k, v in _valid(project).items()},
        "hparams": argparse.Namespace(lr=0.1, layers=[1, 2]),
        "counts": collections.defaultdict(list, a=[1]),
        "window": slice(0, 10),
        "when": datetime.datetime(2026, 11, 29),
        "best_score": np.float64(0.93),
        "history": np.arange(5),
        "epoch": 3,
    }
    torch.save(ckpt, project.root / "lightning.ckpt")
    spec = project.spec(name="lightning", checkpoint={"path": "lightning.ckpt", "strip_prefix": ["model."]})
    result = project.build(spec, env=ENV)
    assert result.returncode == 0, result.stderr
    assert "ignored extras (argparse.Namespace" in result.stdout
    assert not (project.root / "PWNED").exists()


def test_safetensors_named_pt_builds(corpus_project: Project) -> None:
    project = corpus_project
    save_file(_valid(project), str(project.root / "st.pt"))
    result = project.build(project.spec(name="st", checkpoint={"path": "st.pt"}), env=ENV)
    assert result.returncode == 0, result.stderr
    assert "safetensors" in result.stdout


def test_a_pickled_custom_model_nested_under_model_is_named(corpus_project: Project) -> None:
    """A custom class (no torch.nn globals of its own) pickled under 'model' in a trainer checkpoint."""
    project = corpus_project
    sys.path.insert(0, str(project.root / "models"))
    try:
        import tiny
    finally:
        sys.path.pop(0)
    torch.save({"model": tiny.Plain(), "epoch": 1}, project.root / "nested_model.pth")
    result = project.build(project.spec(name="good", checkpoint={"path": "nested_model.pth"}), env=ENV)
    assert result.returncode == 3, result.stderr
    assert "'model' holds a pickled model (tiny.Plain), not a state_dict" in result.stderr


def test_a_raw_pickle_says_why_and_torch_stays_quiet(corpus_project: Project) -> None:
    """pickle.dump of a state_dict: not a torch zip. One line naming the globals it would call; no torch warning."""
    project = corpus_project
    (project.root / "raw.pkl").write_bytes(pickle.dumps(_valid(project), protocol=4))
    result = project.build(project.spec(name="good", checkpoint={"path": "raw.pkl"}), env=ENV)
    assert result.returncode == 3, result.stderr
    assert result.stderr.count("\n") == 1 and "Warning" not in result.stderr, result.stderr
    assert "refused: a raw pickle, not a torch zip; loading it would call" in result.stderr
    assert "torch._utils._rebuild_tensor_v2" in result.stderr and "nothing from it was run" in result.stderr


def test_legacy_torch_files_still_load(corpus_project: Project) -> None:
    """torch.save(..., _use_new_zipfile_serialization=False): a pickled magic number, then pickles."""
    project = corpus_project
    torch.save(_valid(project), project.root / "legacy.pth", _use_new_zipfile_serialization=False)
    result = project.build(project.spec(name="legacy", checkpoint={"path": "legacy.pth"}), env=ENV)
    assert result.returncode == 0, result.stderr
    assert "torch-legacy" in result.stdout and "Warning" not in result.stderr
