"""The steps of a RuntimeTask and how each one runs on a transport.

A step runs in one of two modes. In the foreground (synchronous execution) a
command runs with `Transport.run`, its output streamed line by line. In the
background (asynchronous execution) a command runs with
`Transport.start_process`, so the transport tracks it and closing the
transport stops it: an SSH exec channel that closes leaves its command
running on the host. Its output is read from the process log when it ends.
"""

from __future__ import annotations

import base64
import logging
import os
import pickle
import posixpath
import sys
import tempfile
import uuid
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING, Any

from lazycluster import host_commands
from lazycluster.exceptions import LazyclusterError
from lazycluster.transport import ProcessHandle, Transport

if TYPE_CHECKING:
    from lazycluster.task import RuntimeTask

logger = logging.getLogger(__name__)

# Seconds between log reads of a background step with debug output; it grows to ten times this.
POLL_INTERVAL = 0.2


@dataclass(frozen=True)
class SendFile:
    local_path: str
    remote_path: str | None


@dataclass(frozen=True)
class GetFile:
    remote_path: str
    local_path: str | None


@dataclass(frozen=True)
class RunCommand:
    command: str


@dataclass(frozen=True)
class RunFunction:
    function_name: str
    payload: bytes


Step = SendFile | GetFile | RunCommand | RunFunction


class StepFailed(Exception):
    """A step failed with this output, which RuntimeTask turns into TaskExecutionError."""

    def __init__(self, output: str, cause: BaseException | None = None) -> None:
        super().__init__(output)
        self.output = output
        self.cause = cause


class StepRunner:
    """Runs one step and collects its output for the task's log."""

    def __init__(
        self,
        task: RuntimeTask,
        transport: Transport,
        working_dir: str | None,
        env: dict[str, str],
        log_file: IO[str],
        debug: bool,
        background: bool,
    ) -> None:
        self.task = task
        self.transport = transport
        self.working_dir = working_dir
        self.env = env
        self.log_file = log_file
        self.debug = debug
        self.background = background
        self.lines: list[str] = []

    def run(self, step: Step) -> str:
        """Run `step` and return its output, or raise StepFailed."""
        try:
            if isinstance(step, SendFile):
                return self._send_file(step)
            if isinstance(step, GetFile):
                return self._get_file(step)
            if isinstance(step, RunCommand):
                return self._run_command(step)
            return self._run_function(step)
        except StepFailed:
            raise
        except (LazyclusterError, OSError) as error:
            self.emit(f"{type(error).__name__}: {error}")
            raise StepFailed(self.output(), error) from error

    def emit(self, line: str) -> None:
        """Record one output line in the step's output, the log file and, with debug, stdout."""
        line = line.rstrip("\n")
        self.lines.append(line)
        self.log_file.write(line + "\n")
        self.log_file.flush()
        if self.debug:
            print(f"{self.transport.host}: {line}", file=sys.stdout, flush=True)

    def emit_output(self, line: str) -> None:
        """Record a line of command output, except the function runner's result line."""
        if not line.startswith(host_commands.FUNCTION_RESULT_MARKER):
            self.emit(line)

    def output(self) -> str:
        return "\n".join(self.lines)

    def _remote_path(self, path: str) -> str:
        if posixpath.isabs(path) or self.working_dir is None:
            return path
        return posixpath.join(self.working_dir, path)

    # --- files -------------------------------------------------------------------------

    def _send_file(self, step: SendFile) -> str:
        remote = self._remote_path(step.remote_path or os.path.basename(step.local_path))
        self.emit(f"Sending {step.local_path} to {self.transport.host}:{remote}")
        if not os.path.exists(step.local_path):
            raise StepFailed(f"Local file {step.local_path!r} not found.")
        self.transport.put(step.local_path, remote)
        return self.output()

    def _get_file(self, step: GetFile) -> str:
        remote = self._remote_path(step.remote_path)
        local = step.local_path or os.path.join(os.getcwd(), posixpath.basename(remote.rstrip("/")))
        self.emit(f"Getting {self.transport.host}:{remote} to {os.path.abspath(local)}")
        self.transport.get(remote, local)
        return self.output()

    # --- commands ----------------------------------------------------------------------

    def _run_command(self, step: RunCommand) -> str:
        self.emit(f"$ {step.command}")
        exit_code, _ = self._execute(step.command)
        if exit_code != 0:
            self.emit(f"Exit code {exit_code}")
            raise StepFailed(self.output())
        return self.output()

    def _execute(self, command: str | list[str], stdin: bytes | None = None) -> tuple[int, str]:
        """Run `command` in the chosen mode and return its exit code and stdout.

        In the background mode the returned stdout is the whole process log, stderr included.
        """
        if self.background and stdin is None:
            process = self.transport.start_process(command, env=self.env, cwd=self.working_dir)
            logger.debug("Task %r step runs as process %d on host %s", self.task.name, process.pid,
                         self.transport.host)
            self.task._current_process = process
            try:
                return self._wait_and_collect(process)
            finally:
                self.task._current_process = None

        result = self.transport.run(
            command, env=self.env, cwd=self.working_dir, on_output=self.emit_output, stdin=stdin
        )
        if len(self.lines) <= 1:
            # A transport that does not stream leaves only the step's header line.
            for line in (result.stdout + result.stderr).splitlines():
                self.emit_output(line)
        return result.exit_code, result.stdout

    def _wait_and_collect(self, process: ProcessHandle) -> tuple[int, str]:
        """Wait for a background process and emit its log lines; return its exit code and log.

        With debug, the log is read on every poll so the lines appear while the
        process runs, at the cost of reading the whole log each time.
        """
        emitted = 0

        def emit_new_lines(finished: bool) -> str:
            nonlocal emitted
            log = process.read_log()
            lines = log.split("\n")
            # The last element is an unfinished line, or "" after a final newline.
            complete = lines if finished and lines[-1] else lines[:-1]
            for line in complete[emitted:]:
                self.emit_output(line)
            emitted = max(emitted, len(complete))
            return log

        if self.debug:
            def finished_after_drain() -> bool:
                finished = process.poll() is not None
                emit_new_lines(finished)
                return finished

            self.transport.clock.wait_until(finished_after_drain, float("inf"), interval=POLL_INTERVAL)

        exit_code = process.wait()
        return exit_code, emit_new_lines(finished=True)

    # --- functions ---------------------------------------------------------------------

    def _run_function(self, step: RunFunction) -> str:
        self.emit(f"Running function {step.function_name}")
        if self.background and self.working_dir is not None:
            exit_code, stdout = self._run_function_from_file(step)
        else:
            command = host_commands.python_command(host_commands.FUNCTION_RUNNER_SNIPPET)
            exit_code, stdout = self._execute(command, stdin=step.payload)
        outcome = self._read_outcome(stdout, exit_code)

        if not outcome.get("ok"):
            if not any("Traceback" in line for line in self.lines):
                self.emit(str(outcome.get("traceback", "")))
            self.emit(f"Function {step.function_name} failed: {outcome.get('error')}")
            raise StepFailed(self.output(), _load_remote_exception(outcome))
        self.task._function_returns.append(outcome.get("value"))
        return self.output()

    def _run_function_from_file(self, step: RunFunction) -> tuple[int, str]:
        """Upload the payload to the working directory and run the function as a process.

        The function runner deletes the payload file once it has read it.
        """
        assert self.working_dir is not None
        remote = posixpath.join(self.working_dir, f".{host_commands.TEMP_DIR_PREFIX}{uuid.uuid4().hex}.pickle")
        with tempfile.TemporaryDirectory(prefix=host_commands.TEMP_DIR_PREFIX) as local_dir:
            local = os.path.join(local_dir, "function.pickle")
            with open(local, "wb") as payload_file:
                payload_file.write(step.payload)
            self.transport.put(local, remote)
        return self._execute(host_commands.run_function_from_file(remote))

    def _read_outcome(self, stdout: str, exit_code: int) -> dict[str, Any]:
        encoded = None
        for line in stdout.splitlines():
            if line.startswith(host_commands.FUNCTION_RESULT_MARKER):
                encoded = line[len(host_commands.FUNCTION_RESULT_MARKER):]
        if encoded is None:
            self.emit(f"The function runner exited with code {exit_code} and sent no result.")
            raise StepFailed(self.output())

        try:
            outcome = pickle.loads(base64.b64decode(encoded))
        except Exception as error:
            self.emit(
                f"The function result could not be loaded on the manager: {error}. "
                "Its classes must be importable here too."
            )
            raise StepFailed(self.output(), error) from error
        return dict(outcome)


def _load_remote_exception(outcome: dict[str, Any]) -> BaseException | None:
    pickled = outcome.get("exception")
    if not pickled:
        return None
    try:
        error = pickle.loads(pickled)
    except Exception:
        # The exception class may not exist on the manager, but the traceback text remains.
        logger.debug("A remote exception could not be unpickled", exc_info=True)
        return None
    return error if isinstance(error, BaseException) else None
