"""Building an archive's architecture from ``marpipe.json`` and loading weights into it (marpipe's load stage
uses the same functions, so a build and the server construct and load a model alike).

Three sources, as ``architecture.source`` records them:

* ``file``         — a Python file shipped in the archive, and the class it defines, called with ``kwargs``;
* ``factory``      — ``package.module:name``, a class or function imported from the installed packages (or
  from the archive's extra files, which TorchServe puts on ``sys.path``), called with ``kwargs``;
* ``transformers`` — a Hugging Face class built from the archive's ``config.json`` (never downloaded), with
  an attention implementation that traces. transformers is imported only here, only for eager archives.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import sys
from collections.abc import Callable, Iterator
from typing import Any

ATTN_IMPLEMENTATION = "eager"  # plain matmuls: TorchScript traces them and the ONNX exporters export them


def import_file(model_dir: str, file: str) -> Any:
    """The archive's architecture source as a module, with the model folder importable for its siblings."""
    path = os.path.join(model_dir, file)
    name = os.path.splitext(file)[0]
    if model_dir not in sys.path:
        sys.path.insert(0, model_dir)  # sibling modules shipped as extra files
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def import_factory(ref: str) -> Any:
    """`package.module:name` (name may be dotted: `module:Class.create`) → the object it names."""
    module_name, _, attrs = ref.partition(":")
    obj: Any = importlib.import_module(module_name)
    for attr in attrs.split("."):
        obj = getattr(obj, attr)
    return obj


@contextlib.contextmanager
def offline() -> Iterator[None]:
    """Hugging Face libraries never reach the network in here (they read HF_HUB_OFFLINE when imported, too)."""
    saved = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def transformers_config(folder: str, **overrides: Any) -> tuple[Any, dict[str, Any]]:
    """(config, the overrides that are no config attribute) from `folder`/config.json, read locally."""
    with offline():
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(folder, local_files_only=True, return_unused_kwargs=True, **overrides)


def transformers_class(name: str) -> Any:
    """A transformers class by name (an Auto* class too); None when transformers has no such class."""
    with offline():
        import transformers

        return getattr(transformers, name, None)


def transformers_model(class_name: str, config: Any, attn_implementation: str = ATTN_IMPLEMENTATION) -> Any:
    """The model built from its config (random weights; on the current default device)."""
    cls = transformers_class(class_name)
    with offline():
        if class_name.startswith("Auto"):  # AutoModelFor...: picks the class for config.model_type
            return cls.from_config(config, attn_implementation=attn_implementation)
        return cls._from_config(config, attn_implementation=attn_implementation)


def builder(model_dir: str, arch: dict) -> Callable[[], Any]:
    """A function that constructs the archive's model (on the current default device) from marpipe.json."""
    source = arch.get("source", "file")
    kwargs = arch.get("kwargs") or {}
    if source == "factory":
        make = import_factory(arch["factory"])
        return lambda: make(**kwargs)
    if source == "transformers":
        config, _ = transformers_config(model_dir)
        return lambda: transformers_model(arch["class"], config, arch.get("attn_implementation", ATTN_IMPLEMENTATION))
    cls = getattr(import_file(model_dir, arch["file"]), arch["class"])
    return lambda: cls(**kwargs)


@contextlib.contextmanager
def params_on_meta() -> Iterator[None]:
    """Construct with every parameter on the meta device but buffers real: non-persistent buffers (BERT's
    position_ids) get their values from the constructor while the weights, which the checkpoint replaces,
    cost no memory and no initialisation."""
    import torch

    original = torch.nn.Module.register_parameter

    def register(module: Any, name: str, param: Any) -> None:
        original(module, name, param)
        p = module._parameters.get(name)
        if p is not None and p.device.type != "meta":  # already meta: a tied parameter, keep it the same object
            module._parameters[name] = type(p)(p.to("meta"), requires_grad=p.requires_grad)

    torch.nn.Module.register_parameter = register
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = original


def has_non_persistent_buffers(model: Any, expected: dict[str, Any]) -> bool:
    return any(name not in expected for name, _ in model.named_buffers())


def tied_keys(model: Any, present: set[str]) -> dict[str, str]:
    """Keys absent from `present` that name the same tensor as a present key (tied weights, which
    save_pretrained and safetensors save once): {missing key: the present key it is tied to}."""
    groups: dict[int, list[str]] = {}
    for name, tensor in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]:
        groups.setdefault(id(tensor), []).append(name)
    out = {}
    for names in groups.values():
        have = [n for n in names if n in present]
        if have and len(have) < len(names):
            out.update({n: have[0] for n in names if n not in present})
    return out


def load_weights(model: Any, state: dict[str, Any], strict: bool = True, assign: bool = True) -> tuple[list[str], list[str]]:
    """load_state_dict that accepts exactly the tied keys as missing and ties them again afterwards.
    Returns (missing, unexpected) keys; with `strict`, any of them is a RuntimeError."""
    tied = tied_keys(model, set(state))
    result = model.load_state_dict(state, strict=False, assign=assign)
    missing = sorted(set(result.missing_keys) - set(tied))
    unexpected = sorted(result.unexpected_keys)
    if strict and (missing or unexpected):
        raise RuntimeError(f"load_state_dict: missing keys {missing[:5]}, unexpected keys {unexpected[:5]}")
    for key, source in tied.items():  # assign replaced the present tensor: point its twin at the new one
        _set_tensor(model, key, _get_tensor(model, source))
    tie = getattr(model, "tie_weights", None)
    if tied and callable(tie):
        tie()  # Hugging Face models know their own ties (and what else goes with them)
    return missing, unexpected


def _get_tensor(model: Any, name: str) -> Any:
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    return module._parameters[attr] if attr in module._parameters else module._buffers[attr]


def _set_tensor(model: Any, name: str, tensor: Any) -> None:
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    (module._parameters if attr in module._parameters else module._buffers)[attr] = tensor
