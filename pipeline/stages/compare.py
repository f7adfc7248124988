"""How two answers are compared: shape, then values with torch.allclose semantics. Used by the parity stage, the
reference checks and `marpipe smoke`."""

from __future__ import annotations

from typing import Any

import numpy as np

EPS = 1e-12


def compare(expected: np.ndarray, got: np.ndarray | None, atol: float, rtol: float) -> dict[str, Any]:
    """Shape, then values, with torch.allclose semantics (NaN matches NaN). Used by `marpipe smoke` too."""
    if got is None:
        return {"ok": False, "why": "missing from the answer"}
    got = np.asarray(got)
    if tuple(got.shape) != tuple(expected.shape):
        return {"ok": False, "why": f"shape {list(got.shape)} vs eager {list(expected.shape)}"}
    a = got.astype(np.float64)
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
