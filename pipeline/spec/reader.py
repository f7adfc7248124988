"""Walking a parsed YAML mapping with type and key checks; every error names the spec file and the field."""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

from pipeline.errors import SpecError


class Reader:
    """Walks the YAML mapping, checking types and keys; every error carries the field path."""

    def __init__(self, source: Path) -> None:
        self.source = source
        self.base = source.parent

    def fail(self, path: str, problem: str) -> SpecError:
        where = f"{self.source}: {path}: " if path else f"{self.source}: "
        return SpecError(where + problem)

    def mapping(self, value: Any, path: str, allowed: tuple[str, ...], required: tuple[str, ...] = ()) -> dict:
        if value is None:
            value = {}
        if not isinstance(value, dict):
            raise self.fail(path, f"expected a mapping, got {kind(value)}")
        for key in value:
            if key not in allowed:
                hint = difflib.get_close_matches(str(key), allowed, n=1)
                extra = f"; did you mean '{hint[0]}'?" if hint else f"; allowed: {', '.join(allowed)}"
                raise self.fail(join(path, str(key)), "unknown key" + extra)
        for key in required:
            if value.get(key) is None:
                raise self.fail(join(path, key), "required")
        return value

    def str_(self, value: Any, path: str) -> str:
        if not isinstance(value, str) or not value:
            hint = f'; quote it: "{value}"' if isinstance(value, (int, float)) and not isinstance(value, bool) else ""
            raise self.fail(path, f"expected a non-empty string, got {kind(value)}{hint}")
        return value

    def bool_(self, value: Any, path: str) -> bool:
        if not isinstance(value, bool):
            raise self.fail(path, f"expected true or false, got {kind(value)}")
        return value

    def int_(self, value: Any, path: str, minimum: int = 0) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(path, f"expected an integer, got {kind(value)}")
        if value < minimum:
            raise self.fail(path, f"must be >= {minimum}, got {value}")
        return value

    def float_(self, value: Any, path: str) -> float:
        # PyYAML reads `1e-5` (no dot) as a string: accept what float() accepts.
        try:
            if isinstance(value, bool):
                raise ValueError
            number = float(value)
        except (TypeError, ValueError):
            raise self.fail(path, f"expected a number, got {kind(value)}") from None
        if not number >= 0 or number == float("inf"):
            raise self.fail(path, f"must be a finite number >= 0, got {value}")
        return number

    def choice(self, value: Any, path: str, choices: tuple[str, ...]) -> str:
        if value not in choices:
            raise self.fail(path, f"{value!r} is not one of: {', '.join(choices)}")
        return value

    def list_(self, value: Any, path: str) -> list:
        if value is None:
            return []
        if not isinstance(value, list):
            raise self.fail(path, f"expected a list, got {kind(value)}")
        return value

    def file(self, value: Any, path: str) -> Path:
        rel = self.str_(value, path)
        resolved = (self.base / rel).resolve()
        if not resolved.is_file():
            raise self.fail(path, f"file not found: {rel} (relative to {self.base or '.'}/)")
        return resolved


def join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def kind(value: Any) -> str:
    if value is None:
        return "nothing (null)"
    return f"{type(value).__name__} {value!r}"[:80]
