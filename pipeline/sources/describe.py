"""`marpipe inspect`: what a checkpoint holds, read with the same safe loader as the build."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.sources.checkpoint import detected_prefixes, read_checkpoint


def describe(path: Path) -> dict[str, Any]:
    raw = read_checkpoint(path)
    tensors = {k: {"shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch.")} for k, v in raw.state_dict.items()}
    params = sum(v.numel() for v in raw.state_dict.values() if v.dtype.is_floating_point)
    return {
        "path": str(path),
        "format": raw.format,
        "sha256": raw.sha256,
        "size_bytes": raw.size,
        "nested_key": raw.nested_key,
        "detected_prefixes": detected_prefixes(sorted(raw.state_dict)),
        "ignored_extras": raw.ignored_extras,
        "index": raw.index,
        "files": raw.shards,  # a sharded checkpoint's index and shards, each with its sha256
        "tensor_count": len(tensors),
        "parameter_count": params,
        "tensors": tensors,
    }


def render(info: dict[str, Any]) -> str:
    lines = [
        f"checkpoint   {info['path']}",
        f"format       {info['format']}",
        f"sha256       {info['sha256']}" + (f" (of the index and {len(info['files']) - 1} shards)" if info["files"] else ""),
        f"size         {info['size_bytes']:,} bytes",
        f"nested under {info['nested_key'] or '-'}",
        f"prefixes     {' '.join(info['detected_prefixes']) or '-'}",
        f"tensors      {info['tensor_count']}",
        f"parameters   {info['parameter_count']:,} (floating-point elements)",
    ]
    for f in info["files"]:
        lines.append(f"file         {f['sha256']}  {f['name']} ({f['size']:,} bytes)")
    if info["ignored_extras"]:
        lines.append(f"ignored      {', '.join(info['ignored_extras'])}")
    width = max((len(k) for k in info["tensors"]), default=0)
    lines.append("")
    lines += [f"  {k:<{width}}  {v['dtype']:<9} {v['shape']}" for k, v in sorted(info["tensors"].items())]
    return "\n".join(lines)
