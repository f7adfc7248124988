"""A server's workdir and ports belong to one run: what an earlier run left never counts as this run's.

`marpipe serve` reuses its workdir (`.marpipe-serve`). TorchServe appends to the logs there, so a worker that died
in an earlier run (its `Backend worker process died` and error lines in `model_log.log`) would read as a load
failure of this run; and a TorchServe still running there (its `marpipe serve` killed with SIGKILL, or still
stopping) holds the ports and its key file. So a start first waits for such a server to go, or refuses naming its
pid, then moves the earlier logs aside (`logs.previous/`) and starts with an empty `logs/`.
"""

from __future__ import annotations

import os
import shutil
import socket
import time
from pathlib import Path

from pipeline.errors import PackageError

WAIT = 10.0  # seconds a server still stopping on the workdir or ports is given before the start is refused


def claim(workdir: Path, host: str, ports: list[int], wait: float = WAIT) -> None:
    """Wait until no process of an earlier TorchServe uses `workdir` and every port in `ports` is free, for at
    most `wait` seconds; then start this run's logs afresh. Raises PackageError naming what is still there."""
    deadline = time.monotonic() + wait
    while True:
        users = workdir_users(workdir)
        busy = [p for p in ports if not _free(host, p)]
        if not users and not busy:
            break
        if time.monotonic() >= deadline:
            if users:
                pid, cmd = users[0]
                raise PackageError(
                    f"workdir {workdir} is in use by a TorchServe still running (pid {pid}: {cmd[:120]}); "
                    f"stop it (kill {pid}) or pass another --workdir"
                )
            holders = {p: port_holder(host, p) for p in busy}
            named = ", ".join(f"{p} (pid {h})" if h else str(p) for p, h in holders.items())
            raise PackageError(f"port {named} on {host} in use; stop what holds it or pass another --port")
        time.sleep(0.2)
    logs = workdir / "logs"
    if logs.exists() and any(logs.iterdir()):
        previous = workdir / "logs.previous"
        shutil.rmtree(previous, ignore_errors=True)
        os.replace(logs, previous)
    logs.mkdir(parents=True, exist_ok=True)


def workdir_users(workdir: Path) -> list[tuple[int, str]]:
    """(pid, command line) of the processes of a TorchServe run from `workdir`: its launcher and JVM (config and
    temp folder there) and its workers (sockets there); [] where there is no /proc."""
    workdir = workdir.resolve()
    marks = (str(workdir / "config.properties"), str(workdir / "tmp"))
    found = []
    for pid, args in _processes():
        if pid != os.getpid() and any(a == marks[0] or marks[1] in a for a in args):
            found.append((pid, " ".join(args)))
    return sorted(found)


def port_holder(host: str, port: int) -> int | None:
    """The pid listening on `port` (from /proc/net/tcp*: the socket's inode, then whose fd it is), if it can be seen."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            if len(f) > 9 and f[3] == "0A" and int(f[1].rsplit(":", 1)[1], 16) == port:  # 0A: LISTEN
                inodes.add(f"socket:[{f[9]}]")
    for pid, _ in _processes():
        try:
            fds = list(Path(f"/proc/{pid}/fd").iterdir())
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(fd) in inodes:
                    return pid
            except OSError:
                continue
    return None


def _processes() -> list[tuple[int, list[str]]]:
    out = []
    proc = Path("/proc")
    if not proc.is_dir():
        return out
    for entry in proc.iterdir():
        if entry.name.isdigit():
            try:
                args = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:  # ended meanwhile
                continue
            out.append((int(entry.name), [a.decode(errors="replace") for a in args if a]))
    return out


def _free(host: str, port: int) -> bool:
    s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as TorchServe (Netty) binds: closed connections do not count
    try:
        s.bind((host, port))
        return True
    except OSError:
        return False
    finally:
        s.close()
