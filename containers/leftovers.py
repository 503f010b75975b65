"""List what a test or the library left behind on an SSH test host.

`find_leftovers(host)` returns the processes, listening TCP ports and
temporary paths that are not part of the host itself (tini, sshd and its
sessions, the port listeners of `occupy_port`), so that tests can assert that
cleanup left a clean host.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from containers.hosts import DockerHost

SSH_PORT = 22
DEFAULT_TEMP_DIRS = ("/tmp", "/var/tmp")  # noqa: S108 - paths inside the container

_PS_COMMAND = ["ps", "-eo", "pid=,ppid=,user=,args="]


@dataclass(frozen=True)
class ProcessInfo:
    """One process of a host as `ps` shows it."""

    pid: int
    ppid: int
    user: str
    args: str


@dataclass(frozen=True)
class Leftovers:
    """Processes, listening ports and temporary paths on a host that the harness did not start."""

    alias: str
    processes: tuple[ProcessInfo, ...]
    listening_ports: tuple[int, ...]
    temp_paths: tuple[str, ...]

    @property
    def is_clean(self) -> bool:
        return not (self.processes or self.listening_ports or self.temp_paths)

    def __str__(self) -> str:
        if self.is_clean:
            return f"host {self.alias}: clean"
        lines = [f"host {self.alias}: leftovers"]
        lines += [f"  process {p.pid} ({p.user}): {p.args}" for p in self.processes]
        lines += [f"  listening port {port}" for port in self.listening_ports]
        lines += [f"  temp path {path}" for path in self.temp_paths]
        return "\n".join(lines)


def list_processes(host: DockerHost) -> list[ProcessInfo]:
    """Return every process of the host except the `ps` that lists them."""
    result = host.exec(_PS_COMMAND)
    result.check()
    processes = []
    for line in result.stdout.splitlines():
        pid, ppid, user, args = line.split(None, 3)
        if args == " ".join(_PS_COMMAND):
            continue
        processes.append(ProcessInfo(int(pid), int(ppid), user, args))
    return processes


def _is_harness_process(process: ProcessInfo, blocker_pids: set[int]) -> bool:
    # PID 1 is tini; sshd shows as "/usr/sbin/sshd -D -e" (listener) or
    # "sshd: USER [priv]" / "sshd: USER@notty" (one pair per connection).
    return (
        process.pid == 1
        or process.args.startswith("/usr/sbin/sshd")
        or process.args.startswith("sshd:")
        or process.pid in blocker_pids
    )


def list_listening_ports(host: DockerHost) -> list[int]:
    """Return the TCP ports with a listening socket on the host (any address, IPv4 or IPv6)."""
    result = host.exec(["ss", "-H", "-l", "-t", "-n"])
    result.check()
    ports = set()
    for line in result.stdout.splitlines():
        local_address = line.split()[3]
        ports.add(int(local_address.rpartition(":")[2]))
    return sorted(ports)


def list_temp_paths(host: DockerHost, pattern: str = "*", directories: Sequence[str] = DEFAULT_TEMP_DIRS) -> list[str]:
    """Return the entries directly inside `directories` whose name matches glob `pattern`."""
    result = host.exec(["find", *directories, "-mindepth", "1", "-maxdepth", "1", "-name", pattern])
    result.check()
    return sorted(result.stdout.split("\n")[:-1])


def remove_leftovers(host: DockerHost, temp_pattern: str = "*") -> Leftovers:
    """Kill the leftover processes (SIGKILL, by pid) and delete the leftover temp paths; return what was found."""
    leftovers = find_leftovers(host, temp_pattern=temp_pattern)
    for process in leftovers.processes:
        # A child may already be gone with its parent.
        if host.process_alive(process.pid):
            host.exec(["kill", "-s", "KILL", str(process.pid)])
    if leftovers.temp_paths:
        host.exec(["rm", "-rf", "--", *leftovers.temp_paths]).check()
    return leftovers


def find_leftovers(
    host: DockerHost,
    temp_pattern: str = "*",
    temp_dirs: Sequence[str] = DEFAULT_TEMP_DIRS,
) -> Leftovers:
    """Return what runs, listens or lies in the temp directories of `host` beyond the harness itself."""
    blockers = host.occupied_ports()
    blocker_pids = {blocker.pid for blocker in blockers}
    blocker_ports = {blocker.port for blocker in blockers}

    processes = [p for p in list_processes(host) if not _is_harness_process(p, blocker_pids)]
    ports = [p for p in list_listening_ports(host) if p != SSH_PORT and p not in blocker_ports]
    return Leftovers(
        alias=host.alias,
        processes=tuple(processes),
        listening_ports=tuple(ports),
        temp_paths=tuple(list_temp_paths(host, temp_pattern, temp_dirs)),
    )
