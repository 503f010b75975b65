"""RuntimeGroup: several Runtimes used together, with group-wide work run in parallel.

Every group operation calls its runtimes through `clock.map`, so it costs
about one round trip whatever the number of hosts. Traffic between runtimes
always goes through the manager: a port of one runtime reaches the others by a
local forward to the manager plus a remote forward on each other runtime.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, TypeVar

from lazycluster.clock import Clock
from lazycluster.exceptions import LazyclusterError, NoPortsLeftError, PortInUseError
from lazycluster.runtime import Runtime
from lazycluster.runtime_ports import manager_transport
from lazycluster.task import RuntimeTask
from lazycluster.transport import get_backend, validate_port
from lazycluster.validation import check_host, check_host_list, check_ports, check_working_dir

logger = logging.getLogger(__name__)

T = TypeVar("T")

# Manager-side ports for group tunnels (`expose_port_from_runtime_to_group`)
# when the group port itself is taken on the manager.
INTERNAL_PORT_RANGE = range(45000, 46000)


class RuntimeGroup:
    """A set of Runtimes, one per host, addressed together or one by one."""

    def __init__(
        self,
        runtimes: Sequence[Runtime] | None = None,
        hosts: Sequence[str] | None = None,
        working_dir: str | None = None,
    ) -> None:
        if (runtimes is None) == (hosts is None):
            raise ValueError(
                "Pass exactly one of runtimes or hosts to RuntimeGroup, e.g. "
                "RuntimeGroup(hosts=['host-1', 'host-2'])."
            )
        if working_dir is not None:
            check_working_dir(working_dir)

        if hosts is not None:
            host_list = _unique(check_host_list(hosts, "hosts"), "hosts")
            runtime_list = _connect_all(host_list, working_dir)
        else:
            runtime_list = _check_runtimes(runtimes)
            if working_dir is not None:
                self._clock.map(lambda runtime: setattr(runtime, "working_dir", working_dir), runtime_list)

        self._runtimes: dict[str, Runtime] = {runtime.host: runtime for runtime in runtime_list}
        logger.info("Runtime group ready with hosts %s", list(self._runtimes))

    @property
    def _clock(self) -> Clock:
        return get_backend().clock

    def _map(self, function: Callable[[Runtime], T], runtimes: Iterable[Runtime] | None = None) -> list[T]:
        return self._clock.map(function, list(self._runtimes.values()) if runtimes is None else list(runtimes))

    def __repr__(self) -> str:
        return f"<RuntimeGroup hosts={self.hosts}>"

    def __enter__(self) -> RuntimeGroup:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.cleanup()

    # --- membership ------------------------------------------------------------------

    @property
    def hosts(self) -> list[str]:
        return list(self._runtimes)

    @property
    def runtimes(self) -> list[Runtime]:
        return list(self._runtimes.values())

    @property
    def runtime_count(self) -> int:
        return len(self._runtimes)

    def contains_runtime(self, host: str) -> bool:
        return host in self._runtimes

    def add_runtime(self, host: str | None = None, runtime: Runtime | None = None) -> None:
        """Add a runtime, given as a host name or as a Runtime."""
        if (host is None) == (runtime is None):
            raise ValueError("Pass exactly one of host or runtime to add_runtime.")
        if runtime is None:
            runtime = Runtime(check_host(host))
        elif not isinstance(runtime, Runtime):
            raise TypeError(f"Invalid runtime {runtime!r}: expected a Runtime.")
        if runtime.host in self._runtimes:
            raise ValueError(f"Host {runtime.host!r} is already in the group.")
        self._runtimes[runtime.host] = runtime

    def remove_runtime(self, host: str) -> None:
        """Remove the runtime of `host` from the group without cleaning it up."""
        self._check_member(host)
        del self._runtimes[host]

    def get_runtime(self, host: str | None = None) -> Runtime:
        """Return the runtime of `host`, or without a host the one running the fewest tasks."""
        if host is not None:
            self._check_member(host)
            return self._runtimes[host]
        if not self._runtimes:
            raise ValueError("The runtime group is empty: add a runtime first.")
        return min(self._runtimes.values(), key=lambda runtime: runtime.alive_task_process_count)

    def get_runtimes(
        self, include_hosts: str | list[str] | None = None, exclude_hosts: str | list[str] | None = None
    ) -> dict[str, Runtime]:
        """Return host to runtime for the included hosts (default: all) minus the excluded ones."""
        included = check_host_list(include_hosts, "include_hosts")
        excluded = check_host_list(exclude_hosts, "exclude_hosts")
        for host in included + excluded:
            self._check_member(host)
        return {
            host: runtime
            for host, runtime in self._runtimes.items()
            if (not included or host in included) and host not in excluded
        }

    def _check_member(self, host: str) -> None:
        if host not in self._runtimes:
            raise ValueError(f"Host {host!r} is not in the runtime group. Its hosts are {self.hosts}.")

    # --- environment and info ----------------------------------------------------------

    def set_env_variables(self, env_variables: dict[str, str]) -> None:
        """Replace the env variables of every runtime."""
        for runtime in self._runtimes.values():
            runtime.env_variables = env_variables

    def add_env_variables(self, env_variables: dict[str, str]) -> None:
        """Add env variables to every runtime."""
        for runtime in self._runtimes.values():
            runtime.add_env_variables(env_variables)

    def fill_runtime_info_buffers_async(self) -> None:
        """Kept for compatibility: host info is read when each Runtime is created."""

    def print_hosts(self) -> None:
        print(f"Runtime group hosts: {', '.join(self.hosts)}")

    def print_runtime_info(self) -> None:
        for runtime in self._runtimes.values():
            runtime.print_info()

    # --- tasks ----------------------------------------------------------------------

    def execute_task(
        self,
        task: RuntimeTask,
        host: str | None = None,
        broadcast: bool = False,
        execute_async: bool = True,
        omit_on_join: bool = False,
        debug: bool = False,
    ) -> RuntimeTask | list[RuntimeTask]:
        """Run `task` on one runtime (`host`, else the least busy), or a copy on each with `broadcast`."""
        if not isinstance(task, RuntimeTask):
            raise TypeError(f"Invalid task {task!r}: expected a RuntimeTask.")
        if broadcast and host is not None:
            raise ValueError("Pass either host or broadcast=True to execute_task, not both.")
        if not broadcast:
            return self.get_runtime(host).execute_task(task, execute_async, omit_on_join, debug)

        copies = {host: copy.deepcopy(task) for host in self._runtimes}
        return self._map(
            lambda runtime: runtime.execute_task(copies[runtime.host], execute_async, omit_on_join, debug)
        )

    def send_file(
        self, local_path: str, remote_path: str | None = None, execute_async: bool = True
    ) -> list[RuntimeTask]:
        """Copy a local file or folder to every runtime and return one task per runtime."""
        task = RuntimeTask("send-file").send_file(local_path, remote_path)
        tasks = self.execute_task(task, broadcast=True, execute_async=execute_async)
        assert isinstance(tasks, list)
        return tasks

    def join(self) -> None:
        """Wait for the tasks of every runtime, then raise the first failure, if any."""
        errors = self._map(_join_runtime)
        for error in errors:
            if error is not None:
                raise error

    def clear_tasks(self) -> None:
        for runtime in self._runtimes.values():
            runtime.clear_tasks()

    @property
    def task_processes(self) -> list[Any]:
        return [process for runtime in self._runtimes.values() for process in runtime.task_processes]

    @property
    def function_returns(self) -> Iterator[Any]:
        """Generator of every runtime's function return values, runtime by runtime."""
        for runtime in list(self._runtimes.values()):
            yield from runtime.function_returns

    def print_log(self) -> None:
        for runtime in self._runtimes.values():
            runtime.print_log()

    # --- ports ------------------------------------------------------------------------

    def has_free_port(self, port: int, exclude_hosts: str | list[str] | None = None) -> bool:
        """Return whether `port` is free on every runtime not excluded."""
        port = validate_port(port)
        runtimes = self.get_runtimes(exclude_hosts=exclude_hosts).values()
        return all(self._map(lambda runtime: runtime.has_free_port(port), runtimes))

    def get_free_port(self, ports: list[int], enforce_check_on_localhost: bool = False) -> int:
        """Return the first port of `ports` free on every runtime (and on the manager if enforced)."""
        return self._first_free_port(check_ports(ports), self.runtimes, enforce_check_on_localhost)

    def _first_free_port(
        self, ports: list[int], runtimes: Iterable[Runtime], check_manager: bool
    ) -> int:
        if not ports:
            raise NoPortsLeftError("No port to choose from: pass a non-empty port list.")
        # One ports_in_use call per host for the whole list, all hosts in parallel.
        in_use: set[int] = set()
        for ports_taken in self._map(lambda runtime: runtime.transport.ports_in_use(ports), runtimes):
            in_use |= ports_taken
        if check_manager:
            in_use |= manager_transport().ports_in_use(ports)

        for port in ports:
            if port not in in_use:
                return port
        raise NoPortsLeftError(
            f"None of the {len(ports)} ports from {ports[0]} to {ports[-1]} is free on every "
            f"host of the group {self.hosts}. Pass other ports or free some of these."
        )

    def expose_port_to_runtimes(
        self,
        local_port: int,
        runtime_port: int | list[int] | None = None,
        exclude_hosts: str | list[str] | None = None,
    ) -> int:
        """Make the manager's `local_port` reachable on every runtime and return the runtime port used.

        A list of runtime ports picks the first one free on all of them.
        """
        local_port = validate_port(local_port, "local_port")
        runtimes = list(self.get_runtimes(exclude_hosts=exclude_hosts).values())
        port = self._choose_group_port(local_port if runtime_port is None else runtime_port, runtimes)
        keys = self._open_all(lambda runtime: runtime._expose_to_runtime(local_port, port, False), runtimes)
        logger.info("Exposed manager port %d to port %d of %d runtimes", local_port, port, len(keys))
        return port

    def expose_port_from_runtime_to_group(
        self, host: str, runtime_port: int, group_port: int | list[int] | None = None
    ) -> int:
        """Make port `runtime_port` of `host` reachable on every other runtime and return the group port.

        The traffic goes through the manager. `group_port` defaults to
        `runtime_port`. A list picks the first one free on all other runtimes.
        """
        source = self.get_runtime(check_host(host))
        runtime_port = validate_port(runtime_port, "runtime_port")
        others = [runtime for runtime in self._runtimes.values() if runtime is not source]
        port = self._choose_group_port(runtime_port if group_port is None else group_port, others)

        manager_port = self._manager_side_port(source, runtime_port, port)
        source_key = source._expose_from_runtime(runtime_port, manager_port, False)
        try:
            self._open_all(lambda runtime: runtime._expose_to_runtime(manager_port, port, False), others)
        except BaseException:
            source.stop_process(source_key)
            raise
        logger.info(
            "Exposed host %s port %d to the group at port %d via manager port %d",
            source.host, runtime_port, port, manager_port,
        )
        return port

    def _choose_group_port(self, requested: int | list[int], runtimes: list[Runtime]) -> int:
        if isinstance(requested, int) and not isinstance(requested, bool):
            port = validate_port(requested)
            if not all(self._map(lambda runtime: runtime.has_free_port(port), runtimes)):
                raise PortInUseError(port, group=self)
            return port
        return self._first_free_port(check_ports(requested), runtimes, check_manager=False)

    def _manager_side_port(self, source: Runtime, runtime_port: int, group_port: int) -> int:
        """Return the group port when it is free on the manager, else the first free internal port."""
        if source.is_manager:
            return runtime_port
        candidates = [group_port, *(port for port in INTERNAL_PORT_RANGE if port != group_port)]
        in_use = manager_transport().ports_in_use(candidates)
        for port in candidates:
            if port not in in_use:
                return port
        raise NoPortsLeftError(
            f"No manager port is free for a tunnel from host {source.host!r}: port {group_port} "
            f"and ports {INTERNAL_PORT_RANGE.start}-{INTERNAL_PORT_RANGE.stop - 1} are all in use."
        )

    def _open_all(self, open_one: Callable[[Runtime], str], runtimes: list[Runtime]) -> list[str]:
        """Open one tunnel per runtime in parallel. If any fails, close those that opened and raise."""
        outcomes = self._map(lambda runtime: _attempt(open_one, runtime), runtimes)
        failures = [outcome for outcome in outcomes if isinstance(outcome, BaseException)]
        if failures:
            for runtime, outcome in zip(runtimes, outcomes, strict=True):
                if isinstance(outcome, str):
                    runtime.stop_process(outcome)
            raise failures[0]
        return [outcome for outcome in outcomes if isinstance(outcome, str)]

    # --- cleanup --------------------------------------------------------------------

    def cleanup(self) -> None:
        """Clean up every runtime in parallel. Calling it twice is harmless."""
        self._map(_cleanup_quietly)


def _attempt(function: Callable[[Runtime], str], runtime: Runtime) -> str | BaseException:
    try:
        return function(runtime)
    except (LazyclusterError, OSError, ValueError) as error:
        return error


def _join_runtime(runtime: Runtime) -> BaseException | None:
    try:
        runtime.join()
    except LazyclusterError as error:
        return error
    return None


def _cleanup_quietly(runtime: Runtime) -> None:
    try:
        runtime.cleanup()
    except Exception:
        logger.warning("Cleanup of runtime %s failed", runtime.host, exc_info=True)


def _unique(hosts: list[str], name: str) -> list[str]:
    duplicates = sorted({host for host in hosts if hosts.count(host) > 1})
    if duplicates:
        raise ValueError(f"Invalid {name}: hosts {duplicates} appear more than once. List each host once.")
    if not hosts:
        raise ValueError(f"Invalid {name}: the list is empty. Pass at least one host.")
    return hosts


def _check_runtimes(runtimes: object) -> list[Runtime]:
    if isinstance(runtimes, Runtime) or not isinstance(runtimes, Iterable):
        raise TypeError(f"Invalid runtimes {runtimes!r}: expected a list of Runtime objects.")
    runtime_list = list(runtimes)
    for runtime in runtime_list:
        if not isinstance(runtime, Runtime):
            raise TypeError(f"Invalid runtime {runtime!r} in runtimes: expected a Runtime.")
    _unique([runtime.host for runtime in runtime_list], "runtimes")
    return runtime_list


def _connect_all(hosts: list[str], working_dir: str | None) -> list[Runtime]:
    """Create one Runtime per host in parallel. If any fails, clean up the others and raise."""

    def connect(host: str) -> Runtime | BaseException:
        try:
            return Runtime(host, working_dir=working_dir)
        except (LazyclusterError, OSError) as error:
            return error

    outcomes = get_backend().clock.map(connect, hosts)
    failures = [outcome for outcome in outcomes if isinstance(outcome, BaseException)]
    if failures:
        for outcome in outcomes:
            if isinstance(outcome, Runtime):
                outcome.cleanup()
        raise failures[0]
    return [outcome for outcome in outcomes if isinstance(outcome, Runtime)]
