"""TorchServe's entry point: each request decoded on its own, compatible requests batched, answers encoded.

A malformed request gets its 4xx and ``{"error": ...}``; it never fails the other requests of its batch.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import numpy as np

from .codecs import encode, header, parse_body, to_arrays
from .errors import BadRequest
from .models import METADATA, fit_threads, load_runner, thread_count, timing_batch

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
        serve = self.meta.get("serve", {})
        threads = thread_count(int(serve.get("max_workers", 1)))
        torch.set_num_threads(threads)
        self.runner = load_runner(model_dir, self.meta, device, gpu_id, threads)
        why = ""
        if device == "cpu" and threads > 1 and not os.environ.get("MARPIPE_THREADS"):
            batch = timing_batch(model_dir, self.meta, int(serve.get("batch_size") or 1))
            onnx = self.meta["format"] == "onnx"
            reload = (lambda n: load_runner(model_dir, self.meta, device, gpu_id, n)) if onnx else (lambda n: self.runner)
            threads, self.runner, why = fit_threads(self.runner, threads, batch, reload)
        log.info("marpipe: %s (%s) ready on %s, %d threads%s", self.meta["name"], self.meta["format"], device, threads, why)

    def handle(self, data: list, context: Any) -> list:
        results: list[Any] = [None] * len(data)
        decoded: dict[int, dict[str, np.ndarray]] = {}
        for i, row in enumerate(data):
            try:
                body = row.get("body") if row.get("body") is not None else row.get("data")
                if body is None:
                    raise BadRequest("empty request body")
                decoded[i] = to_arrays(parse_body(body, header(context, i, "content-type")), self.meta)
            except BadRequest as exc:
                results[i] = self._error(context, i, exc.status, str(exc))
        for group in _groups(decoded, self.meta["inputs"]):
            self._run_group(group, decoded, results, context)
        return results

    def _run_group(self, group: list[int], decoded: dict, results: list, context: Any) -> None:
        names = [t["name"] for t in self.meta["inputs"]]
        batch = {n: np.concatenate([decoded[i][n] for i in group]) for n in names}
        try:
            outputs = self.runner(batch)
        except Exception as exc:
            if len(group) > 1:  # find the request that broke it; the others still get answers
                for i in group:
                    self._run_group([i], decoded, results, context)
                return
            log.exception("marpipe: inference failed")
            results[group[0]] = self._error(context, group[0], 500, f"inference failed: {type(exc).__name__}: {exc}")
            return
        start = 0
        for i in group:
            rows = len(decoded[i][names[0]])
            mine = {k: v[start : start + rows] for k, v in outputs.items()}
            start += rows
            body, ctype = encode(mine, header(context, i, "accept"))
            context.set_response_content_type(i, ctype)
            results[i] = body

    @staticmethod
    def _error(context: Any, idx: int, status: int, message: str) -> str:
        context.set_response_status(status, message[:200], idx)
        context.set_response_content_type(idx, "application/json")
        return json.dumps({"error": message})


def _groups(decoded: dict[int, dict[str, np.ndarray]], specs: list[dict]) -> list[list[int]]:
    """Requests whose non-batch shapes agree can share one forward pass."""
    groups: dict[tuple, list[int]] = {}
    for i, arrays in decoded.items():
        key = tuple(arrays[t["name"]].shape[1:] for t in specs)
        groups.setdefault(key, []).append(i)
    return list(groups.values())


_service: Service | None = None


def handle(data: list | None, context: Any) -> list | None:
    """TorchServe's function entry point: called once with data=None to initialise, then per batch."""
    global _service
    if _service is None:
        _service = Service(context)
    if data is None:
        return None
    return _service.handle(data, context)
