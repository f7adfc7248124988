"""`marpipe build --layout dir`: a folder archive with the .mar's entries, complete or absent, reproducible,
verified, served (smoke) without TorchServe extracting it."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import pytest
from conftest import ROOT, Project, marpipe

from pipeline.store import archive_dir, layout
from pipeline.store.layout import verify


def _tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Project:
    project = Project(tmp_path_factory.mktemp("layout"))
    project.save(project.model("Linear").state_dict(), "tiny.pth")
    spec = project.spec(serve={"batch_size": 4})
    for kind in ("mar", "dir"):
        result = marpipe("build", "--store", str(project.root / kind), "--layout", kind, str(spec))
        assert result.returncode == 0, result.stdout + result.stderr
    return project


def test_the_folder_holds_the_mar_entries_byte_for_byte(built: Project) -> None:
    folder, mar = built.root / "dir" / "tiny", built.root / "mar" / "tiny.mar"
    with zipfile.ZipFile(mar) as z:
        entries = {n: z.read(n) for n in z.namelist()}
    tree = _tree(folder)
    metas = [json.loads(files.pop("marpipe.json")) for files in (tree, entries)]
    assert tree == entries  # one decision of the entries, two ways of writing them
    keys = [m.pop("build_key") for m in metas]
    assert metas[0] == metas[1] and keys[0] != keys[1]  # the layout is part of the build key: a cached .mar is no folder
    assert sorted(p.name for p in (built.root / "dir").iterdir() if not p.name.startswith(".")) == ["index.json", "tiny"]
    result = marpipe("verify", str(folder), str(mar))
    assert result.returncode == 0 and result.stdout.count("ok ") == 2, result.stdout
    assert {oct(p.stat().st_mode & 0o777) for p in folder.rglob("*")} == {"0o644", "0o755"}


def test_rebuilt_in_place_identical_and_swapped_whole(built: Project) -> None:
    folder = built.root / "dir" / "tiny"
    before, inode, digest = _tree(folder), folder.stat().st_ino, archive_dir.tree_digest(folder)
    result = marpipe("build", "--force", "--store", str(built.root / "dir"), "--layout", "dir", str(built.root / "tiny.yaml"))
    assert result.returncode == 0, result.stderr
    assert _tree(folder) == before and folder.stat().st_ino != inode  # a new folder, put in place whole
    assert archive_dir.tree_digest(folder) == digest and digest[0] == sum(len(b) for b in before.values())
    assert not [p for p in folder.parent.iterdir() if p.name.endswith((".tmp", ".old"))]


def test_verify_finds_every_fault_and_ignores_the_bytecode_cache(built: Project, tmp_path: Path) -> None:
    good = built.root / "dir" / "tiny"

    def variant(change) -> Path:
        path = tmp_path / f"v{len(list(tmp_path.iterdir()))}" / "tiny"
        shutil.copytree(good, path)
        change(path)
        return path

    def flip(p: Path) -> None:
        data = bytearray((p / "weights.pt").read_bytes())
        data[len(data) // 2] ^= 1
        (p / "weights.pt").write_bytes(bytes(data))

    cases = {
        "sha256": variant(flip),
        "not listed": variant(lambda p: (p / "extra.py").write_text("x = 1\n")),
        "missing": variant(lambda p: (p / "model-config.yaml").unlink()),
        "symbolic link": variant(lambda p: ((p / "tiny.py").unlink(), (p / "tiny.py").symlink_to("/etc/hostname"))),
        "MANIFEST": variant(lambda p: (p / "MAR-INF" / "MANIFEST.json").unlink()),
    }
    for fault, path in cases.items():
        faults = verify(path)
        assert faults and any(fault in f for f in faults), (fault, faults)
    result = marpipe("verify", *map(str, cases.values()))  # the command finds each of them too
    assert result.returncode == 6 and result.stdout.count("FAIL") == len(cases), result.stdout
    cached = variant(lambda p: ((p / "__pycache__").mkdir(), (p / "__pycache__" / "tiny.cpython-311.pyc").write_bytes(b"x")))
    assert verify(cached) == []
    assert archive_dir.tree_digest(cached) == archive_dir.tree_digest(good) == layout.digest(cached)  # one rule


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "fallback"])
def test_replacing_a_folder_never_shows_a_half_one(tmp_path: Path, monkeypatch, exchange: bool) -> None:
    """A reader looking all the time sees the old folder or the new one, whole (the fallback: or none)."""
    if not exchange:
        monkeypatch.setattr(archive_dir, "exchange", lambda a, b: False)
    target = tmp_path / "m"
    names = sorted(f"f{i}" for i in range(40))
    seen: list[object] = []
    stop = threading.Event()

    def look() -> None:
        """Open the folder by its name, read it through that handle, and keep the observation only if the
        name still means the same folder afterwards (else it was swapped meanwhile: no claim either way)."""
        while not stop.is_set():
            try:
                fd = os.open(target, os.O_RDONLY | os.O_DIRECTORY)
            except FileNotFoundError:
                seen.append(None)
                continue
            try:
                files = sorted(os.listdir(fd))
                texts = set()
                for n in files if files == names else []:
                    with open(n, opener=lambda path, flags: os.open(path, flags, dir_fd=fd)) as f:  # noqa: B023
                        texts.add(f.read())
                if os.stat(target).st_ino == os.fstat(fd).st_ino:
                    seen.append(texts if files == names else files)
            except FileNotFoundError:
                pass  # the folder we opened was swapped out and removed while we read it
            finally:
                os.close(fd)

    def put(generation: int) -> None:
        tmp = tmp_path / f".m.{os.getpid()}.tmp"
        tmp.mkdir()
        for n in names:
            (tmp / n).write_text(str(generation))
        archive_dir.put_in_place(tmp, target)

    put(0)
    reader = threading.Thread(target=look)
    reader.start()
    try:
        for generation in range(1, 30):
            put(generation)
    finally:
        stop.set()
        reader.join()
    whole = [s for s in seen if isinstance(s, set)]
    assert whole and all(len(s) == 1 for s in whole)  # never a mix of two generations
    others = [s for s in seen if not isinstance(s, set)]
    assert all(s is None for s in others) and (not others if exchange else True), others[:3]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_kill_9_never_leaves_a_partial_folder(project: Project) -> None:
    """Builds of a 64 MB model killed inside the package stage: the folder is the previous one, whole."""
    state = project.model("Linear", n_in=4096, n_out=4096).state_dict()
    project.save({f"module.{k}": v for k, v in state.items()}, "big.pth")  # re-saved, so the package stage lasts
    spec = project.spec(
        name="big",
        checkpoint={"path": "big.pth"},
        kwargs={"n_in": 4096, "n_out": 4096},
        inputs=[{"name": "x", "shape": ["batch", 4096]}],
        parity={"batch_sizes": [2], "samples": 1, "atol": 1e-4},
    )
    assert project.build("--layout", "dir", spec).returncode == 0
    previous = _tree(project.store / "big")
    rng = random.Random(11)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    for _ in range(4):
        cmd = [sys.executable, "-m", "pipeline", "build", "--force", "--layout", "dir", "--store", str(project.store), str(spec)]
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd=ROOT, text=True)
        for line in proc.stdout:
            if line.split()[1:3] == ["parity", "ok"]:
                break
        time.sleep(rng.uniform(0, 0.3))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
        assert sorted(p.name for p in project.store.iterdir() if not p.name.startswith(".")) == ["big", "index.json"]
        assert _tree(project.store / "big") == previous
    assert project.build("--force", "--layout", "dir", spec).returncode == 0
    assert sorted(p.name for p in project.store.iterdir()) == ["big", "index.json"]  # the killed builds' leftovers gone
    assert verify(project.store / "big") == []


@pytest.mark.slow
def test_smoke_serves_both_layouts_from_one_store(built: Project, tmp_path: Path) -> None:
    store = tmp_path / "store"
    store.mkdir()
    shutil.copy(built.root / "mar" / "tiny.mar", store / "tiny.mar")
    spec = built.spec(name="tiny_dir")
    result = marpipe("build", "--store", str(store), "--layout", "dir", str(spec))
    assert result.returncode == 0, result.stderr
    result = marpipe("smoke", "--store", str(store), timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count(" ok ") == 4 and "tiny_dir" in result.stdout
    # TorchServe serves the folder itself (a link to it, no extracted copy): Python may write its bytecode
    # cache there when the worker imports the handler; the archive still verifies
    assert verify(store / "tiny_dir") == []


def test_a_store_holds_one_archive_per_model_whatever_its_layout(built: Project, tmp_path: Path) -> None:
    """Building the other layout of a model replaces its archive: serving both would register it twice."""
    store = tmp_path / "both"
    spec = str(built.root / "tiny.yaml")
    assert marpipe("build", "--store", str(store), spec).returncode == 0
    assert marpipe("build", "--store", str(store), "--layout", "dir", spec).returncode == 0
    assert sorted(p.name for p in store.iterdir()) == ["index.json", "tiny"]
    assert [e["file"] for e in json.loads((store / "index.json").read_text())["archives"]] == ["tiny"]
    assert marpipe("build", "--store", str(store), spec).returncode == 0
    assert sorted(p.name for p in store.iterdir()) == ["index.json", "tiny.mar"]
