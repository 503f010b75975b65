"""DaskCluster invariants on the simulator: placement, ports, batching, timeouts, cleanup.

The simulator runs the library's own commands on virtual hosts with a virtual
clock, so these tests try many host counts, worker counts and taken ports in
seconds, and they time the timeouts exactly.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import sim
from lazycluster.cluster import MasterStartError, WorkerStartError
from lazycluster.cluster.dask_cluster import DaskCluster, LocalMasterLauncher, RoundRobinLauncher
from lazycluster.exceptions import NoPortsLeftError, PortInUseError, VersionMismatchError
from lazycluster.group import RuntimeGroup
from lazycluster.transport import use_backend

PORTS = list(range(41000, 41030))

# Virtual seconds a failed start may take beyond its timeout: one poll interval
# of Clock.wait_until (at most 0.5 s) plus the stop of the started processes.
TIMEOUT_MARGIN = 6.0


@contextmanager
def simulated_group(network: sim.Network) -> Iterator[RuntimeGroup]:
    """Yield a group of every simulated host; afterwards the network must be clean."""
    with use_backend(network):
        group = RuntimeGroup(hosts=list(network.hosts))
        try:
            yield group
        finally:
            group.cleanup()
    network.assert_clean()


def worker_ports_listening(network: sim.Network, host: str) -> list[int]:
    """Return the ports on `host` taken_ports by simulated Dask worker processes."""
    return sorted(
        port
        for port, holder in network.listening_ports(host).items()
        if isinstance(holder, sim.SimProcess) and "distributed.cli.dask_worker" in holder.argv
    )


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    host_count=st.integers(min_value=1, max_value=5),
    worker_count=st.integers(min_value=1, max_value=12),
    taken=st.lists(st.tuples(st.integers(0, 5), st.sampled_from(PORTS)), max_size=12),
    seed=st.integers(min_value=0, max_value=1000),
)
def test_start_invariants(
    host_count: int, worker_count: int, taken: list[tuple[int, int]], seed: int
) -> None:
    network = sim.Network(host_count, seed=seed)
    host_names = [network.manager.name, *network.hosts]
    taken_ports: dict[int, str] = {}
    for index, port in taken:
        name = host_names[index % len(host_names)]
        if port not in taken_ports:
            network.hold_port(name, port)
            taken_ports[port] = name
    free = [port for port in PORTS if port not in taken_ports]
    master_port = 40999

    with simulated_group(network) as group:
        cluster = DaskCluster(group, ports=PORTS)
        if len(free) < worker_count:
            with pytest.raises(NoPortsLeftError):
                cluster.start(worker_count=worker_count, master_port=master_port)
            assert network.processes() == []
            return

        cluster.start(worker_count=worker_count, master_port=master_port)
        workers = cluster._worker_launcher.workers
        runtimes = group.runtimes
        chosen = [worker.port for worker in sorted(workers, key=lambda worker: worker.index)]

        assert chosen == free[:worker_count]
        assert master_port not in chosen
        assert cluster.ports == PORTS[PORTS.index(chosen[-1]) + 1 :]
        for worker in workers:
            assert worker.host == runtimes[worker.index % len(runtimes)].host
        counts = Counter(worker.host for worker in workers)
        assert max(counts.values()) - min(counts.values()) <= 1
        for host, ports in cluster._worker_launcher.ports_per_host.items():
            assert worker_ports_listening(network, host) == sorted(ports)

        cluster.cleanup()
        assert cluster.master_port is None


def test_tunnels_are_batched_per_host() -> None:
    network = sim.Network(4, seed=1)

    with simulated_group(network) as group:
        with DaskCluster(group, ports=PORTS) as cluster:
            cluster.start_workers(20)

            for host in network.hosts:
                kinds = Counter(
                    event.kind
                    for event in network.trace
                    if event.host == host and event.kind.startswith("forward_")
                )
                # One remote batch for the scheduler and one per start_workers call.
                assert kinds["forward_remote"] == 3
                assert kinds["forward_local"] == 2
            workers = len(cluster._worker_launcher.workers)
            assert workers == 24
            assert len(network.open_tunnels()) == 4 + workers + workers * 3


def test_single_port_taken_on_host_raises() -> None:
    network = sim.Network(3, seed=2)
    network.hold_port("h3", 8786)

    with simulated_group(network) as group:
        with pytest.raises(PortInUseError, match="'h3'"):
            DaskCluster(group).start(master_port=8786)


def test_default_master_port_taken_uses_list() -> None:
    network = sim.Network(2, seed=3)
    network.hold_port("h2", DaskCluster.DEFAULT_MASTER_PORT)

    with simulated_group(network) as group:
        with DaskCluster(group, ports=PORTS) as cluster:
            assert cluster.master_port == PORTS[0]
            assert (
                sorted(
                    p for ports in cluster._worker_launcher.ports_per_host.values() for p in ports
                )
                == PORTS[1:3]
            )


def test_master_timeout_is_bounded() -> None:
    network = sim.Network(2, seed=4)
    network.set_start_delay("scheduler", 100.0)

    with simulated_group(network) as group:
        cluster = DaskCluster(group, ports=PORTS)
        cluster.master_start_timeout = 5.0
        started = network.clock.monotonic()

        with pytest.raises(MasterStartError, match="did not listen within 5 s"):
            cluster.start()

        elapsed = network.clock.monotonic() - started
        assert 5.0 <= elapsed <= 5.0 + TIMEOUT_MARGIN


def test_worker_timeout_names_slow_host() -> None:
    network = sim.Network(3, seed=5)
    network.set_start_delay("worker", 500.0, host="h2")

    with simulated_group(network) as group:
        cluster = DaskCluster(group, ports=PORTS)
        cluster.worker_start_timeout = 20.0
        started = network.clock.monotonic()

        with pytest.raises(WorkerStartError) as raised:
            cluster.start()

        elapsed = network.clock.monotonic() - started
        assert raised.value.hosts == ["h2"]
        assert raised.value.ports == [PORTS[1]]
        assert elapsed <= 20.0 + TIMEOUT_MARGIN + 5.0  # plus the scheduler start


def test_version_mismatch_stops_scheduler() -> None:
    network = sim.Network(3, seed=6)
    network.host("h2").distributed_version = "2024.1.0"

    with simulated_group(network) as group:
        with pytest.raises(VersionMismatchError, match="'h2' has version 2024.1.0") as raised:
            DaskCluster(group, ports=PORTS).start()

        assert raised.value.host_version == "2024.1.0"
        assert "`ssh h2 python3 -m pip install distributed==" in str(raised.value)
        assert network.processes() == []


def test_cleanup_twice_leaves_network_clean() -> None:
    network = sim.Network(3, seed=7)

    with simulated_group(network) as group:
        cluster = DaskCluster(group, ports=PORTS)
        cluster.start(worker_count=7)
        cluster.cleanup()
        cluster.cleanup()

        assert network.processes() == []
        assert network.open_tunnels() == []


def hold_port_when_scheduler_starts(network: sim.Network, port: int) -> None:
    """Let a foreign process take `port` on the manager just after the scheduler process starts."""

    def take_port_soon() -> None:
        network.hold_port(network.manager.name, port)

    network.set_start_delay("scheduler", 2.0)
    network.clock.schedule(0.5, take_port_soon)


def test_master_port_taken_during_start_tries_next() -> None:
    network = sim.Network(2, seed=8)

    with simulated_group(network) as group:
        launcher = LocalMasterLauncher(group)
        hold_port_when_scheduler_starts(network, PORTS[0])

        remaining = launcher.start(PORTS[:4], timeout=10)

        assert launcher.port == PORTS[1]
        assert remaining == PORTS[2:4]
        launcher.cleanup()
        network.release_port(network.manager.name, PORTS[0])


def test_single_master_port_taken_during_start_raises() -> None:
    network = sim.Network(2, seed=9)

    with simulated_group(network) as group:
        launcher = LocalMasterLauncher(group)
        hold_port_when_scheduler_starts(network, PORTS[0])

        with pytest.raises(PortInUseError, match="taken while the scheduler started"):
            launcher.start(PORTS[0], timeout=10)

        assert launcher.port is None
        network.release_port(network.manager.name, PORTS[0])


def test_runtime_on_manager_gets_no_tunnels() -> None:
    network = sim.Network(2, seed=10)

    with use_backend(network):
        group = RuntimeGroup(hosts=[network.manager.name, "h1"])
        try:
            with DaskCluster(group, ports=PORTS) as cluster:
                cluster.start_workers(2)

                ports_per_host = cluster._worker_launcher.ports_per_host
                assert ports_per_host == {
                    network.manager.name: [PORTS[0], PORTS[2]],
                    "h1": [PORTS[1], PORTS[3]],
                }
                forwards = Counter(
                    event.host for event in network.trace if event.kind.startswith("forward_")
                )
                assert set(forwards) == {"h1"}
                # h1 listens on the scheduler port and the manager's worker ports.
                assert sorted(
                    t.listen_port for t in network.open_tunnels("h1") if t.kind == "remote"
                ) == sorted([cluster.master_port, PORTS[0], PORTS[2]])
        finally:
            group.cleanup()
    network.assert_clean()


def test_master_gives_up_after_repeated_bind_races() -> None:
    network = sim.Network(1, seed=11)
    network.set_start_delay("scheduler", 2.0)
    manager = network.manager.name
    racing = True

    def take_each_scheduler_port() -> None:
        # Another program binds every port a starting scheduler is about to bind.
        for process in network.processes(manager):
            port = int(process.argv[process.argv.index("--port") + 1])
            if port not in network.listening_ports(manager):
                network.hold_port(manager, port)
        if racing:
            network.clock.schedule(0.25, take_each_scheduler_port)

    with simulated_group(network) as group:
        launcher = LocalMasterLauncher(group)
        network.clock.schedule(0.25, take_each_scheduler_port)

        with pytest.raises(MasterStartError, match="failed to bind 3 free ports in a row"):
            launcher.start(PORTS, timeout=10)
        racing = False

        assert launcher.port is None
        for port in PORTS[:3]:
            network.release_port(manager, port)


def test_custom_placement_by_subclass() -> None:
    class LastHostLauncher(RoundRobinLauncher):
        def choose_runtime(self, index: int, runtimes: list) -> object:  # type: ignore[override]
            return runtimes[-1]

    network = sim.Network(3, seed=12)

    with simulated_group(network) as group:
        launcher = LastHostLauncher(group)
        with DaskCluster(group, ports=PORTS, worker_launcher=launcher) as cluster:
            assert cluster._worker_launcher is launcher
            assert launcher.ports_per_host == {"h3": PORTS[:3]}
            assert worker_ports_listening(network, "h3") == PORTS[:3]


def test_runtime_added_later_is_version_checked() -> None:
    network = sim.Network(1, seed=13)

    with simulated_group(network) as group:
        with DaskCluster(group, ports=PORTS) as cluster:
            network.add_host("late", distributed_version="2024.1.0")
            group.add_runtime("late")

            with pytest.raises(VersionMismatchError, match="'late' has version 2024.1.0"):
                cluster.start_workers(1)

            assert cluster._worker_launcher.ports_per_host == {"h1": [PORTS[0]]}


def test_workers_property_lists_started_workers() -> None:
    network = sim.Network(2, seed=14)

    with simulated_group(network) as group:
        cluster = DaskCluster(group, ports=PORTS)
        assert cluster.workers == []

        cluster.start(worker_count=3)
        assert [(w.index, w.host, w.port) for w in cluster.workers] == [
            (0, "h1", PORTS[0]),
            (1, "h2", PORTS[1]),
            (2, "h1", PORTS[2]),
        ]

        cluster.cleanup()
        assert cluster.workers == []


def listening_on(network: sim.Network, host: str, port: int) -> bool:
    return port in network.listening_ports(host)


def test_port_taken_on_other_host_moves_worker() -> None:
    network = sim.Network(3, seed=15)
    # h2 reports PORTS[0] free, then another program takes it before the
    # forward of worker 0 (on h1) to h2 is opened.
    network.faults.port_race("h2", PORTS[0])

    with simulated_group(network) as group:
        cluster = DaskCluster(group, ports=PORTS)
        cluster.start(worker_count=3)

        ports = [worker.port for worker in cluster.workers]
        assert ports == [PORTS[3], PORTS[1], PORTS[2]]
        assert [worker.host for worker in cluster.workers] == ["h1", "h2", "h3"]
        assert cluster.ports == PORTS[4:]
        assert cluster._worker_launcher.ports_per_host == {
            "h1": [PORTS[3]],
            "h2": [PORTS[1]],
            "h3": [PORTS[2]],
        }
        assert worker_ports_listening(network, "h1") == [PORTS[3]]
        for host in [network.manager.name, "h2", "h3"]:
            assert listening_on(network, host, PORTS[3]), host
        assert isinstance(network.listening_ports("h2")[PORTS[0]], sim.ForeignHolder)
        assert not any(t.listen_port == PORTS[0] for t in network.open_tunnels())

        cluster.cleanup()
        assert network.open_tunnels() == []


def test_port_taken_on_manager_moves_worker() -> None:
    network = sim.Network(2, seed=16)
    # The manager's local forward to worker 1 on h2 finds its port taken.
    network.faults.port_race(network.manager.name, PORTS[1])

    with simulated_group(network) as group:
        cluster = DaskCluster(group, ports=PORTS)
        cluster.start(worker_count=2)

        assert [worker.port for worker in cluster.workers] == [PORTS[0], PORTS[2]]
        assert cluster.ports == PORTS[3:]
        assert worker_ports_listening(network, "h2") == [PORTS[2]]
        assert listening_on(network, "h1", PORTS[2])
        cluster.cleanup()


def test_port_taken_on_worker_host_restarts_worker() -> None:
    network = sim.Network(3, seed=17)
    # No tunnel holds a port on the worker's own host, so the worker's bind
    # is the first to notice that another program took it.
    network.faults.port_race("h1", PORTS[0])

    with simulated_group(network) as group:
        cluster = DaskCluster(group, ports=PORTS)
        cluster.start(worker_count=3)

        assert [worker.port for worker in cluster.workers] == [PORTS[3], PORTS[1], PORTS[2]]
        assert [worker.index for worker in cluster.workers] == [0, 1, 2]
        assert cluster.ports == PORTS[4:]
        assert cluster._worker_launcher.ports_per_host["h1"] == [PORTS[3]]
        assert worker_ports_listening(network, "h1") == [PORTS[3]]
        for host in [network.manager.name, "h2", "h3"]:
            assert listening_on(network, host, PORTS[3]), host
            assert not listening_on(network, host, PORTS[0]), host
        exited = [
            process
            for process in network.processes("h1", alive=False)
            if f"127.0.0.1:{PORTS[0]}" in " ".join(process.argv)
        ]
        assert len(exited) == 1
        assert exited[0].exit_code == 1

        cluster.cleanup()


def test_worker_gives_up_after_three_taken_ports() -> None:
    network = sim.Network(2, seed=18)
    network.set_start_delay("worker", 1.0, host="h1")
    held: list[int] = []
    racing = True

    def take_each_h1_worker_port() -> None:
        # Another program binds every port a starting worker on h1 is about to bind.
        for process in network.processes("h1"):
            if "distributed.cli.dask_worker" not in process.argv:
                continue
            address = process.argv[process.argv.index("--listen-address") + 1]
            port = int(address.rsplit(":", 1)[1])
            if port not in network.listening_ports("h1"):
                network.hold_port("h1", port)
                held.append(port)
        if racing:
            network.clock.schedule(0.25, take_each_h1_worker_port)

    with simulated_group(network) as group:
        cluster = DaskCluster(group, ports=PORTS)
        cluster.start_master(40999)
        network.clock.schedule(0.25, take_each_h1_worker_port)

        with pytest.raises(NoPortsLeftError, match="worker 0 on host 'h1'") as raised:
            cluster.start_workers(2)
        racing = False

        assert held == [PORTS[0], PORTS[2], PORTS[3]]
        assert str(held) in str(raised.value)
        assert cluster.workers == []
        assert cluster._worker_launcher.ports_per_host == {}
        assert [p for p in network.processes() if "dask_worker" in " ".join(p.argv)] == []
        cluster.cleanup()
        for port in held:
            network.release_port("h1", port)


def test_moved_worker_without_free_port_raises() -> None:
    network = sim.Network(2, seed=19)
    network.faults.port_race("h2", PORTS[0])

    with simulated_group(network) as group:
        cluster = DaskCluster(group, ports=PORTS[:2])

        with pytest.raises(NoPortsLeftError):
            cluster.start(worker_count=2, master_port=40999)

        assert cluster.master_port is None
        assert cluster.workers == []
        assert network.processes() == []
        assert network.open_tunnels() == []


def test_start_overlaps_scheduler_and_workers() -> None:
    network = sim.Network(2, seed=21)
    network.set_start_delay("scheduler", 2.0)

    with simulated_group(network) as group:
        with DaskCluster(group, ports=PORTS) as cluster:
            kinds = [(event.kind, event.detail) for event in network.trace]
            ready = kinds.index(("scheduler.ready", cluster.scheduler_address))
            worker_starts = [
                index
                for index, (kind, detail) in enumerate(kinds)
                if kind == "process.start" and detail.endswith(" worker")
            ]
            assert len(worker_starts) == 2
            assert max(worker_starts) < ready
            assert len(cluster.workers) == 2


def test_start_retries_default_port_taken_at_bind() -> None:
    network = sim.Network(2, seed=22)
    hold_port_when_scheduler_starts(network, DaskCluster.DEFAULT_MASTER_PORT)

    with simulated_group(network) as group:
        cluster = DaskCluster(group, ports=PORTS)
        cluster.start()
        try:
            scheduler_starts = [
                event
                for event in network.trace
                if event.kind == "process.start" and event.detail.endswith(" scheduler")
            ]
            assert len(scheduler_starts) == 2
            assert cluster.master_port == PORTS[0]
            assert [worker.port for worker in cluster.workers] == PORTS[1:3]
            # The workers of the first attempt are gone. Only the new ones listen.
            for host in group.hosts:
                assert len(worker_ports_listening(network, host)) == 1
        finally:
            cluster.cleanup()
        network.release_port(network.manager.name, DaskCluster.DEFAULT_MASTER_PORT)


def test_start_explicit_port_taken_at_bind() -> None:
    network = sim.Network(2, seed=23)
    hold_port_when_scheduler_starts(network, PORTS[0])

    with simulated_group(network) as group:
        cluster = DaskCluster(group, ports=PORTS[1:])

        with pytest.raises(PortInUseError, match="taken while the scheduler started"):
            cluster.start(master_port=PORTS[0])

        assert cluster.master_port is None
        assert cluster.workers == []
        for host in group.hosts:
            assert worker_ports_listening(network, host) == []
        network.release_port(network.manager.name, PORTS[0])


def test_version_check_without_package_probes_host() -> None:
    network = sim.Network(2, seed=24)
    network.host("h2").distributed_version = None

    with simulated_group(network) as group:
        assert group.get_runtime("h2").distributed_version is None
        assert group.get_runtime("h1").distributed_version == network.host("h1").distributed_version

        with pytest.raises(VersionMismatchError, match="'h2' has no installed version"):
            DaskCluster(group, ports=PORTS).start()

        assert network.processes() == []


def test_cleanup_stops_master_after_worker_failure() -> None:
    class InterruptedCleanup(RoundRobinLauncher):
        interrupted = False

        def cleanup(self) -> None:
            # The first cleanup is interrupted before it stops anything.
            if not self.interrupted:
                self.interrupted = True
                raise KeyboardInterrupt
            super().cleanup()

    network = sim.Network(2, seed=25)

    with simulated_group(network) as group:
        launcher = InterruptedCleanup(group)
        cluster = DaskCluster(group, ports=PORTS, worker_launcher=launcher)
        cluster.start()

        with pytest.raises(KeyboardInterrupt):
            cluster.cleanup()

        assert cluster.master_port is None
        assert not any(p.program.name == "scheduler" for p in network.processes())
        cluster.cleanup()
        assert network.processes() == []


def test_cleanup_gives_back_port_list() -> None:
    network = sim.Network(2, seed=26)

    with simulated_group(network) as group:
        cluster = DaskCluster(group, ports=PORTS[:4])
        for _ in range(4):
            cluster.start(worker_count=2)
            assert [worker.port for worker in cluster.workers] == PORTS[:2]
            assert [worker.host for worker in cluster.workers] == group.hosts
            assert cluster.ports == PORTS[2:4]
            cluster.cleanup()
            assert cluster.ports == PORTS[:4]


def test_version_mismatch_names_every_host() -> None:
    network = sim.Network(3, seed=27)
    network.host("h2").distributed_version = "2024.1.0"
    network.host("h3").distributed_version = None

    with simulated_group(network) as group:
        with pytest.raises(VersionMismatchError, match="'h2' has version 2024.1.0") as raised:
            DaskCluster(group, ports=PORTS).start()

        assert raised.value.other_hosts == [("h3", None)]
        assert "'h3' (not installed)" in str(raised.value)
        # The versions are known at connect, so the scheduler never started.
        assert not any(event.kind == "process.start" for event in network.trace)


def test_scheduler_port_taken_on_host_tries_next() -> None:
    network = sim.Network(2, seed=28)
    # h2 reports PORTS[0] free, then another program (say, a second cluster
    # starting on the same hosts) takes it before the scheduler's forward opens.
    network.faults.port_race("h2", PORTS[0])

    with simulated_group(network) as group:
        launcher = LocalMasterLauncher(group)

        remaining = launcher.start(PORTS[:4], timeout=10)

        assert launcher.port == PORTS[1]
        assert remaining == PORTS[2:4]
        assert listening_on(network, "h1", PORTS[1])
        assert listening_on(network, "h2", PORTS[1])
        launcher.cleanup()


def test_explicit_scheduler_port_taken_on_host_raises() -> None:
    network = sim.Network(2, seed=29)
    network.faults.port_race("h2", PORTS[0])

    with simulated_group(network) as group:
        cluster = DaskCluster(group, ports=PORTS[1:])

        with pytest.raises(PortInUseError, match="taken while the scheduler started"):
            cluster.start(master_port=PORTS[0])

        assert cluster.master_port is None
        assert network.processes() == []
