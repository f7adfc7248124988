"""Replaying a batch of inputs in requests that fit the server: TorchServe's `max_request_size` (6.5 MB by
default: a 3x224x224 float batch of 4 is 12.4 MB as JSON) and the archive's own `serve.max_rows`.

The rows are split over as many requests as needed and the answers joined again. A single row too large for
one request is reported (with its size) rather than sent; a refused or reset connection and any status
but 200 are reported with their reason. Used by `marpipe smoke`.
"""

from __future__ import annotations

import http.client
import io
import json
from pathlib import Path
from typing import Any

import numpy as np

DEFAULT_MAX_REQUEST_SIZE = 6_553_500  # TorchServe's default max_request_size, in bytes
HEADROOM = 4096  # multipart/HTTP framing TorchServe may count beside the body itself


def max_request_size(config: Path) -> int:
    """The server's limit: `max_request_size` from its config.properties, else TorchServe's default."""
    return config_size(config, "max_request_size", DEFAULT_MAX_REQUEST_SIZE)


def config_size(config: Path, name: str, default: int) -> int:
    """A size setting (bytes) from a TorchServe config.properties, else `default`."""
    try:
        for line in config.read_text().splitlines():
            key, _, value = line.partition("=")
            if key.strip() == name and value.strip().isdigit():
                return int(value.strip())
    except OSError:
        pass
    return default


def npz_body(arrays: dict[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def json_body(arrays: dict[str, np.ndarray]) -> bytes:
    return json.dumps({"inputs": {k: v.tolist() for k, v in arrays.items()}}).encode()


ENCODERS = {
    "npz": (npz_body, {"Content-Type": "application/x-npz", "Accept": "application/x-npz"}),
    "json": (json_body, {"Content-Type": "application/json", "Accept": "application/json; raw=true"}),  # tensors, not labels
}


class TooLarge(Exception):
    """One row alone is over the limit."""

    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.size = size


def split(arrays: dict[str, np.ndarray], encode: Any, limit: int, max_rows: int | None = None) -> list[tuple[int, bytes]]:
    """(rows, body) pieces, in order, each body at most `limit - HEADROOM` bytes and `max_rows` rows."""
    budget = limit - HEADROOM
    total = len(next(iter(arrays.values())))
    pieces: list[tuple[int, bytes]] = []
    start, n = 0, min(total, max_rows or total)
    while start < total:
        n = min(n, total - start)
        body = encode({k: v[start : start + n] for k, v in arrays.items()})
        if len(body) <= budget:
            pieces.append((n, body))
            start += n
            continue
        if n == 1:
            raise TooLarge(len(body))
        n = max(1, min(n - 1, n * budget // len(body)))  # rows scale the body about linearly
    return pieces


def replay(server: Any, route: str, transport: str, arrays: dict[str, np.ndarray], max_rows: int | None, limit: int) -> dict[str, Any]:
    """Send `arrays` to `route` (e.g. /predictions/<name>) in pieces under `limit` bytes and `max_rows` rows;
    {"outputs": {...}} joined, or {"why": ..., "skipped": bool}."""
    encode, headers = ENCODERS[transport]
    try:
        pieces = split(arrays, encode, limit, max_rows)
    except TooLarge as exc:
        why = f"skipped: one row is {exc.size / 1e6:.1f} MB as {transport}, over the server's max_request_size of {limit / 1e6:.1f} MB"
        return {"why": why, "skipped": True}
    answers: list[dict[str, np.ndarray]] = []
    for rows, body in pieces:
        try:
            code, _, answer = server.request("inference", route, body, headers)
        except (OSError, http.client.HTTPException) as exc:  # refused, reset, timed out: no HTTP answer at all
            reason = getattr(exc, "reason", None) or exc
            return {"why": f"no answer to a {len(body) / 1e6:.1f} MB request of {rows} rows: {type(reason).__name__}: {reason}"[:300]}
        if code != 200:
            return {"why": f"HTTP {code} for a {len(body) / 1e6:.1f} MB request of {rows} rows: {answer[:160].decode(errors='replace')}"}
        try:
            answers.append(_decode(answer, transport))
        except (ValueError, KeyError, TypeError) as exc:
            return {"why": f"unreadable answer: {exc}"}
    names = list(answers[0])
    outputs = {k: np.concatenate([np.asarray(a[k]) for a in answers]) if all(k in a for a in answers) else None for k in names}
    return {"outputs": {k: v for k, v in outputs.items() if v is not None}, "requests": len(pieces)}


def _decode(answer: bytes, transport: str) -> dict[str, Any]:
    if transport == "npz":
        with np.load(io.BytesIO(answer), allow_pickle=False) as f:
            return {k: f[k] for k in f.files}
    return {k: np.asarray(v) for k, v in json.loads(answer)["outputs"].items()}
