"""Tasks and host filters of a Runtime, mixed into the Runtime class."""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from lazycluster import host_commands
from lazycluster.exceptions import LazyclusterError
from lazycluster.runtime_ports import RuntimePortsMixin
from lazycluster.task import RuntimeTask
from lazycluster.transport import Tunnel
from lazycluster.validation import check_non_empty_str

logger = logging.getLogger(__name__)


class RuntimeTasksMixin(RuntimePortsMixin):
    """Task execution, joining, logs and host filters; mixed into Runtime."""

    _tasks: list[RuntimeTask]
    _processes: dict[str, RuntimeTask | Tunnel | None]
    _key_counter: itertools.count[int]

    @property
    def working_dir(self) -> str:
        raise NotImplementedError  # provided by Runtime

    @property
    def env_variables(self) -> dict[str, str]:
        raise NotImplementedError  # provided by Runtime

    @property
    def cpu_cores(self) -> int:
        raise NotImplementedError  # provided by Runtime

    @property
    def memory_in_mb(self) -> int:
        raise NotImplementedError  # provided by Runtime

    @property
    def gpu_count(self) -> int:
        raise NotImplementedError  # provided by Runtime

    # --- tasks -------------------------------------------------------------------

    def execute_task(
        self,
        task: RuntimeTask,
        execute_async: bool = True,
        omit_on_join: bool = False,
        debug: bool = False,
    ) -> RuntimeTask:
        """Run `task` in the working directory with the env variables; return the task.

        Asynchronous execution returns at once; `join()` waits and raises the
        first TaskExecutionError. Synchronous execution raises it directly.
        """
        if not isinstance(task, RuntimeTask):
            raise TypeError(f"Invalid task {task!r}: expected a RuntimeTask.")
        if task.is_running:
            raise ValueError(f"Task {task.name!r} is already running: pass a copy.deepcopy() of it.")

        task.omit_on_join = omit_on_join
        working_dir = self.working_dir
        env = self.env_variables
        self._processes[self._new_key(f"task-{task.name}")] = task
        self._tasks.append(task)

        if execute_async:
            task.execute_async(self.transport, debug, working_dir=working_dir, env_variables=env)
        else:
            task.execute(self.transport, debug, working_dir=working_dir, env_variables=env)
        return task

    def execute_function(self, function: Callable[..., Any], **kwargs: Any) -> RuntimeTask:
        """Run `function(**kwargs)` on the host asynchronously; its value is in `function_returns`."""
        name = getattr(function, "__name__", "function")
        task = RuntimeTask(f"{name}-{next(self._key_counter)}").run_function(function, **kwargs)
        return self.execute_task(task, execute_async=True)

    def send_file(
        self, local_path: str, remote_path: str | None = None, execute_async: bool = False
    ) -> RuntimeTask:
        """Copy a local file or folder to the host; a relative remote path is in the working dir."""
        task = RuntimeTask(f"send-file-{next(self._key_counter)}").send_file(local_path, remote_path)
        return self.execute_task(task, execute_async=execute_async)

    def get_file(
        self, remote_path: str, local_path: str | None = None, execute_async: bool = False
    ) -> RuntimeTask:
        """Copy a file or folder from the host to the manager."""
        task = RuntimeTask(f"get-file-{next(self._key_counter)}").get_file(remote_path, local_path)
        return self.execute_task(task, execute_async=execute_async)

    def join(self) -> None:
        """Wait for every task not started with `omit_on_join`; raise the first failure."""
        first_error: BaseException | None = None
        for task in list(self._tasks):
            if task.omit_on_join:
                continue
            try:
                task.join()
            except LazyclusterError as error:
                first_error = first_error or error
        if first_error is not None:
            raise first_error

    @property
    def task_processes(self) -> list[Any]:
        """The futures of the asynchronous tasks."""
        return [task.process for task in self._tasks if task.process is not None]

    @property
    def function_returns(self) -> Iterator[Any]:
        """Generator of the return values of all tasks' functions, waiting for each task."""
        for task in list(self._tasks):
            yield from task.function_returns

    def execution_log(self, task_name: str) -> list[str]:
        """Return the execution log of the latest task called `task_name`."""
        for task in reversed(self._tasks):
            if task.name == task_name:
                return task.execution_log
        raise ValueError(
            f"No task named {task_name!r} ran on runtime {self.host!r}: known tasks are "
            f"{[task.name for task in self._tasks]}."
        )

    def print_log(self) -> None:
        """Print the execution log of every task to stdout."""
        for task in self._tasks:
            print(f"--- {task.name} on {self.host} ---")
            task.print_log()

    def clear_tasks(self) -> None:
        """Forget the finished tasks."""
        finished = [task for task in self._tasks if not task.is_running]
        self._tasks = [task for task in self._tasks if task.is_running]
        for key, value in list(self._processes.items()):
            if isinstance(value, RuntimeTask) and value in finished:
                del self._processes[key]

    # --- filters -----------------------------------------------------------------

    def check_filter(
        self,
        gpu_required: bool = False,
        min_memory: int | None = None,
        min_cpu_cores: int | None = None,
        installed_executables: str | list[str] | None = None,
        filter_commands: str | list[str] | None = None,
    ) -> bool:
        """Return whether the host meets every given requirement; `min_memory` is in MB.

        A filter command passes when its output, stripped, is `true`.
        """
        executables = _as_str_list(installed_executables, "installed_executables")
        commands = _as_str_list(filter_commands, "filter_commands")
        for name in executables:
            if name.startswith("-") or any(character.isspace() for character in name):
                raise ValueError(f"Invalid executable name {name!r} in installed_executables.")
        if min_memory is not None and min_memory < 0 or min_cpu_cores is not None and min_cpu_cores < 0:
            raise ValueError("Invalid filter: min_memory and min_cpu_cores must not be negative.")

        if gpu_required and self.gpu_count == 0:
            return False
        if min_memory is not None and self.memory_in_mb < min_memory:
            return False
        if min_cpu_cores is not None and self.cpu_cores < min_cpu_cores:
            return False
        if executables:
            missing = self.transport.run(host_commands.find_missing_executables(executables)).stdout.split()
            if missing:
                logger.info("Host %s lacks executables %s", self.host, missing)
                return False
        for command in commands:
            result = self.transport.run(command, env=self.env_variables, cwd=self.working_dir)
            if result.stdout.strip().lower() != "true":
                return False
        return True


def _as_str_list(value: str | Sequence[str] | None, name: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    if isinstance(value, (bytes, Mapping)) or not isinstance(value, Sequence):
        raise TypeError(f"Invalid {name} {value!r}: expected a string or a list of strings.")
    return [check_non_empty_str(item, name) for item in value]
