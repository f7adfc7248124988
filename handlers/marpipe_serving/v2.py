"""The Open Inference Protocol v2 (KServe v2, Triton's HTTP/REST form), on /predictions/{name} and on TorchServe's
/v2/models/{name}/infer route, and as TorchServe hands over its gRPC ``ModelInfer`` requests.

Request:  ``{"id"?, "model_name"?, "model_version"?, "parameters"?, "inputs": [{"name", "shape", "datatype",
"parameters"?, "data"}], "outputs"?: [{"name", "parameters"?}]}``
Answer:   ``{"model_name", "model_version", "id", "outputs": [{"name", "shape", "datatype", "data"}]}``
``data`` is flat in row-major order (nested lists are accepted too). Values then follow the same casting and
range rules as every other request form. The binary data extension: a body whose first
``Inference-Header-Content-Length`` bytes are the JSON, followed by the inputs that name their
``binary_data_size`` (in order; BYTES as 4-byte little-endian lengths, each followed by its bytes); outputs are
answered the same way where ``binary_data`` (per output) or ``binary_data_output`` (per request) asks.
"""

from __future__ import annotations

import base64
import binascii
import json
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
KEYS = {"id", "model_name", "model_version", "inputs", "outputs", "parameters"}
# TorchServe 0.12's ModelInfer copies only typed contents into the JSON it hands the worker: tensors sent as
# raw_input_contents (tritonclient.grpc's set_data_from_numpy, kserve's binary_data=True) arrive with no values
RAW_LOST = (
    "holds no values: TorchServe 0.12's gRPC ModelInfer drops binary tensors (raw_input_contents), so send the "
    "values as typed contents (InferTensorContents: fp32_contents, int64_contents, bytes_contents ...), or use HTTP"
)


@dataclass
class Reply:
    """What a v2 answer needs to know about its request."""

    id: Any = None
    outputs: list[str] | None = None  # the requested outputs, in order; None for all
    meta: dict = field(default_factory=dict)
    binary: set[str] = field(default_factory=set)  # outputs answered as binary data (HTTP)
    binary_all: bool = False  # binary_data_output: every output not asked otherwise
    grpc: bool = False  # TorchServe's ModelInfer: id always, FP16 as FP32, no binary outputs
    name: str | None = None  # the model name the server serves it under
    header_length: int | None = None  # set by `encode` when the answer carries binary outputs


def is_v2(payload: Any) -> bool:
    inputs = payload.get("inputs") if isinstance(payload, dict) else None
    return isinstance(inputs, list) and bool(inputs) and isinstance(inputs[0], dict) and "datatype" in inputs[0]


def split_binary(body: bytes, header_length: str) -> tuple[dict, memoryview]:
    """A binary-extension body as (its JSON header, the binary data after it)."""
    try:
        size = int(header_length)
    except ValueError:
        raise BadRequest(f"Inference-Header-Content-Length: {header_length[:40]!r} is not a number of bytes") from None
    if not 0 < size <= len(body):
        raise BadRequest(f"Inference-Header-Content-Length is {size}, but the body has {len(body)} bytes")
    try:
        payload = json.loads(bytes(body[:size]))
    except (UnicodeDecodeError, ValueError) as exc:
        raise BadRequest(f"the first {size} bytes (Inference-Header-Content-Length) are not valid JSON ({str(exc)[:200]})") from None
    if not isinstance(payload, dict) or not isinstance(payload.get("inputs"), list):
        raise BadRequest('a binary-extension body starts with the v2 JSON header {"inputs": [...]}')
    return payload, memoryview(body)[size:]


def decode(
    payload: dict, meta: dict, served: str | None = None, blobs: memoryview | None = None, b64: bool = False, grpc: bool = False
) -> tuple[dict[str, Any], Reply]:
    """The request's tensors by name (numpy, in their declared v2 datatype; BYTES as a list of strings), and what
    the answer must hold. `blobs`: the binary data after a binary-extension header; `b64`: BYTES come base64
    encoded (TorchServe's ModelInfer, KServe's gRPC wrapper); `grpc`: the request came over TorchServe's gRPC.
    Everything malformed is a BadRequest."""
    unknown = sorted(set(payload) - KEYS)
    if unknown:
        raise BadRequest(f"v2 request: unknown keys {unknown}; a v2 request has {sorted(KEYS)}")
    for key in ("id", "model_name", "model_version"):
        if payload.get(key) is not None and not isinstance(payload[key], str):
            raise BadRequest(f"v2 request: {key} must be a string")
    served = served or meta.get("name")
    if payload.get("model_name") and served and payload["model_name"] != served:
        raise BadRequest(f"v2 request: model_name {payload['model_name']!r}, but this is {served!r}")
    params = _params(payload, "v2 request")
    if "classification" in params:
        raise BadRequest("v2 request: the classification extension is not supported; labels come in the JSON answers")
    tensors: dict[str, Any] = {}
    offset = 0
    for i, item in enumerate(payload["inputs"]):
        where = f"v2 request: inputs[{i}]"
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise BadRequest(f"{where}: expected an object with name, shape, datatype and data")
        name = item["name"]
        if name in tensors:
            raise BadRequest(f"{where}: input {name!r} given twice")
        size = _params(item, f"v2 input {name!r}").get("binary_data_size")
        if size is not None:
            if blobs is None or not isinstance(size, int) or isinstance(size, bool) or size < 0 or offset + size > len(blobs):
                have = f"{len(blobs) - offset} bytes left" if blobs is not None else "no binary data (no Inference-Header-Content-Length)"
                raise BadRequest(f"v2 input {name!r}: binary_data_size {size!r}, but the body has {have}")
            tensors[name] = _binary(item, blobs[offset : offset + size], f"v2 input {name!r}")
            offset += size
        else:
            tensors[name] = _tensor(item, f"v2 input {name!r}", b64, grpc)
    if blobs is not None and offset != len(blobs):
        raise BadRequest(f"v2 request: {len(blobs) - offset} bytes of binary data after the inputs' binary_data_size")
    reply = Reply(id=payload.get("id"), meta=meta, grpc=grpc, name=served, binary_all=bool(params.get("binary_data_output")) and not grpc)
    if payload.get("outputs") is not None:
        items = payload["outputs"]
        if not isinstance(items, list) or not all(isinstance(o, dict) and isinstance(o.get("name"), str) for o in items):
            raise BadRequest('v2 request: outputs must be a list of {"name": ...}')
        known = [o["name"] for o in meta["outputs"]]
        reply.outputs = [o["name"] for o in items]
        missing = [n for n in reply.outputs if n not in known]
        if missing:
            raise BadRequest(f"v2 request: unknown outputs {missing}; this model answers {known}")
        for o in items:
            asked = _params(o, f"v2 output {o['name']!r}")
            if "classification" in asked:
                raise BadRequest("v2 request: the classification extension is not supported; labels come in the JSON answers")
            if asked.get("binary_data", reply.binary_all) and not grpc:
                reply.binary.add(o["name"])
        reply.binary_all = False
    return tensors, reply


def _params(item: dict, where: str) -> dict:
    params = item.get("parameters")
    if params is None:
        return {}
    if not isinstance(params, dict):
        raise BadRequest(f"{where}: parameters must be an object")
    return params


def _shape(item: dict, where: str) -> tuple[list[int], int]:
    shape = item.get("shape")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise BadRequest(f"{where}: shape must be a list of sizes, got {shape!r}")
    count = 1
    for d in shape:
        count *= d
    if count > MAX_ELEMENTS:
        raise BadRequest(f"{where}: shape {shape} declares {count} elements, more than any request may carry", 413)
    return shape, count


def _binary(item: dict, data: memoryview, where: str) -> Any:
    """A tensor from its binary data: little-endian values in row-major order; BYTES length-prefixed."""
    shape, count = _shape(item, where)
    datatype = item.get("datatype")
    if datatype == "BYTES":
        out, at = [], 0
        while at < len(data):
            if at + 4 > len(data):
                raise BadRequest(f"{where}: BYTES binary data ends inside an element's 4-byte length")
            n = int.from_bytes(data[at : at + 4], "little")
            if at + 4 + n > len(data):
                raise BadRequest(f"{where}: a BYTES element of {n} bytes runs past the tensor's binary_data_size")
            out.append(_utf8(bytes(data[at + 4 : at + 4 + n]), where))
            at += 4 + n
        if len(out) != count:
            raise BadRequest(f"{where}: BYTES binary data holds {len(out)} elements, shape {shape} needs {count}")
        return out
    if datatype not in DATATYPES:
        raise BadRequest(f"{where}: datatype {datatype!r} is not one of {', '.join([*DATATYPES, 'BYTES'])}")
    dtype = np.dtype(DATATYPES[datatype]).newbyteorder("<")
    if len(data) != count * dtype.itemsize:
        raise BadRequest(f"{where}: {len(data)} bytes of binary data, shape {shape} of {datatype} needs {count * dtype.itemsize}")
    values = np.frombuffer(data, dtype).reshape(shape)
    if datatype == "BOOL" and values.size and values.view(np.uint8).max() > 1:
        raise BadRequest(f"{where}: BOOL binary data must be bytes 0 or 1")
    return values.astype(values.dtype.newbyteorder("="), copy=False)


def _utf8(data: bytes, where: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise BadRequest(f"{where}: BYTES elements must be UTF-8 text") from None


def _tensor(item: dict, where: str, b64: bool = False, grpc: bool = False) -> Any:
    datatype, data = item.get("datatype"), item.get("data")
    shape, count = _shape(item, where)
    if not isinstance(data, list):
        hint = " (FP16 is not carried by TorchServe 0.12's gRPC ModelInfer: send FP32)" if grpc and datatype == "FP16" else ""
        raise BadRequest(f"{where}: data must be a list, or binary data (binary_data_size){hint}")
    if grpc and count and not data:
        raise BadRequest(f"{where}: shape {shape} {RAW_LOST}")
    if datatype == "BYTES":
        flat = _flatten(data, where)
        if len(flat) != count or not all(isinstance(v, str) for v in flat):
            raise BadRequest(f"{where}: BYTES data must hold {count} strings for shape {shape}, got {len(flat)}")
        if b64:
            try:
                flat = [_utf8(base64.b64decode(v, validate=True), where) for v in flat]
            except (binascii.Error, ValueError):
                raise BadRequest(f"{where}: BYTES over gRPC arrive base64-encoded, and these are not") from None
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


def encode(outputs: dict[str, np.ndarray], reply: Reply) -> tuple[dict[str, Any], list[bytes]]:
    """The answer's JSON and, for outputs answered as binary data, their bytes in order (after the JSON)."""
    names = reply.outputs or list(outputs)
    doc: dict[str, Any] = {"model_name": reply.name or reply.meta.get("name"), "model_version": str(reply.meta.get("version") or "")}
    if reply.id is not None or reply.grpc:  # TorchServe's ModelInfer reads id as a string, always
        doc["id"] = reply.id or ""
    doc["outputs"], blobs = [], []
    for n in names:
        value = outputs[n]
        if reply.grpc and value.dtype == np.float16:  # TorchServe 0.12's ModelInfer has no FP16 contents
            value = value.astype(np.float32)
        out = {"name": n, "shape": list(value.shape), "datatype": NAMES.get(value.dtype.str[1:], "FP32")}
        if n in reply.binary or (reply.binary_all and reply.outputs is None):
            blob = np.ascontiguousarray(value, value.dtype.newbyteorder("<")).tobytes()
            out["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            out["data"] = value.reshape(-1).tolist()
        doc["outputs"].append(out)
    return doc, blobs


def error_answer(message: str, rid: Any, meta: dict, served: str | None) -> dict[str, Any]:
    """What a ModelInfer request that fails inside a batch gets (TorchServe answers a batch's requests with status
    OK and cannot fail one alone): no model outputs, one BYTES output named ``error`` holding the message."""
    return {
        "model_name": served or meta.get("name"),
        "model_version": str(meta.get("version") or ""),
        "id": rid if isinstance(rid, str) else "",
        "outputs": [{"name": "error", "shape": [1], "datatype": "BYTES", "data": [message]}],
    }
