"""`make bench` (after bench.py): release builds of the examples in all three formats.

Measures, on this machine: a cold `marpipe build --format all` with `-j 1` and with `-j 2` (wall time, median
of --runs, each into a fresh store), and an unchanged re-run against the `-j 2` store (wall, median), with a
separate run of the CLI's main() that reports whether torch was imported. Also checks that the `-j 1` and
`-j 2` stores hold byte-identical archives. Not a test: prints figures and ratios and writes
benchmarks/out/release_bench.json.

  python benchmarks/release_bench.py [--runs 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SPECS = sorted(str(p) for p in (ROOT / "examples").glob("*.yaml"))
MARPIPE = [sys.executable, "-m", "pipeline"]


CPU: dict[str, list[float]] = {}


def build(store: Path, *extra: str, label: str = "") -> float:
    """Wall seconds of one build; its CPU seconds (user + system, all its processes) go to CPU[label]."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run([*MARPIPE, "build", *SPECS, "--format", "all", "--store", str(store), *extra], capture_output=True, text=True)
    took = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise SystemExit(f"build failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    CPU.setdefault(label, []).append(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime)
    return took


def torch_imported(store: Path) -> tuple[bool, list[str]]:
    """An unchanged run through the CLI's main(): whether torch ended up in sys.modules, and the statuses."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "r.json"
        code = "import sys; from pipeline.cli import main; rc = main(sys.argv[1:]); print('RESULT', rc, 'torch' in sys.modules)"
        args = ["build", *SPECS, "--format", "all", "--store", str(store), "--report", str(report)]
        proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=ROOT)
        last = proc.stdout.strip().splitlines()[-1].split()
        statuses = [b["status"] for b in json.loads(report.read_text())["builds"]]
    return last[2] == "True", statuses


def machine() -> str:
    model = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines() if "model name" in ln), "?")
    return f"{os.cpu_count()} cores ({model}), Python {platform.python_version()}"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out")
    args = p.parse_args()
    env_root = Path(tempfile.mkdtemp(prefix="marpipe-release-bench-"))
    try:
        walls: dict[str, list[float]] = {"j1": [], "j2": [], "unchanged": []}
        for run in range(args.runs):
            for jobs in ("1", "2"):  # in turns, so that the machine's load drifts over both alike
                store = env_root / f"j{jobs}-{run}"
                walls[f"j{jobs}"].append(build(store, "-j", jobs, label=f"j{jobs}"))
                load = os.getloadavg()[0]
                print(
                    f"run {run + 1}: -j {jobs} cold {walls[f'j{jobs}'][-1]:.1f} s wall, {CPU[f'j{jobs}'][-1]:.1f} s CPU, load {load:.1f}",
                    flush=True,
                )
        store = env_root / f"j2-{args.runs - 1}"
        for _ in range(args.runs):
            walls["unchanged"].append(build(store, "-j", "2", label="unchanged"))
        imported, statuses = torch_imported(store)
        identical = all(
            (env_root / "j1-0" / p.name).read_bytes() == p.read_bytes() for p in (env_root / f"j2-{args.runs - 1}").glob("*.mar")
        )
    finally:
        shutil.rmtree(env_root, ignore_errors=True)
    med = {k: statistics.median(v) for k, v in walls.items()}
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine(),
        "archives": len(statuses),
        "runs": args.runs,
        "wall_s": walls,
        "median_s": med,
        "cpu_s": CPU,
        "median_cpu_s": {k: statistics.median(v) for k, v in CPU.items()},
        "load_average_end": os.getloadavg(),
        "j2_over_j1": med["j2"] / med["j1"],
        "unchanged_over_cold_j1": med["unchanged"] / med["j1"],
        "unchanged_imported_torch": imported,
        "unchanged_statuses": sorted(set(statuses)),
        "j1_j2_archives_identical": identical,
    }
    print(f"\nrelease builds: examples × 3 formats = {len(statuses)} archives, {machine()}, median of {args.runs}")
    cpu = result["median_cpu_s"]
    print("| run | wall (median) | vs cold -j 1 | CPU s (median) |\n| --- | --- | --- | --- |")
    print(f"| cold, -j 1 | {med['j1']:.1f} s | 1.00 | {cpu['j1']:.1f} |")
    print(f"| cold, -j 2 | {med['j2']:.1f} s | {result['j2_over_j1']:.2f} | {cpu['j2']:.1f} |")
    print(f"| unchanged re-run | {med['unchanged']:.2f} s | {result['unchanged_over_cold_j1']:.3f} | {cpu['unchanged']:.2f} |")
    print(
        f"unchanged run imported torch: {imported}; statuses {result['unchanged_statuses']}; -j 1 and -j 2 archives identical: {identical}"
    )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "release_bench.json").write_text(json.dumps(result, indent=2) + "\n")
    return 0 if not imported and identical and result["unchanged_statuses"] == ["unchanged"] else 1


if __name__ == "__main__":
    sys.exit(main())
