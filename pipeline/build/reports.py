"""What a build run tells CI: the JSON report, JUnit XML and a Markdown summary table.

Each takes the list of build results (`release.Result.as_dict()`), in spec order.
"""

from __future__ import annotations

import json
import os
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pipeline


def write_json(path: Path, doc: dict[str, Any]) -> None:
    """Atomically (a temporary file beside it, renamed)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    os.replace(tmp, path)


def write_report(path: Path, builds: list[dict[str, Any]]) -> None:
    write_json(path, {"marpipe": pipeline.__version__, "builds": builds})


def max_abs(build: dict[str, Any]) -> float | None:
    """The largest absolute parity error over the archive's outputs (None when parity did not run)."""
    outputs = (build.get("parity") or {}).get("outputs") or {}
    values = [o["max_abs"] for o in outputs.values() if isinstance(o, dict) and o.get("max_abs") is not None]
    return max(values) if values else None


def failed_stage(build: dict[str, Any]) -> str:
    return next((s["name"] for s in build.get("stages", []) if s["status"] == "failed"), "setup")


def write_junit(path: Path, builds: list[dict[str, Any]]) -> None:
    """One testcase per archive (classname: the spec path, name: the archive); a failed build carries a
    <failure> with its stage, exit code and error line; stage durations go to <system-out>."""
    failures = sum(b["status"] == "failed" for b in builds)
    total = sum(b.get("duration_s") or 0.0 for b in builds)
    suites = ET.Element("testsuites", name="marpipe build", tests=str(len(builds)), failures=str(failures), time=f"{total:.3f}")
    suite = ET.SubElement(suites, "testsuite", name="marpipe build", tests=str(len(builds)), failures=str(failures), errors="0")
    suite.set("skipped", "0")
    suite.set("time", f"{total:.3f}")
    for b in builds:
        case = ET.SubElement(suite, "testcase", classname=b["spec"], name=b["name"], time=f"{b.get('duration_s') or 0.0:.3f}")
        props = ET.SubElement(case, "properties")
        for key in ("status", "format", "build_key", "archive"):
            if b.get(key) is not None:
                ET.SubElement(props, "property", name=key, value=str(b[key]))
        if b["status"] == "failed":
            stage = failed_stage(b)
            failure = ET.SubElement(case, "failure", message=b.get("error") or "", type=f"{stage} (exit {b['exit_code']})")
            failure.text = f"stage: {stage}\nexit code: {b['exit_code']}\n{b.get('error') or ''}\n"
        lines = [f"{s['name']:<8} {s['status']:<8} {s['duration_s']:.3f}s  {s.get('detail') or ''}".rstrip() for s in b.get("stages", [])]
        lines.append(f"status: {b['status']}" + (f" (build key {b['build_key']})" if b.get("build_key") else ""))
        ET.SubElement(case, "system-out").text = "\n".join(lines) + "\n"
    ET.indent(suites)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    ET.ElementTree(suites).write(tmp, encoding="utf-8", xml_declaration=True)
    os.replace(tmp, path)


def summary_table(builds: list[dict[str, Any]], store: str) -> str:
    """A Markdown table: archive, format, status, max abs error, duration, size."""
    counts = {s: sum(b["status"] == s for b in builds) for s in ("ok", "unchanged", "failed")}
    head = f"### marpipe build: {counts['ok']} built, {counts['unchanged']} unchanged, {counts['failed']} failed ({store})\n\n"
    rows = ["| archive | format | status | max abs error | duration | size |", "| --- | --- | --- | --- | --- | --- |"]
    for b in builds:
        err = max_abs(b)
        status = b["status"] if b["status"] != "failed" else f"failed ({failed_stage(b)}, exit {b['exit_code']})"
        size = f"{b['size'] / 1e6:.2f} MB" if b.get("size") is not None else "-"
        error = "-" if err is None else f"{err:.3g}"
        rows.append(f"| {b['name']} | {b['format']} | {status} | {error} | {b.get('duration_s') or 0.0:.2f} s | {size} |")
    return head + "\n".join(rows) + "\n\n"


def append_summary(path: Path, builds: list[dict[str, Any]], store: str) -> None:
    """Appended, never replaced: `--summary "$GITHUB_STEP_SUMMARY"` adds to the job's summary."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(summary_table(builds, store))
