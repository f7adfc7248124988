"""Request forms in, answers out.

A request (TorchServe's row: the body, multipart parts or query parameters by name, with their content types)
becomes a `Request`: the named arrays to run, and how to answer. Forms, by what the request says it is:

* a user ``decode`` hook, when the archive has one: it reads every body;
* ``image/*`` (or a body whose bytes are an image, with no content type): one row of the one image input;
* ``text/plain``: the text of a text model, one row;
* ``multipart/form-data``: a part per input, named after it (images as files, ``text``, tensors as JSON or npz);
* ``application/x-npz`` (or a zip body): the named arrays;
* JSON: ``{"inputs": {...}}`` (tensors as nested lists, images as ``{"b64"}``, ``"text"``), KServe v1's rows
  ``{"instances": [...]}``, or the Open Inference Protocol v2 form ``{"inputs": [{"name", "shape", "datatype",
  "data"}]}``, also with the binary data extension (an ``Inference-Header-Content-Length`` header);
* no content type and not JSON, for a text model: the text (TorchServe's gRPC carries no content types).

Answers: npz when the request accepts ``application/x-npz``; v2 for v2 requests; ``{"predictions": [row, ...]}``
for v1 rows; the user's ``encode`` hook; otherwise ``{"outputs": {name: nested list, or labels with scores}}``.
``Accept: application/json; raw=true`` asks for raw tensors in JSON even where the archive answers with labels or
a hook.

A request that came over TorchServe's gRPC API has no HTTP headers at all (`via_grpc`); `service` answers it in
the form TorchServe's gRPC front end can send.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import images, labels, v2
from .bodies import NPZ, is_npz, parse_json_or_npz
from .contract import Contract
from .errors import BadRequest
from .npz import write_npz

JSON = "application/json"
OCTETS = "application/octet-stream"
MULTIPART = "multipart/form-data"
FORM = "application/x-www-form-urlencoded"
# TorchServe's frontend parses a form body into fields before the worker sees it: a JSON text with no '=' or '&'
# arrives as nothing at all, one with them as fields cut at those characters and URL-decoded ('+' a space), so
# the body cannot be read back. Fields named after the inputs (curl -d text=...) are read like multipart parts.
FORM_SENT = (
    f"the body came as an HTML form (Content-Type: {FORM}, what curl -d sends unless told otherwise), which "
    "TorchServe splits into form fields before the model sees it, so JSON or npz does not survive it: send the "
    f"header -H 'Content-Type: {JSON}' (an npz: -H 'Content-Type: application/x-npz' --data-binary @FILE)"
)


@dataclass
class Request:
    arrays: dict[str, np.ndarray]
    npz: bool = False  # answer with an .npz of the outputs
    raw: bool = False  # answer raw tensors in JSON, not labels or the encode hook
    v2: v2.Reply | None = None  # answer in the v2 form
    rows: bool = False  # KServe v1 rows: answer {"predictions": [row, ...]}


def header(context: Any, idx: int, name: str, part: str | None = None) -> str:
    """A request header, case-insensitively; or the content type TorchServe recorded for one part (or the body)."""
    try:
        headers = context.get_all_request_header(idx) or {}
    except Exception:
        headers = {}
    if part is not None:
        value = headers.get(part)
        return value.get(name, "") if isinstance(value, dict) and isinstance(value.get(name), str) else ""
    for key, value in headers.items():
        if key.lower() == name and isinstance(value, str):
            return value
    for value in headers.values():
        if isinstance(value, dict) and isinstance(value.get(name), str):
            return value[name]
    return ""


SEQUENCE_HEADERS = ("ts_request_sequence_id", "ts_request_sequence_start", "ts_request_sequence_end")


def via_grpc(context: Any, idx: int) -> bool:
    """True for a request that came over TorchServe's gRPC API: TorchServe hands the worker every HTTP header of
    an HTTP request (a body always comes with Content-Length), and none for gRPC, whose StreamPredictions2 adds
    only its sequence keys. Per-part content types are dicts, not headers."""
    try:
        headers = context.get_all_request_header(idx) or {}
    except Exception:
        return False
    return not any(isinstance(v, str) and k.lower() not in SEQUENCE_HEADERS for k, v in headers.items())


def model_infer_id(row: Any, context: Any, idx: int) -> str | None:
    """The id of a request TorchServe built from a gRPC ModelInfer (a JSON "body" with model_name), else None."""
    if not isinstance(row, dict) or set(row) != {"body"} or not via_grpc(context, idx):
        return None
    if "json" not in header(context, idx, "content-type", part="body"):
        return None
    try:
        payload = parse_json_or_npz(row["body"], JSON, "body")
    except BadRequest:
        return None
    if not isinstance(payload, dict) or "model_name" not in payload:
        return None
    return payload.get("id") if isinstance(payload.get("id"), str) else ""


def decode(row: dict[str, Any], context: Any, idx: int, contract: Contract) -> Request:
    """One request as a `Request`; a BadRequest (4xx) for anything malformed, whatever the bytes hold."""
    try:
        return _decode(row, context, idx, contract)
    except BadRequest:
        raise
    except RecursionError:
        raise BadRequest("the body is nested too deeply") from None
    except MemoryError:
        raise BadRequest("the body decodes to more than this worker can hold", 413) from None
    except Exception as exc:  # whatever else a hostile body provokes is still this request's own fault
        raise BadRequest(f"the request cannot be read ({type(exc).__name__}: {str(exc)[:200]})") from None


def _decode(row: dict[str, Any], context: Any, idx: int, contract: Contract) -> Request:
    accept = header(context, idx, "accept").lower()
    npz, raw = NPZ in accept, _raw(accept)
    body = row.get("body") if row.get("body") is not None else row.get("data")
    ctype = header(context, idx, "content-type").split(";")[0].strip().lower()
    hook = contract.hooks is not None and hasattr(contract.hooks, "decode")
    parts = {k: v for k, v in row.items() if k not in ("body", "data")} if body is None else {}
    if ctype == FORM and body is None and (hook or not parts or not set(parts) <= {*contract.names, "text"}):
        raise BadRequest(FORM_SENT)
    if hook:
        return Request(_hook_decode(contract, body, ctype), npz, raw)
    if body is None:
        if not parts:
            raise BadRequest("empty request body")
        types = {k: header(context, idx, "content-type", part=k) for k in parts}
        return Request(contract.from_parts(parts, types), npz, raw)
    if isinstance(body, (bytes, bytearray)):
        if ctype.startswith("image/") or (ctype in ("", "application/octet-stream") and images.sniff(body)):
            return Request(contract.from_image(body), npz, raw)
        if ctype.startswith("text/plain"):
            return Request(contract.from_texts(_text(body)), npz, raw)
    elif isinstance(body, str) and ctype.startswith("text/plain"):  # TorchServe decoded it already
        return Request(contract.from_texts(body), npz, raw)
    served = getattr(context, "model_name", None)
    grpc = via_grpc(context, idx)
    binary = header(context, idx, "inference-header-content-length")
    if binary and isinstance(body, (bytes, bytearray)):
        payload, blobs = v2.split_binary(body, binary)
        tensors, reply = v2.decode(payload, contract.meta, served, blobs)
        return Request(contract.check(tensors), False, True, reply)
    try:
        payload = parse_json_or_npz(body, ctype, "body")
    except BadRequest:
        if contract.text is not None and not ctype and isinstance(body, (bytes, bytearray)) and not is_npz(body, ctype):
            return Request(contract.from_texts(_text(body)), npz, raw)  # gRPC's plain text: no content type
        raise
    if is_npz(body, ctype):
        return Request(contract.check(payload), npz, raw)
    if v2.is_v2(payload):
        # over gRPC, BYTES come base64-encoded: TorchServe's ModelInfer and KServe's gRPC wrapper both write them so
        tensors, reply = v2.decode(payload, contract.meta, served, b64=grpc, grpc=grpc and "model_name" in payload)
        return Request(contract.check(tensors), False, True, reply)
    if isinstance(payload, dict) and "instances" in payload and "instances" not in contract.names:
        if contract.hooks is not None and hasattr(contract.hooks, "encode") and not raw:
            raise BadRequest('this archive answers through its encode hook, which answers whole requests, not rows: send {"inputs": ...}')
        return Request(contract.from_rows(payload), False, raw, rows=True)
    return Request(contract.from_json(payload, numeric_only(body, payload)), npz, raw)


def numeric_only(body: Any, payload: Any) -> bool:
    """True when a JSON body's only strings are the keys of its top two levels (so every value is a number, a
    boolean, null or a list of them: no string, no nested object): each string has two quotes. (A null becomes
    NaN in a conversion with the dtype given, which `Contract` checks for.)"""
    if not isinstance(body, (bytes, bytearray)) or not isinstance(payload, dict):
        return False
    keys = len(payload) + sum(len(v) for v in payload.values() if isinstance(v, dict))
    at = -1
    for _ in range(2 * keys + 1):  # the keys' own quotes and one more: memchr jumps, not a count over the body
        at = body.find(b'"', at + 1)
        if at < 0:
            return True
    return False


def _raw(accept: str) -> bool:
    """`Accept: application/json; raw=true`: the outputs as tensors, whatever labels or hooks the archive has."""
    return any(p.replace(" ", "") in ("raw=true", "raw=1") for media in accept.split(",") for p in media.split(";")[1:])


def _text(body: bytes) -> str:
    try:
        return bytes(body).decode("utf-8")
    except UnicodeDecodeError:
        raise BadRequest("a text/plain body must be UTF-8") from None


def _hook_decode(contract: Contract, body: Any, ctype: str) -> dict[str, np.ndarray]:
    if body is None:
        raise BadRequest("empty request body")
    if isinstance(body, (dict, list)):  # TorchServe decoded JSON: hand the hook bytes, as it was sent
        body = json.dumps(body).encode()
    elif isinstance(body, str):
        body = body.encode("utf-8")
    try:
        arrays = contract.hooks.decode(bytes(body), ctype)
    except BadRequest:
        raise
    except Exception as exc:
        raise BadRequest(f"decode hook: {type(exc).__name__}: {str(exc)[:300]}") from None
    if not isinstance(arrays, dict):
        raise BadRequest(f"decode hook returned a {type(arrays).__name__}, not a dict of arrays")
    return contract.check(arrays)


def encode(outputs: dict[str, np.ndarray], request: Request, contract: Contract) -> tuple[bytes | str, str]:
    """The answer's body and content type. Exceptions here (a user encode hook's) are the caller's 500."""
    if request.v2 is not None:
        doc, blobs = v2.encode(outputs, request.v2)
        if not blobs:
            return dumps(doc), JSON
        head = dumps(doc).encode()
        request.v2.header_length = len(head)
        return b"".join([head, *blobs]), OCTETS
    if request.rows:
        return dumps({"predictions": rows(outputs, request, contract)}), JSON
    if request.npz:
        return write_npz(outputs), NPZ
    if contract.hooks is not None and hasattr(contract.hooks, "encode") and not request.raw:
        return dumps(contract.hooks.encode(outputs)), JSON
    doc = {}
    for name, value in outputs.items():
        spec = contract.labels.get(name)
        doc[name] = labels.scored(value, spec) if spec and not request.raw else value.tolist()
    return dumps({"outputs": doc}), JSON


def rows(outputs: dict[str, np.ndarray], request: Request, contract: Contract) -> list:
    """KServe v1's predictions: one per row; the output's value for a one-output model, else {name: value}."""
    cols = {}
    for name, value in outputs.items():
        spec = contract.labels.get(name)
        cols[name] = labels.scored(value, spec) if spec and not request.raw else value.tolist()
    count = len(next(iter(cols.values()))) if cols else 0
    if len(cols) == 1:
        return next(iter(cols.values()))
    return [{name: col[i] for name, col in cols.items()} for i in range(count)]


def dumps(doc: Any) -> str:
    return json.dumps(doc)  # ASCII (ensure_ascii): its length is its size in bytes


def oversize(body: bytes | str, outputs: dict[str, np.ndarray], request: Request, contract: Contract) -> str | None:
    """Why an answer is too large to send, or None. TorchServe's frontend refuses any answer over its
    `max_response_size` (each answer of a batch on its own: their sum may be larger) by killing the worker, and
    every request of the batch gets a 500; the archive's limit (`serve.max_response_mb`) is the server's."""
    size = len(body) if isinstance(body, (bytes, bytearray)) or body.isascii() else len(body.encode("utf-8"))
    limit = contract.max_response
    if size <= limit:
        return None
    rows = len(next(iter(outputs.values()))) if outputs else 0
    fewer = f"fewer rows (this request has {rows}; about {rows * limit // size} fit)" if rows * limit // size else "fewer rows"
    ways = [fewer]
    if not request.npz and request.v2 is None:
        npz = sum(v.nbytes + 200 for v in outputs.values())  # the raw values and each entry's zip and npy headers
        ways.append(f"the answer as an npz (Accept: {NPZ}; about {npz:,} bytes)")
    if len(outputs) > 1:
        ways.append('only the outputs you need (the v2 form\'s "outputs" list)')
    return (
        f"the answer is {size:,} bytes, over the {limit:,} this server sends (serve.max_response_mb: {limit / 1e6:g}); "
        f"ask for {', or '.join(ways)}"
    )
