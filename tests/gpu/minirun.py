"""Runs tests/gpu/ with minitest standing in for pytest: collection, fixtures, marks, one Result per test.

As pytest does, it runs the `test*` functions of each test module; fixtures are requested by parameter name and
looked up in the module, then tests/conftest.py, then the built-in `tmp_path`, `tmp_path_factory` and `monkeypatch`.
What it lacks (test classes, fixture `params`, other built-in fixtures, hooks, plugins) fails that test with a
message that says so, never silently. `make test-gpu DRY=1` runs tests/gpu/ with it (tests/gpu/session.py).
"""

from __future__ import annotations

import contextlib
import importlib.util
import inspect
import io
import os
import re
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import minitest
from minitest import FixtureDef, Mark, MarkDecorator, MonkeyPatch, ParameterSet, Skipped, TempPathFactory, skip


@dataclass
class Result:
    nodeid: str
    outcome: str  # passed | failed | skipped
    seconds: float
    detail: str = ""  # the skip reason or the failure's first line
    output: str = ""  # traceback and captured output of a failure


@dataclass
class Item:
    nodeid: str
    module: Any
    func: Callable
    params: dict[str, Any]
    marks: list[Mark]
    fixtures: dict[str, FixtureDef]
    error: str = ""  # a collection problem: the item fails with it


def _marks(obj: Any) -> list[Mark]:
    raw = getattr(obj, "pytestmark", [])
    raw = raw if isinstance(raw, list) else [raw]
    return [m.mark if isinstance(m, MarkDecorator) else m for m in raw]


def _fixtures_of(module: Any) -> dict[str, FixtureDef]:
    return {f._minitest_fixture.name: f._minitest_fixture for f in vars(module).values() if hasattr(f, "_minitest_fixture")}


def _id(value: Any, argname: str, index: int) -> str:
    if isinstance(value, (str, int, float, bool)) or value is None:
        return str(value)
    return f"{argname}{index}"


def _expand(marks: list[Mark]) -> list[tuple[str, dict[str, Any], list[Mark]]]:
    """(id, params, marks) for each combination of the parametrize marks, pytest's order: the mark nearest the
    function first, its id first."""
    combos: list[tuple[str, dict[str, Any], list[Mark]]] = [("", {}, [])]
    for m in marks:
        if m.name != "parametrize":
            continue
        argnames, argvalues = m.args[0], list(m.args[1] if len(m.args) > 1 else m.kwargs["argvalues"])
        names = [n.strip() for n in argnames.split(",")] if isinstance(argnames, str) else list(argnames)
        ids = m.kwargs.get("ids")
        cases = []
        for i, raw in enumerate(argvalues):
            ps = raw if isinstance(raw, ParameterSet) else ParameterSet((raw,) if len(names) == 1 else tuple(raw), (), None)
            if ps.id is not None:
                case_id = ps.id
            elif callable(ids):
                case_id = "-".join(str(ids(v)) if ids(v) is not None else _id(v, n, i) for n, v in zip(names, ps.values))
            elif ids is not None:
                case_id = str(ids[i])
            else:
                case_id = "-".join(_id(v, n, i) for n, v in zip(names, ps.values))
            cases.append((case_id, dict(zip(names, ps.values)), list(ps.marks)))
        combos = [(f"{a}-{b}" if a else b, {**pa, **pb}, ma + mb) for a, pa, ma in combos for b, pb, mb in cases]
    return combos


def collect(paths: list[Path], conftest: Any, root: Path) -> list[Item]:
    """The test items of each test module; a module that fails to import is one item that fails with the error."""
    items = []
    shared = {**BUILTIN, **_fixtures_of(conftest)}
    for path in paths:
        nodeid = path.resolve().relative_to(root).as_posix() if path.resolve().is_relative_to(root) else str(path)
        try:
            spec = importlib.util.spec_from_file_location(path.stem, path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[path.stem] = module
            spec.loader.exec_module(module)
        except Skipped as exc:
            items.append(Item(nodeid, None, _skipper(str(exc)), {}, [], {}))
            continue
        except BaseException as exc:  # noqa: BLE001 (a test module's import error is that module's failure)
            items.append(Item(nodeid, None, lambda: None, {}, [], {}, error=f"collection error: {_first_line(exc)}"))
            continue
        fixtures = {**shared, **_fixtures_of(module)}
        for name, obj in vars(module).items():
            if inspect.isclass(obj) and name.startswith("Test") and obj.__module__ == module.__name__:
                items.append(Item(f"{nodeid}::{name}", module, lambda: None, {}, [], {}, error="minitest runs no test classes"))
            if not (name.startswith("test") and inspect.isfunction(obj) and obj.__module__ == module.__name__):
                continue
            marks = _marks(module) + _marks(obj)
            for case_id, params, extra in _expand(_marks(obj)):
                item = Item(f"{nodeid}::{name}" + (f"[{case_id}]" if case_id else ""), module, obj, params, marks + extra, fixtures)
                missing = [n for n in _wanted(item) if n not in params and n not in fixtures]
                if missing:
                    item.error = f"error at setup: fixture {missing[0]!r} not found (minitest knows {', '.join(sorted(fixtures))})"
                items.append(item)
    return items


def _skipper(reason: str) -> Callable[[], None]:
    """A module skipped at import (pytest.skip(..., allow_module_level=True)): one item, skipped with its reason."""

    def skipped() -> None:
        skip(reason)

    return skipped


def _wanted(item: Item) -> list[str]:
    auto = [n for n, f in item.fixtures.items() if f.autouse]
    return auto + [n for n in inspect.signature(item.func).parameters if n not in auto]


def _first_line(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip()
    return text.splitlines()[0] if text else type(exc).__name__


class _Scopes:
    """Fixture values and their finalizers per scope: session, the current module, the current test."""

    def __init__(self) -> None:
        self.values: dict[str, dict[str, Any]] = {"session": {}, "module": {}, "function": {}}
        self.finalizers: dict[str, list[Callable[[], None]]] = {"session": [], "module": [], "function": []}

    def close(self, scope: str) -> list[str]:
        errors = []
        while self.finalizers[scope]:
            try:
                self.finalizers[scope].pop()()
            except BaseException as exc:  # noqa: BLE001
                errors.append(_first_line(exc))
        self.values[scope].clear()
        return errors

    def get(self, name: str, item: Item, stack: tuple[str, ...] = ()) -> Any:
        if name in item.params:
            return item.params[name]
        fdef = item.fixtures[name]
        scope = fdef.scope if fdef.scope in self.values else "session"
        if name in self.values[scope]:
            return self.values[scope][name]
        if name in stack:
            raise RuntimeError(f"fixture cycle: {' -> '.join((*stack, name))}")
        args = {n: self.get(n, item, (*stack, name)) for n in inspect.signature(fdef.func).parameters}
        value = fdef.func(**args)
        if inspect.isgenerator(value):
            gen = value
            value = next(gen)
            self.finalizers[scope].append(lambda: next(gen, None))
        self.values[scope][name] = value
        return value


def _skip_reason(item: Item) -> str | None:
    for m in item.marks:
        if m.name == "skip":
            return m.kwargs.get("reason") or (m.args[0] if m.args else "unconditional skip")
        if m.name == "skipif":
            condition = m.args[0] if m.args else m.kwargs.get("condition")
            if isinstance(condition, str):
                condition = eval(condition, {"os": os, "sys": sys, **vars(item.module)})  # noqa: S307 (pytest does so)
            if condition:
                return m.kwargs.get("reason") or f"condition: {condition}"
    return None


def run(items: list[Item], base: Path, emit: Callable[[Result], None], start: Callable[[str], None] = lambda nodeid: None) -> list[Result]:
    """Run the items in order: `start` is called with each one's id before it runs, `emit` with its result."""
    scopes = _Scopes()
    BUILTIN_STATE["base"] = base
    BUILTIN_STATE["factory"] = TempPathFactory(base)
    results, module = [], None
    for item in items:
        if item.module is not module:
            scopes.close("module")
            module = item.module
        start(item.nodeid)
        result = _run_one(item, scopes)
        results.append(result)
        emit(result)
    scopes.close("module")
    scopes.close("session")
    return results


def _run_one(item: Item, scopes: _Scopes) -> Result:
    start = time.perf_counter()
    if item.error:
        return Result(item.nodeid, "failed", 0.0, item.error)
    reason = _skip_reason(item)
    if reason is not None:
        return Result(item.nodeid, "skipped", 0.0, reason)
    xfail = next((m for m in item.marks if m.name == "xfail"), None)
    out = io.StringIO()
    outcome, detail, when = "passed", "", "setup"
    BUILTIN_STATE["test"] = re.sub(r"\W", "_", item.nodeid.rpartition("::")[2])[:30]
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            kwargs = {n: scopes.get(n, item) for n in _wanted(item)}
            when = "call"
            item.func(**{n: v for n, v in kwargs.items() if n in inspect.signature(item.func).parameters})
    except Skipped as exc:
        outcome, detail = "skipped", str(exc)
    except BaseException as exc:  # noqa: BLE001 (a test's failure is its result)
        if isinstance(exc, KeyboardInterrupt):
            raise
        outcome, detail = "failed", ("error at setup: " if when == "setup" else "") + _first_line(exc)
        out.write(traceback.format_exc())
    errors = scopes.close("function")
    if errors and outcome != "failed":
        outcome, detail = "failed", f"error at teardown: {errors[0]}"
    if xfail is not None:
        why = xfail.kwargs.get("reason", "")
        outcome, detail = ("skipped", f"xfail: {why}") if outcome == "failed" else (outcome, detail)
    return Result(item.nodeid, outcome, time.perf_counter() - start, detail, out.getvalue() if outcome == "failed" else "")


BUILTIN_STATE: dict[str, Any] = {}


def _tmp_path() -> Path:
    return BUILTIN_STATE["factory"].mktemp(BUILTIN_STATE["test"])


def _tmp_path_factory() -> TempPathFactory:
    return BUILTIN_STATE["factory"]


def _monkeypatch() -> Iterator[MonkeyPatch]:
    patch = MonkeyPatch()
    yield patch
    patch.undo()


BUILTIN = {
    "tmp_path": FixtureDef("tmp_path", _tmp_path, "function", False),
    "tmp_path_factory": FixtureDef("tmp_path_factory", _tmp_path_factory, "session", False),
    "monkeypatch": FixtureDef("monkeypatch", _monkeypatch, "function", False),
}


def main(paths: list[Path], conftest_path: Path, root: Path, emit: Callable[[Result], None], start: Callable[[str], None]) -> int:
    """pytest's exit codes: 0 all passed or skipped, 1 some failed, 5 no tests collected."""
    sys.modules["pytest"] = minitest
    spec = importlib.util.spec_from_file_location("conftest", conftest_path)
    conftest = importlib.util.module_from_spec(spec)
    sys.modules["conftest"] = conftest
    spec.loader.exec_module(conftest)
    items = collect(paths, conftest, root)
    base = Path(tempfile.mkdtemp(prefix="minitest-"))
    try:
        results = run(items, base, emit, start)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return 1 if any(r.outcome == "failed" for r in results) else 0 if results else 5
