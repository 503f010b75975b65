"""`Scenario` on the simulator: a fresh `sim.Network` per world, faults through its API."""

from __future__ import annotations

from collections.abc import Iterable

from scenario import MANAGER, Bed, Leftovers, Scenario, Where, World

import sim
from lazycluster.clock import Clock
from lazycluster.group import RuntimeGroup
from lazycluster.transport import set_backend
from sim.process import SIGKILL
from sim.programs import DaskWorker


class SimWorld(World):
    backend = "sim"

    # A delay set with set_start_delay is exact and every simulated operation
    # takes no virtual time, so a timeout at the delay already suffices.
    start_allowance = 0.0
    # The library polls with waits growing to 0.5 s but never sleeps past its
    # deadline, and simulated Dask programs exit at once on SIGTERM. So half a
    # second of virtual time is one poll step of slack, and more is a bug.
    timeout_margin = 0.5

    def __init__(self, scenario: Scenario) -> None:
        self.scenario = scenario
        self.network = sim.Network(scenario.hosts, seed=scenario.seed)
        self.hosts = list(self.network.hosts)
        self._held: set[tuple[str, int]] = set()
        for where, port in scenario.taken:
            self.take_port(where, port)
        for where, program, seconds in scenario.delays:
            self.set_delay(where, program, seconds)

        self._previous = set_backend(self.network)
        try:
            self.group = RuntimeGroup(hosts=self.hosts)
        except BaseException:
            set_backend(self._previous)
            raise

    @property
    def clock(self) -> Clock:
        return self.network.clock

    def _name(self, where: Where) -> str:
        return self.network.manager.name if where == MANAGER else self.hosts[int(where)]

    def take_port(self, where: Where, port: int) -> None:
        self.network.hold_port(self._name(where), port, "property test listener")
        self._held.add((self._name(where), port))

    def release_ports(self) -> None:
        for name, port in self._held:
            self.network.release_port(name, port)
        self._held.clear()

    def set_delay(self, where: Where, program: str, seconds: float) -> None:
        self.network.set_start_delay(program, seconds, host=self._name(where))

    def _workers(self, where: Where) -> list[sim.SimProcess]:
        return [
            process
            for process in self.network.processes(self._name(where))
            if isinstance(process.program, DaskWorker)
        ]

    def worker_ports(self, where: Where) -> set[int]:
        return {port for process in self._workers(where) for port in process.ports}

    def listening(self, where: Where, ports: Iterable[int]) -> set[int]:
        table = self.network.host(self._name(where)).ports
        return {port for port in ports if port in table}

    def kill_worker(self, where: Where, port: int) -> None:
        for process in self._workers(where):
            if port in process.ports:
                process.signal(SIGKILL)
                return
        raise LookupError(f"No live worker listens on port {port} of {self._name(where)}.")

    def leftovers(self) -> Leftovers:
        found = Leftovers()
        for line in self.network.leftovers():
            (found.temp_dirs if "temporary directory" in line else found.running).append(line)
        return found

    def close(self) -> None:
        try:
            self.group.cleanup()
        finally:
            set_backend(self._previous)

    def describe(self) -> str:
        # First line of each event only: commands with Python snippets span many lines.
        tail = [str(event).splitlines()[0] for event in self.network.trace[-15:]]
        return "\n".join([super().describe(), self.network.describe(), "trace tail:", *tail])


class SimBed(Bed):
    name = "sim"
    max_hosts = 6
    start_allowance = SimWorld.start_allowance

    def open(self, scenario: Scenario) -> World:
        return SimWorld(scenario)
