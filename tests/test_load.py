"""Stage load: prefixes, nesting, strict diff, safetensors by content, key_map, strict: false, dtypes."""

from __future__ import annotations

import hashlib

import pytest
import torch
from safetensors.torch import save_file

from pipeline.errors import CheckpointError
from pipeline.spec.spec import load_spec
from pipeline.stages import load


def _loaded(project, **spec):
    return load.run(load_spec(project.spec(**spec)))


def _same(model: torch.nn.Module, reference: torch.nn.Module) -> None:
    x = torch.randn(3, 4)
    assert not model.training
    torch.testing.assert_close(model(x), reference(x), rtol=0, atol=0)


@pytest.mark.parametrize("prefix", ["", "module.", "_orig_mod.", "_orig_mod.module.", "module._orig_mod."])
def test_prefixes_are_stripped(project, prefix: str) -> None:
    ref = project.model("Linear")
    project.save({prefix + k: v for k, v in ref.state_dict().items()}, "tiny.pth")
    loaded = _loaded(project)
    _same(loaded.model, ref)
    assert "".join(loaded.checkpoint.stripped) == prefix


@pytest.mark.parametrize("key", ["state_dict", "model"])
def test_nested_checkpoints_are_unwrapped(project, key: str) -> None:
    ref = project.model("Linear")
    project.save({key: ref.state_dict(), "epoch": 7, "optimizer": {"lr": 0.1}}, "tiny.pth")
    loaded = _loaded(project)
    _same(loaded.model, ref)
    assert loaded.checkpoint.nested_key == key


def test_lightning_prefix_with_strip_prefix(project) -> None:
    ref = project.model("Linear")
    project.save({"state_dict": {f"model.{k}": v for k, v in ref.state_dict().items()}}, "tiny.ckpt")
    _same(_loaded(project, checkpoint={"path": "tiny.ckpt", "strip_prefix": ["model."]}).model, ref)


def test_safetensors_detected_by_content_whatever_the_name(project) -> None:
    ref = project.model("Linear")
    save_file(ref.state_dict(), str(project.root / "tiny.pt"))
    loaded = _loaded(project, checkpoint={"path": "tiny.pt"})
    assert loaded.checkpoint.format == "safetensors"
    _same(loaded.model, ref)


def test_strict_diff_is_sorted_and_actionable(project) -> None:
    sd = project.model("Linear").state_dict()
    project.save({"fc.weight": sd["fc.weight"][:, :3], "head.weight": sd["fc.weight"]}, "tiny.pth")
    with pytest.raises(CheckpointError) as err:
        _loaded(project)
    msg = str(err.value)
    assert "1 missing keys (fc.bias)" in msg
    assert "1 unexpected (head.weight)" in msg
    assert "1 shape mismatches (fc.weight: checkpoint [2, 3] vs model [2, 4])" in msg
    assert "strict: false" in msg


def test_strict_false_loads_what_matches_and_reports_skipped(project) -> None:
    ref = project.model("Linear")
    sd = ref.state_dict()
    project.save({"fc.weight": sd["fc.weight"], "fc.bias": sd["fc.bias"][:1], "extra.w": sd["fc.bias"]}, "tiny.pth")
    loaded = _loaded(project, checkpoint={"strict": False})
    assert loaded.skipped == ["extra.w", "fc.bias"]
    torch.testing.assert_close(loaded.model.fc.weight, sd["fc.weight"])


def test_key_map_prefix_and_regex(project) -> None:
    ref = project.model("Linear")
    project.save({k.replace("fc.", "layer0."): v for k, v in ref.state_dict().items()}, "a.pth")
    _same(_loaded(project, checkpoint={"path": "a.pth", "key_map": [{"prefix": "layer0.", "to": "fc."}]}).model, ref)
    _same(_loaded(project, checkpoint={"path": "a.pth", "key_map": [{"regex": r"^layer\d+\.", "to": "fc."}]}).model, ref)


def test_integer_weights_refused_unless_cast(project) -> None:
    sd = {k: (v * 10).to(torch.int64) for k, v in project.model("Linear").state_dict().items()}
    project.save(sd, "tiny.pth")
    with pytest.raises(CheckpointError, match=r"2 tensors hold integers .*set checkpoint.dtype: float32"):
        _loaded(project)
    loaded = _loaded(project, checkpoint={"dtype": "float32"})
    assert loaded.model.fc.weight.dtype == torch.float32


def test_nonfinite_weights_refused_unless_allowed(project) -> None:
    sd = project.model("Linear").state_dict()
    sd["fc.bias"][0] = float("nan")
    project.save(sd, "tiny.pth")
    with pytest.raises(CheckpointError, match=r"1 tensors contain NaN or Inf \(fc.bias\)"):
        _loaded(project)
    assert torch.isnan(_loaded(project, checkpoint={"allow_nonfinite": True}).model.fc.bias).any()


def test_half_precision_checkpoint_loads_into_float_model(project) -> None:
    ref = project.model("Linear")
    project.save({k: v.half() for k, v in ref.state_dict().items()}, "tiny.pth")
    loaded = _loaded(project)
    assert loaded.model.fc.weight.dtype == torch.float32
    assert len(loaded.cast) == 2


def test_non_persistent_buffers_survive_meta_construction(project) -> None:
    ref = project.model("WithBuffer")
    project.save(ref.state_dict(), "tiny.pth")
    _same(_loaded(project, cls="WithBuffer").model, ref)


def test_sha256_pin(project) -> None:
    project.save(project.model("Linear").state_dict(), "tiny.pth")
    with pytest.raises(CheckpointError, match=r"sha256 is [0-9a-f]{64}, the spec pins 0{64}"):
        _loaded(project, checkpoint={"sha256": "0" * 64})
    digest = hashlib.sha256((project.root / "tiny.pth").read_bytes()).hexdigest()
    assert _loaded(project, checkpoint={"sha256": digest}).checkpoint.format == "torch-zip"
