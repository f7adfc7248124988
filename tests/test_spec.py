"""The spec contract: defaults, and one exit-2 line naming the file and the field for every mistake."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pipeline.errors import SpecError
from pipeline.spec.spec import load_spec

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.mark.parametrize("name", ["simplenet", "cnn", "text", "cifar"])
def test_examples_parse(name: str) -> None:
    spec = load_spec(EXAMPLES / f"{name}.yaml")
    assert spec.name == name
    assert spec.architecture.file.is_file()
    assert spec.inputs[0].shape[0] == "batch"


def test_defaults(linear_project) -> None:
    spec = load_spec(linear_project.spec())
    assert spec.version == "1.0"
    assert spec.export.format == "eager"
    assert (spec.parity.atol, spec.parity.rtol, spec.parity.batch_sizes, spec.parity.device) == (1e-5, 1e-4, (1, 4), "auto")
    assert (spec.serve.batch_size, spec.serve.max_batch_delay_ms, spec.serve.min_workers, spec.serve.max_workers) == (8, 20, 1, 1)
    assert spec.serve.response_timeout_s == 120 and spec.serve.handler is None
    assert spec.serve.max_response_bytes == 6_553_500  # TorchServe's own default max_response_size
    assert spec.checkpoint.strict is True and spec.checkpoint.sha256 is None
    assert spec.outputs is None


def test_tolerance_overrides_and_exponent_strings(linear_project) -> None:
    path = linear_project.spec(outputs=[{"name": "y", "atol": "1e-2"}], parity={"atol": "1e-6", "rtol": 0.0})
    spec = load_spec(path)
    assert spec.tolerance("y") == (1e-2, 0.0)
    assert spec.tolerance("other") == (1e-6, 0.0)


def test_dynamic_dims_default_and_declared(linear_project) -> None:
    inputs = [{"name": "ids", "shape": ["batch", "seq"], "dtype": "int64", "range": [0, 10]}]
    assert load_spec(linear_project.spec(inputs=inputs)).dims == {"seq": (3, 7)}
    assert load_spec(linear_project.spec(inputs=inputs, dims={"seq": [2, 9]})).dims == {"seq": (2, 9)}


def _edit(project, change) -> Path:
    path = project.spec()
    doc = yaml.safe_load(path.read_text())
    change(doc)
    path.write_text(yaml.safe_dump(doc))
    return path


CASES = {
    "unknown key": (lambda d: d.update(serving={}), "serving: unknown key; did you mean 'serve'?"),
    "nested unknown key": (lambda d: d["checkpoint"].update(stric=True), "checkpoint.stric: unknown key; did you mean 'strict'?"),
    "wrong type": (lambda d: d.update(parity={"batch_sizes": "four"}), "parity.batch_sizes: expected a list"),
    "wrong bool": (lambda d: d["checkpoint"].update(strict="yes please"), "checkpoint.strict: expected true or false"),
    "missing arch file": (lambda d: d["architecture"].update(file="models/nope.py"), "architecture.file: file not found: models/nope.py"),
    "missing checkpoint": (lambda d: d["checkpoint"].update(path="nope.pth"), "checkpoint.path: file not found: nope.pth"),
    "class not defined": (
        lambda d: d["architecture"].update({"class": "Linaer"}),
        "architecture.class: 'Linaer' not defined in models/tiny.py; did you mean 'Linear'?",
    ),
    "invalid name": (lambda d: d.update(name="../x"), "name: '../x' is not a valid model name"),
    "unknown format": (
        lambda d: d.update(export={"format": "tensorrt"}),
        "export.format: 'tensorrt' is not one of: eager, torchscript, onnx",
    ),
    "ungenerable dim": (lambda d: d.update(inputs=[{"name": "x", "shape": ["batch", -1]}]), "inputs[0].shape[1]: -1 cannot be generated"),
    "int input without range": (
        lambda d: d.update(inputs=[{"name": "x", "shape": ["batch", 4], "dtype": "int64"}]),
        "inputs[0].range: an int64 input needs range",
    ),
    "batch not first": (
        lambda d: d.update(inputs=[{"name": "x", "shape": [4, "batch"]}]),
        "inputs[0].shape: the first dimension must be 'batch'",
    ),
    "missing required": (lambda d: d.pop("inputs"), "inputs: required"),
    "version as number": (lambda d: d.update(version=1.0), 'version: expected a non-empty string, got float 1.0; quote it: "1.0"'),
    "dim with one size": (
        lambda d: d.update(inputs=[{"name": "x", "shape": ["batch", "seq"]}], dims={"seq": [4]}),
        "dims.seq: give at least two different sizes",
    ),
    "bad sha": (lambda d: d["checkpoint"].update(sha256="abc"), "checkpoint.sha256: expected 64 hexadecimal digits"),
    "workers": (lambda d: d.update(serve={"min_workers": 2, "max_workers": 1}), "serve.max_workers: must be >= serve.min_workers (2)"),
    "negative tolerance": (lambda d: d.update(parity={"atol": -1}), "parity.atol: must be a finite number >= 0"),
    "zero answer size": (lambda d: d.update(serve={"max_response_mb": 0}), "serve.max_response_mb: must be a positive number of MB"),
    "negative answer size": (lambda d: d.update(serve={"max_response_mb": -2}), "serve.max_response_mb: must be a finite number >= 0"),
    "answer size as text": (lambda d: d.update(serve={"max_response_mb": "6MB"}), "serve.max_response_mb: expected a number, got str"),
    "answer size past 32 bits": (lambda d: d.update(serve={"max_response_mb": 3000}), "serve.max_response_mb: must be at most 2147"),
}


def test_max_response_mb_takes_fractions_and_integers(linear_project) -> None:
    for value, size in ((0.1, 100_000), (20, 20_000_000), ("1.5e1", 15_000_000)):
        path = _edit(linear_project, lambda d, v=value: d.update(serve={"max_response_mb": v}))
        assert load_spec(path).serve.max_response_bytes == size


@pytest.mark.parametrize("case", sorted(CASES))
def test_spec_errors_name_file_and_field(linear_project, case: str) -> None:
    change, expected = CASES[case]
    path = _edit(linear_project, change)
    with pytest.raises(SpecError) as err:
        load_spec(path)
    assert str(err.value).startswith(f"{path}: ")
    assert expected in str(err.value)
    assert "\n" not in str(err.value)


def test_not_yaml(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("name: [unclosed\n  x: {")
    with pytest.raises(SpecError, match=r"bad.yaml: not valid YAML at line \d+"):
        load_spec(path)


def test_spec_not_found(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="spec file not found"):
        load_spec(tmp_path / "missing.yaml")


def test_syntax_error_in_architecture(linear_project) -> None:
    (linear_project.root / "models" / "broken.py").write_text("class Broken(:\n")
    path = _edit(linear_project, lambda d: d["architecture"].update(file="models/broken.py", **{"class": "Broken"}))
    with pytest.raises(SpecError, match="architecture.file: models/broken.py: syntax error at line 1"):
        load_spec(path)


def test_cli_rejects_bad_kwargs_with_exit_2(linear_project) -> None:
    path = linear_project.spec(kwargs={"n_inn": 4})
    result = linear_project.build(path)
    assert result.returncode == 2, result.stderr
    assert "architecture.kwargs: Linear() rejects them" in result.stderr
    assert "n_inn" in result.stderr
    assert "Traceback" not in result.stderr
    assert not linear_project.store.exists() or not list(linear_project.store.glob("*.mar"))


def test_cli_rejects_bad_spec_before_any_work(linear_project, tmp_path: Path) -> None:
    good = linear_project.spec(name="good")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\n")
    result = linear_project.build(good, str(bad))
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: {bad}: architecture: required"
    assert not (linear_project.store / "good.mar").exists()
