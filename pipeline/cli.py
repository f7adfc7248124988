"""The `marpipe` command line. User errors print one line and exit with their code; bugs exit 1 with a traceback."""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from pathlib import Path
from typing import Any

import pipeline
from pipeline.build.release import shard
from pipeline.errors import EXIT_CODES, PipelineError
from pipeline.spec.spec import AUTO, FORMATS


def _formats(value: str) -> list[str]:
    items = _all_formats() if value == "all" else [v.strip() for v in value.split(",") if v.strip()]
    bad = [v for v in items if v not in (*FORMATS, AUTO)]
    if bad or not items or (AUTO in items and len(items) > 1):
        raise argparse.ArgumentTypeError(
            f"unknown format {','.join(bad) or value!r}; use {', '.join(FORMATS)}, a comma list, all, or auto (alone)"
        )
    return items


def _all_formats() -> list[str]:
    """`--format all`: every format, aoti where a C++ compiler is found (said on stderr where none is: a machine
    without one still builds the portable three; `--format aoti` there is exit 4)."""
    from pipeline.stages.aoti import compiler_missing

    missing = compiler_missing()
    if missing:
        print(f"marpipe: --format all leaves out aoti: {missing}", file=sys.stderr)
    return [f for f in FORMATS if not (f == "aoti" and missing)]


def _positive(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {value!r}")
    return n


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="marpipe",
        description="Turn a PyTorch state_dict and a YAML spec into a TorchServe .mar that passed parity.",
        epilog="exit codes: " + "; ".join(f"{k} {v}" for k, v in EXIT_CODES.items()),
    )
    p.add_argument("--version", action="version", version=f"marpipe {pipeline.__version__}")
    p.add_argument("--debug", action="store_true", help="show tracebacks for user errors too")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    b = sub.add_parser("build", help="load, export, check parity and package each spec into the store")
    b.add_argument("specs", nargs="+", metavar="SPEC", help="model spec YAML files")
    b.add_argument(
        "--store",
        default="model_store",
        help="model store: a folder, or an fsspec URL such as s3://bucket/prefix (default: model_store)",
    )
    b.add_argument(
        "--format",
        type=_formats,
        help="eager, torchscript, onnx, aoti, a comma list or all; "
        "with several, archives are named <name>_<format>.mar (default: the spec's export.format)",
    )
    b.add_argument("--device", choices=("auto", "cpu", "cuda"), help="parity device (default: the spec's parity.device)")
    b.add_argument("--report", type=Path, help="write a JSON report with per-stage status and duration")
    b.add_argument("--fail-fast", action="store_true", help="stop at the first failed build")
    b.add_argument(
        "--layout",
        choices=("mar", "dir"),
        default="mar",
        help="mar: <name>.mar (default); dir: the folder <name>/ that TorchServe serves without extracting it",
    )
    b.add_argument("-j", "--jobs", type=_positive, default=1, help="build in N worker processes (default 1)")
    b.add_argument("--shard", type=shard, metavar="I/N", help="build only shard I of N (1-based) of the (spec, format) list")
    b.add_argument("--force", action="store_true", help="rebuild archives the store holds with the same build key")
    b.add_argument("--junit", type=Path, metavar="FILE", help="write JUnit XML: one testcase per archive")
    b.add_argument("--summary", type=Path, metavar="FILE", help="append a Markdown table of the builds to FILE")
    b.add_argument("--sign-key", type=Path, metavar="KEY", help="sign each archive with this EC private key (PEM): docs/security.md")

    x = sub.add_parser("index", help="rebuild the store's index.json from its archives")
    x.add_argument("store", metavar="STORE", help="a folder or an fsspec URL such as s3://bucket/prefix")

    i = sub.add_parser(
        "inspect",
        help="describe a checkpoint (format, sha256, tensors, parameters, prefixes) or an archive (format, inputs, outputs, "
        "an aoti package's platform and whether this machine can serve it)",
    )
    i.add_argument("checkpoint", type=Path, metavar="CHECKPOINT|ARCHIVE")
    i.add_argument("--json", action="store_true", help="print JSON")

    v = sub.add_parser("verify", help="check archives: zip integrity, entry names, manifest, every hash (exit 6 on a fault)")
    v.add_argument("archives", nargs="+", metavar="ARCHIVE", help="a .mar file, or its URL in a remote store")
    v.add_argument("--key", type=Path, metavar="PUB", help="also require a signature by this EC public key (PEM; exit 6 without)")

    g = sub.add_parser("sign", help="sign archives where they lie, with an EC private key (PEM); the index notes it")
    g.add_argument("archives", nargs="+", metavar="ARCHIVE", help="a .mar file or directory archive, or its URL in a remote store")
    g.add_argument("--key", type=Path, required=True, metavar="KEY", help="the EC private key (PEM)")

    s = sub.add_parser("smoke", help="serve the store with TorchServe and replay each archive's parity inputs")
    s.add_argument("names", nargs="*", help="model names (default: every archive in the store)")
    s.add_argument("--store", default="model_store", help="a folder, or an fsspec URL (downloaded first)")
    s.add_argument("--timeout", type=float, default=300, help="seconds to wait for workers to be READY")

    n = sub.add_parser("bench", help="in-process latency of eager, TorchScript, ONNX and aoti for a spec, with parity")
    n.add_argument("spec", metavar="SPEC")
    n.add_argument("--format", type=_formats, help="formats to compare (default: all)")
    n.add_argument("--iterations", type=int, default=50, help="timed runs per batch size (default 50)")
    n.add_argument("--device", choices=("auto", "cpu", "cuda"), help="default: the spec's parity.device")
    n.add_argument("--json", type=Path, help="also write the figures as JSON")

    r = sub.add_parser("serve", help="run TorchServe on the store with a safe-by-default configuration")
    r.add_argument("--store", default="model_store", type=Path)
    r.add_argument("--host", default="127.0.0.1", help="address to listen on (default loopback)")
    r.add_argument("--port", type=int, default=8080, help="inference port; management +1, metrics +2")
    r.add_argument("--no-auth", action="store_true", help="turn token authorization off (trusted networks only)")
    r.add_argument("--enable-model-api", action="store_true", help="allow registering models over the management API")
    r.add_argument("--workdir", type=Path, default=Path(".marpipe-serve"), help="config, logs, key file and temp folder")
    r.add_argument("--vmargs", help="options of TorchServe's JVM, e.g. --vmargs=-XX:TieredStopAtLevel=1 (README, Performance)")

    d = sub.add_parser("deploy", help="register archives on a running TorchServe as new versions, check them live, then make them default")
    d.add_argument("archives", nargs="+", type=Path, metavar="ARCHIVE", help=".mar files or directory archives")
    d.add_argument("--management", required=True, help="the server's management API, e.g. http://127.0.0.1:8081")
    d.add_argument("--inference", required=True, help="the server's inference API, e.g. http://127.0.0.1:8080")
    where = d.add_mutually_exclusive_group(required=True)
    where.add_argument("--model-store", type=Path, help="the server's own model store folder: archives are copied in")
    where.add_argument("--url-base", help="http(s) URL the server downloads archives from: each must be at <url-base>/<deploy name>")
    d.add_argument("--token-file", type=Path, help="TorchServe's key_file.json (token authorization); without it no token is sent")
    d.add_argument("--keep", type=_positive, default=2, help="versions kept registered per model, the default among them (default 2)")
    d.add_argument("--workers", type=_positive, help="workers of the new version (default: the archive's serve.min_workers)")
    d.add_argument("--timeout", type=float, default=300, help="seconds for registration and for the workers to be READY (default 300)")
    d.add_argument(
        "--drain-timeout", type=float, default=60, help="seconds for an old version to answer its queue before unregistering (default 60)"
    )
    d.add_argument("--report", type=Path, help="also write the table of what changed as JSON")
    d.add_argument("--verify-key", type=Path, metavar="PUB", help="refuse (exit 6) archives not signed by this EC public key (PEM)")

    k = sub.add_parser("kserve", help="lay out a store for KServe's TorchServe runtime: config, model-store, InferenceService")
    k.add_argument("out", type=Path, metavar="OUT", help="folder to write config/, model-store/ and inferenceservice.yaml into")
    k.add_argument("--store", default="model_store", type=Path, help="the archives to serve (default: model_store)")
    k.add_argument("--storage-uri", help="where OUT will be uploaded, for the InferenceService (default: pvc://marpipe-models/<OUT name>)")
    k.add_argument("--protocol", choices=("v1", "v2"), default="v1", help="the InferenceService's protocolVersion (default v1)")
    k.add_argument("--vmargs", help="options of TorchServe's JVM, written to config.properties (default none)")
    k.add_argument("--verify-key", type=Path, metavar="PUB", help="refuse (exit 6) archives not signed by this EC public key (PEM)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except PipelineError as exc:
        if args.debug:
            traceback.print_exc()
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception:
        traceback.print_exc()
        print("error: internal error in marpipe (a bug): please report it with the traceback above", file=sys.stderr)
        return 1


def run() -> None:
    """The console script: `main`, then a quick exit.

    An interpreter that imported torch spends 0.4 to 0.8 s tearing its modules down at exit, for nothing: every
    file we write is closed and fsynced and every temporary folder removed before `main` returns. So output is
    flushed and the process ends without that teardown.
    """
    code = main()
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except (BrokenPipeError, ValueError):
        code = code or 1
    os._exit(code)


def cmd_build(args: argparse.Namespace) -> int:
    from pipeline.build.release import run as build_all

    return build_all(args)


def _write_json(path: Path, doc: dict[str, Any]) -> None:
    from pipeline.build.reports import write_json

    write_json(path, doc)


def cmd_index(args: argparse.Namespace) -> int:
    from pipeline.store.stores import open_store

    with open_store(args.store) as store:
        store.check(write=False)  # a local folder that does not exist is an error, not a new empty store
        doc = store.regenerate()
    print(f"{store.location('index.json')}: {len(doc['archives'])} archives")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from pipeline.sources.describe import describe, render
    from pipeline.store import index, summary

    if index.is_archive(args.checkpoint):
        info = summary.describe(args.checkpoint)
        print(json.dumps(info, indent=2) if args.json else summary.render(info))
        return 0
    info = describe(args.checkpoint)
    print(json.dumps(info, indent=2) if args.json else render(info))
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from pipeline.errors import PackageError, SignatureError
    from pipeline.store import signing
    from pipeline.store.layout import verify
    from pipeline.store.stores import local_copy

    if args.key:
        signing.check_public_key(args.key)
    bad = unsigned = 0
    for target in args.archives:
        with local_copy(target) as path:
            why = signing.verify(path, args.key) if args.key else None
            found = ([f"signature: {why}"] if why else []) + verify(path)
        bad += bool(found)
        unsigned += bool(why)
        signed = " (signature by the key holds)" if args.key and not found else ""
        print(f"{'ok  ' if not found else 'FAIL'} {target}{signed}" + "".join(f"\n     {f}" for f in found))
    return SignatureError.exit_code if unsigned else PackageError.exit_code if bad else 0


def cmd_sign(args: argparse.Namespace) -> int:
    from pipeline.store import signing
    from pipeline.store.stores import sign

    signing.check_private_key(args.key, "--key")
    first = 0
    for target in args.archives:
        try:
            print(f"signed {target}: {sign(target, args.key)}")
        except PipelineError as exc:
            print(f"error: {exc}", file=sys.stderr)
            first = first or exc.exit_code
    return first


def cmd_smoke(args: argparse.Namespace) -> int:
    from pipeline.store.stores import open_store
    from pipeline.torchserve.smoke import smoke

    with open_store(args.store) as store:
        store.check(write=False)
        return smoke(store.fetch(), args.names, args.timeout)


def cmd_bench(args: argparse.Namespace) -> int:
    from pipeline.build.bench import bench
    from pipeline.spec.spec import load_spec
    from pipeline.stages.parity import resolve_device

    spec = load_spec(args.spec)
    rows = bench(spec, args.format, max(1, args.iterations), resolve_device(spec, args.device))
    if args.json:
        _write_json(args.json, {"spec": str(args.spec), "rows": rows})
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from pipeline.torchserve.serve import serve_forever

    return serve_forever(args)


def cmd_deploy(args: argparse.Namespace) -> int:
    from pipeline.torchserve.deploy import Options, deploy
    from pipeline.torchserve.placement import FolderTarget, UrlTarget
    from pipeline.torchserve.server import Client

    if args.verify_key:  # every archive, before anything is copied or registered
        from pipeline.store import layout, signing

        signing.check_public_key(args.verify_key, "--verify-key")
        layout.check_signatures(args.archives, args.verify_key, "copied or registered")
    client = Client.from_key_file(args.management, args.inference, args.token_file)
    target = FolderTarget(args.model_store) if args.model_store else UrlTarget(args.url_base)
    return deploy(args.archives, client, target, Options(args.workers, args.timeout, args.keep, args.drain_timeout), args.report)


def cmd_kserve(args: argparse.Namespace) -> int:
    from pipeline.torchserve.kserve import kserve

    if args.verify_key:  # every archive of the store, before OUT is written
        from pipeline.store import layout, signing

        signing.check_public_key(args.verify_key, "--verify-key")
        layout.check_signatures(layout.list_archives(args.store), args.verify_key, "written")
    return kserve(args.store, args.out, args.storage_uri, args.protocol, args.vmargs)


COMMANDS = {
    "build": cmd_build,
    "index": cmd_index,
    "inspect": cmd_inspect,
    "verify": cmd_verify,
    "sign": cmd_sign,
    "smoke": cmd_smoke,
    "serve": cmd_serve,
    "bench": cmd_bench,
    "deploy": cmd_deploy,
    "kserve": cmd_kserve,
}
