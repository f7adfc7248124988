"""Archives hold what their inputs determine: not the build machine's thread count, not `-j`, not the builds that
ran before in the same process.

A GRU over token ids (wide enough that torch's and onnxruntime's reductions split differently over one and two
threads) and a CNN, in every format, built three ways: all in one process on one thread, with `-j 2` on two
threads, and each spec alone in a process of its own. Two specs share the GRU's architecture with different
sequence lengths: a second export of one architecture in a process came out with its sequence length fixed.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from conftest import Project, marpipe, store_state

pytestmark = pytest.mark.slow
FORMATS = ("eager", "torchscript", "onnx")  # aoti: tests/test_aoti.py (it cannot keep the GRU's seq dynamic)


@pytest.fixture(scope="module")
def specs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Project, list[Path]]:
    project = Project(tmp_path_factory.mktemp("repro"))
    project.save(project.model("TokenGRU", vocab=200, dim=384).state_dict(), "gru.pth")
    project.save(project.model("TinyImage").state_dict(), "image.pth")
    ids = [{"name": "ids", "shape": ["batch", "seq"], "dtype": "int64", "range": [0, 200]}]
    wide = {"vocab": 200, "dim": 384}
    made = [
        project.spec(name=name, cls="TokenGRU", kwargs=wide, checkpoint={"path": "gru.pth"}, inputs=ids, dims={"seq": seq})
        for name, seq in (("gru", [3, 7]), ("gru2", [2, 5]))
    ]
    image = [{"name": "image", "shape": ["batch", 3, 16, 16]}]
    made.append(project.spec(name="cnn", cls="TinyImage", checkpoint={"path": "image.pth"}, inputs=image))
    return project, made


def _build(project: Project, store: str, *args: str, threads: str | None = None) -> dict[str, bytes]:
    env = {"OMP_NUM_THREADS": threads} if threads else {}
    done = marpipe("build", "--store", str(project.root / store), "--format", ",".join(FORMATS), *args, env=env)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return store_state(project.root / store)


def test_the_same_bytes_whatever_the_threads_jobs_and_builds_before(specs: tuple[Project, list[Path]]) -> None:
    project, made = specs
    together = _build(project, "one-thread", "-j", "1", *map(str, made), threads="1")
    assert sorted(together) == sorted([f"{s.stem}_{f}.mar" for s in made for f in FORMATS] + ["index.json"])
    parallel = _build(project, "two-jobs", "-j", "2", *map(str, made), threads="2")
    alone: dict[str, bytes] = {}
    for spec in made:  # each in a process of its own, with the machine's threads
        alone.update(_build(project, f"alone-{spec.stem}", str(spec), threads=str(os.cpu_count() or 2)))
    alone.pop("index.json")
    for name, data in together.items():
        assert parallel[name] == data, f"{name}: -j 2 on two threads differs from one process on one thread"
        if name != "index.json":
            assert alone[name] == data, f"{name}: built alone differs from built after other specs in one process"
