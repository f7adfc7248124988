"""Just enough of pytest's API to run tests/gpu/ where pytest is not installed (a GPU machine lent for minutes).

`minirun.py` puts this module in `sys.modules["pytest"]` and runs the tests. What test code may use, as in pytest:
`fixture` (function, module or session scope; `yield` fixtures), the marks `skip`, `skipif`, `xfail` and
`parametrize` (stacked, with `ids` and `param`), on a function or in a module's `pytestmark`; `skip`, `importorskip`,
`fail`, `raises`, `approx`; the built-in fixtures `tmp_path`, `tmp_path_factory` and `monkeypatch` (minirun.py).
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import itertools
import math
import os
import re
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__version__ = "minitest"


class Skipped(Exception):
    """pytest.skip.Exception."""


class Failed(AssertionError):
    """pytest.fail.Exception."""


def skip(reason: str = "", *, allow_module_level: bool = False) -> None:
    raise Skipped(reason)


def fail(reason: str = "", pytrace: bool = True) -> None:
    raise Failed(reason)


skip.Exception = Skipped  # type: ignore[attr-defined]
fail.Exception = Failed  # type: ignore[attr-defined]


def _version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(n) for n in re.findall(r"\d+", text)[:3])


def importorskip(modname: str, minversion: str | None = None, reason: str | None = None) -> Any:
    try:
        module = importlib.import_module(modname)
    except ImportError as exc:
        skip(reason or f"could not import {modname!r}: {exc}")
    have = getattr(module, "__version__", None)
    if minversion and (have is None or _version_tuple(str(have)) < _version_tuple(minversion)):
        skip(f"module {modname!r} has __version__ {have!r}, required is: {minversion!r}")
    return module


@dataclass(frozen=True)
class Mark:
    name: str
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)


class MarkDecorator:
    def __init__(self, mark: Mark) -> None:
        self.mark = mark

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if len(args) == 1 and not kwargs and (inspect.isfunction(args[0]) or inspect.isclass(args[0])):
            target = args[0]
            target.pytestmark = [*getattr(target, "pytestmark", []), self.mark]
            return target
        return MarkDecorator(Mark(self.mark.name, self.mark.args + args, {**self.mark.kwargs, **kwargs}))


class _MarkGenerator:
    def __getattr__(self, name: str) -> MarkDecorator:
        if name.startswith("_"):
            raise AttributeError(name)
        return MarkDecorator(Mark(name))


mark = _MarkGenerator()


@dataclass(frozen=True)
class ParameterSet:
    values: tuple
    marks: tuple
    id: str | None


def param(*values: Any, marks: Any = (), id: str | None = None) -> ParameterSet:  # noqa: A002 (pytest's name)
    marks = marks if isinstance(marks, (list, tuple)) else (marks,)
    return ParameterSet(values, tuple(m.mark if isinstance(m, MarkDecorator) else m for m in marks), id)


@dataclass
class FixtureDef:
    name: str
    func: Callable
    scope: str
    autouse: bool


def fixture(func: Callable | None = None, *, scope: str = "function", autouse: bool = False, name: str | None = None, params: Any = None):
    if params is not None:
        raise TypeError("minitest (the pytest stand-in of make test-gpu) does not support fixture params: use parametrize")

    def wrap(f: Callable) -> Callable:
        f._minitest_fixture = FixtureDef(name or f.__name__, f, scope, autouse)  # type: ignore[attr-defined]
        return f

    return wrap(func) if func is not None else wrap


class RaisesInfo:
    def __init__(self) -> None:
        self.value: BaseException | None = None
        self.type: type | None = None

    def match(self, pattern: str) -> bool:
        assert re.search(pattern, str(self.value)), f"regex {pattern!r} does not match {str(self.value)!r}"
        return True


@contextlib.contextmanager
def raises(expected: Any, *, match: str | None = None) -> Iterator[RaisesInfo]:
    info = RaisesInfo()
    try:
        yield info
    except expected as exc:
        info.value, info.type = exc, type(exc)
        if match is not None:
            info.match(match)
        return
    raise Failed(f"DID NOT RAISE {expected}")


class approx:  # noqa: N801 (pytest's name)
    """pytest.approx for numbers, sequences, dicts and numpy arrays: |a - b| <= max(rel * |b|, abs)."""

    def __init__(self, expected: Any, rel: float | None = None, abs: float | None = None) -> None:  # noqa: A002
        self.expected, self.rel, self.abs = expected, 1e-6 if rel is None else rel, 1e-12 if abs is None else abs

    def _close(self, got: Any, want: Any) -> bool:
        if hasattr(want, "__array__") or hasattr(got, "__array__"):
            import numpy as np

            got, want = np.asarray(got), np.asarray(want)
            return got.shape == want.shape and bool(np.all(np.abs(got - want) <= np.maximum(self.rel * np.abs(want), self.abs)))
        if isinstance(want, dict):
            return isinstance(got, dict) and got.keys() == want.keys() and all(self._close(got[k], want[k]) for k in want)
        if isinstance(want, (list, tuple)):
            return isinstance(got, (list, tuple)) and len(got) == len(want) and all(map(self._close, got, want))
        if isinstance(want, (int, float)) and isinstance(got, (int, float)):
            return got == want or (math.isfinite(want) and abs(got - want) <= max(self.rel * abs(want), self.abs))
        return got == want

    def __eq__(self, other: Any) -> bool:
        return self._close(other, self.expected)

    def __repr__(self) -> str:
        return f"approx({self.expected!r}, rel={self.rel}, abs={self.abs})"


class MonkeyPatch:
    def __init__(self) -> None:
        self._undo: list[Callable[[], None]] = []

    def setattr(self, target: Any, name: str, value: Any, raising: bool = True) -> None:
        old = getattr(target, name, _MISSING)
        if old is _MISSING and raising:
            raise AttributeError(f"{target!r} has no attribute {name!r}")
        setattr(target, name, value)
        self._undo.append(lambda: delattr(target, name) if old is _MISSING else setattr(target, name, old))

    def delattr(self, target: Any, name: str, raising: bool = True) -> None:
        if not hasattr(target, name):
            if raising:
                raise AttributeError(name)
            return
        old = getattr(target, name)
        delattr(target, name)
        self._undo.append(lambda: setattr(target, name, old))

    def setitem(self, mapping: Any, key: Any, value: Any) -> None:
        old = mapping.get(key, _MISSING)
        mapping[key] = value
        self._undo.append(lambda: mapping.pop(key, None) if old is _MISSING else mapping.__setitem__(key, old))

    def delitem(self, mapping: Any, key: Any, raising: bool = True) -> None:
        if key not in mapping:
            if raising:
                raise KeyError(key)
            return
        old = mapping.pop(key)
        self._undo.append(lambda: mapping.__setitem__(key, old))

    def setenv(self, name: str, value: str, prepend: str | None = None) -> None:
        value = str(value)
        if prepend and name in os.environ:
            value = value + prepend + os.environ[name]
        self.setitem(os.environ, name, value)

    def delenv(self, name: str, raising: bool = True) -> None:
        self.delitem(os.environ, name, raising)

    def syspath_prepend(self, path: Any) -> None:
        sys.path.insert(0, str(path))
        self._undo.append(lambda: sys.path.remove(str(path)))

    def chdir(self, path: Any) -> None:
        old = os.getcwd()
        os.chdir(path)
        self._undo.append(lambda: os.chdir(old))

    def undo(self) -> None:
        while self._undo:
            self._undo.pop()()


_MISSING = object()


class TempPathFactory:
    def __init__(self, base: Path) -> None:
        self.base = base
        self._count = itertools.count()

    def mktemp(self, basename: str, numbered: bool = True) -> Path:
        path = self.base / (f"{basename}{next(self._count)}" if numbered else basename)
        path.mkdir(parents=True)
        return path

    def getbasetemp(self) -> Path:
        return self.base
