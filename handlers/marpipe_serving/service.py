"""TorchServe's entry point: decode → batch → predict → encode.

Each request is decoded on its own (a malformed one gets its 4xx and ``{"error": ...}``), requests whose shapes
agree run in one forward pass (a text model's rows are padded to the longest instead), and each answer is
encoded on its own (a failing encode hook is that request's 500; an answer over the server's max_response_size its
413, before TorchServe's frontend would refuse it by killing the worker). Nothing one request holds fails another.

Requests over TorchServe's gRPC API (see `answer_grpc`) are answered in the form its gRPC front end can send
without throwing, which would kill the worker.
"""

from __future__ import annotations

import json
import logging
import os
from http import HTTPStatus
from typing import Any

import numpy as np

from . import codecs, precision, rows, v2
from .contract import Contract
from .errors import BadRequest
from .models import METADATA, serving_runner
from .requirements import check as check_requirements

log = logging.getLogger("marpipe_handler")


class Service:
    def __init__(self, context: Any) -> None:
        props = context.system_properties
        model_dir = props.get("model_dir")
        with open(os.path.join(model_dir, METADATA), encoding="utf-8") as f:
            self.meta = json.load(f)
        gpu_id = props.get("gpu_id")
        import torch

        device = f"cuda:{gpu_id}" if gpu_id is not None and torch.cuda.is_available() else "cpu"
        if precision.of(self.meta) == "int8":  # its kernels are the CPU's (torch.ao's and onnxruntime's)
            device, gpu_id = "cpu", None
        check_requirements(self.meta)  # Pillow, tokenizers, the architecture's packages: named, not an ImportError
        self.contract = Contract(self.meta, model_dir)
        self.runner, threads, why = serving_runner(model_dir, self.meta, device, gpu_id)
        fmt = self.meta["format"] + ("" if precision.of(self.meta) == "fp32" else f" {precision.of(self.meta)}")
        log.info("marpipe: %s (%s) ready on %s, %d threads%s", self.meta["name"], fmt, device, threads, why)

    def handle(self, data: list, context: Any) -> list:
        results: list[Any] = [None] * len(data)
        requests: dict[int, codecs.Request] = {}
        for i, row in enumerate(data):
            try:
                if not isinstance(row, dict):
                    raise BadRequest("empty request")
                requests[i] = codecs.decode(row, context, i, self.contract)
            except BadRequest as exc:
                results[i] = error(context, i, exc.status, str(exc))
        for group in groups(requests, self.contract):
            self._run_group(group, requests, results, context)
        grpc = [i for i in range(len(data)) if codecs.via_grpc(context, i)]
        if grpc:
            answer_grpc(data, grpc, results, context, self.meta)
        return results

    def _run_group(self, group: list[int], requests: dict[int, codecs.Request], results: list, context: Any) -> None:
        batch, widths = concat([requests[i].arrays for i in group], self.contract)
        try:
            outputs = self.runner(batch)
            counts = [len(next(iter(requests[i].arrays.values()))) for i in group]
            own = np.repeat(widths, counts) if self.contract.pad_dim else None
            outputs = rows.select_last(outputs, batch, rows.selected(self.meta), own)  # select: last
        except Exception as exc:
            if len(group) > 1:  # find the request that broke it; the others still get answers
                for i in group:
                    self._run_group([i], requests, results, context)
                return
            log.exception("marpipe: inference failed")
            results[group[0]] = error(context, group[0], 500, f"inference failed: {type(exc).__name__}: {exc}")
            return
        trim = self._padded_axes()
        left = self.contract.text is not None and self.contract.text.left
        start = 0
        for i, width in zip(group, widths):
            request = requests[i]
            count = len(next(iter(request.arrays.values())))
            mine = {}
            for name, value in outputs.items():
                part = value[start : start + count]
                for axis in trim.get(name, ()):
                    keep = slice(part.shape[axis] - width, None) if left else slice(0, width)  # left padding: the last columns
                    part = part[(slice(None),) * axis + (keep,)]
                mine[name] = part
            start += count
            encode_hook = self.contract.hooks is not None and hasattr(self.contract.hooks, "encode")
            if request.v2 is None and not request.npz and (request.raw or not encode_hook):
                per_token = [n for n, axes in trim.items() if axes == [1] and (request.raw or n not in self.contract.labels)]
                mine = rows.per_row(mine, request.arrays, per_token)
            try:
                body, ctype = codecs.encode(mine, request, self.contract)
            except Exception as exc:  # a user encode hook, or an output JSON cannot hold: this request alone
                log.exception("marpipe: encoding the answer failed")
                results[i] = error(context, i, 500, f"encoding the answer failed: {type(exc).__name__}: {str(exc)[:300]}")
                continue
            too_large = codecs.oversize(body, mine, request, self.contract)
            if too_large:  # sent, it would kill the worker and fail its whole batch
                results[i] = error(context, i, 413, too_large)
                continue
            context.set_response_content_type(i, ctype)
            if request.v2 is not None and request.v2.header_length is not None:
                context.set_response_header(i, "Inference-Header-Content-Length", str(request.v2.header_length))
            results[i] = body

    def _padded_axes(self) -> dict[str, list[int]]:
        """Output axes that follow the padded dim (a text model's per-token outputs): trimmed back per request."""
        dim = self.contract.pad_dim
        if dim is None:
            return {}
        selected = set(rows.selected(self.meta))  # their token axis is gone
        return {
            o["name"]: [a for a, d in enumerate(o.get("shape") or []) if d == dim]
            for o in self.meta["outputs"]
            if o["name"] not in selected
        }


def error(context: Any, idx: int, status: int, message: str) -> str:
    """The request's status with its standard reason phrase, and the detail in the JSON body. Never client text in
    the status line: TorchServe builds it per request inside its batch loop, and a CR or LF there (an npz entry
    name can carry one) would throw and leave the rest of the batch unanswered."""
    phrase = HTTPStatus(status).phrase if status in HTTPStatus._value2member_map_ else "Error"
    context.set_response_status(status, phrase, idx)
    context.set_response_content_type(idx, "application/json")
    return json.dumps({"error": message})


class _Unavailable(Exception):
    """Stands in for TorchServe's PredictionException outside TorchServe (its `ts` package absent)."""

    def __init__(self, message: str, error_code: int = 500) -> None:
        super().__init__(message)
        self.message, self.error_code = message, error_code


def answer_grpc(data: list, indices: list[int], results: list, context: Any, meta: dict) -> None:
    """Answers to gRPC requests, as TorchServe 0.12's gRPC front end can send them.

    * Every answer says the stream ends here (``ts_stream_next: false``): StreamPredictions reads that header of
      every answer and throws without it, which kills the worker; for the other calls it changes nothing.
    * TorchServe ignores a gRPC answer's status, so an error alone in its batch is raised as TorchServe's
      PredictionException: the call then fails with the gRPC status of its HTTP status (400 INVALID_ARGUMENT,
      413 RESOURCE_EXHAUSTED, 500 INTERNAL). Inside a batch, raising would fail every request of it, so the error
      stays in the body: ``{"error"}`` for Predictions, and for a ModelInfer the v2 answer TorchServe requires
      (id, model_name, model_version; an output named ``error``), since anything else throws in its front end.
    """
    for i in indices:
        context.set_response_header(i, "ts_stream_next", "false")
    failed = [i for i in indices if _status(context, i) >= 400]
    if not failed:
        return
    if len(data) == 1:
        code, message = _status(context, 0), _message(results[0])
        try:
            from ts.utils.util import PredictionException
        except ImportError:
            PredictionException = _Unavailable
        raise PredictionException(message, code)
    for i in failed:
        rid = codecs.model_infer_id(data[i], context, i)
        if rid is not None:
            served = getattr(context, "model_name", None)
            results[i] = json.dumps(v2.error_answer(_message(results[i]), rid, meta, served))
            context.set_response_status(200, "OK", i)


def _status(context: Any, idx: int) -> int:
    try:
        return int(context.get_response_status(idx)[0])
    except Exception:
        return 200


def _message(body: Any) -> str:
    try:
        return str(json.loads(body)["error"])
    except Exception:
        return str(body)[:500]


def groups(requests: dict[int, codecs.Request], contract: Contract) -> list[list[int]]:
    """Requests whose non-batch shapes agree share one forward pass; the padded dim does not count."""
    pad = contract.pad_dim
    out: dict[tuple, list[int]] = {}
    for i, request in requests.items():
        key = tuple(tuple(s for s, d in zip(request.arrays[t["name"]].shape[1:], t["shape"][1:]) if d != pad) for t in contract.inputs)
        out.setdefault(key, []).append(i)
    return list(out.values())


def concat(arrays: list[dict[str, np.ndarray]], contract: Contract) -> tuple[dict[str, np.ndarray], list[int]]:
    """The group's rows as one batch, padded along the padded dim; and each request's own width along it."""
    from .text import pad

    pad_dim = contract.pad_dim
    widths = [0] * len(arrays)
    batch = {}
    for t in contract.inputs:
        parts = [a[t["name"]] for a in arrays]
        axes = [k for k, d in enumerate(t["shape"]) if d == pad_dim]
        for axis in axes:
            widths = [p.shape[axis] for p in parts]
            parts = pad(parts, axis, contract.pad_value(t["name"]), left=contract.text is not None and contract.text.left)
        batch[t["name"]] = np.concatenate(parts)  # a copy even of one: npz inputs are read-only views of the body
    return batch, widths


_service: Service | None = None


def handle(data: list | None, context: Any) -> list | None:
    """TorchServe's function entry point: called once with data=None to initialise, then per batch."""
    global _service
    if _service is None:
        _service = Service(context)
    if data is None:
        return None
    return _service.handle(data, context)
