"""Running one command over an SSH exec channel.

The command runs as `exec /bin/sh -c SCRIPT`, where SCRIPT first prints a
marker line with the shell's pid. sshd makes that shell a session leader, so
its pid is also the process group of the command and of everything it starts.
After a timeout the whole group is killed through a second channel.
"""

from __future__ import annotations

import logging
import select
import shlex
from collections.abc import Callable
from dataclasses import dataclass

import paramiko

from lazycluster.clock import Clock
from lazycluster.transport.shell import LineSplitter

logger = logging.getLogger(__name__)

PID_MARKER = b"__lazycluster_pid__ "
READ_SIZE = 256 * 1024

# Maximum seconds of one select call, so that a dropped connection is noticed
# even when the channel never becomes readable.
POLL_INTERVAL = 1.0

# Seconds to wait for sshd to open a channel; paramiko's default is an hour.
# A command with a timeout waits at most until its deadline, but no less than
# the minimum.
CHANNEL_OPEN_TIMEOUT = 30.0
MIN_OPEN_TIMEOUT = 0.5

# Seconds to wait for the kill of a timed-out command, which may hang on an
# unresponsive host.
KILL_TIMEOUT = 5.0


class ChannelNotOpened(Exception):
    """The exec channel could not be opened, so the command was never sent."""


class ChannelLost(Exception):
    """The connection dropped after the command was sent."""


@dataclass
class ExecOutcome:
    """Exit code and output of one command; `timed_out` when the deadline passed first."""

    exit_code: int
    stdout: bytes
    stderr: bytes
    pid: int | None
    timed_out: bool = False


def wrap_script(script: str, *, with_input: bool = True) -> str:
    """Return the exec request that runs `script` with /bin/sh after printing the pid marker.

    Without input, the script reads /dev/null instead of the channel.
    """
    stdin = "" if with_input else "exec </dev/null\n"
    marked = f"echo {PID_MARKER.decode().strip()} $$\n{stdin}{script}"
    return f"exec /bin/sh -c {shlex.quote(marked)}"


class _Stdout:
    """Collects stdout after the pid marker line; text before it is login-shell noise."""

    def __init__(self, splitter: LineSplitter | None) -> None:
        self.pid: int | None = None
        self._head = b""
        self._chunks: list[bytes] = []
        self.splitter = splitter

    def feed(self, data: bytes) -> None:
        if self.pid is None:
            self._head += data
            start = self._head.find(PID_MARKER)
            end = self._head.find(b"\n", start)
            if start < 0 or end < 0:
                return
            self.pid = int(self._head[start + len(PID_MARKER) : end])
            data, self._head = self._head[end + 1 :], b""
        if data:
            self._chunks.append(data)
            if self.splitter is not None:
                self.splitter.feed(data)

    def value(self) -> bytes:
        # Without a marker the shell itself failed, so its output is the result.
        return b"".join(self._chunks) if self.pid is not None else self._head


def execute(
    transport: paramiko.Transport,
    script: str,
    *,
    host: str,
    stdin: bytes | None,
    on_output: Callable[[str], None] | None,
    deadline: float | None,
    clock: Clock,
) -> ExecOutcome:
    """Run `script` and collect its output until EOF, or until `deadline` on `clock`."""
    open_timeout = CHANNEL_OPEN_TIMEOUT
    if deadline is not None:
        open_timeout = max(min(open_timeout, deadline - clock.monotonic()), MIN_OPEN_TIMEOUT)
    try:
        channel = transport.open_session(timeout=open_timeout)
    except (paramiko.SSHException, EOFError, OSError) as error:
        raise ChannelNotOpened(str(error)) from error

    stdout = _Stdout(LineSplitter(on_output) if on_output else None)
    try:
        return _execute_on(channel, script, stdin, stdout, on_output, deadline, clock)
    except (paramiko.SSHException, EOFError, OSError) as error:
        raise ChannelLost(str(error)) from error
    except BaseException:
        # An error of on_output (or an interrupt) ends the call, and the
        # command must not outlive it.
        if stdout.pid is not None:
            kill_group(transport, stdout.pid, host)
        raise
    finally:
        channel.close()


def _execute_on(
    channel: paramiko.Channel,
    script: str,
    stdin: bytes | None,
    stdout: _Stdout,
    on_output: Callable[[str], None] | None,
    deadline: float | None,
    clock: Clock,
) -> ExecOutcome:
    # A command without input gets no EOF from us. A short command often ends
    # before that EOF is out, and an EOF after sshd closed the channel is a
    # protocol error that GuardedTransport would have to drop.
    channel.exec_command(wrap_script(script, with_input=stdin is not None))
    if stdin is not None:
        # NOTE: stdin is sent in full before output is read, so a command that
        # writes megabytes before it reads its input can stall on the SSH window.
        channel.sendall(stdin)
        channel.shutdown_write()

    stderr_chunks: list[bytes] = []
    stderr_lines = LineSplitter(on_output) if on_output else None

    while True:
        # EOF is read before draining: data that arrived before EOF is then in
        # the buffers for sure, while data and EOF arriving during the drain
        # are picked up by the next round.
        eof = channel.eof_received
        while channel.recv_ready():
            stdout.feed(channel.recv(READ_SIZE))
        while channel.recv_stderr_ready():
            data = channel.recv_stderr(READ_SIZE)
            stderr_chunks.append(data)
            if stderr_lines is not None:
                stderr_lines.feed(data)
        if eof:
            break
        if channel.closed and not channel.eof_received:
            raise ChannelLost("the channel closed before the command finished")
        if channel.eof_received:
            continue  # EOF arrived during the drain: drain once more, then stop

        wait = POLL_INTERVAL
        if deadline is not None:
            remaining = deadline - clock.monotonic()
            if remaining <= 0:
                return ExecOutcome(-1, stdout.value(), b"".join(stderr_chunks), stdout.pid, True)
            wait = min(wait, remaining)
        select.select([channel], [], [], wait)

    exit_code = _wait_exit_status(channel, deadline, clock)
    for splitter in (stdout.splitter, stderr_lines):
        if splitter is not None:
            splitter.flush()
    if exit_code is None:
        return ExecOutcome(-1, stdout.value(), b"".join(stderr_chunks), stdout.pid, True)
    return ExecOutcome(exit_code, stdout.value(), b"".join(stderr_chunks), stdout.pid)


def _wait_exit_status(
    channel: paramiko.Channel, deadline: float | None, clock: Clock
) -> int | None:
    while not channel.status_event.is_set():
        if channel.closed and not channel.status_event.is_set():
            # sshd closes without an exit status when the command died from a
            # signal; paramiko then reports -1, like `recv_exit_status`.
            return -1
        wait = POLL_INTERVAL
        if deadline is not None:
            remaining = deadline - clock.monotonic()
            if remaining <= 0:
                return None
            wait = min(wait, remaining)
        channel.status_event.wait(wait)
    return channel.recv_exit_status()


def kill_group(transport: paramiko.Transport, pid: int, host: str) -> None:
    """Kill the process group `pid` on the host, logging instead of raising on failure."""
    script = f"kill -s KILL -- -{pid} 2>/dev/null; kill -s KILL {pid} 2>/dev/null; true"
    try:
        channel = transport.open_session(timeout=KILL_TIMEOUT)
        try:
            channel.exec_command(script)
            if not channel.status_event.wait(KILL_TIMEOUT):
                logger.warning("Kill of process group %d on host %s did not finish", pid, host)
        finally:
            channel.close()
    except (paramiko.SSHException, EOFError, OSError) as error:
        logger.warning("Failed to kill process group %d on host %s: %s", pid, host, error)
