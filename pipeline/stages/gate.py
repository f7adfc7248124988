"""The accuracy gate of a build at a precision other than fp32 (`export.precision` fp16, bf16 or int8).

A lower precision moves every value a little, so atol/rtol do not apply: the artifact is judged against the fp32
eager model by what a user of its answers sees.

* **agreement**: the fraction of rows whose top-1 (the argmax along the last dim) is the eager model's; every
  position before the last dim counts as a row (a per-token output: each token). Not measured for an output whose
  rows have one value (a last dim of 1, or none past the batch): there is no top-1 to agree on.
* **cosine**: the mean cosine similarity of output rows (each batch item's values, flattened); two all-zero rows
  are alike (1), an all-zero row and another are not (0), a non-finite value makes it NaN, which fails.

The rows: every parity run (each shape, sample and raw request), `GATE_ROWS` more generated ones (the parity runs
are few: 15 rows by default, where one disagreement moves the fraction by 0.07; over 200 rows by 0.005), and,
measured apart, every row of `parity.reference`. The generated rows are not stored in the archive. A build at fp32
records both measures in its report too (over the parity runs alone), and is judged by atol/rtol as before.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.spec.precision import FP32
from pipeline.spec.spec import BATCH, Spec
from pipeline.stages import inputs
from pipeline.stages.compare import shape_problem

GATE_ROWS = 200
CHUNK = 25  # rows per forward pass
SEED = inputs.SEED + 500_000  # apart from the parity runs' seeds


@dataclass
class Tally:
    """Agreement and cosine of one output, accumulated over batches of rows."""

    agreeing: int = 0
    positions: int = 0
    cosines: float = 0.0
    rows: int = 0

    def add(self, expected: np.ndarray, got: np.ndarray) -> None:
        a, b = np.asarray(expected, dtype=np.float64), np.asarray(got, dtype=np.float64)
        if not len(a):
            return
        if a.ndim >= 2 and a.shape[-1] > 1:
            same = a.argmax(axis=-1) == b.argmax(axis=-1)
            self.agreeing += int(same.sum())
            self.positions += same.size
        a, b = a.reshape(len(a), -1), b.reshape(len(b), -1)
        na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            cos = (a * b).sum(axis=1) / (na * nb)
        cos = np.where((na == 0) & (nb == 0), 1.0, np.where((na == 0) ^ (nb == 0), 0.0, cos))
        self.cosines += float(cos.sum())
        self.rows += len(cos)

    @property
    def agreement(self) -> float | None:
        return self.agreeing / self.positions if self.positions else None

    @property
    def cosine(self) -> float | None:
        return self.cosines / self.rows if self.rows else None

    def as_dict(self) -> dict[str, Any]:
        return {"agreement": self.agreement, "cosine": self.cosine, "rows": self.rows}


def gated(spec: Spec) -> bool:
    return spec.export.precision != FP32


def thresholds(spec: Spec) -> tuple[float, float] | None:
    """(agreement, cosine) a gated build must reach; None at fp32."""
    return (spec.parity.agreement, spec.parity.cosine) if gated(spec) else None


def rows(spec: Spec) -> Iterator[dict[str, np.ndarray]]:
    """GATE_ROWS generated rows, CHUNK at a time (each chunk at the next size of every other dynamic dim)."""
    for k in range(GATE_ROWS // CHUNK):
        dims = {BATCH: CHUNK, **{d: sizes[k % len(sizes)] for d, sizes in spec.dims.items()}}
        yield {n: t.numpy() for n, t in inputs.make(spec, dims, SEED + k).items()}


def judge(tally: Tally, limits: tuple[float, float], what: str) -> list[str]:
    """Each measure below its threshold, e.g. "agreement 0.6650 < 0.99 (top-1 along the last dim; 215 rows of ...)"."""
    agreement, cosine = limits
    failures = []
    if tally.agreement is not None and not tally.agreement >= agreement:
        failures.append(f"agreement {tally.agreement:.4f} < {agreement:g} (top-1 along the last dim; {tally.positions} rows of {what})")
    if tally.cosine is not None and not tally.cosine >= cosine:
        failures.append(f"cosine {tally.cosine:.4f} < {cosine:g} (mean cosine similarity; {tally.rows} rows of {what})")
    return failures


def archived(spec: Spec) -> dict[str, Any]:
    """marpipe.json's `parity.gate` of a gated build: what it was judged against and how (the measured values
    depend on the machine's kernels, so they go to the build's report only)."""
    return {
        "precision": spec.export.precision,
        "against": "the fp32 eager model",
        "agreement": spec.parity.agreement,
        "cosine": spec.parity.cosine,
        "generated_rows": GATE_ROWS,
    }


def served(meta: dict[str, Any], expected: dict[str, np.ndarray], got: dict[str, np.ndarray | None]) -> list[str] | None:
    """A served answer against the stored fp32 eager outputs by the archive's own gate (`marpipe smoke`): the
    failures; None for an archive that has no gate (fp32: judged by atol/rtol)."""
    if "gate" not in meta.get("parity", {}):
        return None
    why = []
    for name, want in expected.items():
        limits = meta["parity"]["outputs"][name]
        answer = got.get(name)
        problem = shape_problem(want, answer)
        if problem:
            why.append(f"{name}: {problem}")
            continue
        tally = Tally()
        tally.add(want, np.asarray(answer))
        why += [f"{name}: {f}" for f in judge(tally, (limits["agreement"], limits["cosine"]), "the stored batch vs fp32 eager")]
    return why
