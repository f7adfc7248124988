"""The spec's model-facing parts: where the architecture comes from, and what parity feeds each input.

Parsed without importing anything from the model: a file's classes are found with `ast`, a transformers
folder's class from its config.json; imports happen later, in `pipeline.sources.arch`.
"""

from __future__ import annotations

import ast
import difflib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.spec.reader import Reader

IDENT_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
FACTORY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
PADDING_MASK = "padding_mask"
CAST_DTYPES = ("float32", "float64", "float16", "bfloat16")


@dataclass(frozen=True)
class Architecture:
    """Exactly one source: `file` (with `class_name`), `factory` ("package.module:name") or `transformers`
    (the folder holding config.json; `class_name` is then the transformers class)."""

    file: Path | None = None
    class_name: str | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)
    factory: str | None = None
    transformers: Path | None = None

    @property
    def source(self) -> str:
        return "file" if self.file is not None else "factory" if self.factory is not None else "transformers"

    @property
    def label(self) -> str:
        """What the messages call it: the class, the factory reference, or the transformers class."""
        return self.factory if self.factory is not None else str(self.class_name)


def parse_architecture(r: Reader, value: Any) -> Architecture:
    m = r.mapping(value, "architecture", ("file", "class", "factory", "transformers", "kwargs"))
    given = [k for k in ("file", "factory", "transformers") if m.get(k) is not None]
    if len(given) != 1:
        got = f"; got {' and '.join(given)}" if given else ""
        raise r.fail("architecture", f"give exactly one of file (with class), factory or transformers{got}")
    kwargs = dict(r.mapping(m.get("kwargs"), "architecture.kwargs", tuple(str(k) for k in (m.get("kwargs") or {}))))
    if given == ["factory"]:
        return Architecture(factory=_factory(r, m), kwargs=kwargs)
    if given == ["transformers"]:
        folder, class_name = _transformers(r, m)
        return Architecture(class_name=class_name, kwargs=kwargs, transformers=folder)
    if m.get("class") is None:
        raise r.fail("architecture.class", "required with architecture.file: the nn.Module subclass the file defines")
    file = r.file(m["file"], "architecture.file")
    class_name = r.str_(m["class"], "architecture.class")
    defined = _top_level_names(r, file, m["file"])
    if class_name not in defined:
        hint = difflib.get_close_matches(class_name, sorted(defined), n=1)
        extra = f"; did you mean '{hint[0]}'?" if hint else ""
        raise r.fail("architecture.class", f"{class_name!r} not defined in {m['file']}{extra}")
    return Architecture(file=file, class_name=class_name, kwargs=kwargs)


def _factory(r: Reader, m: dict) -> str:
    ref = r.str_(m["factory"], "architecture.factory")
    if m.get("class") is not None:
        raise r.fail("architecture.class", "not used with architecture.factory, which names what to call (e.g. torch.nn:Linear)")
    if not FACTORY_RE.match(ref):
        raise r.fail("architecture.factory", f"{ref!r} is not 'package.module:name' (e.g. torchvision.models:resnet18)")
    return ref


def _transformers(r: Reader, m: dict) -> tuple[Path, str]:
    """The save_pretrained folder and the class: architecture.class, else config.json's architectures[0]."""
    rel = r.str_(m["transformers"], "architecture.transformers")
    path = (r.base / rel).resolve()
    folder = path.parent if path.is_file() else path
    config = folder / "config.json"
    if not config.is_file() or (path.is_file() and path.name != "config.json"):
        raise r.fail("architecture.transformers", f"no config.json at {rel} (give a save_pretrained folder or its config.json)")
    try:
        doc = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise r.fail("architecture.transformers", f"{rel}: config.json is not readable JSON ({exc})") from None
    if m.get("class") is not None:
        class_name = r.str_(m["class"], "architecture.class")
    else:
        names = doc.get("architectures") if isinstance(doc, dict) else None
        if not names or not isinstance(names, list) or not isinstance(names[0], str):
            raise r.fail("architecture.class", "config.json names no architectures; set the class, e.g. AutoModelForSequenceClassification")
        class_name = names[0]
    if not IDENT_RE.match(class_name):
        raise r.fail("architecture.class", f"{class_name!r} is not a class name")
    return folder, class_name


def _top_level_names(r: Reader, file: Path, shown: str) -> set[str]:
    """Names bound at the top level of the architecture source, found without running it."""
    try:
        tree = ast.parse(file.read_text(encoding="utf-8"), filename=str(file))
    except SyntaxError as exc:
        raise r.fail("architecture.file", f"{shown}: syntax error at line {exc.lineno}: {exc.msg}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise r.fail("architecture.file", f"{shown}: cannot read: {exc}") from None
    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update(t.id for t in targets if isinstance(t, ast.Name))
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
    return names


def parse_generate(
    r: Reader, value: Any, where: str, dtype: str, dims: list[int | str], rng: tuple[float, float] | None
) -> str | tuple[float, float]:
    """padding_mask, or {range: [low, high]}; what it generates must pass the request rule (range)."""
    integer = dtype not in CAST_DTYPES and dtype != "bool"
    if value == PADDING_MASK:
        if len(dims) < 2:
            raise r.fail(where, "a padding mask needs a dimension to pad besides batch, e.g. shape: [batch, seq]")
        if integer and rng is not None and not (rng[0] <= 0 and rng[1] >= 2):
            raise r.fail(where, f"a padding mask holds 0 and 1, which range {list(rng)} refuses in requests; use range: [0, 2]")
        return PADDING_MASK
    if not isinstance(value, dict):
        raise r.fail(where, f"expected {PADDING_MASK} or {{range: [low, high]}}, got {value!r}"[:200])
    m = r.mapping(value, where, ("range",), ("range",))
    bounds = r.list_(m["range"], f"{where}.range")
    if len(bounds) != 2 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in bounds) or bounds[0] >= bounds[1]:
        raise r.fail(f"{where}.range", f"expected [low, high] with low < high, got {bounds!r}")
    if integer and not all(float(v).is_integer() for v in bounds):
        raise r.fail(f"{where}.range", f"an {dtype} input needs integer bounds, got {bounds!r}")
    if rng is not None and (bounds[0] < rng[0] or bounds[1] > rng[1]):
        raise r.fail(f"{where}.range", f"{bounds!r} reaches outside the input's range {list(rng)}, which requests must keep to")
    return (bounds[0], bounds[1])
