"""The server's size limits from what its archives ask. TorchServe's `max_response_size` is the largest answer its
frontend takes from a worker (each answer of a batch on its own; one over it kills the worker and fails its whole
batch with 500 "Worker died."), one value for the whole server. Each archive records its `serve.max_response_mb`
in marpipe.json as `serve.max_response_bytes`, and its handler answers a larger answer with a 413 itself; so the
server is set to the largest an archive asks for, and takes requests at least as large.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

from pipeline.errors import PackageError
from pipeline.store.layout import read_entry
from pipeline.torchserve.fit import DEFAULT_MAX_REQUEST_SIZE

DEFAULT_MAX_RESPONSE_SIZE = 6_553_500  # TorchServe's default; what an archive that records none is held to


def max_response_size(archives: list[Path]) -> int:
    """The largest answer any of `archives` may send, in bytes (TorchServe's default with no archive)."""
    asks = [DEFAULT_MAX_RESPONSE_SIZE] if not archives else []
    for path in archives:
        try:
            serve = json.loads(read_entry(path, "marpipe.json")).get("serve") or {}
        except (KeyError, FileNotFoundError):  # not built by marpipe: its handler is TorchServe's own
            serve = {}
        except (OSError, ValueError, AttributeError, zipfile.BadZipFile) as exc:
            raise PackageError(f"{path}: unreadable marpipe.json ({exc}); run marpipe verify {path}") from None
        asks.append(int(serve.get("max_response_bytes") or DEFAULT_MAX_RESPONSE_SIZE))
    return max(asks)


def size_settings(max_response: int) -> dict[str, int]:
    """config.properties lines: the answers' limit, and requests at least as large (TorchServe's default otherwise)."""
    return {"max_response_size": max_response, "max_request_size": max(max_response, DEFAULT_MAX_REQUEST_SIZE)}
