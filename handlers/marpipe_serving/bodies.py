"""Request bodies (or multipart parts) read as JSON or as an npz: the one parser that `codecs` (whole bodies) and
`contract` (multipart parts) share. JSON with orjson where the inference image has it.
"""

from __future__ import annotations

import json
from typing import Any

from .errors import BadRequest
from .npz import read_npz

NPZ = "application/x-npz"
_loads = None


def parse_json_or_npz(body: Any, ctype: str, what: str) -> Any:
    """A body (or part) as the named arrays of an npz, or a decoded JSON value."""
    if isinstance(body, (bytes, bytearray)):
        if is_npz(body, ctype):
            try:
                return read_npz(bytes(body))
            except BadRequest:
                raise
            except Exception as exc:
                raise BadRequest(f"{what} is not a readable .npz ({type(exc).__name__}: {exc})") from None
        try:
            return loads(body)  # orjson and json read a bytearray as it is: no copy of a megabyte body
        except (UnicodeDecodeError, ValueError) as exc:
            raise BadRequest(f"{what} is not valid JSON ({str(exc)[:200]})") from None
    if isinstance(body, str):
        try:
            return loads(body.encode("utf-8"))
        except ValueError as exc:
            raise BadRequest(f"{what} is not valid JSON ({str(exc)[:200]})") from None
    return body  # TorchServe decoded the JSON already


def loads(data: bytes | bytearray) -> Any:
    """JSON with orjson when the inference image has it (several times faster on big nested lists), else json."""
    global _loads
    if _loads is None:
        try:
            import orjson

            _loads = orjson.loads
        except ImportError:
            _loads = json.loads
    try:
        return _loads(data)
    except ValueError:
        if _loads is json.loads:
            raise
        return json.loads(data)  # what orjson refuses but the standard library reads (NaN, Infinity) stays accepted


def is_npz(body: Any, ctype: str) -> bool:
    return isinstance(body, (bytes, bytearray)) and (NPZ in ctype or body[:4] == b"PK\x03\x04")
