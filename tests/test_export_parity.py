"""Exports behind the parity gate: what differs from eager never reaches the store."""

from __future__ import annotations

import json
import zipfile

import pytest
import torch
from conftest import Project, store_state

FORMATS = ["eager", "torchscript", "onnx"]


def _meta(archive) -> dict:
    with zipfile.ZipFile(archive) as z:
        return json.loads(z.read("marpipe.json"))


@pytest.fixture
def branch_project(project: Project) -> Project:
    project.save(project.model("ShapeBranch").state_dict(), "tiny.pth")
    project.save(project.model("Linear").state_dict(), "good.pth")
    assert project.build(project.spec(name="existing", checkpoint={"path": "good.pth"})).returncode == 0
    return project


def test_trace_of_shape_branch_is_caught_by_parity(branch_project: Project) -> None:
    before = store_state(branch_project.store)
    result = branch_project.build(branch_project.spec(name="branch", cls="ShapeBranch", export={"format": "torchscript"}))
    assert result.returncode == 5, result.stdout + result.stderr
    assert "torchscript parity failed" in result.stderr and "batch 1" in result.stderr
    assert "✗ branch/output" in result.stdout
    assert store_state(branch_project.store) == before


def test_report_records_the_failed_stage(branch_project: Project) -> None:
    report = branch_project.root / "report.json"
    spec = branch_project.spec(name="branch", cls="ShapeBranch", export={"format": "torchscript"})
    assert branch_project.build("--report", str(report), spec).returncode == 5
    build = json.loads(report.read_text())["builds"][0]
    assert build["status"] == "failed" and build["exit_code"] == 5 and "parity failed" in build["error"]
    stages = [(s["name"], s["status"]) for s in build["stages"]]
    assert stages == [("load", "ok"), ("export", "ok"), ("parity", "failed"), ("package", "skipped")]


def test_onnx_of_shape_branch_is_caught(branch_project: Project) -> None:
    before = store_state(branch_project.store)
    result = branch_project.build(branch_project.spec(name="branch", cls="ShapeBranch", export={"format": "onnx"}))
    assert result.returncode in (4, 5), result.stdout + result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert store_state(branch_project.store) == before


def test_eager_of_shape_branch_is_fine(branch_project: Project) -> None:
    assert branch_project.build(branch_project.spec(name="branch", cls="ShapeBranch")).returncode == 0


def test_per_output_tolerance_overrides(project: Project) -> None:
    project.save(project.model("TraceDrift").state_dict(), "tiny.pth")
    strict = project.spec(name="drift", cls="TraceDrift", export={"format": "torchscript"}, outputs=[{"name": "y"}, {"name": "z"}])
    result = project.build(strict)
    assert result.returncode == 5
    assert "z: batch 1: max abs error 0.001" in result.stderr and "y:" not in result.stderr
    loose = project.spec(
        name="drift", cls="TraceDrift", export={"format": "torchscript"}, outputs=[{"name": "y"}, {"name": "z", "atol": 2e-3}]
    )
    result = project.build(loose, "--report", str(project.root / "report.json"))
    assert result.returncode == 0, result.stderr
    measured = json.loads((project.root / "report.json").read_text())["builds"][0]["parity"]["outputs"]
    assert measured["z"]["atol"] == 2e-3 and measured["z"]["max_abs"] == pytest.approx(1e-3, rel=1e-3)
    assert measured["y"]["max_abs"] == 0.0 and measured["y"]["atol"] == 1e-5
    # the archive keeps what its inputs determine: the tolerances it passed, not the measured errors
    archived = _meta(project.store / "drift.mar")["parity"]["outputs"]
    assert archived == {"y": {"atol": 1e-5, "rtol": 1e-4, "passed": True}, "z": {"atol": 2e-3, "rtol": 1e-4, "passed": True}}


@pytest.mark.parametrize("fmt", FORMATS)
def test_two_inputs_two_outputs_and_dict_outputs(project: Project, fmt: str) -> None:
    two, dict_out = project.multi_io_specs()
    result = project.build("--format", fmt, two, dict_out)
    assert result.returncode == 0, result.stdout + result.stderr
    meta = _meta(project.store / "two.mar")
    assert [o["name"] for o in meta["outputs"]] == ["joint", "per_step"]
    assert meta["parity"]["shapes"] == [
        {"batch": 1, "steps": 2},
        {"batch": 1, "steps": 5},
        {"batch": 4, "steps": 2},
        {"batch": 4, "steps": 5},
    ]
    assert set(_meta(project.store / "dictout.mar")["parity"]["outputs"]) == {"embedding", "score"}


def test_export_failure_is_exit_4_with_one_line(project: Project) -> None:
    project.save(project.model("Unscriptable").state_dict(), "tiny.pth")
    result = project.build(project.spec(cls="Unscriptable", export={"format": "torchscript", "torchscript": {"method": "script"}}))
    assert result.returncode == 4, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: tiny: torchscript script failed:")
    assert not project.store.exists() or not list(project.store.glob("*.mar"))


def test_script_method(project: Project) -> None:
    project.save(project.model("Linear").state_dict(), "tiny.pth")
    result = project.build(project.spec(export={"format": "torchscript", "torchscript": {"method": "script"}}))
    assert result.returncode == 0, result.stderr
    assert _meta(project.store / "tiny.mar")["export"]["detail"] == "torch.jit.script"


def test_output_count_mismatch_is_a_spec_error(project: Project) -> None:
    project.save(project.model("Linear").state_dict(), "tiny.pth")
    result = project.build(project.spec(outputs=[{"name": "a"}, {"name": "b"}]))
    assert result.returncode == 2
    assert "outputs: the model returns 1 outputs, the spec names 2" in result.stderr


def test_cuda_without_gpu_is_exit_2(project: Project) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    project.save(project.model("Linear").state_dict(), "tiny.pth")
    result = project.build(project.spec(parity={"device": "cuda"}))
    assert result.returncode == 2 and "parity.device: 'cuda' asked for, but torch sees no GPU" in result.stderr
    result = project.build("--device", "cuda", project.spec())
    assert result.returncode == 2 and "--device cuda" in result.stderr


def test_format_all_names_archives_by_format_and_records_parity(project: Project) -> None:
    project.save(project.model("Linear").state_dict(), "tiny.pth")
    report = project.root / "report.json"
    result = project.build("--format", "all", "--report", str(report), project.spec())
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in project.store.glob("*.mar")) == [
        "tiny_aoti.mar",
        "tiny_eager.mar",
        "tiny_onnx.mar",
        "tiny_torchscript.mar",
    ]
    doc = json.loads(report.read_text())
    assert [b["format"] for b in doc["builds"]] == [*FORMATS, "aoti"]
    for build in doc["builds"]:
        assert [s["name"] for s in build["stages"]] == ["load", "export", "parity", "package"]
        assert all(s["status"] == "ok" and s["duration_s"] >= 0 for s in build["stages"])
    meta = _meta(project.store / "tiny_onnx.mar")
    assert meta["parity"]["device"] == "cpu" and meta["parity"]["outputs"]["output"]["passed"]
    assert {"torch", "onnx", "onnxruntime", "marpipe"} <= set(meta["parity"]["versions"])
    assert [b.get("compile_s", 0) > 0 for b in doc["builds"]] == [False, False, False, True]  # aoti's compile, in the report
    assert _meta(project.store / "tiny_aoti.mar")["platform"]["torch"] == torch.__version__


def test_inputs_that_do_not_fit_the_model_are_a_spec_error(project: Project) -> None:
    project.save(project.model("Linear").state_dict(), "tiny.pth")
    result = project.build(project.spec(inputs=[{"name": "x", "shape": ["batch", 5]}]))
    assert result.returncode == 2, result.stderr
    assert "inputs: the model fails on inputs as declared (x [4, 5] float32): RuntimeError" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_store_that_cannot_be_written_is_exit_6(project: Project) -> None:
    project.save(project.model("Linear").state_dict(), "tiny.pth")
    project.store.parent.mkdir(parents=True, exist_ok=True)
    project.store.write_text("a file, not a folder")
    result = project.build(project.spec())
    assert result.returncode == 6, result.stderr
    assert result.stderr.strip().startswith(f"error: model store {project.store}: cannot write there")
