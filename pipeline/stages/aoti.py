"""The aoti format: `torch.export` of the model, compiled by AOTInductor into one `.pt2` package of native code.

What the package is compiled for is recorded (`platform`: machine, the vector ISA inductor chose and the CPU
features the code may use, torch, compiler; on CUDA the GPU's compute capability and CUDA version): the handler
refuses a server that does not match (`handlers/marpipe_serving/aoti.py`).

Reproducible bytes: inductor names its generated files by hashes of code that quotes the folder it compiles in,
and that folder's path lands in the library (its line tables and `__FILE__` strings), so every compile runs in one
fixed, private folder (`compile_folder`), emptied before and after, under a lock (builds in parallel take turns).
Inductor also fixes the thread count of its parallel loops to the build machine's by default; `cpp.dynamic_threads`
makes them ask at run time instead (the server's thread choice holds), and which loops are split is decided for a
fixed `SPLIT_THREADS` (the same bytes whatever the build machine's threads). On
x86-64 the code targets the micro-architecture level of the ISA inductor chose (`x86-64-v4` for AVX-512) rather
than `-march=native`, so the recorded features are all it needs from a CPU.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import logging
import os
import platform
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from handlers.marpipe_serving.aoti import cpu_flags
from pipeline.errors import ExportError, first_line
from pipeline.spec.spec import BATCH, Spec
from pipeline.stages import inputs

ARTIFACT = "model.pt2"
CACHE_ENV = "TORCHINDUCTOR_CACHE_DIR"
SPLIT_THREADS = 16  # inductor splits a kernel's outer loops into chunks enough for this many threads
# The x86-64 micro-architecture level each of inductor's vector ISAs implies, and the CPU flags (as
# /proc/cpuinfo names them) each level and each compiler flag of the ISA lets the code use.
LEVEL = {"avx2": "x86-64-v3", "avx512": "x86-64-v4"}
LEVEL_FLAGS = {
    "x86-64": [],
    "x86-64-v3": ["abm", "avx", "avx2", "bmi1", "bmi2", "cx16", "f16c", "fma", "lahf_lm", "movbe", "popcnt", "pni"]
    + ["sse4_1", "sse4_2", "ssse3", "xsave"],
}
LEVEL_FLAGS["x86-64-v4"] = LEVEL_FLAGS["x86-64-v3"] + ["avx512bw", "avx512cd", "avx512dq", "avx512f", "avx512vl"]
ISA_FLAGS = {
    "-mavx2": "avx2",
    "-mfma": "fma",
    "-mf16c": "f16c",
    "-mavx512f": "avx512f",
    "-mavx512dq": "avx512dq",
    "-mavx512vl": "avx512vl",
    "-mavx512bw": "avx512bw",
    "-mavx512vnni": "avx512_vnni",
    "-mavx512bf16": "avx512_bf16",
    "-mamx-tile": "amx_tile",
    "-mamx-bf16": "amx_bf16",
    "-mamx-int8": "amx_int8",
    "-mamx-fp16": "amx_fp16",
}


def compiler() -> str:
    """The C++ compiler inductor runs: `$CXX`, else g++."""
    return os.environ.get("CXX") or "g++"


def compiler_missing() -> str | None:
    """Why aoti cannot be built here (no C++ compiler), or None."""
    if shutil.which(compiler()) is not None:
        return None
    if os.environ.get("CXX"):
        return f"no C++ compiler: $CXX is {compiler()}, which is not an executable; set it to a C++ compiler (g++, clang++)"
    return "no C++ compiler: AOTInductor compiles the model with g++, which is not on PATH; install g++ (or set $CXX)"


@functools.cache  # asked for by every build key and every export: the same answer for the process
def compiler_version() -> str:
    """The compiler's first `--version` line, e.g. `g++ (Debian 12.2.0-14+deb12u1) 12.2.0`."""
    try:
        out = subprocess.run([compiler(), "--version"], capture_output=True, text=True, env={**os.environ, "LC_ALL": "C"}, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return compiler()
    return (out.stdout.strip().splitlines() or [compiler()])[0]


def compile_folder() -> Path:
    """The one folder every aoti compile of this user runs in: its path is in the compiled library."""
    return Path(tempfile.gettempdir()) / f"marpipe-aoti-{os.getuid()}"


def key() -> dict[str, Any]:
    """What a package's bytes depend on beyond the build's inputs and versions, read without importing torch (for the
    build key): the machine and its CPU flags, the compiler, the compile folder and where torch's headers lie, and the
    GPUs the driver lists."""
    import hashlib
    import importlib.util

    def digest(path: Path) -> str | None:
        try:
            return hashlib.sha256(path.read_bytes()).hexdigest()
        except OSError:
            return None

    flags = cpu_flags()  # as the handler reads them
    found = importlib.util.find_spec("torch")
    return {
        "machine": platform.machine(),
        "cpu_flags": hashlib.sha256(" ".join(sorted(flags)).encode()).hexdigest() if flags is not None else None,
        "compiler": compiler_version() if not compiler_missing() else None,
        "folder": str(compile_folder()),
        "torch": str(Path(found.origin).parent) if found and found.origin else None,
        "gpus": [digest(p) for p in sorted(Path("/proc/driver/nvidia/gpus").glob("*/information"))],
    }


def platform_record(device: str) -> dict[str, Any]:
    """What a package compiled here now is bound to (and the `cpp.march` it is compiled with, under `march`)."""
    import torch
    from torch._inductor import cpu_vec_isa

    isa = cpu_vec_isa.pick_vec_isa()  # probes the compiler once per process, in inductor's own cache
    name = str(isa) if isa else ""
    machine = platform.machine()
    record: dict[str, Any] = {"device": "cuda" if device.startswith("cuda") else "cpu", "machine": machine, "isa": name or "none"}
    if machine in ("x86_64", "AMD64"):
        march = LEVEL.get(name.split(" ")[0], "x86-64")
        flags = isa.build_arch_flags().split() if isa else []
        record["march"] = march
        record["cpu_features"] = sorted(set(LEVEL_FLAGS[march]) | {ISA_FLAGS[f] for f in flags if f in ISA_FLAGS})
    record["torch"] = torch.__version__
    record["compiler"] = compiler_version()
    if record["device"] == "cuda":
        index = torch.device(device).index or 0
        record["cuda"] = torch.version.cuda
        record["capability"] = "{}.{}".format(*torch.cuda.get_device_capability(index))
        record["gpu"] = torch.cuda.get_device_name(index)
    return record


def inductor_configs(record: dict[str, Any]) -> dict[str, Any]:
    """Inductor's settings for a package: threads taken at run time, loops split for SPLIT_THREADS, and the recorded
    x86-64 level (see above)."""
    configs: dict[str, Any] = {"cpp.dynamic_threads": True, "cpp.threads": SPLIT_THREADS}
    if "march" in record:
        configs["cpp.march"] = record["march"]
    return configs


@dataclass
class Compiled:
    detail: str
    platform: dict[str, Any]
    compile_s: float


def export(spec: Spec, model: Any, example: dict[str, Any], by_name: bool, path: Path, device: str) -> Compiled:
    """`torch.export` with the batch and every declared dynamic dim as export dims (bounded by `dims.NAME.max`),
    then `aoti_compile_and_package` into `path`, for `device`."""
    import torch
    from torch._inductor import aoti_compile_and_package

    from pipeline.store import repro

    missing = compiler_missing()
    if missing:
        raise ExportError(f"{spec.name}: aoti: {missing}; or build another format")
    record = platform_record(device)
    shapes = inputs.export_dims(spec, list(example), by_name, bounded=True)
    example = {n: t.to(device) for n, t in example.items()}
    args, kwargs = ((), example) if by_name else (tuple(example.values()), None)
    repro.fresh_compiler_state()  # an export as if alone, whatever this process exported before
    model.to(device)
    try:
        with _quiet_torch() as seen:
            try:
                program = torch.export.export(model, args, kwargs, dynamic_shapes=shapes)
            except Exception as exc:
                raise ExportError(f"{spec.name}: aoti: torch.export failed: {_why(exc, seen, spec)}"[:600]) from None
            start = time.perf_counter()
            with _compile_folder(spec.name):
                try:
                    aoti_compile_and_package(program, package_path=str(path), inductor_configs=inductor_configs(record))
                except Exception as exc:
                    raise ExportError(f"{spec.name}: aoti: AOTInductor failed to compile: {_first(exc)}"[:600]) from None
            took = time.perf_counter() - start
    finally:
        model.to("cpu")
        repro.fresh_compiler_state()  # and leaves nothing cached for the eager runs and exports after it
    isa = record["isa"] if record["device"] == "cpu" else f"sm {record['capability']}"
    return Compiled(f"torch.export + AOTInductor ({record['machine']}, {isa})", record, took)


@contextlib.contextmanager
def _compile_folder(name: str) -> Iterator[Path]:
    """Inductor's cache folder for one compile: `compile_folder()`, private, empty, ours alone while it runs."""
    folder = compile_folder()
    lock = os.open(f"{folder}.lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    before = os.environ.get(CACHE_ENV)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        _empty_private(folder, name)
        os.environ[CACHE_ENV] = str(folder)
        yield folder
    finally:
        if before is None:
            os.environ.pop(CACHE_ENV, None)
        else:
            os.environ[CACHE_ENV] = before
        with contextlib.suppress(OSError):
            _empty_private(folder, name)
        os.close(lock)  # releases the lock


def _empty_private(folder: Path, name: str) -> None:
    """`folder` as an empty directory that only this user can enter (made so, or refused when another user owns it)."""
    try:
        folder.mkdir(mode=0o700)
    except FileExistsError:
        info = folder.lstat()
        if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
            raise ExportError(f"{name}: aoti: {folder} is not a folder of this user; remove it (aoti compiles there)") from None
        folder.chmod(0o700)
        for child in folder.iterdir():
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)
            else:
                child.unlink()


@dataclass
class _Seen:
    """What the export's shape log said: the dim each symbol stands for, and where each symbol got a fixed size."""

    symbols: dict[str, tuple[str, int]] = field(default_factory=dict)  # s27 -> ("ids", 1)
    fixed: dict[str, str] = field(default_factory=dict)  # s27 -> "aten.gru.input in nn.GRU, at tiny.py:203 `...`"


class _Capture(logging.Handler):
    SYMBOL = re.compile(r"create_symbol (s\d+) = \d+ for (.+?)\.size\(\)\[(\d+)\]")
    GUARD = re.compile(r"eval Eq\((s\d+), \d+\) \[guard added\]")

    def __init__(self, seen: _Seen) -> None:
        super().__init__(logging.INFO)
        self.seen = seen

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if m := self.SYMBOL.search(message):
            names = re.findall(r"\['(\w+)'\]", m.group(2))
            self.seen.symbols[m.group(1)] = (names[-1] if names else m.group(2), int(m.group(3)))
        elif (m := self.GUARD.search(message)) and m.group(1) not in self.seen.fixed:
            self.seen.fixed[m.group(1)] = _culprit(sys._getframe())


def _culprit(frame: Any) -> str:
    """Where the running export fixed a size: the op being decomposed, the torch module, and the first line of the
    model's own code (outside torch, the standard library and marpipe) on the way out of the stack."""
    import linecache
    import sysconfig

    import torch

    skip = (str(Path(torch.__file__).parent), sysconfig.get_paths()["stdlib"], str(Path(__file__).parents[1]), "<")
    op = module = line = None
    while frame is not None and line is None:
        code, here = frame.f_code, frame.f_locals.get("self")
        if code.co_name == "decompose" and type(here).__name__ == "OpOverload":
            op = str(here)  # the outermost: the op the model called, not those it decomposes into
        if module is None and isinstance(here, torch.nn.Module) and code.co_name == "forward":
            module = ("nn." if type(here).__module__.startswith("torch.nn") else "") + type(here).__name__
        if not code.co_filename.startswith(skip):
            text = linecache.getline(code.co_filename, frame.f_lineno).strip()
            line = f"{Path(code.co_filename).name}:{frame.f_lineno} `{text}`"
        frame = frame.f_back
    what = " in ".join(p for p in (op, module) if p)
    return ", ".join(p for p in (what, f"called at {line}" if line else "") if p)


@contextlib.contextmanager
def _quiet_torch() -> Iterator[_Seen]:
    """torch's own log lines and warnings kept off the terminal (an error is one line); the shape log read instead."""
    seen = _Seen()
    capture = _Capture(seen)
    loggers = [logging.getLogger("torch")] + [
        lg for n, lg in logging.Logger.manager.loggerDict.items() if n.startswith("torch.") and isinstance(lg, logging.Logger)
    ]
    saved = [(lg, lg.handlers[:]) for lg in loggers]
    shapes = logging.getLogger("torch.fx.experimental.symbolic_shapes")
    level = shapes.level
    try:
        for lg in loggers:
            lg.handlers = []
        shapes.setLevel(logging.INFO)
        shapes.addHandler(capture)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield seen
    finally:
        shapes.removeHandler(capture)
        shapes.setLevel(level)
        for lg, handlers in saved:
            lg.handlers = handlers


def _why(exc: Exception, seen: _Seen, spec: Spec) -> str:
    """One line: for a dynamic dim that the export fixed, the dim, its size and what fixed it; else torch's reason."""
    text = str(exc)
    marked = re.findall(r"You marked (\w+) as dynamic but your code specialized it to be a constant \((\d+)\)", text)
    if marked:
        causes = []
        for dim, size in marked:
            symbol = next((s for s, (inp, axis) in seen.symbols.items() if _dim_of(spec, inp, axis) == dim and s in seen.fixed), None)
            cause = seen.fixed.get(symbol, "") if symbol else ""
            causes.append(f"dims.{dim}" if dim != BATCH else BATCH)
            causes[-1] += f" is fixed to the example's size {size}" + (f" by {cause}" if cause else "")
        return (
            "torch.export cannot keep it dynamic: "
            + "; ".join(causes)
            + " (export then answers only that size); build this model as onnx or torchscript, or give the dim one size"
        )
    return _first(exc)


def _dim_of(spec: Spec, name: str, axis: int) -> str | None:
    shape = next((t.shape for t in spec.inputs if t.name == name), ())
    return shape[axis] if axis < len(shape) and isinstance(shape[axis], str) else None


def _first(exc: Exception) -> str:
    """The line of an export or compile error that says what failed (and the user's line it names, if any)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    text = first_line(exc, None, prefer=("data-dependent", "Unsupported", "not supported", "error:"))
    call = next((i for i, ln in enumerate(lines) if ln.startswith("The following call raised this error")), None)
    if call is not None and call + 2 < len(lines):
        m = re.match(r'File "(.+)", line (\d+), in (\w+)', lines[call + 1])
        if m:
            text += f" (at {Path(m.group(1)).name}:{m.group(2)} in {m.group(3)}: `{lines[call + 2]}`)"
    return f"{type(exc).__name__}: {text}"
