"""`marpipe smoke`: serve the store with a real TorchServe and check every archive answers like eager.

Each archive carries the parity inputs of one small batch and the eager model's outputs for them; they are
replayed over HTTP as npz and as JSON (split over requests that fit the server's limits) and compared within
the archive's own tolerances. Archives with image or text inputs or hooks also carry sample raw requests with
the eager model's answers (`parity_requests.json`): replayed as a client sends them.
"""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import PackageError, SpecError
from pipeline.stages import gate
from pipeline.stages.parity import compare
from pipeline.stages.samples import INDEX, answer_from_arrays
from pipeline.store.layout import list_archives, read_entry
from pipeline.torchserve import fit
from pipeline.torchserve import server as ts


def check_archive(server: Any, name: str, path: Path, route: str | None = None, limit: int | None = None) -> list[dict]:
    """Replay one archive's stored inputs in npz and JSON, split over requests that fit the server's limits;
    one result row per transport, then one per sample raw request. `route`: /predictions/<name> unless given
    (deploy checks /predictions/<name>/<version>); `limit`: the server's max_request_size (read from the config
    of a server marpipe started, TorchServe's default otherwise)."""
    route = route or f"/predictions/{name}"
    if limit is None:
        limit = fit.max_request_size(server.workdir / "config.properties") if hasattr(server, "workdir") else fit.DEFAULT_MAX_REQUEST_SIZE
    meta = json.loads(read_entry(path, "marpipe.json"))
    inputs, expected = (_npz_bytes(read_entry(path, n)) for n in ("parity_inputs.npz", "parity_outputs.npz"))
    max_rows = meta.get("serve", {}).get("max_rows")
    rows = []
    transports = [] if (meta.get("hooks") or {}).get("decode") else list(fit.ENCODERS)  # a decode hook reads every body:
    for transport in transports:  # its own sample requests (check_requests) are the check
        row = {"model": name, "format": meta["format"], "transport": transport, "ok": False, "max_abs": None, "why": ""}
        answer = fit.replay(server, route, transport, inputs, max_rows, limit)
        if "outputs" not in answer:
            row.update(why=answer["why"], skipped=answer.get("skipped", False))
            rows.append(row)
            continue
        worst, why = judge(meta, expected, answer["outputs"])
        count = len(next(iter(inputs.values())))
        split = f"{count} rows in {answer['requests']} requests" if answer["requests"] > 1 else ""
        row.update(ok=not why, max_abs=worst, why="; ".join(why) or split)
        rows.append(row)
    return rows + check_requests(server, name, path, meta, route)


def check_requests(server: Any, name: str, path: Path, meta: dict, route: str) -> list[dict]:
    """Replay the archive's raw sample requests (images, texts, a hook's samples): the raw outputs (npz) and
    the JSON answer (labels, the encode hook) must match what the eager model gave through the same decoding."""
    try:
        index = json.loads(read_entry(path, INDEX))
    except (KeyError, FileNotFoundError):
        return []
    tolerances = [(o["atol"], o["rtol"]) for o in meta["outputs"]]
    atol, rtol = max(t[0] for t in tolerances), max(t[1] for t in tolerances)
    rows = []
    for sample in index:
        row = {"model": name, "format": meta["format"], "transport": sample["name"], "ok": False, "max_abs": None, "why": ""}
        headers, body = {"Content-Type": sample["content_type"]}, read_entry(path, sample["body"])
        code, _, raw = server.request("inference", route, body, dict(headers, Accept="application/x-npz"))
        code2, _, answer = server.request("inference", route, body, headers)
        if code != 200 or code2 != 200:
            text = (raw if code != 200 else answer)[:160].decode(errors="replace")
            row["why"] = f"HTTP {code if code != 200 else code2}: {text}"
            rows.append(row)
            continue
        try:
            got, doc = _npz_bytes(raw), json.loads(answer)
        except (ValueError, KeyError, TypeError) as exc:
            row["why"] = f"unreadable answer: {exc}"
            rows.append(row)
            continue
        worst, why = judge(meta, _npz_bytes(read_entry(path, sample["outputs"])), got)
        want = sample["answer"] if "answer" in sample else answer_from_arrays(_npz_bytes(read_entry(path, sample["answer_npz"])))
        mismatch = json_mismatch(want, doc, atol, rtol) if "gate" not in meta["parity"] else ""  # gated: judged on npz above
        if mismatch:
            why.append(f"JSON answer: {mismatch}")
        row.update(ok=not why, max_abs=worst, why="; ".join(why))
        rows.append(row)
    return rows


def judge(meta: dict, expected: dict[str, np.ndarray], got: dict[str, np.ndarray]) -> tuple[float, list[str]]:
    """An answer against the archive's stored eager outputs, within its own tolerances (below fp32: by its accuracy
    gate's measures and thresholds): (max abs error, faults)."""
    tolerances = {o["name"]: (o["atol"], o["rtol"]) for o in meta["outputs"]}
    gated = gate.served(meta, expected, got)
    if gated is not None:
        worst = max((compare(ref, got[k], 0, 0).get("max_abs", 0.0) for k, ref in expected.items() if got.get(k) is not None), default=0.0)
        return worst, gated
    worst, why = 0.0, []
    for out, ref in expected.items():
        atol, rtol = tolerances.get(out, (meta["parity"]["outputs"][out]["atol"], meta["parity"]["outputs"][out]["rtol"]))
        result = compare(ref, got.get(out), atol, rtol)
        worst = max(worst, result.get("max_abs", float("inf")))
        if not result["ok"]:
            detail = result.get("why") or f"max abs {result['max_abs']:.3g} > atol {atol:g} + rtol {rtol:g}·|eager|"
            why.append(f"{out}: {detail}")
    return worst, why


def json_mismatch(want: Any, got: Any, atol: float, rtol: float, where: str = "") -> str:
    """Where two JSON answers differ ("" when they agree): numbers within atol + rtol·|want|, the rest equal."""
    if isinstance(want, bool) or isinstance(got, bool) or not (isinstance(want, (int, float)) and isinstance(got, (int, float))):
        if isinstance(want, dict) and isinstance(got, dict):
            if sorted(want) != sorted(got):
                return f"{where or 'answer'}: keys {sorted(got)} vs {sorted(want)}"
            return next((m for k in want if (m := json_mismatch(want[k], got[k], atol, rtol, f"{where}.{k}"))), "")
        if isinstance(want, list) and isinstance(got, list):
            if len(want) != len(got):
                return f"{where or 'answer'}: {len(got)} items vs {len(want)}"
            return next((m for i, (a, b) in enumerate(zip(want, got)) if (m := json_mismatch(a, b, atol, rtol, f"{where}[{i}]"))), "")
        return "" if want == got else f"{where or 'answer'}: {str(got)[:40]} vs {str(want)[:40]}"
    return "" if abs(got - want) <= atol + rtol * abs(want) else f"{where}: {got:.6g} vs {want:.6g}"


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
