"""Many builds: the (spec, format) plan, shards, the build cache, worker processes, publishing and reports.

`pipeline.build.runner.build` builds ONE archive; this module decides which archives to build, runs them (in this
process, or in `--jobs` worker processes started fresh with `spawn`: never forked from a process that has
threads, and torch is never imported here), publishes each finished archive to its store, and reports.
An archive whose build key (`pipeline.build.cache`) matches the one the store holds, and which checks out, is
`unchanged` and not built: such a run never imports torch. With `--sign-key`, every archive is put in place with its
signature (`pipeline.store.signing`); an unchanged one not signed by that key is signed where it lies.
"""

from __future__ import annotations

import argparse
import atexit
import hashlib
import io
import multiprocessing
import os
import sys
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.build import cache, reports
from pipeline.build.steps import STAGES
from pipeline.errors import PipelineError, SpecError
from pipeline.spec import precision
from pipeline.spec.spec import Spec, load_spec
from pipeline.store import signing, stores


def shard(value: str) -> tuple[int, int]:
    """`I/N` (1-based) for --shard."""
    try:
        i, n = (int(v) for v in value.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected I/N, e.g. 1/4, got {value!r}") from None
    if not 1 <= i <= n:
        raise argparse.ArgumentTypeError(f"shard {value}: need 1 <= I <= N")
    return i, n


def shard_of(name: str, count: int) -> int:
    """The shard (1-based) that builds archive `name`: from a hash of the name alone, so the shards split
    the same way whatever the order of the SPEC arguments, and together build each archive once."""
    return int(hashlib.sha256(name.encode()).hexdigest()[:16], 16) % count + 1


def plan(specs: list[Spec], formats: list[str] | None, part: tuple[int, int] | None = None, layout: str = "mar") -> list[Spec]:
    """Every (spec, format) build in spec order, this shard's only when `part` is given."""
    jobs = [job for s in specs for job in precision.builds(s, formats)] if formats else list(specs)
    names = [j.name for j in jobs]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        ext = ".mar" if layout == "mar" else "/"
        raise SpecError(f"two builds would write the same archive: {', '.join(d + ext for d in dup)}; give the specs different names")
    if part:
        jobs = [j for j in jobs if shard_of(j.name, part[1]) == part[0]]
    return jobs


@dataclass
class Job:
    spec: Spec
    folder: Path  # the local folder the archive is written into
    device: str | None
    key: str | None  # None: computed after the load stage hashed the checkpoint (the store holds no such archive)
    layout: str = "mar"  # mar: <name>.mar; dir: the folder <name>/
    opts: dict[str, Any] | None = None  # cache.options, for a key computed later
    sign_key: Path | None = None  # a private key file: the archive is signed as it is put in place

    def build_key(self) -> str:
        """Computed once: the archive's marpipe.json and the report name the same key."""
        if self.key is None:
            self.key = cache.build_key(self.spec, self.opts or {})
        return self.key


def _say(line: str) -> None:
    """One whole line on stdout, written at once (worker processes write to the same stdout)."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def run(args: argparse.Namespace) -> int:
    specs = [load_spec(p) for p in args.specs]  # every spec is validated before any work starts
    jobs = plan(specs, args.format, args.shard, args.layout)
    sign_key = getattr(args, "sign_key", None)
    if sign_key is not None:
        signing.check_private_key(sign_key)  # a key model-signing cannot use fails here, before any build
    with stores.open_store(args.store) as store:
        store.check(write=True)  # an unreachable or unwritable store fails here, before any build
        opts = cache.options(args)
        results: dict[int, dict[str, Any]] = {}
        todo: list[tuple[int, Job]] = []
        for i, spec in enumerate(jobs):
            start = time.perf_counter()
            key = cache.build_key(spec, opts) if not args.force and store.may_hold(spec.name) else None
            entry = store.unchanged(spec.name, key, sign_key) if key else None
            if entry:
                results[i] = _unchanged(spec, key, entry, store, time.perf_counter() - start)
                _say(f"{spec.name:<24} unchanged        build key {key[:12]}, {store.location(entry['file'])}")
            else:
                todo.append((i, Job(spec, store.local, args.device, key, args.layout, opts, sign_key)))
        _write_reports(args, results, final=False)
        first = _build(todo, args, store, results)
        _write_reports(args, results, final=True)
    counts = {s: sum(r["status"] == s for r in results.values()) for s in ("ok", "unchanged", "failed")}
    shard_note = f" (shard {args.shard[0]}/{args.shard[1]})" if args.shard else ""
    _say(
        f"{counts['ok']} built, {counts['unchanged']} unchanged, {counts['failed']} failed "
        f"of {len(jobs)} archives{shard_note} in {store.url}"
    )
    return first


def _build(todo: list[tuple[int, Job]], args: argparse.Namespace, store: stores.Store, results: dict[int, dict[str, Any]]) -> int:
    """Run the builds, publish each archive as it is done; the exit code of the first failure in spec order."""
    if not todo:
        return 0
    if args.jobs <= 1 or len(todo) == 1:
        if args.device == "cuda":  # once, before any work, rather than once per build
            from pipeline.stages.parity import resolve_device

            resolve_device(todo[0][1].spec, args.device)
        from pipeline.sources.checkpoint import prescan

        for path in dict.fromkeys(j.spec.checkpoint.path for _, j in todo):
            prescan(path)  # hashing overlaps the import of torch
        for i, job in todo:
            _finish(i, build_one(job, prescanned=True), store, results, args)
            if args.fail_fast and results[i]["status"] == "failed":
                break
        return _first_failure(results)
    context = multiprocessing.get_context("spawn")  # a fresh interpreter: nothing forked from our threads
    workers = min(args.jobs, len(todo))
    threads = max(1, (os.cpu_count() or 1) // workers)
    queue = list(todo)  # not yet handed out, in spec order
    running: dict[Future, tuple[int, Job]] = {}
    warm: dict[int, set[str]] = {}  # worker pid → the formats it has exported (their exporters are loaded there)
    with ProcessPoolExecutor(max_workers=workers, mp_context=context, initializer=_worker_init, initargs=(threads,)) as pool:

        def hand_out(pid: int | None) -> None:
            """One more build for the worker that just finished (exactly `workers` builds run at once, so the
            idle worker takes it): of a format it has exported before if any, else of one no other has."""
            mine = warm.get(pid, set()) if pid is not None else set()
            others = {f for q, fs in warm.items() if q != pid for f in fs} | {job.spec.export.format for _, job in running.values()}
            i, job = queue.pop(_pick([job.spec.export.format for _, job in queue], mine, others))
            try:
                running[pool.submit(build_one, job)] = (i, job)
            except BrokenProcessPool:  # a worker died: the pool takes nothing more, so nothing queued will run
                for k, left in sorted([(i, job), *queue], key=lambda t: t[0]):
                    _finish(k, _died(left), store, results, args)
                queue.clear()

        for _ in range(workers):
            hand_out(None)
        while running:
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                i, job = running.pop(future)
                try:
                    result = future.result()
                except BrokenProcessPool:  # a worker was killed (signal, out of memory): its builds failed
                    result = _died(job)
                pid = result.pop("worker", None)
                if pid is not None:
                    warm.setdefault(pid, set()).add(job.spec.export.format)
                _finish(i, result, store, results, args)
                if args.fail_fast and results[i]["status"] == "failed":
                    queue.clear()
                if queue:
                    hand_out(pid)
    return _first_failure(results)


def _pick(formats: list[str], mine: set[str], others: set[str]) -> int:
    """Which queued build to hand a worker: a format it has warm (the first ONNX export in a process costs
    seconds of imports and tracing set-up), else one no other worker has warm, else the first."""
    for k, f in enumerate(formats):
        if f in mine:
            return k
    return next((k for k, f in enumerate(formats) if f not in others), 0)


def _died(job: Job) -> dict[str, Any]:
    result = _failed(job.spec, PipelineError("the worker process building it died (killed, or out of memory)"))
    result.update(build_key=_key_of(job), duration_s=None, size=None, sha256=None)
    return result


def _first_failure(results: dict[int, dict[str, Any]]) -> int:
    return next((results[i]["exit_code"] for i in sorted(results) if results[i]["status"] == "failed"), 0)


def _finish(i: int, result: dict[str, Any], store: stores.Store, results: dict[int, dict[str, Any]], args: argparse.Namespace) -> None:
    """Publish a finished archive (local: enter it in the index; remote: upload), print its error line."""
    result.pop("worker", None)
    known = result.pop("digest", None)  # computed as the archive was written: the index need not read it again
    if result["status"] == "ok":
        path = Path(result["archive"])
        if isinstance(store, stores.RemoteStore):
            _say(f"{result['name']:<24} publish  {path.stat().st_size / 1e6:.1f} MB to {store.location(path.name)}")
        start = time.perf_counter()
        try:
            entry = store.publish(path, known=known)
        except PipelineError as exc:
            result.update(status="failed", exit_code=exc.exit_code, error=str(exc), archive=None)
            result["stages"].append(
                {"name": "publish", "status": "failed", "duration_s": round(time.perf_counter() - start, 3), "detail": ""}
            )
        else:
            result.update(size=entry["size"], sha256=entry["sha256"], archive=store.location(entry["file"]))
            if isinstance(store, stores.RemoteStore):
                took = round(time.perf_counter() - start, 3)
                result["stages"].append({"name": "publish", "status": "ok", "duration_s": took, "detail": result["archive"]})
                _say(f"{result['name']:<24} publish  ok     {took:7.2f}s  {result['archive']} (size and sha256 checked)")
    if result["status"] == "failed":
        error = result["error"] or ""
        print(f"error: {error}" if error.startswith(result["name"]) else f"error: {result['name']}: {error}", file=sys.stderr, flush=True)
    results[i] = result
    _write_reports(args, results, final=False)


def build_one(job: Job, prescanned: bool = False) -> dict[str, Any]:
    """Build one archive (in this process or a worker); its result as a report dict, failures included."""
    if not prescanned:
        from pipeline.sources.checkpoint import prescan

        prescan(job.spec.checkpoint.path)  # hashing overlaps the import of torch
    from pipeline.build.runner import build

    start = time.perf_counter()
    try:
        result = build(job.spec, job.folder, job.device, job.layout, build_key=job.build_key, sign_key=job.sign_key).as_dict()
    except PipelineError as exc:
        report = getattr(exc, "report", None)
        result = report.as_dict() if report else _failed(job.spec, exc)
    result.update(build_key=_key_of(job), duration_s=round(time.perf_counter() - start, 3), size=None, sha256=None, worker=os.getpid())
    return result


def _key_of(job: Job) -> str | None:
    """The job's build key for its report (remembered hashes: no second pass); None if a file it covers is gone."""
    try:
        return job.build_key()
    except OSError:
        return None


def _failed(spec: Spec, exc: PipelineError) -> dict[str, Any]:
    return {
        "spec": str(spec.source),
        "name": spec.name,
        "format": spec.export.format,
        "status": "failed",
        "exit_code": exc.exit_code,
        "error": str(exc),
        "archive": None,
        "parity": None,
        "stages": [{"name": s, "status": "skipped", "duration_s": 0.0, "detail": ""} for s in STAGES],
    }


def _unchanged(spec: Spec, key: str, entry: dict[str, Any], store: stores.Store, took: float) -> dict[str, Any]:
    return {
        "spec": str(spec.source),
        "name": spec.name,
        "format": spec.export.format,
        "status": "unchanged",
        "exit_code": 0,
        "error": None,
        "archive": store.location(entry["file"]),
        "parity": {"outputs": entry.get("parity") or {}},
        "stages": [{"name": s, "status": "skipped", "duration_s": 0.0, "detail": "unchanged"} for s in STAGES],
        "build_key": key,
        "duration_s": round(took, 3),
        "size": entry["size"],
        "sha256": entry["sha256"],
    }


def _write_reports(args: argparse.Namespace, results: dict[int, dict[str, Any]], final: bool) -> None:
    """The JSON report after every build (so a killed run leaves what it did); JUnit and summary at the end."""
    builds = [results[i] for i in sorted(results)]
    if args.report:
        reports.write_report(args.report, builds)
    if final and args.junit:
        reports.write_junit(args.junit, builds)
    if final and args.summary:
        reports.append_summary(args.summary, builds, str(args.store))


class _Lines(io.TextIOBase):
    """A worker's stdout/stderr: each complete line is one write(2), so lines of parallel builds never mix."""

    def __init__(self, fd: int) -> None:
        self.fd, self.buf = fd, ""

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        self.buf += text
        while "\n" in self.buf:
            line, self.buf = self.buf.split("\n", 1)
            os.write(self.fd, (line + "\n").encode())
        return len(text)

    def flush(self) -> None:
        if self.buf:
            os.write(self.fd, self.buf.encode())
            self.buf = ""


def _worker_init(threads: int) -> None:
    """Whole lines out; the cores shared among the workers (torch reads OMP_NUM_THREADS when imported, later):
    N workers each spinning up all cores' worth of OpenMP threads take the cores from each other."""
    sys.stdout, sys.stderr = _Lines(1), _Lines(2)
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    atexit.register(_quick_exit)


def _quick_exit() -> None:
    """A worker's exit without tearing torch's modules down (seconds on a busy machine, for nothing): by the
    time atexit runs, multiprocessing has sent every result and run its own clean-up."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
