"""The public gRPC port of `marpipe serve`: a small front that forwards to TorchServe's gRPC on a private loopback port.

TorchServe 0.12 serves the Open Inference Protocol under its own package name
(`org.pytorch.serve.grpc.openinference.GRPCInferenceService`), so clients built for the standard
`inference.GRPCInferenceService` (tritonclient.grpc, kserve.InferenceGRPCClient) get UNIMPLEMENTED from it; and it
drops `raw_input_contents`, the form tritonclient sends tensors in by default. The front serves the standard name,
forwarding each message's bytes as they are (the messages are wire-compatible), except a `ModelInfer` with raw
tensors: those move into the typed `contents` of their inputs first. It also forwards TorchServe's own
`InferenceAPIsService` but refuses `StreamPredictions2`, which can leave a worker dead behind READY. Metadata (the
`authorization` token) and deadlines go along; TorchServe's status codes come back as they are.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from concurrent import futures
from typing import Any

import grpc
import numpy as np

from pipeline.errors import PackageError

OIP = "inference.GRPCInferenceService"
OIP_TORCHSERVE = "org.pytorch.serve.grpc.openinference.GRPCInferenceService"
OIP_METHODS = ("ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata", "ModelInfer")
TS_INFERENCE = "org.pytorch.serve.grpc.inference.InferenceAPIsService"
STREAM2 = (
    "StreamPredictions2 needs sequence batching, which marpipe archives do not use; TorchServe 0.12 can lose a worker on it "
    "(docs/requests.md#grpc-streams): send Predictions or StreamPredictions"
)

# datatype → (field of InferTensorContents, numpy type of the raw bytes, packed as varints or as fixed-width)
TYPED = {
    "BOOL": (1, "?", "varint"),
    "INT8": (2, "<i1", "varint"),
    "INT16": (2, "<i2", "varint"),
    "INT32": (2, "<i4", "varint"),
    "INT64": (3, "<i8", "varint"),
    "UINT8": (4, "<u1", "varint"),
    "UINT16": (4, "<u2", "varint"),
    "UINT32": (4, "<u4", "varint"),
    "UINT64": (5, "<u8", "varint"),
    "FP32": (6, "<f4", "fixed"),
    "FP64": (7, "<f8", "fixed"),
}
BYTES_FIELD = 8


class Invalid(ValueError):
    """A request the front refuses with INVALID_ARGUMENT; the message says why."""


# --- the protobuf wire format, as far as ModelInferRequest needs it


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise Invalid("ModelInferRequest: not a valid protobuf message (a varint runs past its end)")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _varint(value: int) -> bytes:
    value &= 0xFFFFFFFFFFFFFFFF  # negative ints are sign-extended to 64 bits, as protobuf writes them
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _fields(data: bytes) -> Iterator[tuple[int, int, bytes, Any]]:
    """Each field of a message: (number, wire type, the field's own bytes, its value: an int or the payload)."""
    pos = 0
    while pos < len(data):
        start = pos
        key, pos = _read_varint(data, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _read_varint(data, pos)
        elif wire == 1 or wire == 5:
            size = 8 if wire == 1 else 4
            value, pos = data[pos : pos + size], pos + size
        elif wire == 2:
            size, pos = _read_varint(data, pos)
            value, pos = data[pos : pos + size], pos + size
        else:
            raise Invalid(f"ModelInferRequest: not a valid protobuf message (wire type {wire})")
        if pos > len(data):
            raise Invalid("ModelInferRequest: not a valid protobuf message (a field runs past its end)")
        yield number, wire, data[start:pos], value


def _field(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _typed_contents(name: str, datatype: str, shape: list[int], raw: bytes) -> bytes:
    """The InferTensorContents message holding one input's raw tensor bytes in its typed field."""
    count = int(np.prod(shape, dtype=np.int64)) if shape else 1
    if datatype == "BYTES":
        items, pos = [], 0
        while pos < len(raw):
            if pos + 4 > len(raw):
                raise Invalid(f"input {name!r}: BYTES raw contents end inside a length prefix")
            (size,) = struct.unpack_from("<I", raw, pos)
            if pos + 4 + size > len(raw):
                at = f"{size} bytes at {pos + 4} of {len(raw)}"
                raise Invalid(f"input {name!r}: BYTES element {len(items)} runs past the raw contents ({at})")
            items.append(raw[pos + 4 : pos + 4 + size])
            pos += 4 + size
        if pos != len(raw) or len(items) != count:
            raise Invalid(f"input {name!r}: BYTES raw contents hold {len(items)} elements, shape {shape} needs {count}")
        return b"".join(_field(BYTES_FIELD, item) for item in items)
    if datatype not in TYPED:
        hint = "; send FP32 (or the typed contents of a type TorchServe carries)" if datatype == "FP16" else ""
        raise Invalid(f"input {name!r}: datatype {datatype} has no typed contents field TorchServe can carry{hint}")
    number, dtype, packing = TYPED[datatype]
    width = np.dtype(dtype).itemsize
    if len(raw) != count * width:
        raise Invalid(f"input {name!r}: {len(raw)} bytes of raw contents, shape {shape} of {datatype} needs {count * width}")
    values = np.frombuffer(raw, dtype=dtype)
    if packing == "fixed":
        payload = values.astype(dtype).tobytes()
    else:
        payload = b"".join(_varint(int(v)) for v in values.tolist())
    return _field(number, payload) if payload else b""


def _input_shape_and_type(tensor: bytes) -> tuple[str, str, list[int], bool]:
    name = datatype = ""
    shape: list[int] = []
    has_contents = False
    for number, wire, _, value in _fields(tensor):
        if number == 1 and wire == 2:
            name = value.decode("utf-8", "replace")
        elif number == 2 and wire == 2:
            datatype = value.decode("utf-8", "replace")
        elif number == 3 and wire == 0:
            shape.append(value)
        elif number == 3 and wire == 2:
            pos = 0
            while pos < len(value):
                dim, pos = _read_varint(value, pos)
                shape.append(dim)
        elif number == 5 and wire == 2 and value:
            has_contents = True
    return name, datatype, shape, has_contents


def typed_request(request: bytes) -> bytes:
    """A ModelInferRequest with its `raw_input_contents` moved into its inputs' typed `contents` (unchanged without)."""
    fields = list(_fields(request))
    raws = [value for number, wire, _, value in fields if number == 7 and wire == 2]
    if not raws:
        return request
    inputs = [value for number, wire, _, value in fields if number == 5 and wire == 2]
    if len(raws) != len(inputs):
        raise Invalid(f"ModelInferRequest: {len(raws)} raw_input_contents for {len(inputs)} inputs; send one for each input")
    out, index = [], 0
    for number, wire, whole, value in fields:
        if number == 7:
            continue
        if number != 5 or wire != 2:
            out.append(whole)
            continue
        name, datatype, shape, has_contents = _input_shape_and_type(value)
        if has_contents:
            raise Invalid(f"input {name!r}: both contents and raw_input_contents; send one of them")
        kept = b"".join(whole_f for n, _, whole_f, _ in _fields(value) if n != 5)
        contents = _typed_contents(name, datatype, shape, raws[index])
        out.append(_field(5, kept + _field(5, contents)))
        index += 1
    return b"".join(out)


def _raw_tensor(datatype: str, contents: bytes) -> bytes | None:
    """One output's typed contents as raw tensor bytes (None for a datatype that has no raw form here)."""
    if datatype == "BYTES":
        items = [value for number, wire, _, value in _fields(contents) if number == BYTES_FIELD and wire == 2]
        return b"".join(struct.pack("<I", len(item)) + item for item in items)
    if datatype not in TYPED:
        return None
    field, dtype, packing = TYPED[datatype]
    chunks: list[bytes] = []
    ints: list[int] = []
    for number, wire, _, value in _fields(contents):
        if number != field:
            continue
        if packing == "fixed":
            chunks.append(value)  # packed (wire 2) or one element (wire 1 or 5): little-endian either way
        elif wire == 0:
            ints.append(value)
        elif wire == 2:
            pos = 0
            while pos < len(value):
                item, pos = _read_varint(value, pos)
                ints.append(item)
    if packing == "fixed":
        return b"".join(chunks)
    return np.array(ints, dtype=np.uint64).view(np.int64).astype(dtype).tobytes()


def raw_answer(response: bytes) -> bytes:
    """A ModelInferResponse with its outputs' typed `contents` moved into `raw_output_contents`, as Triton answers and
    tritonclient reads (it reads no typed contents but BYTES); unchanged where an output has no raw form here."""
    fields = list(_fields(response))
    if any(number == 6 for number, *_ in fields):
        return response
    out, raws = [], []
    for number, wire, whole, value in fields:
        if number != 5 or wire != 2:
            out.append(whole)
            continue
        datatype, contents, kept = "", b"", []
        for n, w, whole_f, v in _fields(value):
            if n == 5 and w == 2:
                contents = v
                continue
            if n == 2 and w == 2:
                datatype = v.decode("utf-8", "replace")
            kept.append(whole_f)
        raw = _raw_tensor(datatype, contents)
        if raw is None:
            return response
        raws.append(raw)
        out.append(_field(5, b"".join(kept)))
    return b"".join(out) + b"".join(_field(6, raw) for raw in raws)


# --- the front


def _metadata(context: grpc.ServicerContext) -> list[tuple[str, Any]]:
    return [(m.key, m.value) for m in context.invocation_metadata() if m.key != "user-agent" and not m.key.startswith(("grpc-", ":"))]


def _timeout(context: grpc.ServicerContext) -> float | None:
    """The client's deadline as a timeout for TorchServe's call; None for none (grpcio then says ~2**63 seconds, which
    as a timeout would overflow into a deadline already past)."""
    left = context.time_remaining()
    return None if left is None or left > 1e8 else left


class Front(grpc.GenericRpcHandler):
    """Every method of the public port: forwarded, converted, or refused."""

    def __init__(self, channel: grpc.Channel) -> None:
        self.channel = channel

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        service, _, method = details.method.lstrip("/").rpartition("/")
        if service == OIP and method in OIP_METHODS:
            upstream = self.channel.unary_unary(f"/{OIP_TORCHSERVE}/{method}")
            if method == "ModelInfer":
                return grpc.unary_unary_rpc_method_handler(lambda req, ctx: self._infer(upstream, req, ctx))
            return grpc.unary_unary_rpc_method_handler(lambda req, ctx: self._unary(upstream, req, ctx))
        if service == TS_INFERENCE and method in ("Ping", "Predictions"):
            upstream = self.channel.unary_unary(details.method)
            return grpc.unary_unary_rpc_method_handler(lambda req, ctx: self._unary(upstream, req, ctx))
        if service == TS_INFERENCE and method == "StreamPredictions":
            streaming = self.channel.unary_stream(details.method)
            return grpc.unary_stream_rpc_method_handler(lambda req, ctx: self._stream(streaming, req, ctx))
        if service == TS_INFERENCE and method == "StreamPredictions2":
            return grpc.stream_stream_rpc_method_handler(lambda reqs, ctx: ctx.abort(grpc.StatusCode.UNIMPLEMENTED, STREAM2))
        said = (
            f"{details.method}: TorchServe 0.12 cannot answer it; this port serves {OIP} ({', '.join(OIP_METHODS)}) and "
            f"{TS_INFERENCE} (Ping, Predictions, StreamPredictions); management is on TorchServe's loopback port"
        )
        return grpc.stream_stream_rpc_method_handler(lambda reqs, ctx: ctx.abort(grpc.StatusCode.UNIMPLEMENTED, said))

    @classmethod
    def _infer(cls, upstream: grpc.UnaryUnaryMultiCallable, request: bytes, context: grpc.ServicerContext) -> bytes:
        """ModelInfer: raw tensors in, raw tensors out (as Triton does); typed contents in, typed contents out."""
        try:
            typed = typed_request(request)
        except Invalid as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        answer = cls._unary(upstream, typed, context)
        return answer if typed is request else raw_answer(answer)

    @staticmethod
    def _unary(upstream: grpc.UnaryUnaryMultiCallable, request: bytes, context: grpc.ServicerContext) -> bytes:
        call = upstream.future(request, metadata=_metadata(context), timeout=_timeout(context))
        context.add_callback(call.cancel)  # the client gone: TorchServe's call too
        try:
            return call.result()
        except grpc.RpcError as exc:
            context.abort(exc.code(), exc.details() or "")
        except grpc.FutureCancelledError:
            context.abort(grpc.StatusCode.CANCELLED, "cancelled")

    @staticmethod
    def _stream(upstream: grpc.UnaryStreamMultiCallable, request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        call = upstream(request, metadata=_metadata(context), timeout=_timeout(context))
        context.add_callback(call.cancel)
        try:
            yield from call
        except grpc.RpcError as exc:
            context.abort(exc.code(), exc.details() or "")


def start_front(host: str, upstream: str, max_message: int, workers: int = 64) -> tuple[grpc.Server, int]:
    """Listen on `host` (a free port) and forward to TorchServe's gRPC inference API at `upstream` (host:port);
    returns the running server and its port. `max_message`: the largest message either way (TorchServe's
    max_request_size / max_response_size)."""
    sizes = [("grpc.max_receive_message_length", max_message), ("grpc.max_send_message_length", max_message)]
    channel = grpc.insecure_channel(upstream, options=sizes)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="grpc-front"), options=sizes)
    server.add_generic_rpc_handlers((Front(channel),))
    at = f"[{host}]" if ":" in host else host
    try:
        port = server.add_insecure_port(f"{at}:0")
    except RuntimeError as exc:
        port, cause = 0, exc
    else:
        cause = None
    if not port:
        channel.close()
        raise PackageError(f"gRPC: cannot listen on {host} ({cause or 'bind failed'}); pass another --host")
    server.start()
    return server, port
