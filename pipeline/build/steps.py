"""How a build runs its stages, shared by the runner and `auto`: each stage's result (status, time, detail) in the
build's report, the one line printed per stage, the build key recorded in the archive, the staging folders of
builds that were killed.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.store.archive import alive

STAGES = ("load", "export", "parity", "package")


@dataclass
class StageResult:
    name: str
    status: str = "skipped"  # ok | failed | skipped
    duration_s: float = 0.0
    detail: str = ""


@dataclass
class BuildReport:
    spec: str
    name: str
    format: str
    precision: str = "fp32"  # export.precision (auto: its choice's)
    stages: list[StageResult] = field(default_factory=lambda: [StageResult(s) for s in STAGES])
    archive: str | None = None
    error: str | None = None
    exit_code: int = 0
    parity: dict[str, Any] | None = None
    auto: dict[str, Any] | None = None  # format auto: each candidate's status and latency, and the choice
    compile_s: float | None = None  # aoti: the compile's seconds (inside the export stage's)
    digest: Any = None  # the archive's `archive.Digest`, for the index (not part of the report's JSON)

    def as_dict(self) -> dict[str, Any]:
        return {
            "spec": self.spec,
            "name": self.name,
            "format": self.format,
            "precision": self.precision,
            "status": "failed" if self.error else "ok",
            "exit_code": self.exit_code,
            "error": self.error,
            "archive": self.archive,
            "parity": self.parity,
            "stages": [vars(s) for s in self.stages],
            **({"auto": self.auto} if self.auto else {}),
            **({"compile_s": self.compile_s} if self.compile_s is not None else {}),
            **({"digest": self.digest._asdict()} if self.digest else {}),
        }


def timed(report: BuildReport, name: str, fn: Callable[[], Any], detail: Callable[[Any], str]) -> Any:
    stage = next(s for s in report.stages if s.name == name)
    start = time.perf_counter()
    try:
        result = fn()
    except BaseException:
        stage.status, stage.duration_s = "failed", round(time.perf_counter() - start, 3)
        _say(report.name, stage)
        raise
    stage.status, stage.duration_s, stage.detail = "ok", round(time.perf_counter() - start, 3), detail(result)
    _say(report.name, stage)
    return result


def skip_stage(report: BuildReport, name: str, detail: str) -> None:
    """A stage another one did the work of (auto's candidates run parity inside export): ok, 0 s, said why."""
    stage = next(s for s in report.stages if s.name == name)
    stage.status, stage.detail = "ok", detail
    _say(report.name, stage)


def _say(name: str, stage: StageResult) -> None:
    print(f"{name:<24} {stage.name:<8} {stage.status:<6} {stage.duration_s:7.2f}s  {stage.detail}")


BuildKey = str | Callable[[], str] | None  # a callable is called after the load stage, whose hash it reuses


def record_key(meta: dict[str, Any], build_key: BuildKey) -> None:
    """The build key, if any, into the archive's marpipe.json (a callable computed now)."""
    if build_key:
        meta["build_key"] = build_key() if callable(build_key) else build_key


def workdir(name: str) -> Path:
    """A private staging folder for one build of `name` (builds never share one), after removing those of builds
    that were killed; the caller removes it."""
    clean_stale_workdirs()
    return Path(tempfile.mkdtemp(prefix=f"marpipe-{os.getpid()}-{name}-"))


def clean_stale_workdirs() -> None:
    """Remove staging folders of builds that were killed (their pid no longer runs)."""
    for path in Path(tempfile.gettempdir()).glob("marpipe-*-*"):
        pid = path.name.split("-")[1]
        if path.is_dir() and pid.isdigit() and int(pid) != os.getpid() and not alive(int(pid)):  # ours are in use
            shutil.rmtree(path, ignore_errors=True)


def parity_detail(device: str) -> Callable[[Any], str]:
    """The parity stage's line: the device, the generated runs, and the references checked besides."""

    def detail(p: Any) -> str:
        extra = ", from_pretrained reference" if p.from_pretrained else ""
        if p.reference:
            extra += f", {p.reference['rows']} rows of {p.reference['file']}"
        return f"{device}, {len(p.shapes)} shapes × {p.samples} samples{extra}"

    return detail


def export_detail(e: Any) -> str:
    """The export stage's line: the format and how it was made (an aoti package's compile time too)."""
    took = f", compiled in {e.compile_s:.2f}s" if e.compile_s is not None else ""
    return f"{e.format}: {e.detail}{took}"


def package_detail(p: Any) -> str:
    ahead = f", {p.copied_ahead} copied during parity" if p.copied_ahead else ""
    return f"{p.archive} ({p.size / 1e6:.1f} MB, {len(p.entries)} entries{ahead})"


def load_detail(loaded: Any) -> str:
    ck = loaded.checkpoint
    parts = [ck.format + (f" ({len(ck.shards) - 1} shards)" if ck.shards else ""), f"{len(ck.state_dict)} tensors"]
    if ck.nested_key:
        parts.append(f"from '{ck.nested_key}'")
    if ck.stripped:
        parts.append("stripped " + " ".join(ck.stripped))
    if loaded.skipped:
        parts.append(f"skipped {len(loaded.skipped)} keys ({', '.join(loaded.skipped[:3])})")
    if ck.ignored_extras:
        parts.append(f"ignored extras ({', '.join(ck.ignored_extras[:3])})")
    if loaded.tied:
        parts.append(f"{len(loaded.tied)} tied keys")
    if loaded.converted:
        parts.append(f"{loaded.converted} keys renamed by transformers")
    if loaded.source is not None and loaded.source.cache_off:
        parts.append("use_cache=False (the forward's cache is no answer)")
    parts.append("inputs by keyword" if loaded.by_name else "inputs by position")
    return ", ".join(parts)
