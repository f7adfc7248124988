"""An archive's precision (``precision`` in marpipe.json; absent means fp32), as the handler serves it.

* fp16 / bf16: the weights and the compute are in that type; float inputs are cast to it on the way in (integer
  inputs such as token ids stay as they are) and the answers go back in float32 (`models.name_outputs`).
* int8: linear layers (and LSTM/GRU layers and cells) dynamically quantized to int8 by torch's ``quantize_dynamic``
  (per output channel for linear layers); CPU only. An eager archive holds the quantized model's state_dict, which
  ``torch.load(weights_only=True)`` reads (quantized tensors are plain data). Recurrent layers are the exception:
  torch keeps their quantized weights in TorchScript objects, which ``weights_only`` refuses, so the archive holds
  their float weights and they are quantized again at load, the way the build quantized them. marpipe's export
  stage quantizes with the same `quantize` the handler uses: the build and the server cannot differ in how.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from typing import Any

HALF = {"fp16": "float16", "bf16": "bfloat16"}
FLOATS = ("float32", "float64", "float16", "bfloat16")
RECURRENT = ("LSTM", "GRU", "LSTMCell", "GRUCell", "RNNCell")  # what quantize_dynamic quantizes besides nn.Linear


def of(meta: dict) -> str:
    return meta.get("precision") or "fp32"


def input_dtype(meta: dict, declared: str) -> str:
    """The dtype an input is cast to before the model: a float input into an fp16/bf16 archive's type."""
    half = HALF.get(of(meta))
    return half if half and declared in FLOATS else declared


def compute_dtype(meta: dict) -> Any:
    """The torch dtype of an fp16/bf16 archive's weights; None for the others."""
    import torch

    half = HALF.get(of(meta))
    return getattr(torch, half) if half else None


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """torch warns on every quantized tensor it creates (torch.ao's quantized tensors are deprecated upstream) and
    on the storages weights_only rebuilds them from: noise in a server's log, said once in docs/formats.md."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*(quantiz|TypedStorage).*")
        yield


def quantize(model: Any) -> Any:
    """`model` with its linear and recurrent layers dynamically quantized to int8, in place: linear layers per
    output channel (agreement with fp32 measured higher than per tensor at the same speed: docs/formats.md)."""
    import torch
    from torch.ao.quantization import default_dynamic_qconfig, per_channel_dynamic_qconfig, quantize_dynamic

    spec = {torch.nn.Linear: per_channel_dynamic_qconfig, **{getattr(torch.nn, n): default_dynamic_qconfig for n in RECURRENT}}
    with quiet():
        return quantize_dynamic(model, spec, dtype=torch.qint8, inplace=True)


def _recurrent(model: Any) -> list[str]:
    import torch

    kinds = tuple(getattr(torch.nn, n) for n in RECURRENT)
    return [name for name, module in model.named_modules() if isinstance(module, kinds)]


def _under(key: str, prefixes: list[str]) -> bool:
    return any(key.startswith(p + ".") for p in prefixes)


def _subset(state: Any, keep: Any, more: Any = None) -> Any:
    """The entries of `state` whose key `keep` accepts (and `more`'s), with its `_metadata`: the module versions
    torch's quantized modules read their state by (without them, they expect an older layout)."""
    from collections import OrderedDict

    out = OrderedDict((k, v) for k, v in state.items() if keep(k))
    out.update(more or {})
    out._metadata = getattr(state, "_metadata", OrderedDict())  # type: ignore[attr-defined]
    return out


def int8_state(quantized: Any, original: Any) -> dict[str, Any]:
    """What an int8 eager archive stores: the quantized model's state_dict, with the float weights of `original`
    for its recurrent layers."""
    recurrent = _recurrent(original)
    floats = {k: v for k, v in original.state_dict().items() if _under(k, recurrent)}
    return _subset(quantized.state_dict(), lambda k: not _under(k, recurrent), floats)


def load_int8(model: Any, state: dict[str, Any], load_weights: Any) -> Any:
    """An int8 eager archive's model: `model` (constructed with its parameters on the meta device) gets stand-in
    float weights that cost no memory, its recurrent layers' float weights from `state`, is quantized as the build
    quantized it, and then loads the int8 weights. `load_weights`: architectures.load_weights (tied keys)."""
    import torch

    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is not None and p.is_meta:  # zeros of stride 0: one element whatever the shape
                module._parameters[name] = torch.nn.Parameter(torch.zeros((), dtype=p.dtype).expand(p.shape), requires_grad=False)
    recurrent = _recurrent(model)
    floats = _subset(state, lambda k: _under(k, recurrent))
    result = model.load_state_dict(floats, strict=False, assign=True)
    if result.unexpected_keys:
        raise RuntimeError(f"int8 weights: unexpected keys {sorted(result.unexpected_keys)[:5]}")
    quantized = quantize(model)
    # the recurrent layers' int8 form was made from `floats` just now: they load their own state back
    made = {k: v for k, v in quantized.state_dict().items() if _under(k, recurrent)}
    with quiet():
        missing, unexpected = load_weights(quantized, _subset(state, lambda k: k not in floats, made), strict=False, assign=True)
    if missing or unexpected:
        raise RuntimeError(f"int8 weights: missing keys {missing[:5]}, unexpected keys {unexpected[:5]}")
    return quantized
