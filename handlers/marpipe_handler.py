"""marpipe's TorchServe handler for eager, TorchScript and ONNX archives.

Self-contained: only the standard library, numpy, torch and (for ONNX) onnxruntime are imported, because
the inference node has none of marpipe's or the training repo's code. Everything it needs to know comes
from ``marpipe.json`` inside the archive.

Request contract (POST /predictions/<name>):
  * ``application/json``: ``{"inputs": {"<name>": nested list}}``; one-input models also take a bare list.
  * ``application/x-npz``: an .npz of the named inputs. ``Accept: application/x-npz`` answers in npz.
The leading dimension of every input is the batch dimension. A malformed request gets HTTP 400 with
``{"error": "..."}`` and does not fail the other requests batched with it.
"""

from __future__ import annotations

import importlib.util
import io
import json
import logging
import os
import re
import struct
import sys
import zlib
from typing import Any

import numpy as np

METADATA = "marpipe.json"
NPZ = "application/x-npz"
log = logging.getLogger("marpipe_handler")


class BadRequest(Exception):
    """The client's request is malformed: answered with `status` and {"error": message}."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


# ---------------------------------------------------------------- model loading (also used by marpipe's parity)


def torch_dtype(name: str) -> Any:
    import torch

    return getattr(torch, name)


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


def timing_batch(model_dir: str, meta: dict, batch_size: int) -> dict[str, np.ndarray] | None:
    """The archive's parity inputs repeated to the serving batch size; None for large artifacts (never a small
    batch) or without the inputs."""
    try:
        if os.path.getsize(os.path.join(model_dir, meta["artifact"])) > TIMED_BYTES:
            return None
        with open(os.path.join(model_dir, "parity_inputs.npz"), "rb") as f:
            arrays = read_npz(f.read())
        rows = len(next(iter(arrays.values())))
        return {k: np.concatenate([v] * -(-batch_size // rows))[:batch_size] for k, v in arrays.items()}
    except Exception:  # timing is advice; the first request will say what is wrong
        return None


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


def _import_architecture(model_dir: str, arch: dict) -> Any:
    path = os.path.join(model_dir, arch["file"])
    name = os.path.splitext(arch["file"])[0]
    if model_dir not in sys.path:
        sys.path.insert(0, model_dir)  # sibling modules shipped as extra files
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return getattr(module, arch["class"])


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
    """Construct the architecture on the meta device and assign the mmap'd weights: one copy in memory."""
    import torch

    cls = _import_architecture(model_dir, meta["architecture"])
    kwargs = meta["architecture"]["kwargs"]
    path = os.path.join(model_dir, meta["artifact"])
    if path.endswith(".safetensors"):
        state = read_safetensors(path)
    else:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    with torch.device("meta"):
        model = cls(**kwargs)
    if any(name not in state for name, _ in model.named_buffers()):
        model = cls(**kwargs)  # non-persistent buffers need the real constructor
        model.load_state_dict(state, strict=True)
    else:
        model.load_state_dict(state, strict=True, assign=True)
    return model.eval().requires_grad_(False).to(device)


class TorchRunner:
    """Runs an eager or TorchScript module on named numpy inputs, returns named numpy outputs."""

    def __init__(self, module: Any, meta: dict, device: str) -> None:
        self.module = module
        self.device = device
        self.inputs = meta["inputs"]
        self.output_names = [o["name"] for o in meta["outputs"]]

    def __call__(self, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        args = [torch.from_numpy(np.ascontiguousarray(arrays[t["name"]])).to(self.device, torch_dtype(t["dtype"])) for t in self.inputs]
        with torch.inference_mode():
            out = self.module(*args)
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
        providers: list[Any] = ["CPUExecutionProvider"]
        if gpu_id is not None and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, ("CUDAExecutionProvider", {"device_id": int(gpu_id)}))
        self.session = ort.InferenceSession(path, options, providers=providers)
        self.inputs = meta["inputs"]
        self.output_names = [o["name"] for o in meta["outputs"]]

    def __call__(self, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        feed = {t["name"]: np.ascontiguousarray(arrays[t["name"]], dtype=_np_dtype(t["dtype"])) for t in self.inputs}
        values = self.session.run(self.output_names, feed)
        return dict(zip(self.output_names, values))


def load_runner(model_dir: str, meta: dict, device: str, gpu_id: int | None = None, threads: int = 1) -> Any:
    """The callable that serves this archive's format."""
    import torch

    fmt = meta["format"]
    path = os.path.join(model_dir, meta["artifact"])
    if fmt == "eager":
        return TorchRunner(load_eager(model_dir, meta, device), meta, device)
    if fmt == "torchscript":
        return TorchRunner(torch.jit.load(path, map_location=device).eval(), meta, device)
    if fmt == "onnx":
        return OnnxRunner(path, meta, gpu_id if device.startswith("cuda") else None, threads)
    raise ValueError(f"unknown format {fmt!r} in {METADATA}")


# ---------------------------------------------------------------- requests


def _np_dtype(name: str) -> Any:
    # numpy has no bfloat16: such inputs travel as float32 and are cast by torch.
    return np.float32 if name == "bfloat16" else np.dtype(name)


def header(context: Any, idx: int, name: str) -> str:
    """A request header, case-insensitively; the body's own content type as a fallback."""
    try:
        headers = context.get_all_request_header(idx) or {}
    except Exception:
        headers = {}
    for key, value in headers.items():
        if key.lower() == name and isinstance(value, str):
            return value
    for value in headers.values():
        if isinstance(value, dict) and isinstance(value.get(name), str):
            return value[name]
    return ""


def parse_body(body: Any, content_type: str) -> Any:
    """The request body as a dict of arrays (npz) or a decoded JSON value."""
    if isinstance(body, (bytes, bytearray)):
        if NPZ in content_type or body[:4] == b"PK\x03\x04":
            try:
                return read_npz(bytes(body))
            except BadRequest:
                raise
            except Exception as exc:
                raise BadRequest(f"body is not a readable .npz ({type(exc).__name__}: {exc})") from None
        try:
            return json.loads(bytes(body).decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            raise BadRequest(f"body is not valid JSON ({exc})") from None
    if isinstance(body, str):
        try:
            return json.loads(body)
        except ValueError as exc:
            raise BadRequest(f"body is not valid JSON ({exc})") from None
    return body


def to_arrays(payload: Any, meta: dict) -> dict[str, np.ndarray]:
    """Check a decoded request against the declared inputs; cast safely. Raises BadRequest."""
    specs = meta["inputs"]
    if isinstance(payload, dict) and "inputs" in payload and not all(t["name"] == "inputs" for t in specs):
        extra = sorted(set(payload) - {"inputs"})
        if extra:
            raise BadRequest(f'unknown top-level keys {extra}; send {{"inputs": {{...}}}}')
        payload = payload["inputs"]
        if isinstance(payload, list) and len(specs) == 1:
            payload = {specs[0]["name"]: payload}
    elif isinstance(payload, list) and len(specs) == 1:
        payload = {specs[0]["name"]: payload}
    if not isinstance(payload, dict):
        names = ", ".join(t["name"] for t in specs)
        raise BadRequest(f'expected {{"inputs": {{{names}: [...]}}}}, got {type(payload).__name__}')
    unknown = sorted(set(payload) - {t["name"] for t in specs})
    if unknown:
        raise BadRequest(f"unknown inputs {unknown}; this model takes {[t['name'] for t in specs]}")
    arrays: dict[str, np.ndarray] = {}
    sizes: dict[str, int] = {}
    for t in specs:
        if t["name"] not in payload:
            raise BadRequest(f"missing input {t['name']!r}")
        arrays[t["name"]] = _array(t, payload[t["name"]], sizes)
    limit = meta.get("serve", {}).get("max_rows")
    if limit and sizes["batch"] > limit:
        raise BadRequest(f"{sizes['batch']} rows in one request; at most {limit} are allowed (serve.max_rows)", 413)
    return arrays


def _array(t: dict, value: Any, sizes: dict[str, int]) -> np.ndarray:
    name, shape, dtype = t["name"], t["shape"], t["dtype"]
    try:
        arr = value if isinstance(value, np.ndarray) else np.asarray(value)
    except (ValueError, TypeError) as exc:
        raise BadRequest(f"input {name!r}: not a rectangular array of numbers ({exc})") from None
    if arr.dtype.kind not in "biuf":
        raise BadRequest(f"input {name!r}: values must be numbers, got {arr.dtype.name if arr.dtype.kind != 'O' else 'mixed values'}")
    if arr.ndim != len(shape):
        raise BadRequest(f"input {name!r}: expected {len(shape)} dimensions {shape}, got shape {list(arr.shape)}")
    for axis, (want, got) in enumerate(zip(shape, arr.shape)):
        if isinstance(want, int):
            if want != got:
                raise BadRequest(f"input {name!r}: dimension {axis} must be {want}, got shape {list(arr.shape)}")
        elif sizes.setdefault(want, got) != got:
            raise BadRequest(f"input {name!r}: dimension {axis} ({want}) is {got}, another input has {sizes[want]}")
    if arr.shape[0] == 0:
        raise BadRequest(f"input {name!r}: no rows")
    return _cast(name, arr, dtype, t.get("range"))


def _cast(name: str, arr: np.ndarray, dtype: str, rng: list | None) -> np.ndarray:
    target = np.dtype(_np_dtype(dtype))
    kind = arr.dtype.kind
    if target.kind == "f":
        out = arr.astype(target)
        if kind == "f" and not np.isfinite(out[np.isfinite(arr)]).all():
            raise BadRequest(f"input {name!r}: values overflow {dtype}")
        return out
    if kind == "f":
        raise BadRequest(f"input {name!r}: expects {dtype}, got floating-point values (cannot cast safely)")
    if target.kind == "b":
        if not np.isin(arr, (0, 1)).all():
            raise BadRequest(f"input {name!r}: expects booleans (0/1)")
        return arr.astype(bool)
    info = np.iinfo(target)
    if arr.size and (arr.min() < info.min or arr.max() > info.max):
        raise BadRequest(f"input {name!r}: values out of range for {dtype}")
    if rng is not None and arr.size and (arr.min() < rng[0] or arr.max() >= rng[1]):
        raise BadRequest(f"input {name!r}: values must lie in [{rng[0]}, {rng[1]})")
    return arr.astype(target)


def encode(outputs: dict[str, np.ndarray], accept: str) -> tuple[bytes | str, str]:
    if NPZ in accept:
        return write_npz(outputs), NPZ
    return json.dumps({"outputs": {k: v.tolist() for k, v in outputs.items()}}), "application/json"


# ---------------------------------------------------------------- .npz without zipfile
# np.load and np.savez cost 150 and 45 us per small request (zipfile objects, a Python-literal parser for
# the .npy header): most of this handler's time on a small model. The common case, stored (not compressed)
# entries of plain numeric arrays, is read and written here directly; anything else goes to numpy.

MAX_NPZ_ENTRIES = 256  # arrays in one request body: one per input, so more is a malformed (or hostile) body
_LOCAL = struct.Struct("<4s5H3L2H")  # zip local file header
_CENTRAL = struct.Struct("<4s6H3L5H2L")  # zip central directory entry
_END = struct.Struct("<4s4H2LH")  # end of central directory
_NPY_DICT = re.compile(
    r"\{'descr': *'([<>|=]?[biuf]\d{1,2})', *'fortran_order': *(True|False), *'shape': *\(((?:\d+, *)*(?:\d+,?)?)\),? *\} *\n?"
)


def read_npz(body: bytes) -> dict[str, np.ndarray]:
    arrays = _read_stored_npz(body)
    if arrays is None:
        with np.load(io.BytesIO(body), allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    return arrays


def _read_stored_npz(body: bytes) -> dict[str, np.ndarray] | None:
    """The arrays of an .npz whose entries are all stored .npy files of numbers; None for anything else."""
    end = body.rfind(b"PK\x05\x06", max(0, len(body) - 22 - 65535))
    if end < 0 or end + _END.size > len(body):
        return None
    _, disk, _, count, total, _, pos, _ = _END.unpack_from(body, end)
    if disk or count != total or pos == 0xFFFFFFFF:
        return None  # multi-disk or zip64: numpy's reader
    if count > MAX_NPZ_ENTRIES:
        raise BadRequest(f"body is not a readable .npz ({count} entries; a request has one per input)")
    arrays, spans, used = {}, [], 0
    for _ in range(count):
        if pos + _CENTRAL.size > len(body):
            return None
        sig, _, _, flags, method, _, _, crc, csize, usize, nlen, elen, clen, _, _, _, offset = _CENTRAL.unpack_from(body, pos)
        name = body[pos + _CENTRAL.size : pos + _CENTRAL.size + nlen]
        pos += _CENTRAL.size + nlen + elen + clen
        if sig != b"PK\x01\x02" or method != 0 or flags & 1 or csize != usize or not name.endswith(b".npy"):
            return None
        if offset + _LOCAL.size > len(body) or body[offset : offset + 4] != b"PK\x03\x04":
            return None
        start = offset + _LOCAL.size + sum(_LOCAL.unpack_from(body, offset)[-2:])
        data = memoryview(body)[start : start + csize]
        if len(data) != csize:
            return None
        spans.append((start, start + csize))
        used += csize
        if used > len(body):  # entries sharing bytes, to be checked and read again and again
            raise BadRequest("body is not a readable .npz (entries overlap)")
        if zlib.crc32(data) != crc:
            raise BadRequest(f"body is not a readable .npz (entry {name.decode(errors='replace')} fails its CRC check)")
        arr = _read_npy(body, start, csize)
        if arr is None:
            return None
        arrays[name[:-4].decode("utf-8" if flags & 0x800 else "cp437", errors="replace")] = arr
    spans.sort()
    if any(b > a for (_, b), (a, _) in zip(spans, spans[1:])):
        raise BadRequest("body is not a readable .npz (entries overlap)")
    return arrays


def _read_npy(body: bytes, start: int, size: int) -> np.ndarray | None:
    if body[start : start + 6] != b"\x93NUMPY" or body[start + 6] not in (1, 2, 3):
        return None
    if body[start + 6] == 1:
        hlen, hstart = int.from_bytes(body[start + 8 : start + 10], "little"), start + 10
    else:
        hlen, hstart = int.from_bytes(body[start + 8 : start + 12], "little"), start + 12
    m = _NPY_DICT.fullmatch(body[hstart : hstart + hlen].decode("latin1").rstrip(" "))
    if m is None:
        return None
    dtype = np.dtype(m.group(1))
    shape = tuple(int(d) for d in m.group(3).replace(" ", "").split(",") if d)
    count = int(np.prod(shape, dtype=np.int64)) if shape else 1
    if hstart + hlen + count * dtype.itemsize != start + size:
        return None  # truncated or padded: let numpy say what is wrong
    arr = np.frombuffer(body, dtype, count, offset=hstart + hlen)
    return arr.reshape(shape, order="F" if m.group(2) == "True" else "C")


def write_npz(arrays: dict[str, np.ndarray]) -> bytes:
    """What np.savez writes (stored entries of .npy v1.0 files), built directly."""
    if sum(a.nbytes for a in arrays.values()) > 1 << 30:
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        return buf.getvalue()
    out, central = bytearray(), bytearray()
    for name, arr in arrays.items():
        arr = arr if arr.flags.c_contiguous else arr.copy(order="C")  # (ascontiguousarray makes 0-d arrays 1-d)
        shape = f"({arr.shape[0]},)" if arr.ndim == 1 else "(" + ", ".join(map(str, arr.shape)) + ")"
        text = f"{{'descr': '{arr.dtype.str}', 'fortran_order': False, 'shape': {shape}, }}"
        text += " " * (63 - (10 + len(text)) % 64) + "\n"  # numpy pads the header to a multiple of 64
        payload = b"\x93NUMPY\x01\x00" + len(text).to_bytes(2, "little") + text.encode("latin1") + arr.tobytes()
        fname = f"{name}.npy".encode()
        flag = 0 if fname.isascii() else 0x800  # UTF-8 names say so, as zipfile does
        crc = zlib.crc32(payload)
        size = len(payload)
        central += _CENTRAL.pack(b"PK\x01\x02", 20, 20, flag, 0, 0, 0x21, crc, size, size, len(fname), 0, 0, 0, 0, 0, len(out)) + fname
        out += _LOCAL.pack(b"PK\x03\x04", 20, 0, flag, 0, 0x21, crc, size, size, len(fname), 0) + fname + payload
    count = len(arrays)
    return bytes(out + central + _END.pack(b"PK\x05\x06", 0, 0, count, count, len(central), len(out), 0))


# ---------------------------------------------------------------- the TorchServe entry point


class Service:
    def __init__(self, context: Any) -> None:
        props = context.system_properties
        model_dir = props.get("model_dir")
        with open(os.path.join(model_dir, METADATA), encoding="utf-8") as f:
            self.meta = json.load(f)
        gpu_id = props.get("gpu_id")
        import torch

        device = f"cuda:{gpu_id}" if gpu_id is not None and torch.cuda.is_available() else "cpu"
        serve = self.meta.get("serve", {})
        threads = thread_count(int(serve.get("max_workers", 1)))
        torch.set_num_threads(threads)
        self.runner = load_runner(model_dir, self.meta, device, gpu_id, threads)
        why = ""
        if device == "cpu" and threads > 1 and not os.environ.get("MARPIPE_THREADS"):
            batch = timing_batch(model_dir, self.meta, int(serve.get("batch_size") or 1))
            onnx = self.meta["format"] == "onnx"
            reload = (lambda n: load_runner(model_dir, self.meta, device, gpu_id, n)) if onnx else (lambda n: self.runner)
            threads, self.runner, why = fit_threads(self.runner, threads, batch, reload)
        log.info("marpipe: %s (%s) ready on %s, %d threads%s", self.meta["name"], self.meta["format"], device, threads, why)

    def handle(self, data: list, context: Any) -> list:
        results: list[Any] = [None] * len(data)
        decoded: dict[int, dict[str, np.ndarray]] = {}
        for i, row in enumerate(data):
            try:
                body = row.get("body") if row.get("body") is not None else row.get("data")
                if body is None:
                    raise BadRequest("empty request body")
                decoded[i] = to_arrays(parse_body(body, header(context, i, "content-type")), self.meta)
            except BadRequest as exc:
                results[i] = self._error(context, i, exc.status, str(exc))
        for group in _groups(decoded, self.meta["inputs"]):
            self._run_group(group, decoded, results, context)
        return results

    def _run_group(self, group: list[int], decoded: dict, results: list, context: Any) -> None:
        names = [t["name"] for t in self.meta["inputs"]]
        batch = {n: np.concatenate([decoded[i][n] for i in group]) for n in names}
        try:
            outputs = self.runner(batch)
        except Exception as exc:
            if len(group) > 1:  # find the request that broke it; the others still get answers
                for i in group:
                    self._run_group([i], decoded, results, context)
                return
            log.exception("marpipe: inference failed")
            results[group[0]] = self._error(context, group[0], 500, f"inference failed: {type(exc).__name__}: {exc}")
            return
        start = 0
        for i in group:
            rows = len(decoded[i][names[0]])
            mine = {k: v[start : start + rows] for k, v in outputs.items()}
            start += rows
            body, ctype = encode(mine, header(context, i, "accept"))
            context.set_response_content_type(i, ctype)
            results[i] = body

    @staticmethod
    def _error(context: Any, idx: int, status: int, message: str) -> str:
        context.set_response_status(status, message[:200], idx)
        context.set_response_content_type(idx, "application/json")
        return json.dumps({"error": message})


def _groups(decoded: dict[int, dict[str, np.ndarray]], specs: list[dict]) -> list[list[int]]:
    """Requests whose non-batch shapes agree can share one forward pass."""
    groups: dict[tuple, list[int]] = {}
    for i, arrays in decoded.items():
        key = tuple(arrays[t["name"]].shape[1:] for t in specs)
        groups.setdefault(key, []).append(i)
    return list(groups.values())


_service: Service | None = None


def handle(data: list | None, context: Any) -> list | None:
    """TorchServe's function entry point: called once with data=None to initialise, then per batch."""
    global _service
    if _service is None:
        _service = Service(context)
    if data is None:
        return None
    return _service.handle(data, context)
