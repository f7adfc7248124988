"""export.precision (fp32, fp16, bf16, int8) and the accuracy gate, on the CPU.

int8 archives of a small GELU MLP in every format are built, loaded and served by a real TorchServe answering within
the gate (agreement and cosine against the fp32 eager model over 200 rows); the same MLP with one hidden channel
10^4 times larger, which the next layer ignores (fp32 does not see it, int8's per-batch activation range does),
fails with exit 5 naming `agreement` and leaves the store as it was; auto over precision candidates picks and records
labels; bad values are exit 2 one-liners. A 512-wide MLP and a BERT-shaped encoder are benchmarked by `make bench`
(benchmarks/precision_bench.py), not here: these models are kept small so the tests are fast.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import sys
import zipfile
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from conftest import Project, serving, store_state

from handlers.marpipe_serving import precision as serving_precision
from handlers.marpipe_serving.architectures import load_weights, params_on_meta
from pipeline.build.release import plan
from pipeline.errors import SpecError
from pipeline.spec.spec import load_spec
from pipeline.stages import gate, parity
from pipeline.stages import precision as build_precision
from pipeline.torchserve.smoke import judge

MLP_INPUTS = [{"name": "x", "shape": ["batch", 16]}]


def _meta(path: Path) -> dict:
    with zipfile.ZipFile(path) as z:
        return json.loads(z.read("marpipe.json"))


def _mlp(project: Project, name: str = "mlp", outlier: bool = False, **sections) -> tuple[Path, torch.nn.Module]:
    """A GeluMLP spec and its fp32 model; `outlier`: hidden channel 5 of the first layer 10^4 times larger, and zero
    weights for it in the second (the fp32 answers do not change; int8's activation range is set by it)."""
    model = project.model("GeluMLP")
    state = copy.deepcopy(model.state_dict())
    if outlier:
        state["layers.0.weight"][5] *= 1e4
        state["layers.0.bias"][5] *= 1e4
        state["layers.1.weight"][:, 5] = 0
        model.load_state_dict(state)
    project.save(state, f"{name}.pth")
    return project.spec(name=name, cls="GeluMLP", checkpoint={"path": f"{name}.pth"}, inputs=MLP_INPUTS, **sections), model


def _served(srv, name: str, rows: np.ndarray) -> np.ndarray:
    """200 rows through TorchServe, 50 a request (npz both ways)."""
    answers = []
    for start in range(0, len(rows), 50):
        buf = io.BytesIO()
        np.savez(buf, x=rows[start : start + 50])
        headers = {"Content-Type": "application/x-npz", "Accept": "application/x-npz"}
        code, _, body = srv.request("inference", f"/predictions/{name}", buf.getvalue(), headers)
        assert code == 200, body[:300]
        with np.load(io.BytesIO(body)) as f:
            answers.append(f["output"])
    return np.concatenate(answers)


@pytest.mark.slow
def test_int8_in_every_format_is_served_within_the_gate_and_an_outlier_fails_it(project: Project) -> None:
    model = project.model("GeluMLP")
    ref = np.random.default_rng(5).standard_normal((60, 16)).astype(np.float32)
    with torch.no_grad():
        np.savez(project.root / "reference.npz", x=ref, output=model(torch.from_numpy(ref)).numpy())
    spec, model = _mlp(project, export={"format": "onnx", "precision": "int8"}, parity={"reference": "reference.npz"})
    every, _ = _mlp(project, name="mlp8", export={"format": "eager", "precision": "int8"})
    report = project.root / "report.json"
    done = project.build(spec, "--report", str(report))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "✓ mlp/output: agreement" in done.stdout
    measured = json.loads(report.read_text())["builds"][0]
    assert measured["precision"] == "int8"
    output = measured["parity"]["outputs"]["output"]
    assert output["agreement"] >= 0.99 and output["cosine"] >= 0.99 and output["rows"] == 215  # 15 parity rows + 200
    assert output["reference"]["rows"] == 60 and output["reference"]["agreement"] >= 0.99  # the user's rows, apart
    assert "; parity.reference: " in done.stdout and "✓ mlp: parity.reference reference.npz: 60 rows" in done.stdout
    done = project.build(every, "--format", "eager,torchscript")
    assert done.returncode == 0, done.stdout + done.stderr

    meta = _meta(project.store / "mlp.mar")
    assert meta["precision"] == "int8" and "int8 (onnxruntime, per channel)" in meta["export"]["detail"]
    assert meta["parity"]["gate"]["agreement"] == 0.99 and meta["parity"]["gate"]["generated_rows"] == 200
    assert meta["parity"]["outputs"]["output"] == {"agreement": 0.99, "cosine": 0.99, "passed": True}
    entry = next(e for e in json.loads((project.store / "index.json").read_text())["archives"] if e["name"] == "mlp")
    assert entry["precision"] == "int8" and entry["parity"] == {"output": {"agreement": 0.99, "cosine": 0.99}}
    with zipfile.ZipFile(project.store / "mlp.mar") as z:
        ops = {n.op_type for n in onnx.load_from_string(z.read("model.onnx")).graph.node}
        assert "MatMulInteger" in ops
    with zipfile.ZipFile(project.store / "mlp8_eager.mar") as z:
        z.extract("weights.pt", project.root)
    with serving_precision.quiet():  # no pickled code: quantized tensors are data
        state = torch.load(project.root / "weights.pt", weights_only=True)
    packed = state["layers.0._packed_params._packed_params"][0]
    assert packed.dtype == torch.qint8 and packed.qscheme() == torch.per_channel_affine

    before = store_state(project.store)
    bad, _ = _mlp(project, name="outlier", outlier=True, export={"format": "onnx", "precision": "int8"})
    failed = project.build(bad)
    assert failed.returncode == 5, failed.stdout + failed.stderr
    assert failed.stderr.count("\n") == 1 and "onnx int8 accuracy gate failed" in failed.stderr
    assert "output: agreement 0." in failed.stderr and "< 0.99" in failed.stderr
    assert store_state(project.store) == before

    rows = np.random.default_rng(7).standard_normal((200, 16)).astype(np.float32)
    with torch.no_grad():
        want = model(torch.from_numpy(rows)).numpy()
    with contextlib.contextmanager(serving)(project.store) as srv:
        for name in ("mlp", "mlp8_eager", "mlp8_torchscript"):
            tally = gate.Tally()
            tally.add(want, _served(srv, name, rows))
            assert tally.agreement >= 0.99 and tally.cosine >= 0.99, (name, tally)


def test_auto_over_precisions_picks_the_fastest_passing_and_records_labels(project: Project) -> None:
    spec, _ = _mlp(project, export={"format": "auto", "candidates": ["onnx:int8", "eager", "eager:int8"]})
    report = project.root / "report.json"
    done = project.build(spec, "--report", str(report))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "mlp                      auto     eager:int8" in done.stdout
    meta = _meta(project.store / "mlp.mar")
    labels = ["eager", "eager:int8", "onnx:int8"]  # the formats' order, fp32 first
    assert list(meta["auto"]["candidates"]) == labels and meta["auto"]["choice"] in labels
    assert meta.get("precision", "fp32") == ("int8" if ":int8" in meta["auto"]["choice"] else "fp32")
    build = json.loads(report.read_text())["builds"][0]
    assert build["auto"]["choice"] == meta["auto"]["choice"] and build["precision"] == meta.get("precision", "fp32")
    for label in labels:  # every candidate's timing and both measures, fp32 too
        measures = build["auto"]["candidates"][label]["outputs"]["output"]
        assert build["auto"]["candidates"][label]["median_ms"] > 0 and measures["agreement"] >= 0.99 and measures["cosine"] >= 0.99


def test_bad_precisions_are_exit_2_one_liners(project: Project) -> None:
    project.save(project.model("GeluMLP").state_dict(), "mlp.pth")

    def error(**export) -> str:
        path = project.spec(name="bad", cls="GeluMLP", checkpoint={"path": "mlp.pth"}, inputs=MLP_INPUTS, export=export)
        with pytest.raises(SpecError) as caught:
            load_spec(path)
        assert caught.value.exit_code == 2 and "\n" not in str(caught.value)
        return str(caught.value)

    assert "export.precision: 'int4' is not one of: fp32, fp16, bf16, int8" in error(precision="int4")
    assert "export.candidates[1]: 'onnx:int9': unknown precision 'int9'" in error(format="auto", candidates=["onnx", "onnx:int9"])
    assert "export.candidates[0]: 'onnx:fp16': fp16 is not available in onnx" in error(format="auto", candidates=["onnx:fp16"])
    assert "export.precision: bf16 is not available in onnx" in error(format="onnx", precision="bf16")
    assert "give one or more different candidates" in error(format="auto", candidates=["onnx", "onnx:fp32"])
    path = project.spec(name="agree", cls="GeluMLP", checkpoint={"path": "mlp.pth"}, inputs=MLP_INPUTS, parity={"agreement": 1.5})
    with pytest.raises(SpecError, match="parity.agreement: must be a fraction in"):
        load_spec(path)

    int8_cuda = project.spec(
        name="cuda8",
        cls="GeluMLP",
        checkpoint={"path": "mlp.pth"},
        inputs=MLP_INPUTS,
        export={"precision": "int8"},
        parity={"device": "cuda"},
    )
    before = store_state(project.store)
    done = project.build(int8_cuda)
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert "export.precision: int8 runs on the CPU" in done.stderr and "parity.device is cuda" in done.stderr
    done = project.build(
        project.spec(name="int4", cls="GeluMLP", checkpoint={"path": "mlp.pth"}, inputs=MLP_INPUTS, export={"precision": "int4"})
    )
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "export.precision: 'int4'" in done.stderr
    assert store_state(project.store) == before


def test_candidates_are_labels_in_order_and_format_all_names_each_precision(project: Project) -> None:
    project.save(project.model("GeluMLP").state_dict(), "mlp.pth")

    def spec(name: str, **export):
        return load_spec(project.spec(name=name, cls="GeluMLP", checkpoint={"path": "mlp.pth"}, inputs=MLP_INPUTS, export=export))

    multi = spec("multi", format="auto", precision="int8", candidates=["onnx:fp32", "torchscript", "onnx", "eager:fp32"])
    assert multi.export.candidates == ("eager", "torchscript:int8", "onnx", "onnx:int8")  # a bare format: at export.precision
    assert spec("d").export.candidates == ("eager", "torchscript", "onnx", "aoti")  # default: fp32 only
    assert spec("h", format="auto", precision="bf16").export.candidates == ("eager:bf16", "torchscript:bf16", "aoti:bf16")
    one = spec("one", format="onnx", precision="int8")
    jobs = plan([multi, one, spec("plain")], ["eager", "torchscript", "onnx"])
    names = [(j.name, j.export.format, j.export.precision) for j in jobs]
    assert names[:6] == [
        ("multi_eager_fp32", "eager", "fp32"),
        ("multi_eager_int8", "eager", "int8"),
        ("multi_torchscript_fp32", "torchscript", "fp32"),
        ("multi_torchscript_int8", "torchscript", "int8"),
        ("multi_onnx_fp32", "onnx", "fp32"),
        ("multi_onnx_int8", "onnx", "int8"),
    ]
    assert names[6:] == [("one_eager", "eager", "int8"), ("one_torchscript", "torchscript", "int8"), ("one_onnx", "onnx", "int8")] + [
        ("plain_eager", "eager", "fp32"),
        ("plain_torchscript", "torchscript", "fp32"),
        ("plain_onnx", "onnx", "fp32"),
    ]
    assert [j.name for j in plan([multi], ["onnx"])] == ["multi_onnx_fp32", "multi_onnx_int8"]
    assert [j.name for j in plan([multi], ["auto"])] == ["multi"]
    half = spec("half", format="eager", precision="fp16")
    assert [j.name for j in plan([half], ["eager", "onnx"])] == ["half_eager"]  # onnx takes no fp16: not built
    with pytest.raises(SpecError, match="fp16 is not available in onnx"):
        plan([half], ["onnx"])


def test_where_each_precision_runs(project: Project, monkeypatch: pytest.MonkeyPatch) -> None:
    project.save(project.model("GeluMLP").state_dict(), "mlp.pth")

    def spec(precision: str, device: str = "auto"):
        path = project.spec(
            name=precision,
            cls="GeluMLP",
            checkpoint={"path": "mlp.pth"},
            inputs=MLP_INPUTS,
            export={"precision": precision},
            parity={"device": device},
        )
        return load_spec(path)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert parity.resolve_device(spec("int8"), None) == "cpu"  # auto: int8 runs on the CPU even where there is a GPU
    with pytest.raises(SpecError, match="int8 runs on the CPU .* and --device is cuda"):
        parity.resolve_device(spec("int8"), "cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SpecError, match=r"fp16 runs on a GPU only \(on a CPU it was 1.1x faster than fp32 at best.*torch sees no GPU here"):
        parity.resolve_device(spec("fp16"), None)
    monkeypatch.setattr(build_precision, "cpu_bf16", lambda: False)
    with pytest.raises(SpecError, match="bf16 on a CPU needs AMX-BF16, which this one lacks"):
        parity.resolve_device(spec("bf16", "cpu"), None)
    monkeypatch.setattr(build_precision, "cpu_bf16", lambda: True)
    assert parity.resolve_device(spec("bf16"), None) == "cpu"


@pytest.mark.skipif(not build_precision.cpu_bf16(), reason="bf16 on a CPU needs AMX-BF16")
def test_bf16_on_a_cpu_with_amx_builds_and_answers_float32(project: Project) -> None:
    spec, model = _mlp(project, name="bf", export={"format": "eager", "precision": "bf16"})
    done = project.build(spec, "--format", "eager,torchscript,aoti")
    assert done.returncode == 0, done.stdout + done.stderr
    from handlers.marpipe_serving.models import load_runner

    x = np.random.default_rng(3).standard_normal((64, 16)).astype(np.float32)
    with torch.no_grad():
        want = model(torch.from_numpy(x)).numpy()
    for fmt in ("eager", "torchscript", "aoti"):  # aoti: the bf16 module exported and compiled
        folder = project.root / fmt
        with zipfile.ZipFile(project.store / f"bf_{fmt}.mar") as z:
            z.extractall(folder)
        meta = _meta(project.store / f"bf_{fmt}.mar")
        assert meta["precision"] == "bf16"
        got = load_runner(str(folder), meta, "cpu")({"x": x})["output"]
        tally = gate.Tally()
        tally.add(want, got)
        assert got.dtype == np.float32 and tally.cosine >= 0.99 and not np.array_equal(got, want)


def test_an_int8_eager_archive_with_recurrent_layers_loads_weights_only(project: Project) -> None:
    """A quantized GRU keeps its int8 weights in TorchScript objects, which weights_only refuses: the archive holds
    its float weights, quantized again at load as the build quantized them; the linear layers stay int8."""
    model = project.model("TokenGRU")
    quantized = serving_precision.quantize(copy.deepcopy(model))
    torch.save(serving_precision.int8_state(quantized, model), project.root / "weights.pt")
    with serving_precision.quiet():  # torch warns of its quantized tensors
        state = torch.load(project.root / "weights.pt", weights_only=True, mmap=True)
    assert state["gru.weight_ih_l0"].dtype == torch.float32 and "fc._packed_params._packed_params" in state
    sys.path.insert(0, str(project.root / "models"))
    try:
        import tiny
    finally:
        sys.path.pop(0)
    with params_on_meta():
        fresh = tiny.TokenGRU()
    rebuilt = serving_precision.load_int8(fresh.eval(), state, load_weights)
    ids = torch.randint(0, 32, (6, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(rebuilt(ids), quantized(ids)) and not torch.equal(rebuilt(ids), model(ids))
    assert type(rebuilt.gru).__name__ == "GRU" and "quantized" in type(rebuilt.gru).__module__


def test_the_gate_measures() -> None:
    tally = gate.Tally()
    tally.add(np.array([[1.0, 2.0, 0.0], [3.0, 0.0, 1.0]]), np.array([[1.0, 1.9, 0.1], [0.0, 3.0, 1.0]]))
    assert tally.agreement == 0.5 and tally.positions == 2
    assert tally.cosine == pytest.approx((np.dot([1, 2, 0], [1, 1.9, 0.1]) / np.sqrt(5 * 4.62) + 0.1) / 2)
    zeros = gate.Tally()
    zeros.add(np.zeros((2, 1)), np.array([[0.0], [1.0]]))  # one value a row: no top-1; zero vs zero alike, vs not unlike
    assert zeros.agreement is None and zeros.cosine == 0.5
    nan = gate.Tally()
    nan.add(np.ones((2, 3)), np.array([[1.0, np.nan, 1.0], [1.0, 1.0, 1.0]]))
    assert gate.judge(nan, (0.5, 0.9), "rows") == ["cosine nan < 0.9 (mean cosine similarity; 2 rows of rows)"]
    per_token = gate.Tally()
    per_token.add(np.eye(4).reshape(2, 2, 4), np.eye(4)[::-1].reshape(2, 2, 4))  # every token's top-1 differs
    assert per_token.agreement == 0.0 and per_token.positions == 4


def test_smoke_judges_a_gated_archive_by_its_measures() -> None:
    meta = {
        "outputs": [{"name": "y", "atol": 1e-5, "rtol": 1e-4}],
        "parity": {"gate": {}, "outputs": {"y": {"agreement": 0.9, "cosine": 0.9}}},
    }
    want = {"y": np.array([[1.0, 0.0], [0.0, 1.0]] * 5)}
    assert judge(meta, want, {"y": want["y"] + 0.01})[1] == []  # beyond atol, within the gate
    worst, why = judge(meta, want, {"y": want["y"][:, ::-1].copy()})
    assert worst == 1.0 and why[0].startswith("y: agreement 0.0000 < 0.9") and why[1].startswith("y: cosine 0.0000 < 0.9")
    assert judge({**meta, "parity": {"outputs": {"y": {"atol": 1e-5, "rtol": 1e-4}}}}, want, {"y": want["y"] + 0.01})[1]  # fp32: atol
