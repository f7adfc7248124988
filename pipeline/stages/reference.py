"""Parity against references outside marpipe: what the user's own stack computes, not only marpipe's own loading.

* `from_pretrained`: a Hugging Face model is also loaded by transformers itself (`from_pretrained` on the folder,
  same class, config and attention implementation) and must answer the parity inputs as marpipe's eager model
  does: a `key_map` that swaps two tensors of one shape loads cleanly, and is caught here.
* `parity.reference`: an .npz of inputs and expected outputs computed by the user's own code (arrays named after
  the declared inputs and outputs, any number of rows), checked row by row against the eager model and the
  exported artifact.

A difference beyond the parity tolerances is a `ParityError` (exit 5) naming the output, the row and the error.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import ParityError, SpecError
from pipeline.spec.spec import Spec
from pipeline.stages.compare import compare

Case = tuple[str, Any, dict[str, np.ndarray], dict[str, np.ndarray]]  # (label, dims, inputs, eager outputs)


def from_pretrained(spec: Spec, loaded: Any, cases: list[Case], names: list[str], device: str) -> str:
    """Compare marpipe's eager outputs (`cases`) with those of `from_pretrained(folder)`; the line to print.
    ParityError beyond the tolerances."""
    import torch

    from handlers.marpipe_serving.models import call, name_outputs
    from pipeline.sources.hf import reference_model

    folder = spec.architecture.transformers
    folder = folder if folder.is_dir() else folder.parent
    weights = spec.checkpoint.path
    if weights != folder and weights.parent != folder:
        return f"reference (from_pretrained): skipped, checkpoint.path is not in {folder.name}/"
    dtype = next((p.dtype for p in loaded.model.parameters() if p.dtype.is_floating_point), torch.float32)
    try:
        model = reference_model(folder, type(loaded.model), loaded.source.config, dtype).to(device)
    except Exception as exc:
        raise ParityError(f"{spec.name}: reference (from_pretrained) does not load {folder}: {type(exc).__name__}: {exc}") from None
    worst: dict[str, tuple[float, str]] = {n: (0.0, "") for n in names}
    failures = []
    for label, _, arrays, expected in cases:
        tensors = {n: torch.from_numpy(a).to(device) for n, a in arrays.items()}
        with torch.inference_mode():
            want = name_outputs(call(model, tensors, loaded.by_name), names)
        for n in names:
            atol, rtol = spec.tolerance(n)
            result = compare(want[n], expected[n], atol, rtol)
            err = result.get("max_abs", float("inf"))
            if err >= worst[n][0]:
                worst[n] = (err, label)
            if not result["ok"]:
                failures.append(n)
    del model
    if failures:
        n = failures[0]
        err, label = worst[n]
        raise ParityError(
            f"{spec.name}: reference (from_pretrained) vs loaded: {n} max abs {err:.3g} ({label}; atol {spec.tolerance(n)[0]:g}, "
            f"rtol {spec.tolerance(n)[1]:g}): marpipe's weights are not what transformers loads from {folder.name}/; "
            "check checkpoint.key_map and strip_prefix"
        )
    detail = ", ".join(f"{n} max abs {worst[n][0]:.3g}" for n in names)
    return f"  ✓ {spec.name}: reference (from_pretrained) vs loaded: {detail} ({len(cases)} runs)"


@dataclass
class Reference:
    """`parity.reference`, read and checked against the declared inputs and the model's outputs."""

    path: Path
    inputs: dict[str, np.ndarray]
    outputs: dict[str, np.ndarray]

    @property
    def rows(self) -> int:
        return len(next(iter(self.inputs.values())))

    def record(self) -> dict[str, Any]:
        import hashlib

        return {"file": self.path.name, "sha256": hashlib.sha256(self.path.read_bytes()).hexdigest(), "rows": self.rows}


def read(spec: Spec, names: list[str]) -> Reference:
    """The reference file's arrays; SpecError (exit 2) naming what does not fit the spec."""
    path = spec.parity.reference
    where = f"{spec.source}: parity.reference: {path.name}"
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except Exception as exc:
        raise SpecError(f"{where}: not a readable npz ({type(exc).__name__}: {exc})") from None
    declared = {t.name: t for t in spec.inputs}
    unknown = sorted(set(arrays) - set(declared) - set(names))
    missing = sorted(set(declared) - set(arrays))
    if unknown or missing:
        parts = [f"no array for the inputs {missing}"] if missing else []
        parts += [f"arrays {unknown} name no input or output"] if unknown else []
        raise SpecError(f"{where}: {'; '.join(parts)} (inputs: {sorted(declared)}, outputs: {names})")
    outputs = {n: arrays[n] for n in names if n in arrays}
    if not outputs:
        raise SpecError(f"{where}: no expected output: name an array after one of the outputs {names}")
    rows = {k: len(v) if v.ndim else 0 for k, v in arrays.items()}
    if len(set(rows.values())) != 1 or not next(iter(rows.values())):
        raise SpecError(f"{where}: every array needs the same number of rows (one or more), got {rows}")
    for name, t in declared.items():
        a = arrays[name]
        fixed = [(i, d) for i, d in enumerate(t.shape) if isinstance(d, int)]
        if a.ndim != len(t.shape) or any(a.shape[i] != d for i, d in fixed):
            raise SpecError(f"{where}: {name} has shape {list(a.shape)}, the input is declared {list(t.shape)}")
        if a.dtype.kind not in "biuf":
            raise SpecError(f"{where}: {name} holds {a.dtype}, not numbers")
    return Reference(path, {n: arrays[n] for n in declared}, outputs)


def check_rows(spec: Spec, ref: Reference, run: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]], what: str) -> list[str]:
    """Run `run` on the reference inputs in batches of the largest parity batch size; each output's rows compared
    with the expected ones: the failures, e.g. "logits row 3: max abs 2.2 > atol 1e-05 + rtol 0.0001·|reference|"."""
    step = max(spec.parity.batch_sizes)
    failures: list[str] = []
    for start in range(0, ref.rows, step):
        chunk = {n: a[start : start + step] for n, a in ref.inputs.items()}
        try:
            got = run(chunk)
        except Exception as exc:
            return [f"{what} raised {type(exc).__name__} on rows {start}-{start + len(next(iter(chunk.values()))) - 1}: {exc}"]
        for n, want in ref.outputs.items():
            atol, rtol = spec.tolerance(n)
            for i in range(len(want[start : start + step])):
                result = compare(want[start + i], None if got.get(n) is None else got[n][i], atol, rtol)
                if not result["ok"]:
                    why = result.get("why") or f"max abs {result['max_abs']:.3g} > atol {atol:g} + rtol {rtol:g}·|reference|"
                    failures.append(f"{n} row {start + i}: {why}")
    return failures
