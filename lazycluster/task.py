"""RuntimeTask: a sequence of steps (copy files, run commands, run functions) for one host.

A task is built on the manager with chained step builders and executed on one
transport, usually through `Runtime.execute_task`. Each executed step adds one
entry to `execution_log` and streams its output to a log file under
`Environment.main_directory`.
"""

from __future__ import annotations

import logging
import os
import re
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future
from typing import Any

import cloudpickle

from lazycluster.environment import Environment
from lazycluster.exceptions import TaskExecutionError
from lazycluster.task_steps import (
    GetFile,
    RunCommand,
    RunFunction,
    SendFile,
    Step,
    StepFailed,
    StepRunner,
)
from lazycluster.transport import ProcessHandle, Transport
from lazycluster.validation import check_env_variables, check_non_empty_str

logger = logging.getLogger(__name__)

# Characters kept in log file names; others become "_".
_FILE_NAME_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")


class RuntimeTask:
    """Steps executed in order on one host, in the runtime's working directory.

    Step builders return the task, so calls chain::

        task = RuntimeTask("prepare").send_file("data.csv").run_command("wc -l data.csv")
    """

    def __init__(self, name: str | None = None) -> None:
        if name is None:
            name = f"task-{uuid.uuid4().hex[:8]}"
        self.name = check_non_empty_str(name, "task name")
        self.omit_on_join = False
        self._steps: list[Step] = []
        self._env_variables: dict[str, str] = {}
        self._reset_run_state()

    def _reset_run_state(self) -> None:
        self._execution_log: list[str] = []
        self._execution_log_file_path: str | None = None
        self._function_returns: list[Any] = []
        self._future: Future[None] | None = None
        self._host: str | None = None
        # The background process of the running step, so that stop() can end it.
        self._current_process: ProcessHandle | None = None
        self._stop_requested = False

    def __deepcopy__(self, memo: dict[int, Any]) -> RuntimeTask:
        # A copy has the same steps but its own log, returns and execution handle.
        clone = RuntimeTask(self.name)
        clone.omit_on_join = self.omit_on_join
        clone._steps = list(self._steps)
        clone._env_variables = dict(self._env_variables)
        return clone

    def __repr__(self) -> str:
        return f"<RuntimeTask {self.name!r} steps={len(self._steps)} host={self._host!r}>"

    # --- step builders -------------------------------------------------------

    def send_file(self, local_path: str, remote_path: str | None = None) -> RuntimeTask:
        """Add a step that copies a local file or folder to the host.

        A relative `remote_path` is relative to the runtime's working directory.
        Without one, the file keeps its name in the working directory.
        """
        local_path = os.fspath(check_non_empty_str(local_path, "local_path"))
        if remote_path is not None:
            check_non_empty_str(remote_path, "remote_path")
        if not os.path.exists(local_path):
            raise FileNotFoundError(
                f"Local file {local_path!r} not found: pass an existing file or folder to send_file."
            )
        self._steps.append(SendFile(os.path.abspath(local_path), remote_path))
        return self

    def get_file(self, remote_path: str, local_path: str | None = None) -> RuntimeTask:
        """Add a step that copies a file or folder from the host to the manager.

        A relative `remote_path` is relative to the runtime's working directory.
        Without `local_path`, the file keeps its name in the current directory.
        """
        check_non_empty_str(remote_path, "remote_path")
        if local_path is not None:
            check_non_empty_str(local_path, "local_path")
        self._steps.append(GetFile(remote_path, local_path))
        return self

    def run_command(self, command: str) -> RuntimeTask:
        """Add a step that runs a shell command on the host. A non-zero exit code fails the task."""
        check_non_empty_str(command, "command")
        self._steps.append(RunCommand(command))
        return self

    def run_function(self, function: Callable[..., Any], **func_kwargs: Any) -> RuntimeTask:
        """Add a step that calls `function(**func_kwargs)` with the host's python3.

        The function and its arguments are serialized with cloudpickle now, so
        later changes to them do not affect the task. The return value is
        available from `function_returns` after execution.

        cloudpickle sends functions of importable modules by reference, so the
        host must be able to import that module too. For a module of your own
        that the host lacks, call `cloudpickle.register_pickle_by_value(module)`.
        """
        if not callable(function):
            raise TypeError(f"Invalid function {function!r}: expected a callable.")
        function_name = getattr(function, "__qualname__", None) or repr(function)
        try:
            payload = cloudpickle.dumps((function, func_kwargs))
        except Exception as error:
            raise TypeError(
                f"Function {function_name!r} or its arguments cannot be serialized with "
                f"cloudpickle: {error}. Pass plain data as arguments and avoid capturing "
                "locks, sockets or open files."
            ) from error
        self._steps.append(RunFunction(function_name, payload))
        return self

    # --- state ---------------------------------------------------------------

    @property
    def env_variables(self) -> dict[str, str]:
        """Environment variables set for the commands and functions of this task."""
        return dict(self._env_variables)

    @env_variables.setter
    def env_variables(self, env_variables: Mapping[str, str]) -> None:
        self._env_variables = check_env_variables(env_variables)

    @property
    def execution_log(self) -> list[str]:
        """The output of each executed step, one entry per step."""
        return list(self._execution_log)

    @property
    def execution_log_file_path(self) -> str | None:
        """Path of the log file of the last execution, None before the first one."""
        return self._execution_log_file_path

    @property
    def process(self) -> Future[None] | None:
        """The future of an asynchronous execution, None when the task ran synchronously."""
        return self._future

    @property
    def host(self) -> str | None:
        """Host of the last execution."""
        return self._host

    @property
    def is_running(self) -> bool:
        """Whether an asynchronous execution is still running."""
        return self._future is not None and not self._future.done()

    @property
    def function_returns(self) -> Iterator[Any]:
        """Generator of the return values of the `run_function` steps, in step order.

        It waits for an asynchronous execution to finish first.
        """
        self.join()
        yield from list(self._function_returns)

    def join(self) -> None:
        """Wait for an asynchronous execution and raise its TaskExecutionError, if any."""
        if self._future is not None:
            self._future.result()

    def print_log(self) -> None:
        """Print the execution log to stdout."""
        for entry in self._execution_log:
            print(entry)

    def stop(self) -> None:
        """Stop an asynchronous execution: end the running step's process and skip the later steps.

        A file copy in progress finishes first. `join()` then raises TaskExecutionError.
        """
        if not self.is_running:
            return
        self._stop_requested = True
        process = self._current_process
        if process is not None:
            logger.info("Stopping task %r on host %s", self.name, self._host)
            process.stop()

    def cleanup(self) -> None:
        """Forget a finished asynchronous execution."""
        if self._future is not None and self._future.done():
            self._future = None

    # --- execution -----------------------------------------------------------

    def execute(
        self,
        connection: Any,
        debug: bool = False,
        *,
        working_dir: str | None = None,
        env_variables: Mapping[str, str] | None = None,
    ) -> None:
        """Run the steps in order on `connection`, a Transport or a Runtime.

        With a Runtime, its working directory and env variables are used unless
        given here. With `debug=True` the output is also printed to stdout.
        A failing step raises TaskExecutionError and skips the later steps.
        """
        transport, working_dir, env = self._resolve_connection(connection, working_dir, env_variables)
        self._stop_requested = False
        self._run_steps(transport, working_dir, env, debug, background=False)

    def _run_steps(
        self,
        transport: Transport,
        working_dir: str | None,
        env: dict[str, str],
        debug: bool,
        background: bool,
    ) -> None:
        self._execution_log = []
        self._function_returns = []
        self._host = transport.host
        self._execution_log_file_path = self._new_log_file_path(transport)
        logger.info("Task %r started on host %s (log %s)", self.name, transport.host,
                    self._execution_log_file_path)

        with open(self._execution_log_file_path, "a", encoding="utf-8") as log_file:
            for index, step in enumerate(self._steps):
                if self._stop_requested:
                    raise TaskExecutionError(
                        index, self, transport.host, self._execution_log_file_path,
                        "The task was stopped before this step.",
                    )
                runner = StepRunner(self, transport, working_dir, env, log_file, debug, background)
                try:
                    entry = runner.run(step)
                except StepFailed as failure:
                    self._execution_log.append(failure.output)
                    logger.info("Task %r failed at step %d on host %s", self.name, index,
                                transport.host)
                    raise TaskExecutionError(
                        index, self, transport.host, self._execution_log_file_path,
                        failure.output, failure.cause,
                    ) from failure.cause
                self._execution_log.append(entry)

        logger.info("Task %r finished on host %s", self.name, transport.host)

    def execute_async(
        self,
        connection: Any,
        debug: bool = False,
        *,
        working_dir: str | None = None,
        env_variables: Mapping[str, str] | None = None,
    ) -> Future[None]:
        """Start `execute` in the background with the transport's clock and return its future.

        Commands run as background processes of the transport, so closing the
        transport stops them. `join()` waits and raises the TaskExecutionError.
        """
        if self.is_running:
            raise ValueError(f"Task {self.name!r} is already running: pass a copy.deepcopy() of it.")
        transport, working_dir, env = self._resolve_connection(connection, working_dir, env_variables)
        self._reset_run_state()
        self._future = transport.clock.submit(
            lambda: self._run_steps(transport, working_dir, env, debug, background=True),
            name=self.name,
        )
        return self._future

    def _resolve_connection(
        self, connection: Any, working_dir: str | None, env_variables: Mapping[str, str] | None
    ) -> tuple[Transport, str | None, dict[str, str]]:
        if isinstance(connection, Transport):
            transport = connection
            env: dict[str, str] = {}
        elif isinstance(getattr(connection, "transport", None), Transport):
            transport = connection.transport
            if working_dir is None:
                working_dir = connection.working_dir
            env = dict(connection.env_variables) if env_variables is None else {}
        else:
            raise TypeError(f"Invalid connection {connection!r}: expected a Transport or a Runtime.")

        if env_variables is not None:
            env.update(check_env_variables(env_variables))
        env.update(self._env_variables)
        return transport, working_dir, env

    def _new_log_file_path(self, transport: Transport) -> str:
        directory = Environment.execution_log_dir(_FILE_NAME_UNSAFE.sub("_", transport.host))
        os.makedirs(directory, exist_ok=True)
        timestamp = transport.clock.time()
        stamp = time.strftime("%Y-%m-%d_%H-%M-%S", time.localtime(timestamp))
        milliseconds = int(timestamp * 1000) % 1000
        name = _FILE_NAME_UNSAFE.sub("_", self.name)
        return os.path.join(directory, f"{name}_{stamp}.{milliseconds:03d}.log")


__all__ = ["RuntimeTask"]
