"""Requests in and answers out: a body (JSON or npz) into named, checked arrays; outputs into JSON or npz."""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from .errors import BadRequest
from .models import np_dtype
from .npz import read_npz, write_npz

NPZ = "application/x-npz"


def header(context: Any, idx: int, name: str) -> str:
    """A request header, case-insensitively; the body's own content type as a fallback."""
    try:
        headers = context.get_all_request_header(idx) or {}
    except Exception:
        headers = {}
    for key, value in headers.items():
        if key.lower() == name and isinstance(value, str):
            return value
    for value in headers.values():
        if isinstance(value, dict) and isinstance(value.get(name), str):
            return value[name]
    return ""


def parse_body(body: Any, content_type: str) -> Any:
    """The request body as a dict of arrays (npz) or a decoded JSON value."""
    if isinstance(body, (bytes, bytearray)):
        if NPZ in content_type or body[:4] == b"PK\x03\x04":
            try:
                return read_npz(bytes(body))
            except BadRequest:
                raise
            except Exception as exc:
                raise BadRequest(f"body is not a readable .npz ({type(exc).__name__}: {exc})") from None
        try:
            return json.loads(bytes(body).decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            raise BadRequest(f"body is not valid JSON ({exc})") from None
    if isinstance(body, str):
        try:
            return json.loads(body)
        except ValueError as exc:
            raise BadRequest(f"body is not valid JSON ({exc})") from None
    return body


def to_arrays(payload: Any, meta: dict) -> dict[str, np.ndarray]:
    """Check a decoded request against the declared inputs; cast safely. Raises BadRequest."""
    specs = meta["inputs"]
    if isinstance(payload, dict) and "inputs" in payload and not all(t["name"] == "inputs" for t in specs):
        extra = sorted(set(payload) - {"inputs"})
        if extra:
            raise BadRequest(f'unknown top-level keys {extra}; send {{"inputs": {{...}}}}')
        payload = payload["inputs"]
        if isinstance(payload, list) and len(specs) == 1:
            payload = {specs[0]["name"]: payload}
    elif isinstance(payload, list) and len(specs) == 1:
        payload = {specs[0]["name"]: payload}
    if not isinstance(payload, dict):
        names = ", ".join(t["name"] for t in specs)
        raise BadRequest(f'expected {{"inputs": {{{names}: [...]}}}}, got {type(payload).__name__}')
    unknown = sorted(set(payload) - {t["name"] for t in specs})
    if unknown:
        raise BadRequest(f"unknown inputs {unknown}; this model takes {[t['name'] for t in specs]}")
    arrays: dict[str, np.ndarray] = {}
    sizes: dict[str, int] = {}
    for t in specs:
        if t["name"] not in payload:
            raise BadRequest(f"missing input {t['name']!r}")
        arrays[t["name"]] = _array(t, payload[t["name"]], sizes)
    limit = meta.get("serve", {}).get("max_rows")
    if limit and sizes["batch"] > limit:
        raise BadRequest(f"{sizes['batch']} rows in one request; at most {limit} are allowed (serve.max_rows)", 413)
    return arrays


def _array(t: dict, value: Any, sizes: dict[str, int]) -> np.ndarray:
    name, shape, dtype = t["name"], t["shape"], t["dtype"]
    try:
        arr = value if isinstance(value, np.ndarray) else np.asarray(value)
    except (ValueError, TypeError) as exc:
        raise BadRequest(f"input {name!r}: not a rectangular array of numbers ({exc})") from None
    if arr.dtype.kind not in "biuf":
        raise BadRequest(f"input {name!r}: values must be numbers, got {arr.dtype.name if arr.dtype.kind != 'O' else 'mixed values'}")
    if arr.ndim != len(shape):
        raise BadRequest(f"input {name!r}: expected {len(shape)} dimensions {shape}, got shape {list(arr.shape)}")
    for axis, (want, got) in enumerate(zip(shape, arr.shape)):
        if isinstance(want, int):
            if want != got:
                raise BadRequest(f"input {name!r}: dimension {axis} must be {want}, got shape {list(arr.shape)}")
        elif sizes.setdefault(want, got) != got:
            raise BadRequest(f"input {name!r}: dimension {axis} ({want}) is {got}, another input has {sizes[want]}")
    if arr.shape[0] == 0:
        raise BadRequest(f"input {name!r}: no rows")
    return _cast(name, arr, dtype, t.get("range"))


def _cast(name: str, arr: np.ndarray, dtype: str, rng: list | None) -> np.ndarray:
    target = np.dtype(np_dtype(dtype))
    kind = arr.dtype.kind
    if target.kind == "f":
        out = arr.astype(target)
        if kind == "f" and not np.isfinite(out[np.isfinite(arr)]).all():
            raise BadRequest(f"input {name!r}: values overflow {dtype}")
        return out
    if kind == "f":
        raise BadRequest(f"input {name!r}: expects {dtype}, got floating-point values (cannot cast safely)")
    if target.kind == "b":
        if not np.isin(arr, (0, 1)).all():
            raise BadRequest(f"input {name!r}: expects booleans (0/1)")
        return arr.astype(bool)
    info = np.iinfo(target)
    if arr.size and (arr.min() < info.min or arr.max() > info.max):
        raise BadRequest(f"input {name!r}: values out of range for {dtype}")
    if rng is not None and arr.size and (arr.min() < rng[0] or arr.max() >= rng[1]):
        raise BadRequest(f"input {name!r}: values must lie in [{rng[0]}, {rng[1]})")
    return arr.astype(target)


def encode(outputs: dict[str, np.ndarray], accept: str) -> tuple[bytes | str, str]:
    if NPZ in accept:
        return write_npz(outputs), NPZ
    return json.dumps({"outputs": {k: v.tolist() for k, v in outputs.items()}}), "application/json"
