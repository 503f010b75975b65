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
    pick_free_ports,
    remote_transports,
    require_free_port,
    validate_port_list,
)
from lazycluster.cluster.registration import read_tail, wait_for_registration
from lazycluster.cluster.runtime_cluster import (
    MasterLauncher,
    MasterWorkerCluster,
    WorkerLauncher,
    WorkerProcess,
    check_worker_count,
)
from lazycluster.cluster.versions import check_distributed_versions
from lazycluster.exceptions import LazyclusterError, PortInUseError
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
        if self._process is not None and self._process.is_alive:
            raise LazyclusterError(
                f"The scheduler already runs at port {self._port}. Call cleanup() before start()."
            )
        single = isinstance(ports, int) and not isinstance(ports, bool)
        candidates = [validate_port(ports)] if single else validate_port_list(ports)

        manager = self.manager
        dashboard_candidates = list(DASHBOARD_PORTS) if find_spec(DASHBOARD_MODULE) else []
        busy = find_busy_ports(
            [manager, *remote_transports(self._group)], [*candidates, *dashboard_candidates]
        )
        if single:
            port = candidates[0]
            require_free_port(port, busy, self._group)
            self._launch(
                manager,
                port,
                self._pick_dashboard(dashboard_candidates, busy, port),
                timeout_seconds,
            )
            return []

        pending = candidates
        for attempt in range(1, MAX_BIND_ATTEMPTS + 1):
            [port], remaining = pick_free_ports(pending, 1, busy)
            dashboard = self._pick_dashboard(dashboard_candidates, busy, port)
            try:
                self._launch(manager, port, dashboard, timeout_seconds)
                return remaining
            except PortInUseError as error:
                if attempt == MAX_BIND_ATTEMPTS:
                    raise MasterStartError(
                        manager.host,
                        port,
                        f"the scheduler failed to bind {attempt} free ports in a row",
                        error,
                    ) from error
                logger.info(
                    "Port %d on host %s was taken during the scheduler start; trying the next port",
                    port,
                    manager.host,
                )
                pending = remaining
        raise AssertionError("unreachable: the last attempt returns or raises")

    def _pick_dashboard(
        self, candidates: list[int], busy: dict[str, set[int]], port: int
    ) -> int | None:
        """Return the first dashboard candidate free on the manager, other than `port`."""
        used = busy[self.manager.host]
        return next(
            (candidate for candidate in candidates if candidate != port and candidate not in used),
            None,
        )

    def _launch(self, manager: Transport, port: int, dashboard: int | None, timeout: float) -> None:
        started_at = manager.clock.monotonic()
        self._process = manager.start_process(scheduler_command(port, dashboard))
        self._port, self._dashboard_port = port, dashboard
        try:
            self._wait_until_listening(manager, self._process, port, timeout)
            if dashboard is not None:
                self._dashboard_port = dashboard_port_in_log(self._process.read_log()) or dashboard
            logger.info(
                "Scheduler started on host %s at %s in %.1f s (dashboard port %s)",
                manager.host,
                tcp_address(port),
                manager.clock.monotonic() - started_at,
                self._dashboard_port,
            )
            self._expose_to_runtimes(manager, port)
        except BaseException:
            self.cleanup()
            raise

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

        manager.clock.wait_until(serving_or_exited, timeout)

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

    # The documented public signature has no `debug` argument, and
    # MasterWorkerCluster never passes one.
    def start(  # type: ignore[override]
        self, worker_count: int, master_port: int, ports: list[int]
    ) -> list[int]:
        """Start `worker_count` workers on ports of `ports` that are free everywhere.

        Checks the hosts' `distributed` version first (VersionMismatchError).
        Raises NoPortsLeftError, before starting anything, when too few ports
        are free. Returns the list after the last port used.
        """
        check_worker_count(worker_count)
        master_port = validate_port(master_port, "master_port")
        candidates = validate_port_list(ports)
        runtimes = list(self._group.runtimes)
        if not runtimes:
            raise ValueError("The runtime group is empty: add a runtime before starting workers.")

        with self._start_lock:
            unchecked = [r for r in runtimes if r.host not in self._version_checked_hosts]
            check_distributed_versions(unchecked)
            self._version_checked_hosts.update(runtime.host for runtime in unchecked)

            manager = self.manager
            busy = find_busy_ports([manager, *remote_transports(self._group)], candidates)
            chosen, remaining = pick_free_ports(
                candidates, worker_count, busy, exclude=[master_port]
            )
            placement = [
                (index, self.choose_runtime(index, runtimes), port)
                for index, port in enumerate(chosen, start=self._next_index)
            ]
            self._next_index += len(chosen)
            self._start_placed(manager, master_port, placement)
        return remaining

    def choose_runtime(self, index: int, runtimes: list[Any]) -> Any:
        """Return the runtime for worker `index`: runtime index mod N.

        Subclasses override this to place workers by another rule.
        """
        return runtimes[index % len(runtimes)]

    def _start_placed(self, manager: Transport, master_port: int, placement: list[Any]) -> None:
        """Start the placed workers in parallel and open their tunnels; undo all on failure."""
        workers_before, tunnels_before = list(self._workers), list(self._tunnels)
        per_host = Counter(runtime.host for _, runtime, _ in placement)
        try:
            # A Runtime creates its temporary working directory on first use; doing
            # that once per runtime here keeps parallel worker starts from racing.
            runtimes = list({runtime.host: runtime for _, runtime, _ in placement}.values())
            manager.clock.map(lambda runtime: runtime.working_dir, runtimes)

            manager.clock.map(
                lambda item: self._start_worker(
                    item[0], item[1], item[2], master_port, per_host[item[1].host]
                ),
                placement,
            )
            self._rebuild_ports_per_host()
            self.setup_worker_ssh_tunnels()
        except BaseException:
            known_workers = {id(worker) for worker in workers_before}
            known_tunnels = {id(tunnel) for tunnel in tunnels_before}
            self._discard(
                [worker for worker in self._workers if id(worker) not in known_workers],
                [tunnel for tunnel in self._tunnels if id(tunnel) not in known_tunnels],
            )
            raise

    def _start_worker(
        self, index: int, runtime: Any, port: int, master_port: int, workers_on_host: int
    ) -> None:
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

    def start_workers(self, count: int | None = None, debug: bool = False) -> None:
        """Start `count` workers (default: one per runtime) and wait until all have registered.

        Workers that exit or do not register within `worker_start_timeout`
        seconds raise WorkerStartError naming host, port and log tail; then all
        workers are stopped.
        """
        timeout = validate_timeout(self.worker_start_timeout, "worker_start_timeout")
        workers_before = self._worker_launcher.workers
        super().start_workers(count, debug=False)
        new_workers = [w for w in self._worker_launcher.workers if w not in workers_before]

        scheduler = self._master_launcher.process
        if scheduler is not None and self.master_port is not None:
            clock = self._master_launcher.manager.clock
            started_at = clock.monotonic()
            try:
                wait_for_registration(scheduler, self.master_port, new_workers, timeout, clock)
            except BaseException:
                self._worker_launcher.cleanup()
                raise
            logger.info(
                "%d worker(s) registered with the scheduler in %.1f s",
                len(new_workers),
                clock.monotonic() - started_at,
            )
        if debug:
            self.print_log()

    def get_client(self, timeout: int = 2) -> Client:
        """Return a `distributed.Client` connected to the scheduler.

        Raises TimeoutError when it cannot connect within `timeout` seconds.
        The cluster closes its clients at cleanup.
        """
        from distributed import Client

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
