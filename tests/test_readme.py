"""The README is the contract: its spec block is accepted as written, its commands and exit codes exist."""

from __future__ import annotations

import re
import subprocess

import yaml
from conftest import ROOT, Project, marpipe

from pipeline.errors import EXIT_CODES
from pipeline.spec import load_spec

README = (ROOT / "README.md").read_text()


def test_readme_spec_block_is_accepted(linear_project: Project) -> None:
    block = re.search(r"## The spec.*?```yaml\n(.*?)```", README, re.S).group(1)
    doc = yaml.safe_load(block)
    doc["architecture"].update(file="models/tiny.py", kwargs={})
    doc["architecture"]["class"] = "Linear"
    doc["checkpoint"]["path"] = "tiny.pth"
    path = linear_project.root / "readme.yaml"
    path.write_text(yaml.safe_dump(doc))
    spec = load_spec(path)
    assert spec.name == "mlp" and spec.dims == {"seq": (5, 16)}
    assert spec.checkpoint.key_map == () and spec.serve.max_rows == 64


def test_readme_exit_codes_match_the_code() -> None:
    table = dict(re.findall(r"^\| (\d) \| (.+?) \|$", README, re.M))
    assert sorted(int(k) for k in table) == sorted(EXIT_CODES)


def test_readme_commands_exist() -> None:
    for command in ("build", "inspect", "verify", "smoke", "serve", "index"):
        assert f"marpipe {command}" in README
        assert marpipe(command, "--help").returncode == 0
    assert marpipe("--version").stdout.startswith("marpipe ")
    targets = subprocess.run(["make", "-s", "help"], cwd=ROOT, capture_output=True, text=True).stdout
    for target in ("build", "release", "test", "smoke", "serve", "clean", "setup", "bench"):
        assert f"make {target}" in targets and f"make {target}" in README or target in ("clean", "setup", "bench")
