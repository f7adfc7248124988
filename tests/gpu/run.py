"""`make test-gpu`: install marpipe without its dependencies into a temporary folder, run tests/gpu/ against it, summarise.

For a machine lent with a GPU for minutes: CUDA torch, transformers, onnx and onnxruntime already installed; no
network, Java or TorchServe; pytest perhaps. Standard library only, so it runs before anything is installed.

1. install: pyproject.toml, README.md, pipeline/ and handlers/ are copied to a scratch folder and
   `pip install --no-deps --no-build-isolation --no-index --target SITE` installs them (nothing is downloaded);
   every module of pipeline/ and handlers/ must be in SITE. Should pip fail, the install line fails; without pip or
   setuptools it is skipped; either way the packages pyproject.toml lists are copied instead and the tests still run.
2. session.py runs the tests with PYTHONPATH=SITE, from SITE (so `pipeline` never comes from this tree; the tests'
   `marpipe` subprocesses get MARPIPE_TEST_SITE=SITE), with pytest if installed, else with minitest (minitest.py, minirun.py).
3. One line per test (outcome, seconds, skip reason or the failure's first line) as each ends, and again in the
   summary, then the tally `test-gpu: N passed, N failed, N skipped in S s`. Exit 1 if anything failed, torch saw no
   GPU, a test file did not import, no test ran, or the run passed --timeout (its unfinished test is named).

--dry (`make test-gpu DRY=1`, run by tests/test_gpu_dry.py in CI): the same install, then the run as a GPU machine
would see it: a sitecustomize.py in SITE marks the packages such a machine lacks (BLOCKED) as absent in every process
(the tests' `marpipe build` subprocesses too), pytest among them, so minitest runs the tests; the session first builds
a tiny Linear in every format under that block; the tests that take the `gpu_device` fixture run on the CPU.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
# What a GPU machine lent to this project lacks: TorchServe and its archiver, gRPC, model signing, S3, the dev tools.
BLOCKED = [
    "ts",
    "model_archiver",
    "grpc",
    "grpc_tools",
    "model_signing",
    "OpenSSL",
    "boto3",
    "botocore",
    "moto",
    "s3fs",
    "kserve",
    "tritonclient",
    "hypothesis",
    "orjson",
]
NO_PYTEST = ["pytest", "_pytest", "pluggy"]
SITECUSTOMIZE = '''"""make test-gpu DRY=1: the packages a GPU machine lacks are absent here (import fails, find_spec is None)."""
import os
import sys

for _name in os.environ.get("MARPIPE_BLOCK_IMPORTS", "").split(","):
    if _name:
        sys.modules[_name] = None
'''


def _line(outcome: str, seconds: float, name: str, detail: str = "") -> str:
    return f"  {outcome:<8}{seconds:7.2f}s  {name}" + (f"  {detail}" if detail else "")


def _modules(top: Path) -> set[str]:
    """The .py files of pipeline/ and handlers/ under `top`, relative to it."""
    found = (p for d in ("pipeline", "handlers") for p in (top / d).rglob("*.py"))
    return {p.relative_to(top).as_posix() for p in found if "__pycache__" not in p.parts}


def _copy_packages(site: Path) -> None:
    """The fallback install: the .py files of each package pyproject.toml lists, copied into `site`."""
    shutil.rmtree(site, ignore_errors=True)
    block = re.search(r"^packages = \[(.*?)\]", (ROOT / "pyproject.toml").read_text(), re.S | re.M)
    for package in re.findall(r'"([\w.]+)"', block.group(1) if block else ""):
        folder = site / package.replace(".", "/")
        folder.mkdir(parents=True, exist_ok=True)
        for f in (ROOT / package.replace(".", "/")).glob("*.py"):
            shutil.copy2(f, folder / f.name)


def install(site: Path) -> tuple[str, str]:
    """(outcome, detail): marpipe installed into `site` as pip installs it, without its dependencies."""
    src = site.parent / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    for name in ("pipeline", "handlers"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    how = ["install", "--no-deps", "--no-build-isolation", "--no-index", "--target"]
    absent = [m for m in ("pip", "setuptools") if importlib.util.find_spec(m) is None]
    if absent:  # this Python cannot build the package at all: not marpipe's fault, but nothing is proven either
        _copy_packages(site)
        return "skipped", f"{' and '.join(absent)} not installed: the packages pyproject.toml lists were copied"
    cmd = [sys.executable, "-m", "pip", *how, str(site), str(src), "--disable-pip-version-check", "--no-input", "-q"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        print(proc.stdout[-2000:] + proc.stderr[-3000:], file=sys.stderr)
        why = next((ln.strip() for ln in reversed((proc.stderr or proc.stdout).splitlines()) if ln.strip()), f"exit {proc.returncode}")
        _copy_packages(site)
        return "failed", f"pip failed ({why[:160]}); the packages pyproject.toml lists were copied instead"
    missing = sorted(_modules(ROOT) - _modules(site))
    if missing:
        return (
            "failed",
            f"{len(missing)} modules missing from the installed copy ({', '.join(missing[:5])}): list their packages in pyproject.toml",
        )
    dist = sorted(site.glob("torchserve_pipeline-*.dist-info"))
    if not dist:
        return "failed", "pip installed no torchserve_pipeline-*.dist-info"
    version = dist[0].name.removeprefix("torchserve_pipeline-").removesuffix(".dist-info")
    return "passed", f"torchserve-pipeline {version}, {len(_modules(site))} modules (pip {' '.join(how)} {site})"


def _session(site: Path, tmp: Path, paths: list[str], dry: bool, timeout: float) -> tuple[int | None, Path]:
    """Run session.py; (its exit code or None on timeout, its results file)."""
    results = tmp / "results.jsonl"
    env = {**os.environ, "PYTHONPATH": str(site), "MARPIPE_TEST_SITE": str(site), "PYTHONDONTWRITEBYTECODE": "1"}
    cmd = [sys.executable, str(HERE / "session.py"), "--results", str(results), *paths]
    if dry:
        (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
        env.update(MARPIPE_GPU_DRY="1", MARPIPE_BLOCK_IMPORTS=",".join(BLOCKED + NO_PYTEST))
    cmd.insert(2, "--dry" if dry else "--require-gpu")
    proc = subprocess.Popen(cmd, cwd=site, env=env, start_new_session=True)
    try:
        return proc.wait(timeout=timeout), results
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the session and the builds it started
        proc.wait()
        return None, results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("paths", nargs="*", default=[str(HERE)], help="test files or folders (default: tests/gpu/)")
    p.add_argument("--dry", action="store_true", help="rehearse on a CPU machine, the GPU machine's missing packages blocked")
    p.add_argument("--timeout", type=float, default=450, help="seconds for the whole run, install included (default 450)")
    p.add_argument("--keep", action="store_true", help="keep the temporary folder (printed)")
    args = p.parse_args(argv)
    start = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix="marpipe-test-gpu-"))
    mode = " (dry: on the CPU, with " + ", ".join(BLOCKED + NO_PYTEST) + " blocked)" if args.dry else ""
    print(f"test-gpu: {ROOT} with {sys.executable}{mode}", flush=True)
    try:
        site = tmp / "site"
        outcome, detail = install(site)
        lines = [(outcome, time.monotonic() - start, "install", detail)]
        print(_line(*lines[0]), flush=True)
        left = args.timeout - (time.monotonic() - start)
        code, results = _session(site, tmp, [str(Path(x).resolve()) for x in args.paths], args.dry, left)
        records = [json.loads(x) for x in results.read_text().splitlines()] if results.exists() else []
        meta = next((r for r in records if r["kind"] == "meta"), {})
        lines += [(r["outcome"], r["seconds"], r["nodeid"], r["detail"]) for r in records if r["kind"] == "result"]
        if code is None:
            done = {r["nodeid"] for r in records if r["kind"] == "result"}
            started = [r["nodeid"] for r in records if r["kind"] == "start" and r["nodeid"] not in done]
            hung = started[-1] if started else "before the first test"
            lines.append(("failed", left, "timeout", f"the run passed --timeout {args.timeout:.0f}s, killed in {hung}"))
        elif not any(r["kind"] == "exit" for r in records):  # it died before its runner returned
            lines.append(("failed", 0.0, "session", f"the test session ended early (exit {code}); its output above says why"))
        elif code not in (0, 1) and not any(o == "failed" for o, *_ in lines):
            lines.append(("failed", 0.0, "session", f"the test session exited {code}" + (" (no tests collected)" if code == 5 else "")))
        if not [x for x in lines if x[2] not in ("install", "session", "timeout")]:
            lines.append(("failed", 0.0, "session", "no test ran"))
        counts = {k: sum(o == k for o, *_ in lines) for k in ("passed", "failed", "skipped")}
        print(f"\ntest-gpu summary ({meta.get('machine', 'machine unknown')}; {meta.get('marpipe', '')}; {meta.get('runner', '')}):")
        for x in lines:
            print(_line(*x))
        elapsed = time.monotonic() - start
        print(f"test-gpu: {counts['passed']} passed, {counts['failed']} failed, {counts['skipped']} skipped in {elapsed:.1f}s")
        return 1 if counts["failed"] or code is None else 0
    finally:
        if args.keep:
            print(f"test-gpu: kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
