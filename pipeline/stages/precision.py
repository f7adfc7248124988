"""`export.precision` in the build: the model every torch-based format exports at that precision, ONNX's int8
quantization, and the devices a precision runs on.

`model` and `example` are the one place where a torch-based exporter (eager, TorchScript, and any later one that
starts from a torch module) gets its model and inputs at the spec's precision. How a model is cast or quantized is
the handler's own (handlers/marpipe_serving/precision.py), so a build quantizes a model exactly as the server
rebuilds it. The fp32 eager model stays as it was loaded: parity's reference.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

from handlers.marpipe_serving import precision as serving
from pipeline.errors import ExportError, SpecError, first_line
from pipeline.spec.precision import FP32
from pipeline.spec.spec import Spec
from pipeline.store import repro

# Measured (`python benchmarks/precision_bench.py --only dtypes`, docs/formats.md) on an Intel Xeon with AMX, one
# thread, a BERT-shaped encoder (4 layers, width 768, 128 tokens), batch 1 / 32: fp32 60 / 1680 ms; fp16 54 / 1472
# (1.1x, with AVX512-FP16) but 456 / 17238 without it (ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16); bf16 20 / 376 with AMX,
# 84 / 2438 with AVX512-BF16 alone, 221 / 6581 with AVX-512, 430 / 16784 with AVX2.
FP16_CPU = "on a CPU it was 1.1x faster than fp32 at best, where bf16 was 3-4x, and 6.5-11x slower without AVX512-FP16"
BF16_CPU = "without AMX, bf16 was 1.3x to 9x slower than fp32 (docs/formats.md)"


# formats whose int8 is the fp32 export quantized by their own runtime (`quantize_onnx`), not torch's
RUNTIME_INT8 = ("onnx",)


def model(spec: Spec, fp32: Any) -> Any:
    """The module to export at `spec.export.precision`: `fp32` itself at fp32 (and for a runtime that quantizes the
    fp32 export itself), else a copy (int8: quantized by torch; fp16/bf16: cast). The copy never holds a second
    float32 copy of the weights: an int8 copy shares the layers' float tensors until quantize_dynamic replaces the
    layers (it reads their weights, never writes them), an fp16/bf16 copy is made of the cast tensors."""
    precision = spec.export.precision
    if precision == FP32 or precision == "int8" and spec.export.format in RUNTIME_INT8:
        return fp32
    import torch

    tensors = {id(t): t for t in [*fp32.parameters(), *fp32.buffers()]}
    if precision != "int8":
        dtype = serving.compute_dtype({"precision": precision})
        for t in fp32.parameters():
            if t.is_floating_point():
                tensors[id(t)] = torch.nn.Parameter(t.detach().to(dtype), requires_grad=False)
        for t in fp32.buffers():
            if t.is_floating_point():
                tensors[id(t)] = t.to(dtype)
    try:
        twin = copy.deepcopy(fp32, dict(tensors))
        return serving.quantize(twin) if precision == "int8" else twin.eval()
    except Exception as exc:
        raise ExportError(f"{spec.name}: the model at {precision}: {type(exc).__name__}: {first_line(exc)}") from None


def example(spec: Spec, tensors: dict[str, Any]) -> dict[str, Any]:
    """The inputs the exported model is traced with: float inputs in an fp16/bf16 model's type, as the handler casts."""
    dtype = serving.compute_dtype({"precision": spec.export.precision})
    if dtype is None:
        return tensors
    return {n: t.to(dtype) if t.is_floating_point() else t for n, t in tensors.items()}


def eager_state(spec: Spec, exported: Any, fp32: Any) -> dict[str, Any]:
    """What an eager archive at a lower precision holds: the cast weights, or the int8 ones (`serving.int8_state`)."""
    if spec.export.precision == "int8":
        return serving.int8_state(exported, fp32)
    return exported.state_dict()


def quantize_onnx(spec: Spec, source: Path, path: Path) -> list[Path]:
    """`source` (an fp32 ONNX model) dynamically quantized to int8 into `path`, by onnxruntime's quantizer: weights
    int8 per output channel, activations uint8 computed per batch (per channel: higher agreement than per tensor
    at the same speed; int8 weights: uint8 ones ran at fp32's speed at batch 32; docs/formats.md). The files
    written, `path` first."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    external = any(p.name.startswith(source.name) and p != source for p in source.parent.iterdir())
    quiet = logging.getLogger()  # the quantizer logs advice (pre-processing) at warning level on the root logger
    level, quiet.level = quiet.level, logging.ERROR
    try:
        quantize_dynamic(str(source), str(path), per_channel=True, weight_type=QuantType.QInt8, use_external_data_format=external)
        onnx.checker.check_model(str(path), full_check=False)
        repro.onnx(path)
    except Exception as exc:
        raise ExportError(f"{spec.name}: onnx int8 quantization (onnxruntime) failed: {type(exc).__name__}: {first_line(exc)}") from None
    finally:
        quiet.level = level
    return [path, *sorted(p for p in path.parent.iterdir() if p.name.startswith(path.name) and p != path)]


def device(spec: Spec, dev: str, named: str | None, where: str = "export.precision") -> str:
    """The device parity runs `spec` on at its precision. `named`: the setting that asked for `dev` (`--device` or
    `parity.device`), None when parity.device auto chose it; `where`: the spec field to name in an error."""
    import torch

    precision = spec.export.precision
    head = f"{spec.source}: {where}: {precision}"
    if precision == "int8" and dev == "cuda":
        if named is None:
            return "cpu"  # int8 is served on the CPU, whatever the server has
        raise SpecError(f"{head} runs on the CPU (dynamic quantization has no CUDA kernels) and {named} is cuda; use cpu or auto")
    if precision == "fp16" and dev == "cpu":
        why = f"{named} is cpu" if named else "torch sees no GPU here"
        raise SpecError(f"{head} runs on a GPU only ({FP16_CPU}: docs/formats.md) and {why}; use bf16 (with AMX) or int8 on a CPU")
    if precision == "bf16" and dev == "cpu" and not cpu_bf16():
        raise SpecError(f"{head} on a CPU needs AMX-BF16, which this one lacks ({BF16_CPU}); use fp32 or int8 here, or bf16 on a GPU")
    if precision == "bf16" and dev == "cuda" and not torch.cuda.is_bf16_supported():
        raise SpecError(f"{head}: this GPU has no bf16 arithmetic (compute capability 8.0 or newer has); use fp16")
    return dev


def cpu_bf16() -> bool:
    """Whether this CPU computes bf16 matrix products natively (AMX-BF16, usable: the OS enabled the tiles)."""
    import torch

    capabilities = getattr(torch.cpu, "get_capabilities", None)
    amx = getattr(torch.cpu, "_is_amx_tile_supported", None)
    if capabilities is None or amx is None:
        return False
    return bool(capabilities().get("amx_bf16")) and bool(amx())
