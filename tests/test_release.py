"""Release jobs: reproducible archives in every format, a clean store, parallel and sharded builds, the build
cache, CI reports, the store index, and the CI workflow."""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
import time
import xml.etree.ElementTree as ET
import zipfile
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, Project, marpipe, store_state

from pipeline import digests
from pipeline.build import cache, release
from pipeline.cli import parser
from pipeline.spec.spec import FORMATS, load_spec
from pipeline.store import archive, index, layout

# The formats whose archives record no path of the build machine; an aoti package is native code that names the
# torch headers it was compiled against (its rebuilds: tests/test_aoti.py).
PORTABLE = ("eager", "torchscript", "onnx")


def _meta(mar: Path) -> dict:
    with zipfile.ZipFile(mar) as z:
        return json.loads(z.read("marpipe.json"))


def _two_specs(project: Project) -> tuple[Path, Path]:
    project.save(project.model("Linear").state_dict(), "tiny.pth")
    project.save(project.model("Linear", n_out=3).state_dict(), "two.pth")
    return project.spec(), project.spec(name="deep", kwargs={"n_out": 3}, checkpoint={"path": "two.pth"})


def test_every_format_is_byte_identical_whatever_hash_seed_folder_store_or_mtimes(linear_project: Project, tmp_path: Path) -> None:
    spec = linear_project.spec()
    first = marpipe("build", "--format", ",".join(PORTABLE), "--store", str(tmp_path / "a"), str(spec), env={"PYTHONHASHSEED": "1"})
    assert first.returncode == 0, first.stderr
    moved = tmp_path / "elsewhere" / "project"  # the same files at another path, older mtimes
    shutil.copytree(linear_project.root, moved, ignore=shutil.ignore_patterns("store"))
    for p in moved.rglob("*"):
        os.utime(p, (1_000_000_000, 1_000_000_000))
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    env = {"PYTHONHASHSEED": "2", "TZ": "Asia/Tokyo"}
    second = marpipe("build", "--format", ",".join(PORTABLE), "--store", "../b", "../elsewhere/project/tiny.yaml", env=env, cwd=cwd)
    assert second.returncode == 0, second.stderr
    for fmt in PORTABLE:
        a, b = (tmp_path / "a" / f"tiny_{fmt}.mar").read_bytes(), (tmp_path / "b" / f"tiny_{fmt}.mar").read_bytes()
        assert a == b, f"{fmt} archives differ"
        for folder in (linear_project.root, moved, ROOT, Path(sys.prefix)):
            assert str(folder).encode() not in a, f"{fmt} archive records the path {folder}"
    with zipfile.ZipFile(tmp_path / "a" / "tiny_torchscript.mar") as z, zipfile.ZipFile(io.BytesIO(z.read("model.pt"))) as ts:
        names = ts.namelist()
    assert not [n for n in names if n.endswith(".debug_pkl")] and any("code/__torch__/marpipe_arch_" in n for n in names)
    module = "marpipe_arch_" + hashlib.sha256((linear_project.root / "models" / "tiny.py").read_bytes()).hexdigest()[:12]
    assert any(module in n for n in names)  # named after the source's content, not Python's salted hash
    with zipfile.ZipFile(tmp_path / "a" / "tiny_onnx.mar") as z:
        assert b"pkg.torch.onnx.stack_trace" not in z.read("model.onnx") and module.encode() in z.read("model.onnx")


def test_torchscript_archive_does_not_depend_on_what_the_process_built_before(project: Project, tmp_path: Path) -> None:
    """TorchScript mangles a class name that its compilation unit already holds (`___torch_mangle_<N>`, N counting
    every clash in the process): each export gets a unit of its own, so one build of several specs and a
    build of one give the same bytes."""
    tiny, deep = _two_specs(project)
    together = marpipe("build", "--format", "torchscript", "--store", str(tmp_path / "a"), str(tiny), str(deep))
    alone = marpipe("build", "--format", "torchscript", "--store", str(tmp_path / "b"), str(deep))
    assert together.returncode == alone.returncode == 0, together.stderr + alone.stderr
    assert (tmp_path / "a" / "deep.mar").read_bytes() == (tmp_path / "b" / "deep.mar").read_bytes()
    with zipfile.ZipFile(tmp_path / "a" / "deep.mar") as z, zipfile.ZipFile(io.BytesIO(z.read("model.pt"))) as ts:
        assert not [n for n in ts.namelist() if "___torch_mangle" in n]


def test_the_lock_admits_one_holder_and_leaves_no_file(tmp_path: Path) -> None:
    """Owners unlink the lock file as they let go; a waiter granted the lock on an unlinked file starts again."""
    lock = tmp_path / ".m.mar.lock"
    inside, worst, errors = [0], [0], []

    def worker() -> None:
        try:
            for _ in range(40):
                with archive.hold(lock):
                    inside[0] += 1
                    worst[0] = max(worst[0], inside[0])
                    time.sleep(0.0005)
                    inside[0] -= 1
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and worst[0] == 1
    assert list(tmp_path.iterdir()) == []


def test_store_holds_only_archives_after_ok_unchanged_and_failed_builds(project: Project) -> None:
    project.save(project.model("Linear").state_dict(), "tiny.pth")
    assert project.build(project.spec()).returncode == 0
    assert sorted(store_state(project.store)) == ["index.json", "tiny.mar"]
    before = store_state(project.store)
    assert "unchanged" in project.build(project.spec()).stdout
    assert store_state(project.store) == before
    project.save(project.model("Noisy").state_dict(), "noisy.pth")
    failed = project.build(project.spec(name="tiny", cls="Noisy", checkpoint={"path": "noisy.pth"}))
    assert failed.returncode == 5
    assert store_state(project.store) == before  # byte for byte, hidden files included
    project.save({"not": "a state_dict"}, "bad.pth")
    bad = project.build(project.spec(name="other", checkpoint={"path": "bad.pth"}))
    assert bad.returncode == 3 and store_state(project.store) == before


def test_shards_split_the_plan_by_archive_name_whatever_the_argument_order(project: Project) -> None:
    paths = _two_specs(project)
    specs = [load_spec(p) for p in paths]
    every = sorted(j.name for j in release.plan(specs, list(FORMATS)))
    for n in (1, 2, 3, 5):
        shards = [sorted(j.name for j in release.plan(specs, list(FORMATS), (i, n))) for i in range(1, n + 1)]
        reverse = [sorted(j.name for j in release.plan(specs[::-1], list(FORMATS), (i, n))) for i in range(1, n + 1)]
        assert shards == reverse
        assert sorted(name for s in shards for name in s) == every  # each archive exactly once
    with pytest.raises(SystemExit):
        parser().parse_args(["build", "x.yaml", "--shard", "3/2"])
    assert parser().parse_args(["build", "x.yaml", "--shard", "2/3", "-j", "2"]).shard == (2, 3)


def test_parallel_build_lines_whole_first_failure_in_spec_order_and_ci_reports(project: Project) -> None:
    ok, deep = _two_specs(project)
    project.save(project.model("Noisy").state_dict(), "noisy.pth")
    noisy = project.spec(name="noisy", cls="Noisy", checkpoint={"path": "noisy.pth"})  # parity fails: exit 5
    project.save({"not": "a state_dict"}, "bad.pth")
    bad = project.spec(name="bad", checkpoint={"path": "bad.pth"})  # checkpoint rejected: exit 3, fails first
    junit, summary, report = project.root / "out" / "junit.xml", project.root / "summary.md", project.root / "report.json"
    summary.write_text("# earlier step\n")
    options = ["--format", "eager,torchscript", "-j", "2", "--junit", str(junit), "--summary", str(summary), "--report", str(report)]
    result = project.build(ok, noisy, bad, deep, *options)
    assert result.returncode == 5, result.stdout + result.stderr  # noisy comes before bad in spec order
    names = {f"{n}_{f}" for n in ("tiny", "deep", "noisy", "bad") for f in ("eager", "torchscript")}
    for line in result.stdout.splitlines()[:-1]:
        assert re.match(r"^(\S+) ", line) and line.split()[0] in names or re.match(r"^  [✓✗] (\S+)/", line), line
        name = line.split()[0] if not line.startswith("  ") else line.split()[1].split("/")[0]
        assert name in names, line
    assert result.stdout.splitlines()[-1].startswith("4 built, 0 unchanged, 4 failed of 8 archives")
    for line in result.stderr.strip().splitlines():
        assert re.match(r"^error: (noisy|bad)_(eager|torchscript)\b", line), line
    assert sorted(p.name for p in project.store.iterdir()) == sorted(
        ["index.json", "tiny_eager.mar", "tiny_torchscript.mar", "deep_eager.mar", "deep_torchscript.mar"]
    )

    builds = json.loads(report.read_text())["builds"]
    assert [b["name"] for b in builds] == [f"{n}_{f}" for n in ("tiny", "noisy", "bad", "deep") for f in ("eager", "torchscript")]
    assert [b["status"] for b in builds] == ["ok", "ok", "failed", "failed", "failed", "failed", "ok", "ok"]
    assert all(len(b["build_key"]) == 64 for b in builds)
    assert builds[0]["build_key"] == _meta(project.store / "tiny_eager.mar")["build_key"]

    cases = ET.parse(junit).getroot().findall(".//testcase")
    assert [(c.get("classname"), c.get("name")) for c in cases] == [(str(b["spec"]), b["name"]) for b in builds]
    assert ET.parse(junit).getroot().find("testsuite").get("failures") == "4"
    failure = cases[2].find("failure")
    assert "stage: parity" in failure.text and "exit code: 5" in failure.text and "parity failed" in failure.get("message")
    assert "stage: load" in cases[4].find("failure").text and "exit code: 3" in cases[4].find("failure").text
    assert cases[0].find("failure") is None and re.search(r"^parity\s+ok\s+[\d.]+s", cases[0].find("system-out").text, re.M)

    text = summary.read_text()
    assert text.startswith("# earlier step\n")  # appended, not replaced
    rows = [ln for ln in text.splitlines() if ln.startswith("| ") and not ln.startswith("| archive") and not ln.startswith("| ---")]
    assert len(rows) == 8 and rows[0].startswith("| tiny_eager | eager | ok | ")
    assert "failed (parity, exit 5)" in rows[2] and rows[0].endswith(" MB |")


def _main_in_subprocess(*args: str, cwd: Path) -> tuple[int, bool, str]:
    """Run the CLI's main() in a fresh interpreter; (exit code, whether torch was imported, stdout)."""
    code = "import sys; from pipeline.cli import main; rc = main(sys.argv[1:]); print('RESULT', rc, 'torch' in sys.modules)"
    proc = subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)), cwd=cwd
    )
    last = proc.stdout.strip().splitlines()[-1].split()
    assert last[0] == "RESULT", proc.stdout + proc.stderr
    return int(last[1]), last[2] == "True", proc.stdout


def test_cache_unchanged_without_torch_then_rebuilt_on_any_change_or_force(linear_project: Project) -> None:
    spec = linear_project.spec()
    store = str(linear_project.store)
    assert linear_project.build(spec, "--format", "eager,torchscript").returncode == 0
    report = linear_project.root / "r.json"
    rc, torch_imported, out = _main_in_subprocess(
        "build", "--store", store, str(spec), "--format", "eager,torchscript", "--report", str(report), cwd=ROOT
    )
    assert rc == 0 and not torch_imported, out
    builds = json.loads(report.read_text())["builds"]
    assert [b["status"] for b in builds] == ["unchanged", "unchanged"]
    assert builds[1]["build_key"] == _meta(linear_project.store / "tiny_torchscript.mar")["build_key"]

    broken = bytearray((linear_project.store / "tiny_eager.mar").read_bytes())  # an archive that no longer verifies
    broken[broken.index(b"class Linear") + 1] ^= 1
    (linear_project.store / "tiny_eager.mar").write_bytes(bytes(broken))
    doc = yaml.safe_load(spec.read_text())
    doc["parity"] = {"samples": 2}  # the settings change
    spec.write_text(yaml.safe_dump(doc))
    result = linear_project.build(spec, "--format", "eager,torchscript", "--report", str(report))
    assert result.returncode == 0, result.stderr
    assert [b["status"] for b in json.loads(report.read_text())["builds"]] == ["ok", "ok"]
    assert layout.verify(linear_project.store / "tiny_eager.mar") == []
    result = linear_project.build(spec, "--format", "eager", "--force", "--report", str(report))
    assert [b["status"] for b in json.loads(report.read_text())["builds"]] == ["ok"]


def test_build_key_covers_content_not_location(linear_project: Project, tmp_path: Path) -> None:
    (linear_project.root / "labels.txt").write_text("a\n")
    spec = load_spec(linear_project.spec(serve={"extra_files": ["labels.txt"]}))
    opts = {"device": None, "layout": None}
    key = cache.build_key(spec, opts)
    moved = tmp_path / "moved"
    shutil.copytree(linear_project.root, moved)
    assert cache.build_key(load_spec(moved / "tiny.yaml"), opts) == key  # the spec's location is not in the key
    changes = {
        "checkpoint": lambda root: (root / "tiny.pth").write_bytes((root / "tiny.pth").read_bytes() + b"\0"),
        "architecture": lambda root: (root / "models" / "tiny.py").write_text((root / "models" / "tiny.py").read_text() + "\n# x\n"),
        "extra file": lambda root: (root / "labels.txt").write_text("b\n"),
    }
    for what, change in changes.items():
        other = tmp_path / what.replace(" ", "_")
        shutil.copytree(linear_project.root, other)
        change(other)
        assert cache.build_key(load_spec(other / "tiny.yaml"), opts) != key, what
    assert cache.build_key(spec.with_format("onnx", suffix=False), opts) != key
    assert cache.build_key(spec, {"device": "cpu", "layout": None}) != key
    expected = {"python", "torch", "onnx", "onnxscript", "onnxruntime", "numpy", "transformers", "tokenizers", "pillow"}
    assert set(digests.versions()) == expected


def test_index_regenerates_and_counts_directory_archives(linear_project: Project) -> None:
    assert linear_project.build(linear_project.spec(), "--format", "eager,torchscript").returncode == 0
    store = linear_project.store
    built = json.loads((store / "index.json").read_text())
    entry = next(e for e in built["archives"] if e["file"] == "tiny_eager.mar")
    data = (store / "tiny_eager.mar").read_bytes()
    assert entry["sha256"] == hashlib.sha256(data).hexdigest() and entry["size"] == len(data)
    assert entry["build_key"] == _meta(store / "tiny_eager.mar")["build_key"] and set(entry["parity"]) == {"output"}
    assert {entry["name"], entry["version"], entry["format"], entry["marpipe"]} == {"tiny_eager", "1.0", "eager", "0.1.0"}

    folder = store / "tiny_dir"  # a directory archive, as `--layout dir` writes them
    with zipfile.ZipFile(store / "tiny_eager.mar") as z:
        z.extractall(folder)
    (store / "index.json").unlink()
    result = marpipe("index", str(store))
    assert result.returncode == 0 and "3 archives" in result.stdout, result.stderr
    doc = json.loads((store / "index.json").read_text())
    assert [e["file"] for e in doc["archives"]] == ["tiny_dir", "tiny_eager.mar", "tiny_torchscript.mar"]
    assert [e for e in doc["archives"] if e["file"] != "tiny_dir"] == built["archives"]
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    lines = sorted(f"{hashlib.sha256(p.read_bytes()).hexdigest()}  {p.relative_to(folder).as_posix()}\n" for p in files)
    lines.sort(key=lambda ln: ln.split("  ", 1)[1])
    want = (sum(p.stat().st_size for p in files), hashlib.sha256("".join(lines).encode()).hexdigest())
    assert layout.digest(folder) == want == (doc["archives"][0]["size"], doc["archives"][0]["sha256"])
    assert sorted(p.name for p in store.iterdir()) == ["index.json", "tiny_dir", "tiny_eager.mar", "tiny_torchscript.mar"]


def test_parallel_index_updates_lose_no_entry(tmp_path: Path) -> None:
    names = [f"m{i}.mar" for i in range(24)]
    for n in names:
        (tmp_path / n).write_bytes(b"x")
    entries = [(tmp_path / n, index.identity(tmp_path / n), {"file": n, "name": n[:-4], "size": 1, "sha256": "0" * 64}) for n in names]
    threads = [threading.Thread(target=index.update, args=(tmp_path, [e])) for e in entries]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [e["file"] for e in json.loads((tmp_path / "index.json").read_text())["archives"]] == sorted(names)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*names, "index.json"])  # no lock or temp file left


WORKFLOW = ROOT / ".github" / "workflows" / "release.yml"


def test_release_workflow_lints_and_its_marpipe_commands_parse() -> None:
    actionlint = shutil.which("actionlint", path=str(Path(sys.executable).parent)) or shutil.which("actionlint")
    assert actionlint, "actionlint is in the dev extra (make setup)"
    lint = subprocess.run([actionlint, "-no-color", str(WORKFLOW)], capture_output=True, text=True)
    assert lint.returncode == 0, lint.stdout + lint.stderr
    doc = yaml.safe_load(WORKFLOW.read_text())
    samples = {"matrix.shard": "1", "vars.MARPIPE_BUCKET": "bucket", "github.ref_name": "v1.0"}
    commands = []
    for job in doc["jobs"].values():
        for step in job["steps"]:
            for line in step.get("run", "").splitlines():
                if "marpipe " in line:
                    line = re.sub(r"\$\{\{\s*([^}]+?)\s*\}\}", lambda m: samples[m.group(1)], line)
                    words = shlex.split(line.replace("$SHARDS", "2"))
                    commands.append(words[next(i for i, w in enumerate(words) if w.endswith("marpipe")) + 1 :])
    assert [c[0] for c in commands] == ["build", "index"]
    makers = sorted(p.name for p in (ROOT / "examples").glob("make_*.py"))  # every example's inputs are made first
    assert makers and all(f"examples/{m}" in WORKFLOW.read_text() for m in makers), makers
    for words in commands:
        args = parser().parse_args(words)  # exits (fails the test) on anything our CLI rejects
    build = parser().parse_args(commands[0])
    assert build.shard == (1, 2) and build.jobs == 2 and build.junit and build.summary == Path("$GITHUB_STEP_SUMMARY")
    assert args.store == "s3://bucket/v1.0"
    make = subprocess.run(["make", "-n", "release"], cwd=ROOT, capture_output=True, text=True).stdout
    assert "-j 2 --junit build/junit.xml --summary build/summary.md --report build/report.json" in make
