"""Background processes on an SSH host, detached from the connection.

A process starts as `setsid /bin/sh -c WRAPPER &`, so it leads its own session
and process group and survives the exec channel and even the connection. The
wrapper shell runs the command in a subshell and writes its exit code to a
file next to the log, which is how `poll` learns the code later. The wrapper
traps SIGTERM (the subshell does not inherit the trap), so stopping the group
still records the command's exit code.
"""

from __future__ import annotations

import logging
import posixpath
import shlex
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from lazycluster.clock import Clock
from lazycluster.exceptions import CommandTimeoutError
from lazycluster.transport.base import DEFAULT_STOP_GRACE, Command, ProcessHandle, command_to_shell
from lazycluster.transport.shell import build_script, quote_path, tail_lines

if TYPE_CHECKING:
    from lazycluster.transport.base import CommandResult

logger = logging.getLogger(__name__)

SEPARATOR = "__lazycluster_separator__"

# Seconds to wait for a process group to vanish after SIGKILL.
KILL_WAIT = 5.0

# Exit codes reported when the wrapper vanished without writing one: after our
# SIGKILL it is that of a shell for signal 9, otherwise unknown.
EXIT_KILLED = 137
EXIT_UNKNOWN = 255

# Runs a shell script on the host and returns its result.
RunScript = Callable[[str], "CommandResult"]


def start_script(
    command: Command, env: Mapping[str, str], cwd: str | None, log_path: str, exit_path: str
) -> str:
    """Return the script that starts `command` detached and prints its pid."""
    body = build_script(
        command if isinstance(command, str) else f"exec {command_to_shell(command)}", env, cwd
    )
    wrapper = f"trap : TERM INT HUP\n(\n{body}\n)\necho $? > {quote_path(exit_path)}"
    log = quote_path(log_path)
    directories = {posixpath.dirname(log_path) or ".", posixpath.dirname(exit_path) or "."}
    return "\n".join(
        [
            "command -v setsid >/dev/null || { echo 'setsid not found: install util-linux' >&2; exit 127; }",
            f"mkdir -p -- {' '.join(quote_path(path) for path in sorted(directories))} || exit",
            f"rm -f -- {quote_path(exit_path)}",
            f"setsid /bin/sh -c {shlex.quote(wrapper)} </dev/null >>{log} 2>&1 &",
            "echo $!",
        ]
    )


@dataclass(frozen=True)
class _ProcStat:
    pid: int
    state: str
    pgrp: int


def parse_proc_stats(text: str) -> list[_ProcStat]:
    """Parse lines of /proc/PID/stat; the command name in brackets may contain anything."""
    stats = []
    for line in text.splitlines():
        head, _, tail = line.rpartition(")")
        fields = tail.split()
        pid_text = head.split(" (", 1)[0].strip()
        if len(fields) < 3 or not pid_text.isdigit() or not fields[2].lstrip("-").isdigit():
            continue
        stats.append(_ProcStat(int(pid_text), fields[0], int(fields[2])))
    return stats


def _is_alive(stat: _ProcStat) -> bool:
    # Zombies wait for their parent (often init for orphans) to reap them; they run no code.
    return stat.state not in ("Z", "X")


class SSHProcess(ProcessHandle):
    """A detached process on an SSH host, leader of its own process group."""

    def __init__(
        self,
        host: str,
        pid: int,
        command: str,
        log_path: str,
        exit_path: str,
        run_script: RunScript,
        clock: Clock,
    ) -> None:
        self.host = host
        self.pid = pid
        self.pgid = pid
        self.command = command
        self.log_path = log_path
        self.exit_path = exit_path
        self._run_script = run_script
        self._clock = clock
        self._exit_code: int | None = None
        self._killed = False

    def poll(self) -> int | None:
        if self._exit_code is not None:
            return self._exit_code

        # The stat is read before the exit file: a wrapper that is gone has
        # written its exit file already, unless it was killed.
        result = self._run_script(
            f"cat /proc/{self.pid}/stat 2>/dev/null; echo {SEPARATOR}; "
            f"cat -- {quote_path(self.exit_path)} 2>/dev/null; true"
        )
        stat_text, _, exit_text = result.stdout.partition(SEPARATOR)
        exit_text = exit_text.strip()
        if exit_text.lstrip("-").isdigit():
            self._exit_code = int(exit_text)
        elif any(stat.pid == self.pid and _is_alive(stat) for stat in parse_proc_stats(stat_text)):
            return None
        else:
            self._exit_code = EXIT_KILLED if self._killed else EXIT_UNKNOWN
        # DEBUG, because stop() logs the exit code of every process it stops.
        logger.debug(
            "Process %d on host %s exited with code %d", self.pid, self.host, self._exit_code
        )
        return self._exit_code

    def _group_alive(self) -> bool:
        result = self._run_script("cat /proc/[0-9]*/stat 2>/dev/null; true")
        return any(
            stat.pgrp == self.pgid and _is_alive(stat) for stat in parse_proc_stats(result.stdout)
        )

    def _signal(self, name: str) -> None:
        self._run_script(f"kill -s {name} -- -{self.pgid} 2>/dev/null; true")

    def wait(self, timeout: float | None = None) -> int:
        limit = float("inf") if timeout is None else timeout
        if not self._clock.wait_until(lambda: self.poll() is not None, limit, interval=0.05):
            raise CommandTimeoutError(self.host, f"Waiting for process {self.pid}", limit)
        code = self.poll()
        assert code is not None
        return code

    def stop(self, grace: float = DEFAULT_STOP_GRACE) -> int | None:
        if self._exit_code is not None and not self._group_alive():
            return self._exit_code

        self._signal("TERM")
        if not self._clock.wait_until(lambda: not self._group_alive(), grace, interval=0.05):
            logger.info(
                "Process %d on host %s ignored SIGTERM for %g s, sending SIGKILL",
                self.pid,
                self.host,
                grace,
            )
            self._killed = True
            self._signal("KILL")
            self._clock.wait_until(lambda: not self._group_alive(), KILL_WAIT, interval=0.05)

        code = self.poll()
        logger.info("Process %d on host %s stopped with exit code %s", self.pid, self.host, code)
        return code

    def read_log(self, max_lines: int | None = None) -> str:
        log = quote_path(self.log_path)
        if max_lines is None:
            result = self._run_script(f"cat -- {log} 2>/dev/null; true")
            return result.stdout
        if max_lines <= 0:
            return ""
        result = self._run_script(f"tail -n {int(max_lines)} -- {log} 2>/dev/null; true")
        return tail_lines(result.stdout, max_lines)
