"""The architecture the spec names, resolved once: a class in a file, a factory from a package, or a Hugging
Face config. `model_class` imports it (errors name the spec field) into a `ModelSource`; `construct` builds it.

The imports made meanwhile are watched (`pipeline.sources.imports`): the third-party distributions the architecture
needs become the eager archive's requirements. The handler builds the same model from marpipe.json with the
same functions (`handlers.marpipe_serving.architectures`).
"""

from __future__ import annotations

import difflib
import hashlib
import importlib.util
import inspect
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

from handlers.marpipe_serving import architectures
from pipeline.errors import SpecError, first_line
from pipeline.sources.hf import transformers_source
from pipeline.sources.imports import ImportTracker
from pipeline.sources.source import ModelSource
from pipeline.spec.spec import Spec


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


def model_class(spec: Spec) -> ModelSource:
    """Import what the spec's architecture names; SpecError naming the field when that fails."""
    source = spec.architecture.source
    if source == "factory":
        return _factory(spec)
    if source == "transformers":
        return transformers_source(spec)
    return _file(spec)


def construct(spec: Spec, source: ModelSource, device: str, params_only: bool = False) -> Any:
    """Build the model on `device` ("meta" costs no memory); `params_only`: only its parameters on meta (its
    buffers real, for non-persistent ones)."""
    import torch

    label = spec.architecture.label
    try:
        with source.imports, architectures.params_on_meta() if params_only else torch.device(device):
            model = source.make()
    except Exception as exc:
        raise SpecError(f"{spec.source}: {source.field}: {label}(**kwargs) failed: {type(exc).__name__}: {first_line(exc)}") from None
    if not isinstance(model, torch.nn.Module):
        raise SpecError(f"{spec.source}: {source.field}: {label}(**kwargs) returned a {type(model).__name__}, not a torch.nn.Module")
    return model


def keyword_inputs(model: Any, names: list[str]) -> bool:
    """True when every declared input is a parameter of forward: the model is then called by keyword."""
    try:
        params = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):
        return False
    named = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return set(names) <= named


def forward_order(model: Any, names: list[str]) -> list[str]:
    """The declared input names in the order forward takes them (exporters number inputs that way)."""
    params = list(inspect.signature(model.forward).parameters)
    return sorted(names, key=params.index)


def _file(spec: Spec) -> ModelSource:
    arch = spec.architecture
    where = f"{spec.source}: architecture"
    tracker = ImportTracker()
    try:
        with tracker:
            module = import_file(arch.file, module_name(arch.file))
    except Exception as exc:
        raise SpecError(f"{where}.file: importing {arch.file.name} failed: {type(exc).__name__}: {exc}") from None
    cls = getattr(module, arch.class_name, None)
    if cls is None:
        raise SpecError(f"{where}.class: {arch.class_name!r} not defined in {arch.file.name}")
    if not (isinstance(cls, type) and _is_module_class(cls)):
        raise SpecError(f"{where}.class: {arch.class_name!r} is not a torch.nn.Module subclass")
    _bind(spec, cls, arch.class_name)
    return ModelSource(lambda: cls(**arch.kwargs), tracker, "architecture.kwargs")


def _factory(spec: Spec) -> ModelSource:
    ref = spec.architecture.factory
    where = f"{spec.source}: architecture.factory"
    module_name, _, attrs = ref.partition(":")
    tracker = ImportTracker(roots=(module_name,))
    try:
        with tracker:
            obj: Any = importlib.import_module(module_name)
    except Exception as exc:
        raise SpecError(
            f"{where}: cannot import {module_name} ({type(exc).__name__}: {first_line(exc)}); install it or fix the name"
        ) from None
    for attr in attrs.split("."):
        if not hasattr(obj, attr):
            hint = difflib.get_close_matches(attr, [n for n in dir(obj) if not n.startswith("_")], n=1)
            extra = f"; did you mean '{hint[0]}'?" if hint else ""
            raise SpecError(f"{where}: {getattr(obj, '__name__', module_name)} has no {attr!r}{extra}")
        obj = getattr(obj, attr)
    if not callable(obj):
        raise SpecError(f"{where}: {ref} is a {type(obj).__name__}, not a class or function")
    if isinstance(obj, type) and not _is_module_class(obj):
        raise SpecError(f"{where}: {ref} is a class but not a torch.nn.Module subclass")
    _bind(spec, obj, ref)
    kwargs = spec.architecture.kwargs
    return ModelSource(lambda: obj(**kwargs), tracker, "architecture.factory")


def _bind(spec: Spec, fn: Any, label: str) -> None:
    try:
        inspect.signature(fn).bind(**spec.architecture.kwargs)
    except TypeError as exc:
        raise SpecError(f"{spec.source}: architecture.kwargs: {label}() rejects them: {exc}") from None
    except ValueError:
        pass  # no introspectable signature: constructing will tell


def _is_module_class(cls: type) -> bool:
    import torch

    return issubclass(cls, torch.nn.Module)
