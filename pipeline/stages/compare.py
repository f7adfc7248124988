"""How two answers are compared: shape, then values with torch.allclose semantics. Used by the parity stage, the
reference checks and `marpipe smoke`."""

from __future__ import annotations

from typing import Any

import numpy as np

EPS = 1e-12


def shape_problem(expected: np.ndarray, got: np.ndarray | None) -> str | None:
    """Why `got` cannot be compared with `expected` value by value (missing, or another shape); None if it can."""
    if got is None:
        return "missing from the answer"
    if tuple(np.shape(got)) != tuple(expected.shape):
        return f"shape {list(np.shape(got))} vs eager {list(expected.shape)}"
    return None


def compare(expected: np.ndarray, got: np.ndarray | None, atol: float, rtol: float) -> dict[str, Any]:
    """Shape, then values, with torch.allclose semantics (NaN matches NaN). Used by `marpipe smoke` too."""
    why = shape_problem(expected, got)
    if why:
        return {"ok": False, "why": why}
    a = np.asarray(got).astype(np.float64)
    b = expected.astype(np.float64)
    both_nan = np.isnan(a) & np.isnan(b)
    diff = np.where(both_nan, 0.0, np.abs(a - b))
    diff = np.where(np.isnan(diff), np.inf, diff)
    bad = diff > atol + rtol * np.abs(np.nan_to_num(b, nan=0.0, posinf=0.0, neginf=0.0))
    finite = np.isfinite(diff)
    return {
        "ok": not bool(bad.any()),
        "max_abs": float(diff.max()) if diff.size else 0.0,
        "max_rel": float((diff[finite] / (np.abs(b[finite]) + EPS)).max()) if finite.any() else 0.0,
        "mismatched": float(bad.mean()) if bad.size else 0.0,
        "nan": int(np.isnan(a).sum()),
        "inf": int(np.isinf(a).sum()),
    }
