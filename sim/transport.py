"""`SimTransport`: the transport seam implemented on a simulated host.

It keeps the contract of `lazycluster.transport.base.Transport` and raises the
exceptions the real transports raise, so library code takes its real error
paths in simulation too.
"""

from __future__ import annotations

import logging
import os
import posixpath
import stat
from collections.abc import Callable, Iterable, Mapping, Sequence
from functools import partial
from operator import itemgetter
from typing import TYPE_CHECKING

from lazycluster.exceptions import (
    CommandTimeoutError,
    ConnectionLostError,
    PortInUseError,
    TransportError,
)
from lazycluster.transport.base import (
    DEFAULT_STOP_GRACE,
    Command,
    CommandResult,
    ProcessHandle,
    Transport,
    Tunnel,
    command_to_shell,
    validate_port,
)
from lazycluster.transport.forwarding import NoOpTunnel
from lazycluster.transport.shell import validate_env
from sim.clock import VirtualClock
from sim.commands import CommandProgram, CommandRunner, CommandTimedOut
from sim.handles import SimProcessHandle, SimTunnel
from sim.host import TMP_DIR
from sim.process import SIGKILL, SIGTERM, SimProcess

if TYPE_CHECKING:
    from sim.host import SimHost
    from sim.network import Network

logger = logging.getLogger(__name__)

# Prefix of the temporary directories the library and this transport create;
# `Network.assert_clean` reports any that remain.
TEMP_PREFIX = "lazycluster"


class SimTransport(Transport):
    """One connection from the manager to a simulated host (or the manager's own machine)."""

    def __init__(self, network: Network, sim_host: SimHost, is_local: bool = False) -> None:
        self.network = network
        self.sim_host = sim_host
        self.host = sim_host.name
        self.clock: VirtualClock = network.clock
        self.is_local = is_local
        self._boot = sim_host.boot_count
        self._closed = False
        self._connected = True
        # Remote forwards whose connection dropped, requested again on reconnect.
        self._suspended: set[SimTunnel] = set()
        self._processes: list[SimProcessHandle] = []
        self._tunnels: list[SimTunnel] = []
        self._log_dir: str | None = None

    # -- connection state -------------------------------------------------

    def _enter(self, operation: str) -> None:
        """Check the connection before an operation and apply connection faults.

        Like `SSHTransport`, a dropped connection makes the operation that was
        running fail with ConnectionLostError, and the next operation reconnects
        once. `ports_in_use` is safe to repeat, so a drop during it is retried.
        """
        if self._closed:
            raise TransportError(self.host, f"The transport of host {self.host!r} is closed; connect again.")
        if not operation.startswith("forward_"):
            self.network.resume_gc()
        if self.is_local:
            return

        host = self.sim_host
        if self._connected and host.unreachable:
            self._disconnect("host unreachable")
        elif self._connected and host.boot_count != self._boot:
            self._disconnect("host restarted")
        if not self._connected:
            self._reconnect()

        if self.network.faults.take_drop(self.host, operation):
            self._disconnect(f"connection dropped during {operation}")
            if operation == "ports_in_use":
                self._reconnect()
                return
            raise ConnectionLostError(
                self.host,
                f"Connection to host {self.host!r} was lost during {operation}. The next "
                "call reconnects; check that the host is up.",
            )

    def _disconnect(self, reason: str) -> None:
        """Lose the connection. sshd frees the remote forwards, which wait for a reconnect;
        local forwards keep listening on the manager and processes keep running."""
        self._connected = False
        self.network.record(self.host, "connection.lost", reason)
        logger.info("Simulated connection to host %s lost: %s", self.host, reason)
        for tunnel in self._tunnels:
            if tunnel.kind == "remote" and tunnel.is_open:
                tunnel.suspend()

    def _reconnect(self) -> None:
        """Connect again and request the suspended remote forwards; raise when the host fails."""
        host = self.sim_host
        problem = ""
        if host.unreachable:
            problem = "it is unreachable"
        elif host.auth_fails:
            problem = "authentication failed"
        if problem:
            raise ConnectionLostError(
                self.host,
                f"Connection to host {self.host!r} dropped and reconnecting failed: {problem}. "
                "Check that the host is up.",
            )
        self._connected = True
        self._boot = host.boot_count
        self.network.record(self.host, "connection.restored", f"{len(self._suspended)} remote forwards")
        for tunnel in list(self._suspended):
            if not tunnel.resume():
                logger.warning(
                    "Failed to restore forwarding of port %d on host %s: port in use",
                    tunnel.listen_port,
                    self.host,
                )

    # -- commands -----------------------------------------------------------

    def _argv(self, command: Command) -> list[str]:
        if isinstance(command, str):
            return ["sh", "-c", command]
        if not command:
            raise ValueError("Invalid command []: expected a non-empty argv list or shell string.")
        return [str(part) for part in command]

    def _environment(self, env: Mapping[str, str] | None) -> dict[str, str]:
        return {**self.sim_host.env, **validate_env(env)}

    def _working_dir(self, cwd: str | None) -> str:
        return self.sim_host.fs.resolve(cwd) if cwd else self.sim_host.home

    def run(
        self,
        command: Command,
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        timeout: float | None = None,
        on_output: Callable[[str], None] | None = None,
        stdin: bytes | None = None,
    ) -> CommandResult:
        self._enter("run")
        environment = self._environment(env)
        text = command_to_shell(command)
        argv = self._argv(command)
        working_dir = self._working_dir(cwd)
        self.network.record(self.host, "run", text[:120])
        if not self.sim_host.fs.is_dir(working_dir):
            return CommandResult(self.host, text, 2, "", f"sh: 1: cd: can't cd to {cwd}\n")

        deadline = None if timeout is None else self.clock.monotonic() + timeout
        runner = CommandRunner(
            self.network, self.sim_host, environment, working_dir, stdin or b"", deadline
        )
        try:
            code = runner.run_argv(argv)
        except CommandTimedOut as error:
            raise CommandTimeoutError(self.host, f"Command {text!r}", timeout or 0) from error

        stdout, stderr = "".join(runner.stdout), "".join(runner.stderr)
        if on_output is not None:
            for line in (stdout + stderr).splitlines():
                on_output(line)
        return CommandResult(self.host, text, code, stdout, stderr)

    def start_process(
        self,
        command: Command,
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        log_path: str | None = None,
    ) -> ProcessHandle:
        self._enter("start_process")
        environment = self._environment(env)
        argv = self._argv(command)
        fs = self.sim_host.fs
        if log_path is None:
            log_path = posixpath.join(self._ensure_log_dir(), f"process-{len(self._processes)}.log")
        program = self.network.match_program(argv) or CommandProgram()
        process = SimProcess(
            self.network,
            self.sim_host,
            self.network.next_pid(),
            argv,
            command_to_shell(command),
            environment,
            self._working_dir(cwd),
            fs.resolve(log_path),
            program,
        )
        handle = SimProcessHandle(self, process)
        self._processes.append(handle)
        process.launch()
        logger.debug("Started simulated process %s on %s: %s", process.pid, self.host, handle.command)
        return handle

    def _ensure_log_dir(self) -> str:
        if self._log_dir is None or not self.sim_host.fs.is_dir(self._log_dir):
            self._log_dir = self.sim_host.fs.make_temp_directory(
                self.network.random, TMP_DIR, f"{TEMP_PREFIX}-logs-"
            )
        return self._log_dir

    def _stop_process(self, process: SimProcess, grace: float) -> int | None:
        if not process.alive:
            return process.exit_code
        process.signal(SIGTERM)
        if process.alive and grace > 0:
            self.clock.wait_until(lambda: not process.alive, grace)
        if process.alive:
            process.signal(SIGKILL)
        return process.exit_code

    # -- files --------------------------------------------------------------

    def put(self, local_path: str, remote_path: str) -> None:
        self._enter("put")
        fs = self.sim_host.fs
        target = fs.resolve(remote_path)
        if os.path.isdir(local_path):
            fs.make_directory(target, parents=True)
            for root, directories, files in os.walk(local_path):
                relative = os.path.relpath(root, local_path)
                base = target if relative == "." else posixpath.join(target, relative)
                for name in directories:
                    fs.make_directory(posixpath.join(base, name), parents=True)
                for name in files:
                    self._put_file(os.path.join(root, name), posixpath.join(base, name))
        else:
            fs.make_directory(posixpath.dirname(target), parents=True)
            self._put_file(local_path, target)
        self.network.record(self.host, "put", target)

    def _put_file(self, local_file: str, target: str) -> None:
        with open(local_file, "rb") as stream:
            data = stream.read()
        self.sim_host.fs.write(target, data, mode=stat.S_IMODE(os.stat(local_file).st_mode))

    def get(self, remote_path: str, local_path: str) -> None:
        self._enter("get")
        fs = self.sim_host.fs
        source = fs.resolve(remote_path)
        if not fs.exists(source):
            raise FileNotFoundError(f"No file or directory {source!r} on host {self.host!r}.")
        if fs.is_dir(source):
            os.makedirs(local_path, exist_ok=True)
            for path in fs.under(source):
                local = os.path.join(local_path, posixpath.relpath(path, source))
                if fs.is_dir(path):
                    os.makedirs(local, exist_ok=True)
                else:
                    self._get_file(path, local)
        else:
            self._get_file(source, local_path)
        self.network.record(self.host, "get", source)

    def _get_file(self, source: str, local_file: str) -> None:
        fs = self.sim_host.fs
        data, mode = fs.read(source), fs.mode(source)
        os.makedirs(os.path.dirname(os.path.abspath(local_file)), exist_ok=True)
        with open(local_file, "wb") as stream:
            stream.write(data)
        os.chmod(local_file, mode)

    # -- ports and tunnels --------------------------------------------------

    def ports_in_use(self, ports: Iterable[int]) -> set[int]:
        self._enter("ports_in_use")
        port_list = list(ports)
        if port_list and not _all_ports(port_list):
            port_list = [validate_port(port) for port in port_list]
        table = self.sim_host.ports
        used = {port for port in port_list if port in table}
        self.network.faults.after_port_check(self.sim_host, port_list, used)
        return used

    def forward_local(self, pairs: Sequence[tuple[int, int]]) -> list[Tunnel]:
        self._enter("forward_local")
        return self._forward("local", self.network.manager, pairs)

    def forward_remote(self, pairs: Sequence[tuple[int, int]]) -> list[Tunnel]:
        self._enter("forward_remote")
        return self._forward("remote", self.sim_host, pairs)

    def _forward(self, kind: str, listen_host: SimHost, pairs: Sequence[tuple[int, int]]) -> list[Tunnel]:
        """Bind every listen port of the batch, or none of them when one is taken."""
        if not pairs:
            return []
        listen_ports = list(map(itemgetter(0), pairs))
        target_ports = list(map(itemgetter(1), pairs))
        if self.is_local:
            self._check_listen_ports(listen_host, pairs)
            return self._forward_on_manager(kind, pairs)

        # Whole-batch checks run in C; the item-by-item check only explains a failure.
        listen_set = set(listen_ports)
        valid = _all_ports(listen_ports) and _all_ports(target_ports)
        if not valid or len(listen_set) != len(listen_ports) or not listen_host.ports.keys().isdisjoint(listen_set):
            self._check_listen_ports(listen_host, pairs)

        self.network.pause_gc()
        tunnels = list(map(partial(SimTunnel, self, kind), listen_ports, target_ports))
        listen_host.ports.update(zip(listen_ports, tunnels, strict=True))
        self._tunnels.extend(tunnels)
        self.network.record(self.host, f"forward_{kind}", f"{len(tunnels)} tunnels")
        return list(tunnels)

    def _check_listen_ports(self, listen_host: SimHost, pairs: Sequence[tuple[int, int]]) -> None:
        """Raise for the first invalid or taken listen port of `pairs`, in batch order."""
        seen: set[int] = set()
        for listen_port, target_port in pairs:
            validate_port(listen_port, "listen port")
            validate_port(target_port, "target port")
            if self.is_local and listen_port == target_port:
                continue
            remote = listen_host is not self.network.manager
            if listen_port in seen and remote:
                # SSHTransport checks a batch of remote forwards before requesting any.
                raise ValueError(f"Invalid remote forwards {list(pairs)}: a host port appears twice.")
            if listen_port in listen_host.ports or listen_port in seen:
                where = f"host {listen_host.name!r}" if remote else "the manager"
                raise PortInUseError(listen_port, where=where)
            seen.add(listen_port)

    def _forward_on_manager(self, kind: str, pairs: Sequence[tuple[int, int]]) -> list[Tunnel]:
        # Like LocalTransport: a port forwarded to itself needs no listener.
        tunnels: list[Tunnel] = []
        for listen, target in pairs:
            if listen == target:
                tunnels.append(NoOpTunnel(self.host, kind, listen))
            else:
                tunnel = SimTunnel(self, kind, listen, target)
                self.sim_host.ports[listen] = tunnel
                self._tunnels.append(tunnel)
                tunnels.append(tunnel)
        self.network.record(self.host, f"forward_{kind}", f"{len(tunnels)} tunnels")
        return tunnels

    # -- bookkeeping ----------------------------------------------------------

    @property
    def processes(self) -> list[ProcessHandle]:
        return list(self._processes)

    @property
    def tunnels(self) -> list[Tunnel]:
        self._tunnels = [tunnel for tunnel in self._tunnels if tunnel.is_open]
        return list(self._tunnels)

    def close(self) -> None:
        self.network.resume_gc()
        if self._closed:
            return

        if self._responds():
            for handle in self._processes:
                if handle.process.alive and handle.process.host.boot_count == self._boot:
                    self._stop_process(handle.process, DEFAULT_STOP_GRACE)
            if self._log_dir is not None and self.sim_host.fs.is_dir(self._log_dir):
                self.sim_host.fs.remove(self._log_dir, recursive=True)
        else:
            alive = sum(1 for handle in self._processes if handle.process.alive)
            if alive or self._log_dir is not None:
                logger.warning(
                    "Host %s does not respond, so %d process(es) and the log directory %s stay there",
                    self.host,
                    alive,
                    self._log_dir or "(none)",
                )
        for tunnel in self._tunnels:
            tunnel.close()
        self._tunnels = []
        self._closed = True
        self.network.record(self.host, "connection.close", "")
        self.network.forget(self)

    def _responds(self) -> bool:
        """Return whether the host can be reached for cleanup, reconnecting if needed."""
        try:
            self._enter("run")
        except ConnectionLostError:
            return False
        return True


def _all_ports(values: list[int]) -> bool:
    """Tell quickly whether every value is a valid port (an int, not a bool, from 1 to 65535)."""
    return set(map(type, values)) == {int} and min(values) >= 1 and max(values) <= 65535
