"""One run of the GPU tests, in the process `run.py` starts: with pytest where it is installed, else with minitest.

Imports `pipeline` and `handlers` from MARPIPE_TEST_SITE (marpipe as pip installed it) and refuses to run if they
come from anywhere else; without it, from this source tree. Each test's result is printed as one line as soon as
it is known (a failure's traceback under it) and appended to the --results file as a JSON line, for run.py's
summary. With --dry, first builds a tiny Linear in every format in this process, `inspect`s and `verify`s it:
under run.py's import block, that is the proof that a build needs none of the packages a GPU machine lacks.

With --require-gpu (make test-gpu), a torch that sees no GPU is a failure: every test would be skipped.

Usage: session.py --results FILE [--shim] [--dry | --require-gpu] TEST_PATH...
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
TESTS = HERE.parent
ROOT = TESTS.parent


def line(outcome: str, seconds: float, name: str, detail: str = "") -> str:
    """The summary line of one test, as run.py prints it too."""
    return f"  {outcome:<8}{seconds:7.2f}s  {name}" + (f"  {detail}" if detail else "")


class Emitter:
    """Prints each result to the real stdout (a copy of fd 1 taken before pytest captures it) and records it."""

    def __init__(self, results: Path) -> None:
        self.out = os.fdopen(os.dup(1), "w", buffering=1, encoding="utf-8", errors="replace")
        self.file = results.open("a", encoding="utf-8")

    def record(self, kind: str, **fields: Any) -> None:
        self.file.write(json.dumps({"kind": kind, **fields}) + "\n")
        self.file.flush()

    def start(self, nodeid: str) -> None:
        self.record("start", nodeid=nodeid)

    def __call__(self, nodeid: str, outcome: str, seconds: float, detail: str = "", output: str = "") -> None:
        detail = " ".join(detail.split())[:300]
        self.out.write(line(outcome, seconds, nodeid, detail) + "\n")
        if output.strip():
            self.out.write("".join(f"      | {ln}\n" for ln in output.rstrip().splitlines()[-60:]))
        self.record("result", nodeid=nodeid, outcome=outcome, seconds=round(seconds, 3), detail=detail)


def _last_error_line(text: str) -> str:
    """The line of a pytest report that says what went wrong: its last `E   ` line, else its last line."""
    lines = [ln for ln in text.splitlines() if ln.strip()]
    errors = [ln[1:].strip() for ln in lines if ln.startswith("E ")]
    return errors[-1] if errors else (lines[-1].strip() if lines else "")


class PytestReporter:
    """A pytest plugin: one Emitter call per test (setup, call and teardown together)."""

    def __init__(self, emit: Emitter) -> None:
        self.emit = emit
        self.open: dict[str, dict[str, Any]] = {}

    def pytest_collectreport(self, report: Any) -> None:
        if report.failed:
            detail = "collection error: " + _last_error_line(report.longreprtext)
            self.emit(report.nodeid or "collection", "failed", 0.0, detail, report.longreprtext)

    def pytest_runtest_logstart(self, nodeid: str, location: Any) -> None:
        self.emit.start(nodeid)

    def pytest_runtest_logreport(self, report: Any) -> None:
        state = self.open.setdefault(report.nodeid, {"outcome": "passed", "seconds": 0.0, "detail": "", "output": ""})
        state["seconds"] += report.duration
        if report.skipped and state["outcome"] == "passed":
            reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
            reason = f"xfail: {report.wasxfail}" if hasattr(report, "wasxfail") else reason.removeprefix("Skipped: ")
            state.update(outcome="skipped", detail=reason)
        elif report.failed and state["outcome"] != "failed":
            crash = getattr(getattr(report.longrepr, "reprcrash", None), "message", "") or _last_error_line(report.longreprtext)
            where = "" if report.when == "call" else f"error at {report.when}: "
            state.update(outcome="failed", detail=where + crash.strip().split("\n")[0], output=report.longreprtext)
        if report.when == "teardown":
            self.emit(report.nodeid, **self.open.pop(report.nodeid))


def _use_installed() -> str:
    """Put marpipe's packages first on sys.path and say where they come from; exit 3 if not from the installed copy."""
    site = os.environ.get("MARPIPE_TEST_SITE")
    sys.path[:0] = [site or str(ROOT), str(TESTS)]
    import handlers
    import pipeline

    where = Path(pipeline.__file__).resolve().parent.parent
    if site and not all(Path(m.__file__).resolve().is_relative_to(Path(site).resolve()) for m in (pipeline, handlers)):
        print(f"session: pipeline comes from {pipeline.__file__}, not from the installed copy in {site}", file=sys.stderr)
        sys.exit(3)
    return f"marpipe {pipeline.__version__} from {where}"


def _machine() -> str:
    import torch

    gpu = f"{torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else "no GPU"
    cuda = f" (CUDA {torch.version.cuda})" if torch.version.cuda else " (a CPU build)"
    return f"{gpu}, torch {torch.__version__}{cuda}, python {sys.version.split()[0]}"


def gpu_seen(emit: Emitter) -> bool:
    """Whether torch sees a GPU; if not, a failed line: on such a machine every GPU test is skipped, and a run that
    checked nothing must not pass."""
    import torch

    if torch.cuda.is_available():
        return True
    build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU build"
    why = f"torch {torch.__version__} ({build}) sees no CUDA GPU: set GPU_PYTHON to a Python with CUDA torch, or DRY=1 on a CPU"
    emit("cuda", "failed", 0.0, why)
    return False


TINY = """import torch


class Tiny(torch.nn.Linear):
    def __init__(self):
        super().__init__(4, 2)
"""


def dry_build(emit: Emitter, workdir: Path) -> bool:
    """`marpipe build --format all`, `inspect` and `verify` of a tiny Linear, in this process (under the import block)."""
    start = time.perf_counter()
    name = "dry: marpipe build --format all, inspect and verify of a tiny Linear, with the blocked packages absent"
    try:
        import torch
        import yaml

        from pipeline import cli

        blocked = [m for m in os.environ.get("MARPIPE_BLOCK_IMPORTS", "").split(",") if m]
        leaked = [m for m in blocked if _importable(m)]
        assert not leaked, f"the import block lets {leaked} be imported"
        workdir.mkdir(parents=True, exist_ok=True)
        torch.save(torch.nn.Linear(4, 2).state_dict(), workdir / "tiny.pth")
        (workdir / "model.py").write_text(TINY)
        spec = {"name": "tiny", "architecture": {"file": "model.py", "class": "Tiny"}, "checkpoint": {"path": "tiny.pth"}}
        spec["inputs"] = [{"name": "x", "shape": ["batch", 4]}]
        (workdir / "tiny.yaml").write_text(yaml.safe_dump(spec))
        store = workdir / "store"
        out = io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            codes = [
                cli.main(["build", "--store", str(store), "--format", "all", str(workdir / "tiny.yaml")]),
                cli.main(["inspect", str(workdir / "tiny.pth")]),
                cli.main(["verify", *map(str, sorted(store.glob("*.mar")))]),
            ]
        from pipeline.stages.aoti import compiler_missing

        formats = 3 if compiler_missing() else 4  # aoti where a C++ compiler is found
        assert codes == [0, 0, 0] and len(list(store.glob("*.mar"))) == formats, f"exit codes {codes}: {out.getvalue()[-800:]}"
        emit(name, "passed", time.perf_counter() - start)
        return True
    except Exception as exc:  # noqa: BLE001 (reported as this check's failure)
        emit(name, "failed", time.perf_counter() - start, f"{type(exc).__name__}: {exc}", traceback.format_exc())
        return False


def _importable(name: str) -> bool:
    try:
        importlib.import_module(name)
    except ImportError:
        return False
    return True


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("paths", nargs="+", type=Path)
    p.add_argument("--results", type=Path, required=True)
    p.add_argument("--shim", action="store_true", help="use minitest even where pytest is installed")
    p.add_argument("--dry", action="store_true", help="first build, inspect and verify a tiny Linear in this process")
    p.add_argument("--require-gpu", action="store_true", help="fail (and still run the tests) if torch sees no GPU")
    args = p.parse_args(argv)
    emit = Emitter(args.results)
    where = _use_installed()
    pytest = None
    if not args.shim:
        try:
            import pytest
        except ImportError:
            pass
    runner = f"pytest {pytest.__version__}" if pytest else "minitest (pytest cannot be imported)" if not args.shim else "minitest"
    machine = _machine()
    emit.record("meta", machine=machine, marpipe=where, runner=runner)
    emit.out.write(f"session: {machine}; {where}; tests run by {runner}\n")
    ok = dry_build(emit, args.results.parent / "dry-build") if args.dry else gpu_seen(emit) if args.require_gpu else True
    paths = [p.resolve() for p in args.paths]
    if pytest is not None:
        rc = pytest.main(
            [*map(str, paths), "--rootdir", str(ROOT), "-p", "no:cacheprovider", "-p", "no:terminal", "--continue-on-collection-errors"]
            + ["-o", "addopts=--strict-markers"],
            plugins=[PytestReporter(emit)],
        )
    else:
        import minirun

        files = sorted(f for p in paths for f in ([p] if p.is_file() else p.rglob("test_*.py")))
        report = lambda r: emit(r.nodeid, r.outcome, r.seconds, r.detail, r.output)
        rc = minirun.main(files, TESTS / "conftest.py", ROOT, report, emit.start)
    emit.record("exit", code=int(rc))
    return int(rc) or (0 if ok else 1)


if __name__ == "__main__":
    sys.exit(main())
