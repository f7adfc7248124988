"""`marpipe smoke`: serve the store with a real TorchServe and check every archive answers like eager.

Each archive carries the parity inputs of one small batch and the eager model's outputs for them; they
are replayed over HTTP as JSON and as npz and compared within the archive's own tolerances.
"""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import numpy as np

from pipeline import server as ts
from pipeline.archive_dir import list_archives, read_entry
from pipeline.errors import PackageError, SpecError
from pipeline.stages.parity import compare


def check_archive(server: ts.Server, name: str, path: Path) -> list[dict]:
    """Replay one archive's stored inputs in JSON and npz; one result row per transport."""
    meta = json.loads(read_entry(path, "marpipe.json"))
    inputs, expected = (_npz_bytes(read_entry(path, n)) for n in ("parity_inputs.npz", "parity_outputs.npz"))
    rows = []
    bodies = {
        "json": (json.dumps({"inputs": {k: v.tolist() for k, v in inputs.items()}}).encode(), {"Content-Type": "application/json"}),
        "npz": (_to_npz(inputs), {"Content-Type": "application/x-npz", "Accept": "application/x-npz"}),
    }
    for transport, (body, headers) in bodies.items():
        row = {"model": name, "format": meta["format"], "transport": transport, "ok": False, "max_abs": None, "why": ""}
        code, _, answer = server.request("inference", f"/predictions/{name}", body, headers)
        if code != 200:
            row["why"] = f"HTTP {code}: {answer[:160].decode(errors='replace')}"
            rows.append(row)
            continue
        try:
            got = _npz_bytes(answer) if transport == "npz" else {k: np.asarray(v) for k, v in json.loads(answer)["outputs"].items()}
        except (ValueError, KeyError, TypeError) as exc:
            row["why"] = f"unreadable answer: {exc}"
            rows.append(row)
            continue
        worst, why = judge(meta, expected, got)
        row.update(ok=not why, max_abs=worst, why="; ".join(why))
        rows.append(row)
    return rows


def judge(meta: dict, expected: dict[str, np.ndarray], got: dict[str, np.ndarray]) -> tuple[float, list[str]]:
    """An answer against the archive's stored eager outputs, within its own tolerances: (max abs error, faults)."""
    tolerances = {o["name"]: (o["atol"], o["rtol"]) for o in meta["outputs"]}
    worst, why = 0.0, []
    for out, ref in expected.items():
        atol, rtol = tolerances.get(out, (meta["parity"]["outputs"][out]["atol"], meta["parity"]["outputs"][out]["rtol"]))
        result = compare(ref, got.get(out), atol, rtol)
        worst = max(worst, result.get("max_abs", float("inf")))
        if not result["ok"]:
            detail = result.get("why") or f"max abs {result['max_abs']:.3g} > atol {atol:g} + rtol {rtol:g}·|eager|"
            why.append(f"{out}: {detail}")
    return worst, why


def _to_npz(arrays: dict[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def _npz_bytes(data: bytes) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(data), allow_pickle=False) as f:
        return {k: f[k] for k in f.files}


def smoke(store: Path, names: list[str], timeout: float) -> int:
    archives = list_archives(store)
    if names:
        by_name = {ts.archive_model_name(a): a for a in archives}
        missing = [n for n in names if n not in by_name]
        if missing:
            raise SpecError(f"no archive for {', '.join(missing)} in {store} (have: {', '.join(sorted(by_name)) or 'none'})")
        archives = [by_name[n] for n in names]
    if not archives:
        raise PackageError(f"no archives in {store}; run marpipe build (or make build) first")
    rows: list[dict] = []
    with ts.running(store, archives) as server:
        print(f"TorchServe on {server.url('inference', '')}: waiting for {len(archives)} models", file=sys.stderr)
        status = ts.wait_ready(server, timeout)
        for name, path in sorted((ts.archive_model_name(a), a) for a in archives):
            if status[name] != "READY":
                rows.append(
                    {"model": name, "format": "?", "transport": "-", "ok": False, "max_abs": None, "why": f"not READY: {status[name]}"}
                )
                continue
            rows.extend(check_archive(server, name, path))
        if not all(r["ok"] for r in rows):
            print(server.log_tail(15), file=sys.stderr)
    _table(rows)
    bad = [r for r in rows if not r["ok"]]
    print(f"{len(rows) - len(bad)} of {len(rows)} checks passed", file=sys.stderr)
    return 5 if bad else 0


def _table(rows: list[dict]) -> None:
    print(f"{'model':<28} {'format':<12} {'body':<5} {'result':<6} {'max abs err':>12}  note")
    for r in rows:
        err = "-" if r["max_abs"] is None else f"{r['max_abs']:.3g}"
        print(f"{r['model']:<28} {r['format']:<12} {r['transport']:<5} {'ok' if r['ok'] else 'FAIL':<6} {err:>12}  {r['why']}")
