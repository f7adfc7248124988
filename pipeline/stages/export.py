"""Stage export: write the serving artifact: the state_dict (eager), a TorchScript module, ONNX, or an AOTInductor
package (`aoti`, in its own module); at the spec's precision (the model at that precision comes from
pipeline/stages/precision.py)."""

from __future__ import annotations

import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from handlers.marpipe_serving.models import call
from pipeline.errors import ExportError, SpecError, first_line
from pipeline.sources.arch import forward_order
from pipeline.spec.precision import FP32
from pipeline.spec.spec import BATCH, Spec
from pipeline.stages import aoti, inputs, precision
from pipeline.stages.load import Loaded
from pipeline.store import repro

TWO_GB = 2 * 1024**3
ARTIFACTS = {"eager": "weights.pt", "torchscript": "model.pt", "onnx": "model.onnx", "aoti": aoti.ARTIFACT}


@dataclass
class Exported:
    format: str
    files: list[Path]  # what goes into the archive; files[0] is the artifact the handler opens
    output_names: list[str]
    detail: str
    platform: dict[str, Any] = field(default_factory=dict)  # aoti: what the package is compiled for (marpipe.json)
    compile_s: float | None = None  # aoti: the compile's seconds (the build line and report, never the archive)


def run_eager(spec: Spec, model: Any, tensors: dict[str, Any], by_name: bool = False) -> Any:
    """The eager forward pass on generated inputs (by keyword or by position, as the archive will call it); a
    failure means the declared inputs do not fit the model."""
    import torch

    try:
        with torch.inference_mode():
            return call(model, tensors, by_name)
    except Exception as exc:
        shapes = ", ".join(f"{k} {list(v.shape)} {str(v.dtype).removeprefix('torch.')}" for k, v in tensors.items())
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        raise SpecError(f"{spec.source}: inputs: the model fails on inputs as declared ({shapes}): {type(exc).__name__}: {first}") from None


def output_names(spec: Spec, model: Any, example: dict[str, Any], by_name: bool = False) -> list[str]:
    """The spec's output names, or names derived from what the model returns (a ModelOutput's keys too);
    checked against it."""
    import torch

    out = run_eager(spec, model, example, by_name)
    if isinstance(out, torch.Tensor):
        derived = ["output"]
    elif isinstance(out, (tuple, list)) and all(isinstance(v, torch.Tensor) for v in out):
        derived = [f"output_{i}" for i in range(len(out))]
    elif isinstance(out, dict) and all(isinstance(v, torch.Tensor) for v in out.values()):
        derived = [str(k) for k in out]
    else:
        fields = out.items() if isinstance(out, dict) else enumerate(out) if isinstance(out, (tuple, list)) else []
        odd = next(((k, v) for k, v in fields if not isinstance(v, torch.Tensor)), None)
        which = f": its {odd[0]} is a {type(odd[1]).__name__}, not a tensor" if odd else ""
        hint = " (a cache: set architecture.kwargs use_cache: false)" if odd and "cache" in type(odd[1]).__name__.lower() else ""
        raise SpecError(
            f"{spec.source}: outputs: the model returns {type(out).__name__}{which}{hint}; marpipe serves tensors (one, a tuple or a dict)"
        )
    if spec.outputs is None:
        return derived
    names = [o.name for o in spec.outputs]
    if isinstance(out, dict):
        if sorted(names) != sorted(derived):
            raise SpecError(f"{spec.source}: outputs: the model returns the keys {derived}, the spec names {names}")
        return derived  # the model's own order: exporters flatten a dict in that order
    if len(names) != len(derived):
        raise SpecError(f"{spec.source}: outputs: the model returns {len(derived)} outputs, the spec names {len(names)} ({names})")
    return names


def run(spec: Spec, loaded: Loaded, workdir: Path, device: str = "cpu") -> Exported:
    """The artifact of `spec.export.format` in `workdir`; `device`: what parity runs on (an aoti package is compiled
    for it)."""
    import torch

    fmt = spec.export.format
    example = inputs.example(spec)
    if loaded.by_name:  # exporters number a module's inputs in forward's order
        example = {n: example[n] for n in forward_order(loaded.model, list(example))}
    names = output_names(spec, loaded.model, example, loaded.by_name)
    path = workdir / ARTIFACTS[fmt]
    extra = _config_json(loaded, workdir)
    at = spec.export.precision
    # the torch module and inputs at the spec's precision (fp32: the loaded model and inputs themselves), what every
    # torch-based format exports; ONNX's int8 is the fp32 export, quantized by onnxruntime (pipeline/stages/precision.py)
    model, example = precision.model(spec, loaded.model), precision.example(spec, example)
    if fmt == "eager" and at != FP32:
        torch.save(precision.eager_state(spec, model, loaded.model), path)
        return Exported(fmt, [path, *extra], names, f"state_dict ({at})")
    if fmt == "eager":
        if loaded.verbatim:
            # The checkpoint loads as it is: link it, and packaging copies it once (its sha256 is known).
            if loaded.checkpoint.format == "safetensors":
                path = workdir / "weights.safetensors"
            path.symlink_to(loaded.checkpoint.path)
            return Exported(fmt, [path, *extra], names, f"state_dict (the {loaded.checkpoint.format} file as it is)")
        # Otherwise the normalised state_dict (prefixes stripped, casts applied, shards merged) is what the handler loads.
        torch.save(loaded.model.state_dict(), path)
        return Exported(fmt, [path, *extra], names, "state_dict (normalised)")
    if fmt == "torchscript":
        how = _torchscript(spec, model, example, loaded.by_name, path)
        return Exported(fmt, [path, *extra], names, how if at == FP32 else f"{how}, {at}")
    if fmt == "aoti":
        done = aoti.export(spec, model, example, loaded.by_name, path, device)
        detail = done.detail if at == FP32 else f"{done.detail}, {at}"
        return Exported(fmt, [path, *extra], names, detail, done.platform, done.compile_s)
    if at == "int8":
        (workdir / FP32).mkdir()
        _onnx(spec, model, example, loaded.by_name, names, workdir / FP32 / path.name)
        files = precision.quantize_onnx(spec, workdir / FP32 / path.name, path)
        shutil.rmtree(workdir / FP32)
        return Exported(fmt, files + extra, names, f"onnx ({spec.export.onnx_exporter}), int8 (onnxruntime, per channel)")
    files = _onnx(spec, model, example, loaded.by_name, names, path)
    return Exported(fmt, files + extra, names, f"onnx ({spec.export.onnx_exporter})")


def _config_json(loaded: Loaded, workdir: Path) -> list[Path]:
    """A transformers model's config.json (overrides applied): the eager handler builds the model from it."""
    config = loaded.source.config if loaded.source else None
    if config is None:
        return []
    config.to_json_file(str(workdir / "config.json"))
    return [workdir / "config.json"]


def _torchscript(spec: Spec, model: Any, example: dict[str, Any], by_name: bool, path: Path) -> str:
    import torch

    method = spec.export.torchscript_method
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the tracer's warnings are noise here: parity is the judge
            unit = repro.fresh_jit_state()  # class names that do not depend on what this process built before
            if method == "trace" and by_name:
                module = torch.jit.trace(model, example_kwarg_inputs=example, strict=False, check_trace=False, _compilation_unit=unit)
            elif method == "trace":
                module = torch.jit.trace(model, tuple(example.values()), strict=False, check_trace=False, _compilation_unit=unit)
            else:
                module = torch.jit.script(model)
        torch.jit.save(module, str(path))
        repro.torchscript(path)  # no source paths: same bytes wherever the build runs
    except Exception as exc:
        raise ExportError(f"{spec.name}: torchscript {method} failed: {_first_line(exc)}") from None
    return f"torch.jit.{method}"


def _onnx(spec: Spec, model: Any, example: dict[str, Any], by_name: bool, names: list[str], path: Path) -> list[Path]:
    import logging

    import onnx
    import torch

    logging.getLogger("torch.onnx").setLevel(logging.ERROR)  # e.g. "torchvision is not installed" notices
    big = sum(p.numel() * p.element_size() for p in model.state_dict().values()) > TWO_GB
    kwargs: dict[str, Any] = dict(input_names=list(example), output_names=names)
    if spec.export.onnx_opset is not None:
        kwargs["opset_version"] = spec.export.onnx_opset
    # by keyword: the inputs go in as kwargs, in forward's order (ONNX names them so); else positionally
    args, kwargs["kwargs"] = ((), example) if by_name else (tuple(example.values()), None)
    repro.fresh_compiler_state()  # an export as if alone, whatever this process exported before
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if spec.export.onnx_exporter == "dynamo":
                shapes = inputs.export_dims(spec, list(example), by_name)
                torch.onnx.export(
                    model,
                    args,
                    str(path),
                    dynamo=True,
                    dynamic_shapes=shapes,
                    external_data=big,
                    optimize=True,
                    verbose=False,
                    **kwargs,
                )
            else:
                axes = {t.name: {i: d for i, d in enumerate(t.shape) if isinstance(d, str)} for t in spec.inputs}
                axes.update({n: {0: BATCH} for n in names})
                torch.onnx.export(model, args, str(path), dynamo=False, dynamic_axes=axes, **kwargs)
        onnx.checker.check_model(str(path), full_check=False)
        repro.onnx(path)  # no stack traces: same bytes wherever the build runs
    except Exception as exc:
        raise ExportError(f"{spec.name}: onnx export ({spec.export.onnx_exporter}) failed: {_first_line(exc)}") from None
    finally:
        repro.fresh_compiler_state()  # and leaves nothing cached for the eager runs and exports after it
    files = [path]
    files += sorted(p for p in path.parent.iterdir() if p.name.startswith(path.name) and p != path)
    return files


def _first_line(exc: Exception) -> str:
    # dynamo puts the useful part (the failing constraint or op) after a banner
    text = first_line(exc, None, prefer=("Constraints violated", "Unsupported", "not supported", "specialized", "guard"))
    return f"{type(exc).__name__}: {text}"[:400]
