"""Requests that fit the server: rows split under max_request_size and max_rows, a too-large row skipped, a 413 or
a refused connection reported with its reason (the server is a stub: this is about orchestration)."""

from __future__ import annotations

import json
import urllib.error
from pathlib import Path

import numpy as np
import pytest

from pipeline.torchserve import fit


def _arrays(rows: int, width: int = 100) -> dict[str, np.ndarray]:
    return {"x": np.arange(rows * width, dtype=np.float32).reshape(rows, width) / 7, "ids": np.arange(rows, dtype=np.int64)}


@pytest.mark.parametrize("transport", ["json", "npz"])
def test_rows_are_split_to_fit_and_keep_their_order(transport: str) -> None:
    encode, _ = fit.ENCODERS[transport]
    arrays = _arrays(10)
    limit = fit.HEADROOM + len(encode({k: v[:3] for k, v in arrays.items()}))
    pieces = fit.split(arrays, encode, limit, max_rows=None)
    assert len(pieces) > 1 and sum(n for n, _ in pieces) == 10
    assert all(len(body) <= limit - fit.HEADROOM for _, body in pieces)
    assert all(n <= 2 for n, _ in fit.split(arrays, encode, 10**9, max_rows=2))
    assert len(fit.split(arrays, encode, 10**9)) == 1


def test_a_row_too_large_for_one_request() -> None:
    with pytest.raises(fit.TooLarge) as err:
        fit.split(_arrays(2, width=10_000), fit.json_body, fit.HEADROOM + 1000)
    assert err.value.size > 1000


class Stub:
    """What fit.replay uses of pipeline.torchserve.server.Server: request()."""

    def __init__(self, workdir: Path, answer) -> None:
        self.workdir, self.answer, self.bodies = workdir, answer, []

    def request(self, api: str, path: str, body: bytes, headers: dict) -> tuple[int, dict, bytes]:
        self.bodies.append(body)
        return self.answer(body)


def _echo(body: bytes) -> tuple[int, dict, bytes]:
    rows = json.loads(body)["inputs"]["ids"]
    return 200, {}, json.dumps({"outputs": {"y": [[r] for r in rows]}}).encode()


def test_replay_reads_the_limit_and_joins_the_answers(tmp_path: Path) -> None:
    arrays = _arrays(9)
    size = len(fit.json_body(arrays))
    assert fit.max_request_size(tmp_path / "config.properties") == fit.DEFAULT_MAX_REQUEST_SIZE == 6_553_500
    (tmp_path / "config.properties").write_text(f"inference_address=http://127.0.0.1:1\nmax_request_size={size // 2 + fit.HEADROOM}\n")
    server = Stub(tmp_path, _echo)
    answer = fit.replay(server, "/predictions/m", "json", arrays, 64, fit.max_request_size(tmp_path / "config.properties"))
    assert answer["requests"] == len(server.bodies) >= 3
    np.testing.assert_array_equal(answer["outputs"]["y"][:, 0], arrays["ids"])


def test_a_413_and_a_refused_connection_are_failed_checks_with_their_reason(tmp_path: Path) -> None:
    refused = Stub(tmp_path, lambda body: (_ for _ in ()).throw(urllib.error.URLError(ConnectionRefusedError(111, "Connection refused"))))
    answer = fit.replay(refused, "/predictions/m", "npz", _arrays(2), None, fit.DEFAULT_MAX_REQUEST_SIZE)
    assert "no answer to a" in answer["why"] and "ConnectionRefusedError" in answer["why"] and not answer.get("skipped")
    too_large = Stub(tmp_path, lambda body: (413, {}, b'{"code": 413, "message": "request too large"}'))
    answer = fit.replay(too_large, "/predictions/m", "json", _arrays(2), None, fit.DEFAULT_MAX_REQUEST_SIZE)
    assert answer["why"].startswith("HTTP 413 for a") and "request too large" in answer["why"]
    answer = fit.replay(too_large, "/predictions/m", "json", _arrays(2), None, fit.HEADROOM + 100)
    assert answer["skipped"] and "skipped: one row is" in answer["why"] and "max_request_size" in answer["why"]
