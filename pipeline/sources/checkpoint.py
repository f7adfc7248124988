"""Reading checkpoints safely: format detection by content, sha256, weights-only loading, normalisation.

Nothing here ever unpickles code: torch files go through ``torch.load(weights_only=True)`` (passed
explicitly, so ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` cannot turn it off; see `pipeline.sources.pickles`), safetensors
through its own parser. A folder or a sharded checkpoint (`pipeline.sources.shards`) is read file by file with the
same care. Every failure is a `CheckpointError` with one line naming the file and the problem.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import re
import struct
import zipfile
import zlib
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.digests import remember
from pipeline.errors import CheckpointError
from pipeline.sources import crc, shards
from pipeline.sources.pickles import Stub, is_legacy_torch, load_torch, pickled_model, raw_pickle_error
from pipeline.spec.spec import KeyRename

ALWAYS_STRIP = ("module.", "_orig_mod.")
NESTED_KEYS = ("state_dict", "model_state_dict", "model", "module")
CHUNK = 64 << 20  # bytes per hash or CRC call: long enough to run without the GIL
COMBINE_FROM = 1 << 20  # segments at least this long are combined into the file's CRC, shorter ones re-read


@dataclass
class RawCheckpoint:
    """What was read from the file, before it meets the architecture."""

    path: Path
    format: str  # torch-zip | torch-legacy | safetensors
    sha256: str
    state_dict: dict[str, Any]
    nested_key: str | None = None
    stripped: list[str] = field(default_factory=list)
    renamed: int = 0
    ignored_extras: list[str] = field(default_factory=list)
    stat: tuple[int, int] = (0, 0)  # (size, mtime_ns) when it was hashed; a sharded one: (total size, 0)
    crc32: int = 0
    index: str | None = None  # a sharded checkpoint's index file name
    shards: list[dict[str, Any]] = field(default_factory=list)  # its index and shards: name, sha256, size

    @property
    def size(self) -> int:
        return self.stat[0]


def detect_format(path: Path) -> str:
    """Tell the checkpoint format from the bytes, not the file name."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(64)
    except OSError as exc:
        raise CheckpointError(f"checkpoint {path}: cannot read: {exc.strerror or exc}") from None
    if size == 0:
        raise CheckpointError(f"checkpoint {path}: the file is empty")
    if head[:4] == b"PK\x03\x04":
        return _zip_kind(path)
    if len(head) >= 9:
        (n,) = struct.unpack("<Q", head[:8])
        if head[8:9] == b"{" and n <= size - 8:
            return "safetensors"
        if head[8:9] == b"{":
            raise CheckpointError(
                f"checkpoint {path}: safetensors header is cut off (declares {n} bytes, file has {size - 8}): the file is truncated"
            )
    if head[:1] == b"\x80" and len(head) > 1 and 2 <= head[1] <= 5:
        return "torch-legacy" if is_legacy_torch(head) else "raw-pickle"  # the latter refused when read
    if head[:1] == b"\x08" and (b"pytorch" in head or b"onnx" in head.lower() or head[2:3] == b"\x12"):
        raise CheckpointError(
            f"checkpoint {path}: this looks like an ONNX model, not a state_dict; "
            "give the torch or safetensors checkpoint it was exported from"
        )
    raise CheckpointError(
        f"checkpoint {path}: not a recognised checkpoint (expected a torch zip .pt/.pth/.ckpt or safetensors); "
        "the file is corrupt or of another kind"
    )


def _zip_kind(path: Path) -> str:
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
            if "MAR-INF/MANIFEST.json" in names:
                raise CheckpointError(f"checkpoint {path}: this is a TorchServe .mar archive, not a checkpoint; give the state_dict file")
            if not any(n.endswith("data.pkl") for n in names):
                raise CheckpointError(f"checkpoint {path}: a zip file, but not a torch checkpoint (no data.pkl inside)")
    except zipfile.BadZipFile as exc:
        raise CheckpointError(f"checkpoint {path}: truncated or corrupt torch zip ({exc})") from None
    except (OSError, EOFError, zipfile.LargeZipFile, NotImplementedError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {path}: truncated or corrupt torch zip ({exc})") from None
    return "torch-zip"


def _zip_extents(path: Path) -> list[tuple[int, int, int, str]] | None:
    """(data start, data end, CRC, name) of every entry, or None when an entry is compressed."""
    extents = []
    with zipfile.ZipFile(path) as z, open(path, "rb") as f:
        for info in z.infolist():
            if info.compress_type != zipfile.ZIP_STORED:
                return None
            f.seek(info.header_offset)
            local = f.read(30)
            if len(local) < 30 or local[:4] != b"PK\x03\x04":
                raise zipfile.BadZipFile(f"bad local header for {info.filename}")
            start = info.header_offset + 30 + int.from_bytes(local[26:28], "little") + int.from_bytes(local[28:30], "little")
            extents.append((start, start + info.compress_size, info.CRC, info.filename))
    return sorted(extents)


def scan(path: Path, fmt: str) -> tuple[str, int]:
    """One pass over the file: its sha256 and CRC32 and, for a torch zip, a check of every entry's CRC.

    The hash runs on this thread, the CRCs on a second one: the CRC of each entry's data and of the gaps
    between them, which combine into the whole file's CRC (packaging puts it in the archive's entry header).
    """
    try:
        extents = _zip_extents(path) if fmt == "torch-zip" else []
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {path}: truncated or corrupt torch zip ({exc})") from None
    if extents is None:  # compressed entries: let zipfile check them
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
        if bad:
            raise CheckpointError(f"checkpoint {path}: corrupt torch zip: entry {bad} fails its CRC check (the file was damaged)")
        extents = []
    size = path.stat().st_size
    segments = _segments(extents, size)
    if segments is None:
        raise CheckpointError(f"checkpoint {path}: corrupt torch zip: its entries overlap or run past the end of the file")
    crcs = [0] * len(segments)  # each entry's data and each gap between them, once

    def crc_all(view: memoryview) -> int:
        """Every segment's CRC, and from them the whole file's: combined for large segments (no second pass),
        recomputed for small ones (cheaper than a combine, which is pure Python)."""
        whole = 0
        for i, (a, b, _, _) in enumerate(segments):
            for lo in range(a, b, CHUNK):
                crcs[i] = zlib.crc32(view[lo : min(b, lo + CHUNK)], crcs[i])
            whole = zlib.crc32(view[a:b], whole) if b - a < COMBINE_FROM else crc.combine(whole, crcs[i], b - a)
        return whole

    # The file is mapped, not read: each thread then makes a few long calls that run without the GIL. Reading
    # it in chunks needs the GIL between chunks, and while torch is being imported that doubled the scan.
    digest = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        if os.fstat(f.fileno()).st_size != size:
            raise CheckpointError(f"checkpoint {path}: the file changed while it was read; try again")
        try:
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else None
        except (OSError, ValueError):  # a file system that cannot map files
            mm = None
        if mm is None:  # (or an empty file) read it whole, more slowly
            data = f.read()
            digest.update(data)
            whole = crc_all(memoryview(data))
        else:
            with mm, ThreadPoolExecutor(1) as pool:
                mm.madvise(mmap.MADV_SEQUENTIAL)
                with memoryview(mm) as view:
                    pending = pool.submit(crc_all, view)
                    for lo in range(0, size, CHUNK):
                        digest.update(view[lo : lo + CHUNK])
                    whole = pending.result()
    for (_, _, want, name), got in zip(segments, crcs):
        if name is not None and got != want:
            raise CheckpointError(f"checkpoint {path}: corrupt torch zip: entry {name} fails its CRC check (the file was damaged)")
    return digest.hexdigest(), whole


def _segments(extents: list[tuple[int, int, int, str]], size: int) -> list[tuple[int, int, int, str | None]] | None:
    """The file cut into entry data (with the CRC it should have) and the gaps between (name None), in order.

    None when entries overlap or run past the end: no honest zip does that.
    """
    out: list[tuple[int, int, int, str | None]] = []
    pos = 0
    for a, b, want, name in extents:
        if a < pos or b > size:
            return None
        if a > pos:
            out.append((pos, a, 0, None))
        out.append((a, b, want, name))
        pos = b
    if pos < size or not out:
        out.append((pos, size, 0, None))
    return out


_prescans: dict[tuple[str, int, int], Future] = {}
_prescanner: ThreadPoolExecutor | None = None


def prescan(path: Path) -> None:
    """Start hashing a checkpoint (every shard of a sharded one) on a background thread, e.g. while torch is
    being imported.

    The work is the same as `scan` in `read_checkpoint`, which picks the result up; it just starts sooner.
    A file that cannot even be detected is left for `read_checkpoint` to report.
    """
    global _prescanner
    try:
        files = shards.resolve(path).files
    except (CheckpointError, OSError):
        return
    for file in files:
        try:
            st = file.stat()
            fmt = detect_format(file)
        except (CheckpointError, OSError):
            return
        if fmt == "raw-pickle":
            return
        _prescanner = _prescanner or ThreadPoolExecutor(1, thread_name_prefix="marpipe-prescan")
        _prescans[(str(file.resolve()), st.st_size, st.st_mtime_ns)] = _prescanner.submit(scan, file, fmt)


def _scanned(path: Path, fmt: str) -> tuple[os.stat_result, str, int]:
    """(stat, sha256, CRC32) of one file: the prescan's result when there is one."""
    st = path.stat()
    pending = _prescans.pop((str(path.resolve()), st.st_size, st.st_mtime_ns), None)
    digest, crc = pending.result() if pending else scan(path, fmt)
    remember(path, st, digest)  # the build key reuses this hash instead of reading the file again
    return st, digest, crc


def read_checkpoint(path: Path, expected_sha256: str | None = None) -> RawCheckpoint:
    """Detect, hash and safely load a checkpoint file, folder or sharded checkpoint; return its tensors,
    unwrapped from nesting."""
    layout = shards.resolve(path)
    if layout.index is not None:
        return _read_sharded(layout, expected_sha256)
    path = layout.files[0]
    fmt = _readable_format(path)
    st, digest, crc = _scanned(path, fmt)
    _check_pin(path, digest, expected_sha256)
    extras: list[str] = []
    obj = _load_safetensors(path) if fmt == "safetensors" else load_torch(path, extras, mmap=fmt == "torch-zip")
    sd, nested = _unwrap(path, obj)
    return RawCheckpoint(path, fmt, digest, sd, nested, ignored_extras=extras, stat=(st.st_size, st.st_mtime_ns), crc32=crc)


def _read_sharded(layout: shards.Layout, expected_sha256: str | None) -> RawCheckpoint:
    """Every shard detected, hashed (CRCs checked) and loaded mmap'd like a single file, then merged by the index."""
    assert layout.index is not None
    index = layout.index.read_bytes()
    files = [{"name": layout.index.name, "sha256": hashlib.sha256(index).hexdigest(), "size": len(index)}]
    kinds = {shard: _readable_format(shard) for shard in layout.files}
    for shard, fmt in kinds.items():
        st, digest, _ = _scanned(shard, fmt)
        files.append({"name": shard.name, "sha256": digest, "size": st.st_size})
    digest = shards.digest(files)
    _check_pin(layout.path, digest, expected_sha256)
    if len(set(kinds.values())) > 1:
        raise CheckpointError(f"checkpoint {layout.index}: its shards mix formats ({', '.join(sorted(set(kinds.values())))})")
    parts, extras = {}, []
    for shard, fmt in kinds.items():
        obj = _load_safetensors(shard) if fmt == "safetensors" else load_torch(shard, extras, mmap=fmt == "torch-zip")
        parts[shard.name], nested = _unwrap(shard, obj)
        if nested:
            raise CheckpointError(f"checkpoint {shard}: a shard holds its tensors under {nested!r}; shards hold them at the top level")
    state = shards.merge(layout, parts)
    fmt = next(iter(kinds.values()))
    total = sum(f["size"] for f in files)
    return RawCheckpoint(layout.path, fmt, digest, state, ignored_extras=extras, stat=(total, 0), index=layout.index.name, shards=files)


def _readable_format(path: Path) -> str:
    """The format of a file marpipe reads; a raw pickle is refused here, naming what it would call."""
    fmt = detect_format(path)
    if fmt == "raw-pickle":
        raise raw_pickle_error(path)
    return fmt


def _check_pin(path: Path, digest: str, expected: str | None) -> None:
    if expected and digest != expected:
        raise CheckpointError(
            f"checkpoint {path}: sha256 is {digest}, the spec pins {expected} (checkpoint.sha256); the file changed or the pin is stale"
        )


def _load_safetensors(path: Path) -> dict[str, Any]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            json.loads(f.read(n))
        return load_file(str(path))
    except (SafetensorError, ValueError, OSError, UnicodeDecodeError, struct.error) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CheckpointError(f"checkpoint {path}: corrupt safetensors file ({first[:160]})") from None


def _is_tensor_dict(obj: Any) -> bool:
    import torch

    return isinstance(obj, dict) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def _unwrap(path: Path, obj: Any) -> tuple[dict[str, Any], str | None]:
    """Find the state dict: the object itself, or nested under state_dict/model (Lightning, trainers)."""
    if isinstance(obj, Stub):
        raise pickled_model(path, obj._name)
    nested: list[str] = []
    for _ in range(3):
        if _is_tensor_dict(obj):
            return dict(obj), ".".join(nested) or None
        if not isinstance(obj, dict):
            break
        key = next((k for k in NESTED_KEYS if isinstance(obj.get(k), dict)), None)
        if key is None:
            pickled = next((k for k in NESTED_KEYS if isinstance(obj.get(k), Stub)), None)
            if pickled:
                raise pickled_model(path, obj[pickled]._name, under=pickled)
            break
        nested.append(key)
        obj = obj[key]
    if isinstance(obj, dict) and obj:
        import torch

        bad = sorted(str(k) for k, v in obj.items() if not isinstance(v, torch.Tensor))
        if len(bad) < len(obj):  # some tensors, some other things: not a state_dict as saved by torch
            raise CheckpointError(
                f"checkpoint {path}: {len(bad)} entries are not tensors ({', '.join(bad[:3])}); "
                "save model.state_dict(), or nest it under 'state_dict'"
            )
        keys = ", ".join(sorted(str(k) for k in obj)[:5])
        raise CheckpointError(
            f"checkpoint {path}: no state_dict found (top-level keys: {keys}); nest the weights under 'state_dict' or 'model'"
        )
    raise CheckpointError(f"checkpoint {path}: holds a {type(obj).__name__}, not a state_dict (a dict of tensors)")


def normalise_keys(raw: RawCheckpoint, strip_prefix: tuple[str, ...], key_map: tuple[KeyRename, ...]) -> None:
    """Strip DataParallel/DDP and torch.compile prefixes and the spec's own, then apply key_map; in place."""
    sd = raw.state_dict
    changed = True
    while changed:
        changed = False
        for prefix in ALWAYS_STRIP:
            # Only when every key has it: a model may well have a child called `module`.
            if sd and all(k.startswith(prefix) for k in sd):
                sd = {k[len(prefix) :]: v for k, v in sd.items()}
                raw.stripped.append(prefix)
                changed = True
    for prefix in strip_prefix:
        if any(k.startswith(prefix) for k in sd):
            sd = {(k[len(prefix) :] if k.startswith(prefix) else k): v for k, v in sd.items()}
            raw.stripped.append(prefix)
    for rename in key_map:
        out = {}
        for k, v in sd.items():
            if rename.regex:
                new = re.sub(rename.pattern, rename.to, k)
            else:
                new = rename.to + k[len(rename.pattern) :] if k.startswith(rename.pattern) else k
            raw.renamed += new != k
            if new in out:
                raise CheckpointError(f"checkpoint {raw.path}: checkpoint.key_map maps two keys onto {new!r}")
            out[new] = v
        sd = out
    raw.state_dict = sd


def detected_prefixes(keys: list[str]) -> list[str]:
    """Prefixes that every key shares and that marpipe strips (module., _orig_mod.) or that look like wrappers."""
    found = []
    for prefix in ALWAYS_STRIP + ("model.", "net.", "backbone."):
        if keys and all(k.startswith(prefix) for k in keys):
            found.append(prefix)
    return found
