"""Generic clusters on a `RuntimeGroup`: a master process plus worker processes.

`MasterLauncher` starts the master, `WorkerLauncher` the workers, and
`MasterWorkerCluster` drives both: choose ports, start the master, start the
workers, and stop everything again on failure, on `cleanup()` and at
interpreter exit. `lazycluster.cluster.dask_cluster` builds the Dask cluster
on these classes.
"""

from __future__ import annotations

import atexit
import logging
import threading
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence, Set
from dataclasses import dataclass
from typing import TYPE_CHECKING

from lazycluster.cluster.ports import (
    manager_transport,
    remote_transports,
    validate_port_list,
)
from lazycluster.cluster.teardown import close_tunnels, stop_processes
from lazycluster.cluster.tunnel_mesh import RejectedBatch, plan_worker_tunnels
from lazycluster.exceptions import LazyclusterError, PortInUseError, TransportError
from lazycluster.transport import ProcessHandle, Transport, Tunnel, validate_port

if TYPE_CHECKING:
    from lazycluster.runtime_mgmt import RuntimeGroup

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkerProcess:
    """One started worker: its index in the round robin, name, host, port and process."""

    index: int
    name: str
    host: str
    port: int
    process: ProcessHandle


def check_worker_count(count: object) -> int:
    """Return `count` when it is an int of at least 1.

    Raises TypeError for another type and ValueError for an int below 1, as
    `validate_port` does for ports.
    """
    if isinstance(count, bool) or not isinstance(count, int):
        raise TypeError(f"Invalid worker count {count!r}: expected an int of at least 1.")
    if count < 1:
        raise ValueError(f"Invalid worker count {count!r}: expected an int of at least 1.")
    return count


def print_process_log(title: str, process: ProcessHandle | None) -> None:
    """Print the log of a process under a header line."""
    print(f"----- {title} -----")
    if process is None:
        print("(not started)")
        return
    try:
        print(process.read_log())
    except Exception as error:  # a lost host must not stop printing the other logs
        print(f"(log {process.log_path!r} on host {process.host!r} is unreadable: {error})")


class _Launcher:
    """State shared by both launcher kinds: the group and the manager's transport."""

    def __init__(self, runtime_group: RuntimeGroup) -> None:
        self._group = runtime_group
        self._manager: Transport | None = None

    @property
    def manager(self) -> Transport:
        """The manager's transport, from the backend active when first used.

        Kept so that a cleanup at interpreter exit reaches the same machines.
        """
        if self._manager is None:
            self._manager = manager_transport()
        return self._manager


class MasterLauncher(_Launcher, ABC):
    """Strategy for starting the master instance of a cluster.

    Subclasses implement `start`; they set `_port` and `_process` and add the
    tunnels they open to `_tunnels`, so that `cleanup()` stops all of it.
    """

    def __init__(self, runtime_group: RuntimeGroup) -> None:
        """Keep the group in which the master serves workers."""
        super().__init__(runtime_group)
        self._port: int | None = None
        self._process: ProcessHandle | None = None
        self._tunnels: list[Tunnel] = []

    @property
    def port(self) -> int | None:
        """The port the master listens on, or None while it is not started."""
        return self._port

    @property
    def process(self) -> ProcessHandle | None:
        """The handle of the master process, or None while it is not started."""
        return self._process

    @abstractmethod
    def start(self, ports: list[int] | int, timeout: float = 3, debug: bool = False) -> list[int]:
        """Start the master on a port of `ports`; return the ports left in the list.

        A single port that is not free raises `PortInUseError`, a list without a
        free port raises `NoPortsLeftError`, and a master that does not come up
        within `timeout` seconds raises `MasterStartError`.
        """

    def cleanup(self) -> None:
        """Close the master's tunnels and stop its process. Calling it twice is harmless."""
        if self._process is None and not self._tunnels:
            self._port = None
            return
        clock = self.manager.clock
        tunnels, self._tunnels = self._tunnels, []
        close_tunnels(tunnels, clock)

        if self._process is not None:
            stop_processes([self._process], clock, role="master")
        self._port = None


class WorkerLauncher(_Launcher, ABC):
    """Strategy for starting the worker instances of a cluster.

    Subclasses implement `start`; they add each started worker to `_workers`
    and its port to `_ports_per_host`. `setup_worker_ssh_tunnels()` and
    `cleanup()` work from these.
    """

    def __init__(self, runtime_group: RuntimeGroup) -> None:
        """Keep the group in which the workers are started."""
        super().__init__(runtime_group)
        self._ports_per_host: dict[str, list[int]] = {}
        self._workers: list[WorkerProcess] = []
        self._tunnels: list[Tunnel] = []
        self._lock = threading.Lock()

    @property
    def ports_per_host(self) -> dict[str, list[int]]:
        """The worker ports per host: every port where a worker listens on that host."""
        return {host: list(ports) for host, ports in self._ports_per_host.items()}

    @property
    def workers(self) -> list[WorkerProcess]:
        """Every worker started and not yet stopped, by index."""
        return sorted(self._workers, key=lambda worker: worker.index)

    @abstractmethod
    def start(
        self, worker_count: int, master_port: int, ports: list[int], debug: bool = False
    ) -> list[int]:
        """Start `worker_count` workers attached to the master on `master_port`.

        Returns the ports left in `ports` after the last one used. Too few free
        ports raise `NoPortsLeftError`.
        """

    def setup_worker_ssh_tunnels(self) -> None:
        """Open the forwards that make every worker port reachable from every machine.

        Each remote host gets one batch of local and one batch of remote forwards,
        all hosts in parallel. Forwards opened by an earlier call are kept.
        """
        rejected = self._open_worker_tunnels(self._ports_per_host)
        if rejected:
            raise rejected[0].error

    def _open_worker_tunnels(
        self, ports_per_host: Mapping[str, Iterable[int]]
    ) -> list[RejectedBatch]:
        """Open the forwards still missing for the worker ports in `ports_per_host`.

        Each remote host gets one batch per kind, all hosts in parallel. A batch
        that fails with PortInUseError or a rejected forward (a plain
        TransportError) is returned instead of raised, because one of its ports
        may have been taken since the port check. Every other error is raised.
        """
        transports = {transport.host: transport for transport in remote_transports(self._group)}
        already_open = {(tunnel.host, tunnel.kind, tunnel.listen_port) for tunnel in self._tunnels}
        plan = plan_worker_tunnels(ports_per_host, transports, already_open)
        rejected: list[RejectedBatch] = []
        if not plan:
            return rejected

        def open_on(host: str) -> None:
            transport = transports[host]
            opened = {"local": 0, "remote": 0}
            for kind, pairs in (
                ("local", plan[host].local_pairs),
                ("remote", plan[host].remote_pairs),
            ):
                if not pairs:
                    continue
                forward = transport.forward_local if kind == "local" else transport.forward_remote
                try:
                    tunnels = forward(pairs)
                except (PortInUseError, TransportError) as error:
                    # A lost or refused connection is no port problem.
                    if isinstance(error, TransportError) and type(error) is not TransportError:
                        raise
                    # INFO only: DaskCluster moves the workers of a taken port
                    # elsewhere, and a failure it cannot recover from is raised.
                    logger.info(
                        "Host %s could not open %d %s worker forward(s): %s",
                        host,
                        len(pairs),
                        kind,
                        error,
                    )
                    with self._lock:
                        rejected.append(
                            RejectedBatch(host, kind, tuple(port for port, _ in pairs), error)
                        )
                    continue
                with self._lock:
                    self._tunnels.extend(tunnels)
                opened[kind] = len(tunnels)
            logger.info(
                "Opened worker tunnels on host %s: %d local, %d remote",
                host,
                opened["local"],
                opened["remote"],
            )

        self.manager.clock.map(open_on, sorted(plan))
        return rejected

    def _close_worker_tunnels(self, ports: Set[int]) -> None:
        """Close every worker tunnel that listens on one of `ports`, on any machine."""
        self._discard([], [tunnel for tunnel in self._tunnels if tunnel.listen_port in ports])

    def cleanup(self) -> None:
        """Stop every worker and close every worker tunnel. Calling it twice is harmless."""
        self._discard(self._workers, self._tunnels)

    def _discard(self, workers: Sequence[WorkerProcess], tunnels: Sequence[Tunnel]) -> None:
        """Stop the given workers, close the given tunnels and forget both."""
        workers, tunnels = list(workers), list(tunnels)
        if not workers and not tunnels:
            return
        clock = self.manager.clock
        stop_processes([worker.process for worker in workers], clock, role="worker")
        close_tunnels(tunnels, clock)

        # Sets of ids keep this linear: a large mesh has millions of tunnels.
        discarded_workers = {id(worker) for worker in workers}
        discarded_tunnels = {id(tunnel) for tunnel in tunnels}
        with self._lock:
            self._workers = [w for w in self._workers if id(w) not in discarded_workers]
            self._tunnels = [t for t in self._tunnels if id(t) not in discarded_tunnels]
        self._rebuild_ports_per_host()

    def _rebuild_ports_per_host(self) -> None:
        """Derive `_ports_per_host` from `_workers`, each host's ports in worker order."""
        with self._lock:
            ports_per_host: dict[str, list[int]] = {}
            for worker in sorted(self._workers, key=lambda worker: worker.index):
                ports_per_host.setdefault(worker.host, []).append(worker.port)
            self._ports_per_host = ports_per_host


class RuntimeCluster(ABC):
    """A cluster of processes on the runtimes of a group; usable as a context manager."""

    @abstractmethod
    def start(self) -> None:
        """Start the cluster."""

    @abstractmethod
    def cleanup(self) -> None:
        """Stop everything the cluster started. Calling it twice is harmless."""

    @abstractmethod
    def print_log(self) -> None:
        """Print the logs of the cluster's processes."""

    def __enter__(self) -> RuntimeCluster:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.cleanup()


class MasterWorkerCluster(RuntimeCluster):
    """A master plus workers on a `RuntimeGroup`, started by pluggable launchers."""

    DEFAULT_MASTER_PORT = 60000
    DEFAULT_PORT_RANGE_START = 60001  # inclusive
    DEFAULT_PORT_RANGE_END = 60200  # exclusive

    # Bound on the master start inside `start()`. `start()` returns as soon as
    # the master listens, so a generous bound costs nothing when all goes well.
    master_start_timeout: float = 30.0

    def __init__(
        self,
        runtime_group: RuntimeGroup,
        ports: list[int] | None = None,
        master_launcher: MasterLauncher | None = None,
        worker_launcher: WorkerLauncher | None = None,
    ) -> None:
        """Prepare a cluster on `runtime_group`; nothing starts before `start()`.

        `ports` are the candidates for the master (when its default port is
        taken) and the workers; by default DEFAULT_PORT_RANGE_START up to, not
        including, DEFAULT_PORT_RANGE_END.
        """
        if runtime_group is None:
            raise ValueError(
                "Invalid runtime_group None: pass the RuntimeGroup to start the cluster in."
            )
        self._group = runtime_group
        if ports is None:
            ports = list(range(self.DEFAULT_PORT_RANGE_START, self.DEFAULT_PORT_RANGE_END))
        self._ports = validate_port_list(ports)
        # The whole list again after cleanup(), which frees every port taken from it.
        self._port_list = list(self._ports)
        self._master_launcher = master_launcher or self._default_master_launcher(runtime_group)
        self._worker_launcher = worker_launcher or self._default_worker_launcher(runtime_group)
        self._atexit_registered = False

    def _default_master_launcher(self, runtime_group: RuntimeGroup) -> MasterLauncher:
        raise ValueError(f"{type(self).__name__} needs a master_launcher: pass a MasterLauncher.")

    def _default_worker_launcher(self, runtime_group: RuntimeGroup) -> WorkerLauncher:
        raise ValueError(f"{type(self).__name__} needs a worker_launcher: pass a WorkerLauncher.")

    @property
    def master_port(self) -> int | None:
        """The port of the master instance, or None while it is not started."""
        return self._master_launcher.port

    @property
    def runtime_group(self) -> RuntimeGroup:
        """The group the cluster runs in."""
        return self._group

    @property
    def ports(self) -> list[int]:
        """The candidate ports not used yet."""
        return list(self._ports)

    @property
    def workers(self) -> list[WorkerProcess]:
        """Every running worker with its index, name, host, port and process, by index."""
        return self._worker_launcher.workers

    def start(
        self, worker_count: int | None = None, master_port: int | None = None, debug: bool = False
    ) -> None:
        """Start the master and `worker_count` workers (default: one per runtime).

        A failed or interrupted start, Ctrl-C included, stops everything it
        started before the error propagates.
        """
        if worker_count is not None:
            check_worker_count(worker_count)
        if self.master_port is not None:
            raise LazyclusterError(
                f"The cluster is already started (master port {self.master_port}). "
                "Call cleanup() before starting it again. A `with` block starts the "
                "cluster on entry, so call start() with your arguments before the block."
            )
        clock = self._master_launcher.manager.clock
        started_at = clock.monotonic()
        self._register_atexit()
        try:
            self._start_master_and_workers(worker_count, master_port, debug)
        except BaseException as error:
            first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
            # INFO, because the error itself reaches the caller.
            logger.info("Cluster start failed, stopping what it started: %s", first_line)
            self.cleanup()
            raise

        logger.info(
            "Cluster ready in %.1f s: master port %s, %d worker(s) on hosts %s",
            clock.monotonic() - started_at,
            self.master_port,
            sum(len(ports) for ports in self._worker_launcher.ports_per_host.values()),
            ", ".join(self._worker_launcher.ports_per_host),
        )

    def _start_master_and_workers(
        self, worker_count: int | None, master_port: int | None, debug: bool
    ) -> None:
        """Start the master, then the workers; subclasses may overlap the two."""
        self.start_master(master_port, timeout=self.master_start_timeout, debug=debug)
        self.start_workers(worker_count, debug=debug)

    def start_master(
        self, master_port: int | None = None, timeout: float = 3, debug: bool = False
    ) -> None:
        """Start the master on `master_port`; else DEFAULT_MASTER_PORT when it is free
        everywhere; else the first free port of the port list, which then shrinks.
        """
        self._register_atexit()
        launcher = self._master_launcher
        if master_port is not None:
            launcher.start(validate_port(master_port, "master_port"), timeout)
        else:
            try:
                launcher.start(self.DEFAULT_MASTER_PORT, timeout)
            except PortInUseError as error:
                logger.info(
                    "Default master port %d is taken (%s), so the master starts on a port "
                    "of the port list",
                    self.DEFAULT_MASTER_PORT,
                    error.where,
                )
                self._ports = launcher.start(self._ports, timeout)

        if debug:
            print_process_log("master", launcher.process)

    def start_workers(self, count: int | None = None, debug: bool = False) -> None:
        """Start `count` workers (default: one per runtime) attached to the running master."""
        if self.master_port is None:
            raise LazyclusterError(
                "The master is not running. Call start_master() before start_workers()."
            )
        if count is None:
            count = self._group.runtime_count
        check_worker_count(count)

        self._register_atexit()
        self._ports = self._worker_launcher.start(count, self.master_port, self._ports)
        if debug:
            self._print_worker_logs()

    def print_log(self) -> None:
        """Print the log of the master and of every worker."""
        print_process_log("master", self._master_launcher.process)
        self._print_worker_logs()

    def _print_worker_logs(self) -> None:
        for worker in self._worker_launcher.workers:
            print_process_log(f"{worker.name} on {worker.host}:{worker.port}", worker.process)

    def cleanup(self) -> None:
        """Stop the workers, then the master, and close every tunnel. Calling it twice is harmless.

        Afterwards `ports` is the whole port list again.
        """
        # The master stops even when stopping the workers fails or is interrupted.
        try:
            self._worker_launcher.cleanup()
        finally:
            self._master_launcher.cleanup()
        self._ports = list(self._port_list)
        if self._atexit_registered:
            atexit.unregister(self.cleanup)
            self._atexit_registered = False
            logger.info("Cluster stopped on hosts %s", ", ".join(self._group.hosts))

    def _register_atexit(self) -> None:
        # Stops the processes when the interpreter exits without cleanup(). A killed
        # interpreter skips atexit: then the scheduler closes itself once its parent
        # is gone, and the workers exit when they lose the scheduler.
        if not self._atexit_registered:
            atexit.register(self.cleanup)
            self._atexit_registered = True

    def __enter__(self) -> MasterWorkerCluster:
        """Start the cluster with its defaults unless `start()` ran already."""
        if self.master_port is None:
            self.start()
        return self

    def __repr__(self) -> str:
        return f"<{type(self).__name__} hosts={self._group.hosts!r} master_port={self.master_port}>"
