"""The README is the contract: its spec block is accepted as written, its commands and exit codes exist."""

from __future__ import annotations

import json
import re
import subprocess

import yaml
from conftest import ROOT, Project, marpipe

from pipeline.errors import EXIT_CODES
from pipeline.spec.spec import load_spec

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
    for command in ("build", "inspect", "verify", "smoke", "serve", "deploy", "kserve", "index"):
        assert f"marpipe {command}" in README
        assert marpipe(command, "--help").returncode == 0
    assert marpipe("--version").stdout.startswith("marpipe ")
    targets = subprocess.run(["make", "-s", "help"], cwd=ROOT, capture_output=True, text=True).stdout
    for target in ("build", "release", "test", "smoke", "serve", "clean", "setup", "bench"):
        assert f"make {target}" in targets and f"make {target}" in README or target in ("clean", "setup", "bench")


def test_readme_request_keys_block_is_accepted(linear_project: Project) -> None:
    """The image/labels/hooks keys as the README shows them parse, with the files they name."""
    block = re.search(r"### Images, text, labels, hooks \(spec keys\).*?```yaml\n(.*?)```", README, re.S).group(1)
    doc = yaml.safe_load(block)
    root = linear_project.root
    (root / "labels.json").write_text(json.dumps([f"class {i}" for i in range(1000)]))
    (root / "hooks.py").write_text("def encode(outputs):\n    return {k: v.tolist() for k, v in outputs.items()}\n")
    spec = {"name": "readme", "architecture": {"file": "models/tiny.py", "class": "Linear"}, "checkpoint": {"path": "tiny.pth"}, **doc}
    path = root / "readme_requests.yaml"
    path.write_text(yaml.safe_dump(spec))
    parsed = load_spec(path)
    assert parsed.inputs[0].image.crop == 224 and parsed.outputs[0].labels.topk == 5 and parsed.serve.hooks.name == "hooks.py"


def _section(title: str) -> str:
    return README.split(f"### {title}\n", 1)[1].split("\n### ", 1)[0].split("\n## ", 1)[0]


def test_readme_architecture_examples_are_accepted(linear_project: Project) -> None:
    root = linear_project.root
    (root / "checkpoints" / "bert").mkdir(parents=True)
    (root / "checkpoints" / "bert" / "config.json").write_text('{"architectures": ["BertForSequenceClassification"]}')
    (root / "checkpoints" / "bert" / "tokenizer.json").write_text("{}")
    (root / "models" / "cnn.py").write_text("class SmallCNN:\n    pass\n")
    lines = [ln for ln in re.search(r"```yaml\n(.*?)```", _section("Three ways to name an architecture"), re.S).group(1).splitlines() if ln]
    sources = []
    for i, line in enumerate(lines):
        doc = {
            "name": f"a{i}",
            "checkpoint": {"path": "tiny.pth"},
            "inputs": [{"name": "x", "shape": ["batch", 4]}],
            **yaml.safe_load(line),
        }
        path = root / f"a{i}.yaml"
        path.write_text(yaml.safe_dump(doc))
        sources.append(load_spec(path).architecture.source)
    assert sources == ["file", "factory", "factory", "transformers"]
    block = re.search(r"```yaml\n(.*?)```", _section("Hugging Face folders"), re.S).group(1)
    (root / "bert.yaml").write_text(block)
    spec = load_spec(root / "bert.yaml")
    assert spec.checkpoint.path == root / "checkpoints" / "bert" and spec.inputs[1].generate == "padding_mask"
    example = yaml.safe_load((ROOT / "examples" / "bert.yaml").read_text())
    assert all(example[k] == yaml.safe_load(block)[k] for k in ("inputs", "dims", "text", "outputs"))
