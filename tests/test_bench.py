"""`marpipe bench` and the `make bench` script run and report figures (no timing is asserted)."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import ROOT, Project, marpipe


def test_marpipe_bench_compares_formats_with_parity(linear_project: Project) -> None:
    out = linear_project.root / "bench.json"
    result = marpipe("bench", str(linear_project.spec()), "--iterations", "3", "--json", str(out))
    assert result.returncode == 0, result.stderr
    rows = json.loads(out.read_text())["rows"]
    assert [r["format"] for r in rows] == ["eager", "torchscript", "onnx", "aoti"]
    for row in rows:
        assert row["parity"] == "pass"
        assert row["batch 1"]["median_ms"] > 0 and row["batch 4"]["p90_ms"] >= row["batch 4"]["median_ms"]
        assert (row["compile_s"] is not None) == (row["format"] == "aoti")  # aoti's compile time, in its column
    assert "in-process latency" in result.stdout and "torchscript" in result.stdout


def test_marpipe_bench_reports_a_parity_failure(project: Project) -> None:
    project.save(project.model("ShapeBranch").state_dict(), "tiny.pth")
    result = marpipe("bench", str(project.spec(cls="ShapeBranch")), "--iterations", "2", "--format", "eager,torchscript")
    assert result.returncode == 0, result.stderr
    lines = {ln.split()[0]: ln for ln in result.stdout.splitlines() if ln.startswith(("eager", "torchscript"))}
    assert "pass" in lines["eager"] and "FAIL (5)" in lines["torchscript"]


def test_bench_script_packaging_section(tmp_path) -> None:
    script = str(ROOT / "benchmarks" / "bench.py")
    args = ["--size-gb", "0.02", "--runs", "1", "--only", "pack", "--out", str(tmp_path)]
    result = subprocess.run([sys.executable, script, *args], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    figures = json.loads((tmp_path / "bench.json").read_text())["pack"]
    assert set(figures["ratios"]) >= {"tma_default_over_build", "build_over_sha256sum", "peak_rss_over_checkpoint_plus_torch"}
    assert "marpipe build / sha256sum" in result.stdout
