"""An aoti archive's package (`model.pt2`, AOTInductor's native code): checked against this server, then loaded.

The package runs only where it was compiled for: the machine's architecture, every CPU feature its code may use,
the torch it links (same release), and on a GPU the same compute capability and CUDA version. marpipe.json's
`platform` records them at build; a server that differs is refused at load with one line naming both (the model
fails to load with that line in TorchServe's model log), never run into a crash or wrong answers.
"""

from __future__ import annotations

import platform
from typing import Any


class PlatformMismatchError(RuntimeError):
    """The aoti package was compiled for another machine, torch or GPU than this server's."""


def cpu_flags() -> set[str] | None:
    """This CPU's feature flags as /proc/cpuinfo names them (None where there is no /proc/cpuinfo)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        return None
    return set()


def isa_name(flags: set[str]) -> str:
    """The vector ISA inductor would choose on a CPU with these flags (its own names)."""
    if {"avx512f", "avx512bw", "avx512dq", "avx512vl"} <= flags:
        name = "avx512"
        if "avx512_vnni" in flags:
            name += " avx512_vnni"
            if "amx_tile" in flags:
                name += " amx_tile"
        return name
    if {"avx2", "fma"} <= flags:
        return "avx2"
    return "sve" if "sve" in flags else "neon" if "asimd" in flags else "none"


def here(device: str, gpu_id: int | None) -> dict[str, Any]:
    """This server as a platform record: machine, CPU flags, torch, and for a GPU its capability and CUDA."""
    import torch

    flags = cpu_flags()
    found: dict[str, Any] = {"machine": platform.machine(), "torch": torch.__version__, "flags": flags}
    found["isa"] = isa_name(flags) if flags is not None else "unknown"
    if device.startswith("cuda") and torch.cuda.is_available():
        index = gpu_id or 0
        found["cuda"] = torch.version.cuda
        found["capability"] = "{}.{}".format(*torch.cuda.get_device_capability(index))
    return found


def mismatch(record: dict[str, Any], server: dict[str, Any]) -> str | None:
    """Why a package compiled for `record` cannot run on `server` (see `here`), or None."""
    why = []
    if record.get("machine") != server["machine"]:
        why.append(f"machine {record.get('machine')} vs {server['machine']}")
    if str(record.get("torch", "")).split("+")[0] != server["torch"].split("+")[0]:
        why.append(f"torch {record.get('torch')} vs {server['torch']}")
    missing = sorted(set(record.get("cpu_features") or ()) - server["flags"]) if server["flags"] is not None else []
    if missing:
        why.append(f"this CPU lacks {', '.join(missing)}")
    if record.get("device") == "cuda":
        if "capability" not in server:
            why.append("no GPU here")
        else:
            if record.get("capability") != server["capability"]:
                why.append(f"compute capability {record.get('capability')} vs {server['capability']}")
            if record.get("cuda") != server["cuda"]:
                why.append(f"CUDA {record.get('cuda')} vs {server['cuda']}")
    return "; ".join(why) or None


def describe(record: dict[str, Any]) -> str:
    """A platform record in a few words: `x86_64 avx512 avx512_vnni, torch 2.13.0+cpu, cpu` (or `cuda sm 9.0 ...`)."""
    where = f"cuda sm {record.get('capability')} (CUDA {record.get('cuda')})" if record.get("device") == "cuda" else "cpu"
    return f"{record.get('machine')} {record.get('isa')}, torch {record.get('torch')}, {where}"


def check(meta: dict, device: str, gpu_id: int | None) -> None:
    """Raise PlatformMismatchError, one line naming both sides, where this server cannot run the package."""
    record = meta.get("platform") or {}
    server = here(device, gpu_id)
    why = mismatch(record, server)
    if why:
        side = dict(server, device="cuda" if "capability" in server else "cpu")
        raise PlatformMismatchError(
            f"{meta.get('name', 'this archive')}: its aoti package was compiled for {describe(record)}; this server is "
            f"{describe(side)} ({why}): rebuild it on a machine like this one, or serve another format"
        )


def run_device(meta: dict, device: str) -> str:
    """Where the package runs: on the GPU it was compiled for, a CPU package on the CPU (also on a GPU server)."""
    return device if (meta.get("platform") or {}).get("device") == "cuda" else "cpu"


class Package:
    """The loaded package, called like the exported module (by keyword or by position); returns its flat outputs in
    the exported order (the archive's output names), never rebuilding the model's own output classes (a
    transformers ModelOutput), which the server need not have."""

    def __init__(self, path: str, device: str) -> None:
        import warnings

        import torch
        import torch.utils._pytree as pytree
        from torch._inductor import aoti_load_package
        from torch.export._tree_utils import reorder_kwargs

        self.device = device
        self._flatten, self._reorder = pytree.tree_flatten, reorder_kwargs  # bound once: __call__ runs per batch
        index = torch.device(device).index if device.startswith("cuda") else None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch's own pytree deprecations, on every load
            self.model = aoti_load_package(path, device_index=-1 if index is None else index)
            self.in_spec = pytree.treespec_loads(self.model.loader.get_call_spec()[0])

    def __call__(self, *args: Any, **kwargs: Any) -> list[Any]:
        flat = self._flatten((args, self._reorder(kwargs, self.in_spec) if kwargs else kwargs))[0]
        return list(self.model.loader.boxed_run(flat))


def load(path: str, meta: dict, device: str, gpu_id: int | None) -> Package:
    """The package at `path`, after `check`."""
    check(meta, device, gpu_id)
    return Package(path, run_device(meta, device))
