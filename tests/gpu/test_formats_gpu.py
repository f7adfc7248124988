"""On a CUDA GPU: eager, TorchScript and ONNX builds whose parity ran there, and each archive's handler answering there.

Each model is built once (`marpipe build --device cuda --format eager,torchscript,onnx`, one process per group of
models); then each (model, format) test checks its archive: `marpipe.json` records parity on the GPU, and the handler
that travels inside the archive (`marpipe_handler.py` and `marpipe_serving/`, imported from the extracted archive as
TorchServe imports it, with TorchServe's `gpu_id` 0) runs the artifact on the GPU and answers the archive's parity
inputs like the eager model on the GPU (TF32 off, as the parity stage runs it), within the spec's tolerances.

Models: a Linear, a conv net and a text model over int64 ids (tests/models/tiny.py); a BERT built by transformers
from a small config; torchvision's resnet18 and timm's resnet10t through `architecture.factory`. Random weights,
nothing downloaded; each is skipped with its reason where its package is missing, ONNX where onnxscript or
onnxruntime's CUDAExecutionProvider (onnxruntime-gpu) is.

`make test-gpu` runs this file on a GPU machine (docs/gpu.md). Without a GPU it is skipped, except under
`make test-gpu DRY=1`, where `gpu_device` is cpu and the same bodies run on the CPU.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import sys
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from conftest import ROOT, SITE, FakeContext, Project, marpipe, needs_gpu

pytestmark = [pytest.mark.gpu, needs_gpu]

FORMATS = ["eager", "torchscript", "onnx"]
PARITY = {"atol": 1e-4, "rtol": 1e-3}
# the models built together by one `marpipe build`
GROUPS = {"tiny": ["linear", "image", "text"], "bert": ["bert"], "resnet18": ["resnet18"], "resnet10t": ["resnet10t"]}
NEEDS = {"bert": "transformers", "resnet18": "torchvision", "resnet10t": "timm"}
MODELS = [m for group in GROUPS.values() for m in group]
IMAGE_32 = [{"name": "x", "shape": ["batch", 3, 32, 32]}]
TEXT = [
    {"name": "input_ids", "shape": ["batch", "seq"], "dtype": "int64", "range": [0, 32]},
    {"name": "attention_mask", "shape": ["batch", "seq"], "dtype": "int64", "range": [0, 2], "generate": "padding_mask"},
]


@dataclass
class Model:
    spec: Path
    module: torch.nn.Module  # the eager model, on the CPU between tests
    output: str


@dataclass
class Built:
    project: Project
    result: Any  # the CompletedProcess of `marpipe build`
    models: dict[str, Model]


def _tiny(project: Project, name: str, cls: str, inputs: list[dict], **sections: Any) -> Model:
    module = project.model(cls)
    project.save(module.state_dict(), f"{name}.pth")
    spec = project.spec(name=name, cls=cls, checkpoint={"path": f"{name}.pth"}, inputs=inputs, parity=PARITY, **sections)
    return Model(spec, module, "output")


def _write_spec(project: Project, name: str, **doc: Any) -> Path:
    path = project.root / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"name": name, **doc, "parity": PARITY}, sort_keys=False))
    return path


def _bert(project: Project) -> Model:
    from hf_models import save, tiny_bert

    module = tiny_bert()
    save(module, project.root / "bert")
    inputs = [dict(t, range=[0, 1000]) if t["name"] == "input_ids" else t for t in TEXT]
    outputs = [{"name": "logits"}]
    spec = _write_spec(project, "bert", architecture={"transformers": "bert"}, inputs=inputs, dims={"seq": [8, 16]}, outputs=outputs)
    return Model(spec, module, "logits")


def _factory(project: Project, name: str, factory: str, kwargs: dict[str, Any]) -> Model:
    module_name, _, attr = factory.partition(":")
    torch.manual_seed(0)
    module = getattr(importlib.import_module(module_name), attr)(**kwargs).eval()
    project.save(module.state_dict(), f"{name}.pth")
    architecture = {"factory": factory, "kwargs": kwargs}
    spec = _write_spec(project, name, architecture=architecture, checkpoint={"path": f"{name}.pth"}, inputs=IMAGE_32)
    return Model(spec, module, "output")


MAKERS: dict[str, Callable[[Project], Model]] = {
    "linear": lambda p: _tiny(p, "linear", "Linear", [{"name": "x", "shape": ["batch", 4]}]),
    "image": lambda p: _tiny(p, "image", "TinyImage", [{"name": "image", "shape": ["batch", 3, 16, 16]}]),
    "text": lambda p: _tiny(p, "text", "TinyText", TEXT, dims={"seq": [5, 9]}),
    "bert": _bert,
    "resnet18": lambda p: _factory(p, "resnet18", "torchvision.models:resnet18", {"num_classes": 10}),
    "resnet10t": lambda p: _factory(p, "resnet10t", "timm:create_model", dict(model_name="resnet10t", pretrained=False, num_classes=10)),
}


def _onnx_skip(device: str) -> str | None:
    """Why an ONNX build cannot be checked on `device` here, or None."""
    for package in ("onnx", "onnxscript", "onnxruntime"):
        if importlib.util.find_spec(package) is None:
            return f"{package} is not installed (an ONNX build needs onnx, onnxscript and onnxruntime)"
    if device == "cuda":
        import onnxruntime

        if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
            return f"onnxruntime {onnxruntime.__version__} has no CUDAExecutionProvider (onnxruntime-gpu is not installed)"
    return None


@pytest.fixture(scope="module")
def built(tmp_path_factory: Any, gpu_device: str) -> Callable[[str], Built]:
    """Builds a group of models on first use, in every format that can be checked on the device."""
    cache: dict[str, Built] = {}

    def get(group: str) -> Built:
        if group not in cache:
            project = Project(tmp_path_factory.mktemp(group))
            models = {name: MAKERS[name](project) for name in GROUPS[group]}
            formats = [f for f in FORMATS if f != "onnx" or _onnx_skip(gpu_device) is None]
            specs = [m.spec for m in models.values()]
            cache[group] = Built(project, project.build("--device", gpu_device, "--format", ",".join(formats), *specs), models)
        return cache[group]

    return get


def _error(result: Any) -> str:
    lines = [ln.strip() for ln in (result.stderr or result.stdout).splitlines() if ln.strip()]
    return next((ln for ln in reversed(lines) if ln.startswith("error:")), lines[-1] if lines else "no output")


def _forget_handler() -> None:
    for name in [n for n in sys.modules if n == "marpipe_handler" or n.split(".")[0] == "marpipe_serving"]:
        del sys.modules[name]


def _serve(folder: Path, device: str, arrays: dict[str, np.ndarray]) -> tuple[Any, dict]:
    """(the handler's Service, its answer to the arrays as a JSON request): the archive's own handler, imported from
    the extracted archive as TorchServe imports it, with TorchServe's gpu_id 0 on a GPU."""
    _forget_handler()
    sys.path.insert(0, str(folder))
    try:
        handler = importlib.import_module("marpipe_handler")
        assert Path(handler.__file__).parent == folder, handler.__file__
        ctx = FakeContext(folder)
        ctx.system_properties["gpu_id"] = 0 if device == "cuda" else None
        service = handler.Service(ctx)
        out = service.handle([{"body": {"inputs": {k: v.tolist() for k, v in arrays.items()}}}], ctx)
    finally:
        sys.path.remove(str(folder))
        _forget_handler()
    assert ctx.status == {}, f"the handler answered {ctx.status}: {out[0]!r}"[:500]
    return service, json.loads(out[0])


def _eager(model: Model, arrays: dict[str, np.ndarray], inputs: list[dict], device: str) -> np.ndarray:
    """The eager model's output on `device` in full fp32 (TF32 off, as in the parity stage)."""
    tensors = {t["name"]: torch.from_numpy(arrays[t["name"]]).to(device, getattr(torch, t["dtype"])) for t in inputs}
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with torch.inference_mode():
            out = model.module.to(device)(**tensors)
        out = out if isinstance(out, torch.Tensor) else out[model.output]
        return out.float().cpu().numpy()
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved
        model.module.to("cpu")


def _assert_close(got: np.ndarray, want: np.ndarray, what: str) -> None:
    assert got.shape == want.shape, f"{what}: shape {list(got.shape)}, eager {list(want.shape)}"
    err = np.abs(got.astype(np.float64) - want)
    bound = PARITY["atol"] + PARITY["rtol"] * np.abs(want)
    assert (err <= bound).all(), f"{what}: max abs error {err.max():.3g} (atol {PARITY['atol']}, rtol {PARITY['rtol']})"


def test_the_cli_runs_marpipe_as_installed(tmp_path: Path) -> None:
    """Under `make test-gpu` the tests' `marpipe` subprocesses import pipeline from the installed copy (a traceback
    with --debug shows from where), never from this tree."""
    result = marpipe("--debug", "inspect", str(tmp_path / "none.pth"))
    assert result.returncode == 3
    files = {ln.split('"')[1] for ln in result.stderr.splitlines() if ln.strip().startswith('File "') and "/pipeline/" in ln}
    assert files and all(Path(f).is_relative_to(Path(SITE or ROOT)) for f in files), files


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("model", MODELS)
def test_built_and_served_on_the_gpu(model: str, fmt: str, built: Callable[[str], Built], gpu_device: str) -> None:
    package = NEEDS.get(model)
    if package and importlib.util.find_spec(package) is None:
        pytest.skip(f"{package} is not installed")
    if fmt == "onnx" and (why := _onnx_skip(gpu_device)):
        pytest.skip(why)
    build = built(next(g for g, names in GROUPS.items() if model in names))
    if build.result.returncode != 0:
        pytest.fail(f"marpipe build --device {gpu_device} exited {build.result.returncode}: {_error(build.result)}")
    folder = build.project.root / f"{model}_{fmt}"
    with zipfile.ZipFile(build.project.store / f"{model}_{fmt}.mar") as z:
        z.extractall(folder)
    meta = json.loads((folder / "marpipe.json").read_text())
    assert (meta["format"], meta["parity"]["device"]) == (fmt, gpu_device)
    with np.load(folder / "parity_inputs.npz") as f:
        arrays = dict(f)
    with np.load(folder / "parity_outputs.npz") as f:
        stored = dict(f)
    service, answer = _serve(folder, gpu_device, arrays)
    if fmt == "onnx":
        providers = service.runner.session.get_providers()
        want = "CUDAExecutionProvider" if gpu_device == "cuda" else "CPUExecutionProvider"
        assert providers[0] == want, f"the archive's ONNX session runs on {providers}, not {want}"
    else:
        devices = {p.device.type for p in service.runner.module.parameters()}
        assert devices == {gpu_device}, f"the archive's {fmt} model has parameters on {devices}"
    m = build.models[model]
    expected = _eager(m, arrays, meta["inputs"], gpu_device)
    _assert_close(stored[m.output], expected, f"{model}: the build's eager answer vs eager on {gpu_device}")
    served = np.asarray(answer["outputs"][m.output], dtype=np.float32)
    _assert_close(served, expected, f"{model}_{fmt} served on {gpu_device} vs eager on {gpu_device}")
