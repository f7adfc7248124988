"""The one error a request can earn: answered with its status and ``{"error": message}``."""

from __future__ import annotations


class BadRequest(Exception):
    """The client's request is malformed: answered with `status` and {"error": message}."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status
