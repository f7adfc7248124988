"""Tiny Hugging Face models for the tests, built from small configs (nothing is downloaded)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

from make_bert import main as make_example  # noqa: E402  (the example's own maker: one definition of the tiny BERT)
from make_bert import save, tiny_bert  # noqa: E402

__all__ = ["make_example", "save", "tiny_bert", "tiny_masked_lm", "to_bin_shards", "bert_inputs"]


def tiny_masked_lm(seed: int = 0):
    """A 2-layer, width-32 BertForMaskedLM: its decoder weight is tied to the word embeddings."""
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=1000, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, max_position_embeddings=64
    )
    return BertForMaskedLM(config).eval()


def to_bin_shards(st_folder: Path, out: Path) -> Path:
    """The same sharded checkpoint as torch .bin files with pytorch_model.bin.index.json (what transformers < 5 and
    many hub repos hold; transformers 5 no longer writes it)."""
    from safetensors.torch import load_file

    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text((st_folder / "config.json").read_text())
    index = json.loads((st_folder / "model.safetensors.index.json").read_text())
    renamed = {}
    for shard in sorted(set(index["weight_map"].values())):
        name = shard.replace("model-", "pytorch_model-").replace(".safetensors", ".bin")
        torch.save(load_file(str(st_folder / shard)), out / name)
        renamed[shard] = name
    doc = {"metadata": index.get("metadata", {}), "weight_map": {k: renamed[v] for k, v in index["weight_map"].items()}}
    (out / "pytorch_model.bin.index.json").write_text(json.dumps(doc, indent=2))
    return out


def bert_inputs(lengths: list[int], seq: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Token ids and an attention mask padded to `seq`: row i has lengths[i] real tokens, then padding (id 0, mask 0)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 1000, (len(lengths), seq), generator=gen)
    mask = (torch.arange(seq) < torch.tensor(lengths)[:, None]).long()
    return {"input_ids": ids * mask, "attention_mask": mask}
