"""Shared helpers: a scratch project with tiny models, specs and checkpoints; the CLI as users run it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
MODELS = Path(__file__).resolve().parent / "models" / "tiny.py"
# `make test-gpu` (tests/gpu/run.py) runs the tests against marpipe as pip installed it into this folder: the CLI's
# subprocesses import it from there (and start there, so that this tree is not on their sys.path)
SITE = os.environ.get("MARPIPE_TEST_SITE")
# `make test-gpu DRY=1` rehearses the GPU tests that take `gpu_device` on the CPU; `needs_gpu` skips them otherwise
GPU_DRY = os.environ.get("MARPIPE_GPU_DRY") == "1"
needs_gpu = pytest.mark.skipif(not (GPU_DRY or torch.cuda.is_available()), reason="needs a CUDA GPU")


def marpipe(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run the CLI in a fresh process, as make and CI jobs do."""
    full_env = {**os.environ, "PYTHONPATH": SITE or str(ROOT), **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "pipeline", *args], capture_output=True, text=True, env=full_env, cwd=cwd or SITE or ROOT, timeout=timeout
    )


def serving(store: Path, timeout: float = 300, **kwargs: Any):
    """A test TorchServe on free loopback ports, every model READY; stopped by pid afterwards. For fixtures:
    `yield from serving(store, auth=True)`."""
    from pipeline.torchserve import server as ts

    with ts.running(store, **kwargs) as srv:
        status = ts.wait_ready(srv, timeout)
        assert all(s == "READY" for s in status.values()), (status, srv.log_tail(40))
        yield srv


def start_serve(store: Path, port: int, workdir: Path, *options: str, timeout: float = 300) -> tuple[subprocess.Popen, str]:
    """`marpipe serve` as an operator runs it (with more `options`), read up to its "serving" line: (the process,
    what it printed). The caller stops it (SIGINT or SIGTERM)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline", "serve", "--store", str(store), "--port", str(port), "--workdir", str(workdir), *options],
        cwd=ROOT,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
        stderr=subprocess.PIPE,
        text=True,
    )
    lines: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        lines.append(line)
        if "serving; Ctrl-C stops" in line or not line:
            break
    return proc, "".join(lines)


def store_state(store: Path) -> dict[str, bytes]:
    """Every file under a store, hidden ones (locks, temporary files) included, with its bytes: to prove a
    failed build changed nothing and left nothing behind."""
    if not store.exists():
        return {}
    return {p.relative_to(store).as_posix(): p.read_bytes() for p in sorted(store.rglob("*")) if p.is_file()}


class Project:
    """A scratch folder holding models/tiny.py, checkpoints and specs, like a training repo's release job."""

    def __init__(self, root: Path) -> None:
        self.root = root
        (root / "models").mkdir(parents=True, exist_ok=True)
        shutil.copy(MODELS, root / "models" / "tiny.py")
        self.store = root / "store"

    def model(self, cls: str, **kwargs: Any) -> torch.nn.Module:
        sys.path.insert(0, str(self.root / "models"))
        try:
            import tiny
        finally:
            sys.path.pop(0)
        torch.manual_seed(0)
        return getattr(tiny, cls)(**kwargs).eval()

    def save(self, obj: Any, name: str) -> Path:
        path = self.root / name
        torch.save(obj, path)
        return path

    def spec(self, name: str = "tiny", cls: str = "Linear", **sections: Any) -> Path:
        doc: dict[str, Any] = {
            "name": name,
            "architecture": {"file": "models/tiny.py", "class": cls, "kwargs": sections.pop("kwargs", {})},
            "checkpoint": {"path": "tiny.pth", **sections.pop("checkpoint", {})},
            "inputs": sections.pop("inputs", [{"name": "x", "shape": ["batch", 4]}]),
        }
        doc.update(sections)
        path = self.root / f"{name}.yaml"
        path.write_text(yaml.safe_dump(doc, sort_keys=False))
        return path

    def multi_io_specs(self) -> tuple[Path, Path]:
        """Specs (and checkpoints) of a two-input, two-output tuple model and of a dict-output model."""
        self.save(self.model("TwoInTwoOut").state_dict(), "two.pth")
        self.save(self.model("DictOut").state_dict(), "dict.pth")
        two = self.spec(
            name="two",
            cls="TwoInTwoOut",
            checkpoint={"path": "two.pth"},
            inputs=[{"name": "x", "shape": ["batch", 4]}, {"name": "seq", "shape": ["batch", "steps", 4]}],
            dims={"steps": [2, 5]},
            outputs=[{"name": "joint"}, {"name": "per_step"}],
        )
        names = [{"name": "embedding"}, {"name": "score"}]
        dict_out = self.spec(name="dictout", cls="DictOut", checkpoint={"path": "dict.pth"}, outputs=names)
        return two, dict_out

    def build(self, *specs: Path | str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        """`marpipe build --store <store> [options] SPEC...`: options may come among the specs as strings."""
        return marpipe("build", "--store", str(self.store), *map(str, specs), env=env)


class FakeContext:
    """The parts of ts.context.Context the handler uses."""

    def __init__(self, model_dir: Path, headers: list[dict[str, str]] | None = None, grpc: bool = False) -> None:
        """`headers`: each request's; a request with none given has HTTP's Host header, or none at all with `grpc`
        (as TorchServe hands over its gRPC requests)."""
        self.system_properties = {"model_dir": str(model_dir), "gpu_id": None, "batch_size": 8}
        self.headers = headers or []
        self.grpc = grpc
        self.status: dict[int, tuple[int, str]] = {}
        self.content_type: dict[int, str] = {}
        self.response_headers: dict[int, dict[str, str]] = {}

    def get_all_request_header(self, idx: int) -> dict:
        return self.headers[idx] if idx < len(self.headers) else {} if self.grpc else {"Host": "127.0.0.1"}

    def set_response_status(self, code: int = 200, phrase: str = "", idx: int = 0) -> None:
        self.status[idx] = (code, phrase)

    def set_response_content_type(self, idx: int, value: str) -> None:
        self.content_type[idx] = value

    def get_response_status(self, idx: int) -> tuple[int, str]:
        return self.status.get(idx, (200, ""))

    def set_response_header(self, idx: int, key: str, value: str) -> None:
        self.response_headers.setdefault(idx, {})[key] = value


@pytest.fixture
def project(tmp_path: Path) -> Project:
    return Project(tmp_path)


@pytest.fixture(scope="session")
def gpu_device() -> str:
    """The device of the tests under tests/gpu/: cuda, or cpu where `make test-gpu DRY=1` rehearses them."""
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def linear_project(project: Project) -> Project:
    """A project whose tiny.pth is a valid Linear(4, 2) state_dict."""
    project.save(project.model("Linear").state_dict(), "tiny.pth")
    return project
