"""`export.format: auto`: every candidate format through export and the parity gate, each that passes timed as
the handler serves it, and the fastest packaged as the one archive `<name>.mar`.

Timing: the artifact loaded by the handler's own loader with the handler's own thread choice, at the serving
batch size (`serve.batch_size`) made of the parity inputs, after warm-ups; the median of several runs. The
fastest wins; a simpler format wins a tie within `TIE` (eager over TorchScript over ONNX): it serves with less.
The archive records the choice and every candidate's status, never the timings, so an `auto` rebuild that makes
the same choice is byte-identical (and the build cache keeps the choice without measuring again); the build's
report carries the timings.
"""

from __future__ import annotations

import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.errors import ExportError, ParityError, PipelineError
from pipeline.spec import FORMATS, Spec

if TYPE_CHECKING:
    from pipeline.runner import BuildKey

TIE = 0.05  # a simpler format within 5% of the fastest wins
STATUS = {ExportError: "failed export", ParityError: "failed parity"}


@dataclass
class Candidate:
    """One format tried for a spec: its status, and what packaging the winner needs."""

    format: str
    status: str = "passed"  # passed | failed export | failed parity
    error: str | None = None
    exit_code: int = 0
    median_ms: float | None = None
    p90_ms: float | None = None
    workdir: Path | None = None
    staged: dict[str, Any] = field(default_factory=dict)  # exported, sources, meta, parity (for packaging)

    def record(self) -> dict[str, Any]:
        """What the archive keeps: no timings (the bytes must not depend on how busy the machine was)."""
        return {"status": self.status, **({"error": self.error} if self.error else {})}

    def report(self) -> dict[str, Any]:
        return {**self.record(), "median_ms": self.median_ms, "p90_ms": self.p90_ms}


def try_format(spec: Spec, loaded: Any, fmt: str, workdir: Path, device: str, time_it: bool = True) -> Candidate:
    """Export `fmt`, check parity (the eager model is kept for the next candidate), time it as the handler runs it.

    Export and parity failures become the candidate's status (what was staged before a parity failure stays in
    `staged`, for `marpipe bench`); any other error (the spec itself is wrong) is raised.
    """
    from pipeline.stages import export, package, parity

    fspec = spec.with_format(fmt, suffix=False)
    folder = workdir / fmt
    folder.mkdir(parents=True, exist_ok=True)
    candidate = Candidate(fmt, workdir=folder)
    try:
        exported = export.run(fspec, loaded, folder)
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
    from pipeline.bench import measure

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


def choose(candidates: list[Candidate]) -> Candidate:
    """The fastest passing candidate; a simpler one (earlier in FORMATS) within TIE of it wins instead."""
    passed = [c for c in candidates if c.status == "passed"]
    fastest = min(c.median_ms for c in passed)
    return min((c for c in passed if c.median_ms <= fastest * (1 + TIE)), key=lambda c: FORMATS.index(c.format))


def build(spec: Spec, store: Path, device: str | None, layout: str, build_key: BuildKey) -> Any:
    """Build `<name>.mar` from the fastest candidate that passes parity; all failing is the first failure's error
    (in the order eager, TorchScript, ONNX)."""
    from pipeline import runner
    from pipeline.stages import load, package, parity

    report = runner.BuildReport(spec=str(spec.source), name=spec.name, format="auto")
    dev = parity.resolve_device(spec, device)
    runner.clean_stale_workdirs()
    workdir = Path(tempfile.mkdtemp(prefix=f"marpipe-{__import__('os').getpid()}-{spec.name}-"))
    try:
        loaded = runner.timed(report, "load", lambda: load.run(spec), runner.load_detail)
        candidates: list[Candidate] = []

        def try_all() -> list[Candidate]:
            for fmt in (f for f in FORMATS if f in spec.export.candidates):
                start = time.perf_counter()
                candidates.append(try_format(spec, loaded, fmt, workdir, dev))
                _say(spec.name, candidates[-1], time.perf_counter() - start)
            return candidates

        runner.timed(report, "export", try_all, lambda cs: ", ".join(f"{c.format} {c.status}" for c in cs))
        report.auto = {"candidates": {c.format: c.report() for c in candidates}}
        if not any(c.status == "passed" for c in candidates):
            first = candidates[0]
            raise (ExportError if first.status == "failed export" else ParityError)(
                f"{spec.name}: format auto: no candidate passed; {first.format}: {first.error}"
            )
        best = choose(candidates)
        report.format = best.format
        report.auto["choice"] = best.format
        staged = best.staged
        meta = dict(staged["meta"], auto={"choice": best.format, "candidates": {c.format: c.record() for c in candidates}})
        runner.record_key(meta, build_key)
        runner.skip_stage(report, "parity", f"{dev}: every candidate above")
        report.parity = staged["parity"].record()
        loaded.release()
        with package.begin(staged["spec"], store, loaded, staged["exported"], layout) as draft:
            packed = runner.timed(
                report,
                "package",
                lambda: package.run(staged["spec"], draft, best.workdir, staged["sources"], staged["exported"], meta, staged["parity"]),
                runner.package_detail,
            )
        report.archive = str(packed.archive)
    except PipelineError as exc:
        report.error, report.exit_code = str(exc), exc.exit_code
        exc.report = report
        raise
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return report


def _say(name: str, c: Candidate, took: float) -> None:
    timing = f", {c.median_ms:.2f} ms median / {c.p90_ms:.2f} ms p90 at the serving batch" if c.median_ms is not None else ""
    why = f": {c.error}" if c.error else ""
    print(f"{name:<24} auto     {c.format:<12} {took:6.2f}s  {c.status}{timing}{why}"[:400])
