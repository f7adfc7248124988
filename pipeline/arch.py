"""Importing the architecture named by the spec and constructing it with its kwargs."""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

from pipeline.errors import SpecError
from pipeline.spec import Spec


def import_file(file: Path, module_name: str) -> ModuleType:
    """Import a Python source file under `module_name`, with its folder importable for sibling modules."""
    spec = importlib.util.spec_from_file_location(module_name, file)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import {file}")
    module = importlib.util.module_from_spec(spec)
    folder = str(file.parent)
    sys.path.insert(0, folder)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(module_name, None)
        raise
    finally:
        sys.path.remove(folder)
    return module


def module_name(file: Path) -> str:
    """`marpipe_arch_<first 12 hex of the source's sha256>`: the name is recorded inside TorchScript and ONNX
    artifacts, so it must not vary between processes (Python's string hash does) nor with where the file lies."""
    return f"marpipe_arch_{hashlib.sha256(file.read_bytes()).hexdigest()[:12]}"


def model_class(spec: Spec) -> type:
    """The spec's nn.Module subclass, imported from architecture.file; SpecError naming the field otherwise."""
    import torch

    arch = spec.architecture
    where = f"{spec.source}: architecture"
    try:
        module = import_file(arch.file, module_name(arch.file))
    except Exception as exc:
        raise SpecError(f"{where}.file: importing {arch.file.name} failed: {type(exc).__name__}: {exc}") from None
    cls = getattr(module, arch.class_name, None)
    if cls is None:
        raise SpecError(f"{where}.class: {arch.class_name!r} not defined in {arch.file.name}")
    if not (isinstance(cls, type) and issubclass(cls, torch.nn.Module)):
        raise SpecError(f"{where}.class: {arch.class_name!r} is not a torch.nn.Module subclass")
    try:
        inspect.signature(cls).bind(**arch.kwargs)
    except TypeError as exc:
        raise SpecError(f"{where}.kwargs: {arch.class_name}() rejects them: {exc}") from None
    except ValueError:
        pass  # no introspectable signature: constructing will tell
    return cls


def construct(spec: Spec, cls: type, device: str) -> Any:
    """Build the model with its kwargs on `device` ("meta" costs no memory)."""
    import torch

    try:
        with torch.device(device):
            return cls(**spec.architecture.kwargs)
    except Exception as exc:
        raise SpecError(
            f"{spec.source}: architecture.kwargs: {spec.architecture.class_name}(**kwargs) failed: {type(exc).__name__}: {exc}"
        ) from None
