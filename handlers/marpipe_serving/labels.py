"""An output answered as labels with scores, best first, per row: ``[{"label": "cat", "score": 0.91}, ...]``."""

from __future__ import annotations

from typing import Any

import numpy as np


def scored(values: np.ndarray, spec: dict[str, Any]) -> list[list[dict[str, Any]]]:
    """`values` [batch, classes] (or [batch]: one score per row) → per row the `topk` best labels after the
    activation (softmax over the classes, sigmoid per class, or none)."""
    labels = spec["names"]
    x = np.asarray(values, dtype=np.float64).reshape(len(values), -1)
    if spec["activation"] == "softmax":
        x = np.exp(x - x.max(axis=1, keepdims=True))
        x /= x.sum(axis=1, keepdims=True)
    elif spec["activation"] == "sigmoid":
        x = 1.0 / (1.0 + np.exp(-x))
    k = min(int(spec["topk"]), x.shape[1])
    order = np.argsort(-x, axis=1, kind="stable")[:, :k]
    return [[{"label": labels[i] if i < len(labels) else str(i), "score": float(row[i])} for i in idx] for row, idx in zip(x, order)]
