"""The transport seam: everything the library does to one machine.

A `Transport` is the only way the rest of lazycluster touches a host. There are
three implementations: `SSHTransport` (paramiko, one connection per host),
`LocalTransport` (the manager's own machine) and the simulator's.

Contract shared by every implementation:

- Every method blocks until its work is done or fails. Methods are safe to call
  from several threads at once on the same transport.
- Failures raise `lazycluster.exceptions` types with the host in the message:
  `TransportError` subclasses for connection problems, `CommandTimeoutError`
  for timeouts, `OSError` for a local file that is missing or unreadable. A
  non-zero exit code is not an error of `run`; call `CommandResult.check()`.
- A port is "in use" on a host when a TCP socket on that host is bound to it
  (listening or connected) on any local address, IPv4 or IPv6.
- Tunnels bind to loopback only. `forward_local` listens on the manager,
  `forward_remote` on the host; closing a tunnel frees its listening port.
- The transport remembers every process and tunnel it started; `close()`
  stops all of them and then closes the connection. Calling it twice is
  harmless.
- Waits and timeouts use `transport.clock`, never `time` directly.
"""

from __future__ import annotations

import shlex
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from lazycluster.clock import Clock
from lazycluster.exceptions import CommandError

# A command is either an argv list, quoted safely by the transport, or a shell
# string that the caller has quoted itself.
Command = str | Sequence[str]

# Grace period between SIGTERM and SIGKILL when stopping a process.
DEFAULT_STOP_GRACE = 5.0

MIN_PORT = 1
MAX_PORT = 65535


def command_to_shell(command: Command) -> str:
    """Render a command as one shell string, quoting every argv element."""
    if isinstance(command, str):
        return command
    return shlex.join([str(part) for part in command])


def validate_port(port: object, name: str = "port") -> int:
    """Return `port` as an int, or raise ValueError/TypeError naming the bad value."""
    if isinstance(port, bool) or not isinstance(port, int):
        raise TypeError(f"Invalid {name} {port!r}: expected an int from {MIN_PORT} to {MAX_PORT}.")
    if not MIN_PORT <= port <= MAX_PORT:
        raise ValueError(f"Invalid {name} {port}: expected a value from {MIN_PORT} to {MAX_PORT}.")
    return port


@dataclass(frozen=True)
class CommandResult:
    """Outcome of one command run on a host."""

    host: str
    command: str
    exit_code: int
    stdout: str
    stderr: str

    @property
    def ok(self) -> bool:
        return self.exit_code == 0

    def check(self, hint: str = "") -> CommandResult:
        """Return self, or raise `CommandError` when the exit code is not 0."""
        if self.exit_code != 0:
            raise CommandError(self, hint)
        return self


class ProcessHandle(ABC):
    """A background process started through a transport.

    The process runs detached from the connection in its own process group,
    with stdout and stderr appended to `log_path` on its host.
    """

    host: str
    pid: int
    command: str
    log_path: str

    @abstractmethod
    def poll(self) -> int | None:
        """Return the exit code, or None while the process runs."""

    @abstractmethod
    def wait(self, timeout: float | None = None) -> int:
        """Wait for the exit code; raise `CommandTimeoutError` after `timeout` seconds."""

    @abstractmethod
    def stop(self, grace: float = DEFAULT_STOP_GRACE) -> int | None:
        """Send SIGTERM to the process group, then SIGKILL after `grace` seconds.

        Returns the exit code when known. Stopping an exited process does nothing.
        """

    @abstractmethod
    def read_log(self, max_lines: int | None = None) -> str:
        """Return the process's log, or its last `max_lines` lines."""

    @property
    def is_alive(self) -> bool:
        return self.poll() is None

    def __repr__(self) -> str:
        return f"<{type(self).__name__} host={self.host!r} pid={self.pid} {self.command!r}>"


class Tunnel(ABC):
    """One forwarded port, bound to loopback.

    `kind` is "local" (the manager listens on `listen_port` and connects to
    `target_port` on the host) or "remote" (the host listens on `listen_port`
    and connects to `target_port` on the manager).
    """

    host: str
    kind: str
    listen_port: int
    target_port: int

    @abstractmethod
    def close(self) -> None:
        """Stop listening and close every stream of this tunnel. Idempotent."""

    @property
    @abstractmethod
    def is_open(self) -> bool:
        """Whether the tunnel still listens."""

    def __repr__(self) -> str:
        arrow = "manager->host" if self.kind == "local" else "host->manager"
        return (
            f"<{type(self).__name__} {self.host!r} {arrow} "
            f"{self.listen_port}->{self.target_port}>"
        )


class Transport(ABC):
    """Everything the library does to one host, over one connection."""

    host: str
    clock: Clock

    # True for the manager's own machine, where no tunnel is needed.
    is_local: bool = False

    @abstractmethod
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
        """Run a command to completion and return its result.

        `on_output` is called with each line of stdout and stderr as it
        arrives. `stdin` is written to the command's standard input, which is
        then closed. Raises `CommandTimeoutError` after `timeout` seconds, after
        killing the command.
        """

    @abstractmethod
    def start_process(
        self,
        command: Command,
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        log_path: str | None = None,
    ) -> ProcessHandle:
        """Start a background process that outlives the call; see `ProcessHandle`.

        Without `log_path` the transport picks a file in a temporary directory
        of the host.
        """

    @abstractmethod
    def put(self, local_path: str, remote_path: str) -> None:
        """Copy a file or folder from the manager to the host, creating parents, keeping modes."""

    @abstractmethod
    def get(self, remote_path: str, local_path: str) -> None:
        """Copy a file or folder from the host to the manager, creating parents, keeping modes."""

    @abstractmethod
    def ports_in_use(self, ports: Iterable[int]) -> set[int]:
        """Return the subset of `ports` in use on the host, in one round trip."""

    @abstractmethod
    def forward_local(self, pairs: Sequence[tuple[int, int]]) -> list[Tunnel]:
        """Open local forwards: for each (manager_port, host_port), the manager
        listens on 127.0.0.1:manager_port and connects to localhost:host_port on
        the host. All pairs are set up in one batch.
        """

    @abstractmethod
    def forward_remote(self, pairs: Sequence[tuple[int, int]]) -> list[Tunnel]:
        """Open remote forwards: for each (host_port, manager_port), the host
        listens on 127.0.0.1:host_port and connects to localhost:manager_port on
        the manager. All pairs are set up in one batch.
        """

    @property
    @abstractmethod
    def processes(self) -> list[ProcessHandle]:
        """Every process this transport started, running or not."""

    @property
    @abstractmethod
    def tunnels(self) -> list[Tunnel]:
        """Every tunnel this transport opened that is still open."""

    @abstractmethod
    def close(self) -> None:
        """Stop every process and tunnel this transport started, then disconnect."""

    def login_command(self) -> str:
        """Return the shell command a user would type to log in to this host, for hints."""
        return f"ssh {shlex.quote(self.host)}"

    def __enter__(self) -> Transport:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} host={self.host!r}>"


class Backend(ABC):
    """Makes transports: the real SSH world, or a simulator.

    The library requests every transport it needs from the active backend (see
    `lazycluster.transport.get_backend`), so swapping the backend swaps every host.
    """

    clock: Clock

    @abstractmethod
    def connect(self, host: str, connection_kwargs: Mapping[str, object] | None = None) -> Transport:
        """Open a transport to `host`, an SSH config alias or a hostname."""

    @abstractmethod
    def local(self) -> Transport:
        """Return the transport of the manager's own machine (shared, not closed by callers)."""

    @abstractmethod
    def configured_hosts(self) -> list[str]:
        """Return the host aliases of the SSH config, without wildcard patterns."""
