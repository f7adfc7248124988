"""`marpipe smoke`: serve the store with a real TorchServe and check every archive answers like eager.

Each archive carries the parity inputs of one small batch and the eager model's outputs for them; they
are replayed over HTTP as npz and as JSON (split over requests that fit the server's limits, `pipeline.fit`)
and compared within the archive's own tolerances.
"""

from __future__ import annotations

import io
import json
import sys
import zipfile
from pathlib import Path

import numpy as np

from pipeline import fit
from pipeline import server as ts
from pipeline.errors import PackageError, SpecError
from pipeline.stages.parity import compare


def _npz(z: zipfile.ZipFile, name: str) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(z.read(name)), allow_pickle=False) as f:
        return {k: f[k] for k in f.files}


def check_archive(server: ts.Server, name: str, path: Path) -> list[dict]:
    """Replay one archive's stored inputs in npz and JSON, split over requests that fit the server's limits;
    one result row per transport."""
    with zipfile.ZipFile(path) as z:
        meta = json.loads(z.read("marpipe.json"))
        inputs, expected = _npz(z, "parity_inputs.npz"), _npz(z, "parity_outputs.npz")
    tolerances = {o["name"]: (o["atol"], o["rtol"]) for o in meta["outputs"]}
    max_rows = meta.get("serve", {}).get("max_rows")
    rows = []
    for transport in fit.ENCODERS:
        row = {"model": name, "format": meta["format"], "transport": transport, "ok": False, "max_abs": None, "why": ""}
        answer = fit.replay(server, name, transport, inputs, max_rows)
        if "outputs" not in answer:
            row.update(why=answer["why"], skipped=answer.get("skipped", False))
            rows.append(row)
            continue
        got = answer["outputs"]
        worst, why = 0.0, []
        for out, ref in expected.items():
            atol, rtol = tolerances.get(out, (meta["parity"]["outputs"][out]["atol"], meta["parity"]["outputs"][out]["rtol"]))
            result = compare(ref, got.get(out), atol, rtol)
            worst = max(worst, result.get("max_abs", float("inf")))
            if not result["ok"]:
                detail = result.get("why") or f"max abs {result['max_abs']:.3g} > atol {atol:g} + rtol {rtol:g}·|eager|"
                why.append(f"{out}: {detail}")
        count = len(next(iter(inputs.values())))
        split = f"{count} rows in {answer['requests']} requests" if answer["requests"] > 1 else ""
        row.update(ok=not why, max_abs=worst, why="; ".join(why) or split)
        rows.append(row)
    return rows


def smoke(store: Path, names: list[str], timeout: float) -> int:
    archives = sorted(store.glob("*.mar"))
    if names:
        by_name = {ts.archive_model_name(a): a for a in archives}
        missing = [n for n in names if n not in by_name]
        if missing:
            raise SpecError(f"no archive for {', '.join(missing)} in {store} (have: {', '.join(sorted(by_name)) or 'none'})")
        archives = [by_name[n] for n in names]
    if not archives:
        raise PackageError(f"no .mar archives in {store}; run marpipe build (or make build) first")
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
        if not all(r["ok"] or r.get("skipped") for r in rows):
            print(server.log_tail(15), file=sys.stderr)
    _table(rows)
    bad = [r for r in rows if not r["ok"] and not r.get("skipped")]
    skipped = sum(bool(r.get("skipped")) for r in rows)
    print(f"{len(rows) - len(bad) - skipped} of {len(rows)} checks passed" + (f", {skipped} skipped" if skipped else ""), file=sys.stderr)
    return 5 if bad else 0


def _table(rows: list[dict]) -> None:
    print(f"{'model':<28} {'format':<12} {'body':<5} {'result':<6} {'max abs err':>12}  note")
    for r in rows:
        err = "-" if r["max_abs"] is None else f"{r['max_abs']:.3g}"
        result = "ok" if r["ok"] else "skip" if r.get("skipped") else "FAIL"
        print(f"{r['model']:<28} {r['format']:<12} {r['transport']:<5} {result:<6} {err:>12}  {r['why']}")
