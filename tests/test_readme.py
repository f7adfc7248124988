"""The README and docs/ are the contract: their spec blocks are accepted as written, their commands, make targets,
exit codes and links exist."""

from __future__ import annotations

import functools
import json
import re
import subprocess
from pathlib import Path

import yaml
from conftest import ROOT, Project, marpipe

from pipeline.errors import EXIT_CODES
from pipeline.spec.spec import load_spec

README = (ROOT / "README.md").read_text()
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [ROOT / "README.md", *DOCS]
FRAGMENT = "<!-- fragment -->"
SHELLS = ("bash", "sh", "console", "shell", "")


def _doc(name: str) -> str:
    """docs/NAME.md's text."""
    return (ROOT / "docs" / f"{name}.md").read_text()


def _blocks(text: str) -> list[tuple[str, str, bool]]:
    """Every fenced code block as (language, body, marked as a fragment), fences indented or not."""
    blocks, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        m = re.match(r"^(\s*)```(\S*)\s*$", lines[i])
        if not m:
            i += 1
            continue
        indent, lang, body = len(m.group(1)), m.group(2), []
        before = next((ln.strip() for ln in reversed(lines[:i]) if ln.strip()), "")
        i += 1
        while i < len(lines) and not re.match(r"^\s*```\s*$", lines[i]):
            line = lines[i]
            body.append(line[indent:] if line[:indent].strip() == "" else line.lstrip())
            i += 1
        blocks.append((lang, "\n".join(body) + "\n", before == FRAGMENT))
        i += 1
    return blocks


def _prose(text: str) -> list[str]:
    """The lines outside fenced code blocks."""
    out, fenced = [], False
    for line in text.splitlines():
        if re.match(r"^\s*```", line):
            fenced = not fenced
        elif not fenced:
            out.append(line)
    return out


def _section(text: str, title: str) -> str:
    """The text under the heading `title` (any level), up to the next heading of the same or a higher level."""
    lines, out, level = text.splitlines(), [], None
    fenced = False
    for line in lines:
        if re.match(r"^\s*```", line):
            fenced = not fenced
        heading = None if fenced else re.match(r"^(#+) (.*)$", line)
        if level is None:
            if heading and heading.group(2).strip() == title:
                level = len(heading.group(1))
            continue
        if heading and len(heading.group(1)) <= level:
            break
        out.append(line)
    assert level is not None, f"no heading {title!r}"
    return "\n".join(out) + "\n"


def _yaml_blocks(text: str) -> list[str]:
    return [body for lang, body, _ in _blocks(text) if lang == "yaml"]


def _anchor(heading: str) -> str:
    """GitHub's anchor for a heading: lowercase, punctuation other than '-' and '_' removed, spaces to '-'."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(text: str) -> set[str]:
    seen: dict[str, int] = {}
    for line in _prose(text):
        m = re.match(r"^#+ (.*)$", line)
        if m:
            base = _anchor(m.group(1))
            n = seen.get(base, 0)
            seen[base] = n + 1
            yield base if n == 0 else f"{base}-{n}"


@functools.cache
def _help_ok(command: str) -> bool:
    return marpipe(command, "--help").returncode == 0


@functools.cache
def _make_targets() -> str:
    return subprocess.run(["make", "-s", "help"], cwd=ROOT, capture_output=True, text=True).stdout


def _check_spec(block: str, project: Project, name: str) -> None:
    doc = yaml.safe_load(block)
    doc["architecture"].update(file="models/tiny.py", kwargs={})
    doc["architecture"]["class"] = "Linear"
    doc["checkpoint"]["path"] = "tiny.pth"
    path = project.root / name
    path.write_text(yaml.safe_dump(doc))
    spec = load_spec(path)
    assert spec.name == "mlp" and spec.dims == {"seq": (5, 16)}
    assert spec.checkpoint.key_map == () and spec.serve.max_rows == 64


def test_readme_spec_block_is_accepted(linear_project: Project) -> None:
    """The full spec of docs/spec.md and the brief one of the README are accepted as written."""
    _check_spec(_yaml_blocks(_section(_doc("spec"), "The spec"))[0], linear_project, "full.yaml")
    _check_spec(_yaml_blocks(_section(README, "The spec in brief"))[0], linear_project, "readme.yaml")


def test_readme_walk_spec_is_the_example() -> None:
    walk = _yaml_blocks(_section(README, "Five minutes: spec → build → serve → request → deploy"))[0]
    assert yaml.safe_load(walk) == yaml.safe_load((ROOT / "examples" / "simplenet.yaml").read_text())


def test_readme_exit_codes_match_the_code() -> None:
    table = dict(re.findall(r"^\| (\d) \| (.+?) \|$", README, re.M))
    assert sorted(int(k) for k in table) == sorted(EXIT_CODES)


def test_readme_commands_exist() -> None:
    for command in ("build", "inspect", "verify", "smoke", "serve", "deploy", "kserve", "index"):
        assert f"marpipe {command}" in README
        assert _help_ok(command)
    assert marpipe("--version").stdout.startswith("marpipe ")
    targets = _make_targets()
    for target in ("build", "release", "test", "smoke", "serve", "clean", "setup", "bench"):
        assert f"make {target}" in targets and f"make {target}" in README or target in ("clean", "setup", "bench")
    assert "`make test` is the test command" in README and "make help" in README


def test_readme_request_keys_block_is_accepted(linear_project: Project) -> None:
    """The image/labels/hooks keys as docs/requests.md shows them parse, with the files they name."""
    block = _yaml_blocks(_section(_doc("requests"), "Images, text, labels, hooks (spec keys)"))[0]
    doc = yaml.safe_load(block)
    root = linear_project.root
    (root / "labels.json").write_text(json.dumps([f"class {i}" for i in range(1000)]))
    (root / "hooks.py").write_text("def encode(outputs):\n    return {k: v.tolist() for k, v in outputs.items()}\n")
    spec = {"name": "readme", "architecture": {"file": "models/tiny.py", "class": "Linear"}, "checkpoint": {"path": "tiny.pth"}, **doc}
    path = root / "readme_requests.yaml"
    path.write_text(yaml.safe_dump(spec))
    parsed = load_spec(path)
    assert parsed.inputs[0].image.crop == 224 and parsed.outputs[0].labels.topk == 5 and parsed.serve.hooks.name == "hooks.py"


def test_readme_architecture_examples_are_accepted(linear_project: Project) -> None:
    """docs/models.md's three ways to name an architecture and its Hugging Face folder spec are accepted."""
    models = _doc("models")
    root = linear_project.root
    (root / "checkpoints" / "bert").mkdir(parents=True)
    (root / "checkpoints" / "bert" / "config.json").write_text('{"architectures": ["BertForSequenceClassification"]}')
    (root / "checkpoints" / "bert" / "tokenizer.json").write_text("{}")
    (root / "models" / "cnn.py").write_text("class SmallCNN:\n    pass\n")
    lines = [ln for ln in _yaml_blocks(_section(models, "Three ways to name an architecture"))[0].splitlines() if ln]
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
    block = _yaml_blocks(_section(models, "Hugging Face folders"))[0]
    (root / "bert.yaml").write_text(block)
    spec = load_spec(root / "bert.yaml")
    assert spec.checkpoint.path == root / "checkpoints" / "bert" and spec.inputs[1].generate == "padding_mask"
    example = yaml.safe_load((ROOT / "examples" / "bert.yaml").read_text())
    assert all(example[k] == yaml.safe_load(block)[k] for k in ("inputs", "dims", "text", "outputs"))


def test_docs_exist_and_readme_is_short() -> None:
    assert DOCS and len(README.splitlines()) <= 300


def test_every_yaml_block_parses() -> None:
    """Every ```yaml block of the README and docs/ parses, unless marked `<!-- fragment -->` just before it."""
    count = 0
    for page in PAGES:
        for lang, body, fragment in _blocks(page.read_text()):
            if lang == "yaml" and not fragment:
                try:
                    yaml.safe_load(body)
                except yaml.YAMLError as e:
                    raise AssertionError(f"{page.relative_to(ROOT)}: a yaml block does not parse: {e}\n{body}") from e
                count += 1
    assert count >= 6


def test_every_shell_command_exists() -> None:
    """Every `marpipe SUBCOMMAND` and `make TARGET` in a shell block of the README and docs/ exists."""
    subcommands: dict[str, Path] = {}
    targets: dict[str, Path] = {}
    for page in PAGES:
        for lang, body, _ in _blocks(page.read_text()):
            if lang not in SHELLS:
                continue
            for name in re.findall(r"\bmarpipe[ \t]+([a-z][a-z-]*)", body):
                subcommands.setdefault(name, page)
            for name in re.findall(r"(?<![\w$(/.-])make[ \t]+([a-z][a-z-]*)", body):
                targets.setdefault(name, page)
    assert {"build", "serve", "deploy"} <= subcommands.keys() and {"build", "test"} <= targets.keys()
    bad = [f"{page.relative_to(ROOT)}: marpipe {name}" for name, page in subcommands.items() if not _help_ok(name)]
    listed = _make_targets()
    bad += [f"{page.relative_to(ROOT)}: make {name}" for name, page in targets.items() if f"make {name} " not in listed]
    assert not bad, bad


def test_every_relative_link_resolves() -> None:
    """Every relative link of the README and docs/ names an existing file and, with an #anchor, one of its headings."""
    bad = []
    for page in PAGES:
        for target in re.findall(r"\[[^\]]*\]\(([^)\s]+)\)", "\n".join(_prose(page.read_text()))):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target):
                continue
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            if not dest.is_file():
                bad.append(f"{page.relative_to(ROOT)}: {target}: no such file")
            elif anchor and anchor not in set(_anchors(dest.read_text())):
                bad.append(f"{page.relative_to(ROOT)}: {target}: no such heading")
    assert not bad, bad
