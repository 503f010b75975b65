"""A rule-based state machine: start, add workers, kill a worker, clean up, and faults.

The faults take and free ports and slow down or speed up the workers of a host.

One DaskCluster lives through a whole run: the port list shrinks as workers
are added, and a cleanup (also the one of a failed start) gives back the
whole list and starts the round robin at the first host again. The model keeps what must hold
(master port, worker ports, the remaining list, killed workers, taken ports)
and every invariant is checked after every step, on both backends.
"""

from __future__ import annotations

from hypothesis import note
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from invariants import (
    check_clean,
    check_mesh,
    check_nothing_running,
    check_round_robin,
    expect_start,
    new_cluster,
)
from profiles import settings_for
from scenario import MANAGER, PORT_UNIVERSE, Bed, Scenario, World
from strategies import bed_allowance, seeds

from lazycluster.cluster import WorkerStartError
from lazycluster.exceptions import LazyclusterError

LIST_PORTS = PORT_UNIVERSE[:16]
DEFAULT_MASTER_PORT = PORT_UNIVERSE[-1]

# Steps per run: the simulator affords long runs; on Docker each step starts
# or stops real processes, so a run stays short.
STEPS = {"sim": 25, "docker": 5}

# Seconds a worker on a slowed host starts late: far beyond the worker start
# timeout of the machine, which is the backend's start allowance plus 2 s.
LATE = 60.0


def cluster_machine(bed: Bed) -> type[RuleBasedStateMachine]:
    """Return a state machine class that builds its worlds on `bed`."""

    class ClusterMachine(RuleBasedStateMachine):
        world: World | None = None

        @initialize(hosts=st.integers(1, bed.max_hosts), seed=seeds)
        def open_world(self, hosts: int, seed: int) -> None:
            self.world = bed.open(Scenario(hosts=hosts, seed=seed))
            note(self.world.describe())
            self.cluster, self.launcher = new_cluster(self.world, LIST_PORTS, DEFAULT_MASTER_PORT)
            self.cluster.worker_start_timeout = bed_allowance(bed) + 2.0
            self.ports = list(LIST_PORTS)
            self.taken: set[int] = set()
            self.master: int | None = None
            self.worker_ports: list[int] = []
            self.killed: set[int] = set()
            self.slow_hosts: set[int] = set()
            # Index of the next worker; worker i runs on host i mod N.
            self.next_index = 0

        @property
        def running(self) -> bool:
            return self.master is not None

        def in_use(self) -> set[int]:
            return {self.master, *self.worker_ports} if self.master is not None else set()

        def place(self, count: int) -> bool:
            """Advance the round robin by `count` workers; return whether one lands on a slow host."""
            assert self.world is not None
            hosts = range(self.next_index, self.next_index + count)
            self.next_index += count
            return any(index % len(self.world.hosts) in self.slow_hosts for index in hosts)

        @precondition(lambda self: self.world is not None and not self.running)
        @rule(workers=st.integers(1, 4))
        def start(self, workers: int) -> None:
            expected = expect_start(self.ports, self.taken, workers, None, DEFAULT_MASTER_PORT)
            late = expected.error is None and self.place(workers)
            try:
                self.cluster.start(worker_count=workers)
            except LazyclusterError as error:
                # A failed start cleans up, which gives back the whole list.
                self.ports, self.next_index = list(LIST_PORTS), 0
                if late:
                    assert type(error) is WorkerStartError, f"raised {error!r}, expected WorkerStartError"
                    return
                assert type(error) is expected.error, f"raised {error!r}, expected {expected}"
                return
            assert not late, "start succeeded, but a worker was placed on a slow host"
            assert expected.error is None, f"start succeeded, expected {expected}"
            assert self.cluster.master_port == expected.master_port
            self.master = expected.master_port
            self.worker_ports = list(expected.worker_ports)
            self.ports = list(expected.remaining)

        @precondition(lambda self: self.world is not None and self.running)
        @rule(workers=st.integers(1, 3))
        def add_workers(self, workers: int) -> None:
            # The running master's port is given, so only the workers' choice is modelled.
            busy = self.taken | set(self.worker_ports)
            expected = expect_start(self.ports, busy, workers, self.master, DEFAULT_MASTER_PORT)
            late = expected.error is None and self.place(workers)
            try:
                self.cluster.start_workers(workers)
            except LazyclusterError as error:
                if late:
                    # A failed registration stops every worker; the master keeps running.
                    assert type(error) is WorkerStartError, f"raised {error!r}, expected WorkerStartError"
                    self.worker_ports, self.killed = [], set()
                    self.ports = list(expected.remaining)
                    self.next_index = 0
                    return
                assert type(error) is expected.error, f"raised {error!r}, expected {expected}"
                return
            assert not late, "adding workers succeeded, but one was placed on a slow host"
            assert expected.error is None, f"adding workers succeeded, expected {expected}"
            self.worker_ports += expected.worker_ports
            self.ports = list(expected.remaining)

        @precondition(
            lambda self: self.world is not None and len(self.killed) < len(self.worker_ports)
        )
        @rule(data=st.data())
        def kill_worker(self, data: st.DataObject) -> None:
            assert self.world is not None
            # Sorted, because the order of `workers` varies with the parallel starts on real hosts.
            workers = sorted(self.launcher.workers, key=lambda w: w.index)
            alive = [w for w in workers if w.port not in self.killed]
            worker = data.draw(st.sampled_from(alive), label="worker to kill")
            self.world.kill_worker(self.world.index(worker.host), worker.port)
            self.killed.add(worker.port)

        @precondition(lambda self: self.world is not None)
        @rule()
        def cleanup(self) -> None:
            self.cluster.cleanup()
            self.master, self.worker_ports, self.killed = None, [], set()
            self.ports, self.next_index = list(LIST_PORTS), 0

        @precondition(lambda self: self.world is not None)
        @rule(data=st.data())
        def take_port(self, data: st.DataObject) -> None:
            assert self.world is not None
            free = sorted({*self.ports, DEFAULT_MASTER_PORT} - self.taken - self.in_use())
            if not free:
                return
            port = data.draw(st.sampled_from(free), label="port to take")
            where = data.draw(
                st.sampled_from([MANAGER, *range(len(self.world.hosts))]), label="where"
            )
            self.world.take_port(where, port)
            self.taken.add(port)

        @precondition(lambda self: self.world is not None)
        @rule(data=st.data())
        def slow_down_host(self, data: st.DataObject) -> None:
            assert self.world is not None
            index = data.draw(st.integers(0, len(self.world.hosts) - 1), label="host to slow down")
            self.world.set_delay(index, "worker", LATE)
            self.slow_hosts.add(index)

        @precondition(lambda self: self.world is not None and bool(self.slow_hosts))
        @rule()
        def speed_up_hosts(self) -> None:
            assert self.world is not None
            for index in self.slow_hosts:
                self.world.set_delay(index, "worker", 0.0)
            self.slow_hosts.clear()

        @precondition(lambda self: self.world is not None and bool(self.taken))
        @rule()
        def release_ports(self) -> None:
            assert self.world is not None
            self.world.release_ports()
            self.taken.clear()

        @invariant()
        def holds(self) -> None:
            if self.world is None:
                return
            assert self.cluster.master_port == self.master
            assert self.cluster.ports == self.ports
            if not self.running:
                assert self.launcher.workers == []
                check_nothing_running(self.world)
                return
            # `workers` is in the order the parallel starts finished; the index gives the round robin.
            assert [
                w.port for w in sorted(self.launcher.workers, key=lambda w: w.index)
            ] == self.worker_ports
            check_round_robin(self.world, self.launcher, self.killed)
            assert self.master is not None
            check_mesh(self.world, self.master, set(self.worker_ports) - self.killed)

        def teardown(self) -> None:
            if self.world is None:
                return
            try:
                self.cluster.cleanup()
                check_nothing_running(self.world)
            finally:
                self.world.close()
            check_clean(self.world)

    return ClusterMachine


def test_cluster_state_machine(bed: Bed) -> None:
    machine_settings = settings_for(bed)
    run_state_machine_as_test(
        cluster_machine(bed),
        settings=type(machine_settings)(machine_settings, stateful_step_count=STEPS[bed.name]),
    )
