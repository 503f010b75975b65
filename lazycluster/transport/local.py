"""The manager's own machine behind the transport seam: subprocess and sockets."""

from __future__ import annotations

import errno
import functools
import itertools
import logging
import os
import selectors
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence

from lazycluster.clock import SYSTEM_CLOCK, Clock
from lazycluster.exceptions import CommandTimeoutError
from lazycluster.transport.base import (
    DEFAULT_STOP_GRACE,
    Command,
    CommandResult,
    ProcessHandle,
    Transport,
    Tunnel,
    command_to_shell,
)
from lazycluster.transport.forwarding import (
    ListeningTunnel,
    NoOpTunnel,
    connect_loopback,
    validate_host_port,
    validate_pairs,
)
from lazycluster.transport.shell import (
    EXIT_NOT_EXECUTABLE,
    EXIT_NOT_FOUND,
    LineSplitter,
    build_script,
    exit_code_of,
    tail_lines,
    validate_env,
)

logger = logging.getLogger(__name__)

LOCALHOST = "localhost"
READ_SIZE = 64 * 1024

# Seconds to wait for a process group to vanish after SIGKILL.
KILL_WAIT = 5.0


def _group_exists(pgid: int) -> bool:
    """Return True while a process of group `pgid` is alive (zombies do not count)."""
    if os.path.isdir("/proc/self"):
        return _group_alive_in_proc(pgid)
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _group_alive_in_proc(pgid: int) -> bool:
    # A zombie stays in its group until its parent reaps it. Orphans are reaped
    # by init, which can be late, so zombies count as exited here.
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="ascii", errors="replace") as stat:
                fields = stat.read().rpartition(")")[2].split()
        except OSError:
            continue  # the process exited while the loop ran
        if len(fields) > 2 and fields[2] == str(pgid) and fields[0] not in ("Z", "X"):
            return True
    return False


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass  # the whole group has exited already


class LocalProcess(ProcessHandle):
    """A background process on the manager, leader of its own session and process group."""

    def __init__(
        self, host: str, popen: subprocess.Popen[bytes], command: str, log_path: str, clock: Clock
    ) -> None:
        self.host = host
        self.pid = popen.pid
        self.pgid = popen.pid
        self.command = command
        self.log_path = log_path
        self._popen = popen
        self._clock = clock

    def poll(self) -> int | None:
        returncode = self._popen.poll()
        return None if returncode is None else exit_code_of(returncode)

    def _finished(self) -> bool:
        return self.poll() is not None and not _group_exists(self.pgid)

    def wait(self, timeout: float | None = None) -> int:
        if timeout is None:
            return exit_code_of(self._popen.wait())
        if not self._clock.wait_until(lambda: self.poll() is not None, timeout, interval=0.01):
            raise CommandTimeoutError(self.host, f"Waiting for process {self.pid}", timeout)
        return exit_code_of(self._popen.wait())

    def stop(self, grace: float = DEFAULT_STOP_GRACE) -> int | None:
        if self._finished():
            return self.poll()

        _signal_group(self.pgid, signal.SIGTERM)
        if not self._clock.wait_until(self._finished, grace, interval=0.01):
            logger.info(
                "Process %d on host %s ignored SIGTERM for %g s, sending SIGKILL",
                self.pid,
                self.host,
                grace,
            )
            _signal_group(self.pgid, signal.SIGKILL)
            self._clock.wait_until(self._finished, KILL_WAIT, interval=0.01)

        code = self.poll()
        logger.info("Process %d on host %s stopped with exit code %s", self.pid, self.host, code)
        return code

    def read_log(self, max_lines: int | None = None) -> str:
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as log:
                text = log.read()
        except FileNotFoundError:
            return ""
        return tail_lines(text, max_lines)


class LocalTransport(Transport):
    """Runs commands, processes and tunnels on the manager itself."""

    is_local = True

    def __init__(self, host: str = LOCALHOST, clock: Clock = SYSTEM_CLOCK) -> None:
        self.host = host
        self.clock = clock
        self._lock = threading.Lock()
        self._processes: list[LocalProcess] = []
        self._log_numbers = itertools.count()
        self._tunnels: list[Tunnel] = []
        self._temp_dir: str | None = None
        self._closed = False

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
        full_env = {**os.environ, **validate_env(env)}
        logger.debug("Running on host %s: %s", self.host, text)

        cwd = os.path.expanduser(cwd) if cwd is not None else None
        if cwd is not None and not os.path.isdir(cwd):
            return CommandResult(self.host, text, 2, "", f"cd: {cwd}: No such directory\n")
        try:
            popen = subprocess.Popen(
                command if isinstance(command, str) else [str(part) for part in command],
                shell=isinstance(command, str),
                env=full_env,
                cwd=cwd,
                stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                start_new_session=True,
            )
        except FileNotFoundError:
            return CommandResult(
                self.host, text, EXIT_NOT_FOUND, "", f"{text}: command not found\n"
            )
        except PermissionError:
            return CommandResult(
                self.host, text, EXIT_NOT_EXECUTABLE, "", f"{text}: permission denied\n"
            )

        deadline = None if timeout is None else self.clock.monotonic() + timeout
        outputs: tuple[bytes, bytes] | None = None
        try:
            outputs = _communicate(popen, stdin, on_output, deadline, self.clock)
            if outputs is not None:
                remaining = None if deadline is None else max(deadline - self.clock.monotonic(), 0)
                popen.wait(remaining)
        except subprocess.TimeoutExpired:
            outputs = None
        finally:
            # Kills the whole process group after a timeout or an error raised by
            # on_output. Background children of a command that finished are kept.
            if popen.poll() is None or outputs is None:
                _signal_group(popen.pid, signal.SIGKILL)
                popen.wait()
            _close_pipes(popen)

        if outputs is None:
            raise CommandTimeoutError(self.host, f"Command {text!r}", timeout or 0.0)
        stdout, stderr = outputs
        return CommandResult(
            self.host,
            text,
            exit_code_of(popen.returncode),
            stdout.decode("utf-8", errors="replace"),
            stderr.decode("utf-8", errors="replace"),
        )

    def start_process(
        self,
        command: Command,
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        log_path: str | None = None,
    ) -> LocalProcess:
        text = command_to_shell(command)
        full_env = {**os.environ, **validate_env(env)}
        script = build_script(f"exec {text}" if not isinstance(command, str) else text, {}, cwd)

        with self._lock:
            if log_path is None:
                # A counter, not len(self._processes): two concurrent starts
                # would otherwise share one log file.
                log_path = os.path.join(
                    self._make_temp_dir(), f"process-{next(self._log_numbers)}.log"
                )
        log_path = os.path.expanduser(log_path)
        os.makedirs(os.path.dirname(os.path.abspath(log_path)), exist_ok=True)

        with open(log_path, "ab") as log:
            popen = subprocess.Popen(
                ["/bin/sh", "-c", script],
                env=full_env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        process = LocalProcess(self.host, popen, text, log_path, self.clock)
        with self._lock:
            self._processes.append(process)
        logger.info(
            "Process %d started on host %s: %s (log %s)", process.pid, self.host, text, log_path
        )
        return process

    # Files

    def put(self, local_path: str, remote_path: str) -> None:
        _copy(local_path, remote_path, self.host)

    def get(self, remote_path: str, local_path: str) -> None:
        _copy(remote_path, local_path, self.host)

    # Ports and tunnels

    def ports_in_use(self, ports: Iterable[int]) -> set[int]:
        checked = [validate_host_port(port, self.host) for port in ports]
        return {port for port in checked if port_is_bound(port)}

    def forward_local(self, pairs: Sequence[tuple[int, int]]) -> list[Tunnel]:
        return self._open_tunnels("local", pairs)

    def forward_remote(self, pairs: Sequence[tuple[int, int]]) -> list[Tunnel]:
        return self._open_tunnels("remote", pairs)

    def _open_tunnels(self, kind: str, pairs: Sequence[tuple[int, int]]) -> list[Tunnel]:
        checked = validate_pairs(pairs, self.host)
        opened: list[Tunnel] = []
        try:
            for listen, target in checked:
                if listen == target:
                    opened.append(NoOpTunnel(self.host, kind, listen))
                else:
                    opened.append(
                        ListeningTunnel(
                            self.host,
                            kind,
                            listen,
                            target,
                            functools.partial(connect_loopback, target),
                        )
                    )
        except BaseException:
            for tunnel in opened:
                tunnel.close()
            raise
        with self._lock:
            self._tunnels.extend(opened)
        return opened

    # Bookkeeping

    @property
    def processes(self) -> list[ProcessHandle]:
        with self._lock:
            return list(self._processes)

    @property
    def tunnels(self) -> list[Tunnel]:
        with self._lock:
            self._tunnels = [tunnel for tunnel in self._tunnels if tunnel.is_open]
            return list(self._tunnels)

    def _make_temp_dir(self) -> str:
        if self._temp_dir is None:
            self._temp_dir = tempfile.mkdtemp(prefix="lazycluster-")
        return self._temp_dir

    def close(self) -> None:
        with self._lock:
            processes, self._processes = self._processes, []
            tunnels, self._tunnels = self._tunnels, []
            temp_dir, self._temp_dir = self._temp_dir, None

        self.clock.map(lambda process: process.stop(), processes)
        for tunnel in tunnels:
            tunnel.close()
        if temp_dir is not None:
            shutil.rmtree(temp_dir, ignore_errors=True)


def _close_pipes(popen: subprocess.Popen[bytes]) -> None:
    for pipe in (popen.stdin, popen.stdout, popen.stderr):
        if pipe is not None:
            pipe.close()


def _communicate(
    popen: subprocess.Popen[bytes],
    stdin: bytes | None,
    on_output: Callable[[str], None] | None,
    deadline: float | None,
    clock: Clock,
) -> tuple[bytes, bytes] | None:
    """Feed stdin and collect stdout and stderr until both end; None at the deadline."""
    assert popen.stdout is not None and popen.stderr is not None
    chunks: dict[int, list[bytes]] = {popen.stdout.fileno(): [], popen.stderr.fileno(): []}
    splitters = {fd: LineSplitter(on_output) for fd in chunks} if on_output else {}
    pending = memoryview(stdin or b"")
    stdin_fd = popen.stdin.fileno() if popen.stdin is not None else -1

    with selectors.DefaultSelector() as selector:
        for fd in chunks:
            selector.register(fd, selectors.EVENT_READ)
        if stdin_fd >= 0:
            os.set_blocking(stdin_fd, False)
            selector.register(stdin_fd, selectors.EVENT_WRITE)

        while selector.get_map():
            wait = None if deadline is None else deadline - clock.monotonic()
            if wait is not None and wait <= 0:
                return None
            for key, _ in selector.select(wait):
                if key.fd == stdin_fd:
                    pending = _write_some(popen, selector, pending)
                    continue
                data = os.read(key.fd, READ_SIZE)
                if not data:
                    selector.unregister(key.fd)
                    continue
                chunks[key.fd].append(data)
                if key.fd in splitters:
                    splitters[key.fd].feed(data)

    for splitter in splitters.values():
        splitter.flush()
    return b"".join(chunks[popen.stdout.fileno()]), b"".join(chunks[popen.stderr.fileno()])


def _write_some(
    popen: subprocess.Popen[bytes], selector: selectors.BaseSelector, pending: memoryview
) -> memoryview:
    assert popen.stdin is not None
    fd = popen.stdin.fileno()
    try:
        written = os.write(fd, pending[:READ_SIZE])
    except BlockingIOError:
        return pending
    except BrokenPipeError:
        # The command closed its input early, as `head` does; that is not an error.
        written = len(pending)
    pending = pending[written:]
    if not pending:
        selector.unregister(fd)
        popen.stdin.close()
    return pending


# Addresses a listening server could bind that would collide with the port: the
# loopback address, and the IPv4 and IPv6 wildcards.
_BIND_PROBES = (
    (socket.AF_INET, "127.0.0.1"),
    (socket.AF_INET, "0.0.0.0"),
    (socket.AF_INET6, "::"),
)


def port_is_bound(port: int) -> bool:
    """Return True when binding `port` on loopback or a wildcard address fails with EADDRINUSE."""
    for family, address in _BIND_PROBES:
        try:
            probe = socket.socket(family, socket.SOCK_STREAM)
        except OSError:
            continue  # no IPv6 on this machine
        with probe:
            # With SO_REUSEADDR, sockets in TIME_WAIT do not collide, as for servers
            # that set it. A listening or connected socket on the port still collides.
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                probe.bind((address, port))
            except OSError as error:
                if error.errno == errno.EADDRINUSE:
                    return True
                if error.errno != errno.EADDRNOTAVAIL:
                    raise
    return False


def _copy(source: str, target: str, host: str) -> None:
    """Copy a file or folder to exactly `target`, creating parents and keeping modes."""
    source, target = os.path.expanduser(source), os.path.expanduser(target)
    if not os.path.exists(source):
        raise FileNotFoundError(errno.ENOENT, f"No such file or folder on host {host!r}", source)

    parent = os.path.dirname(os.path.abspath(target))
    os.makedirs(parent, exist_ok=True)
    if os.path.isdir(source):
        shutil.copytree(source, target, symlinks=True, dirs_exist_ok=True)
        return
    if os.path.isdir(target):
        raise IsADirectoryError(
            errno.EISDIR, f"Target of a file copy on host {host!r} is a folder", target
        )
    shutil.copy2(source, target)
