"""aoti on a GPU: with `--device cuda` the package is compiled for that GPU (its compute capability and CUDA version
recorded), passes parity there, and the handler's runner loads it on the GPU; a rebuild gives the same bytes.
`make test-gpu DRY=1` rehearses it on the CPU (`gpu_device`)."""

from __future__ import annotations

import json
import zipfile

import numpy as np
import pytest
import torch
from conftest import Project, marpipe, needs_gpu

pytestmark = [pytest.mark.gpu, needs_gpu]


def test_aoti_compiled_for_the_gpu(project: Project, tmp_path, gpu_device: str) -> None:
    from handlers.marpipe_serving.models import load_runner

    project.save(project.model("TinyImage").state_dict(), "image.pth")
    spec = project.spec(
        name="image",
        cls="TinyImage",
        checkpoint={"path": "image.pth"},
        inputs=[{"name": "image", "shape": ["batch", 3, 16, 16]}],
        export={"format": "aoti"},
        parity={"atol": 1e-4, "rtol": 1e-3},
    )
    result = project.build("--device", gpu_device, spec)
    assert result.returncode == 0, result.stdout + result.stderr
    archive = project.store / "image.mar"
    with zipfile.ZipFile(archive) as z:
        meta = json.loads(z.read("marpipe.json"))
        z.extractall(tmp_path / "unpacked")
    record = meta["platform"]
    assert meta["parity"]["device"] == gpu_device and record["device"] == gpu_device
    if gpu_device == "cuda":
        assert record["capability"] == "{}.{}".format(*torch.cuda.get_device_capability(0)) and record["cuda"] == torch.version.cuda
    where = "cuda:0" if gpu_device == "cuda" else "cpu"
    runner = load_runner(str(tmp_path / "unpacked"), meta, where, 0)
    assert runner.device == where
    with np.load(tmp_path / "unpacked" / "parity_inputs.npz") as inputs, np.load(tmp_path / "unpacked" / "parity_outputs.npz") as outputs:
        got = runner({k: inputs[k] for k in inputs.files})
        np.testing.assert_allclose(got["output"], outputs["output"], atol=1e-4, rtol=1e-3)
    again = marpipe("build", "--device", gpu_device, "--store", str(tmp_path / "again"), str(spec))
    assert again.returncode == 0, again.stdout + again.stderr
    assert (tmp_path / "again" / "image.mar").read_bytes() == archive.read_bytes()
