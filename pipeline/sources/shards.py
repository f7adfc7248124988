"""Checkpoint folders and sharded checkpoints, as Hugging Face's `save_pretrained` writes them.

`checkpoint.path` may name a file, a folder, or an index file. A folder holds (first found wins)
``model.safetensors.index.json``, ``model.safetensors``, ``pytorch_model.bin.index.json`` or
``pytorch_model.bin``. An index maps every tensor name to the shard that holds it; every shard is read
with the same safety as a single file (`pipeline.sources.checkpoint`), and the shards must agree with the index
exactly: a missing or extra shard, a key in two shards, a key the index names that its shard lacks, or a
key the index does not name is refused (exit 3) naming it.

The hash of a sharded checkpoint covers the index and every shard: the sha256 of the lines
``"<sha256 of the file>  <file name>\\n"``, one per file, sorted by file name — what
``sha256sum <index> <shards> | LC_ALL=C sort -k 2 | sha256sum`` prints in the folder.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.errors import CheckpointError

INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
SINGLES = ("model.safetensors", "pytorch_model.bin")
SHARD_RE = re.compile(r"^(?P<stem>.+)-\d+-of-(?P<count>\d+)(?P<ext>\.[^-]+)$")


@dataclass
class Layout:
    """Where the weights are: one file, or an index and its shards (sorted by name)."""

    path: Path  # what the spec named: a file, a folder or an index
    files: list[Path]  # the single file, or the shards
    index: Path | None = None
    weight_map: dict[str, str] = field(default_factory=dict)  # tensor name → shard file name


def resolve(path: Path) -> Layout:
    """The files a checkpoint path stands for; CheckpointError when a folder holds none of them."""
    if path.is_dir():
        for name in INDEXES:
            if (path / name).is_file():
                return _indexed(path, path / name)
        for name in SINGLES:
            if (path / name).is_file():
                return Layout(path, [path / name])
        raise CheckpointError(
            f"checkpoint {path}: a folder without weights: expected {', '.join(INDEXES[:1] + SINGLES[:1] + INDEXES[1:] + SINGLES[1:])}"
        )
    if path.name.endswith(".json"):
        return _indexed(path, path)
    return Layout(path, [path])


def _indexed(named: Path, index: Path) -> Layout:
    where = f"checkpoint {index}"
    try:
        doc = json.loads(index.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise CheckpointError(f"{where}: not a readable index ({exc})") from None
    weight_map = doc.get("weight_map") if isinstance(doc, dict) else None
    if not isinstance(weight_map, dict) or not weight_map or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"{where}: not a shard index: no weight_map of tensor names to shard files")
    names = sorted(set(weight_map.values()))
    odd = [n for n in names if Path(n).name != n or n in (".", "..")]
    if odd:
        raise CheckpointError(f"{where}: shard names must be plain file names in the index's folder, got {odd[0]!r}")
    folder = index.parent
    missing = [n for n in names if not (folder / n).is_file()]
    if missing:
        raise CheckpointError(f"{where}: {len(missing)} shards the index names are missing ({', '.join(missing[:3])})")
    extra = _extra_shards(folder, names)
    if extra:
        raise CheckpointError(
            f"{where}: {len(extra)} shard files the index does not name ({', '.join(extra[:3])}): left from another save? remove them"
        )
    return Layout(named, [folder / n for n in names], index, dict(weight_map))


def _extra_shards(folder: Path, names: list[str]) -> list[str]:
    """Files named like the index's shards (same stem and extension, '-NNNNN-of-NNNNN') that it does not name."""
    families = {(m["stem"], m["ext"]) for m in map(SHARD_RE.match, names) if m}
    extra = []
    for p in sorted(folder.iterdir()):
        m = SHARD_RE.match(p.name)
        if m and (m["stem"], m["ext"]) in families and p.name not in names:
            extra.append(p.name)
    return extra


def merge(layout: Layout, parts: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """One state_dict from the shards' own, checked against the index; the tensors are not copied."""
    where = f"checkpoint {layout.index}"
    merged: dict[str, Any] = {}
    home: dict[str, str] = {}
    for shard, state in parts.items():
        for key, tensor in state.items():
            if key in home:
                raise CheckpointError(f"{where}: tensor {key!r} is in two shards ({home[key]} and {shard})")
            home[key] = shard
            merged[key] = tensor
    for key, shard in sorted(layout.weight_map.items()):
        if key not in home:
            raise CheckpointError(f"{where}: the index puts tensor {key!r} in {shard}, which lacks it")
        if home[key] != shard:
            raise CheckpointError(f"{where}: tensor {key!r} is in {home[key]}, the index puts it in {shard}")
    unnamed = sorted(set(home) - set(layout.weight_map))
    if unnamed:
        raise CheckpointError(f"{where}: {len(unnamed)} tensors the index does not name ({', '.join(unnamed[:3])} in {home[unnamed[0]]})")
    return merged


def digest(files: list[dict[str, Any]]) -> str:
    """The checkpoint's sha256: over '<sha256>  <name>\\n' of every file (index and shards), sorted by name."""
    lines = "".join(f"{f['sha256']}  {f['name']}\n" for f in sorted(files, key=lambda f: f["name"]))
    return hashlib.sha256(lines.encode("utf-8")).hexdigest()
