"""The Open Inference Protocol v2 (KServe v2, Triton's HTTP/REST JSON form), on /predictions/{name} and on
TorchServe's /v2/models/{name}/infer route.

Request:  ``{"id"?, "inputs": [{"name", "shape", "datatype", "data"}], "outputs"?: [{"name", "parameters"?}]}``
Answer:   ``{"model_name", "model_version", "id", "outputs": [{"name", "shape", "datatype", "data"}]}``
``data`` is flat in row-major order (nested lists are accepted too). Values then follow the same casting and
range rules as every other request form; the binary-tensor extension is not supported.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .errors import BadRequest

DATATYPES = {
    "BOOL": np.bool_,
    "UINT8": np.uint8,
    "UINT16": np.uint16,
    "UINT32": np.uint32,
    "UINT64": np.uint64,
    "INT8": np.int8,
    "INT16": np.int16,
    "INT32": np.int32,
    "INT64": np.int64,
    "FP16": np.float16,
    "FP32": np.float32,
    "FP64": np.float64,
}
NAMES = {np.dtype(v).str[1:]: k for k, v in DATATYPES.items()}
MAX_ELEMENTS = 1 << 28  # one input's declared element count; the body itself is far smaller (max_request_size)


@dataclass
class Reply:
    """What a v2 answer needs to know about its request."""

    id: Any = None
    outputs: list[str] | None = None  # the requested outputs, in order; None for all
    meta: dict = field(default_factory=dict)


def is_v2(payload: Any) -> bool:
    inputs = payload.get("inputs") if isinstance(payload, dict) else None
    return isinstance(inputs, list) and bool(inputs) and isinstance(inputs[0], dict) and "datatype" in inputs[0]


def decode(payload: dict, meta: dict) -> tuple[dict[str, Any], Reply]:
    """The request's tensors by name (numpy, in their declared v2 datatype; BYTES as a list of strings), and what
    the answer must hold. Everything malformed is a BadRequest."""
    unknown = sorted(set(payload) - {"id", "inputs", "outputs", "parameters"})
    if unknown:
        raise BadRequest(f"v2 request: unknown keys {unknown}")
    if payload.get("id") is not None and not isinstance(payload["id"], str):
        raise BadRequest("v2 request: id must be a string")
    tensors: dict[str, Any] = {}
    for i, item in enumerate(payload["inputs"]):
        where = f"v2 request: inputs[{i}]"
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise BadRequest(f"{where}: expected an object with name, shape, datatype and data")
        name = item["name"]
        if name in tensors:
            raise BadRequest(f"{where}: input {name!r} given twice")
        tensors[name] = _tensor(item, f"v2 input {name!r}")
    names = None
    if payload.get("outputs") is not None:
        items = payload["outputs"]
        if not isinstance(items, list) or not all(isinstance(o, dict) and isinstance(o.get("name"), str) for o in items):
            raise BadRequest('v2 request: outputs must be a list of {"name": ...}')
        known = [o["name"] for o in meta["outputs"]]
        names = [o["name"] for o in items]
        missing = [n for n in names if n not in known]
        if missing:
            raise BadRequest(f"v2 request: unknown outputs {missing}; this model answers {known}")
    return tensors, Reply(id=payload.get("id"), outputs=names, meta=meta)


def _tensor(item: dict, where: str) -> Any:
    datatype, shape, data = item.get("datatype"), item.get("shape"), item.get("data")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise BadRequest(f"{where}: shape must be a list of sizes, got {shape!r}")
    count = 1
    for d in shape:
        count *= d
    if count > MAX_ELEMENTS:
        raise BadRequest(f"{where}: shape {shape} declares {count} elements, more than any request may carry", 413)
    if not isinstance(data, list):
        raise BadRequest(f"{where}: data must be a list (the binary-tensor extension is not supported)")
    if datatype == "BYTES":
        flat = _flatten(data, where)
        if len(flat) != count or not all(isinstance(v, str) for v in flat):
            raise BadRequest(f"{where}: BYTES data must hold {count} strings for shape {shape}")
        return flat
    if datatype not in DATATYPES:
        raise BadRequest(f"{where}: datatype {datatype!r} is not one of {', '.join([*DATATYPES, 'BYTES'])}")
    try:
        values = np.asarray(data)
    except (ValueError, TypeError, RecursionError) as exc:
        raise BadRequest(f"{where}: data is not a list of numbers ({exc})") from None
    if values.dtype.kind not in "biuf" or values.size != count:
        what = "numbers" if values.dtype.kind not in "biuf" else f"{count} values for shape {shape}, got {values.size}"
        raise BadRequest(f"{where}: data must hold {what}")
    target = np.dtype(DATATYPES[datatype])
    if target.kind in "iub" and values.dtype.kind == "f":
        raise BadRequest(f"{where}: {datatype} data holds non-integer numbers")
    if target.kind in "iu" and values.size:
        info = np.iinfo(target)
        if values.min() < info.min or values.max() > info.max:
            raise BadRequest(f"{where}: values out of range for {datatype}")
    if target.kind == "b" and not np.isin(values, (0, 1)).all():
        raise BadRequest(f"{where}: BOOL data must be true/false or 0/1")
    return values.astype(target).reshape(shape)


def _flatten(data: list, where: str) -> list:
    out: list = []
    stack = [iter(data)]
    while stack:
        for value in stack[-1]:
            if isinstance(value, list):
                if len(stack) > 32:
                    raise BadRequest(f"{where}: data nested too deeply")
                stack.append(iter(value))
                break
            out.append(value)
        else:
            stack.pop()
    return out


def encode(outputs: dict[str, np.ndarray], reply: Reply) -> dict[str, Any]:
    names = reply.outputs or list(outputs)
    doc: dict[str, Any] = {"model_name": reply.meta.get("name"), "model_version": reply.meta.get("version")}
    if reply.id is not None:
        doc["id"] = reply.id
    doc["outputs"] = [
        {
            "name": n,
            "shape": list(outputs[n].shape),
            "datatype": NAMES.get(outputs[n].dtype.str[1:], "FP32"),
            "data": outputs[n].reshape(-1).tolist(),
        }
        for n in names
    ]
    return doc
