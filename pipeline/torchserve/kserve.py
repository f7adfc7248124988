"""`marpipe kserve`: a store laid out as KServe's TorchServe runtime (`kserve-torchserve`) reads it.

KServe downloads the InferenceService's `storageUri` into `/mnt/models` and runs, in the
`pytorch/torchserve-kfs` image, `torchserve --start --model-store=/mnt/models/model-store
--ts-config=/mnt/models/config/config.properties`, with its own wrapper in front (KServe's port 8080) that
reads the same config.properties: the models it serves are the ones named in `model_snapshot`, TorchServe is
reached on `inference_address`. So this writes:

  OUT/config/config.properties   TorchServe's config: inference and management on 8085, metrics on 8082,
                                 gRPC on 7070/7071, model_snapshot naming every model with its batch settings,
                                 max_response_size the largest the archives ask for (see `limits`)
  OUT/model-store/               the archives (.mar files or folders)
  OUT/inferenceservice.yaml      the InferenceService (modelFormat pytorch, runtime kserve-torchserve)

The stock `kservev2` envelope is left off (no `service_envelope`, and `enable_envvars_config=false` so the
runtime's TS_SERVICE_ENVELOPE variable cannot turn it on): it passes the handler only the first input of a
request and breaks batching, so the archive's own handler reads the requests as they come.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import yaml

from pipeline.errors import PackageError, SpecError
from pipeline.store import archive, archive_dir, layout, signing
from pipeline.torchserve.deploy import version_key
from pipeline.torchserve.limits import DEFAULT_MAX_RESPONSE_SIZE, max_response_size, size_settings
from pipeline.torchserve.server import jvm_args

TORCHSERVE_VERSION = "0.12.0"  # the runtimeVersion: the image pytorch/torchserve-kfs:0.12.0
MOUNT = "/mnt/models"
PORTS = {"http": 8085, "metrics": 8082, "grpc_inference": 7070, "grpc_management": 7071}
PROTOCOLS = ("v1", "v2")


def model_entry(path: Path) -> tuple[str, str, dict]:
    """(model name, version, snapshot settings) of one archive, from its manifest and model-config.yaml
    (what TorchServe itself would apply), marpipe.json's `serve` filling what the config leaves out."""
    try:
        manifest = json.loads(layout.read_entry(path, archive.MANIFEST))["model"]
        config_name = manifest.get("configFile")
        config = yaml.safe_load(layout.read_entry(path, config_name)) if config_name else {}
        try:
            serve = json.loads(layout.read_entry(path, archive.METADATA)).get("serve", {})
        except (KeyError, FileNotFoundError):  # not built by marpipe: model-config.yaml alone
            serve = {}
    except (OSError, KeyError, ValueError, yaml.YAMLError) as exc:
        raise PackageError(f"{path}: not a loadable archive ({exc}); run marpipe verify {path}") from None
    config = config if isinstance(config, dict) else {}

    def pick(key: str, marpipe_key: str, default: int) -> int:
        value = config.get(key, serve.get(marpipe_key, default))
        return int(value) if value is not None else default

    settings = {
        "minWorkers": pick("minWorkers", "min_workers", 1),
        "maxWorkers": pick("maxWorkers", "max_workers", 1),
        "batchSize": pick("batchSize", "batch_size", 1),
        "maxBatchDelay": pick("maxBatchDelay", "max_batch_delay_ms", 100),
        "responseTimeout": pick("responseTimeout", "response_timeout_s", 120),
    }
    return manifest["modelName"], str(manifest.get("modelVersion") or "1.0"), settings


def store_name(model: str, version: str, is_dir: bool, versions: int) -> str:
    """The archive's name in OUT/model-store. KServe's wrapper looks for folders or files whose only suffix
    is `.mar` (a name like `mlp.v2.mar` does not count), so dots become underscores."""
    base = re.sub(r"[^A-Za-z0-9_-]", "_", model if versions == 1 else f"{model}-{version}")
    return base if is_dir else f"{base}.mar"


def config_properties(snapshot: dict, vmargs: str | None = None, max_response: int = DEFAULT_MAX_RESPONSE_SIZE) -> str:
    lines = [
        "# marpipe kserve: read by TorchServe and by KServe's wrapper from /mnt/models/config/config.properties",
        "# TorchServe is reached through KServe's wrapper (port 8080) only: it listens on the pod's loopback,",
        "# where the wrapper, which sends no token, calls it; so token authorization is off",
        f"inference_address=http://127.0.0.1:{PORTS['http']}",
        f"management_address=http://127.0.0.1:{PORTS['http']}",
        f"metrics_address=http://0.0.0.0:{PORTS['metrics']}",
        "grpc_inference_address=127.0.0.1",
        f"grpc_inference_port={PORTS['grpc_inference']}",
        "grpc_management_address=127.0.0.1",
        f"grpc_management_port={PORTS['grpc_management']}",
        "enable_metrics_api=true",
        "metrics_mode=prometheus",
        f"model_store={MOUNT}/model-store",
        f"allowed_urls=file://{MOUNT}/model-store/.*",
        "install_py_dep_per_model=false",
        "decode_input_request=false",  # our handler parses bodies itself (once, orjson where installed)
        "enable_envvars_config=false",
        "ts_open_inference_protocol=true",  # v2 server live/ready and ModelInfer on TorchServe's own ports
        "disable_token_authorization=true",
        "enable_model_api=false",
        *(f"{k}={v}" for k, v in size_settings(max_response).items()),
        f"model_snapshot={json.dumps(snapshot, separators=(',', ':'), sort_keys=True)}",
    ]
    if jvm := jvm_args(vmargs):  # TorchServe's start script passes them to its JVM
        lines.append(f"vmargs={jvm}")
    return "\n".join(lines) + "\n"


def inference_service(name: str, storage_uri: str, protocol: str) -> dict:
    return {
        "apiVersion": "serving.kserve.io/v1beta1",
        "kind": "InferenceService",
        "metadata": {"name": name},
        "spec": {
            "predictor": {
                "model": {
                    "modelFormat": {"name": "pytorch"},
                    "runtime": "kserve-torchserve",
                    "runtimeVersion": TORCHSERVE_VERSION,
                    "protocolVersion": protocol,
                    "storageUri": storage_uri,
                }
            }
        },
    }


def service_name(out: Path) -> str:
    """A DNS-1123 label from OUT's folder name (InferenceService names must be one)."""
    name = re.sub(r"[^a-z0-9-]+", "-", out.resolve().name.lower()).strip("-")
    name = re.sub(r"^[^a-z]+", "", name)[:45].rstrip("-")
    return name or "marpipe"


def write(store: Path, out: Path, storage_uri: str | None, protocol: str, vmargs: str | None = None) -> dict:
    """Lay out OUT from every archive in `store`; returns the snapshot written."""
    if protocol not in PROTOCOLS:
        raise SpecError(f"--protocol {protocol}: use {' or '.join(PROTOCOLS)}")
    archives = layout.list_archives(store)
    if not archives:
        raise PackageError(f"no archives in {store}; run marpipe build first")
    entries = [(path, *model_entry(path)) for path in archives]
    counts: dict[str, int] = {}
    for _, name, _, _ in entries:
        counts[name] = counts.get(name, 0) + 1
    models: dict[str, dict] = {}
    names: dict[str, Path] = {}
    for path, name, version, settings in entries:
        file = store_name(name, version, path.is_dir(), counts[name])
        if file in names:
            raise SpecError(f"{path} and {names[file]} would both be {file} in the KServe model store; rename one model")
        if version in models.get(name, {}):
            raise SpecError(f"{path}: version {version} of {name} is also in {models[name][version]['marName']}; keep one")
        names[file] = path
        models.setdefault(name, {})[version] = dict(settings, marName=file, defaultVersion=False)
    for versions in models.values():
        versions[max(versions, key=version_key)]["defaultVersion"] = True
    snapshot = {"name": "startup.cfg", "modelCount": sum(len(v) for v in models.values()), "models": models}
    uri = storage_uri or f"pvc://marpipe-models/{out.resolve().name}"
    config = config_properties(snapshot, vmargs, max_response_size(archives))
    _write_tree(out, names, config, inference_service(service_name(out), uri, protocol))
    return snapshot


def _write_tree(out: Path, names: dict[str, Path], config: str, isvc: dict) -> None:
    """model-store/ built beside its final place and swapped in whole; the two text files written atomically."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        tmp = out / f".model-store.{os.getpid()}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        for file, src in names.items():
            if src.is_dir():  # its signature, marpipe.sig, inside
                shutil.copytree(src, tmp / file, ignore=shutil.ignore_patterns(archive_dir.PYCACHE))
            else:
                shutil.copyfile(src, tmp / file)
                if signing.signature_path(src).is_file():  # beside it, under the archive's name in model-store
                    shutil.copyfile(signing.signature_path(src), signing.signature_path(tmp / file))
        archive_dir.put_in_place(tmp, out / "model-store")
        (out / "config").mkdir(exist_ok=True)
        _atomic(out / "config" / "config.properties", config)
        header = "# marpipe kserve: upload OUT to the storageUri, then kubectl apply -f inferenceservice.yaml\n"
        _atomic(out / "inferenceservice.yaml", header + yaml.safe_dump(isvc, sort_keys=False))
    except OSError as exc:
        raise PackageError(f"{out}: cannot write the KServe layout there ({exc.strerror or exc})") from None


def _atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def kserve(store: Path, out: Path, storage_uri: str | None, protocol: str, vmargs: str | None = None) -> int:
    snapshot = write(store, out, storage_uri, protocol, vmargs)
    print(f"{'model':<28} {'version':<10} {'in model-store':<32} {'batch':>5} {'delay ms':>8} {'workers':>8}")
    for name, versions in sorted(snapshot["models"].items()):
        for version, s in sorted(versions.items()):
            mark = " (default)" if s["defaultVersion"] and len(versions) > 1 else ""
            workers = f"{s['minWorkers']}-{s['maxWorkers']}"
            print(f"{name:<28} {version + mark:<10} {s['marName']:<32} {s['batchSize']:>5} {s['maxBatchDelay']:>8} {workers:>8}")
    print(f"wrote {out}/config/config.properties, {out}/model-store/ and {out}/inferenceservice.yaml (protocol {protocol})")
    return 0
