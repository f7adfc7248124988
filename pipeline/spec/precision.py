"""What `export.precision` and `export.candidates` entries (`FORMAT` or `FORMAT:PRECISION`) may name, read before
torch is imported; and which archives `--format` builds when a spec names several precisions.

fp32 is every format's. int8 (dynamic quantization of linear and recurrent layers) is eager's, TorchScript's and
ONNX's. fp16 and bf16 (weights and compute in that type) are every torch-based format's, not ONNX's: onnxruntime's
CPU provider, the one marpipe's parity and a CPU server run, computes in float32 around most fp16 ops (see
docs/formats.md). Where a precision may run (int8 on the CPU, fp16 on a GPU, bf16 on a GPU or a CPU with AMX) is
decided with torch, in `pipeline/stages/precision.py`.
"""

from __future__ import annotations

from typing import Any

from pipeline.errors import SpecError
from pipeline.spec.reader import Reader

FP32 = "fp32"
PRECISIONS = (FP32, "fp16", "bf16", "int8")  # in order of accuracy: auto prefers the earlier on a tie
INT8_FORMATS = ("eager", "torchscript", "onnx")  # torch.ao's or onnxruntime's dynamic quantization
NO_HALF_FORMATS = ("onnx",)  # fp16/bf16 need the compute in that type: torch's


def supports(fmt: str, precision: str) -> bool:
    if precision == FP32:
        return True
    if precision == "int8":
        return fmt in INT8_FORMATS
    return fmt not in NO_HALF_FORMATS


def why_not(fmt: str, precision: str) -> str:
    """Why `fmt` does not take `precision`, and what does."""
    takes = ", ".join(p for p in PRECISIONS if supports(fmt, p))
    if precision == "int8":
        return f"int8 is not available in {fmt} (int8: {', '.join(INT8_FORMATS)}); {fmt} takes {takes}"
    return (
        f"{precision} is not available in {fmt}: onnxruntime's CPU provider computes most {precision} ops in float32; "
        f"{fmt} takes {takes}, and {precision} is for the torch-based formats"
    )


def label(fmt: str, precision: str) -> str:
    """How auto's record and report name a candidate: `onnx`, `onnx:int8`."""
    return fmt if precision == FP32 else f"{fmt}:{precision}"


def split(name: str) -> tuple[str, str]:
    """(format, precision) of a candidate label."""
    fmt, _, precision = name.partition(":")
    return fmt, precision or FP32


def candidates(r: Reader, value: Any, formats: tuple[str, ...], precision: str) -> tuple[str, ...]:
    """`export.candidates` as labels, in the order auto tries them (formats' order, then PRECISIONS'): a bare
    format is at `export.precision`."""
    found: list[str] = []
    for i, item in enumerate(r.list_(value, "export.candidates")):
        where = f"export.candidates[{i}]"
        fmt, sep, prec = r.str_(item, where).partition(":")
        if fmt not in formats:
            raise r.fail(where, f"{item!r}: unknown format {fmt!r}; use one of {', '.join(formats)}, optionally as FORMAT:PRECISION")
        if sep and prec not in PRECISIONS:
            raise r.fail(where, f"{item!r}: unknown precision {prec!r}; use one of {', '.join(PRECISIONS)} (e.g. {fmt}:int8)")
        prec = prec if sep else precision
        if not supports(fmt, prec):
            raise r.fail(where, f"{item!r}: {why_not(fmt, prec)}")
        found.append(label(fmt, prec))
    if not found or len(set(found)) != len(found):
        raise r.fail("export.candidates", f"give one or more different candidates (FORMAT or FORMAT:PRECISION), got {found}")
    return tuple(sorted(found, key=lambda c: (formats.index(split(c)[0]), PRECISIONS.index(split(c)[1]))))


def default_candidates(formats: tuple[str, ...], precision: str) -> tuple[str, ...]:
    """What auto tries without `export.candidates`: every format that takes `export.precision`."""
    return tuple(label(f, precision) for f in formats if supports(f, precision))


def precisions(candidates: tuple[str, ...]) -> list[str]:
    """The precisions a spec names through its candidates, in PRECISIONS' order."""
    named = {split(c)[1] for c in candidates}
    return [p for p in PRECISIONS if p in named]


def builds(spec: Any, formats: list[str]) -> list[Any]:
    """The builds `--format F,G` (or `all`) makes of a `Spec`: each format at each precision the spec names (its
    candidates' precisions; `export.precision` alone when it has none), skipping a format that does not take a
    precision. Named `<name>_<format>` with several formats, `<name>_<format>_<precision>` with several
    precisions, `<name>` otherwise; `--format auto` is one build, of the spec's own candidates."""
    if formats == ["auto"]:
        return [spec.with_format("auto", suffix=False)]
    named = precisions(spec.export.candidates) or [spec.export.precision]
    several = len(named) > 1
    jobs = [
        spec.with_format(f, suffix=len(formats) > 1 or several, precision=p, tag=several) for f in formats for p in named if supports(f, p)
    ]
    if not jobs:
        raise SpecError(f"{spec.source}: export.precision: {why_not(formats[0], named[0])} (--format {','.join(formats)})")
    return jobs
