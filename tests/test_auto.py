"""export.format: auto: every candidate through export and parity, the fastest that passes packaged, the choice
recorded (never the timings), a simpler format winning ties, all-failing exiting with the first failure's code."""

from __future__ import annotations

import json
import zipfile

from conftest import Project, store_state

from pipeline.build.auto import TIE, choose
from pipeline.build.trial import Candidate
from pipeline.spec.spec import FORMATS


def _meta(path) -> dict:
    with zipfile.ZipFile(path) as z:
        return json.loads(z.read("marpipe.json"))


def test_the_fastest_wins_and_a_simpler_format_wins_a_tie() -> None:
    def pick(**ms: float) -> str:
        return choose([Candidate(f, median_ms=t) for f, t in ms.items()]).format

    assert pick(eager=10.0, torchscript=8.0, onnx=4.0) == "onnx"
    assert pick(eager=10.0, onnx=4.1, aoti=4.0) == "onnx" and pick(eager=10.0, onnx=5.0, aoti=4.0) == "aoti"  # aoti: last on a tie
    assert pick(eager=10.0, torchscript=4.1, onnx=4.0) == "torchscript"  # within 5% of the fastest: simpler
    assert pick(eager=4.0 * (1 + TIE), torchscript=9.0, onnx=4.0) == "eager"
    assert pick(eager=4.0 * (1 + TIE) * 1.01, torchscript=9.0, onnx=4.0) == "onnx"
    failed = [Candidate("eager", status="failed parity", median_ms=None), Candidate("onnx", median_ms=7.0)]
    assert choose(failed).format == "onnx"


def test_auto_picks_the_clearly_faster_format_and_records_every_candidate(project: Project) -> None:
    project.save(project.model("SlowEager").state_dict(), "slow.pth")
    spec = project.spec(
        name="slow",
        cls="SlowEager",
        checkpoint={"path": "slow.pth"},
        export={"format": "auto", "candidates": ["eager", "torchscript"]},
        parity={"batch_sizes": [2], "samples": 1},
    )
    report = project.root / "report.json"
    result = project.build(spec, "--report", str(report))
    assert result.returncode == 0, result.stdout + result.stderr
    meta = _meta(project.store / "slow.mar")
    assert meta["format"] == "torchscript" and meta["artifact"] == "model.pt"
    assert meta["auto"] == {"choice": "torchscript", "candidates": {"eager": {"status": "passed"}, "torchscript": {"status": "passed"}}}
    build = json.loads(report.read_text())["builds"][0]
    timings = build["auto"]["candidates"]
    assert build["auto"]["choice"] == "torchscript" and timings["eager"]["median_ms"] > 25 > timings["torchscript"]["median_ms"]
    assert all(t["p90_ms"] >= t["median_ms"] for t in timings.values())
    assert "slow                     auto     eager" in result.stdout


def test_a_candidate_that_fails_parity_is_skipped_and_the_choice_is_reproducible(project: Project) -> None:
    project.save(project.model("TraceDrift").state_dict(), "drift.pth")
    spec = project.spec(
        name="drift", cls="TraceDrift", checkpoint={"path": "drift.pth"}, export={"format": "auto", "candidates": ["torchscript", "onnx"]}
    )
    result = project.build(spec)
    assert result.returncode == 0, result.stdout + result.stderr
    meta = _meta(project.store / "drift.mar")
    assert meta["format"] == "onnx" and meta["auto"]["choice"] == "onnx"
    assert meta["auto"]["candidates"]["torchscript"]["status"] == "failed parity"
    assert "parity failed" in meta["auto"]["candidates"]["torchscript"]["error"]
    first = (project.store / "drift.mar").read_bytes()
    again = project.build("--force", spec)
    assert again.returncode == 0 and (project.store / "drift.mar").read_bytes() == first  # same choice, same bytes
    unchanged = project.build(spec)
    assert unchanged.returncode == 0 and "unchanged" in unchanged.stdout and " auto " not in unchanged.stdout  # nothing measured


def test_all_candidates_failing_exit_with_the_first_failure_s_code(project: Project) -> None:
    project.save(project.model("NoisyUnscriptable").state_dict(), "noisy.pth")
    before = store_state(project.store)
    spec = project.spec(
        name="noisy",
        cls="NoisyUnscriptable",
        checkpoint={"path": "noisy.pth"},
        export={"format": "auto", "candidates": ["onnx", "torchscript"], "torchscript": {"method": "script"}},
    )
    result = project.build(spec)
    assert result.returncode == 4, result.stdout + result.stderr  # torchscript comes before onnx: its export failed
    assert "no candidate passed; torchscript:" in result.stderr and result.stderr.count("\n") == 1
    assert store_state(project.store) == before
    noisy_eager = project.spec(name="noisy2", cls="NoisyUnscriptable", checkpoint={"path": "noisy.pth"}, export={"format": "auto"})
    assert project.build(noisy_eager).returncode == 5  # eager's parity failed first


def test_auto_on_the_command_line_and_spec_errors(linear_project: Project) -> None:
    report = linear_project.root / "report.json"
    result = linear_project.build("--format", "auto", "--report", str(report), linear_project.spec())
    assert result.returncode == 0, result.stderr
    meta = _meta(linear_project.store / "tiny.mar")
    assert meta["auto"]["choice"] in FORMATS and list(meta["auto"]["candidates"]) == sorted(FORMATS)  # aoti too, by default
    tried = json.loads(report.read_text())["builds"][0]["auto"]["candidates"]
    assert tried["aoti"]["status"] == "passed" and tried["aoti"]["median_ms"] > 0 and tried["aoti"]["compile_s"] > 0
    assert "tiny                     auto     aoti" in result.stdout and "compiled in" in result.stdout
    assert linear_project.build("--format", "auto,onnx", linear_project.spec()).returncode == 2
    bad = linear_project.spec(name="bad", export={"format": "eager", "candidates": ["onnx"]})
    result = linear_project.build(bad)
    assert result.returncode == 2 and "export.candidates: only format: auto tries candidates" in result.stderr
