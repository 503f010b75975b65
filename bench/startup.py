"""Cluster start-up until every worker is registered: ours, Dask's SSHCluster and the floor.

Also a map of 1,000 small tasks plus a sum on the 3 × 2 clusters of both.
Runs of ours and of SSHCluster alternate, so drift of the machine hits both.
"""

from __future__ import annotations

import logging
import operator
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from bench.context import CONTAINER_SSH_PORT, Context, container_address
from bench.cpu import ROLES, cpu_by_role
from bench.docker_exec import ExecProcess
from bench.report import Section, at_most
from bench.stats import Sample

log = logging.getLogger(__name__)

TITLE = "Cluster start-up and a map"

# (hosts, workers per host) of each start-up figure.
LAYOUTS = ((3, 2), (3, 8))
MAP_TASKS = 1_000
FLOOR_SCHEDULER_PORT = 8801
REGISTER_TIMEOUT = 120.0
# A failed start is retried up to this many attempts in all, and counted on the page.
MAX_ATTEMPTS = 3

# The image's python3 on PATH, as the library and SSHCluster both use it.
REMOTE_PYTHON = "python3"


def batch_counts(client: Any) -> tuple[int, int]:
    """Return the batches the scheduler has sent so far to all workers and to all clients."""

    def count(dask_scheduler: Any) -> tuple[int, int]:
        to_workers = sum(stream.batch_count for stream in dask_scheduler.stream_comms.values())
        to_clients = sum(stream.batch_count for stream in dask_scheduler.client_comms.values())
        return to_workers, to_clients

    return tuple(client.run_on_scheduler(count))


def map_and_sum(client: Any) -> float:
    """Seconds for client.map over MAP_TASKS inputs plus a sum of the results, checked."""
    started = time.perf_counter()
    futures = client.map(operator.neg, range(MAP_TASKS), pure=False)
    total = client.submit(sum, futures, pure=False).result()
    elapsed = time.perf_counter() - started
    expected = -sum(range(MAP_TASKS))
    if total != expected:
        raise AssertionError(f"map and sum returned {total}, expected {expected}")
    del futures
    return elapsed


class Ours:
    """DaskCluster on a fresh RuntimeGroup: connections, host probe, scheduler, workers, tunnels."""

    name = "lazycluster DaskCluster"

    def __init__(self, context: Context) -> None:
        self.context = context
        self.cluster: Any = None
        self.group: Any = None
        self._backend_scope: Any = None

    def start(self, workers: int) -> float:
        from lazycluster.cluster.dask_cluster import DaskCluster
        from lazycluster.group import RuntimeGroup
        from lazycluster.transport import use_backend
        from lazycluster.transport.ssh import SSHBackend

        self._backend_scope = use_backend(
            SSHBackend(ssh_config_path=self.context.direct_ssh_config, resolve_unknown_hosts=False)
        )
        self._backend_scope.__enter__()
        started = time.perf_counter()
        self.group = RuntimeGroup(hosts=self.context.hosts.aliases)
        self.cluster = DaskCluster(self.group)
        self.cluster.start(worker_count=workers)
        return time.perf_counter() - started

    def client(self) -> Any:
        return self.cluster.get_client(timeout=10)

    def stop(self) -> None:
        try:
            if self.cluster is not None:
                self.cluster.cleanup()
            if self.group is not None:
                self.group.cleanup()
        finally:
            self.cluster = self.group = None
            if self._backend_scope is not None:
                self._backend_scope.__exit__(None, None, None)
                self._backend_scope = None


class DaskSSHCluster:
    """distributed.SSHCluster: scheduler on the first host, Nanny-managed workers on all three."""

    name = "Dask SSHCluster"

    def __init__(self, context: Context) -> None:
        self.context = context
        self.cluster: Any = None
        self._clients: list[Any] = []

    def _connect_options(self) -> list[dict[str, Any]]:
        hosts = self.context.hosts
        return [
            {
                "port": CONTAINER_SSH_PORT,
                "username": host.user,
                "client_keys": [str(hosts.key_path)],
                "known_hosts": self.context.direct_known_hosts,
            }
            for host in hosts
        ]

    def start(self, workers: int) -> float:
        from distributed import SSHCluster

        options = self._connect_options()
        addresses = [container_address(host) for host in self.context.hosts]
        started = time.perf_counter()
        # The first entry of `hosts` runs the scheduler; every entry after it
        # runs `n_workers` workers, so host 0 is listed twice.
        self.cluster = SSHCluster(
            [addresses[0], *addresses],
            connect_options=[options[0], *options],
            worker_options={"n_workers": workers // len(options), "nthreads": 1},
            scheduler_options={"port": 0, "dashboard": False},
            remote_python=REMOTE_PYTHON,
        )
        self.cluster.wait_for_workers(workers, timeout=REGISTER_TIMEOUT)
        return time.perf_counter() - started

    def client(self) -> Any:
        from distributed import Client

        client = Client(self.cluster, timeout=10)
        self._clients.append(client)
        return client

    def stop(self) -> None:
        for client in self._clients:
            client.close()
        self._clients.clear()
        if self.cluster is not None:
            self.cluster.close()
            self.cluster = None


def worker_argv(scheduler: str) -> list[str]:
    return [
        REMOTE_PYTHON, "-m", "distributed.cli.dask_worker", scheduler,
        "--no-nanny", "--nthreads", "1", "--no-dashboard",
    ]


def floor_start(host: Any) -> float:
    """Seconds from `docker exec` of one dask worker until it logs its registration."""
    started = time.perf_counter()
    worker = ExecProcess(host, [*worker_argv(f"tcp://127.0.0.1:{FLOOR_SCHEDULER_PORT}"), "--listen-address", "tcp://127.0.0.1:0"])
    try:
        seen = worker.wait_for("Registered to", REGISTER_TIMEOUT)
        return seen - started
    finally:
        worker.stop()


def layout_floor_start(hosts: list[Any], per_host: int, scheduler: str) -> float:
    """Seconds until `per_host` workers on every host, started by docker exec at once, are registered."""
    placement = [host for host in hosts for _ in range(per_host)]
    with ThreadPoolExecutor(len(placement)) as pool:
        started = time.perf_counter()
        workers = list(pool.map(lambda host: ExecProcess(host, worker_argv(scheduler)), placement))
        try:
            seen = list(pool.map(lambda worker: worker.wait_for("Registered to", REGISTER_TIMEOUT), workers))
            return max(seen) - started
        finally:
            list(pool.map(lambda worker: worker.stop(), workers))


def measure_floor(context: Context, section: Section) -> None:
    hosts = list(context.hosts)
    # The scheduler listens on every interface of its container, so workers in
    # the other containers reach it over the Docker bridge.
    scheduler = ExecProcess(
        hosts[0],
        [
            REMOTE_PYTHON, "-m", "distributed.cli.dask_scheduler", "--host", "0.0.0.0",
            "--port", str(FLOOR_SCHEDULER_PORT), "--no-dashboard",
        ],
    )
    try:
        scheduler.wait_for("Scheduler at", REGISTER_TIMEOUT)
        floor_start(hosts[0])  # warm the page cache for the worker's imports
        runs = context.runs(5)
        section.add("floor", "Floor: one `dask worker` by docker exec until registered", Sample(tuple(floor_start(hosts[0]) for _ in range(runs))))

        address = f"tcp://{container_address(hosts[0])}:{FLOOR_SCHEDULER_PORT}"
        for host_count, per_host in LAYOUTS:
            seconds = tuple(layout_floor_start(hosts[:host_count], per_host, address) for _ in range(context.runs(3)))
            section.add(f"floor-{host_count}x{per_host}", f"Floor: {host_count} hosts × {per_host} workers by docker exec at once", Sample(seconds))
    finally:
        scheduler.stop()


def start_with_retries(system: Any, workers: int, failures: list[str]) -> float:
    """Start `system`, retrying after a failed start; each failure is appended to `failures`."""
    for attempt in range(1, MAX_ATTEMPTS + 1):
        try:
            return float(system.start(workers))
        except Exception as error:  # noqa: BLE001 - counted on the page, then retried
            failures.append(f"{system.name}, {workers} workers: {type(error).__name__}: {error}")
            log.warning("%s with %d workers failed to start (attempt %d): %s", system.name, workers, attempt, error)
            # sshd's own log gives the reason for a rejected forward or session.
            for host in system.context.hosts:
                log.warning("sshd log of %s:\n%s", host.alias, host.logs(tail=8))
            system.stop()
            if attempt == MAX_ATTEMPTS:
                raise
    raise AssertionError("unreachable")


def alternate(
    systems: list[Any], workers: int, runs: int, after_last: Callable[[Any], None] | None, failures: list[str]
) -> dict[str, list[float]]:
    """Start and stop each system `runs` times, alternating; call `after_last` before the last stop."""
    seconds: dict[str, list[float]] = {system.name: [] for system in systems}
    for run in range(runs):
        for system in systems:
            try:
                seconds[system.name].append(start_with_retries(system, workers, failures))
                log.info("%s with %d workers started in %.2f s", system.name, workers, seconds[system.name][-1])
                if after_last is not None and run == runs - 1:
                    after_last(system)
            finally:
                system.stop()
    return seconds


def batch_note(ours: tuple[float, ...] | None, theirs: tuple[float, ...] | None) -> str:
    """Describe the scheduler's batches per map of both clusters, from Dask's own counters."""
    if not ours or not theirs:
        return ""
    return (
        f"Per map, the scheduler sent {ours[0]:.0f} batches to the workers and {ours[1]:.0f} to "
        f"the client with lazycluster, against {theirs[0]:.0f} and {theirs[1]:.0f} with "
        "SSHCluster (BatchedSend counters of distributed, same messages in both). Its batching "
        "waits a few milliseconds after each send, so how the messages arrive, which the "
        "tunnels change, decides how many batches it sends; each costs CPU on both ends."
    )


def measure(context: Context, section: Section) -> None:
    measure_floor(context, section)

    ours, theirs = Ours(context), DaskSSHCluster(context)
    map_seconds: dict[str, Sample] = {}
    map_cpu: dict[str, dict[str, Sample]] = {}
    map_batches: dict[str, tuple[float, ...]] = {}
    container_ids = [host.container.id for host in context.hosts]

    def run_map(system: Any) -> None:
        client = system.client()
        map_and_sum(client)  # warm-up: the workers import what the tasks need
        seconds, cpu = [], []
        batches_before = batch_counts(client)
        for _ in range(context.runs(5)):
            # The process scan runs between maps, outside the timed part.
            before = cpu_by_role(container_ids)
            seconds.append(map_and_sum(client))
            after = cpu_by_role(container_ids)
            cpu.append({role: after[role] - before[role] for role in ROLES})
        batches_after = batch_counts(client)
        map_batches[system.name] = tuple(
            (after - before) / len(seconds) for before, after in zip(batches_before, batches_after, strict=True)
        )
        map_seconds[system.name] = Sample(tuple(seconds))
        map_cpu[system.name] = {
            role: Sample(tuple(run[role] for run in cpu)) for role in ROLES
        }
        map_cpu[system.name]["all"] = Sample(tuple(sum(run.values()) for run in cpu))

    # One untimed start of each, so both run with warm caches on the hosts.
    failures: list[str] = []
    alternate([ours, theirs], 2 * len(context.hosts), 1, None, failures)
    for host_count, per_host in LAYOUTS:
        workers = host_count * per_host
        runs = context.runs(5 if per_host == 2 else 3)
        seconds = alternate([ours, theirs], workers, runs, run_map if per_host == 2 else None, failures)
        tag = f"{host_count}x{per_host}"
        section.add(f"ours-{tag}", f"Start-up {host_count} hosts × {per_host} workers: lazycluster", Sample(tuple(seconds[ours.name])))
        section.add(f"ssh-{tag}", f"Start-up {host_count} hosts × {per_host} workers: Dask SSHCluster", Sample(tuple(seconds[theirs.name])))

    section.add("map-ours", f"map of {MAP_TASKS:,} tasks + sum, 3 × 2: lazycluster", map_seconds[ours.name])
    section.add("map-ssh", f"map of {MAP_TASKS:,} tasks + sum, 3 × 2: Dask SSHCluster", map_seconds[theirs.name])
    for key, system in (("ours", ours), ("ssh", theirs)):
        for role in (*ROLES, "all"):
            label = "all four roles" if role == "all" else role
            section.add(
                f"map-cpu-{key}-{role}",
                f"CPU per map, {label}: {'lazycluster' if key == 'ours' else 'Dask SSHCluster'}",
                map_cpu[system.name][role],
            )

    section.ratio("Start-up 3 × 2: lazycluster / floor (one worker)", "ours-3x2", "floor")
    section.ratio("Start-up 3 × 2: lazycluster / floor (3 × 2 by docker exec)", "ours-3x2", "floor-3x2")
    section.ratio("Start-up 3 × 2: lazycluster / SSHCluster", "ours-3x2", "ssh-3x2", at_most(0.8))
    section.ratio("Start-up 3 × 8: lazycluster / floor (one worker)", "ours-3x8", "floor")
    section.ratio("Start-up 3 × 8: lazycluster / floor (3 × 8 by docker exec)", "ours-3x8", "floor-3x8")
    section.ratio("Start-up 3 × 8: lazycluster / SSHCluster", "ours-3x8", "ssh-3x8", at_most(0.8))
    section.ratio("map + sum: lazycluster / SSHCluster", "map-ours", "map-ssh", at_most(1.1))
    section.ratio("CPU per map, all four roles: lazycluster / SSHCluster", "map-cpu-ours-all", "map-cpu-ssh-all")
    if failures:
        section.note(
            f"{len(failures)} start(s) failed in this run and were retried; their time is not in the "
            "figures. " + " ".join(f"Failure: {failure.strip()[:300]}" for failure in failures)
        )
    section.note(
        "Start-up of lazycluster counts from a new RuntimeGroup (SSH connections and the host probe) "
        "to the return of DaskCluster.start(), which waits until every worker is registered. Its "
        "scheduler runs on the manager, and all traffic goes through SSH tunnels. SSHCluster runs its "
        "scheduler on the first host and its workers under a Nanny (one more process each). It talks "
        "to the containers' bridge addresses directly and opens a new SSH connection per process. Its "
        "figure counts from the SSHCluster call until wait_for_workers() returns. The floor is one "
        "worker process started by docker exec against a scheduler already running in the same "
        "container, until it logs its registration: no SSH, no tunnel, no process manager. The "
        "3 × 2 and 3 × 8 floors start that many such workers by docker exec at once, against one "
        "scheduler in the first container reached over the Docker bridge, until the last one is "
        "registered. On 2 cores they show how much of a start-up is the workers' own Python start."
    )
    section.note(
        "The map runs on the 3 × 2 cluster of the last start-up run, after one untimed warm-up map. "
        "On 2 cores it is bound by CPU: the workers, the scheduler and, for lazycluster, the "
        "tunnels share them. Each scheduler-worker message of lazycluster crosses a paramiko "
        "tunnel relayed by threads in the manager's Python process (the same process as the "
        "client), then sshd. SSHCluster's scheduler reaches its workers over the Docker bridge "
        "directly. The CPU figures split each map's CPU by role: this process (the Dask client, "
        "and for lazycluster the tunnels), the scheduler, the workers (with SSHCluster's Nannies) "
        "and sshd in the containers. With the client moved to a process of its own, the "
        "tunnels alone used about 0.2 s of CPU per map in one profiled run, mostly paramiko's "
        "packet handling in Python. "
        + batch_note(map_batches.get(ours.name), map_batches.get(theirs.name))
    )
    section.note(
        "lazycluster launches the scheduler on the manager, forwards its port to the hosts and "
        "starts the workers while the scheduler still imports and boots. Workers that are up "
        "first retry until it listens. In one run profiled with INFO logs at 3 × 2: connections "
        "and host probe 0.14 s, then scheduler launch and forwards 0.02 s, then port check, "
        "working directories, tunnels and worker processes 0.2 s. The scheduler listened 0.7 s "
        "after its launch, and the last worker registered 0.7 s after that. Both boots share the "
        "2 cores, so most of the figure is Python starting, as the 3 × 2 floor shows. At 3 × 8, "
        "24 worker processes each import distributed, which no start order avoids."
    )
