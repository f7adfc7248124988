"""`marpipe bench SPEC`: in-process latency of each format at the spec's batch sizes, with its parity result (and
aoti's compile time).

Each format goes through the real stages (load, export, parity) into a scratch folder, then the artifact is
run exactly as the handler runs it. Nothing is written to a model store.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

from pipeline.build.trial import measure, try_format
from pipeline.spec.precision import supports
from pipeline.spec.spec import FORMATS, Spec
from pipeline.stages import inputs


def bench_format(spec: Spec, loaded: Any, fmt: str, batch_sizes: tuple[int, ...], iterations: int, device: str) -> dict[str, Any]:
    """One format through the real stages (`trial.try_format`: export, parity) into a scratch folder, then its
    artifact timed as the handler runs it; a failed parity is reported and the artifact still timed."""
    from handlers.marpipe_serving.models import load_runner

    workdir = Path(tempfile.mkdtemp(prefix="marpipe-bench-"))
    row: dict[str, Any] = {"format": fmt}
    try:
        tried = try_format(spec, loaded, fmt, workdir, device, time_it=False)
        if tried.status in ("failed export", "skipped"):
            row["parity"] = f"export {tried.status.split()[0]} ({tried.exit_code}): {tried.error}"
            return row
        row["parity"] = "pass" if tried.status == "passed" else f"FAIL ({tried.exit_code})"
        row["compile_s"] = tried.compile_s
        row["max_abs"] = max(r.max_abs for r in tried.staged["parity"].outputs.values()) if tried.status == "passed" else None
        import torch

        meta = tried.staged["meta"]
        runner = load_runner(str(tried.workdir), meta, device, 0 if device == "cuda" else None, threads=torch.get_num_threads())
        sizes = {d: v[0] for d, v in spec.dims.items()}
        for b in batch_sizes:
            arrays = {k: v.numpy() for k, v in inputs.make(spec, {"batch": b, **sizes}, inputs.SEED).items()}
            row[f"batch {b}"] = measure(runner, arrays, iterations)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return row


def bench(spec: Spec, formats: list[str] | None, iterations: int, device: str) -> list[dict[str, Any]]:
    from pipeline.stages import load

    loaded = load.run(spec)  # once: every format starts from the same eager model
    at = [f for f in formats or FORMATS if supports(f, spec.export.precision)]  # at the spec's precision (ONNX takes no fp16)
    rows = [bench_format(spec, loaded, f, spec.parity.batch_sizes, iterations, device) for f in at]
    sizes = spec.parity.batch_sizes
    print(f"\n{spec.name}: in-process latency on {device}, median / p90 of {iterations} runs (ms)")
    print(f"{'format':<12} {'parity':<10} {'max abs':>9} {'compile':>8}  " + "  ".join(f"{'batch ' + str(b):>15}" for b in sizes))
    for r in rows:
        err = "-" if r.get("max_abs") is None else f"{r['max_abs']:.2g}"
        took = "-" if r.get("compile_s") is None else f"{r['compile_s']:.1f}s"
        cells = [_cell(r.get(f"batch {b}")) for b in sizes]
        print(f"{r['format']:<12} {r['parity'][:10]:<10} {err:>9} {took:>8}  " + "  ".join(cells))
    return rows


def _cell(figures: dict[str, float] | None) -> str:
    return f"{figures['median_ms']:6.2f} / {figures['p90_ms']:6.2f}" if figures else f"{'-':>15}"
