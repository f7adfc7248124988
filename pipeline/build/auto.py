"""`export.format: auto`: every candidate format (at its precision: `onnx:int8`) through export and the parity gate
(the accuracy gate below fp32), each that passes timed as the handler serves it, and the fastest packaged as the one
archive `<name>.mar`.

Timing: the artifact loaded by the handler's own loader with the handler's own thread choice, at the serving
batch size (`serve.batch_size`) made of the parity inputs, after warm-ups; the median of several runs. The
fastest wins; a simpler format wins a tie within `TIE` (eager over TorchScript over ONNX over aoti): it serves
with less; within a format, the more accurate precision (fp32 over fp16 over bf16 over int8). aoti is tried where
a C++ compiler is found, and recorded as skipped, with the reason, where none is.
The archive records the choice and every candidate's status, never the timings, so an `auto` rebuild that makes
the same choice is byte-identical (and the build cache keeps the choice without measuring again); the build's
report carries the timings (and aoti's compile time).
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

from pipeline.build import steps
from pipeline.build.steps import BuildKey
from pipeline.build.trial import Candidate, try_format
from pipeline.errors import ExportError, ParityError, PipelineError
from pipeline.spec.precision import PRECISIONS, split
from pipeline.spec.spec import FORMATS, Spec

TIE = 0.05  # a simpler format within 5% of the fastest wins


def choose(candidates: list[Candidate]) -> Candidate:
    """The fastest passing candidate; a simpler one (earlier in FORMATS, then in PRECISIONS) within TIE of it wins
    instead."""
    passed = [c for c in candidates if c.status == "passed"]
    fastest = min(c.median_ms for c in passed)
    near = (c for c in passed if c.median_ms <= fastest * (1 + TIE))
    return min(near, key=lambda c: (FORMATS.index(c.format), PRECISIONS.index(c.precision)))


def build(spec: Spec, store: Path, device: str | None, layout: str, build_key: BuildKey, sign_key: Path | None = None) -> Any:
    """Build `<name>.mar` from the fastest candidate that passes parity; all failing is the first failure's error
    (in the order eager, TorchScript, ONNX, aoti, fp32 first within a format; aoti skipped for want of a compiler
    counts as an export failure)."""
    from pipeline.stages import load, package, parity

    report = steps.BuildReport(spec=str(spec.source), name=spec.name, format="auto")
    devices = {}  # each candidate's, as its precision allows (int8 on the CPU): checked before any work
    for label in spec.export.candidates:
        fmt, precision = split(label)
        devices[label] = parity.resolve_device(spec.with_format(fmt, False, precision), device, f"export.candidates: {label}")
    dev = ", ".join(sorted(set(devices.values())))
    workdir = steps.workdir(spec.name)
    try:
        loaded = steps.timed(report, "load", lambda: load.run(spec), steps.load_detail)
        candidates: list[Candidate] = []

        def try_all() -> list[Candidate]:
            for label in spec.export.candidates:  # in FORMATS' order, then PRECISIONS'
                start = time.perf_counter()
                fmt, precision = split(label)
                candidates.append(try_format(spec, loaded, fmt, workdir, devices[label], precision=precision))
                _say(spec.name, candidates[-1], time.perf_counter() - start)
            return candidates

        steps.timed(report, "export", try_all, lambda cs: ", ".join(f"{c.label} {c.status}" for c in cs))
        report.auto = {"candidates": {c.label: c.report() for c in candidates}}
        if not any(c.status == "passed" for c in candidates):
            first = candidates[0]
            raise (ParityError if first.status == "failed parity" else ExportError)(
                f"{spec.name}: format auto: no candidate passed; {first.label}: {first.error}"
            )
        best = choose(candidates)
        report.format, report.precision = best.format, best.precision
        report.auto["choice"] = best.label
        staged = best.staged
        meta = dict(staged["meta"], auto={"choice": best.label, "candidates": {c.label: c.record() for c in candidates}})
        steps.record_key(meta, build_key)
        steps.skip_stage(report, "parity", f"{dev}: every candidate above")
        report.parity = staged["parity"].record()
        loaded.release()
        with package.begin(staged["spec"], store, loaded, staged["exported"], layout, sign_key) as draft:
            packed = steps.timed(
                report,
                "package",
                lambda: package.run(staged["spec"], draft, best.workdir, staged["sources"], staged["exported"], meta, staged["parity"]),
                steps.package_detail,
            )
        report.archive, report.digest = str(packed.archive), packed.digest
    except PipelineError as exc:
        report.error, report.exit_code = str(exc), exc.exit_code
        exc.report = report
        raise
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return report


def _say(name: str, c: Candidate, took: float) -> None:
    timing = f", {c.median_ms:.2f} ms median / {c.p90_ms:.2f} ms p90 at the serving batch" if c.median_ms is not None else ""
    timing += f", compiled in {c.compile_s:.2f}s" if c.compile_s is not None else ""
    why = f": {c.error}" if c.error else ""
    print(f"{name:<24} auto     {c.label:<12} {took:6.2f}s  {c.status}{timing}{why}"[:400])
