"""`make bench`, precisions: int8 (and bf16 on a CPU with AMX) against fp32, per format, for a 4-layer 512-wide GELU
MLP and a BERT-base-shaped encoder (width 768, 12 heads, 3072 intermediate, 4 layers, 128 tokens, a 10-label head
over the first token; random weights from transformers' BertConfig, nothing downloaded).

For each model one `marpipe build --format all` of a spec whose candidates name the precisions builds every
(format, precision) archive, `<name>_<format>_<precision>.mar`, each through its gate. Then, for each archive:
in-process latency at batch 1 and 32 on one thread (its runner as the handler loads it, the median of about a
second of runs, at least 5), and agreement (top-1) and mean cosine with the fp32 eager archive over 200 rows
(pipeline/stages/gate.py). Then ONNX and TorchScript at fp32 and int8, each alone in a fresh TorchServe
(batch_size 8, one row per request, npz, concurrency 8; 400 warm-up requests, then the median of 3 loads): req/s,
p50, and the served answers' agreement and cosine over 200 rows (25 requests of 8 rows).

The specs build with parity.agreement and parity.cosine 0.9, so that an archive exists to time whatever its
measures; the measures are reported against the issue's 0.99. Writes benchmarks/out/precision.json.

  python benchmarks/precision_bench.py [--models mlp,encoder] [--requests 400] [--only inprocess,serve,variants,dtypes]
                                       [--out benchmarks/out]
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
ROWS = 200
MODELS = '''"""The models of benchmarks/precision_bench.py (written by it)."""

import torch
from torch import nn


class GeluMLP(nn.Module):
    def __init__(self, width: int = 512, layers: int = 4, classes: int = 10) -> None:
        super().__init__()
        dims = [width] * layers + [classes]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims, dims[1:]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers[:-1]:
            x = nn.functional.gelu(layer(x))
        return self.layers[-1](x)


class Encoder(nn.Module):
    """BERT-base-shaped layers (width 768, 12 heads, 3072 intermediate) and a classifier over the first token."""

    def __init__(self, layers: int = 4, labels: int = 10) -> None:
        super().__init__()
        from transformers import BertConfig, BertForSequenceClassification

        config = BertConfig(hidden_size=768, num_hidden_layers=layers, num_attention_heads=12, intermediate_size=3072, num_labels=labels)
        self.bert = BertForSequenceClassification._from_config(config, attn_implementation="eager")

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.bert(input_ids=input_ids).logits
'''
SPECS = {  # name: (class, input line, a maker of `rows` inputs, served request count scale)
    "mlp": ("GeluMLP", "{name: x, shape: [batch, 512]}", lambda rng, n: {"x": rng.standard_normal((n, 512)).astype(np.float32)}, 1.0),
    "encoder": (
        "Encoder",
        "{name: input_ids, shape: [batch, 128], dtype: int64, range: [0, 30522]}",
        lambda rng, n: {"input_ids": rng.integers(0, 30522, (n, 128)).astype(np.int64)},
        0.25,
    ),
}


def candidates() -> list[str]:
    from pipeline.stages.precision import cpu_bf16

    found = ["eager", "eager:int8", "torchscript", "torchscript:int8", "onnx", "onnx:int8"]
    return found + (["eager:bf16", "torchscript:bf16"] if cpu_bf16() else [])


def prepare(folder: Path, name: str) -> Any:
    """The model's source and checkpoint (seed 0) in `folder`; the fp32 model."""
    import torch

    (folder / "precision_models.py").write_text(MODELS)
    sys.path.insert(0, str(folder))
    import precision_models

    torch.manual_seed(0)
    model = getattr(precision_models, SPECS[name][0])().eval()
    torch.save(model.state_dict(), folder / f"{name}.pth")
    return model


def build(folder: Path, name: str) -> dict[str, Path]:
    """Every (format, precision) archive of one model: {label: archive}. The store is kept between runs: marpipe's
    build cache leaves an unchanged archive as it is."""
    cls, line, _, _ = SPECS[name]
    labels = candidates()
    (folder / f"{name}.yaml").write_text(
        f"name: {name}\narchitecture: {{file: precision_models.py, class: {cls}}}\ncheckpoint: {{path: {name}.pth}}\n"
        f"inputs: [{line}]\nexport: {{format: auto, candidates: [{', '.join(labels)}]}}\n"
        "parity: {batch_sizes: [1, 4], samples: 2, atol: 1.0e-4, rtol: 1.0e-3, agreement: 0.9, cosine: 0.9}\n"
        "serve: {batch_size: 8, max_batch_delay_ms: 10}\n"
    )
    store = folder / "store"
    cmd = [sys.executable, "-m", "pipeline", "build", "--store", str(store), "--format", "all", "--report", str(folder / "report.json")]
    done = subprocess.run([*cmd, str(folder / f"{name}.yaml")], cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)), text=True)
    if done.returncode:
        raise SystemExit(f"marpipe build of {name} failed ({done.returncode})")
    return {label: store / f"{name}_{label.replace(':', '_')}{'' if ':' in label else '_fp32'}.mar" for label in labels}


def runner(archive: Path, folder: Path) -> Any:
    """The archive's runner as the handler loads it, on one thread."""
    import torch

    from handlers.marpipe_serving.models import load_runner

    shutil.rmtree(folder, ignore_errors=True)
    with zipfile.ZipFile(archive) as z:
        z.extractall(folder)
    meta = json.loads((folder / "marpipe.json").read_text())
    torch.set_num_threads(1)
    return load_runner(str(folder), meta, "cpu", None, threads=1)


def in_process(name: str, archives: dict[str, Path], folder: Path) -> dict[str, dict]:
    """Latency at batch 1 and 32 on one thread; agreement and cosine with fp32 eager over ROWS rows."""

    make = SPECS[name][2]
    rows = make(np.random.default_rng(1), ROWS)
    reference = runner(archives["eager"], folder / "ref")
    want = _chunked(reference, rows)
    out = {}
    for label, archive in archives.items():
        run = runner(archive, folder / label.replace(":", "_"))
        row = _timed_row(run, rows, want["output"], make)
        row["bytes"] = archive.stat().st_size
        out[label] = row
        print(
            f"  {name:<8} {label:<17} b1 {row['batch_1']['median_ms']:9.3f} ms  b32 {row['batch_32']['median_ms']:9.3f} ms  "
            f"agreement {row['agreement']:.4f}  cosine {row['cosine']:.5f}",
            flush=True,
        )
    for label, row in out.items():
        fp32 = out[label.split(":")[0]]
        row["speedup"] = {b: fp32[b]["median_ms"] / row[b]["median_ms"] for b in ("batch_1", "batch_32")}
    return out


def _timed_row(run: Any, rows: dict[str, np.ndarray], want: np.ndarray, make: Any) -> dict[str, Any]:
    """Agreement and cosine of `run`'s answers to `rows` with `want`, and its latency at batch 1 and 32 (one
    thread, about a second of runs each)."""
    from pipeline.build.trial import measure
    from pipeline.stages.gate import Tally

    tally = Tally()
    tally.add(want, _chunked(run, rows)["output"])
    row: dict[str, Any] = {"agreement": tally.agreement, "cosine": tally.cosine}
    for batch in (1, 32):
        arrays = make(np.random.default_rng(2), batch)
        first = measure(run, arrays, 1, warmup=2)["median_ms"]
        row[f"batch_{batch}"] = measure(run, arrays, max(5, min(200, int(1000 / max(first, 1e-3)))), warmup=1)
    return row


def _chunked(run: Any, rows: dict[str, np.ndarray], step: int = 25) -> dict[str, np.ndarray]:
    parts = [run({k: v[i : i + step] for k, v in rows.items()}) for i in range(0, ROWS, step)]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def served(name: str, archives: dict[str, Path], folder: Path, requests: int, runs: int = 3) -> dict[str, dict]:
    """ONNX and TorchScript at fp32 and int8, each alone in a fresh TorchServe: req/s and p50 (the median of `runs`
    loads after 400 warm-up requests), and the served answers' agreement and cosine with fp32 eager over ROWS rows."""
    from bench import _load

    from pipeline.stages.gate import Tally
    from pipeline.torchserve import server as ts

    make, scale = SPECS[name][2], SPECS[name][3]
    buf = io.BytesIO()
    np.savez(buf, **make(np.random.default_rng(4), 1))
    body, headers = buf.getvalue(), {"Content-Type": "application/x-npz", "Accept": "application/x-npz"}
    rows = make(np.random.default_rng(1), ROWS)
    want = _chunked(runner(archives["eager"], folder / "ref"), rows)["output"]
    count = max(40, int(requests * scale))
    out: dict[str, dict] = {}
    for label in ("torchscript", "torchscript:int8", "onnx", "onnx:int8"):
        store = folder / "served"
        shutil.rmtree(store, ignore_errors=True)
        store.mkdir()
        os.link(archives[label], store / archives[label].name)
        path = f"/predictions/{archives[label].stem}"
        with ts.running(store, auth=False) as srv:
            if set(ts.wait_ready(srv, 600).values()) != {"READY"}:
                raise SystemExit(f"{label} not READY\n{srv.log_tail()}")
            port = srv.ports["inference"]
            _load(srv.host, port, path, body, headers, max(40, int(400 * scale)), 8)
            got = []
            for start in range(0, ROWS, 8):
                part = io.BytesIO()
                np.savez(part, **{k: v[start : start + 8] for k, v in rows.items()})
                code, _, answer = srv.request("inference", path, part.getvalue(), headers)
                if code != 200:
                    raise SystemExit(f"{path}: HTTP {code}: {answer[:200]!r}")
                with np.load(io.BytesIO(answer)) as f:
                    got.append(f["output"])
            loads = [_load(srv.host, port, path, body, headers, count, 8) for _ in range(runs)]
        tally = Tally()
        tally.add(want, np.concatenate(got))
        best = sorted(loads, key=lambda r: r["rps"])[len(loads) // 2]
        out[label] = dict(agreement=tally.agreement, cosine=tally.cosine, rps=best["rps"], p50_ms=best["p50_ms"], p99_ms=best["p99_ms"])
        out[label]["rps_runs"] = [r["rps"] for r in loads]
        print(
            f"  {name:<8} {label:<17} served {best['rps']:8.1f} req/s  p50 {best['p50_ms']:7.2f} ms  "
            f"agreement {tally.agreement:.4f}  cosine {tally.cosine:.5f}",
            flush=True,
        )
    return out


def variants(name: str, archives: dict[str, Path], folder: Path) -> dict[str, dict]:
    """onnxruntime's dynamic quantization of the fp32 ONNX archive's model four ways (weights per output channel or
    per tensor, int8 or uint8; marpipe uses per channel, int8): latency at batch 1 and 32 on one thread, agreement and
    cosine with fp32 eager over ROWS rows."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from handlers.marpipe_serving.models import OnnxRunner

    make = SPECS[name][2]
    rows = make(np.random.default_rng(1), ROWS)
    want = _chunked(runner(archives["eager"], folder / "ref"), rows)["output"]
    runner(archives["onnx"], folder / "onnx")  # extracted
    meta = json.loads((folder / "onnx" / "marpipe.json").read_text())
    out = {}
    for per_channel in (True, False):
        for weights in (QuantType.QInt8, QuantType.QUInt8):
            label = f"{'per channel' if per_channel else 'per tensor'}, {weights.name[1:].lower()} weights"
            path = folder / f"variant_{int(per_channel)}_{weights.name}.onnx"
            quantize_dynamic(str(folder / "onnx" / "model.onnx"), str(path), per_channel=per_channel, weight_type=weights)
            run = OnnxRunner(str(path), meta, None, 1)
            row = _timed_row(run, rows, want, make)
            out[label] = row
            print(
                f"  {name:<8} onnx int8, {label:<28} b1 {row['batch_1']['median_ms']:9.3f} ms  b32 {row['batch_32']['median_ms']:9.3f} ms  "
                f"agreement {row['agreement']:.4f}  cosine {row['cosine']:.5f}",
                flush=True,
            )
    return out


def dtypes(name: str, model: Any) -> dict[str, dict]:
    """The fp32 model cast to float16 and bfloat16 and run by torch itself, one thread, batch 1 and 32: what this CPU
    does with each type (marpipe refuses fp16 on a CPU, and bf16 without AMX-BF16: these are the figures why;
    ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16 or AVX2 shows a CPU without AMX)."""
    import torch

    from pipeline.build.trial import measure

    make = SPECS[name][2]
    torch.set_num_threads(1)
    out = {}
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        cast = copy.deepcopy(model).to(dtype)
        row = {}
        for batch in (1, 32):
            arrays = {k: torch.from_numpy(v) for k, v in make(np.random.default_rng(2), batch).items()}
            arrays = {k: v.to(dtype) if v.is_floating_point() else v for k, v in arrays.items()}

            def run(a: dict, m: Any = cast) -> Any:
                with torch.inference_mode():
                    return m(*a.values())

            first = measure(run, arrays, 1, warmup=1)["median_ms"]
            row[f"batch_{batch}"] = measure(run, arrays, max(3, min(200, int(1000 / max(first, 1e-3)))), warmup=1)
        out[str(dtype).removeprefix("torch.")] = row
        print(
            f"  {name:<8} torch {str(dtype):<16} b1 {row['batch_1']['median_ms']:9.3f} ms  b32 {row['batch_32']['median_ms']:9.3f} ms",
            flush=True,
        )
    return out


def report(results: dict) -> None:
    print(f"\nPrecisions (in process: one thread, median ms; agreement and cosine vs fp32 eager over {ROWS} rows)")
    print(f"  {'model':<8} {'candidate':<17} {'batch 1':>9} {'x fp32':>7} {'batch 32':>10} {'x fp32':>7} {'agreement':>9} {'cosine':>8}")
    for name, model in results["models"].items():
        for label, r in model.get("in_process", {}).items():
            print(
                f"  {name:<8} {label:<17} {r['batch_1']['median_ms']:9.3f} {r['speedup']['batch_1']:6.2f}x "
                f"{r['batch_32']['median_ms']:10.3f} {r['speedup']['batch_32']:6.2f}x {r['agreement']:9.4f} {r['cosine']:8.5f}"
            )
        for label, r in model.get("served", {}).items():
            print(f"  {name:<8} {label:<17} served {r['rps']:.1f} req/s, p50 {r['p50_ms']:.2f} ms, agreement {r['agreement']:.4f}")
    mlp, enc = (results["models"].get(n, {}).get("in_process") and results["models"][n] for n in ("mlp", "encoder"))
    if mlp:
        onnx = mlp["in_process"]["onnx:int8"]
        served_agreement = mlp.get("served", {}).get("onnx:int8", {}).get("agreement")
        print(
            f"  mlp: onnx int8 {onnx['speedup']['batch_32']:.2f}x fp32 at batch 32 on one thread (target >= 1.3x), served agreement "
            f"{served_agreement if served_agreement is None else round(served_agreement, 4)} (target >= 0.99)"
        )
    if enc:
        best = max((r["speedup"]["batch_32"], label) for label, r in enc["in_process"].items() if label.endswith(":int8"))
        r = enc["in_process"][best[1]]
        print(f"  encoder: {best[1]} {best[0]:.2f}x fp32 at batch 32 (target >= 1.5x) at agreement {r['agreement']:.4f} (target >= 0.99)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="mlp,encoder")
    ap.add_argument("--requests", type=int, default=400, help="requests per served load (the encoder's: a quarter)")
    ap.add_argument(
        "--only",
        default="inprocess,serve",
        help="comma list of inprocess, serve, variants (onnxruntime per channel or tensor, int8 or uint8 weights), dtypes (torch)",
    )
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out")
    args = ap.parse_args()
    only = set(args.only.split(","))
    results: dict = {"machine": {"cpus": os.cpu_count(), "onednn_max_cpu_isa": os.environ.get("ONEDNN_MAX_CPU_ISA")}, "models": {}}
    results["candidates"] = candidates()
    for name in args.models.split(","):
        folder = args.out / f"precision_{name}"
        folder.mkdir(parents=True, exist_ok=True)
        fp32 = prepare(folder, name)
        model: dict = {}
        if only & {"inprocess", "serve", "variants"}:
            archives = build(folder, name)
            model["build_report"] = json.loads((folder / "report.json").read_text())["builds"]
        if "inprocess" in only:
            model["in_process"] = in_process(name, archives, folder)
        if "serve" in only:
            model["served"] = served(name, archives, folder, args.requests)
        if "variants" in only:
            model["onnx_int8_variants"] = variants(name, archives, folder)
        if "dtypes" in only:
            model["torch_dtypes"] = dtypes(name, fp32)
        results["models"][name] = model
    suffix = "" if only == {"inprocess", "serve"} else "_" + "_".join(sorted(only))
    (args.out / f"precision{suffix}.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    report(results)
    print(f"\nfigures written to {args.out / f'precision{suffix}.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
