"""Answers users trust (issue 20), without a server: Hugging Face folders loaded as from_pretrained loads them, the
from_pretrained reference check, parity.reference, tokenizer folders, causal LMs' caches. Each build is the CLI
in a fresh process, as users run it; the models are tiny and built from small configs (nothing is downloaded)."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import Project, marpipe, store_state
from hf_models import make_example

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()


def _build(project: Project, name: str, doc: dict, *options: str):
    path = project.root / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"name": name, **doc}, sort_keys=False))
    return marpipe("build", "--store", str(project.store), *options, str(path))


def test_a_transformers_5_vit_folder_builds_with_no_key_map(project: Project) -> None:
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    torch.manual_seed(0)
    ViTForImageClassification(config).save_pretrained(project.root / "vit")
    keys = json.loads((project.root / "vit" / "model.safetensors").read_bytes()[8:].split(b"}}", 1)[0] + b"}}")
    assert any(".attention.attention.key." in k for k in keys)  # the legacy names transformers 5 still writes
    doc = {"architecture": {"transformers": "vit"}, "inputs": [{"name": "pixel_values", "shape": ["batch", 3, 32, 32]}]}
    result = _build(project, "vit", doc)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "keys renamed by transformers" in result.stdout and "reference (from_pretrained) vs loaded" in result.stdout


def test_a_key_map_swapping_two_tensors_of_a_bert_folder_is_exit_5(project: Project) -> None:
    make_example(project.root / "bert")
    layer = r"^(bert\.encoder\.layer\.0\.attention\.self\.)"
    swap = [{"regex": layer + r"query\.", "to": r"\1tmp."}, {"regex": layer + r"value\.", "to": r"\1query."}]
    swap.append({"regex": layer + r"tmp\.", "to": r"\1value."})
    doc = {
        "architecture": {"transformers": "bert"},
        "checkpoint": {"key_map": swap},
        "inputs": [
            {"name": "input_ids", "shape": ["batch", "seq"], "dtype": "int64", "range": [0, 1000]},
            {"name": "attention_mask", "shape": ["batch", "seq"], "dtype": "int64", "range": [0, 2], "generate": "padding_mask"},
        ],
        "dims": {"seq": [8, 16]},
        "parity": {"atol": 1e-4, "rtol": 1e-3},
    }
    before = store_state(project.store)
    result = _build(project, "swapped", doc)
    assert result.returncode == 5, result.stdout + result.stderr
    assert "reference (from_pretrained) vs loaded: logits max abs" in result.stderr, result.stderr
    assert store_state(project.store) == before


def test_parity_reference_catches_a_wrong_key_map_of_a_plain_model(project: Project) -> None:
    model = project.model("TwoInTwoOut")
    project.save({k.replace("a.", "first.").replace("b.", "second."): v for k, v in model.state_dict().items()}, "two.pth")
    x, seq = torch.randn(5, 4), torch.randn(5, 3, 4)
    with torch.no_grad():
        joint, per_step = model(x, seq)
    np.savez(project.root / "reference.npz", x=x.numpy(), seq=seq.numpy(), joint=joint.numpy(), per_step=per_step.numpy())

    def doc(first: str, second: str) -> dict:
        return {
            "architecture": {"file": "models/tiny.py", "class": "TwoInTwoOut"},
            "checkpoint": {"path": "two.pth", "key_map": [{"prefix": "first.", "to": first}, {"prefix": "second.", "to": second}]},
            "inputs": [{"name": "x", "shape": ["batch", 4]}, {"name": "seq", "shape": ["batch", "steps", 4]}],
            "dims": {"steps": [2, 5]},
            "outputs": [{"name": "joint"}, {"name": "per_step"}],
            "parity": {"reference": "reference.npz"},
        }

    wrong = _build(project, "two", doc("b.", "a."), "--format", "onnx")
    assert wrong.returncode == 5, wrong.stdout + wrong.stderr
    assert "parity.reference reference.npz vs the eager model: joint row 0: max abs" in wrong.stderr, wrong.stderr
    assert not (project.store / "two.mar").exists()
    right = _build(project, "two", doc("a.", "b."), "--format", "onnx", "--report", str(project.root / "report.json"))
    assert right.returncode == 0, right.stdout + right.stderr
    assert "5 rows of reference.npz" in right.stdout
    with zipfile.ZipFile(project.store / "two.mar") as z:
        meta = json.loads(z.read("marpipe.json"))
        assert "reference.npz" not in z.namelist()
    assert meta["parity"]["reference"]["rows"] == 5


def test_a_tokenizer_folder_encodes_as_transformers_fast_tokenizer(tmp_path: Path) -> None:
    from handlers.marpipe_serving.text import TextCodec
    from pipeline.sources.hf import fast_tokenizer

    make_example(tmp_path / "bert")
    config = {"model_max_length": 12, "padding_side": "left", "cls_token": "[CLS]", "sep_token": "[SEP]", "pad_token": "[PAD]"}
    config |= {"unk_token": "[UNK]", "tokenizer_class": "BertTokenizer"}
    (tmp_path / "bert" / "tokenizer_config.json").write_text(json.dumps(config))
    text, settings = fast_tokenizer(tmp_path / "bert")
    (tmp_path / "archive").mkdir()
    (tmp_path / "archive" / "tokenizer.json").write_text(text)
    record = {"tokenizer": "tokenizer.json", "max_length": settings["model_max_length"], **settings}
    inputs = [{"name": n, "shape": ["batch", "seq"], "dtype": "int64"} for n in ("input_ids", "attention_mask", "token_type_ids")]
    codec = TextCodec(str(tmp_path / "archive"), record, inputs)
    texts = ["a good movie", "the worst film i never watched, really very boring and slow and long", "fun"]
    ours = codec.encode(texts)
    theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "bert"))(texts, padding=True, truncation=True, return_tensors="np")
    assert settings["padding_side"] == "left" and ours["input_ids"].shape[1] == 12
    for name in ("input_ids", "attention_mask", "token_type_ids"):
        assert np.array_equal(ours[name], theirs[name]), name


def test_a_cache_kept_on_is_named_in_the_error(project: Project) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=100, n_positions=32)).save_pretrained(project.root / "gpt2")
    doc = {
        "architecture": {"transformers": "gpt2", "kwargs": {"use_cache": True}},
        "inputs": [{"name": "input_ids", "shape": ["batch", "seq"], "dtype": "int64", "range": [0, 100]}],
    }
    result = _build(project, "gpt2", doc)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "is a DynamicCache, not a tensor" in result.stderr and "use_cache: false" in result.stderr, result.stderr
