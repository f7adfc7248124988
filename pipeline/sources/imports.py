"""Which third-party distributions an architecture imports, found from the imports actually made.

While an `ImportTracker` is active, every import statement (``builtins.__import__``) and every
``importlib.import_module`` call is seen with the module that makes it. An import made by the user's own code
(the architecture file, its sibling modules, a factory's module when it is not an installed package) of a
module that belongs to an installed distribution makes that distribution a requirement; imports made by
libraries themselves are theirs to declare (pip resolves them). The standard library, and torch and numpy
(which the handler needs anyway), are left out.
"""

from __future__ import annotations

import builtins
import functools
import hashlib
import importlib
import importlib.metadata
import json
import os
import sys
from pathlib import Path
from typing import Any

OWN = {"pipeline", "handlers", "marpipe_serving", "marpipe_handler", "__main__", "builtins", "importlib"}
SERVER_HAS = {"torch", "numpy"}  # the handler's own needs: every TorchServe that runs marpipe archives has them


CACHE = Path.home() / ".cache" / "marpipe"


@functools.cache
def _distributions() -> dict[str, list[str]]:
    """Top-level package → distributions, as `importlib.metadata.packages_distributions` finds them by reading
    every installed distribution's metadata (0.08–0.26 s a build). Kept on disk per interpreter and `sys.path`, with
    the mtimes of its folders (installing or removing a distribution changes its folder's entries, so its
    mtime): a build in a new process reads one small file instead."""
    folders = [(p, os.stat(p).st_mtime_ns) for p in sys.path if p and os.path.isdir(p)]
    key = hashlib.sha256(json.dumps([sys.executable, folders]).encode()).hexdigest()[:24]
    path = CACHE / f"distributions-{key}.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        pass
    found = importlib.metadata.packages_distributions()
    try:  # atomically: parallel builds may write it at once
        CACHE.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(found))
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only home: computed again next time
    return found


def distributions_of(module: str) -> list[str]:
    """The installed distributions that provide a module's top-level package ([] for stdlib or own code)."""
    return _distributions().get(module.partition(".")[0], [])


def _user_code(importer: str) -> bool:
    top = importer.partition(".")[0]
    return bool(top) and top not in OWN and top not in sys.stdlib_module_names and not distributions_of(top)


class ImportTracker:
    """Records the top-level modules that user code imports while active; re-entrant over several windows
    (importing the architecture, then each construction)."""

    def __init__(self, roots: tuple[str, ...] = ()) -> None:
        self.modules: set[str] = {r.partition(".")[0] for r in roots}  # imported on the user's behalf: a factory's package
        self._saved: list[tuple[Any, Any]] = []

    def __enter__(self) -> ImportTracker:
        original_import, original_import_module = builtins.__import__, importlib.import_module

        def hooked_import(name: str, globals: Any = None, locals: Any = None, fromlist: Any = (), level: int = 0) -> Any:
            module = original_import(name, globals, locals, fromlist, level)
            if level == 0 and _user_code((globals or {}).get("__name__", "")):
                self.modules.add(name.partition(".")[0])
            return module

        def hooked_import_module(name: str, package: str | None = None) -> Any:
            module = original_import_module(name, package)
            if not name.startswith(".") and _user_code(sys._getframe(1).f_globals.get("__name__", "")):
                self.modules.add(name.partition(".")[0])
            return module

        self._saved.append((original_import, original_import_module))
        builtins.__import__, importlib.import_module = hooked_import, hooked_import_module
        return self

    def __exit__(self, *exc: Any) -> None:
        builtins.__import__, importlib.import_module = self._saved.pop()

    def requirements(self) -> list[dict[str, str]]:
        """[{name, version}] of the distributions behind the recorded modules, sorted by name."""
        found: dict[str, str] = {}
        for module in self.modules:
            if module in sys.stdlib_module_names:
                continue
            for dist in distributions_of(module):
                try:
                    meta = importlib.metadata.metadata(dist)
                except importlib.metadata.PackageNotFoundError:
                    continue
                name = meta["Name"] or dist
                if name.lower() not in SERVER_HAS:
                    found[name] = meta["Version"]
        return [{"name": n, "version": v} for n, v in sorted(found.items(), key=lambda kv: kv[0].lower())]
