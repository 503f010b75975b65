"""The SSH transport: one persistent paramiko connection per host.

Commands run on exec channels, files move over SFTP and tunnels are
`direct-tcpip` and `forwarded-tcpip` channels, all on the same connection.
When the connection has dropped, the next operation reconnects once before it
sends anything. An operation that fails midway raises `ConnectionLostError`.
The exception is `ports_in_use`: it is safe to repeat, so it is retried once.
"""

from __future__ import annotations

import errno
import functools
import itertools
import logging
import os
import secrets
import shlex
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TypeVar

import paramiko

from lazycluster.clock import SYSTEM_CLOCK, Clock
from lazycluster.exceptions import (
    CommandTimeoutError,
    ConnectionLostError,
    TransportError,
)
from lazycluster.transport.base import (
    Backend,
    Command,
    CommandResult,
    ProcessHandle,
    Transport,
    Tunnel,
    command_to_shell,
)
from lazycluster.transport.channel_relay import relay_stream
from lazycluster.transport.forwarding import (
    ListeningTunnel,
    StreamEnd,
    validate_host_port,
    validate_pairs,
)
from lazycluster.transport.local import LocalTransport
from lazycluster.transport.shell import build_script, validate_env
from lazycluster.transport.ssh_config import (
    DEFAULT_CONFIG_PATH,
    SSHConfigFile,
    default_config_path,
)
from lazycluster.transport.ssh_connect import Connection, Connector
from lazycluster.transport.ssh_exec import (
    CHANNEL_OPEN_TIMEOUT,
    ChannelLost,
    ChannelNotOpened,
    execute,
    kill_group,
)
from lazycluster.transport.ssh_files import get_path, put_path
from lazycluster.transport.ssh_process import SSHProcess, start_script
from lazycluster.transport.ssh_remote_forwards import RemoteForwards

logger = logging.getLogger(__name__)

T = TypeVar("T")

LOOPBACK = "127.0.0.1"

# Connections opened at once per backend; sshd's default MaxStartups starts
# dropping unauthenticated connections beyond 10.
MAX_PARALLEL_CONNECTS = 8

# Flow-control window and packet size of tunnel channels: larger than
# paramiko's defaults (2 MiB, 32 KiB), so one stream is not limited by round trips.
TUNNEL_WINDOW_SIZE = 16 * 1024 * 1024
TUNNEL_MAX_PACKET_SIZE = 256 * 1024

# Exec and SFTP channels open at once per connection. sshd's MaxSessions
# (default 10) rejects more, so further callers wait for a free one.
MAX_PARALLEL_SESSIONS = 8

# Seconds after which a command that the transport runs for itself (process
# control, port tables, cleanup) fails, so a hung host delays close() by a
# bounded time instead of blocking it.
CONTROL_TIMEOUT = 60.0

# Seconds close() waits for the host to run a command before it cleans up
# there; an unresponsive host is left as it is.
CLOSE_PROBE_TIMEOUT = 10.0

# TCP states in /proc/net/tcp that hold a port: all but TIME_WAIT (06), whose
# port a server with SO_REUSEADDR can bind again.
_TIME_WAIT = "06"

_NETWORK_ERRORS = (paramiko.SSHException, EOFError, OSError)


def parse_socket_table(text: str) -> set[int]:
    """Return the local ports of the sockets in /proc/net/tcp or /proc/net/tcp6 text."""
    ports = set()
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 4 or ":" not in fields[1] or fields[0] == "sl":
            continue
        if fields[3] == _TIME_WAIT:
            continue
        try:
            ports.add(int(fields[1].rsplit(":", 1)[1], 16))
        except ValueError:
            continue
    return ports


class SSHTransport(Transport):
    """Everything lazycluster does to one SSH host, over one paramiko connection."""

    def __init__(
        self,
        host: str,
        connector: Connector,
        connection_kwargs: Mapping[str, object] | None = None,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self.host = host
        self.clock = clock
        self._connector = connector
        self._connection_kwargs = dict(connection_kwargs or {})
        self._lock = threading.RLock()
        self._sessions = threading.BoundedSemaphore(MAX_PARALLEL_SESSIONS)
        self._processes: list[SSHProcess] = []
        self._local_tunnels: list[ListeningTunnel] = []
        self._remote_forwards = RemoteForwards(
            host, self._transport, self._current_transport, self.ports_in_use, self._lost
        )
        self._process_numbers = itertools.count()
        self._state_dir = f"/tmp/lazycluster-{secrets.token_hex(8)}"  # noqa: S108 - on the host
        self._closing = False
        self._closed = False
        self._connection: Connection = connector.open(host, self._connection_kwargs)
        self._log_connected()

    def login_command(self) -> str:
        # `ssh ALIAS` alone would read ~/.ssh/config, where the alias may be unknown.
        config_path = self._connector.config.path
        if config_path == os.path.expanduser(DEFAULT_CONFIG_PATH):
            return super().login_command()
        return f"ssh -F {shlex.quote(config_path)} {shlex.quote(self.host)}"

    def _log_connected(self) -> None:
        settings = self._connection.settings
        logger.info("Connected to host %s (%s:%d)", self.host, settings.hostname, settings.port)

    # Connection

    def _transport(self) -> paramiko.Transport:
        """Return the live paramiko transport, reconnecting once if the connection dropped."""
        with self._lock:
            if self._closed:
                raise TransportError(
                    self.host, f"The transport of host {self.host!r} is closed; connect again."
                )
            transport = self._connection.transport
            if transport.is_active():
                return transport
            self._reconnect()
            return self._connection.transport

    def _current_transport(self) -> paramiko.Transport:
        return self._connection.transport

    def _reconnect(self) -> None:
        logger.warning("Connection to host %s dropped, reconnecting", self.host)
        self._connection.close()
        try:
            self._connection = self._connector.open(self.host, self._connection_kwargs)
        except TransportError as error:
            raise ConnectionLostError(
                self.host,
                f"Connection to host {self.host!r} dropped and reconnecting failed: {error}",
                error,
            ) from error
        self._log_connected()
        self._remote_forwards.restore()

    def _lost(self, action: str, error: BaseException) -> ConnectionLostError:
        return ConnectionLostError(
            self.host,
            f"Connection to host {self.host!r} was lost while {action}: "
            f"{str(error).rstrip('.')}. The next "
            "call reconnects; check that the host is up.",
            error,
        )

    # Commands

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
        text = command_to_shell(command)
        script = build_script(command, validate_env(env), cwd)
        logger.debug("Running on host %s: %s", self.host, text)
        return self._execute(text, script, timeout=timeout, on_output=on_output, stdin=stdin)

    def _execute(
        self,
        text: str,
        script: str,
        *,
        timeout: float | None = None,
        on_output: Callable[[str], None] | None = None,
        stdin: bytes | None = None,
        repeatable: bool = False,
    ) -> CommandResult:
        deadline = None if timeout is None else self.clock.monotonic() + timeout
        for attempt in (1, 2):
            transport = self._transport()
            try:
                with self._sessions:
                    outcome = execute(
                        transport,
                        script,
                        host=self.host,
                        stdin=stdin,
                        on_output=on_output,
                        deadline=deadline,
                        clock=self.clock,
                    )
                break
            except ChannelNotOpened as error:
                if deadline is not None and self.clock.monotonic() >= deadline:
                    raise CommandTimeoutError(
                        self.host, f"Command {text!r}", timeout or 0.0, error
                    ) from error
                rejected = isinstance(error.__cause__, paramiko.ChannelException)
                if transport.is_active() and rejected:
                    raise TransportError(
                        self.host,
                        f"Host {self.host!r} rejected a channel for {text!r}: {error}. Check "
                        "sshd's MaxSessions there.",
                        error,
                    ) from error
                if transport.is_active():
                    # sshd did not reply at all, so the host is frozen or cut off.
                    # Closing the connection makes the next calls fail fast or reconnect.
                    logger.warning(
                        "Host %s did not reply to a channel request for %r; closing its connection",
                        self.host,
                        text,
                    )
                    transport.close()
                    raise self._lost(f"running {text!r}", error) from error
                # Nothing reached the host yet, so a new connection may try again.
                if attempt == 2:
                    raise self._lost(f"running {text!r}", error) from error
            except ChannelLost as error:
                if attempt == 2 or not repeatable:
                    raise self._lost(f"running {text!r}", error) from error

        if outcome.timed_out:
            if outcome.pid is not None:
                kill_group(transport, outcome.pid, self.host)
            raise CommandTimeoutError(self.host, f"Command {text!r}", timeout or 0.0)
        return CommandResult(
            self.host,
            text,
            outcome.exit_code,
            outcome.stdout.decode("utf-8", errors="replace"),
            outcome.stderr.decode("utf-8", errors="replace"),
        )

    def _run_script(self, script: str) -> CommandResult:
        return self._execute(script, script, timeout=CONTROL_TIMEOUT)

    def start_process(
        self,
        command: Command,
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        log_path: str | None = None,
    ) -> SSHProcess:
        self._check_open()
        text = command_to_shell(command)
        number = next(self._process_numbers)
        if log_path is None:
            log_path = f"{self._state_dir}/process-{number}.log"
        exit_path = f"{self._state_dir}/process-{number}.exit"

        script = start_script(command, validate_env(env), cwd, log_path, exit_path)
        result = self._execute(f"start {text}", script, timeout=CONTROL_TIMEOUT)
        pid_text = result.stdout.strip().splitlines()[-1:] if result.ok else []
        if not pid_text or not pid_text[0].isdigit():
            result.check(f"Starting a process on host {self.host!r} failed.")
            raise TransportError(
                self.host,
                f"Starting {text!r} on host {self.host!r} printed no pid: {result.stdout!r}",
            )

        process = SSHProcess(
            self.host, int(pid_text[0]), text, log_path, exit_path, self._run_script, self.clock
        )
        with self._lock:
            self._processes.append(process)
        logger.info(
            "Process %d started on host %s: %s (log %s)", process.pid, self.host, text, log_path
        )
        return process

    # Files

    def _with_sftp(self, action: str, function: Callable[[paramiko.SFTPClient], T]) -> T:
        transport = self._transport()
        with self._sessions:
            try:
                sftp = paramiko.SFTPClient.from_transport(transport)
            except _NETWORK_ERRORS as error:
                raise self._lost(action, error) from error
            assert sftp is not None
            return self._call_sftp(action, transport, sftp, function)

    def _call_sftp(
        self,
        action: str,
        transport: paramiko.Transport,
        sftp: paramiko.SFTPClient,
        function: Callable[[paramiko.SFTPClient], T],
    ) -> T:
        try:
            return function(sftp)
        except FileNotFoundError as error:
            raise FileNotFoundError(
                errno.ENOENT, f"No such file or folder on host {self.host!r}", error.filename
            ) from error
        except _NETWORK_ERRORS as error:
            if transport.is_active() and isinstance(error, OSError):
                raise  # a file error on the host, such as a permission denied
            raise self._lost(action, error) from error
        finally:
            try:
                sftp.close()
            except _NETWORK_ERRORS:
                pass  # the connection is gone already

    def put(self, local_path: str, remote_path: str) -> None:
        if not os.path.exists(local_path):
            raise FileNotFoundError(
                errno.ENOENT, "No such file or folder on the manager", local_path
            )
        logger.debug("Copying %s to host %s:%s", local_path, self.host, remote_path)
        self._with_sftp(
            f"copying {local_path!r} to {remote_path!r}",
            lambda sftp: put_path(sftp, local_path, remote_path),
        )

    def get(self, remote_path: str, local_path: str) -> None:
        logger.debug("Copying host %s:%s to %s", self.host, remote_path, local_path)
        self._with_sftp(
            f"copying {remote_path!r} to {local_path!r}",
            lambda sftp: get_path(sftp, remote_path, local_path),
        )

    # Ports

    def ports_in_use(self, ports: Iterable[int]) -> set[int]:
        checked = [validate_host_port(port, self.host) for port in ports]
        if not checked:
            return set()
        script = "cat /proc/net/tcp /proc/net/tcp6 2>/dev/null; true"
        result = self._execute(script, script, repeatable=True)
        if "local_address" not in result.stdout:
            raise TransportError(
                self.host,
                f"Failed to read /proc/net/tcp on host {self.host!r}: lazycluster needs Linux "
                "hosts with /proc mounted.",
            )
        used = parse_socket_table(result.stdout)
        return {port for port in checked if port in used}

    # Tunnels

    def forward_local(self, pairs: Sequence[tuple[int, int]]) -> list[Tunnel]:
        self._check_open()
        checked = validate_pairs(pairs, self.host)
        opened: list[ListeningTunnel] = []
        try:
            for manager_port, host_port in checked:
                opened.append(
                    ListeningTunnel(
                        self.host,
                        "local",
                        manager_port,
                        host_port,
                        functools.partial(self._open_direct, host_port, manager_port),
                        relay_stream,
                    )
                )
        except BaseException:
            for tunnel in opened:
                tunnel.close()
            raise
        with self._lock:
            self._local_tunnels.extend(opened)
        return list(opened)

    def _open_direct(self, host_port: int, manager_port: int) -> StreamEnd:
        transport = self._transport()
        try:
            return transport.open_channel(
                "direct-tcpip",
                ("localhost", host_port),
                (LOOPBACK, manager_port),
                window_size=TUNNEL_WINDOW_SIZE,
                max_packet_size=TUNNEL_MAX_PACKET_SIZE,
                timeout=CHANNEL_OPEN_TIMEOUT,
            )
        except paramiko.ChannelException as error:
            raise TransportError(
                self.host,
                f"Host {self.host!r} failed to connect to its port {host_port} for a tunnel "
                f"from manager port {manager_port}: {error}. Check that a server listens there.",
                error,
            ) from error
        except _NETWORK_ERRORS as error:
            raise self._lost(f"opening a tunnel to port {host_port}", error) from error

    def forward_remote(self, pairs: Sequence[tuple[int, int]]) -> list[Tunnel]:
        self._check_open()
        return list(self._remote_forwards.open(validate_pairs(pairs, self.host)))

    # Bookkeeping

    @property
    def processes(self) -> list[ProcessHandle]:
        with self._lock:
            return list(self._processes)

    @property
    def tunnels(self) -> list[Tunnel]:
        with self._lock:
            self._local_tunnels = [tunnel for tunnel in self._local_tunnels if tunnel.is_open]
            local: list[Tunnel] = list(self._local_tunnels)
        return local + list(self._remote_forwards.tunnels)

    def _check_open(self) -> None:
        if self._closing:
            raise TransportError(
                self.host, f"The transport of host {self.host!r} is closed; connect again."
            )

    def close(self) -> None:
        with self._lock:
            if self._closing:
                return
            self._closing = True
            processes = list(self._processes)

        if self._responds():
            self.clock.map(self._stop_quietly, processes)
            self._remote_forwards.close_all(notify=True)
            try:
                self._run_script(f"rm -rf -- {shlex.quote(self._state_dir)}")
            except (TransportError, CommandTimeoutError) as error:
                logger.warning(
                    "Failed to remove %s on host %s: %s", self._state_dir, self.host, error
                )
        else:
            # sshd frees the forwarded ports itself once it sees the connection closed.
            logger.warning(
                "Host %s does not respond, so %d process(es) and the directory %s stay there",
                self.host,
                len(processes),
                self._state_dir,
            )
            self._remote_forwards.close_all(notify=False)
        for tunnel in self.tunnels:
            tunnel.close()

        with self._lock:
            self._closed = True
            self._connection.close()
        logger.info("Disconnected from host %s", self.host)

    def _responds(self) -> bool:
        """Return whether the host runs a command within CLOSE_PROBE_TIMEOUT seconds."""
        try:
            self._execute("true", "true", timeout=CLOSE_PROBE_TIMEOUT)
        except (TransportError, CommandTimeoutError) as error:
            logger.warning("Host %s failed a liveness check before cleanup: %s", self.host, error)
            return False
        return True

    def _stop_quietly(self, process: SSHProcess) -> None:
        try:
            process.stop()
        except (TransportError, CommandTimeoutError) as error:
            logger.warning(
                "Failed to stop process %d on host %s: %s", process.pid, self.host, error
            )


class SSHBackend(Backend):
    """Makes SSH transports for the aliases of one OpenSSH client config.

    `ssh_config_path` defaults to the env var LAZYCLUSTER_SSH_CONFIG, else
    ~/.ssh/config. `strict_host_key_checking` ("yes", "no" or "accept-new")
    overrides the config's setting for every host. With
    `resolve_unknown_hosts=False`, a name that is not in the config (nor an IP
    address or localhost) fails without a DNS lookup.
    """

    def __init__(
        self,
        ssh_config_path: str | None = None,
        *,
        clock: Clock = SYSTEM_CLOCK,
        strict_host_key_checking: str | None = None,
        max_parallel_connects: int = MAX_PARALLEL_CONNECTS,
        resolve_unknown_hosts: bool = True,
    ) -> None:
        self.ssh_config_path = ssh_config_path
        self.clock = clock
        self.strict_host_key_checking = strict_host_key_checking
        self.resolve_unknown_hosts = resolve_unknown_hosts
        self._gate = threading.BoundedSemaphore(max_parallel_connects)
        self._local: LocalTransport | None = None
        self._local_lock = threading.Lock()

    @property
    def config_path(self) -> str:
        """Path of the SSH config in use."""
        return os.path.expanduser(self.ssh_config_path or default_config_path())

    def _config(self) -> SSHConfigFile:
        # Read on every call, so that hosts added by `lazycluster add-runtime` appear.
        return SSHConfigFile(self.config_path)

    def connect(
        self, host: str, connection_kwargs: Mapping[str, object] | None = None
    ) -> SSHTransport:
        connector = Connector(
            self._config(),
            self.clock,
            self._gate,
            host_key_policy=self.strict_host_key_checking,
            resolve_unknown_hosts=self.resolve_unknown_hosts,
        )
        return SSHTransport(host, connector, connection_kwargs, self.clock)

    def local(self) -> LocalTransport:
        with self._local_lock:
            if self._local is None:
                self._local = LocalTransport(clock=self.clock)
            return self._local

    def configured_hosts(self) -> list[str]:
        return self._config().host_aliases()

    def close(self) -> None:
        """Close the shared local transport; transports from `connect` are closed by their users."""
        with self._local_lock:
            local, self._local = self._local, None
        if local is not None:
            local.close()
