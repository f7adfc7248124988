"""One candidate format (at a precision) tried for a spec: exported, checked by the parity gate (the accuracy gate
below fp32), timed as the handler serves it.

`auto` tries every candidate and packages the fastest; `marpipe bench` tries each format to report its latency.
"""

from __future__ import annotations

import re
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.errors import ExportError, ParityError
from pipeline.spec import precision as precisions
from pipeline.spec.spec import Spec

STATUS = {ExportError: "failed export", ParityError: "failed parity"}


@dataclass
class Candidate:
    """One format tried for a spec: its status, and what packaging the winner needs."""

    format: str
    precision: str = precisions.FP32
    status: str = "passed"  # passed | failed export | failed parity | skipped (aoti without a C++ compiler)
    error: str | None = None
    exit_code: int = 0
    median_ms: float | None = None
    p90_ms: float | None = None
    compile_s: float | None = None  # aoti: the compile's seconds
    workdir: Path | None = None
    staged: dict[str, Any] = field(default_factory=dict)  # exported, sources, meta, parity (for packaging)

    @property
    def label(self) -> str:
        """`onnx`, `onnx:int8`: as auto's record names it."""
        return precisions.label(self.format, self.precision)

    def record(self) -> dict[str, Any]:
        """What the archive keeps: no timings (the bytes must not depend on how busy the machine was)."""
        return {"status": self.status, **({"error": self.error} if self.error else {})}

    def report(self) -> dict[str, Any]:
        """The build's report: the timings (aoti: the compile's too), and each output's agreement and cosine with eager
        once parity passed."""
        checked = self.staged.get("parity")
        measures = {"outputs": {n: r.measured.as_dict() for n, r in checked.outputs.items()}} if checked else {}
        compiled = {"compile_s": self.compile_s} if self.compile_s is not None else {}
        return {**self.record(), "median_ms": self.median_ms, "p90_ms": self.p90_ms, **compiled, **measures}


def try_format(
    spec: Spec, loaded: Any, fmt: str, workdir: Path, device: str, time_it: bool = True, precision: str | None = None
) -> Candidate:
    """Export `fmt` (at `precision`, else the spec's), check parity (the eager model is kept for the next candidate),
    time it as the handler runs it.

    Export and parity failures become the candidate's status (what was staged before a parity failure stays in
    `staged`, for `marpipe bench`); aoti where no C++ compiler is found is `skipped`, with the reason; any other
    error (the spec itself is wrong) is raised.
    """
    from pipeline.stages import aoti, export, package, parity

    fspec = spec.with_format(fmt, suffix=False, precision=precision)
    candidate = Candidate(fmt, fspec.export.precision)
    folder = workdir / candidate.label.replace(":", "_")
    folder.mkdir(parents=True, exist_ok=True)
    candidate.workdir = folder
    missing = aoti.compiler_missing() if fmt == "aoti" else None
    if missing:
        candidate.status, candidate.error, candidate.exit_code = "skipped", missing, ExportError.exit_code
        return candidate
    try:
        exported = export.run(fspec, loaded, folder, device)
        candidate.compile_s = exported.compile_s
        sources = package.stage_sources(fspec, folder)
        meta = package.metadata(fspec, loaded, exported)
        candidate.staged = {"spec": fspec, "exported": exported, "sources": sources, "meta": meta}
        checked = parity.run(fspec, loaded, folder, meta, device)
    except (ExportError, ParityError) as exc:
        candidate.status, candidate.error, candidate.exit_code = STATUS[type(exc)], stable(str(exc), workdir), exc.exit_code
        return candidate
    candidate.staged["parity"] = checked
    if time_it:
        candidate.median_ms, candidate.p90_ms = serving_latency(folder, meta, checked, device, spec.serve.batch_size)
    return candidate


def stable(message: str, workdir: Path) -> str:
    """An error as the archive records it: no build folder or object address, which differ from run to run (the
    archive of an unchanged auto build must not)."""
    message = message.replace(str(workdir), "<build folder>")
    message = re.sub(r"/tmp/marpipe-\d+-[^\s/]*", "<build folder>", message)
    return re.sub(r" at 0x[0-9a-fA-F]+", "", message)


def serving_latency(folder: Path, meta: dict[str, Any], checked: Any, device: str, batch_size: int) -> tuple[float, float]:
    """(median, p90) ms of one forward pass at the serving batch size, as the handler runs it: its loader, its
    thread choice, the parity inputs repeated to `batch_size` rows, after warm-ups."""
    import torch

    from handlers.marpipe_serving.models import repeat_rows, serving_runner

    before = torch.get_num_threads()
    try:
        runner, _, _ = serving_runner(str(folder), meta, device, 0 if device == "cuda" else None, checked.reference_inputs)
        batch = repeat_rows(checked.reference_inputs, batch_size)
        first = measure(runner, batch, 1, warmup=2)["median_ms"]
        runs = max(5, min(30, int(1000 / max(first, 1e-3))))  # about a second of runs, at least five
        figures = measure(runner, batch, runs, warmup=1)
    finally:
        torch.set_num_threads(before)
    return figures["median_ms"], figures["p90_ms"]


def measure(runner: Any, arrays: dict[str, Any], iterations: int, warmup: int = 3) -> dict[str, float]:
    """Median and p90 latency in ms of `runner(arrays)`."""
    for _ in range(warmup):
        runner(arrays)
    times = []
    for _ in range(iterations):
        start = time.perf_counter()
        runner(arrays)
        times.append((time.perf_counter() - start) * 1000)
    times.sort()
    return {"median_ms": statistics.median(times), "p90_ms": times[min(len(times) - 1, int(0.9 * len(times)))]}
