"""`export.format: aoti`: torch.export + AOTInductor behind the parity gate, bound to the platform it was compiled for.

One build command compiles the module's archives (a text model over token ids with a dynamic, bounded sequence
dim; a two-input model declared out of forward's order, so called by keyword; a dict-output model called by
position) beside a GRU whose sequence dim torch.export cannot keep dynamic (exit 4, nothing stored) and the
batch-dependent trap (exit 5). A real TorchServe serves them, and refuses an archive whose platform record was
edited; rebuilds are byte-identical and an unchanged one is not compiled again.
"""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import Project, marpipe

from handlers.marpipe_serving import aoti
from handlers.marpipe_serving.models import name_outputs
from pipeline.spec.spec import load_spec
from pipeline.stages import inputs as gen
from pipeline.stages import load
from pipeline.torchserve import server as ts

GOOD = ("text", "two", "dictout")


def _meta(path: Path) -> dict:
    with zipfile.ZipFile(path) as z:
        return json.loads(z.read("marpipe.json"))


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Project, dict, str]:
    project = Project(tmp_path_factory.mktemp("aoti"))
    for cls, file in (("TinyText", "text"), ("TwoInTwoOut", "two"), ("DictOut", "dict"), ("TokenGRU", "gru"), ("ShapeBranch", "branch")):
        project.save(project.model(cls).state_dict(), f"{file}.pth")
    aoti_export = {"format": "aoti"}
    ids = {"name": "input_ids", "shape": ["batch", "seq"], "dtype": "int64", "range": [0, 32]}
    mask = {"name": "attention_mask", "shape": ["batch", "seq"], "dtype": "int64", "range": [0, 2], "generate": "padding_mask"}
    specs = [
        project.spec(
            name="text",
            cls="TinyText",
            checkpoint={"path": "text.pth"},
            inputs=[ids, mask],
            dims={"seq": {"sizes": [3, 9], "max": 16}},
            export=aoti_export,
        ),
        project.spec(  # forward(x, seq), declared [seq, x]: called by keyword
            name="two",
            cls="TwoInTwoOut",
            checkpoint={"path": "two.pth"},
            inputs=[{"name": "seq", "shape": ["batch", "steps", 4]}, {"name": "x", "shape": ["batch", 4]}],
            dims={"steps": [2, 5]},
            outputs=[{"name": "joint"}, {"name": "per_step"}],
            export=aoti_export,
        ),
        project.spec(  # forward(x), declared as `rows`: called by position
            name="dictout",
            cls="DictOut",
            checkpoint={"path": "dict.pth"},
            inputs=[{"name": "rows", "shape": ["batch", 4]}],
            outputs=[{"name": "embedding"}, {"name": "score"}],
            export=aoti_export,
        ),
        project.spec(
            name="gru",
            cls="TokenGRU",
            checkpoint={"path": "gru.pth"},
            inputs=[{"name": "ids", "shape": ["batch", "seq"], "dtype": "int64", "range": [0, 32]}],
            dims={"seq": [3, 7]},
            export=aoti_export,
        ),
        project.spec(name="branch", cls="ShapeBranch", checkpoint={"path": "branch.pth"}, export=aoti_export),
    ]
    report = project.root / "report.json"
    result = project.build("--report", str(report), *specs)
    builds = {b["name"]: b for b in json.loads(report.read_text())["builds"]}
    return project, builds, result.stdout + result.stderr


@pytest.mark.slow
def test_build_parity_and_the_record(built: tuple[Project, dict, str]) -> None:
    project, builds, output = built
    for name in GOOD:
        assert builds[name]["exit_code"] == 0, output
        assert builds[name]["compile_s"] > 0
        assert f"{name:<24} export   ok" in output and "compiled in" in output
    assert sorted(p.name for p in project.store.iterdir()) == ["dictout.mar", "index.json", "text.mar", "two.mar"]
    meta = _meta(project.store / "text.mar")
    assert meta["format"] == "aoti" and meta["artifact"] == "model.pt2" and meta["call"] == "keyword"
    record = meta["platform"]
    assert record["machine"] == __import__("platform").machine() and record["torch"] == torch.__version__
    assert record["device"] == "cpu" and record["isa"] and record["compiler"]
    assert meta["requirements"] == [{"name": "torch", "version": torch.__version__.split("+")[0], "for": "aoti package"}]
    with zipfile.ZipFile(project.store / "text.mar") as z:
        assert z.read("requirements.txt").decode() == f"torch=={torch.__version__.split('+')[0]}\n"
    assert _meta(project.store / "two.mar")["call"] == "keyword" and _meta(project.store / "dictout.mar")["call"] == "positional"
    assert [o["name"] for o in _meta(project.store / "dictout.mar")["outputs"]] == ["score", "embedding"]  # the model's order


@pytest.mark.slow
def test_a_dim_torch_export_cannot_keep_dynamic_is_exit_4_naming_it(built: tuple[Project, dict, str]) -> None:
    _, builds, output = built
    gru = builds["gru"]
    assert gru["exit_code"] == 4 and [s["status"] for s in gru["stages"]][:2] == ["ok", "failed"]
    error = gru["error"]
    assert error.startswith(
        "gru: aoti: torch.export failed: torch.export cannot keep it dynamic: dims.seq is fixed to the example's size 7"
    )
    assert "nn.GRU" in error and "tiny.py:" in error and "self.gru(" in error, error
    assert f"error: {error}" in output.splitlines()


@pytest.mark.slow
def test_the_batch_dependent_trap_is_refused_by_parity(built: tuple[Project, dict, str]) -> None:
    _, builds, output = built
    assert builds["branch"]["exit_code"] == 5 and "aoti parity failed on cpu: output: batch 1" in builds["branch"]["error"]
    assert "✗ branch/output" in output


def _refused(project: Project) -> Path:
    """two.mar as `refused`, its platform record edited to another machine and torch."""
    target = project.root / "served" / "refused.mar"
    with zipfile.ZipFile(project.store / "two.mar") as z, zipfile.ZipFile(target, "w") as out:
        for info in z.infolist():
            data = z.read(info.filename)
            if info.filename == "marpipe.json":
                meta = json.loads(data)
                meta["name"] = "refused"
                meta["platform"].update(machine="riscv64", torch="2.12.0")
                data = json.dumps(meta).encode()
            elif info.filename == "MAR-INF/MANIFEST.json":
                manifest = json.loads(data)
                manifest["model"]["modelName"] = "refused"
                data = json.dumps(manifest).encode()
            out.writestr(info, data)
    return target


@pytest.mark.slow
def test_served_answers_like_eager_and_a_foreign_package_is_refused(built: tuple[Project, dict, str]) -> None:
    project, _, _ = built
    served = project.root / "served"
    served.mkdir()
    for name in GOOD:
        (served / f"{name}.mar").write_bytes((project.store / f"{name}.mar").read_bytes())
    refused = _refused(project)
    here = marpipe("inspect", str(refused)).stdout
    assert "this machine cannot serve it: machine riscv64 vs" in here and "torch 2.12.0 vs" in here
    assert "this machine can serve it" in marpipe("inspect", str(project.store / "text.mar")).stdout
    with ts.running(served, auth=False) as srv:
        status = ts.wait_ready(srv, 300)
        assert {n: s for n, s in status.items() if n != "refused"} == dict.fromkeys(GOOD, "READY"), srv.log_tail(40)
        why = status["refused"]
        assert why.startswith("load failed: ") and "PlatformMismatchError: refused: its aoti package was compiled for riscv64" in why, why
        assert f"this server is {__import__('platform').machine()}" in why and "torch 2.12.0 vs" in why
        for name in GOOD:
            spec = load_spec(project.root / f"{name}.yaml")
            model = load.run(spec).model
            dims = {"batch": 3, **{d: v[-1] for d, v in spec.dims.items()}}
            tensors = gen.make(spec, dims, seed=7)
            with torch.inference_mode():
                call = model(**tensors) if name != "dictout" else model(*tensors.values())
                expected = name_outputs(call, [o["name"] for o in _meta(served / f"{name}.mar")["outputs"]])
            arrays = {k: v.numpy() for k, v in tensors.items()}
            buf = io.BytesIO()
            np.savez(buf, **arrays)
            code, _, body = srv.request(
                "inference", f"/predictions/{name}", buf.getvalue(), {"Content-Type": "application/x-npz", "Accept": "application/x-npz"}
            )
            assert code == 200, (name, body)
            with np.load(io.BytesIO(body)) as npz:
                got = {k: npz[k] for k in npz.files}
            body = json.dumps({"inputs": {k: v.tolist() for k, v in arrays.items()}}).encode()
            code, _, answer = srv.request(
                "inference", f"/predictions/{name}", body, {"Content-Type": "application/json", "Accept": "application/json; raw=true"}
            )
            assert code == 200, (name, answer)
            for out, ref in expected.items():
                atol, rtol = spec.tolerance(out)
                np.testing.assert_allclose(got[out], ref, atol=atol, rtol=rtol, err_msg=f"{name}/{out} npz")
                got_json = np.asarray(json.loads(answer)["outputs"][out], dtype=ref.dtype)
                np.testing.assert_allclose(got_json, ref, atol=atol, rtol=rtol, err_msg=f"{name}/{out} json")


@pytest.mark.slow
def test_rebuilds_are_byte_identical_and_an_unchanged_one_is_not_compiled(built: tuple[Project, dict, str]) -> None:
    project, _, _ = built
    spec = project.root / "dictout.yaml"
    again = marpipe("build", "--store", str(project.root / "again"), str(spec), env={"OMP_NUM_THREADS": "1"})
    assert again.returncode == 0, again.stdout + again.stderr
    assert (project.root / "again" / "dictout.mar").read_bytes() == (project.store / "dictout.mar").read_bytes()
    unchanged = project.build(spec)
    assert unchanged.returncode == 0 and "unchanged" in unchanged.stdout and "export" not in unchanged.stdout


@pytest.mark.slow
def test_without_a_compiler_aoti_fails_and_auto_skips_it(project: Project) -> None:
    project.save(project.model("Linear").state_dict(), "tiny.pth")
    auto = project.spec(name="auto", export={"format": "auto", "candidates": ["eager", "aoti"]})
    alone = project.spec(name="alone", export={"format": "aoti"})
    report = project.root / "report.json"
    result = project.build("--report", str(report), auto, alone, env={"CXX": str(project.root / "no-such-compiler")})
    assert result.returncode == 4, result.stdout + result.stderr
    missing = f"$CXX is {project.root / 'no-such-compiler'}, which is not an executable; set it to a C++ compiler (g++, clang++)"
    assert result.stderr.strip().splitlines() == [f"error: alone: aoti: no C++ compiler: {missing}; or build another format"]
    builds = {b["name"]: b for b in json.loads(report.read_text())["builds"]}
    assert builds["auto"]["exit_code"] == 0 and builds["auto"]["auto"]["choice"] == "eager"
    skipped = _meta(project.store / "auto.mar")["auto"]["candidates"]["aoti"]
    assert skipped["status"] == "skipped" and "no C++ compiler" in skipped["error"]
    assert not (project.store / "alone.mar").exists()
    no_compiler = {"CXX": str(project.root / "no-such-compiler")}
    every = project.build("--format", "all", "--store", str(project.root / "all"), alone, env=no_compiler)
    assert every.returncode == 0, every.stdout + every.stderr  # the portable three; stderr says why not aoti
    assert f"marpipe: --format all leaves out aoti: no C++ compiler: {missing}" in every.stderr.splitlines()
    assert sorted(p.name for p in (project.root / "all").glob("*.mar")) == ["alone_eager.mar", "alone_onnx.mar", "alone_torchscript.mar"]


@pytest.mark.parametrize(
    ("change", "why"),
    [
        ({"machine": "aarch64"}, "machine aarch64 vs x86_64"),
        ({"torch": "2.12.0+cpu"}, "torch 2.12.0+cpu vs 2.13.0+cu128"),
        ({"cpu_features": ["avx2", "amx_fp16"]}, "this CPU lacks amx_fp16"),
        ({"device": "cuda", "capability": "9.0", "cuda": "12.8"}, "no GPU here"),
    ],
)
def test_the_platform_check_names_what_differs(change: dict, why: str) -> None:
    record = {"device": "cpu", "machine": "x86_64", "isa": "avx2", "cpu_features": ["avx2", "fma"], "torch": "2.13.0+cpu"}
    server = {"machine": "x86_64", "torch": "2.13.0+cu128", "flags": {"avx2", "fma", "avx"}, "isa": "avx2"}
    assert aoti.mismatch(record, server) is None  # the same torch release, whatever its build
    assert aoti.mismatch({**record, **change}, server) == why
    gpu = {**server, "capability": "9.0", "cuda": "12.8"}
    assert aoti.mismatch({**record, "device": "cuda", "capability": "8.0", "cuda": "12.8"}, gpu) == "compute capability 8.0 vs 9.0"
    assert aoti.isa_name({"avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512_vnni"}) == "avx512 avx512_vnni"


def test_the_build_key_holds_the_machine_for_every_aoti_candidate(project: Project, monkeypatch: pytest.MonkeyPatch) -> None:
    """An auto spec whose candidates include aoti at any precision (`aoti:bf16`) is bound to the machine as a plain aoti
    build is: another compiler or CPU is another key; a spec without aoti is not."""
    from pipeline.build import cache
    from pipeline.spec.spec import load_spec

    project.save(project.model("Linear").state_dict(), "tiny.pth")
    specs = {
        "aoti": project.spec(name="a", export={"format": "aoti"}),
        "auto bf16": project.spec(name="b", export={"format": "auto", "precision": "bf16"}),
        "auto onnx:int8": project.spec(name="c", export={"format": "auto", "candidates": ["aoti:bf16", "onnx:int8"]}),
        "no aoti": project.spec(name="d", export={"format": "auto", "candidates": ["eager", "onnx:int8"]}),
    }
    keys = {}
    for machine in ("one", "other"):
        monkeypatch.setattr(cache.aoti, "key", lambda m=machine: {"compiler": m})
        keys[machine] = {what: cache.build_key(load_spec(path), {}) for what, path in specs.items()}
    assert [w for w in specs if keys["one"][w] != keys["other"][w]] == ["aoti", "auto bf16", "auto onnx:int8"]
