"""`marpipe inspect ARCHIVE`: what an archive (a `.mar` or a directory archive) holds, from its marpipe.json; for an
aoti archive also what its package was compiled for and whether this machine can serve it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from handlers.marpipe_serving import aoti
from pipeline.spec.spec import FORMATS
from pipeline.store import index


def describe(path: Path) -> dict[str, Any]:
    meta = index.metadata(path)
    info: dict[str, Any] = {
        "archive": str(path),
        "name": meta.get("name"),
        "version": meta.get("version"),
        "format": meta.get("format"),
        "detail": (meta.get("export") or {}).get("detail"),
        "call": meta.get("call"),
        "inputs": [{k: t.get(k) for k in ("name", "shape", "dtype")} for t in meta.get("inputs", [])],
        "outputs": [{k: o.get(k) for k in ("name", "shape")} for o in meta.get("outputs", [])],
        "parity": {k: (meta.get("parity") or {}).get(k) for k in ("device", "shapes", "samples")},
        "requirements": meta.get("requirements") or [],
        "versions": meta.get("versions") or {},
    }
    if meta.get("auto"):
        info["auto"] = meta["auto"]
    record = meta.get("platform")
    if record:
        info["platform"] = record
        device = "cuda" if record.get("device") == "cuda" else "cpu"
        info["serves_here"] = aoti.mismatch(record, aoti.here(device, 0)) or "yes"
    return info


def render(info: dict[str, Any]) -> str:
    def shape(t: dict[str, Any]) -> str:
        dims = ", ".join(map(str, t.get("shape") or []))
        return f"{t['name']} [{dims}]" + (f" {t['dtype']}" if t.get("dtype") else "")

    v = info["versions"]
    lines = [
        f"archive      {info['archive']}",
        f"name         {info['name']} {info['version']}",
        f"format       {info['format']} ({info['detail']})",
        f"inputs       {'; '.join(shape(t) for t in info['inputs'])} (by {'keyword' if info['call'] == 'keyword' else 'position'})",
        f"outputs      {'; '.join(shape(o) for o in info['outputs'])}",
        f"parity       {info['parity']['device']}, {len(info['parity']['shapes'] or [])} shapes × {info['parity']['samples']} samples",
        f"built with   marpipe {v.get('marpipe')}, torch {v.get('torch')}, python {v.get('python')}",
    ]
    if info["requirements"]:
        pins = [f"{r['name']}=={r['version']}" for r in info["requirements"]]
        lines.append(f"requires     {', '.join(pins)}")
    if "auto" in info:
        tried = info["auto"]["candidates"]
        each = ", ".join(f"{f} {tried[f]['status']}" for f in FORMATS if f in tried)
        lines.append(f"auto         chose {info['auto']['choice']} ({each})")
    record = info.get("platform")
    if record:
        lines.append(f"platform     {aoti.describe(record)}")
        if record.get("march"):
            features = len(record.get("cpu_features") or [])
            lines.append(f"             code for {record['march']} and {features} CPU features; {record.get('compiler')}")
        else:
            lines.append(f"             {record.get('compiler')}")
        verdict = info["serves_here"]
        lines.append(f"this machine {'can serve it' if verdict == 'yes' else 'cannot serve it: ' + verdict}")
    return "\n".join(lines)
