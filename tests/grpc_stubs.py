"""Python stubs for TorchServe's gRPC APIs, generated (grpcio-tools) from the .proto files inside TorchServe's own
frontend jar, google/rpc/status.proto included, exactly as docs/requests.md tells users to."""

from __future__ import annotations

import importlib
import sys
import zipfile
from pathlib import Path
from types import SimpleNamespace

PROTOS = ["proto/inference.proto", "proto/management.proto", "proto/open_inference_grpc.proto", "google/rpc/status.proto"]


def jar() -> Path:
    import ts

    return Path(ts.__file__).parent / "frontend" / "model-server.jar"


def generate(out: Path) -> SimpleNamespace:
    """Extract the protos into `out`/protos, compile them into `out`/gen and import the modules."""
    from grpc_tools import protoc

    src, gen = out / "protos", out / "gen"
    gen.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(jar()) as z:
        for name in PROTOS:
            z.extract(name, src)
    args = ["protoc", f"-I{src / 'proto'}", f"-I{src}", f"--python_out={gen}", f"--grpc_python_out={gen}"]
    include = Path(protoc.__file__).parent / "_proto"  # google/protobuf/empty.proto
    assert protoc.main([*args, f"-I{include}", *(str(src / p) for p in PROTOS)]) == 0
    sys.path.insert(0, str(gen))
    importlib.invalidate_caches()
    names = ["inference_pb2", "inference_pb2_grpc", "open_inference_grpc_pb2", "open_inference_grpc_pb2_grpc"]
    return SimpleNamespace(**{n: importlib.import_module(n) for n in names})
