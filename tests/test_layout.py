"""The house by the data's way: `pipeline/` in one folder per stage, no import circle, no import upwards.

Reads the imports of every module of `pipeline/` and `handlers/` (those inside functions too, so a lazy import
cannot hide a circle) and checks them against the floors each folder's `__init__.py` describes.
"""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import ROOT

# Low to high. A module imports from a lower floor, or from its own folder; never from a higher floor, nor from
# another folder of its own floor (`build` and `torchserve` stand beside each other, as do `sources` and `store`).
FLOORS = {
    "handlers": 0,
    "pipeline": 1,  # the ground modules at the top of the package: errors, digests, __init__
    "pipeline.spec": 2,
    "pipeline.sources": 3,
    "pipeline.store": 3,
    "pipeline.stages": 4,
    "pipeline.build": 5,
    "pipeline.torchserve": 5,
    "pipeline.cli": 6,
    "pipeline.__main__": 6,
}
TOP = {"__init__.py", "__main__.py", "cli.py", "errors.py", "digests.py"}


def _modules() -> dict[str, Path]:
    found = {}
    for top in ("pipeline", "handlers"):
        for path in sorted((ROOT / top).rglob("*.py")):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            found[name.removesuffix(".__init__")] = path
    return found


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        out |= {t for t in targets if t in known and t != name}
    return out


def _floor(name: str) -> tuple[str, int]:
    """(folder, floor) of a module: the longest FLOORS key it falls under."""
    key = max((k for k in FLOORS if name == k or name.startswith(k + ".")), key=len)
    return key, FLOORS[key]


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, set(modules)) for name, path in modules.items()}


def test_no_import_circle() -> None:
    graph = _graph()
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        path.append(m)
        for n in sorted(graph[m]):
            assert state.get(n) != 1, "import circle: " + " -> ".join(path[path.index(n) :] + [n])
            if n not in state:
                visit(n)
        path.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_no_import_from_a_lower_floor_to_a_higher_one() -> None:
    wrong = []
    for m, targets in _graph().items():
        folder, floor = _floor(m)
        for t in targets:
            tfolder, tfloor = _floor(t)
            package = t == tfolder and tfolder != "pipeline"  # `from pipeline.stages import load` names the package
            if tfolder != folder and not package and tfloor >= floor and not (tfolder == "pipeline" and floor >= 1):
                wrong.append(f"{m} ({folder}, floor {floor}) imports {t} ({tfolder}, floor {tfloor})")
    assert not wrong, "\n".join(wrong)


def test_pipeline_top_level_holds_only_the_entry_points_and_ground_modules() -> None:
    top = {p.name for p in (ROOT / "pipeline").glob("*.py")}
    assert top == TOP
    folders = {p.name for p in (ROOT / "pipeline").iterdir() if p.is_dir() and p.name != "__pycache__"}
    assert folders == {k.split(".")[1] for k in FLOORS if k.count(".") == 1 and (ROOT / k.replace(".", "/")).is_dir()}
    for folder in folders:
        doc = ast.get_docstring(ast.parse((ROOT / "pipeline" / folder / "__init__.py").read_text()))
        assert doc and "import" in doc, f"pipeline/{folder}/__init__.py: say what the folder owns and what it may import"


def test_every_import_of_our_packages_names_a_module_or_a_name_they_define() -> None:
    """`from pipeline import cache` after `cache` moved fails only when that line runs (often inside a function):
    every import from one of our packages, anywhere in a module, must name a submodule or a name of its
    `__init__.py`."""
    modules = _modules()
    packages = {m: p for m, p in modules.items() if p.name == "__init__.py"}
    defined = {}
    for m, p in packages.items():
        tree = ast.parse(p.read_text())
        defined[m] = {t.id for n in tree.body if isinstance(n, ast.Assign) for t in n.targets if isinstance(t, ast.Name)}
    wrong = []
    for m, path in modules.items():
        package = m if path.name == "__init__.py" else m.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.ImportFrom):
                continue
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            if base.split(".")[0] in ("pipeline", "handlers") and base not in modules:
                wrong.append(f"{m}: from {base} import ... (no such module)")
            elif base in packages:
                wrong += [
                    f"{m}: from {base} import {a.name}"
                    for a in node.names
                    if f"{base}.{a.name}" not in modules and a.name not in defined[base]
                ]
    assert not wrong, "\n".join(wrong)
