"""A Dask cluster on a `RuntimeGroup`: the scheduler on the manager, workers on the runtimes.

Every Dask process listens on 127.0.0.1 only. SSH tunnels carry all traffic:
the scheduler port is forwarded to every runtime, and each worker port to the
manager and to every other runtime, so every process reaches every other at
tcp://127.0.0.1:<port> and only SSH has to be open between the machines.

    with DaskCluster(RuntimeManager().create_group()) as cluster:
        client = cluster.get_client()
"""

from __future__ import annotations

import logging
import math
import posixpath
import sys
import threading
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from importlib.util import find_spec
from typing import TYPE_CHECKING, Any

from lazycluster.cluster.dask_commands import (
    LOOPBACK,
    PYTHON_ON_HOST,
    bind_failed,
    dashboard_port_in_log,
    scheduler_command,
    scheduler_serves,
    tcp_address,
    worker_command,
)
from lazycluster.cluster.exceptions import MasterStartError
from lazycluster.cluster.ports import (
    find_busy_ports,
    find_taken_ports,
    pick_free_ports,
    remote_transports,
    require_free_port,
    validate_port_list,
)
from lazycluster.cluster.registration import (
    LOG_POLL_INTERVAL,
    read_tail,
    wait_for_registration,
)
from lazycluster.cluster.runtime_cluster import (
    MasterLauncher,
    MasterWorkerCluster,
    WorkerLauncher,
    WorkerProcess,
    check_worker_count,
)
from lazycluster.cluster.versions import check_distributed_versions
from lazycluster.exceptions import (
    LazyclusterError,
    NoPortsLeftError,
    PortInUseError,
    TransportError,
)
from lazycluster.transport import ProcessHandle, Transport, validate_port

if TYPE_CHECKING:
    from distributed import Client

    from lazycluster.runtime_mgmt import RuntimeGroup

logger = logging.getLogger(__name__)

# Candidates for the scheduler's dashboard, which only the manager must have free.
DASHBOARD_PORTS = range(8787, 8797)

# Ports of a list the scheduler tries when another program takes each one
# between the port check and the bind, before start() gives up.
MAX_BIND_ATTEMPTS = 3

# The scheduler of distributed 2026.8 serves its dashboard only with bokeh.
DASHBOARD_MODULE = "bokeh"

# Ports one worker tries, each found taken between the port check and the
# bind, before the start gives up with NoPortsLeftError.
MAX_PORT_ATTEMPTS = 3


@dataclass(frozen=True)
class PlacedWorker:
    """A worker to start: its index, runtime and port, the ports it tried so far and its host's share."""

    index: int
    runtime: Any
    port: int
    tried: tuple[int, ...]
    # Workers on the runtime's host, which share its CPU cores.
    workers_on_host: int

    def on_port(self, port: int) -> PlacedWorker:
        """Return this worker moved to `port`."""
        return replace(self, port=port, tried=(*self.tried, port))


def validate_timeout(timeout: Any, name: str = "timeout") -> float:
    """Return `timeout` as a positive number of seconds, or raise TypeError/ValueError."""
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
        raise TypeError(f"Invalid {name} {timeout!r}: expected a number of seconds.")
    if not math.isfinite(timeout) or timeout <= 0:
        raise ValueError(
            f"Invalid {name} {timeout!r}: expected a finite number of seconds above 0."
        )
    return float(timeout)


class LocalMasterLauncher(MasterLauncher):
    """Starts the Dask scheduler on the manager, bound to 127.0.0.1.

    The scheduler counts as started once its port is in use on the manager
    and its log says it serves there. Its port is then forwarded to every
    runtime.
    `process` is the transport's process handle, not a `subprocess.Popen`.
    """

    def __init__(self, runtime_group: RuntimeGroup) -> None:
        """Keep the group whose workers will use this scheduler."""
        super().__init__(runtime_group)
        self._dashboard_port: int | None = None
        self._launched_at = 0.0

    @property
    def dashboard_port(self) -> int | None:
        """The dashboard's port on the manager, or None without a dashboard."""
        return self._dashboard_port

    # The documented public signature has no `debug` argument, and
    # MasterWorkerCluster never passes one.
    def start(self, ports: list[int] | int, timeout: int = 3) -> list[int]:  # type: ignore[override]
        """Start the scheduler on the first free port of `ports` and forward it to every runtime.

        A single port in use anywhere in the group or on the manager raises
        PortInUseError. A list without a port free everywhere raises
        NoPortsLeftError. A scheduler that exits, or does not listen within
        `timeout` seconds, raises MasterStartError. Returns the list after the
        chosen port, or [] for a single port.
        """
        timeout_seconds = validate_timeout(timeout)
        single = isinstance(ports, int) and not isinstance(ports, bool)
        pending = ports
        for attempt in range(1, MAX_BIND_ATTEMPTS + 1):
            remaining = self.launch(pending)
            port = self._port
            try:
                self.wait_until_serving(timeout_seconds)
                return remaining
            except PortInUseError as error:
                if single:
                    raise
                if attempt == MAX_BIND_ATTEMPTS:
                    raise MasterStartError(
                        self.manager.host,
                        port,
                        f"the scheduler failed to bind {attempt} free ports in a row",
                        error,
                    ) from error
                logger.info(
                    "Port %s on host %s was taken during the scheduler start; trying the next port",
                    port,
                    self.manager.host,
                )
                pending = remaining
        raise AssertionError("unreachable: the last attempt returns or raises")

    def launch(self, ports: list[int] | int) -> list[int]:
        """Start the scheduler process on the first free port of `ports` without waiting for it.

        The port is forwarded to every runtime at once, so workers started
        while the scheduler boots find it there; `wait_until_serving()` must
        follow. Raises PortInUseError or NoPortsLeftError like `start()`.
        Returns the list after the chosen port, or [] for a single port.
        """
        if self._process is not None and self._process.is_alive:
            raise LazyclusterError(
                f"The scheduler already runs at port {self._port}. Call cleanup() before "
                "launch() or start()."
            )
        single = isinstance(ports, int) and not isinstance(ports, bool)
        candidates = [validate_port(ports)] if single else validate_port_list(ports)

        for attempt in range(1, MAX_BIND_ATTEMPTS + 1):
            port, remaining = self._launch_on_free_port(candidates, single)
            try:
                self._expose_to_runtimes(self.manager, port)
                return remaining
            except (PortInUseError, TransportError) as error:
                self.cleanup()
                # A lost connection is no port problem. A rejected forward is
                # one: another program, often a second cluster starting on the
                # same hosts, took the port on a host after the port check.
                if type(error) not in (PortInUseError, TransportError):
                    raise
                if single:
                    raise PortInUseError(
                        port, where="a host, taken while the scheduler started"
                    ) from error
                if attempt == MAX_BIND_ATTEMPTS:
                    raise MasterStartError(
                        self.manager.host,
                        port,
                        f"the scheduler's port was taken on a host {attempt} times in a row",
                        error,
                    ) from error
                logger.info(
                    "Scheduler port %d was taken on a host before its forward opened (%s); "
                    "trying the next port",
                    port,
                    error,
                )
                candidates = remaining
            except BaseException:
                self.cleanup()
                raise
        raise AssertionError("unreachable: the last attempt returns or raises")

    def _launch_on_free_port(self, candidates: list[int], single: bool) -> tuple[int, list[int]]:
        """Start the scheduler process on the first port of `candidates` free everywhere.

        Returns the port and the candidates after it ([] for a single port).
        """
        manager = self.manager
        dashboard_candidates = list(DASHBOARD_PORTS) if find_spec(DASHBOARD_MODULE) else []
        busy = find_busy_ports(
            [manager, *remote_transports(self._group)], [*candidates, *dashboard_candidates]
        )
        if single:
            port, remaining = candidates[0], list[int]()
            require_free_port(port, busy, self._group)
        else:
            [port], remaining = pick_free_ports(candidates, 1, busy)
        dashboard = self._pick_dashboard(dashboard_candidates, busy, port)

        self._launched_at = manager.clock.monotonic()
        self._process = manager.start_process(scheduler_command(port, dashboard))
        self._port, self._dashboard_port = port, dashboard
        return port, remaining

    def wait_until_serving(self, timeout: float) -> None:
        """Wait until the scheduler that `launch()` started serves, bounded by `timeout` seconds.

        Raises PortInUseError when another program took the port before the
        scheduler bound it, and MasterStartError when the scheduler exits or
        does not listen in time. Either error stops the scheduler and closes
        its tunnels first.
        """
        timeout = validate_timeout(timeout)
        process, port = self._process, self._port
        if process is None or port is None:
            raise LazyclusterError("The scheduler is not launched. Call launch() first.")
        manager = self.manager
        try:
            self._wait_until_listening(manager, process, port, timeout)
            if self._dashboard_port is not None:
                self._dashboard_port = (
                    dashboard_port_in_log(process.read_log()) or self._dashboard_port
                )
        except BaseException:
            self.cleanup()
            raise
        logger.info(
            "Scheduler started on host %s at %s in %.1f s (dashboard port %s)",
            manager.host,
            tcp_address(port),
            manager.clock.monotonic() - self._launched_at,
            self._dashboard_port,
        )

    def _pick_dashboard(
        self, candidates: list[int], busy: dict[str, set[int]], port: int
    ) -> int | None:
        """Return the first dashboard candidate free on the manager, other than `port`."""
        used = busy[self.manager.host]
        return next(
            (candidate for candidate in candidates if candidate != port and candidate not in used),
            None,
        )

    @staticmethod
    def _wait_until_listening(
        manager: Transport, process: ProcessHandle, port: int, timeout: float
    ) -> None:
        """Wait until the scheduler serves at `port` or exits.

        Serving means: its port is in use on the manager and its log says it
        serves there, so a program that took the port first does not count.
        Raises PortInUseError when the port was taken before the scheduler
        could bind it, and MasterStartError for every other failure.
        """

        def serves() -> bool:
            return port in manager.ports_in_use([port]) and scheduler_serves(
                process.read_log(), port
            )

        def serving_or_exited() -> bool:
            return not process.is_alive or serves()

        manager.clock.wait_until(serving_or_exited, timeout, interval=LOG_POLL_INTERVAL)

        code = process.poll()
        if code is None and serves():
            return
        tail = read_tail(process)
        # The whole log, because the EADDRINUSE error comes first in a chained
        # traceback that is longer than the tail.
        if code is not None and bind_failed(process.read_log()):
            raise PortInUseError(
                port, where=f"host {manager.host!r}, taken while the scheduler started"
            )
        if code is not None:
            cause = f"the scheduler exited with code {code}"
        else:
            cause = f"the scheduler did not listen within {timeout:g} s"
        raise MasterStartError(manager.host, port, cause, log_tail=tail)

    def _expose_to_runtimes(self, manager: Transport, port: int) -> None:
        """Forward the scheduler port to every remote runtime, one request per host in parallel."""
        remotes = remote_transports(self._group)

        def expose(transport: Transport) -> None:
            self._tunnels.extend(transport.forward_remote([(port, port)]))

        manager.clock.map(expose, remotes)
        if remotes:
            logger.info(
                "Scheduler port %d forwarded to hosts %s", port, ", ".join(t.host for t in remotes)
            )

    def cleanup(self) -> None:
        """Close the scheduler's tunnels and stop it. Calling it twice is harmless."""
        super().cleanup()
        self._dashboard_port = None


class RoundRobinLauncher(WorkerLauncher):
    """Starts Dask workers so that worker i runs on runtime i mod N of the group.

    The runtimes' worker counts therefore differ by at most one. Each worker
    gets the host's CPU cores divided by the number of workers on that host as
    threads, at least one.
    """

    # Seconds a worker waits for the scheduler before it exits; also how soon
    # workers exit by themselves after the manager died.
    death_timeout: float = 60.0

    def __init__(self, runtime_group: RuntimeGroup) -> None:
        """Keep the group in which the workers will be started."""
        super().__init__(runtime_group)
        self._next_index = 0
        self._version_checked_hosts: set[str] = set()
        self._start_lock = threading.Lock()
        # The ports each worker index has tried, for the bound of MAX_PORT_ATTEMPTS.
        self._tried_ports: dict[int, tuple[int, ...]] = {}

    # The documented public signature has no `debug` argument, and
    # MasterWorkerCluster never passes one.
    def start(  # type: ignore[override]
        self, worker_count: int, master_port: int, ports: list[int]
    ) -> list[int]:
        """Start `worker_count` workers on ports of `ports` that are free everywhere.

        Checks the hosts' `distributed` version first (VersionMismatchError).
        Raises NoPortsLeftError, before starting anything, when too few ports
        are free. A worker whose port is taken before its tunnels open moves
        to the next free port, up to MAX_PORT_ATTEMPTS ports per worker.
        Returns the list after the last port used.
        """
        check_worker_count(worker_count)
        master_port = validate_port(master_port, "master_port")
        candidates = validate_port_list(ports)
        runtimes = list(self._group.runtimes)
        if not runtimes:
            raise ValueError("The runtime group is empty: add a runtime before starting workers.")

        with self._start_lock:
            self._check_versions(runtimes)

            manager = self.manager
            busy = find_busy_ports([manager, *remote_transports(self._group)], candidates)
            chosen, remaining = pick_free_ports(
                candidates, worker_count, busy, exclude=[master_port]
            )
            indexes = range(self._next_index, self._next_index + len(chosen))
            runtime_of = {index: self.choose_runtime(index, runtimes) for index in indexes}
            per_host = Counter(runtime.host for runtime in runtime_of.values())
            placement = [
                PlacedWorker(
                    index, runtime_of[index], port, (port,), per_host[runtime_of[index].host]
                )
                for index, port in zip(indexes, chosen, strict=True)
            ]
            self._next_index += len(chosen)
            return self._start_placed(manager, master_port, placement, remaining)

    def check_versions(self) -> None:
        """Raise VersionMismatchError when a runtime's `distributed` differs from the manager's.

        `start()` runs the same check. Each host is checked once per launcher.
        """
        with self._start_lock:
            self._check_versions(list(self._group.runtimes))

    def _check_versions(self, runtimes: list[Any]) -> None:
        unchecked = [r for r in runtimes if r.host not in self._version_checked_hosts]
        check_distributed_versions(unchecked)
        self._version_checked_hosts.update(runtime.host for runtime in unchecked)

    def choose_runtime(self, index: int, runtimes: list[Any]) -> Any:
        """Return the runtime for worker `index`: runtime index mod N.

        Subclasses override this to place workers by another rule.
        """
        return runtimes[index % len(runtimes)]

    def restart_on_new_ports(
        self, workers: Sequence[WorkerProcess], master_port: int, ports: list[int]
    ) -> tuple[list[WorkerProcess], list[int]]:
        """Start exited `workers` again, each on the next free port of `ports`, on the same host.

        For workers whose port another program took between the port check and
        the worker's bind. Returns the new workers and the list after the last
        port used. Raises NoPortsLeftError when a worker has tried
        MAX_PORT_ATTEMPTS ports or `ports` has too few free ones.
        """
        master_port = validate_port(master_port, "master_port")
        candidates = validate_port_list(ports)
        with self._start_lock:
            manager = self.manager
            runtime_of = {runtime.host: runtime for runtime in self._group.runtimes}
            self._discard(workers, [])
            self._close_worker_tunnels({worker.port for worker in workers})

            hosts = Counter(worker.host for worker in self._workers)
            hosts.update(worker.host for worker in workers)
            placement = [
                PlacedWorker(
                    worker.index,
                    runtime_of[worker.host],
                    worker.port,
                    self._tried_ports.get(worker.index, (worker.port,)),
                    hosts[worker.host],
                )
                for worker in workers
            ]
            placement, remaining = self._move_to_free_ports(
                manager, master_port, placement, placement, candidates, "its process exited"
            )
            remaining = self._start_placed(manager, master_port, placement, remaining)
            moved = {placed.index for placed in placement}
        return [worker for worker in self.workers if worker.index in moved], remaining

    def cleanup(self) -> None:
        """Stop every worker and close every worker tunnel. Calling it twice is harmless.

        The next start places its first worker on the first runtime again.
        """
        super().cleanup()
        self._tried_ports.clear()
        self._next_index = 0

    def _start_placed(
        self,
        manager: Transport,
        master_port: int,
        placement: list[PlacedWorker],
        remaining: list[int],
    ) -> list[int]:
        """Open the placed workers' tunnels, then start the workers in parallel; undo all on failure.

        The tunnels come first so that they hold each worker port on every
        machine but the worker's own before any worker opens connections, whose
        local ports the system picks from a range that may contain worker
        ports. Returns the list after the last port used.
        """
        workers_before, tunnels_before = list(self._workers), list(self._tunnels)
        try:
            # A Runtime creates its temporary working directory on first use; doing
            # that once per runtime here keeps parallel worker starts from racing.
            runtimes = list({placed.runtime.host: placed.runtime for placed in placement}.values())
            manager.clock.map(lambda runtime: runtime.working_dir, runtimes)

            placement, remaining = self._open_mesh(manager, master_port, placement, remaining)
            manager.clock.map(lambda placed: self._start_worker(placed, master_port), placement)
            self._rebuild_ports_per_host()
            for placed in placement:
                self._tried_ports[placed.index] = placed.tried
        except BaseException:
            known_workers = {id(worker) for worker in workers_before}
            known_tunnels = {id(tunnel) for tunnel in tunnels_before}
            self._discard(
                [worker for worker in self._workers if id(worker) not in known_workers],
                [tunnel for tunnel in self._tunnels if id(tunnel) not in known_tunnels],
            )
            raise
        return remaining

    def _open_mesh(
        self,
        manager: Transport,
        master_port: int,
        placement: list[PlacedWorker],
        remaining: list[int],
    ) -> tuple[list[PlacedWorker], list[int]]:
        """Open every forward of the placed workers, moving workers whose port was taken meanwhile.

        Returns the placement with the ports finally used and the list after
        the last of them.
        """
        transports = {transport.host: transport for transport in remote_transports(self._group)}
        while True:
            ports_by_host = self.ports_per_host
            for placed in placement:
                ports_by_host.setdefault(placed.runtime.host, []).append(placed.port)
            rejected = self._open_worker_tunnels(ports_by_host)
            if not rejected:
                return placement, remaining

            taken = find_taken_ports(rejected, manager, transports)
            moving = [placed for placed in placement if placed.port in taken]
            if not moving:
                raise rejected[0].error
            self._close_worker_tunnels({placed.port for placed in moving})
            placement, remaining = self._move_to_free_ports(
                manager, master_port, placement, moving, remaining, "a forward was rejected"
            )

    def _move_to_free_ports(
        self,
        manager: Transport,
        master_port: int,
        placement: list[PlacedWorker],
        moving: list[PlacedWorker],
        candidates: list[int],
        reason: str,
    ) -> tuple[list[PlacedWorker], list[int]]:
        """Give each worker of `moving` the next port of `candidates` that is free everywhere.

        Checks `candidates` with one ports_in_use call per machine. Returns the
        new placement and the candidates after the last port chosen.
        """
        for placed in moving:
            if len(placed.tried) >= MAX_PORT_ATTEMPTS:
                raise NoPortsLeftError(
                    f"Failed to start worker {placed.index} on host {placed.runtime.host!r}: "
                    f"each of its ports {list(placed.tried)} was taken on some machine between "
                    "the port check and the bind. Pass ports outside the ephemeral port range "
                    "(/proc/sys/net/ipv4/ip_local_port_range on Linux) or free these ports."
                )

        in_use = {master_port, *(worker.port for worker in self._workers)}
        in_use.update(placed.port for placed in placement)
        busy = find_busy_ports([manager, *remote_transports(self._group)], candidates)
        ports, remaining = pick_free_ports(candidates, len(moving), busy, exclude=in_use)

        new_port = {placed.index: port for placed, port in zip(moving, ports, strict=True)}
        for placed in moving:
            logger.info(
                "Port %d of worker %d on host %s was taken (%s); retrying on port %d",
                placed.port,
                placed.index,
                placed.runtime.host,
                reason,
                new_port[placed.index],
            )
        moved = [
            placed.on_port(new_port[placed.index]) if placed.index in new_port else placed
            for placed in placement
        ]
        return moved, remaining

    def _start_worker(self, placed: PlacedWorker, master_port: int) -> None:
        index, runtime, port = placed.index, placed.runtime, placed.port
        workers_on_host = placed.workers_on_host
        transport = runtime.transport
        python = sys.executable if transport.is_local else PYTHON_ON_HOST
        name = f"{runtime.host}-worker-{index}"
        nthreads = max(1, int(runtime.cpu_cores or 1) // workers_on_host)
        argv = worker_command(python, master_port, port, nthreads, name, self.death_timeout)

        # Dask's scratch space goes into the working directory, which the
        # Runtime removes at cleanup when it created it.
        working_dir = runtime.working_dir
        env = {**(runtime.env_variables or {}), "DASK_TEMPORARY_DIRECTORY": working_dir}
        log_path = posixpath.join(working_dir, f"dask-worker-{port}.log")
        process = transport.start_process(argv, env=env, cwd=working_dir, log_path=log_path)

        with self._lock:
            self._workers.append(WorkerProcess(index, name, runtime.host, port, process))
        logger.info(
            "Worker %d started on host %s at %s with %d thread(s) (pid %d, log %s)",
            index,
            runtime.host,
            tcp_address(port),
            nthreads,
            process.pid,
            log_path,
        )


class DaskCluster(MasterWorkerCluster):
    """A Dask cluster in a `RuntimeGroup`, with the scheduler on the manager.

    The worker count defaults to the number of runtimes. Unless other
    launchers are given, `RoundRobinLauncher` spreads the workers evenly and
    `LocalMasterLauncher` starts the scheduler. `start()` returns once every worker has registered with the
    scheduler. Used in a with-block, the cluster starts on entry (unless it
    runs already) and is cleaned up on exit.
    """

    DEFAULT_MASTER_PORT = 8786

    # Seconds `start_workers()` waits for the workers to register.
    worker_start_timeout: float = 60.0

    def __init__(
        self,
        runtime_group: RuntimeGroup,
        ports: list[int] | None = None,
        master_launcher: MasterLauncher | None = None,
        worker_launcher: WorkerLauncher | None = None,
    ) -> None:
        """Prepare a Dask cluster on `runtime_group`; nothing starts before `start()`.

        `ports` defaults to DEFAULT_PORT_RANGE_START up to, not including,
        DEFAULT_PORT_RANGE_END. Without launchers, `LocalMasterLauncher` and
        `RoundRobinLauncher` are used.
        """
        super().__init__(runtime_group, ports, master_launcher, worker_launcher)
        self._clients: list[Client] = []

    def _default_master_launcher(self, runtime_group: RuntimeGroup) -> MasterLauncher:
        return LocalMasterLauncher(runtime_group)

    def _default_worker_launcher(self, runtime_group: RuntimeGroup) -> WorkerLauncher:
        return RoundRobinLauncher(runtime_group)

    @property
    def scheduler_address(self) -> str | None:
        """The scheduler's address on the manager, like tcp://127.0.0.1:8786, or None."""
        port = self.master_port
        return None if port is None else tcp_address(port)

    @property
    def dashboard_link(self) -> str | None:
        """The URL of the scheduler's dashboard on the manager, or None without one."""
        port = getattr(self._master_launcher, "dashboard_port", None)
        if port is None or self.master_port is None:
            return None
        return f"http://{LOOPBACK}:{port}/status"

    def _start_master_and_workers(
        self, worker_count: int | None, master_port: int | None, debug: bool
    ) -> None:
        """Start the workers while the scheduler boots, when both default launchers are used.

        Measured on the Docker test hosts, the scheduler needs about 0.6 s to
        import and start, and a worker about 0.35 s, so running them side by
        side shortens `start()`. The scheduler's port is forwarded to the
        runtimes before any worker starts, so a worker that is up first retries
        until the scheduler listens. When another program takes the scheduler's
        port during its boot, everything started is stopped and the start runs
        again, the scheduler first and then the workers.
        """
        master = self._master_launcher
        if (
            debug
            or not isinstance(master, LocalMasterLauncher)
            or not isinstance(self._worker_launcher, RoundRobinLauncher)
        ):
            super()._start_master_and_workers(worker_count, master_port, debug)
            return

        # Bad timeouts fail here, before anything runs.
        validate_timeout(self.master_start_timeout, "master_start_timeout")
        validate_timeout(self.worker_start_timeout, "worker_start_timeout")
        # The versions are known since the runtimes connected, so a mismatch
        # fails here, before the scheduler starts.
        self._worker_launcher.check_versions()
        ports_before = list(self._ports)
        if master_port is not None:
            master.launch(validate_port(master_port, "master_port"))
        else:
            try:
                master.launch(self.DEFAULT_MASTER_PORT)
            except PortInUseError as error:
                logger.info(
                    "Default scheduler port %d is taken (%s), so the scheduler starts on a "
                    "port of the port list",
                    self.DEFAULT_MASTER_PORT,
                    error.where,
                )
                self._ports = master.launch(self._ports)

        workers_before = self._worker_launcher.workers
        MasterWorkerCluster.start_workers(self, worker_count)
        try:
            master.wait_until_serving(self.master_start_timeout)
        except PortInUseError as error:
            if master_port is not None:
                raise
            logger.info(
                "Scheduler port %s was taken during the scheduler's start, so the start runs "
                "again with the scheduler first",
                error.port,
            )
            self._worker_launcher.cleanup()
            self._ports = ports_before
            super()._start_master_and_workers(worker_count, master_port, debug)
            return
        self._wait_for_registration(workers_before)

    def start_workers(self, count: int | None = None, debug: bool = False) -> None:
        """Start `count` workers (default: one per runtime) and wait until all have registered.

        A worker that exits because another program took its port starts
        again on the next free port of the list, within the same timeout and
        up to MAX_PORT_ATTEMPTS ports. Workers that exit otherwise, or do not
        register within `worker_start_timeout` seconds, raise WorkerStartError
        naming host, port and log tail; then all workers are stopped.
        """
        validate_timeout(self.worker_start_timeout, "worker_start_timeout")
        workers_before = self._worker_launcher.workers
        super().start_workers(count, debug=False)
        self._wait_for_registration(workers_before)
        if debug:
            self.print_log()

    def _wait_for_registration(self, workers_before: list[WorkerProcess]) -> None:
        """Wait until every worker started after `workers_before` has registered with the scheduler."""
        timeout = validate_timeout(self.worker_start_timeout, "worker_start_timeout")
        new_workers = [w for w in self._worker_launcher.workers if w not in workers_before]
        scheduler = self._master_launcher.process
        if scheduler is not None and self.master_port is not None:
            clock = self._master_launcher.manager.clock
            started_at = clock.monotonic()
            try:
                wait_for_registration(
                    scheduler, self.master_port, new_workers, timeout, clock, self._restarter()
                )
            except BaseException:
                self._worker_launcher.cleanup()
                raise
            logger.info(
                "%d worker(s) registered with the scheduler in %.1f s",
                len(new_workers),
                clock.monotonic() - started_at,
            )

    def _restarter(self) -> Callable[[list[WorkerProcess]], list[WorkerProcess]] | None:
        """Return how to restart workers whose port was taken, or None when the launcher cannot."""
        launcher = self._worker_launcher
        if not isinstance(launcher, RoundRobinLauncher):
            return None
        master_port = self.master_port
        assert master_port is not None

        def restart(workers: list[WorkerProcess]) -> list[WorkerProcess]:
            restarted, self._ports = launcher.restart_on_new_ports(
                workers, master_port, self._ports
            )
            return restarted

        return restart

    def get_client(self, timeout: int = 2) -> Client:
        """Return a `distributed.Client` connected to the scheduler.

        Raises TimeoutError when it cannot connect within `timeout` seconds.
        The cluster closes its clients at cleanup.
        """
        from distributed import Client

        validate_timeout(timeout)
        address = self.scheduler_address
        if address is None:
            raise LazyclusterError(
                "The Dask cluster is not started. Call start() before get_client()."
            )
        try:
            client = Client(address, timeout=timeout)
        except OSError as error:
            raise TimeoutError(
                f"Failed to connect to the Dask scheduler at {address} within {timeout} s. "
                "Check that the cluster still runs (print_log() shows its logs)."
            ) from error
        self._clients.append(client)
        return client

    def cleanup(self) -> None:
        """Close the clients, stop the workers and the scheduler and close every tunnel.

        Calling it twice is harmless.
        """
        clients, self._clients = self._clients, []
        for client in clients:
            try:
                client.close()
            except Exception as error:  # cleanup goes on with the processes
                logger.warning("Failed to close Dask client %s: %s", client, error)
        super().cleanup()
