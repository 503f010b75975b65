"""One description of a test situation, built the same way on the simulator and on Docker hosts.

A `Scenario` names N hosts, the ports that something outside the library
already listens on (on given hosts or on the manager) and how late given programs
start. `World` is that scenario made real on one backend: a `RuntimeGroup` of
the N hosts plus the questions the properties ask (which ports listen, what
did the library leave behind) and the faults they inject while running.

Hosts are addressed by their index in the group (0..N-1) or by MANAGER, so
one scenario means the same thing on every backend.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from tests.port_blocks import reserve_port_block

if TYPE_CHECKING:
    from lazycluster.clock import Clock
    from lazycluster.group import RuntimeGroup

MANAGER = "manager"
PROGRAMS = ("scheduler", "worker")

# Every port a property uses, the same for both backends within one run. The
# block differs between runs that share the manager, so they do not collide.
PORT_UNIVERSE = tuple(reserve_port_block(60, 20000, 29000))

Where = int | str  # a host index, or MANAGER


@dataclass(frozen=True)
class Scenario:
    """N hosts, ports already taken and start delays; `seed` drives the simulator's randomness.

    `taken` contains (where, port) pairs. `delays` contains (where, program, seconds):
    "scheduler" runs on MANAGER only, "worker" on host indexes.
    """

    hosts: int
    taken: tuple[tuple[Where, int], ...] = ()
    delays: tuple[tuple[Where, str, float], ...] = ()
    seed: int = 0

    def __post_init__(self) -> None:
        if self.hosts < 1:
            raise ValueError(f"Invalid host count {self.hosts!r}: expected at least 1.")
        for where, _port in self.taken:
            self._check_where(where)
        for where, program, seconds in self.delays:
            self._check_where(where)
            if program not in PROGRAMS or seconds < 0:
                raise ValueError(
                    f"Invalid delay {(where, program, seconds)!r}: expected a program of {PROGRAMS} and seconds >= 0."
                )
            if (program == "scheduler") != (where == MANAGER):
                raise ValueError(
                    f"Invalid delay {(where, program, seconds)!r}: the scheduler runs on the manager, workers on hosts."
                )

    def _check_where(self, where: Where) -> None:
        if where != MANAGER and not (isinstance(where, int) and 0 <= where < self.hosts):
            raise ValueError(
                f"Invalid place {where!r}: expected {MANAGER!r} or a host index below {self.hosts}."
            )

    @property
    def taken_anywhere(self) -> set[int]:
        return {port for _place, port in self.taken}


@dataclass
class Leftovers:
    """What the library left behind: processes, listening ports and tunnels, temporary dirs."""

    running: list[str] = field(default_factory=list)
    temp_dirs: list[str] = field(default_factory=list)

    def describe(self) -> str:
        return "\n".join(
            ["running or listening:", *self.running, "temporary dirs:", *self.temp_dirs]
        )


class World(ABC):
    """A scenario made real on one backend, with the group of its hosts."""

    backend: str
    scenario: Scenario
    hosts: list[str]
    group: RuntimeGroup

    # Seconds a program with no added delay needs, beyond its delay, to start
    # and register; a timeout this much above the delay must succeed.
    start_allowance: float
    # Seconds a failed start may take beyond its timeout; see each backend.
    timeout_margin: float

    @property
    @abstractmethod
    def clock(self) -> Clock:
        """The clock the library uses here; elapsed time is measured with it."""

    def host(self, where: Where) -> str:
        """Return the host name of an index (MANAGER stays MANAGER)."""
        return MANAGER if where == MANAGER else self.hosts[int(where)]

    def index(self, host: str) -> int:
        return self.hosts.index(host)

    @abstractmethod
    def take_port(self, where: Where, port: int) -> None:
        """Let something outside the library listen on `port` of `where` from now on."""

    @abstractmethod
    def release_ports(self) -> None:
        """Stop every listener started by `take_port` or by the scenario."""

    @abstractmethod
    def set_delay(self, where: Where, program: str, seconds: float) -> None:
        """Make `program` on `where` start `seconds` late from now on."""

    @abstractmethod
    def worker_ports(self, where: Where) -> set[int]:
        """Return the ports on which a live Dask worker process listens on `where`."""

    @abstractmethod
    def listening(self, where: Where, ports: Iterable[int]) -> set[int]:
        """Return which of `ports` something listens on at `where` (worker, tunnel or other)."""

    @abstractmethod
    def kill_worker(self, where: Where, port: int) -> None:
        """Kill (SIGKILL) the worker process listening on `port` of `where`."""

    @abstractmethod
    def leftovers(self) -> Leftovers:
        """Return what the library started and left anywhere (ports taken on purpose excluded)."""

    @abstractmethod
    def close(self) -> None:
        """Clean up the group, remove every fault and restore the previous backend."""

    def describe(self) -> str:
        return f"backend={self.backend} hosts={self.hosts} {self.scenario!r}"

    def __enter__(self) -> World:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class Bed(ABC):
    """Builds worlds on one backend; one bed lives for the whole test session."""

    name: str
    max_hosts: int
    # The start_allowance of this bed's worlds, for strategies that size timeouts.
    start_allowance: float

    @abstractmethod
    def open(self, scenario: Scenario) -> World:
        """Build `scenario`: hosts with their taken ports and delays, and a group of them."""
