"""On a CUDA GPU: fp16 and bf16 archives built with parity there, through the accuracy gate, and served by the
handler there; int8 archives stay on the CPU where there is a GPU.

Models (tests/models/tiny.py): a GELU MLP over float inputs (cast to the archive's type on the way in) and a GRU over
int64 token ids (which stay integers); each built as eager and TorchScript in one `marpipe build` process. The
handler (`marpipe_serving.Service`, with TorchServe's `gpu_id` 0) must answer in float32, within the gate of the fp32
eager model on the GPU (TF32 off, as parity runs it), over 200 rows.
"""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import FakeContext, Project

from handlers.marpipe_serving import service as serving
from pipeline.stages import gate

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

FORMATS = ("eager", "torchscript")
MODELS = {  # name: (class, inputs, dims)
    "mlp": ("GeluMLP", [{"name": "x", "shape": ["batch", 16]}], None),
    "gru": ("TokenGRU", [{"name": "ids", "shape": ["batch", "seq"], "dtype": "int64", "range": [0, 32]}], {"seq": [3, 7]}),
}


def _specs(project: Project, precision: str, device: str = "cuda") -> dict[str, tuple[Path, torch.nn.Module]]:
    out = {}
    for name, (cls, inputs, dims) in MODELS.items():
        model = project.model(cls)
        project.save(model.state_dict(), f"{name}.pth")
        extra = {"dims": dims} if dims else {}
        spec = project.spec(
            name=f"{name}_{precision}",
            cls=cls,
            checkpoint={"path": f"{name}.pth"},
            inputs=inputs,
            export={"format": "eager", "precision": precision},
            parity={"device": device},
            **extra,
        )
        out[name] = (spec, model)
    return out


def _extract(archive: Path, folder: Path) -> dict:
    with zipfile.ZipFile(archive) as z:
        z.extractall(folder)
    return json.loads((folder / "marpipe.json").read_text())


def _rows(name: str) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(11)
    if name == "mlp":
        return {"x": rng.standard_normal((200, 16)).astype(np.float32)}
    return {"ids": rng.integers(0, 32, (200, 7)).astype(np.int64)}


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_half_precision_archives_pass_the_gate_and_are_served_on_the_gpu(project: Project, precision: str) -> None:
    specs = _specs(project, precision)
    report = project.root / "report.json"
    done = project.build(*(s for s, _ in specs.values()), "--format", ",".join(FORMATS), "--report", str(report))
    assert done.returncode == 0, done.stdout + done.stderr
    builds = {b["name"]: b for b in json.loads(report.read_text())["builds"]}
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    for name, (_, model) in specs.items():
        rows = _rows(name)
        with torch.no_grad():
            want = model.to("cuda")(*(torch.from_numpy(a).cuda() for a in rows.values())).float().cpu().numpy()
        for fmt in FORMATS:
            archive = f"{name}_{precision}_{fmt}"
            measured = builds[archive]["parity"]["outputs"]["output"]
            assert builds[archive]["precision"] == precision and measured["agreement"] >= 0.99 and measured["cosine"] >= 0.99
            folder = project.root / archive
            meta = _extract(project.store / f"{archive}.mar", folder)
            assert meta["precision"] == precision and meta["parity"]["device"] == "cuda"
            assert meta["parity"]["gate"]["precision"] == precision
            context = FakeContext(folder, [{"Content-Type": "application/x-npz", "Accept": "application/x-npz"}])
            context.system_properties["gpu_id"] = 0
            service = serving.Service(context)
            assert service.runner.device == "cuda:0"
            got = []
            for start in range(0, 200, 50):
                buf = io.BytesIO()
                np.savez(buf, **{k: v[start : start + 50] for k, v in rows.items()})
                body = service.handle([{"body": buf.getvalue()}], context)[0]
                assert context.status.get(0, (200,))[0] == 200, body
                with np.load(io.BytesIO(body)) as f:
                    got.append(f["output"])
            answers = np.concatenate(got)
            assert answers.dtype == np.float32
            tally = gate.Tally()
            tally.add(want, answers)
            assert tally.agreement >= 0.99 and tally.cosine >= 0.99, (archive, tally)
        model.to("cpu")


def test_int8_stays_on_the_cpu_where_there_is_a_gpu(project: Project) -> None:
    specs = _specs(project, "int8", device="auto")
    spec, _ = specs["mlp"]
    done = project.build(spec, "--format", "eager,onnx")
    assert done.returncode == 0, done.stdout + done.stderr
    for fmt in ("eager", "onnx"):
        folder = project.root / fmt
        meta = _extract(project.store / f"mlp_int8_{fmt}.mar", folder)
        assert meta["precision"] == "int8" and meta["parity"]["device"] == "cpu"  # auto: int8 runs on the CPU
        context = FakeContext(folder)
        context.system_properties["gpu_id"] = 0
        service = serving.Service(context)
        body = service.handle([{"body": {"inputs": {"x": [[0.5] * 16]}}}], context)[0]
        assert context.status.get(0, (200,))[0] == 200 and len(json.loads(body)["outputs"]["output"][0]) == 4
        if fmt == "eager":
            assert service.runner.device == "cpu"
    on_cuda = _specs(project, "int8", device="cuda")["mlp"][0]
    done = project.build(on_cuda)
    assert done.returncode == 2 and "int8 runs on the CPU" in done.stderr and done.stderr.count("\n") == 1


def test_auto_across_precisions_on_the_gpu(project: Project) -> None:
    model = project.model("GeluMLP")
    project.save(model.state_dict(), "mlp.pth")
    spec = project.spec(
        name="auto",
        cls="GeluMLP",
        checkpoint={"path": "mlp.pth"},
        inputs=MODELS["mlp"][1],
        export={"format": "auto", "candidates": ["eager", "eager:fp16", "torchscript:bf16", "onnx:int8"]},
    )
    report = project.root / "report.json"
    done = project.build(spec, "--report", str(report))
    assert done.returncode == 0, done.stdout + done.stderr
    build = json.loads(report.read_text())["builds"][0]
    labels = ["eager", "eager:fp16", "torchscript:bf16", "onnx:int8"]
    assert list(build["auto"]["candidates"]) == labels and build["auto"]["choice"] in labels
    assert all(build["auto"]["candidates"][c]["status"] == "passed" for c in labels), build["auto"]
