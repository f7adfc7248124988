"""Pickles, read without running them: torch's weights-only loader with inert stand-ins, and raw pickles named.

A torch checkpoint is a zip (or, from torch < 1.6, a pickled magic number followed by pickles). Any other
pickle is refused; which globals it would call is read with `pickletools`, so the message can name them and
nothing in the file is ever executed (torch is not even asked: it would warn on stderr first).
"""

from __future__ import annotations

import io
import pickletools
import re
import warnings
from pathlib import Path
from typing import Any

from pipeline.errors import CheckpointError

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # torch.serialization.MAGIC_NUMBER: the first pickle of a legacy torch file
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


def load_torch(path: Path, extras: list[str], mmap: bool) -> Any:
    """torch.load(weights_only=True), with every non-torch global replaced by an inert stub; CheckpointError otherwise."""
    import torch

    with warnings.catch_warnings():
        # torch warns on stderr about pickle protocols it may not read; the error below says it in one line
        warnings.filterwarnings("ignore", message="Detected pickle protocol")
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
            raise CheckpointError(f"checkpoint {path}: {_explain_torch_error(exc)}{_legacy_hint(path)}") from None


def _legacy_hint(path: Path) -> str:
    """Why a legacy torch file may not load: torch's weights-only reader knows pickle protocol 2 only."""
    with open(path, "rb") as f:
        head = f.read(64)
    if is_legacy_torch(head) and head[1] != 2:
        return f" (a legacy, pre-zip torch file pickled with protocol {head[1]}: re-save it with torch.save, which writes a zip)"
    return ""


def _unsafe_globals(path: Path) -> list[str]:
    import torch

    try:
        return sorted(set(torch.serialization.get_unsafe_globals_in_checkpoint(str(path))))
    except Exception:  # an unreadable pickle: torch.load below gives the precise reason
        return []


def _refuse_unsafe(path: Path, names: list[str]) -> None:
    dangerous = [n for n in names if _dangerous(n)]
    if dangerous:
        raise CheckpointError(
            f"checkpoint {path}: refused: the pickle calls {', '.join(dangerous[:3])}, which a state_dict never needs "
            "(the file may be malicious); nothing from it was run"
        )
    modules = [n for n in names if n.startswith("torch.nn.") or n.startswith("__main__.")]
    if modules:
        raise pickled_model(path, modules[0])


def pickled_model(path: Path, cls: str, under: str | None = None) -> CheckpointError:
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
    return type(name, (Stub,), {"_name": name})


class Stub:
    """Stands in for any non-tensor global of a checkpoint (numpy scalars, argparse.Namespace...)."""

    _name = "?"

    def __new__(cls, *args: Any, **kwargs: Any) -> Stub:
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


def is_legacy_torch(head: bytes) -> bool:
    """True when the file starts with torch's legacy format: a pickle of its magic number alone."""
    try:
        ops = [(op.name, arg) for op, arg, _ in pickletools.genops(io.BytesIO(head))]
    except Exception:  # cut off or not a pickle
        return False
    values = [arg for name, arg in ops if name not in ("PROTO", "FRAME", "STOP")]
    return bool(ops) and ops[-1][0] == "STOP" and values == [LEGACY_MAGIC]


_STRINGS = {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "SHORT_BINSTRING", "BINSTRING", "STRING"}
_PUTS = {"PUT", "BINPUT", "LONG_BINPUT"}
_GETS = {"GET", "BINGET", "LONG_BINGET"}


def pickle_globals(path: Path) -> list[str]:
    """The globals (module.name) a pickle would look up, read with pickletools: nothing is run."""
    found: list[str] = []
    pushed: list[Any] = []  # recent pushes, strings kept: STACK_GLOBAL takes its module and name from them
    memo: dict[Any, Any] = {}
    with open(path, "rb") as f:
        try:
            for op, arg, _ in pickletools.genops(f):
                name = op.name
                if name == "GLOBAL" or name == "INST":
                    found.append(".".join(str(arg).split(" ", 1)))
                elif name == "STACK_GLOBAL":
                    module, attr = pushed[-2:] if len(pushed) >= 2 else [None, None]
                    found.append(f"{module}.{attr}" if isinstance(module, str) and isinstance(attr, str) else "?")
                elif name in _STRINGS:
                    pushed.append(arg)
                elif name == "MEMOIZE":
                    memo[len(memo)] = pushed[-1] if pushed else None
                elif name in _PUTS:
                    memo[arg] = pushed[-1] if pushed else None
                elif name in _GETS:
                    pushed.append(memo.get(arg))
                elif op.stack_after:  # any other push: not a string
                    pushed.append(None)
                del pushed[:-8]
        except Exception:  # a damaged pickle: what was read so far is still worth naming
            pass
    return list(dict.fromkeys(found))


def raw_pickle_error(path: Path) -> CheckpointError:
    """Why a raw pickle is refused, naming the globals it would call (the dangerous ones first)."""
    names = pickle_globals(path)
    dangerous = [n for n in names if _dangerous(n)]
    ordered = dangerous + [n for n in names if n not in dangerous]
    if ordered:
        more = f" and {len(ordered) - 4} more" if len(ordered) > 4 else ""
        calls = f"loading it would call {', '.join(ordered[:4])}{more}"
    else:
        calls = "it calls no globals"
    danger = " (the file may be malicious)" if dangerous else ""
    return CheckpointError(
        f"checkpoint {path}: refused: a raw pickle, not a torch zip; {calls}{danger}; nothing from it was run; "
        "save the weights with torch.save(model.state_dict(), path) or safetensors"
    )


def _dangerous(name: str) -> bool:
    return name.split(".")[0] in DANGEROUS_MODULES or name in DANGEROUS_BUILTINS
