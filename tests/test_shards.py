"""Checkpoint folders and sharded checkpoints (Hugging Face save_pretrained layouts), tied weights, HF configs."""

from __future__ import annotations

import hashlib
import json
import shutil
import zipfile
from pathlib import Path

import pytest
import torch
import yaml
from conftest import Project, marpipe
from hf_models import bert_inputs, save, tiny_bert, tiny_masked_lm, to_bin_shards
from safetensors.torch import load_file, save_file

from pipeline.errors import CheckpointError, SpecError
from pipeline.sources.checkpoint import read_checkpoint
from pipeline.spec.spec import load_spec
from pipeline.stages import load

INPUTS = [
    {"name": "input_ids", "shape": ["batch", "seq"], "dtype": "int64", "range": [0, 1000]},
    {"name": "attention_mask", "shape": ["batch", "seq"], "dtype": "int64", "range": [0, 2], "generate": "padding_mask"},
]


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("shards")
    model = tiny_bert()
    st = save(model, root / "st")
    return {
        "st": st,
        "bin": to_bin_shards(st, root / "bin"),
        "single": save(model, root / "single", max_shard_size="10MB"),
        "root": root,
    }


def _spec(root: Path, folder: Path, name: str = "bert", **checkpoint) -> Path:
    doc = {"name": name, "architecture": {"transformers": str(folder)}, "inputs": INPUTS, "dims": {"seq": [5, 9]}}
    if checkpoint:
        doc["checkpoint"] = checkpoint
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.inference_mode():
        return model(**bert_inputs([9, 4, 1], 9)).logits


@pytest.mark.parametrize("layout", ["st", "bin", "single", "index file"])
def test_a_save_pretrained_folder_loads_like_the_model(folders, layout: str) -> None:
    folder = folders["st" if layout == "index file" else layout]
    checkpoint = {"path": str(folder / "model.safetensors.index.json")} if layout == "index file" else {}
    loaded = load.run(load_spec(_spec(folders["root"], folder, **checkpoint)))
    torch.testing.assert_close(_logits(loaded.model), _logits(tiny_bert()), rtol=1e-5, atol=1e-6)  # sdpa vs eager attention
    ck = loaded.checkpoint
    assert ck.format == ("torch-zip" if layout == "bin" else "safetensors")
    assert loaded.by_name and not loaded.tied
    # BERT's non-persistent buffers come from the constructor, its weights from the checkpoint
    assert torch.equal(loaded.model.bert.embeddings.position_ids, torch.arange(64)[None])
    if layout == "single":
        assert not ck.shards and ck.path == folder / "model.safetensors" and loaded.verbatim
    else:
        assert len(ck.shards) >= 4 and not loaded.verbatim  # the index and three or more shards


def test_the_folder_hash_covers_the_index_and_every_shard(folders) -> None:
    folder = folders["st"]
    raw = read_checkpoint(folder)
    names = sorted(p.name for p in folder.iterdir() if p.name != "config.json")
    lines = "".join(f"{hashlib.sha256((folder / n).read_bytes()).hexdigest()}  {n}\n" for n in names)
    assert raw.sha256 == hashlib.sha256(lines.encode()).hexdigest()
    assert [f["name"] for f in raw.shards] == [raw.index, *sorted(n for n in names if n != raw.index)]
    assert read_checkpoint(folder, expected_sha256=raw.sha256).sha256 == raw.sha256
    with pytest.raises(CheckpointError, match="the spec pins 0{64}"):
        read_checkpoint(folder, expected_sha256="0" * 64)


def test_inspect_lists_every_shard(folders) -> None:
    result = marpipe("inspect", str(folders["bin"]), "--json")
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["index"] == "pytorch_model.bin.index.json" and info["format"] == "torch-zip"
    for f in info["files"]:
        assert f["sha256"] == hashlib.sha256((folders["bin"] / f["name"]).read_bytes()).hexdigest()
    assert info["tensor_count"] == len(tiny_bert().state_dict())  # (its two non-persistent buffers are in neither)


def _mapped_files() -> set[str]:
    return {line.split(maxsplit=5)[5] for line in Path("/proc/self/maps").read_text().splitlines() if len(line.split(maxsplit=5)) == 6}


@pytest.mark.parametrize("layout", ["st", "bin"])
def test_shards_are_mapped_not_copied(folders, layout: str) -> None:
    raw = read_checkpoint(folders[layout])
    mapped = _mapped_files()
    assert all(str(folders[layout] / f["name"]) in mapped for f in raw.shards[1:])
    regions = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        parts = line.split(maxsplit=5)
        if len(parts) == 6 and parts[5].startswith(str(folders[layout])):
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            regions.append((lo, hi))
    inside = [any(lo <= t.data_ptr() < hi for lo, hi in regions) for t in raw.state_dict.values() if t.numel()]
    assert all(inside), f"{inside.count(False)} tensors are copies, not views of the mapped shards"


def _broken(folders, tmp_path: Path, change) -> Path:
    folder = tmp_path / "broken"
    shutil.copytree(folders["st"], folder)
    change(folder, json.loads((folder / "model.safetensors.index.json").read_text()))
    return folder


def _save_index(folder: Path, index: dict) -> None:
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))


def _move_key(folder: Path, index: dict) -> None:
    key = sorted(index["weight_map"])[0]
    others = sorted(set(index["weight_map"].values()) - {index["weight_map"][key]})
    index["weight_map"][key] = others[0]
    _save_index(folder, index)


def _drop_key(folder: Path, index: dict) -> None:
    key = sorted(index["weight_map"])[0]
    tensors = load_file(str(folder / index["weight_map"][key]))
    del tensors[key]
    save_file(tensors, str(folder / index["weight_map"][key]), metadata={"format": "pt"})


def _duplicate_key(folder: Path, index: dict) -> None:
    key = sorted(index["weight_map"])[0]
    home = index["weight_map"][key]
    other = sorted(set(index["weight_map"].values()) - {home})[0]
    tensors = load_file(str(folder / other))
    tensors[key] = load_file(str(folder / home))[key]
    save_file(tensors, str(folder / other))


def _unnamed_key(folder: Path, index: dict) -> None:
    del index["weight_map"][sorted(index["weight_map"])[0]]
    _save_index(folder, index)


def _extra_shard(folder: Path, index: dict) -> None:
    shard = sorted(set(index["weight_map"].values()))[0]
    shutil.copy(folder / shard, folder / "model-00009-of-00009.safetensors")


def _missing_shard(folder: Path, index: dict) -> None:
    (folder / sorted(set(index["weight_map"].values()))[-1]).unlink()


BROKEN = {
    "missing shard": (_missing_shard, r"1 shards the index names are missing \(model-0000\d-of-0000\d.safetensors\)"),
    "extra shard": (_extra_shard, r"1 shard files the index does not name \(model-00009-of-00009.safetensors\)"),
    "key in two shards": (_duplicate_key, r"tensor 'bert\.[\w.]+' is in two shards \(model-0000\d-of-0000\d.safetensors and model-0000\d"),
    "key the shard lacks": (_drop_key, r"the index puts tensor 'bert\.[\w.]+' in model-0000\d-of-0000\d.safetensors, which lacks it"),
    "key in another shard": (
        _move_key,
        r"tensor 'bert\.[\w.]+' is in model-0000\d-of-0000\d.safetensors, the index puts it in model-0000\d",
    ),
    "key the index does not name": (_unnamed_key, r"1 tensors the index does not name \(bert\.[\w.]+ in model-0000\d"),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_a_broken_sharded_checkpoint_is_refused_naming_what(folders, tmp_path: Path, case: str) -> None:
    change, expected = BROKEN[case]
    folder = _broken(folders, tmp_path, change)
    with pytest.raises(CheckpointError, match=expected) as err:
        read_checkpoint(folder)
    assert err.value.exit_code == 3 and "\n" not in str(err.value)


def test_a_damaged_bin_shard_fails_its_crc(folders, tmp_path: Path) -> None:
    folder = tmp_path / "bin"
    shutil.copytree(folders["bin"], folder)
    shard = sorted(folder.glob("pytorch_model-*.bin"))[0]
    with zipfile.ZipFile(shard) as z:
        info = next(i for i in z.infolist() if "/data/" in i.filename and i.file_size > 64)
    data = bytearray(shard.read_bytes())
    h = info.header_offset  # the local header's own name and extra lengths (torch pads the extra field)
    data[h + 30 + int.from_bytes(data[h + 26 : h + 28], "little") + int.from_bytes(data[h + 28 : h + 30], "little") + 8] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=rf"checkpoint {shard}: corrupt torch zip: entry .* fails its CRC check") as err:
        read_checkpoint(folder)
    assert err.value.exit_code == 3


def test_tied_weights_are_accepted_missing_and_tied_again(folders, tmp_path: Path) -> None:
    """save_pretrained leaves out the MLM decoder (tied to the word embeddings); the eager archive carries the file as it is."""
    reference = tiny_masked_lm()
    folder = save(reference, tmp_path / "mlm", max_shard_size="10MB")
    saved = load_file(str(folder / "model.safetensors"))
    assert "cls.predictions.decoder.weight" not in saved
    spec = _spec(tmp_path, folder, name="mlm")
    loaded = load.run(load_spec(spec))
    assert loaded.tied == ["cls.predictions.decoder.bias", "cls.predictions.decoder.weight"]
    model = loaded.model
    assert model.cls.predictions.decoder.weight is model.bert.embeddings.word_embeddings.weight
    with torch.inference_mode():
        torch.testing.assert_close(model(**bert_inputs([6, 3], 6)).logits, reference(**bert_inputs([6, 3], 6)).logits, rtol=1e-5, atol=1e-6)
    result = Project(tmp_path).build(spec)  # parity loads the archive's artifact as the handler does
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 tied keys" in result.stdout and "the safetensors file as it is" in result.stdout
    # a key that is missing and tied to nothing is still an error
    del saved["bert.embeddings.LayerNorm.bias"]
    save_file(saved, str(folder / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"1 missing keys \(bert.embeddings.LayerNorm.bias\)"):
        load.run(load_spec(spec))


def test_an_auto_class_and_config_overrides(folders, tmp_path: Path) -> None:
    path = _spec(tmp_path, folders["single"])
    doc = yaml.safe_load(path.read_text())
    doc["architecture"].update({"class": "AutoModelForSequenceClassification", "kwargs": {"classifier_dropout": 0.5}})
    path.write_text(yaml.safe_dump(doc))
    loaded = load.run(load_spec(path))
    assert type(loaded.model).__name__ == "BertForSequenceClassification" and loaded.model.config.classifier_dropout == 0.5
    torch.testing.assert_close(_logits(loaded.model), _logits(tiny_bert()), rtol=1e-5, atol=1e-6)  # sdpa vs eager attention


TRANSFORMERS_ERRORS = {
    "misspelt class": (
        {"class": "BertForSequenceClasification"},
        "architecture.class: transformers",
        "did you mean 'BertForSequenceClassification'?",
    ),
    "unknown config key": ({"kwargs": {"no_such_setting": 1}}, "architecture.kwargs: not attributes of BertConfig: no_such_setting", ""),
}


@pytest.mark.parametrize("case", sorted(TRANSFORMERS_ERRORS))
def test_transformers_errors_name_the_field(folders, tmp_path: Path, case: str) -> None:
    extra, expected, hint = TRANSFORMERS_ERRORS[case]
    path = _spec(tmp_path, folders["single"])
    doc = yaml.safe_load(path.read_text())
    doc["architecture"].update(extra)
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(SpecError) as err:
        load.run(load_spec(path))
    assert expected in str(err.value) and hint in str(err.value), str(err.value)


def test_a_config_without_architectures_needs_a_class(folders, tmp_path: Path) -> None:
    folder = tmp_path / "noarch"
    shutil.copytree(folders["single"], folder)
    config = json.loads((folder / "config.json").read_text())
    del config["architectures"]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(SpecError, match="architecture.class: config.json names no architectures"):
        load_spec(_spec(tmp_path, folder))
