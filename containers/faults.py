"""Fault injection on one SSH test host, mixed into `containers.hosts.DockerHost`.

Every fault acts through the Docker engine (docker exec as root, pause, stop,
kill), never through the SSH connection under test. Helper programs run with
/usr/bin/python3 directly, so the slow-start wrapper never delays them.
"""

from __future__ import annotations

import io
import logging
import re
import tarfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from containers.hosts import ExecResult

log = logging.getLogger(__name__)

REAL_PYTHON = "/usr/bin/python3"
SLOW_START_RULES = "/etc/lazycluster-test/slow-start"
PROCESS_EXIT_TIMEOUT = 10.0

# Binds ADDRESS:PORT and forks. The parent prints the child's pid and exits, so
# docker exec returns only once the port is taken. The child accepts and closes
# connections until it is killed.
_LISTENER = """
import os, socket, sys
address, port = sys.argv[1], int(sys.argv[2])
family = socket.AF_INET6 if ":" in address else socket.AF_INET
server = socket.socket(family, socket.SOCK_STREAM)
server.bind((address, port))
server.listen(64)
pid = os.fork()
if pid:
    print(pid, flush=True)
    os._exit(0)
os.setsid()
null = os.open(os.devnull, os.O_RDWR)
for descriptor in (0, 1, 2):
    os.dup2(null, descriptor)
while True:
    connection, _ = server.accept()
    connection.close()
"""

_SIGNAL_NAME = re.compile(r"^(SIG)?[A-Z0-9]+$")


@dataclass
class PortBlocker:
    """A listener that occupies `port` on `address` inside a host, until `stop()`."""

    host: HostFaults
    port: int
    address: str
    pid: int
    stopped: bool = field(default=False)

    def stop(self) -> None:
        """Kill the listener and wait until its process is gone (idempotent)."""
        if self.stopped:
            return
        self.host.kill_process(self.pid, "KILL")
        self.stopped = True
        self.host._forget_blocker(self)


class HostFaults:
    """Fault injection methods; the class using it provides `alias`, `container` and `exec`."""

    alias: str
    container: Any
    _blockers: list[PortBlocker]
    # Faults set through this object and not undone yet, kept in memory so
    # that checking for them costs no Docker call.
    _paused: bool
    _slow_start_set: bool

    def exec(self, argv: Sequence[str], user: str = "root") -> ExecResult:
        raise NotImplementedError

    # Ports.

    def occupy_port(self, port: int, address: str = "0.0.0.0") -> PortBlocker:  # noqa: S104
        """Start a real TCP listener on `address:port` inside the host and return its handle."""
        if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
            raise ValueError(f"Invalid port {port!r}: expected an int from 1 to 65535.")

        result = self.exec([REAL_PYTHON, "-c", _LISTENER, address, str(port)])
        if result.exit_code != 0:
            raise OSError(
                f"Could not occupy port {port} on {address} in host {self.alias}: {result.output.strip()}"
            )
        blocker = PortBlocker(self, port, address, int(result.stdout.strip()))
        self._blockers.append(blocker)
        log.info("host %s: port %s:%d occupied by pid %d", self.alias, address, port, blocker.pid)
        return blocker

    def occupied_ports(self) -> list[PortBlocker]:
        """Return the listeners started by `occupy_port` that are not stopped yet."""
        return list(self._blockers)

    def release_ports(self) -> None:
        """Stop every listener started by `occupy_port`."""
        for blocker in list(self._blockers):
            blocker.stop()

    def _forget_blocker(self, blocker: PortBlocker) -> None:
        if blocker in self._blockers:
            self._blockers.remove(blocker)

    # Processes.

    def kill_process(self, pid: int, signal: str = "KILL") -> None:
        """Send `signal` (name such as "KILL" or "TERM") to `pid`; for KILL, wait until it is gone."""
        if isinstance(pid, bool) or not isinstance(pid, int) or pid <= 1:
            raise ValueError(f"Invalid pid {pid!r}: expected an int greater than 1.")
        if not _SIGNAL_NAME.match(signal):
            raise ValueError(f"Invalid signal name {signal!r}: expected a name such as 'KILL' or 'TERM'.")

        result = self.exec(["kill", "-s", signal.removeprefix("SIG"), str(pid)])
        if result.exit_code != 0:
            raise ProcessLookupError(
                f"Could not send SIG{signal.removeprefix('SIG')} to pid {pid} on host {self.alias}: "
                f"{result.output.strip()}"
            )
        log.info("host %s: sent SIG%s to pid %d", self.alias, signal.removeprefix("SIG"), pid)
        if signal.removeprefix("SIG") == "KILL":
            self._wait_process_gone(pid)

    def _wait_process_gone(self, pid: int) -> None:
        deadline = time.monotonic() + PROCESS_EXIT_TIMEOUT
        while self.process_alive(pid):
            if time.monotonic() > deadline:
                raise TimeoutError(f"pid {pid} on host {self.alias} still runs {PROCESS_EXIT_TIMEOUT} s after SIGKILL")
            time.sleep(0.05)

    def process_alive(self, pid: int) -> bool:
        """Return whether `pid` exists on the host and is not a zombie."""
        result = self.exec(["ps", "-o", "stat=", "-p", str(pid)])
        state = result.stdout.strip()
        return result.exit_code == 0 and bool(state) and not state.startswith("Z")

    # The whole container.

    def pause(self) -> None:
        """Freeze every process of the host (docker pause); SSH connections hang until `unpause`."""
        self.container.pause()
        self._paused = True
        log.info("host %s: paused", self.alias)

    def unpause(self) -> None:
        """Resume a host frozen by `pause`."""
        self.container.unpause()
        self._paused = False
        log.info("host %s: unpaused", self.alias)

    def stop(self, timeout: int = 5) -> None:
        """Stop the container (SIGTERM, then SIGKILL after `timeout` seconds)."""
        self.container.stop(timeout=timeout)
        log.info("host %s: stopped", self.alias)

    def kill(self, signal: str = "SIGKILL") -> None:
        """Kill the container's main process with `signal`, as a crash would."""
        self.container.kill(signal=signal)
        log.info("host %s: killed with %s", self.alias, signal)

    def status(self) -> str:
        """Return the Docker state of the container: running, paused, exited, ..."""
        self.container.reload()
        return str(self.container.status)

    # Slow start.

    def set_slow_start(self, pattern: str, delay: float) -> None:
        """Make wrapped programs (python3, dask) whose command line matches glob `pattern` start `delay` s late.

        The command line is matched as "<name> <args...>", for example
        "python3 -m distributed.cli.dask_worker tcp://...". The rule replaces any earlier one.
        """
        if not pattern or "\n" in pattern:
            raise ValueError(f"Invalid slow-start pattern {pattern!r}: expected one non-empty line.")
        if isinstance(delay, bool) or not isinstance(delay, (int, float)) or not 0 <= delay <= 3600:
            raise ValueError(f"Invalid slow-start delay {delay!r}: expected seconds from 0 to 3600.")
        self._write_root_file(SLOW_START_RULES, f"{delay:g} {pattern}\n")
        self._slow_start_set = True
        log.info("host %s: slow start of %r by %g s", self.alias, pattern, delay)

    def clear_slow_start(self) -> None:
        """Remove every slow-start rule."""
        result = self.exec(["rm", "-f", SLOW_START_RULES])
        if result.exit_code != 0:
            raise OSError(f"Could not remove {SLOW_START_RULES} on host {self.alias}: {result.output}")
        self._slow_start_set = False
        log.info("host %s: slow start cleared", self.alias)

    def undo_faults(self) -> list[str]:
        """Undo the faults set through this object that are still active; return their names.

        Covers port listeners, slow start and pause. A stopped or killed host
        cannot be brought back with the same port, so it is left as it is.
        """
        undone = []
        # Unpause first, because docker exec fails in a paused container.
        if self._paused:
            self.unpause()
            undone.append("pause")
        if self._blockers:
            self.release_ports()
            undone.append("occupied ports")
        if self._slow_start_set:
            self.clear_slow_start()
            undone.append("slow start")
        return undone

    def _write_root_file(self, path: str, text: str) -> None:
        # put_archive copies bytes without a shell, so no quoting is involved.
        directory, _, name = path.rpartition("/")
        data = text.encode()
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w") as archive:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644
            archive.addfile(info, io.BytesIO(data))
        if not self.container.put_archive(directory, buffer.getvalue()):
            raise OSError(f"Could not write {path} on host {self.alias}")
