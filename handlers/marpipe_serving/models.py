"""Loading the archive's artifact as the handler serves it (also used by marpipe's parity stage), and running it.

Everything it needs to know comes from ``marpipe.json`` inside the archive.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from . import aoti, precision
from .architectures import builder, has_non_persistent_buffers, load_weights, params_on_meta
from .npz import read_npz
from .requirements import check as check_requirements

METADATA = "marpipe.json"


def torch_dtype(name: str) -> Any:
    import torch

    return getattr(torch, name)


def np_dtype(name: str) -> Any:
    # numpy has no bfloat16: such inputs travel as float32 and are cast by torch.
    return np.float32 if name == "bfloat16" else np.dtype(name)


def thread_count(max_workers: int) -> int:
    """Threads per worker so that all workers together do not oversubscribe the CPU."""
    env = os.environ.get("MARPIPE_THREADS")
    if env and env.isdigit() and int(env) > 0:
        return int(env)
    return max(1, (os.cpu_count() or 1) // max(1, max_workers))


# A model whose whole batch runs faster than this gains little from intra-op threads, and the threads' spinning
# between batches takes CPU from TorchServe's frontend and Python worker on the same cores. Measured on 2 cores:
# the example CNN (0.9 ms a batch) served 60% more requests with 1 thread than with 2, while a 224x224 CNN
# (about 110 ms a batch) served 10% fewer.
SMALL_BATCH_MS = 5.0
TIMED_BYTES = 256 << 20  # an artifact this large does at least 64M multiply-adds per row: never a small batch


def timing_batch(model_dir: str, meta: dict, batch_size: int, arrays: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray] | None:
    """The archive's parity inputs (or `arrays`) repeated to the serving batch size; None for large artifacts
    (never a small batch) or without the inputs."""
    try:
        if os.path.getsize(os.path.join(model_dir, meta["artifact"])) > TIMED_BYTES:
            return None
        if arrays is None:
            with open(os.path.join(model_dir, "parity_inputs.npz"), "rb") as f:
                arrays = read_npz(f.read())
        return repeat_rows(arrays, batch_size)
    except Exception:  # timing is advice; the first request will say what is wrong
        return None


def repeat_rows(arrays: dict[str, np.ndarray], rows: int) -> dict[str, np.ndarray]:
    """`rows` rows made of the given ones, repeated."""
    have = len(next(iter(arrays.values())))
    return {k: np.concatenate([v] * -(-rows // have))[:rows] for k, v in arrays.items()}


def serving_runner(model_dir: str, meta: dict, device: str, gpu_id: int | None, inputs: dict | None = None) -> tuple[Any, int, str]:
    """(runner, threads, why) as the handler serves the archive: threads per worker from MARPIPE_THREADS or the
    cores shared by `serve.max_workers`, and on the CPU one thread where a serving batch is small (`fit_threads`).
    `inputs`: the parity inputs, when the archive's own file is not written yet (format auto times candidates)."""
    import torch

    serve = meta.get("serve", {})
    threads = thread_count(int(serve.get("max_workers", 1)))
    torch.set_num_threads(threads)
    runner = load_runner(model_dir, meta, device, gpu_id, threads)
    why = ""
    if device == "cpu" and threads > 1 and not os.environ.get("MARPIPE_THREADS"):
        batch = timing_batch(model_dir, meta, int(serve.get("batch_size") or 1), inputs)
        onnx = meta["format"] == "onnx"
        reload = (lambda n: load_runner(model_dir, meta, device, gpu_id, n)) if onnx else (lambda n: runner)
        threads, runner, why = fit_threads(runner, threads, batch, reload)
    return runner, threads, why


def batch_ms(runner: Any, batch: dict[str, np.ndarray]) -> float | None:
    """Milliseconds of one forward pass on `batch`: the median of three after two warm-ups (which the first
    requests would pay otherwise; TorchScript optimises on its first runs). None if the model fails on it."""
    import time

    times = []
    try:
        for i in range(5):
            start = time.perf_counter()
            runner(batch)
            times.append((time.perf_counter() - start) * 1000)
            if i >= 1 and times[-1] > 10 * SMALL_BATCH_MS:
                return times[-1]  # clearly not small: no need to look again
    except Exception:  # timing is advice; the first request will say what is wrong
        return None
    return sorted(times[2:])[1]


def fit_threads(runner: Any, threads: int, batch: dict[str, np.ndarray] | None, reload: Any) -> tuple[int, Any, str]:
    """(threads, runner, why): one thread when a batch runs under SMALL_BATCH_MS both with `threads` and with
    one (on many cores one thread may be far slower); otherwise what was given. `reload(n)` makes a runner
    for n threads where the runner fixes its own (onnxruntime)."""
    import torch

    ms = batch_ms(runner, batch) if batch is not None else None
    if ms is None or ms >= SMALL_BATCH_MS:
        return threads, runner, ""
    torch.set_num_threads(1)
    single = reload(1)
    one = batch_ms(single, batch)
    if one is not None and one < SMALL_BATCH_MS:
        return 1, single, f" (a batch takes {one:.2f} ms: more threads would take CPU from TorchServe itself)"
    torch.set_num_threads(threads)
    return threads, runner, ""


SAFETENSORS_DTYPES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "BOOL": "bool",
}


def read_safetensors(path: str) -> dict[str, Any]:
    """A safetensors file as mmap-backed tensors (no copy; the safetensors package is not on the server)."""
    import mmap

    import torch

    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
        # a private (copy-on-write) mapping: writable for torch.frombuffer, never written back
        data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) if os.fstat(f.fileno()).st_size > 8 + size else b""
    state = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = torch_dtype(SAFETENSORS_DTYPES[info["dtype"]])
        start, end = info["data_offsets"]
        count = (end - start) // torch.empty((), dtype=dtype).element_size()
        flat = torch.frombuffer(data, dtype=dtype, count=count, offset=8 + size + start) if count else torch.empty(0, dtype=dtype)
        state[name] = flat.reshape(info["shape"])
    return state


def load_eager(model_dir: str, meta: dict, device: str) -> Any:
    """Construct the architecture without allocating its weights and assign the mmap'd ones: one copy in memory.

    The archive's third-party requirements are checked first, so a missing one is named, not an ImportError."""
    import torch

    check_requirements(meta)
    make = builder(model_dir, meta["architecture"])
    path = os.path.join(model_dir, meta["artifact"])
    if path.endswith(".safetensors"):
        state = read_safetensors(path)
    else:
        with precision.quiet():
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    if precision.of(meta) == "int8":  # its quantized layers are made by quantizing the float model first
        with params_on_meta():
            model = make()
        return precision.load_int8(model.eval(), state, load_weights).requires_grad_(False)
    with torch.device("meta"):
        model = make()
    if has_non_persistent_buffers(model, model.state_dict()):
        with params_on_meta():  # their values come from the constructor; the weights still cost nothing
            model = make()
    load_weights(model, state, strict=True, assign=True)
    return model.eval().requires_grad_(False).to(device, precision.compute_dtype(meta))  # fp16/bf16: buffers too


def call(module: Any, tensors: dict[str, Any], by_name: bool) -> Any:
    """The model called on named inputs: by keyword when marpipe.json says so (`call: keyword`), else by position
    in the declared order."""
    return module(**tensors) if by_name else module(*tensors.values())


class TorchRunner:
    """Runs an eager or TorchScript module on named numpy inputs, returns named numpy outputs."""

    def __init__(self, module: Any, meta: dict, device: str) -> None:
        self.module = module
        self.device = device
        self.inputs = meta["inputs"]
        self.output_names = [o["name"] for o in meta["outputs"]]
        self.by_name = meta.get("call") == "keyword"
        self.dtypes = {t["name"]: torch_dtype(precision.input_dtype(meta, t["dtype"])) for t in self.inputs}  # fp16/bf16: cast

    def __call__(self, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        tensors = {t["name"]: torch.from_numpy(np.ascontiguousarray(arrays[t["name"]])) for t in self.inputs}
        tensors = {t["name"]: tensors[t["name"]].to(self.device, self.dtypes[t["name"]]) for t in self.inputs}
        with torch.inference_mode():
            out = call(self.module, tensors, self.by_name)
        return name_outputs(out, self.output_names)


def name_outputs(out: Any, names: list[str]) -> dict[str, np.ndarray]:
    """A tensor, tuple/list (by position) or dict (by key) of tensors as {name: float/int numpy array}."""
    import torch

    if isinstance(out, torch.Tensor):
        values = [out]
    elif isinstance(out, (tuple, list)):
        values = list(out)
    elif isinstance(out, dict):
        missing = [n for n in names if n not in out]
        if missing:
            raise ValueError(f"model output dict lacks {missing}; it has {sorted(out)}")
        values = [out[n] for n in names]
    else:
        raise ValueError(f"model returned {type(out).__name__}; expected a tensor, tuple or dict of tensors")
    if len(values) != len(names):
        raise ValueError(f"model returned {len(values)} outputs, the archive names {len(names)}")
    result = {}
    for name, value in zip(names, values):
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"output {name} is a {type(value).__name__}, not a tensor")
        value = value.detach()
        if value.dtype in (torch.float16, torch.bfloat16):
            value = value.float()
        result[name] = value.cpu().numpy()
    return result


class OnnxRunner:
    """Runs an ONNX model with onnxruntime: CUDA on TorchServe's gpu_id when there is one, else CPU."""

    def __init__(self, path: str, meta: dict, gpu_id: int | None, threads: int) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        # Idle pool threads sleep instead of spinning: between batches the cores belong to TorchServe's frontend,
        # which reads the next requests. Spinning cost the 224x224 CNN a seventh of its served throughput on 2
        # cores (worker CPU 8.2 s against 7.1 s for 200 requests; 40.6 against 47.2 req/s), and nothing in process.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        providers: list[Any] = ["CPUExecutionProvider"]
        if gpu_id is not None and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, ("CUDAExecutionProvider", {"device_id": int(gpu_id)}))
        self.session = ort.InferenceSession(path, options, providers=providers)
        self.inputs = meta["inputs"]
        self.output_names = [o["name"] for o in meta["outputs"]]

    def __call__(self, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        feed = {t["name"]: np.ascontiguousarray(arrays[t["name"]], dtype=np_dtype(t["dtype"])) for t in self.inputs}
        values = self.session.run(self.output_names, feed)
        return dict(zip(self.output_names, values))


def exact_float32() -> None:
    """float32 matmuls and convolutions in float32 on CUDA: TF32 off (cuDNN's default for convolutions). Parity, the
    handler and the TorchScript tracer (which records the flag into every convolution) all run so."""
    import torch

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


def load_runner(model_dir: str, meta: dict, device: str, gpu_id: int | None = None, threads: int = 1) -> Any:
    """The callable that serves this archive's format."""
    import torch

    fmt = meta["format"]
    path = os.path.join(model_dir, meta["artifact"])
    if device.startswith("cuda"):
        exact_float32()  # as parity checked it: TF32 would serve answers other than the ones the gate passed
    if fmt == "eager":
        return TorchRunner(load_eager(model_dir, meta, device), meta, device)
    if fmt == "torchscript":
        with precision.quiet():  # an int8 module's quantized weights
            module = torch.jit.load(path, map_location=device)
        return TorchRunner(module.eval(), meta, device)
    if fmt == "onnx":
        return OnnxRunner(path, meta, gpu_id if device.startswith("cuda") else None, threads)
    if fmt == "aoti":  # refused here, in one line, on a server other than the one it was compiled for
        package = aoti.load(path, meta, device, gpu_id)
        return TorchRunner(package, meta, package.device)
    raise ValueError(f"unknown format {fmt!r} in {METADATA}")
