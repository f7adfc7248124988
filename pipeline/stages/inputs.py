"""Deterministic test inputs generated from the spec's declared inputs."""

from __future__ import annotations

from typing import Any

from pipeline.spec.model import PADDING_MASK
from pipeline.spec.spec import BATCH, Spec

SEED = 20240229


def shapes(spec: Spec, batch_sizes: tuple[int, ...] | None = None) -> list[dict[str, int]]:
    """Every batch size, each with every index of the dynamic dims' sizes (so each dim takes ≥ 2 values)."""
    sizes = spec.dims
    width = max((len(v) for v in sizes.values()), default=1)
    out = []
    for b in batch_sizes or spec.parity.batch_sizes:
        for j in range(width):
            out.append({BATCH: b, **{d: v[j % len(v)] for d, v in sizes.items()}})
    return out


def make(spec: Spec, dims: dict[str, int], seed: int) -> dict[str, Any]:
    """One set of named CPU tensors, as each input's `generate` says, else: floats standard normal (or uniform
    in range), ints uniform in [low, high)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    out = {}
    for t in spec.inputs:
        shape = [dims[d] if isinstance(d, str) else d for d in t.shape]
        dtype = getattr(torch, t.dtype)
        bounds = t.generate if isinstance(t.generate, tuple) else t.range
        if t.generate == PADDING_MASK:
            value = padding_mask(shape, gen).to(dtype)
        elif t.dtype == "bool":
            value = torch.randint(0, 2, shape, generator=gen).bool()
        elif dtype.is_floating_point:
            if bounds is None:
                value = torch.randn(shape, generator=gen)
            else:
                low, high = bounds
                value = torch.rand(shape, generator=gen) * (high - low) + low
            value = value.to(dtype)
        else:
            low, high = bounds
            value = torch.randint(int(low), int(high), shape, generator=gen, dtype=dtype)
        out[t.name] = value
    return out


def padding_mask(shape: list[int], gen: Any) -> Any:
    """Rows of ones then zeros along the last dim, as a tokenizer pads a batch: each row keeps at least one
    one; the first row is unpadded, the others have random lengths."""
    import torch

    length = shape[-1]
    rows = 1
    for n in shape[:-1]:
        rows *= n
    lengths = torch.randint(1, length + 1, (rows,), generator=gen)
    lengths[0] = length
    return (torch.arange(length) < lengths[:, None]).reshape(shape)


def example(spec: Spec) -> dict[str, Any]:
    """Inputs to trace/export with: batch 2 or more (a trace at batch 1 bakes broadcasting in)."""
    dims = {BATCH: max(2, max(spec.parity.batch_sizes))}
    dims.update({d: max(v) for d, v in spec.dims.items()})
    return make(spec, dims, SEED - 1)


def export_dims(spec: Spec, names: list[str], by_name: bool, bounded: bool = False) -> Any:
    """torch.export's `dynamic_shapes` for the inputs `names`: the batch and every declared dynamic dim as export
    dims (each bounded by `dims.NAME.max` where `bounded`), by input name (`by_name`) or in order."""
    import torch

    dims = {d: torch.export.Dim(d, min=1, **({"max": spec.dim_max.get(d)} if bounded else {})) for d in [BATCH, *spec.dims]}
    declared = {t.name: t for t in spec.inputs}
    per_input = {n: {i: dims[d] for i, d in enumerate(declared[n].shape) if isinstance(d, str)} for n in names}
    return per_input if by_name else tuple(per_input.values())
