"""What a causal language model's rows answer: `select: last` and texts answered one by one.

* An output with ``"select": "last"`` in marpipe.json answers each row's value at its last real token: the last
  position where the row's attention mask is set, else the last of the row's own length (a text padded to the
  batch's longest), else the last position. Its token axis (the one after the batch axis) goes away: per row
  ``[vocab]`` rather than ``[seq, vocab]``.
* A request of texts answered in JSON: each row's per-token outputs trimmed to the row's own tokens (by its
  attention mask), as the text alone would be answered; a list of rows of different lengths (`Rows`).
"""

from __future__ import annotations

from typing import Any

import numpy as np


class TextArrays(dict):
    """The arrays a request's texts were tokenized into (so per-token answers can be trimmed row by row)."""


class Rows(list):
    """One output's rows of different lengths: JSON's list of rows (numpy's `tolist` and `nbytes`, as the codecs use)."""

    def tolist(self) -> list:
        return [row.tolist() for row in self]

    @property
    def nbytes(self) -> int:
        return sum(row.nbytes for row in self)


def selected(meta: dict) -> list[str]:
    return [o["name"] for o in meta["outputs"] if o.get("select") == "last"]


def last_positions(arrays: dict[str, np.ndarray], rows: int, length: int, widths: np.ndarray | None = None) -> np.ndarray:
    """Each row's last real token: by the attention mask, else the row's own width, else the last position."""
    mask = arrays.get("attention_mask")
    if mask is not None and mask.ndim == 2 and mask.shape == (rows, length):
        real = mask != 0
        return np.where(real.any(axis=1), length - 1 - np.argmax(real[:, ::-1], axis=1), length - 1)
    if widths is not None:
        return np.clip(widths - 1, 0, length - 1)
    return np.full(rows, length - 1)


def select_last(outputs: dict[str, np.ndarray], arrays: dict[str, np.ndarray], names: list[str], widths: Any = None) -> dict:
    """`outputs` with each output of `names` taken at every row's last real token (axis 1 removed)."""
    if not names:
        return outputs
    out = dict(outputs)
    for name in names:
        value = out[name]
        at = last_positions(arrays, len(value), value.shape[1], widths)
        out[name] = value[np.arange(len(value)), at]
    return out


def per_row(outputs: dict[str, Any], arrays: dict[str, np.ndarray], per_token: list[str]) -> dict[str, Any]:
    """Texts' per-token outputs (`per_token`: token axis 1), each row trimmed to its own tokens by the attention mask."""
    mask = arrays.get("attention_mask") if isinstance(arrays, TextArrays) else None
    if mask is None or not per_token:
        return outputs
    out = dict(outputs)
    for name in per_token:
        value = out.get(name)
        if isinstance(value, np.ndarray) and value.ndim >= 2 and value.shape[:2] == mask.shape:
            out[name] = Rows(value[i][mask[i] != 0] for i in range(len(value)))
    return out
