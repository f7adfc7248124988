"""`make test-gpu` cannot rot: its dry mode runs here, and its stand-in for pytest answers as pytest does.

The GPU check is run only where a GPU machine is lent, for minutes (docs/gpu.md). Here, `make test-gpu DRY=1`
installs marpipe the same way, blocks the packages a GPU machine lacks, and runs every test under tests/gpu/ that
can run on a CPU (the others must still import); and minitest, which runs them where pytest is not installed, is
checked against pytest on a sample of what the GPU tests use.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import ROOT

SESSION = ROOT / "tests" / "gpu" / "session.py"


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU machine runs make test-gpu itself")
def test_make_test_gpu_dry_passes() -> None:
    proc = subprocess.run(
        ["make", "-s", "test-gpu", "DRY=1", f"GPU_PYTHON={sys.executable}"], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    summary = out[out.index("test-gpu summary") :]
    assert re.search(r"^  passed +[\d.]+s  install  torchserve-pipeline \S+, \d+ modules \(pip install --no-deps", summary, re.M)
    assert re.search(r"^  passed +[\d.]+s  dry: marpipe build --format all, inspect and verify", summary, re.M)
    assert "minitest (pytest cannot be imported)" in summary
    ran = re.findall(r"^  (passed|skipped|failed) +[\d.]+s  (tests/gpu/\S+)", summary, re.M)
    files = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "tests" / "gpu").glob("test_*.py"))
    assert sorted({nodeid.split("::")[0] for _, nodeid in ran}) == files  # every GPU test file imported, none without tests
    rehearsed = {nodeid for outcome, nodeid in ran if outcome == "passed"}
    for fmt in ("eager", "torchscript", "onnx"):  # the CUDA bodies ran here on the CPU
        assert f"tests/gpu/test_formats_gpu.py::test_built_and_served_on_the_gpu[image-{fmt}]" in rehearsed
    assert re.search(r"^test-gpu: \d+ passed, 0 failed, \d+ skipped in [\d.]+s$", out, re.M)


SAMPLE = """
import os

import pytest

ORDER = []


@pytest.fixture(scope="module")
def shared():
    ORDER.append("module setup")
    yield "shared"
    ORDER.append("module teardown")


@pytest.fixture
def item(shared, tmp_path):
    ORDER.append("item setup")
    yield shared, tmp_path
    ORDER.append("item teardown")


def test_passes(item, monkeypatch):
    shared, tmp_path = item
    monkeypatch.setenv("MINITEST_SAMPLE", "1")
    assert shared == "shared" and tmp_path.is_dir() and not list(tmp_path.iterdir())
    assert 0.1 + 0.2 == pytest.approx(0.3) and [1.0, 2.0] == pytest.approx([1.0, 2.0 + 1e-9])
    with pytest.raises(ValueError, match="bad"):
        raise ValueError("a bad value")


def test_after_teardown():
    assert "MINITEST_SAMPLE" not in os.environ
    assert ORDER == ["module setup", "item setup", "item teardown"]


def test_fails():
    assert 1 + 1 == 3, "arithmetic is off"


@pytest.mark.skipif(True, reason="skipped by a mark")
def test_skipped_by_mark():
    raise AssertionError("never runs")


def test_skips_itself():
    pytest.skip("skipped from the body")


@pytest.mark.parametrize("b", [1, 2])
@pytest.mark.parametrize("a", ["x", "y"])
def test_grid(a, b):
    assert a in "xy" and b in (1, 2)


@pytest.mark.parametrize("n", [pytest.param(3, id="three"), 4])
def test_param(n):
    assert n in (3, 4)


def test_unknown_fixture(no_such_fixture):
    pass
"""


def _outcomes(folder: Path, *options: str) -> dict[str, tuple[str, str]]:
    results = folder / f"results{len(options)}.jsonl"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("MARPIPE_TEST_SITE", None)
    proc = subprocess.run(
        [sys.executable, str(SESSION), "--results", str(results), *options, str(folder)],
        cwd=folder,
        env=env,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr  # some failed, as they should
    records = [json.loads(x) for x in results.read_text().splitlines()]
    return {r["nodeid"].rpartition("/")[2]: (r["outcome"], r["detail"]) for r in records if r["kind"] == "result"}


def test_minitest_answers_as_pytest_does(tmp_path: Path) -> None:
    (tmp_path / "test_sample.py").write_text(textwrap.dedent(SAMPLE))
    (tmp_path / "test_broken.py").write_text("import no_such_module_here\n")
    by_pytest, by_minitest = _outcomes(tmp_path), _outcomes(tmp_path, "--shim")
    outcomes = {k: v[0] for k, v in by_pytest.items()}
    assert outcomes == {k: v[0] for k, v in by_minitest.items()}
    sample = "test_sample.py::"
    assert outcomes == {
        "test_broken.py": "failed",
        f"{sample}test_passes": "passed",
        f"{sample}test_after_teardown": "passed",
        f"{sample}test_fails": "failed",
        f"{sample}test_skipped_by_mark": "skipped",
        f"{sample}test_skips_itself": "skipped",
        **{f"{sample}test_grid[{a}-{b}]": "passed" for a in "xy" for b in (1, 2)},
        f"{sample}test_param[three]": "passed",
        f"{sample}test_param[4]": "passed",
        f"{sample}test_unknown_fixture": "failed",
    }
    for found in (by_pytest, by_minitest):
        assert found[f"{sample}test_fails"][1] == "AssertionError: arithmetic is off"
        assert found[f"{sample}test_skipped_by_mark"][1] == "skipped by a mark"
        assert found[f"{sample}test_skips_itself"][1] == "skipped from the body"
        assert "no_such_module_here" in found["test_broken.py"][1]
        assert "no_such_fixture" in found[f"{sample}test_unknown_fixture"][1]
