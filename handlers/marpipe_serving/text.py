"""Text into the model's integer inputs with a Hugging Face `tokenizers` file (not `transformers`).

Each request's texts are tokenized (special tokens as the tokenizer's post-processor adds them, truncated to
``max_length``); rows are padded to the longest row of the batch the model runs (see `pad`), with the
tokenizer's pad id for input_ids and 0 for attention_mask and token_type_ids.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from .errors import BadRequest

PAD_TOKENS = ("[PAD]", "<pad>", "<|pad|>", "<unk>", "[UNK]")
MAX_TEXTS = 1024  # strings in one request; max_rows usually says less
MAX_CHARS = 1 << 20  # characters in one string: truncation happens after tokenizing, so bound the work before


class TextCodec:
    def __init__(self, model_dir: str, text: dict[str, Any], inputs: list[dict]) -> None:
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise ImportError("this archive's text inputs need the tokenizers package: pip install tokenizers") from None
        self.tokenizer = Tokenizer.from_file(os.path.join(model_dir, text["tokenizer"]))
        pad = pad_id(self.tokenizer) if text.get("pad_id") is None else int(text["pad_id"])  # before its padding is switched off
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(int(text["max_length"]), direction=text.get("truncation_side") or "right")
        self.left = text.get("padding_side") == "left"  # a folder's tokenizer_config.json says where padding goes
        self.max_length = int(text["max_length"])
        declared = {t["name"]: t for t in inputs}
        self.fields = [n for n in ("input_ids", "attention_mask", "token_type_ids") if n in declared]
        self.dtypes = {n: declared[n]["dtype"] for n in self.fields}
        self.pad_values = {"input_ids": pad, "attention_mask": 0, "token_type_ids": 0}
        self.seq_dim = declared["input_ids"]["shape"][1]

    def encode(self, texts: Any) -> dict[str, np.ndarray]:
        """A string or a list of strings (one row each) as arrays padded to this request's longest row."""
        if isinstance(texts, str):
            texts = [texts]
        if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
            raise BadRequest('"text" must be a string or a non-empty list of strings')
        if len(texts) > MAX_TEXTS:
            raise BadRequest(f"{len(texts)} texts in one request; at most {MAX_TEXTS}", 413)
        if any(len(t) > MAX_CHARS for t in texts):
            raise BadRequest(f"a text longer than {MAX_CHARS} characters", 413)
        encodings = self.tokenizer.encode_batch(texts)
        width = max(len(e.ids) for e in encodings)
        if width == 0:
            raise BadRequest("the text is empty after tokenization")
        out = {}
        for name in self.fields:
            rows = np.full((len(texts), width), self.pad_values[name], dtype=np.int64)
            for i, e in enumerate(encodings):
                values = e.ids if name == "input_ids" else e.attention_mask if name == "attention_mask" else e.type_ids
                if self.left:
                    rows[i, width - len(values) :] = values
                else:
                    rows[i, : len(values)] = values
            out[name] = rows
        return out


def pad_id(tokenizer: Any) -> int:
    """The id padding uses: the tokenizer's own padding setting, else a conventional pad token, else 0."""
    padding = tokenizer.padding
    if padding and padding.get("pad_id") is not None:
        return int(padding["pad_id"])
    for token in PAD_TOKENS:
        found = tokenizer.token_to_id(token)
        if found is not None:
            return int(found)
    return 0


def pad(arrays: list[np.ndarray], axis: int, value: int | float, left: bool = False) -> list[np.ndarray]:
    """Pad each array along `axis` to the longest of them with `value` (before the values with `left`)."""
    width = max(a.shape[axis] for a in arrays)
    out = []
    for a in arrays:
        if a.shape[axis] == width:
            out.append(a)
            continue
        spec = [(0, 0)] * a.ndim
        spec[axis] = (width - a.shape[axis], 0) if left else (0, width - a.shape[axis])
        out.append(np.pad(a, spec, constant_values=value))
    return out
