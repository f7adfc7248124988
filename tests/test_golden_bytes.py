"""Archives hold what their inputs determine: the same inputs give the same bytes as the recorded build.

`tests/data/golden_archives.json` holds, for tiny models built in every format, the sha256 of every archive entry
as marpipe wrote it when the record was made (2026-12-05, before `pipeline/` moved into subpackages: the move
changed no byte of these entries). Rewritten once since, when bytes were meant to change: `marpipe.json` lost the
measured parity errors (they depend on the machine's threads) and gained `serve.max_response_bytes` (issue 21).
A change that is meant to move code and not bytes (a refactor, a new layout of the source) keeps this test green.

Two parts of an archive follow marpipe's own source by design and are compared apart: the handler package
(`marpipe_handler.py`, `marpipe_serving/*`) must equal the files of `handlers/` in this checkout, and
`marpipe.json`'s `build_key` (it hashes marpipe's source, so that a new marpipe rebuilds) is left out, with the
sha256 it lists for those handler files. Rewrite the record (only when bytes are meant to change, and say why in
the commit): `MARPIPE_WRITE_GOLDEN=1 pytest tests/test_golden_bytes.py`.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import shutil
import zipfile
from pathlib import Path

import pytest
from conftest import ROOT, Project

GOLDEN = Path(__file__).resolve().parent / "data" / "golden_archives.json"
MODELS = GOLDEN.parent / "golden_models.py"  # tests/models/tiny.py as it was when the record was made: it is archived
HANDLERS = ROOT / "handlers"
VERSIONS = ("torch", "onnx", "onnxscript", "onnxruntime", "numpy")
pytestmark = pytest.mark.slow


def _is_handler(name: str) -> bool:
    return name == "marpipe_handler.py" or name.startswith("marpipe_serving/")


def _determined(path: Path) -> dict[str, str]:
    """sha256 of every entry that the build's inputs determine (see the module docstring)."""
    out: dict[str, str] = {}
    with zipfile.ZipFile(path) as z:
        for name in z.namelist():
            data = z.read(name)
            if _is_handler(name):
                assert data == (HANDLERS / name).read_bytes(), f"{path.name}: {name} is not the handler of this checkout"
                continue
            if name == "marpipe.json":
                meta = json.loads(data)
                meta.pop("build_key", None)
                meta["files"] = {k: v for k, v in meta["files"].items() if not _is_handler(k)}
                data = json.dumps(meta, sort_keys=True).encode()
            out[name] = hashlib.sha256(data).hexdigest()
    return out


def _versions() -> dict[str, str]:
    return {name: importlib.metadata.version(name) for name in VERSIONS}


def test_archives_are_byte_identical_to_the_record(linear_project: Project) -> None:
    shutil.copy(MODELS, linear_project.root / "models" / "tiny.py")
    two, dict_out = linear_project.multi_io_specs()
    spec = linear_project.spec()
    done = linear_project.build(spec, two, dict_out, "--format", "eager,torchscript,onnx")  # the record's formats (aoti: test_aoti.py)
    assert done.returncode == 0, done.stderr
    built = {p.name: _determined(p) for p in sorted(linear_project.store.glob("*.mar"))}
    assert len(built) == 9
    if os.environ.get("MARPIPE_WRITE_GOLDEN"):
        GOLDEN.write_text(json.dumps({"versions": _versions(), "archives": built}, indent=1, sort_keys=True) + "\n")
    record = json.loads(GOLDEN.read_text())
    if record["versions"] != _versions():
        pytest.skip(f"the record was made with {record['versions']}, this environment has {_versions()}")
    assert sorted(built) == sorted(record["archives"])
    for name, entries in record["archives"].items():
        assert built[name] == entries, f"{name}: entries differ from the record"
