"""Reading checkpoints safely: format detection by content, sha256, weights-only loading, normalisation.

Nothing here ever unpickles code: torch files go through ``torch.load(weights_only=True)`` (passed
explicitly, so ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` cannot turn it off), safetensors through its own
parser. Every failure is a `CheckpointError` with one line naming the file and the problem.
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

from pipeline import crc
from pipeline.errors import CheckpointError
from pipeline.spec import KeyRename

ALWAYS_STRIP = ("module.", "_orig_mod.")
NESTED_KEYS = ("state_dict", "model_state_dict", "model", "module")
# Globals that only ever appear in a pickle to run code. Seeing one means the file is hostile. (Every other
# unknown global is replaced by an inert stub anyway; this is about saying so plainly.)
DANGEROUS_MODULES = (
    "os",
    "posix",
    "nt",
    "subprocess",
    "sys",
    "shutil",
    "socket",
    "importlib",
    "runpy",
    "pty",
    "code",
    "webbrowser",
    "ctypes",
    "pickle",
    "marshal",
    "types",
    "multiprocessing",
    "asyncio",
    "signal",
    "platform",
)
DANGEROUS_BUILTINS = {
    f"{m}.{n}"
    for m in ("builtins", "__builtin__")
    for n in (
        "eval",
        "exec",
        "compile",
        "open",
        "__import__",
        "getattr",
        "setattr",
        "delattr",
        "globals",
        "locals",
        "vars",
        "input",
        "breakpoint",
        "exit",
        "quit",
        "help",
        "apply",
        "execfile",
        "file",
    )
}
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
    stat: tuple[int, int] = (0, 0)  # (size, mtime_ns) when it was hashed
    crc32: int = 0

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
        return "torch-legacy"
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
    """Start hashing a checkpoint on a background thread, e.g. while torch is being imported.

    The work is the same as `scan` in `read_checkpoint`, which picks the result up; it just starts sooner.
    A file that cannot even be detected is left for `read_checkpoint` to report.
    """
    global _prescanner
    try:
        st = path.stat()
        fmt = detect_format(path)
    except (CheckpointError, OSError):
        return
    _prescanner = _prescanner or ThreadPoolExecutor(1, thread_name_prefix="marpipe-prescan")
    _prescans[(str(path.resolve()), st.st_size, st.st_mtime_ns)] = _prescanner.submit(scan, path, fmt)


def read_checkpoint(path: Path, expected_sha256: str | None = None) -> RawCheckpoint:
    """Detect, hash and safely load a checkpoint; return its tensors, unwrapped from nesting."""
    fmt = detect_format(path)
    st = path.stat()
    pending = _prescans.pop((str(path.resolve()), st.st_size, st.st_mtime_ns), None)
    digest, crc = pending.result() if pending else scan(path, fmt)
    if expected_sha256 and digest != expected_sha256:
        raise CheckpointError(
            f"checkpoint {path}: sha256 is {digest}, the spec pins {expected_sha256} (checkpoint.sha256); "
            "the file changed or the pin is stale"
        )
    extras: list[str] = []
    obj = _load_safetensors(path) if fmt == "safetensors" else _load_torch(path, extras, mmap=fmt == "torch-zip")
    sd, nested = _unwrap(path, obj)
    return RawCheckpoint(path, fmt, digest, sd, nested, ignored_extras=extras, stat=(st.st_size, st.st_mtime_ns), crc32=crc)


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


def _load_torch(path: Path, extras: list[str], mmap: bool) -> Any:
    import torch

    unsafe = _unsafe_globals(path)
    if unsafe:
        _refuse_unsafe(path, unsafe)
    try:
        if unsafe:
            # Every global outside torch's allowlist becomes an inert stub: nothing in the file is called.
            stubs = [(_stand_in(name), name) for name in unsafe]
            extras.extend(unsafe)
            with torch.serialization.safe_globals(stubs):
                return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as exc:  # torch raises many kinds here; all mean "this file is not loadable"
        raise CheckpointError(f"checkpoint {path}: {_explain_torch_error(exc)}") from None


def _unsafe_globals(path: Path) -> list[str]:
    import torch

    try:
        return sorted(set(torch.serialization.get_unsafe_globals_in_checkpoint(str(path))))
    except Exception:  # an unreadable pickle: torch.load below gives the precise reason
        return []


def _refuse_unsafe(path: Path, names: list[str]) -> None:
    dangerous = [n for n in names if n.split(".")[0] in DANGEROUS_MODULES or n in DANGEROUS_BUILTINS]
    if dangerous:
        raise CheckpointError(
            f"checkpoint {path}: refused: the pickle calls {', '.join(dangerous[:3])}, which a state_dict never needs "
            "(the file may be malicious); nothing from it was run"
        )
    modules = [n for n in names if n.startswith("torch.nn.") or n.startswith("__main__.")]
    if modules:
        raise _pickled_model(path, modules[0])


def _pickled_model(path: Path, cls: str, under: str | None = None) -> CheckpointError:
    where = f"'{under}' holds a pickled model" if under else "this is a pickled model"
    return CheckpointError(
        f"checkpoint {path}: {where} ({cls}), not a state_dict; save model.state_dict() instead (torch.save(model.state_dict(), path))"
    )


def _plain_dict(*args: Any, **kwargs: Any) -> dict:
    return {}


def _stand_in(name: str) -> Any:
    """An inert replacement for a global: dict subclasses become a plain dict (the unpickler then fills it,
    and only fills exact dicts), anything else a `_Stub` class named after it."""
    if name == "collections.defaultdict":
        return _plain_dict
    return type(name, (_Stub,), {"_name": name})


class _Stub:
    """Stands in for any non-tensor global of a checkpoint (numpy scalars, argparse.Namespace...)."""

    _name = "?"

    def __new__(cls, *args: Any, **kwargs: Any) -> _Stub:
        return object.__new__(cls)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass

    def __repr__(self) -> str:
        return f"<ignored {self._name}>"


def _explain_torch_error(exc: Exception) -> str:
    text = " ".join(str(exc).split())
    low = text.lower()
    if "central directory" in low or "failed reading zip" in low or "unexpected eof" in low or isinstance(exc, EOFError):
        return "truncated or corrupt checkpoint (could not read the torch zip)"
    if "invalid magic number" in low or "invalid load key" in low or "could not find" in low:
        return "not a torch checkpoint, or corrupt (the pickle inside is unreadable)"
    if "torch_force" in low:
        return "cannot load: set only one of TORCH_FORCE_WEIGHTS_ONLY_LOAD or TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"
    m = re.search(r"GLOBAL ([\w.]+)", text)
    if m:
        return f"refused: the pickle needs {m.group(1)}, which a weights-only load does not allow; save a plain state_dict"
    # Drop torch's advice to disable weights_only: wrong for a file we do not trust.
    first = re.split(r"(?i)\s*(?:\(1\)|in pytorch 2\.6|if you trust|weights_only=false)", text)[0]
    return f"cannot load safely: {first[:200]}"


def _is_tensor_dict(obj: Any) -> bool:
    import torch

    return isinstance(obj, dict) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def _unwrap(path: Path, obj: Any) -> tuple[dict[str, Any], str | None]:
    """Find the state dict: the object itself, or nested under state_dict/model (Lightning, trainers)."""
    if isinstance(obj, _Stub):
        raise _pickled_model(path, obj._name)
    nested: list[str] = []
    for _ in range(3):
        if _is_tensor_dict(obj):
            return dict(obj), ".".join(nested) or None
        if not isinstance(obj, dict):
            break
        key = next((k for k in NESTED_KEYS if isinstance(obj.get(k), dict)), None)
        if key is None:
            pickled = next((k for k in NESTED_KEYS if isinstance(obj.get(k), _Stub)), None)
            if pickled:
                raise _pickled_model(path, obj[pickled]._name, under=pickled)
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
