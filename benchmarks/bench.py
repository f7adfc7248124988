"""`make bench`: packaging, cold start and served throughput, each against a baseline measured in the same run.

Prints tables and writes benchmarks/out/bench.json. Not a test: these machines are shared and noisy, so every
figure is a median of several runs and every target is a ratio to a baseline timed minutes apart.

  python benchmarks/bench.py [--size-gb 1] [--runs 3] [--cold-runs 5] [--requests 400] [--concurrency 8] [--only pack,cold,serve]
                             [--vmargs OPTS]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
BIN = Path(sys.executable).parent
STACK = """import torch
from torch import nn


class Stack(nn.Module):
    def __init__(self, layers: int = 16, width: int = 4096) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return x
"""
WIDTH = 4096


# Children inherit the parent's peak-RSS mark across fork, so each command is started by a small helper
# process (no torch imported) that reports the command's own wall time and peak RSS from wait4.
_MEASURE = """
import json, os, subprocess, sys, time
start = time.perf_counter()
proc = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
_, status, usage = os.wait4(proc.pid, 0)
wall = time.perf_counter() - start
err = proc.stderr.read().decode(errors="replace")[-2000:]
print(json.dumps({"wall": wall, "rss": usage.ru_maxrss * 1024, "code": os.waitstatus_to_exitcode(status), "err": err}))
"""


def run(cmd: list[str], **kwargs) -> tuple[float, int]:
    """Wall seconds and peak RSS (bytes) of one command, from the kernel's own accounting (wait4)."""
    out = subprocess.run([sys.executable, "-c", _MEASURE, *map(str, cmd)], capture_output=True, text=True, check=True, **kwargs)
    result = json.loads(out.stdout)
    if result["code"] != 0:
        raise SystemExit(f"{' '.join(map(str, cmd))} failed: {result['err']}")
    return result["wall"], result["rss"]


def median_of(runs: int, fn) -> dict:
    samples = [fn() for _ in range(runs)]
    walls = [s[0] for s in samples]
    return {"wall_s": statistics.median(walls), "runs": walls, "peak_rss": max(s[1] for s in samples)}


def make_checkpoint(folder: Path, size_gb: float) -> Path:
    import torch

    layers = max(1, round(size_gb * 2**30 / (WIDTH * WIDTH * 4)))
    (folder / "stack.py").write_text(STACK)
    (folder / "stack.yaml").write_text(
        f"name: stack\narchitecture: {{file: stack.py, class: Stack, kwargs: {{layers: {layers}, width: {WIDTH}}}}}\n"
        "checkpoint: {path: stack.pth}\ninputs: [{name: x, shape: [batch, %d]}]\n"
        "parity: {batch_sizes: [1, 2], samples: 1, atol: 1.0e-4, rtol: 1.0e-3}\n" % WIDTH
    )
    ckpt = folder / "stack.pth"
    if not ckpt.exists() or abs(ckpt.stat().st_size - layers * WIDTH * (WIDTH + 1) * 4) > 2**20:
        gen = torch.Generator().manual_seed(0)
        state = {}
        for i in range(layers):
            state[f"layers.{i}.weight"] = torch.randn(WIDTH, WIDTH, generator=gen) * 0.01
            state[f"layers.{i}.bias"] = torch.zeros(WIDTH)
        torch.save(state, ckpt)
    return ckpt


def bench_packaging(out: Path, size_gb: float, runs: int) -> dict:
    folder = out / "pack"
    folder.mkdir(parents=True, exist_ok=True)
    ckpt = make_checkpoint(folder, size_gb)
    size = ckpt.stat().st_size
    subprocess.run(["cat", str(ckpt)], stdout=subprocess.DEVNULL, check=True)  # every figure below reads from page cache
    store, copy, tma_out = folder / "store", folder / "copy.pth", folder / "tma"
    results = {"checkpoint_bytes": size}
    results["import_torch"] = median_of(runs, lambda: run([sys.executable, "-c", "import torch"]))
    results["sha256sum"] = median_of(runs, lambda: run(["sha256sum", str(ckpt)]))
    results["cp"] = median_of(runs, lambda: (run(["cp", str(ckpt), str(copy)]), copy.unlink())[0])

    def build():
        shutil.rmtree(store, ignore_errors=True)
        return run([str(BIN / "marpipe"), "build", "--store", str(store), str(folder / "stack.yaml")], cwd=folder)

    results["marpipe_build"] = median_of(runs, build)
    # torch-model-archiver on the same files: our archive's entries, its weights as the serialized file
    files = folder / "files"
    shutil.rmtree(files, ignore_errors=True)
    with zipfile.ZipFile(store / "stack.mar") as z:
        for name in z.namelist():
            if name != "weights.pt" and not name.startswith("MAR-INF"):
                z.extract(name, files)
    # torch-model-archiver copies a folder's contents to the archive root: the handler's package goes in a wrapper
    (files / "pkg").mkdir()
    (files / "marpipe_serving").rename(files / "pkg" / "marpipe_serving")
    extra = ",".join(str(files / n) for n in ("marpipe.json", "parity_inputs.npz", "parity_outputs.npz", "stack.py", "pkg"))
    weights = files / "weights.pt"  # the same entry name as in our archive (a link: no copy)
    os.link(ckpt, weights)

    def tma(fmt: str):
        shutil.rmtree(tma_out, ignore_errors=True)
        tma_out.mkdir()
        cmd = [
            str(BIN / "torch-model-archiver"),
            "--model-name",
            "stack",
            "--version",
            "1.0",
            "--serialized-file",
            str(weights),
            "--handler",
            str(files / "marpipe_handler.py"),
            "--extra-files",
            extra,
            "--config-file",
            str(files / "model-config.yaml"),
            "--export-path",
            str(tma_out),
            "-f",
        ]
        return run(cmd + (["--archive-format", fmt] if fmt != "default" else []))

    results["tma_zip_store"] = median_of(runs, lambda: tma("zip-store"))
    results["tma_default"] = median_of(runs, lambda: tma("default"))
    shutil.copy(tma_out / "stack.mar", folder / "stack_tma_default.mar")
    build_s = results["marpipe_build"]["wall_s"]
    results["ratios"] = {
        "tma_default_over_build": results["tma_default"]["wall_s"] / build_s,
        "tma_zip_store_over_build": results["tma_zip_store"]["wall_s"] / build_s,
        "build_over_sha256sum": build_s / results["sha256sum"]["wall_s"],
        "build_over_cp": build_s / results["cp"]["wall_s"],
        "peak_rss_over_checkpoint_plus_torch": results["marpipe_build"]["peak_rss"] / (size + results["import_torch"]["peak_rss"]),
    }
    return results


def bench_cold_start(out: Path, runs: int) -> dict:
    """torchserve --start to the worker's READY: our .mar, our directory archive (`--layout dir`, which
    TorchServe links instead of extracting), torch-model-archiver's default archive of the same files, and a
    20 KB archive (the floor: JVM, worker start, import torch). They are timed in turns, each after a `sync`
    and a read of its files, so that drift on this shared machine, earlier writes and the page cache (this
    VM reclaims idle cache) touch each alike."""
    from pipeline.torchserve import server as ts

    folder = out / "pack"
    ours, theirs = folder / "store" / "stack.mar", folder / "stack_tma_default.mar"
    if not ours.exists() or not theirs.exists():
        raise SystemExit("cold start needs the packaging archives: run without --only, or with --only pack,cold")
    subprocess.run([sys.executable, str(ROOT / "examples" / "make_checkpoints.py")], check=True, stdout=subprocess.DEVNULL)
    stores = {}
    for label, archive in (("marpipe", ours), ("tma_default", theirs)):
        stores[label] = out / f"cold_{label}"
        shutil.rmtree(stores[label], ignore_errors=True)
        stores[label].mkdir()
        os.link(archive, stores[label] / "stack.mar")
    stores["marpipe_dir"] = out / "cold_marpipe_dir"
    shutil.rmtree(stores["marpipe_dir"], ignore_errors=True)
    run([str(BIN / "marpipe"), "build", "--layout", "dir", "--store", str(stores["marpipe_dir"]), str(folder / "stack.yaml")], cwd=folder)
    stores["floor_small_archive"] = out / "cold_floor"
    shutil.rmtree(stores["floor_small_archive"], ignore_errors=True)
    run([str(BIN / "marpipe"), "build", "--store", str(stores["floor_small_archive"]), str(ROOT / "examples" / "simplenet.yaml")])
    walls: dict[str, list[float]] = {label: [] for label in stores}
    for _ in range(runs):
        for label, store in stores.items():
            for cache in store.rglob("__pycache__"):  # a served folder keeps the worker's bytecode: start each run without
                shutil.rmtree(cache)
            subprocess.run(["sync"], check=True)
            for file in (p for p in store.rglob("*") if p.is_file()):
                subprocess.run(["cat", str(file)], stdout=subprocess.DEVNULL, check=True)
            start = time.perf_counter()
            with ts.running(store, auth=False) as srv:
                status = ts.wait_ready(srv, 600, poll=0.05)
                walls[label].append(time.perf_counter() - start)
                if any(s != "READY" for s in status.values()):
                    raise SystemExit(f"{label}: not READY: {status}\n{srv.log_tail()}")
    results: dict = {label: {"wall_s": statistics.median(w), "runs": w} for label, w in walls.items()}
    results["ratio_tma_over_marpipe"] = results["tma_default"]["wall_s"] / results["marpipe"]["wall_s"]
    results["ratio_tma_over_marpipe_dir"] = results["tma_default"]["wall_s"] / results["marpipe_dir"]["wall_s"]
    results["ratio_marpipe_dir_over_floor"] = results["marpipe_dir"]["wall_s"] / results["floor_small_archive"]["wall_s"]
    return results


def _load(host: str, port: int, path: str, body: bytes, headers: dict, total: int, concurrency: int) -> dict:
    """A bounded closed-loop load: `concurrency` kept-alive connections, `total` requests in all.

    One asyncio thread sending prepared bytes and reading just the status and the body's length: it shares
    the two cores with the server, and threads running http.client cost TorchServe a quarter to a third of its
    throughput.
    """
    import asyncio

    head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    request = f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Length: {len(body)}\r\n{head}\r\n".encode() + body
    latencies: list[float] = []
    errors: list[int] = []
    left = [total]

    async def client() -> None:
        reader, writer = await asyncio.open_connection(host, port)
        try:
            while left[0] > 0:
                left[0] -= 1
                start = time.perf_counter()
                writer.write(request)
                answer = (await reader.readuntil(b"\r\n\r\n")).lower()
                at = answer.find(b"\r\ncontent-length:")  # not inference-header-content-length: (v2 binary answers)
                if at >= 0:
                    await reader.readexactly(int(answer[at + 17 : answer.index(b"\r\n", at + 2)]))
                else:  # chunked
                    while size := int((await reader.readuntil(b"\r\n")).strip(), 16):
                        await reader.readexactly(size + 2)
                    await reader.readexactly(2)
                latencies.append(time.perf_counter() - start)
                if answer[9:12] != b"200":
                    errors.append(int(answer[9:12]))
        finally:
            writer.close()

    async def main() -> None:
        await asyncio.gather(*(client() for _ in range(concurrency)))

    start = time.perf_counter()
    asyncio.run(main())
    wall = time.perf_counter() - start
    lat = np.array(latencies) * 1000
    return {
        "requests": total,
        "errors": len(errors),
        "rps": total / wall,
        "p50_ms": float(np.percentile(lat, 50)),
        "p99_ms": float(np.percentile(lat, 99)),
    }


def _bench_specs(out: Path) -> list[tuple[str, Path, tuple[int, ...], tuple[str, ...], float, Path]]:
    """(label, spec, one request's input shape, formats, request count scale, the spec of an identity model with
    the same input: the cheap model that warms TorchServe's JIT) for the serving benchmark."""
    import torch

    sys.path.insert(0, str(ROOT / "benchmarks" / "models"))
    from bench_models import Identity, ImageCNN

    folder = out / "serve_models"
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(ROOT / "benchmarks" / "models" / "bench_models.py", folder / "bench_models.py")
    torch.manual_seed(0)
    imagenet = ", image: {resize: 256, crop: 224, mean: [0.485, 0.456, 0.406], std: [0.229, 0.224, 0.225]}"
    models = (
        (ImageCNN, "imagecnn", (3, 224, 224), imagenet),
        (Identity, "identity", (3, 32, 32), ""),
        (Identity, "identity224", (3, 224, 224), ""),
    )
    for cls, name, shape, image in models:
        torch.save(cls().state_dict(), folder / f"{name}.pth")
        (folder / f"{name}.yaml").write_text(
            f"name: {name}\narchitecture: {{file: bench_models.py, class: {cls.__name__}}}\ncheckpoint: {{path: {name}.pth}}\n"
            f"inputs: [{{name: image, shape: [batch, {', '.join(map(str, shape))}]{image}}}]\n"
            "parity: {batch_sizes: [1, 8], samples: 1, atol: 1.0e-4, rtol: 1.0e-3}\n"
            "serve: {batch_size: 8, max_batch_delay_ms: 10}\n"
        )
    subprocess.run([sys.executable, str(ROOT / "examples" / "make_checkpoints.py")], check=True, stdout=subprocess.DEVNULL)
    return [
        ("cnn", ROOT / "examples" / "cnn.yaml", (3, 32, 32), ("eager", "torchscript", "onnx", "aoti"), 1, folder / "identity.yaml"),
        ("imagecnn", folder / "imagecnn.yaml", (3, 224, 224), ("eager", "torchscript", "onnx", "aoti"), 0.4, folder / "identity224.yaml"),
        ("identity", folder / "identity.yaml", (3, 32, 32), ("eager",), 1, folder / "identity.yaml"),
    ]


class _Ceiling:
    """Rows per second of the in-process batched forward at batch 8, run as the handler runs it (all cores)."""

    def __init__(self, archive: Path, folder: Path, image: np.ndarray) -> None:
        import torch

        from handlers.marpipe_serving.models import load_runner

        shutil.rmtree(folder, ignore_errors=True)
        with zipfile.ZipFile(archive) as z:
            z.extractall(folder)
        meta = json.loads((folder / "marpipe.json").read_text())
        torch.set_num_threads(os.cpu_count() or 1)
        self.runner = load_runner(str(folder), meta, "cpu", None, os.cpu_count() or 1)
        self.batch = {"image": np.repeat(image, 8, axis=0)}
        self.one = {"image": image}

    def measure(self) -> float:
        """About a second of forward passes (at least 5): the median's rate."""
        return 8 * 1000 / self.latency_ms(self.batch)

    def latency_ms(self, batch: dict[str, np.ndarray]) -> float:
        """The median ms of about a second of forward passes of `batch` (at least 5)."""
        from pipeline.build.bench import measure

        first = measure(self.runner, batch, 3, warmup=1)["median_ms"]
        return measure(self.runner, batch, max(5, min(1000, int(1000 / max(first, 1e-3)))), warmup=3)["median_ms"]


def _warm_up(srv: Any, path: str, body: bytes, headers: dict, concurrency: int, seconds: float = 8.0, most: int = 400) -> None:
    """Up to 400 requests (8 s at most) of the measured model and body: its worker, its runner and the batching
    settled. TorchServe's JIT needs far more: see _warm_jit."""
    deadline, sent = time.perf_counter() + seconds, 0
    while sent < most and time.perf_counter() < deadline:
        _load(srv.host, srv.ports["inference"], path, body, headers, 40, concurrency)
        sent += 40


def _measured(srv: Any, path: str, body: bytes, headers: dict, count: int, concurrency: int, runs: int) -> dict:
    """The median of `runs` loads of `count` requests, after _warm_up."""
    _warm_up(srv, path, body, headers, concurrency)
    loads = [_load(srv.host, srv.ports["inference"], path, body, headers, count, concurrency) for _ in range(runs)]
    return dict(sorted(loads, key=lambda r: r["rps"])[len(loads) // 2], rps_runs=[r["rps"] for r in loads])


def _java_tasks(srv: Any) -> Path | None:
    """/proc/<pid>/task of TorchServe's JVM (the java process of the server's own process group); None where /proc
    cannot tell."""
    from pipeline.torchserve import server as ts

    for pid in ts._group(srv.proc.pid) or ():
        try:
            if (Path("/proc") / str(pid) / "comm").read_text().strip() == "java":
                return Path("/proc") / str(pid) / "task"
        except OSError:
            continue
    return None


def _jit_cpu_s(tasks: Path) -> float:
    """CPU seconds (user and system) the JVM's JIT compiler threads have used so far; listed at each call, since the
    JVM adds and retires compiler threads as it goes."""
    ticks = 0
    for task in tasks.iterdir():
        try:
            if (task / "comm").read_text().startswith(("C1 Compiler", "C2 Compiler")):
                fields = (task / "stat").read_text().rpartition(")")[2].split()
                ticks += int(fields[11]) + int(fields[12])
        except OSError:  # a thread that ended meanwhile
            continue
    return ticks / os.sysconf("SC_CLK_TCK")


def _warm_jit(
    srv: Any, path: str, body: bytes, headers: dict, concurrency: int, quiet_ms: float = 0.1, most: int = 40_000, seconds: float = 120.0
) -> dict:
    """Load a model that computes nothing, with the measured body, until TorchServe's JIT compilers go quiet:
    under `quiet_ms` of CPU a request over 400 requests (or `most` requests, `seconds` at most; 4,000 requests
    where /proc cannot tell). A fresh JVM's C2 compiler took 3-4 ms of CPU per 600 KB request for some 9,000
    requests of the 224x224 CNN at 50 req/s: on 2 cores, taken from the worker. The frontend runs the same code
    whichever model a request names, so a cheap model gets the JVM to its steady state in seconds."""
    tasks = _java_tasks(srv)
    start, sent, per_request = time.perf_counter(), 0, None
    used = _jit_cpu_s(tasks) if tasks is not None else 0.0
    while sent < most and time.perf_counter() - start < seconds:
        _load(srv.host, srv.ports["inference"], path, body, headers, 400, concurrency)
        sent += 400
        if tasks is None:
            if sent >= 4000:
                break
            continue
        now = _jit_cpu_s(tasks)
        per_request, used = (now - used) * 1000 / 400, now
        if per_request < quiet_ms:
            break
    return {"requests": sent, "seconds": time.perf_counter() - start, "jit_ms_per_request": per_request}


def _photo_jpeg() -> bytes:
    """A 320x240 JPEG with photo-like detail (smooth gradients plus noise), as a camera client would send."""
    from PIL import Image

    y, x = np.mgrid[0:240, 0:320]
    noise = np.random.default_rng(1).integers(-25, 26, (240, 320, 3))
    pixels = np.stack([x * 255 // 319, y * 255 // 239, (x + y) * 255 // 558], axis=-1) + noise
    buf = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def bench_serving(out: Path, total: int, concurrency: int, models: set[str], runs: int, vmargs: str | None = None) -> dict:
    """For each model: every format's in-process latency at batch 8 (its ceiling: the batched forward as the
    handler runs it, all cores, measured before and after serving; the higher counts, so that on a noisy
    machine the ratio never flatters the server), the format `--format auto` chooses, and each format served by
    a real TorchServe with npz and JSON bodies (JPEG and v2 binary too for the 224x224 CNN): req/s (median of `runs` loads),
    p50, p99, and the share of its own ceiling. Each server is measured twice with npz: fresh (`fresh`: 400
    requests after the model is READY, the JIT still compiling), then at its steady state, after _warm_jit on
    an identity model served beside it; the other bodies at the steady state."""
    from pipeline.torchserve import server as ts

    results: dict = {"concurrency": concurrency, "runs": runs, "vmargs": ts.jvm_args(vmargs), "models": {}}
    for label, spec, shape, formats, scale, warm_spec in _bench_specs(out):
        if label not in models:
            continue
        store = out / f"serve_{label}"
        shutil.rmtree(store, ignore_errors=True)
        built = out / f"build_{label}.json"
        run([str(BIN / "marpipe"), "build", "--store", str(store), "--format", ",".join(formats), "--report", str(built), str(spec)])
        compiled = {b["format"]: b.get("compile_s") for b in json.loads(built.read_text())["builds"]}
        if warm_spec != spec:
            run([str(BIN / "marpipe"), "build", "--store", str(store), "--format", "eager", str(warm_spec)])
        warm_name = warm_spec.stem
        image = np.random.default_rng(0).standard_normal((1, *shape)).astype(np.float32)
        buf = io.BytesIO()
        np.savez(buf, image=image)
        bodies = {
            "npz": (buf.getvalue(), {"Content-Type": "application/x-npz", "Accept": "application/x-npz"}),
            "json": (json.dumps({"inputs": {"image": image.tolist()}}).encode(), {"Content-Type": "application/json"}),
        }
        if label == "imagecnn":  # the same model fed JPEG files: a 20x smaller body, decoded by the worker
            bodies["jpeg"] = (_photo_jpeg(), {"Content-Type": "image/jpeg", "Accept": "application/x-npz"})
            bodies["v2bin"] = _v2_binary(image)
        count = max(40, int(total * scale))
        model: dict = {"requests": count, "auto": _auto_choice(out, label, spec) if len(formats) > 1 else None, "formats": {}}
        for fmt in formats:
            name = f"{label}_{fmt}" if len(formats) > 1 else label
            archive = store / f"{name}.mar"
            ceiling = _Ceiling(archive, out / f"ceiling_{name}", image)
            before = ceiling.measure()
            row: dict = {"latency_b1_ms": ceiling.latency_ms(ceiling.one), "compile_s": compiled.get(fmt)}
            path, load = f"/predictions/{name}", (count, concurrency, runs)
            with ts.running(store, sorted({archive, store / f"{warm_name}.mar"}), auth=False, vmargs=vmargs) as srv:
                if set(ts.wait_ready(srv, 300).values()) != {"READY"}:
                    raise SystemExit(f"{name} not READY\n{srv.log_tail()}")
                row["fresh"] = _measured(srv, path, *bodies["npz"], *load)
                row["jit_warm_up"] = _warm_jit(srv, f"/predictions/{warm_name}", *bodies["npz"], concurrency)
                for kind, (body, headers) in bodies.items():
                    row[kind] = _measured(srv, path, body, headers, *load)
            after = ceiling.measure()
            row["ceiling_rows_per_s"], row["ceiling_runs"] = max(before, after), [before, after]
            row["latency_ms"] = 8 * 1000 / row["ceiling_rows_per_s"]  # one in-process batch of 8
            for kind in ("fresh", *bodies):
                row[kind]["of_ceiling"] = row[kind]["rps"] / row["ceiling_rows_per_s"]
                row[kind]["of_npz"] = row[kind]["rps"] / row["npz"]["rps"]
            model["formats"][fmt] = row
        rows = model["formats"]
        fastest = max(rows, key=lambda f: rows[f]["ceiling_rows_per_s"])
        model["fastest"] = {
            "format": fastest,
            "npz_of_ceiling": rows[fastest]["npz"]["of_ceiling"],
            "fresh_of_ceiling": rows[fastest]["fresh"]["of_ceiling"],
        }
        results["models"][label] = model
    return results


def _v2_binary(image: np.ndarray) -> tuple[bytes, dict]:
    """The v2 binary data extension as tritonclient.http sends it by default: a JSON header, then the FP32 values;
    every output asked back as binary data."""
    raw = image.astype("<f4").tobytes()
    tensor = {"name": "image", "shape": list(image.shape), "datatype": "FP32", "parameters": {"binary_data_size": len(raw)}}
    head = json.dumps({"inputs": [tensor], "parameters": {"binary_data_output": True}}).encode()
    return head + raw, {"Inference-Header-Content-Length": str(len(head))}


def _auto_choice(out: Path, label: str, spec: Path) -> str:
    """What `marpipe build --format auto` picks for this spec, timed as the handler serves each format."""
    store = out / f"auto_{label}"
    shutil.rmtree(store, ignore_errors=True)
    run([str(BIN / "marpipe"), "build", "--store", str(store), "--format", "auto", str(spec)])
    with zipfile.ZipFile(next(store.glob("*.mar"))) as z:
        return json.loads(z.read("marpipe.json"))["auto"]["choice"]


def report(results: dict) -> None:
    gib = 2**30
    if "pack" in results:
        p = results["pack"]
        runs = len(p["sha256sum"]["runs"])
        print(f"\nPackaging a {p['checkpoint_bytes'] / gib:.2f} GiB float32 checkpoint (median of {runs} runs, page cache warm)")
        for key in ("marpipe_build", "tma_default", "tma_zip_store", "sha256sum", "cp", "import_torch"):
            r = p[key]
            print(f"  {key:<16} {r['wall_s']:8.2f} s   peak RSS {r['peak_rss'] / 2**20:8.0f} MiB")
        r = p["ratios"]
        print(f"  tma default / marpipe build   {r['tma_default_over_build']:6.1f}x   (target >= 10x)")
        print(f"  marpipe build / sha256sum     {r['build_over_sha256sum']:6.2f}x   (target <= 1.0x)")
        print(f"  peak RSS / (ckpt + torch)     {r['peak_rss_over_checkpoint_plus_torch']:6.2f}x   (target <= 1.3x)")
    if "cold" in results:
        c = results["cold"]
        print(f"\nCold start: torchserve start to worker READY (median of {len(c['marpipe']['runs'])}, taken in turns)")
        print(f"  marpipe archive      {c['marpipe']['wall_s']:6.2f} s")
        print(f"  marpipe --layout dir {c['marpipe_dir']['wall_s']:6.2f} s")
        print(f"  tma default archive  {c['tma_default']['wall_s']:6.2f} s")
        print(f"  tma / marpipe .mar   {c['ratio_tma_over_marpipe']:6.2f}x   (target >= 3x)")
        print(f"  tma / marpipe dir    {c['ratio_tma_over_marpipe_dir']:6.2f}x   (target >= 4x)")
        print(f"  marpipe dir / floor  {c['ratio_marpipe_dir_over_floor']:6.2f}x   (target <= 1.2x)")
        floor = c["floor_small_archive"]["wall_s"]
        print(
            f"  floor: a 20 KB archive {floor:6.2f} s (JVM and worker start, import torch): above it, "
            f"{c['marpipe']['wall_s'] - floor:.2f} s (marpipe .mar), {c['marpipe_dir']['wall_s'] - floor:.2f} s (marpipe dir) "
            f"vs {c['tma_default']['wall_s'] - floor:.2f} s (tma)"
        )
    if "serve" in results:
        s = results["serve"]
        print(
            f"\nServed throughput: TorchServe batch_size 8, one row per request, concurrency {s['concurrency']} "
            f"(median of {s['runs']} loads; ceiling: the in-process forward at batch 8 as the handler "
            f"runs it, all cores, the better of before and after; TorchServe's JVM options: {s.get('vmargs') or 'the JVM defaults'}). "
            "fresh: npz bodies 400 requests after the server started, its JIT still compiling; the other rows after "
            "the JIT's warm-up (an identity model served beside it, the same npz body, until the JIT compilers used "
            "< 0.1 ms of CPU a request)"
        )
        print(
            f"  {'model':<10} {'format':<12} {'batch 1 ms':>10} {'batch 8 ms':>10} {'compile s':>9} {'ceiling/s':>10} {'body':<5} "
            f"{'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'of ceiling':>10} {'of npz':>7}   JIT warm-up"
        )
        for label, model in s["models"].items():
            for fmt, row in model["formats"].items():
                for kind in ("fresh", "npz", "json", "jpeg", "v2bin"):
                    if kind in row:
                        r = row[kind]
                        took = "-" if row.get("compile_s") is None else f"{row['compile_s']:.1f}"
                        b1 = row.get("latency_b1_ms")
                        print(
                            f"  {label:<10} {fmt:<12} {'-' if b1 is None else f'{b1:.2f}':>10} {row['latency_ms']:10.2f} {took:>9} "
                            f"{row['ceiling_rows_per_s']:10.0f} {kind:<5} "
                            f"{r['rps']:8.1f} {r['p50_ms']:8.2f} {r['p99_ms']:8.2f} {100 * r['of_ceiling']:9.1f}% "
                            f"{100 * r['of_npz']:6.1f}%" + (_jit_note(row["jit_warm_up"]) if kind == "fresh" else "")
                        )
        for label, model in s["models"].items():
            f = model["fastest"]
            auto = f"; format auto chose {model['auto']}" if model["auto"] else ""
            print(
                f"  {label}: fastest in process {f['format']}, served with npz at {100 * f['npz_of_ceiling']:.1f}% of its ceiling "
                f"(target >= 85%; fresh {100 * f['fresh_of_ceiling']:.1f}%){auto}"
            )
            for fmt, row in model["formats"].items():
                targets = [("json", "JSON", 40)] + ([("jpeg", "JPEG", 80)] if "jpeg" in row else [])
                notes = ", ".join(f"{name} at {100 * row[k]['of_npz']:.1f}% of npz (target >= {t}%)" for k, name, t in targets)
                if "v2bin" in row:
                    notes += f", v2 binary at {100 * row['v2bin']['of_npz']:.1f}% of npz"
                print(f"    {fmt}: {notes}")


def _jit_note(w: dict) -> str:
    quiet = f"{w['jit_ms_per_request']:.2f} ms a request" if w["jit_ms_per_request"] is not None else "not read"
    return f"   then {w['requests']} requests in {w['seconds']:.1f} s (JIT at {quiet})"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-gb", type=float, default=1.0)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--cold-runs", type=int, default=5, help="cold starts of each archive (median)")
    ap.add_argument("--requests", type=int, default=400)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--only", default="pack,cold,serve", help="comma list of pack, cold, serve")
    ap.add_argument("--models", default="cnn,imagecnn,identity", help="models of the serving benchmark")
    ap.add_argument("--vmargs", help="TorchServe's JVM options for the serving benchmark, e.g. -XX:TieredStopAtLevel=1 (default none)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    only = set(args.only.split(","))
    results: dict = {"machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]}}
    if "pack" in only:
        results["pack"] = bench_packaging(args.out, args.size_gb, args.runs)
    if "cold" in only:
        results["cold"] = bench_cold_start(args.out, args.cold_runs)
    if "serve" in only:
        results["serve"] = bench_serving(args.out, args.requests, args.concurrency, set(args.models.split(",")), args.runs, args.vmargs)
    (args.out / "bench.json").write_text(json.dumps(results, indent=2) + "\n")
    report(results)
    print(f"\nfigures written to {args.out / 'bench.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
