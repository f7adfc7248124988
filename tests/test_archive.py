"""Archives you can trust: contents, reproducible bytes, verify, atomic writes, concurrent builds."""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import signal
import subprocess
import sys
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from conftest import ROOT, Project, marpipe, store_state

from pipeline.errors import PackageError
from pipeline.sources import crc
from pipeline.store import archive, layout
from pipeline.store.archive import clean_leftovers
from pipeline.store.layout import verify


def _entries(archive: Path) -> dict[str, bytes]:
    with zipfile.ZipFile(archive) as z:
        return {i.filename: z.read(i.filename) for i in z.infolist()}


def test_archive_contents(linear_project: Project) -> None:
    assert linear_project.build(linear_project.spec(version="2.1")).returncode == 0
    entries = _entries(linear_project.store / "tiny.mar")
    serving = sorted(f"marpipe_serving/{p.name}" for p in (ROOT / "handlers" / "marpipe_serving").glob("*.py"))
    assert list(entries) == [
        "marpipe_handler.py",
        *serving,
        "model-config.yaml",
        "parity_inputs.npz",
        "parity_outputs.npz",
        "tiny.py",
        "weights.pt",
        "marpipe.json",
        "MAR-INF/MANIFEST.json",
    ]
    manifest = json.loads(entries["MAR-INF/MANIFEST.json"])
    assert manifest["model"] == {
        "modelName": "tiny",
        "serializedFile": "weights.pt",
        "handler": "marpipe_handler.py",
        "modelVersion": "2.1",
        "configFile": "model-config.yaml",
    }
    assert manifest["runtime"] == "python"
    meta = json.loads(entries["marpipe.json"])
    assert meta["architecture"] == {"source": "file", "file": "tiny.py", "class": "Linear", "kwargs": {}}
    assert meta["call"] == "keyword" and meta["requirements"] == []  # forward(x) takes the declared input by name; torch: the server's own
    assert meta["checkpoint"]["sha256"] == hashlib.sha256((linear_project.root / "tiny.pth").read_bytes()).hexdigest()
    assert {"torch", "marpipe"} <= set(meta["versions"])
    for name, digest in meta["files"].items():
        assert hashlib.sha256(entries[name]).hexdigest() == digest
    assert entries["model-config.yaml"].decode() == "minWorkers: 1\nmaxWorkers: 1\nbatchSize: 8\nmaxBatchDelay: 20\nresponseTimeout: 120\n"
    state = torch.load(io.BytesIO(entries["weights.pt"]), weights_only=True)
    assert sorted(state) == ["fc.bias", "fc.weight"]
    with zipfile.ZipFile(linear_project.store / "tiny.mar") as z:
        assert all(i.compress_type == zipfile.ZIP_STORED and i.date_time == (1980, 1, 1, 0, 0, 0) for i in z.infolist())


def test_reproducible_whatever_time_zone_folder_or_mtimes(linear_project: Project, tmp_path: Path) -> None:
    spec = linear_project.spec()
    assert linear_project.build(spec).returncode == 0
    first = (linear_project.store / "tiny.mar").read_bytes()
    for p in (linear_project.root / "tiny.pth", linear_project.root / "models" / "tiny.py"):
        os.utime(p, (1_000_000_000, 1_000_000_000))
    other = tmp_path / "elsewhere"
    other.mkdir()
    result = marpipe("build", "--store", str(tmp_path / "store2"), str(spec), env={"TZ": "Asia/Tokyo"}, cwd=other)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "store2" / "tiny.mar").read_bytes() == first
    result = marpipe("build", "--store", str(tmp_path / "store3"), str(spec), env={"SOURCE_DATE_EPOCH": "1700000000"})
    with zipfile.ZipFile(tmp_path / "store3" / "tiny.mar") as z:
        assert {i.date_time for i in z.infolist()} == {(2023, 11, 14, 22, 13, 20)}


def _rewrite(src: Path, dst: Path, change) -> None:
    with zipfile.ZipFile(src) as z, zipfile.ZipFile(dst, "w") as out:
        for info in z.infolist():
            name, data = change(info.filename, z.read(info.filename))
            if name is not None:
                out.writestr(name, data)


def test_verify_finds_every_fault(linear_project: Project, tmp_path: Path) -> None:
    assert linear_project.build(linear_project.spec()).returncode == 0
    good = linear_project.store / "tiny.mar"
    assert verify(good) == []
    flipped = tmp_path / "flipped.mar"
    data = bytearray(good.read_bytes())
    data[data.index(b"class Linear") + 2] ^= 0x20
    flipped.write_bytes(bytes(data))
    truncated = tmp_path / "truncated.mar"
    truncated.write_bytes(good.read_bytes()[:-200])
    traversal, swapped, no_manifest = tmp_path / "traversal.mar", tmp_path / "swapped.mar", tmp_path / "nomanifest.mar"
    _rewrite(good, traversal, lambda n, d: (n, d))
    with zipfile.ZipFile(traversal, "a") as z:
        z.writestr("../evil.py", b"print('x')")
    _rewrite(good, swapped, lambda n, d: (n, d.replace(b"Linear", b"Lineax") if n == "tiny.py" else d))
    _rewrite(good, no_manifest, lambda n, d: (None, d) if n.startswith("MAR-INF") else (n, d))
    expected = {
        flipped: "fails its CRC check",
        truncated: "truncated",
        traversal: "unsafe entry name '../evil.py'",
        swapped: "'tiny.py': sha256",
        no_manifest: "no MAR-INF/MANIFEST.json",
    }
    for path, fault in expected.items():
        faults = verify(path)
        assert any(fault in f for f in faults), (path.name, faults)
    result = marpipe("verify", str(good), *map(str, expected))
    assert result.returncode == 6
    assert result.stdout.count("FAIL") == len(expected) and f"ok   {good}" in result.stdout


def _big_project(project: Project) -> Path:
    """A Linear of 4096x4096 (64 MB) saved from DataParallel: the `module.` prefix makes the build re-save and
    stream the weights, so the package stage lasts long enough to be killed in."""
    state = project.model("Linear", n_in=4096, n_out=4096).state_dict()
    project.save({f"module.{k}": v for k, v in state.items()}, "big.pth")
    return project.spec(
        name="big",
        checkpoint={"path": "big.pth"},
        kwargs={"n_in": 4096, "n_out": 4096},
        inputs=[{"name": "x", "shape": ["batch", 4096]}],
        parity={"batch_sizes": [2], "samples": 1, "atol": 1e-4},
    )


def _stage_seconds(output: str, stage: str) -> float:
    line = next(ln for ln in output.splitlines() if ln.split()[1:3] == [stage, "ok"])
    return float(line.split()[3].rstrip("s"))


def test_kill_9_never_leaves_a_partial_archive(project: Project) -> None:
    """Builds killed at random moments, most of them inside the package stage (while the archive is written)."""
    spec = _big_project(project)
    first = project.build(spec)
    assert first.returncode == 0, first.stderr
    window = _stage_seconds(first.stdout, "package")
    previous = (project.store / "big.mar").read_bytes()
    rng = random.Random(7)
    trials, left_temp = 10, 0
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    for trial in range(trials):
        proc = subprocess.Popen(
            [sys.executable, "-m", "pipeline", "build", "--force", "--store", str(project.store), str(spec)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            cwd=ROOT,
            text=True,
        )
        if trial < 2:  # anywhere in the build
            time.sleep(rng.uniform(0.5, 3.0))
        else:  # once parity has passed, somewhere in the package stage
            for line in proc.stdout:
                if line.split()[1:3] == ["parity", "ok"]:
                    break
            time.sleep(rng.uniform(0, window))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
        assert sorted(p.name for p in project.store.glob("*.mar")) == ["big.mar"]
        assert (project.store / "big.mar").read_bytes() == previous  # reproducible, so a finished rebuild is identical
        left_temp += any(p.name.endswith(".tmp") for p in project.store.iterdir())
    assert left_temp > 0  # the kills did land while an archive was being written
    assert project.build(spec, "--force").returncode == 0
    assert sorted(p.name for p in project.store.iterdir()) == ["big.mar", "index.json"]  # no temporary or lock file
    assert verify(project.store / "big.mar") == []
    import tempfile

    staging = [p for p in Path(tempfile.gettempdir()).glob("marpipe-*-big-*") if p.is_dir()]
    assert staging == []  # killed builds' private staging folders are cleaned too
    print(f"kill -9 trials: {trials}, killed while writing the archive: {left_temp}, partial or changed archives: 0")


def test_leftovers_of_dead_builds_are_cleaned(tmp_path: Path) -> None:
    """Under the archive's lock every other temporary file of it is a dead build's, whatever pid it names
    (a live build in another container may share ours)."""
    target = tmp_path / "m.mar"
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = [tmp_path / f".m.mar.{dead.pid}.tmp", tmp_path / f".m.mar.{os.getppid()}.tmp"]
    for p in stale:
        p.write_bytes(b"partial")
    mine, other = tmp_path / f".m.mar.{os.getpid()}.tmp", tmp_path / ".n.mar.1.tmp"
    mine.write_bytes(b"this build's")
    other.write_bytes(b"another archive's")
    clean_leftovers(target, keep=mine)
    assert not any(p.exists() for p in stale) and mine.exists() and other.exists()


def test_two_builds_of_one_archive_never_write_at_once(tmp_path: Path) -> None:
    """The second waits for the first's lock before it touches the temporary file (same pid or not)."""
    import threading

    src, _, known = _random_file(tmp_path, 50_000)
    target, order = tmp_path / "store" / "a.mar", []
    first_open, release = threading.Event(), threading.Event()

    def first() -> None:
        with archive.begin(target, ("w.bin", src, known)) as draft:
            order.append("first begun")
            first_open.set()
            release.wait(10)
            draft.finish({"w.bin": src}, {"who": 1}, archive.manifest("a", "1", "w.bin", "w.bin"))
            order.append("first done")

    t = threading.Thread(target=first)
    t.start()
    first_open.wait(10)
    threading.Timer(0.3, release.set).start()
    with archive.begin(target, ("w.bin", src, known)) as draft:
        order.append("second begun")
        draft.finish({"w.bin": src}, {"who": 2}, archive.manifest("a", "1", "w.bin", "w.bin"))
    t.join()
    assert order == ["first begun", "first done", "second begun"]
    assert json.loads(_entries(target)["marpipe.json"])["who"] == 2
    assert [f for f in verify(target) if "MANIFEST" not in f] == []


def test_concurrent_builds_never_mix_files(project: Project) -> None:
    """Six builds of one name with different weights, and six of different names, all into one store at once."""
    jobs = []
    for i in range(6):
        model = project.model("Linear")
        torch.nn.init.normal_(model.fc.weight, generator=torch.Generator().manual_seed(i))
        project.save(model.state_dict(), f"w{i}.pth")
        jobs.append(project.spec(name=f"m{i}", checkpoint={"path": f"w{i}.pth"}))
        same = project.spec(name="same", checkpoint={"path": f"w{i}.pth"})
        jobs.append(same.rename(project.root / f"same{i}.yaml"))
    with ThreadPoolExecutor(max_workers=6) as pool:
        results = list(pool.map(lambda s: project.build(s), jobs))
    assert all(r.returncode == 0 for r in results), [r.stderr for r in results if r.returncode]
    assert sorted(p.name for p in project.store.glob("*.mar")) == sorted(["same.mar"] + [f"m{i}.mar" for i in range(6)])
    for mar in project.store.glob("*.mar"):
        assert verify(mar) == []
        entries = _entries(mar)
        meta = json.loads(entries["marpipe.json"])
        source_name = meta["checkpoint"]["path"]
        if mar.name != "same.mar":
            assert source_name == f"w{mar.stem[1:]}.pth"
        source = project.root / source_name
        assert meta["checkpoint"]["sha256"] == hashlib.sha256(source.read_bytes()).hexdigest()
        weights = torch.load(io.BytesIO(entries["weights.pt"]), weights_only=True)
        expected = torch.load(source, weights_only=True)
        assert all(torch.equal(weights[k], expected[k]) for k in expected)  # weights and metadata from one build
    assert not [p for p in project.store.iterdir() if p.name.endswith(".tmp")]
    index = json.loads((project.store / "index.json").read_text())["archives"]  # parallel builders lost no entry
    assert {e["file"]: e["sha256"] for e in index} == {p.name: layout.digest(p)[1] for p in project.store.glob("*.mar")}
    assert sorted(p.name for p in project.store.iterdir()) == sorted(["index.json", "same.mar"] + [f"m{i}.mar" for i in range(6)])


@pytest.mark.parametrize("fixture", ["linear_project"])
def test_inspect(fixture: str, request) -> None:
    project = request.getfixturevalue(fixture)
    torch.save({"state_dict": {f"module.{k}": v for k, v in project.model("Linear").state_dict().items()}}, project.root / "n.pth")
    result = marpipe("inspect", "--json", str(project.root / "n.pth"))
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["format"] == "torch-zip" and info["nested_key"] == "state_dict"
    assert info["detected_prefixes"] == ["module."] and info["parameter_count"] == 10
    assert info["tensors"]["module.fc.weight"] == {"shape": [2, 4], "dtype": "float32"}
    text = marpipe("inspect", str(project.root / "n.pth")).stdout
    assert "module.fc.weight" in text and "parameters   10" in text


def test_plain_checkpoint_is_archived_as_it_is_and_a_prefixed_one_normalised(project: Project) -> None:
    state = project.model("Linear").state_dict()
    project.save(state, "plain.pth")
    project.save({f"module.{k}": v for k, v in state.items()}, "ddp.pth")
    assert project.build(project.spec(name="plain", checkpoint={"path": "plain.pth"})).returncode == 0
    assert project.build(project.spec(name="ddp", checkpoint={"path": "ddp.pth"})).returncode == 0
    assert _entries(project.store / "plain.mar")["weights.pt"] == (project.root / "plain.pth").read_bytes()
    ddp = torch.load(io.BytesIO(_entries(project.store / "ddp.mar")["weights.pt"]), weights_only=True)
    assert sorted(ddp) == ["fc.bias", "fc.weight"]
    assert verify(project.store / "plain.mar") == [] and verify(project.store / "ddp.mar") == []


def test_known_digest_copy_falls_back_without_copy_file_range(tmp_path: Path, monkeypatch) -> None:
    import zlib

    from pipeline.store import archive

    data = os.urandom(3 * archive.CHUNK + 5)
    src = tmp_path / "w.bin"
    src.write_bytes(data)
    st = src.stat()
    known = archive.Known(hashlib.sha256(data).hexdigest(), zlib.crc32(data), (st.st_size, st.st_mtime_ns))

    def refuse(*args, **kwargs):
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr(os, "copy_file_range", refuse)
    archive.write_archive(tmp_path / "a.mar", {"w.bin": src}, {}, archive.manifest("a", "1", "w.bin", "w.bin"), ("w.bin", src, known))
    assert _entries(tmp_path / "a.mar")["w.bin"] == data
    assert [f for f in verify(tmp_path / "a.mar") if "MANIFEST" not in f] == []  # CRC and hash right
    os.utime(src, ns=(1, 1))
    with pytest.raises(Exception, match="changed while the build was running"):
        archive.write_archive(tmp_path / "b.mar", {"w.bin": src}, {}, b"{}", ("w.bin", src, known))
    assert not (tmp_path / "b.mar").exists()


def test_user_handler_is_packaged_beside_ours(linear_project: Project) -> None:
    handler = linear_project.root / "my_handler.py"
    handler.write_text("from marpipe_handler import handle as _handle\n\n\ndef handle(data, context):\n    return _handle(data, context)\n")
    helper = linear_project.root / "labels.txt"
    helper.write_text("cat\ndog\n")
    spec = linear_project.spec(serve={"handler": "my_handler.py", "extra_files": ["labels.txt"]})
    assert linear_project.build(spec).returncode == 0
    entries = _entries(linear_project.store / "tiny.mar")
    assert json.loads(entries["MAR-INF/MANIFEST.json"])["model"]["handler"] == "my_handler.py"
    assert {"my_handler.py", "marpipe_handler.py", "labels.txt"} <= set(entries)
    clash = linear_project.spec(name="clash", serve={"extra_files": ["models/tiny.py"]})
    result = linear_project.build(clash)
    assert result.returncode == 2 and "serve.extra_files[0]: 'tiny.py' clashes with another archive entry" in result.stderr


def test_weights_are_copied_during_parity_and_a_parity_failure_meanwhile_leaves_nothing(project: Project) -> None:
    """An eager build copies the checkpoint into the archive while parity runs: its data comes first in the
    file, the directory stays in name order. A parity failure during the copy leaves the store as it was."""
    project.save(project.model("Linear").state_dict(), "tiny.pth")
    result = project.build(project.spec())
    assert result.returncode == 0 and "weights.pt copied during parity" in result.stdout, result.stdout + result.stderr
    with zipfile.ZipFile(project.store / "tiny.mar") as z:
        infos = z.infolist()
    assert [i.filename for i in infos][-2:] == ["marpipe.json", "MAR-INF/MANIFEST.json"]
    assert next(i for i in infos if i.filename == "weights.pt").header_offset == 0
    assert _entries(project.store / "tiny.mar")["weights.pt"] == (project.root / "tiny.pth").read_bytes()
    assert verify(project.store / "tiny.mar") == []

    before = store_state(project.store)
    project.save(project.model("Noisy").state_dict(), "noisy.pth")
    noisy = project.spec(name="tiny", cls="Noisy", checkpoint={"path": "noisy.pth"})
    result = project.build(noisy)
    assert result.returncode == 5, result.stderr
    assert store_state(project.store) == before  # no temporary file either
    fresh = project.root / "new-store"
    assert marpipe("build", "--store", str(fresh), str(noisy)).returncode == 5
    assert store_state(fresh) == {}  # no archive, no temporary file, no lock file (the empty folder may stay)


def _random_file(folder: Path, size: int) -> tuple[Path, bytes, archive.Known]:
    """A file of random bytes with its digests, as the load stage would have computed them."""
    import zlib

    data = os.urandom(size)
    src = folder / "w.bin"
    src.write_bytes(data)
    st = src.stat()
    return src, data, archive.Known(hashlib.sha256(data).hexdigest(), zlib.crc32(data), (st.st_size, st.st_mtime_ns))


def test_copy_ahead_errors_surface_when_packaging_and_leave_nothing(tmp_path: Path) -> None:
    src, data, known = _random_file(tmp_path, 100_000)
    manifest = archive.manifest("a", "1", "w.bin", "w.bin")

    with archive.begin(tmp_path / "store" / "a.mar", ("w.bin", src, known)) as draft:
        draft.finish({"w.bin": src}, {}, manifest)
    assert _entries(tmp_path / "store" / "a.mar")["w.bin"] == data
    assert [f for f in verify(tmp_path / "store" / "a.mar") if "MANIFEST" not in f] == []

    blocked = tmp_path / "a-file"
    blocked.write_text("not a folder")
    with pytest.raises(PackageError, match="cannot write there"), archive.begin(blocked / "b.mar", ("w.bin", src, known)) as draft:
        draft.finish({"w.bin": src}, {}, manifest)

    os.utime(src, ns=(1, 1))
    with pytest.raises(PackageError, match="changed while the build was running"):
        with archive.begin(tmp_path / "other" / "c.mar", ("w.bin", src, known)) as draft:
            draft.finish({"w.bin": src}, {}, manifest)
    assert store_state(tmp_path / "other") == {}

    with pytest.raises(RuntimeError), archive.begin(tmp_path / "store" / "d.mar", ("w.bin", src, known._replace(stat=(len(data), 1)))):
        raise RuntimeError("parity failed")  # left without finishing: the copy stops, its file goes
    assert store_state(tmp_path / "store").keys() == {"a.mar"}


def test_crc_of_parts_combines_into_the_crc_of_the_whole() -> None:
    import zlib

    rng = random.Random(0)
    for _ in range(200):
        a, b = rng.randbytes(rng.randint(0, 3000)), rng.randbytes(rng.choice([0, 1, 7, rng.randint(0, 70_000)]))
        assert crc.combine(zlib.crc32(a), zlib.crc32(b), len(b)) == zlib.crc32(a + b)


def test_scan_gives_the_whole_files_sha256_and_crc_in_one_pass(project: Project) -> None:
    import zlib

    from safetensors.torch import save_file

    from pipeline.sources.checkpoint import _segments, scan

    state = {f"layer{i}.weight": torch.randn(64, 64) for i in range(5)}
    paths = [(project.save(state, "zip.pth"), "torch-zip"), (project.root / "w.safetensors", "safetensors")]
    save_file(state, paths[1][0])
    torch.save(state, project.root / "legacy.pth", _use_new_zipfile_serialization=False)
    paths.append((project.root / "legacy.pth", "torch-legacy"))
    for path, fmt in paths:
        data = path.read_bytes()
        assert scan(path, fmt) == (hashlib.sha256(data).hexdigest(), zlib.crc32(data)), fmt
    import mmap
    from unittest import mock

    with mock.patch.object(mmap, "mmap", side_effect=OSError(19, "No such device")):  # a file system that cannot map
        data = paths[0][0].read_bytes()
        assert scan(paths[0][0], "torch-zip") == (hashlib.sha256(data).hexdigest(), zlib.crc32(data))
    assert _segments([(10, 20, 0, "a"), (15, 30, 0, "b")], 40) is None  # overlapping entries: refused
    assert _segments([(10, 50, 0, "a")], 40) is None  # past the end of the file
    assert _segments([(10, 20, 7, "a")], 25) == [(0, 10, 0, None), (10, 20, 7, "a"), (20, 25, 0, None)]
