"""`Scenario` on the session's Docker SSH hosts from containers/.

Taken ports are real listeners: in a container through `occupy_port`, on the
manager a socket of this test process bound to 127.0.0.1. Worker delays use
the containers' slow-start wrapper. The scheduler runs on the manager with
`sys.executable`, so a scheduler delay points `sys.executable` at a small
wrapper script that sleeps and then runs the real interpreter.
"""

from __future__ import annotations

import os
import shlex
import socket
import stat
import sys
import tempfile
from collections.abc import Iterable
from typing import Any

from scenario import MANAGER, PORT_UNIVERSE, Bed, Leftovers, Scenario, Where, World

from containers.leftovers import list_listening_ports
from lazycluster.clock import SYSTEM_CLOCK, Clock
from lazycluster.group import RuntimeGroup
from lazycluster.transport import set_backend
from lazycluster.transport.local import LocalTransport

WORKER_PATTERN = "python3 -m distributed.cli.dask_worker *"

# A Dask worker also serves HTTP (metrics, health) on a port that the kernel
# picks from the ephemeral range, which starts here on Linux. Its comm port,
# the one the library chooses, is below that in every property.
EPHEMERAL_PORTS_START = 32768
TEMP_PATTERN = "lazycluster-*"


class DockerWorld(World):
    backend = "docker"

    # Measured with 3 hosts on a 2-core machine at load average 10: the
    # scheduler listened after 2.6-3.1 s and three workers registered after
    # 3.9-4.4 s. The allowance is about twice the slower of the two.
    # NOTE: an estimate for that machine; slower machines need a larger value.
    start_allowance = 10.0
    # Beyond the timeout, a failed start still makes real round trips: the
    # port checks, one process start over SSH and the cleanup. Cleanup sends
    # SIGTERM and waits up to STOP_GRACE (3 s) before SIGKILL, and took
    # 1.5-3.8 s in the measurement above.
    timeout_margin = 10.0

    def __init__(self, bed: DockerBed, scenario: Scenario) -> None:
        if scenario.hosts > len(bed.ssh_hosts.hosts):
            raise ValueError(
                f"The Docker bed has {len(bed.ssh_hosts.hosts)} hosts, the scenario needs {scenario.hosts}."
            )
        self.bed = bed
        self.scenario = scenario
        self.docker_hosts = list(bed.ssh_hosts.hosts)[: scenario.hosts]
        self.hosts = [host.alias for host in self.docker_hosts]
        self._sockets: dict[int, socket.socket] = {}
        self._real_executable = sys.executable
        self._previous = set_backend(bed.backend)
        try:
            for where, port in scenario.taken:
                self.take_port(where, port)
            for where, program, seconds in scenario.delays:
                self.set_delay(where, program, seconds)
            self.group = RuntimeGroup(hosts=self.hosts)
        except BaseException:
            self._reset()
            raise

    @property
    def clock(self) -> Clock:
        return SYSTEM_CLOCK

    def _docker_host(self, where: Where) -> Any:
        return self.docker_hosts[int(where)]

    def take_port(self, where: Where, port: int) -> None:
        if where != MANAGER:
            self._docker_host(where).occupy_port(port)
            return
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            listener.bind(("127.0.0.1", port))
            listener.listen(8)
        except BaseException:
            listener.close()
            raise
        self._sockets[port] = listener

    def release_ports(self) -> None:
        for host in self.bed.ssh_hosts.hosts:
            host.release_ports()
        sockets, self._sockets = self._sockets, {}
        for listener in sockets.values():
            listener.close()

    def set_delay(self, where: Where, program: str, seconds: float) -> None:
        if where != MANAGER:
            self._docker_host(where).set_slow_start(WORKER_PATTERN, seconds)
            return
        # The launcher reads sys.executable when it builds the scheduler's argv.
        sys.executable = self.bed.slow_python(seconds, self._real_executable)

    def _worker_listeners(self, where: Where) -> dict[int, int]:
        """Return {port: pid} of the sockets on which Dask worker processes listen."""
        host = self._docker_host(where)
        processes = host.exec(["ps", "-eo", "pid=,args="]).check().stdout.splitlines()
        worker_pids = {
            int(line.split(None, 1)[0])
            for line in processes
            if line.split()[2:4] == ["-m", "distributed.cli.dask_worker"]
        }
        found: dict[int, int] = {}
        # Inside the container, `ss -p` shows the process of a socket only to its owner.
        for line in (
            host.exec(["ss", "-H", "-l", "-t", "-n", "-p"], user=host.user)
            .check()
            .stdout.splitlines()
        ):
            port = int(line.split()[3].rpartition(":")[2])
            if port >= EPHEMERAL_PORTS_START:
                continue
            for pid in worker_pids:
                if f"pid={pid}," in line:
                    found[port] = pid
        return found

    def worker_ports(self, where: Where) -> set[int]:
        return set(self._worker_listeners(where))

    def listening(self, where: Where, ports: Iterable[int]) -> set[int]:
        wanted = set(ports)
        if where == MANAGER:
            return LocalTransport().ports_in_use(sorted(wanted))
        return wanted.intersection(list_listening_ports(self._docker_host(where)))

    def kill_worker(self, where: Where, port: int) -> None:
        pid = self._worker_listeners(where).get(port)
        if pid is None:
            raise LookupError(f"No live worker listens on port {port} of {self.host(where)}.")
        self._docker_host(where).kill_process(pid, "KILL")

    def leftovers(self) -> Leftovers:
        found = Leftovers()
        for host in self.bed.ssh_hosts.hosts:
            left = host.leftovers(temp_pattern=TEMP_PATTERN)
            found.running += [f"{host.alias}: process {p.pid}: {p.args}" for p in left.processes]
            found.running += [
                f"{host.alias}: port {port} listening" for port in left.listening_ports
            ]
            found.temp_dirs += [f"{host.alias}: {path}" for path in left.temp_paths]

        # NOTE: only the property ports are checked on the manager; the dashboard
        # range is shared with other tests that may run at the same time.
        manager_ports = LocalTransport().ports_in_use(PORT_UNIVERSE) - set(self._sockets)
        found.running += [f"manager: port {port} listening" for port in sorted(manager_ports)]
        local = self.bed.backend.local()
        found.running += [
            f"manager: process {p.pid} still running: {p.command}"
            for p in local.processes
            if p.poll() is None
        ]
        found.running += [f"manager: tunnel {t!r} open" for t in local.tunnels]
        return found

    def _reset(self) -> None:
        sys.executable = self._real_executable
        try:
            self.release_ports()
            for host in self.bed.ssh_hosts.hosts:
                host.clear_slow_start()
        finally:
            set_backend(self._previous)

    def close(self) -> None:
        try:
            self.group.cleanup()
        finally:
            self._reset()


class DockerBed(Bed):
    """The session's Docker hosts and one SSHBackend for all worlds."""

    name = "docker"
    start_allowance = DockerWorld.start_allowance

    def __init__(self, ssh_hosts: Any) -> None:
        from lazycluster.transport.ssh import SSHBackend

        self.ssh_hosts = ssh_hosts
        self.max_hosts = len(ssh_hosts.hosts)
        self.backend = SSHBackend(ssh_config_path=ssh_hosts.ssh_config_path)
        self._scripts = tempfile.mkdtemp(prefix="h7-slow-python-")

    def slow_python(self, seconds: float, real: str) -> str:
        """Return a script that sleeps `seconds`, then runs the interpreter `real` with its arguments."""
        path = os.path.join(self._scripts, f"python-after-{seconds:g}s")
        with open(path, "w") as script:
            script.write(f'#!/bin/sh\nsleep {seconds:g}\nexec {shlex.quote(real)} "$@"\n')
        os.chmod(path, stat.S_IRWXU)
        return path

    def open(self, scenario: Scenario) -> World:
        return DockerWorld(self, scenario)

    def close(self) -> None:
        close = getattr(self.backend, "close", None)
        if callable(close):
            close()
