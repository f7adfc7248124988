"""Create the Hugging Face example's folder: a tiny BERT classifier saved with `save_pretrained` in shards.

Built from a small config (2 layers, width 32, a 1000-token vocabulary, labels negative/neutral/positive) with
seeded random weights: nothing is downloaded. `max_shard_size` is set small so that the folder holds several
shards and an index, as large models are saved: `config.json`, `model.safetensors.index.json`,
`model-0000N-of-0000M.safetensors`; beside them a word-level `tokenizer.json` (BERT's normalisation and
[CLS] ... [SEP] template) built here, so that clients can send text.
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
LABELS = ("negative", "neutral", "positive")
WORDS = """the a an and or but not no is was are were be been it this that these those i you he she we they movie film
story plot acting actor actress scene scenes music ending director great good fine bad terrible awful boring fun funny
sad slow fast long short best worst loved hated liked enjoyed watched really very so too quite at all of to in on for
with by from as what who how why when never always again""".split()


def tiny_bert(num_labels: int = 3, seed: int = 0):
    """A 2-layer, width-32 BertForSequenceClassification in eval mode."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(
        vocab_size=1000,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        num_labels=num_labels,
        id2label=dict(enumerate(LABELS[:num_labels])),
        label2id={label: i for i, label in enumerate(LABELS[:num_labels])},
    )
    torch.manual_seed(seed)
    return BertForSequenceClassification(config).eval()


def save(model, folder: Path, max_shard_size: str = "60KB") -> Path:
    """save_pretrained in shards of at most `max_shard_size` (the tiny BERT gives 3 or more)."""
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, max_shard_size=max_shard_size)
    return folder


def make_tokenizer(folder: Path) -> Path:
    """A word-level tokenizer over WORDS with BERT's lower-casing, punctuation splitting and template."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *dict.fromkeys(WORDS)])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    tok.save(str(folder / "tokenizer.json"))
    return folder / "tokenizer.json"


def main(out: Path = HERE / "checkpoints" / "bert") -> None:
    save(tiny_bert(), out)
    make_tokenizer(out)
    for p in sorted(out.iterdir()):
        print(f"wrote {p.relative_to(HERE.parent) if p.is_relative_to(HERE.parent) else p}")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else HERE / "checkpoints" / "bert")
