"""Where architectures come from (file, factory, transformers), how inputs are passed, what parity feeds, what
an eager archive requires."""

from __future__ import annotations

import importlib.metadata
import json
import shutil
import zipfile
from pathlib import Path

import pytest
import torch
import yaml
from conftest import ROOT, Project

from handlers.marpipe_serving import requirements
from pipeline.errors import SpecError
from pipeline.sources import arch, imports
from pipeline.spec.spec import load_spec
from pipeline.stages import inputs, load

FACTORIES = ROOT / "tests" / "models" / "factories.py"


def _write(project: Project, name: str, doc: dict) -> Path:
    path = project.root / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"name": name, **doc}, sort_keys=False))
    return path


def _meta(archive: Path) -> dict:
    with zipfile.ZipFile(archive) as z:
        return json.loads(z.read("marpipe.json"))


def _entries(archive: Path) -> list[str]:
    with zipfile.ZipFile(archive) as z:
        return z.namelist()


@pytest.fixture
def factory_project(project: Project) -> Project:
    shutil.copy(FACTORIES, project.root / "models" / "factories.py")
    return project


def _env(project: Project) -> dict[str, str]:
    return {"PYTHONPATH": f"{ROOT}:{project.root / 'models'}"}


def test_factory_class_from_torch_is_called_by_keyword(project: Project) -> None:
    torch.manual_seed(0)
    project.save(torch.nn.Linear(4, 2).state_dict(), "linear.pth")
    spec = _write(
        project,
        "linear",
        {
            "architecture": {"factory": "torch.nn:Linear", "kwargs": {"in_features": 4, "out_features": 2}},
            "checkpoint": {"path": "linear.pth"},
            "inputs": [{"name": "input", "shape": ["batch", 4]}],  # forward(input): passed by keyword
        },
    )
    result = project.build("--format", "eager,torchscript", spec)  # (ONNX by keyword: the swapped-inputs test below)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "inputs by keyword" in result.stdout
    for fmt in ("eager", "torchscript"):
        meta = _meta(project.store / f"linear_{fmt}.mar")
        assert meta["architecture"] == {"source": "factory", "factory": "torch.nn:Linear", "kwargs": {"in_features": 4, "out_features": 2}}
        assert meta["call"] == "keyword" and meta["requirements"] == []  # torch is the server's own
    assert "requirements.txt" not in _entries(project.store / "linear_eager.mar")


def test_factory_function_records_what_it_imports(factory_project: Project) -> None:
    project = factory_project
    sys_path = str(project.root / "models")
    import sys

    sys.path.insert(0, sys_path)
    try:
        import factories

        torch.manual_seed(0)
        project.save(factories.make_mlp(hidden=6).state_dict(), "mlp.pth")
    finally:
        sys.path.remove(sys_path)
    spec = _write(
        project,
        "mlp",
        {
            "architecture": {"factory": "factories:make_mlp", "kwargs": {"hidden": 6}},
            "checkpoint": {"path": "mlp.pth"},
            "inputs": [{"name": "x", "shape": ["batch", 4]}],  # nn.Sequential takes `input`: by position
            "serve": {"extra_files": ["models/factories.py"]},  # not an installed package: it travels in the archive
        },
    )
    result = project.build("--format", "eager,torchscript", spec, env=_env(project))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "inputs by position" in result.stdout
    meta = _meta(project.store / "mlp_eager.mar")
    pyyaml = importlib.metadata.version("PyYAML")
    assert meta["call"] == "positional"
    assert meta["requirements"] == [{"name": "PyYAML", "version": pyyaml, "for": "architecture"}]
    with zipfile.ZipFile(project.store / "mlp_eager.mar") as z:
        assert z.read("requirements.txt").decode() == f"PyYAML=={pyyaml}\n"
        assert "factories.py" in z.namelist()
    assert _meta(project.store / "mlp_torchscript.mar")["requirements"] == []  # the graph is in the artifact


FACTORY_ERRORS = {
    "misspelt name": ({"factory": "torch.nn:Lineer"}, "architecture.factory: torch.nn has no 'Lineer'; did you mean 'Linear'?"),
    "no such package": ({"factory": "no_such_pkg.models:thing"}, "architecture.factory: cannot import no_such_pkg.models"),
    "not callable": ({"factory": "torch.nn:init.calculate_gain.__doc__"}, "is a str, not a class or function"),
    "not a module class": ({"factory": "pathlib:Path"}, "architecture.factory: pathlib:Path is a class but not a torch.nn.Module"),
    "kwargs rejected": ({"factory": "torch.nn:Linear", "kwargs": {"bogus": 1}}, "architecture.kwargs: torch.nn:Linear() rejects them"),
}


@pytest.mark.parametrize("case", sorted(FACTORY_ERRORS))
def test_factory_errors_name_the_field(linear_project: Project, case: str) -> None:
    architecture, expected = FACTORY_ERRORS[case]
    path = _write(
        linear_project,
        "f",
        {"architecture": architecture, "checkpoint": {"path": "tiny.pth"}, "inputs": [{"name": "x", "shape": ["batch", 4]}]},
    )
    with pytest.raises(SpecError) as err:
        arch.model_class(load_spec(path))
    assert str(err.value).startswith(f"{path}: ") and expected in str(err.value), str(err.value)
    assert err.value.exit_code == 2


def test_a_factory_that_returns_no_module(factory_project: Project, monkeypatch) -> None:
    monkeypatch.syspath_prepend(str(factory_project.root / "models"))
    path = _write(
        factory_project,
        "f",
        {
            "architecture": {"factory": "factories:not_a_module"},
            "checkpoint": {"path": "x.pth"},
            "inputs": [{"name": "x", "shape": ["batch", 4]}],
        },
    )
    (factory_project.root / "x.pth").write_bytes(b"")
    spec = load_spec(path)
    with pytest.raises(
        SpecError, match=r"architecture.factory: factories:not_a_module\(\*\*kwargs\) returned a int, not a torch.nn.Module"
    ):
        arch.construct(spec, arch.model_class(spec), "meta")


SPEC_ERRORS = {
    "two sources": (
        {"file": "models/tiny.py", "class": "Linear", "factory": "torch.nn:Linear"},
        "architecture: give exactly one of file (with class), factory or transformers; got file and factory",
    ),
    "no source": ({"kwargs": {}}, "architecture: give exactly one of file (with class), factory or transformers"),
    "file without class": ({"file": "models/tiny.py"}, "architecture.class: required with architecture.file"),
    "class with factory": ({"factory": "torch.nn:Linear", "class": "Linear"}, "architecture.class: not used with architecture.factory"),
    "not a reference": ({"factory": "torch.nn.Linear"}, "architecture.factory: 'torch.nn.Linear' is not 'package.module:name'"),
    "no config.json": ({"transformers": "models"}, "architecture.transformers: no config.json at models"),
}


@pytest.mark.parametrize("case", sorted(SPEC_ERRORS))
def test_architecture_spec_errors(linear_project: Project, case: str) -> None:
    architecture, expected = SPEC_ERRORS[case]
    path = _write(
        linear_project,
        "a",
        {"architecture": architecture, "checkpoint": {"path": "tiny.pth"}, "inputs": [{"name": "x", "shape": ["batch", 4]}]},
    )
    with pytest.raises(SpecError) as err:
        load_spec(path)
    assert expected in str(err.value), str(err.value)


def test_cli_exit_code_for_an_architecture_error(linear_project: Project) -> None:
    path = _write(
        linear_project,
        "a",
        {
            "architecture": {"factory": "torch.nn:Lineer"},
            "checkpoint": {"path": "tiny.pth"},
            "inputs": [{"name": "x", "shape": ["batch", 4]}],
        },
    )
    result = linear_project.build(path)
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert "architecture.factory: torch.nn has no 'Lineer'" in result.stderr


def test_inputs_passed_by_keyword_whatever_their_declared_order(project: Project) -> None:
    """TwoInTwoOut.forward(x, seq), declared as [seq, x]: by position that would swap them; by keyword every format agrees."""
    project.save(project.model("TwoInTwoOut").state_dict(), "two.pth")
    spec = project.spec(
        name="swapped",
        cls="TwoInTwoOut",
        checkpoint={"path": "two.pth"},
        inputs=[{"name": "seq", "shape": ["batch", "steps", 4]}, {"name": "x", "shape": ["batch", 4]}],
        dims={"steps": [2, 5]},
    )
    result = project.build("--format", "eager,torchscript,onnx", spec)  # aoti: tests/test_aoti.py
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("inputs by keyword") == 3
    assert _meta(project.store / "swapped_onnx.mar")["call"] == "keyword"


def test_keyword_rule() -> None:
    class Kw(torch.nn.Module):
        def forward(self, input_ids, attention_mask=None, *, labels=None):
            return input_ids

    class Var(torch.nn.Module):
        def forward(self, *tensors):
            return tensors[0]

    assert arch.keyword_inputs(Kw(), ["attention_mask", "input_ids"])
    assert arch.keyword_inputs(Kw(), ["input_ids", "labels"])
    assert not arch.keyword_inputs(Kw(), ["input_ids", "token_type_ids"])  # one unknown name: all by position
    assert not arch.keyword_inputs(Var(), ["x"])
    assert arch.forward_order(Kw(), ["attention_mask", "input_ids"]) == ["input_ids", "attention_mask"]


def test_import_tracker_records_third_party_imports_of_user_code(tmp_path: Path) -> None:
    source = tmp_path / "uses_yaml.py"
    source.write_text("import json\nimport yaml\nimport torch\nfrom torch import nn\n\n\nclass M(nn.Module):\n    pass\n")
    imports._distributions.cache_clear()
    tracker = imports.ImportTracker()
    with tracker:
        arch.import_file(source, "marpipe_test_uses_yaml")
    assert tracker.requirements() == [
        {"name": "PyYAML", "version": importlib.metadata.version("PyYAML")}
    ]  # json: stdlib; torch: the server's


def test_the_handler_names_a_missing_requirement() -> None:
    meta = {"name": "m", "requirements": [{"name": "no-such-dist-marpipe", "version": "1.2.3"}]}
    with pytest.raises(requirements.MissingRequirementError) as err:
        requirements.check(meta)
    assert type(err.value).__name__.endswith("Error")
    message = str(err.value)
    assert "no-such-dist-marpipe==1.2.3" in message and "\n" not in message
    requirements.check({"name": "m", "requirements": [{"name": "numpy", "version": "0"}]})  # another version: a warning only


GENERATE_ERRORS = {
    "mask of a 1-d input": ({"name": "m", "shape": ["batch"], "dtype": "int64", "generate": "padding_mask"}, "needs a dimension to pad"),
    "mask refused by range": (
        {"name": "m", "shape": ["batch", "seq"], "dtype": "int64", "range": [1, 2], "generate": "padding_mask"},
        "range [1, 2] refuses in requests; use range: [0, 2]",
    ),
    "generated outside range": (
        {"name": "m", "shape": ["batch", 4], "dtype": "int64", "range": [0, 10], "generate": {"range": [0, 20]}},
        "reaches outside the input's range",
    ),
    "unknown kind": ({"name": "m", "shape": ["batch", 4], "generate": "zeros"}, "expected padding_mask or {range: [low, high]}"),
}


@pytest.mark.parametrize("case", sorted(GENERATE_ERRORS))
def test_generate_errors(linear_project: Project, case: str) -> None:
    item, expected = GENERATE_ERRORS[case]
    path = linear_project.spec(name="g", inputs=[item])
    with pytest.raises(SpecError) as err:
        load_spec(path)
    assert "inputs[0].generate" in str(err.value) and expected in str(err.value), str(err.value)


def test_padding_masks_and_generated_ranges(linear_project: Project) -> None:
    path = linear_project.spec(
        name="g",
        inputs=[
            {"name": "ids", "shape": ["batch", "seq"], "dtype": "int64", "generate": {"range": [5, 9]}},  # no range: any id is served
            {"name": "mask", "shape": ["batch", "seq"], "dtype": "int64", "range": [0, 2], "generate": "padding_mask"},
        ],
        dims={"seq": [6, 12]},
    )
    spec = load_spec(path)
    assert spec.inputs[1].range == (0, 2) and spec.inputs[1].generate == "padding_mask"
    lengths = set()
    for seed in range(5):
        t = inputs.make(spec, {"batch": 8, "seq": 12}, seed)
        assert t["ids"].min() >= 5 and t["ids"].max() < 9
        mask = t["mask"]
        assert mask.dtype == torch.int64 and set(mask.unique().tolist()) <= {0, 1}
        row_lengths = mask.sum(dim=1)
        assert (row_lengths >= 1).all() and row_lengths[0] == 12  # never an all-zero row; the first unpadded
        assert torch.equal(mask, (torch.arange(12) < row_lengths[:, None]).long())  # ones, then zeros
        lengths.update(row_lengths.tolist())
    assert len(lengths) > 3


def test_non_persistent_buffers_come_from_the_constructor_without_allocating_weights(project: Project) -> None:
    ref = project.model("WithBuffer")
    project.save(ref.state_dict(), "tiny.pth")
    loaded = load.run(load_spec(project.spec(cls="WithBuffer")))
    assert torch.equal(loaded.model.scale, torch.full((2,), 3.0))
    assert loaded.model.fc.weight.device.type == "cpu"
    torch.testing.assert_close(loaded.model(torch.ones(1, 4)), ref(torch.ones(1, 4)), rtol=0, atol=0)


def test_the_distribution_scan_is_kept_on_disk_until_a_path_folder_changes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A build in a new process reads the scan of installed distributions from a small file; installing or
    removing a distribution (a change to a folder on sys.path) makes it scan again."""
    folder = tmp_path / "site"
    folder.mkdir()
    monkeypatch.setattr(imports, "CACHE", tmp_path / "cache")
    monkeypatch.syspath_prepend(str(folder))
    imports._distributions.cache_clear()
    first = imports._distributions()
    (written,) = (tmp_path / "cache").glob("distributions-*.json")
    assert json.loads(written.read_text()) == first and "yaml" in first
    written.write_text(json.dumps({"planted": ["by-the-test"]}))  # what a new process would read
    imports._distributions.cache_clear()
    assert imports._distributions() == {"planted": ["by-the-test"]}
    (folder / "newdist-1.0.dist-info").mkdir()  # an install changes the folder
    imports._distributions.cache_clear()
    assert imports._distributions() == first
    imports._distributions.cache_clear()
