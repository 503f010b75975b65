"""Faults of simulated hosts, each switched on for one host at one virtual time.

Build them with the fluent API, `network.faults.at(2.0).unreachable("h1")`,
or as data: a `FaultPlan` of `Fault` records, which Hypothesis can draw and
print so that a failing example can be replayed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from sim.host import ForeignHolder

if TYPE_CHECKING:
    from sim.host import SimHost
    from sim.network import Network

FAULT_KINDS = (
    "unreachable",  # connect fails, open connections drop (until `until`)
    "auth_failure",  # connect fails with AuthenticationError (until `until`)
    "drop_connection",  # the next `operation` (any when None) on the host loses the connection
    "foreign_port",  # a foreign process listens on `port` (until `until`)
    "port_race",  # `port` is taken right after a check reports it free
    "slow_start",  # `program` takes `delay` seconds to bind its port
    "crash",  # the next `program` started exits with `exit_code` `after` seconds
    "restart",  # the host reboots: processes gone, connections lost
)


@dataclass(frozen=True)
class Fault:
    """One fault: what happens (`kind`), where (`host`) and from when (`at`, virtual seconds)."""

    kind: str
    host: str
    at: float = 0.0
    until: float | None = None
    port: int | None = None
    program: str | None = None
    operation: str | None = None
    delay: float = 0.0
    after: float = 0.0
    exit_code: int = 1

    def __post_init__(self) -> None:
        if self.kind not in FAULT_KINDS:
            raise ValueError(f"Invalid fault kind {self.kind!r}: expected one of {FAULT_KINDS}.")
        if self.kind in ("foreign_port", "port_race") and self.port is None:
            raise ValueError(f"Fault {self.kind!r} on {self.host!r} needs a port.")
        if self.until is not None and self.until < self.at:
            raise ValueError(f"Fault {self.kind!r} on {self.host!r} ends ({self.until}) before it starts ({self.at}).")


@dataclass(frozen=True)
class FaultPlan:
    """An ordered collection of faults, applied together with `Network.apply`."""

    faults: tuple[Fault, ...] = ()

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self.faults)

    def __len__(self) -> int:
        return len(self.faults)

    def hosts(self) -> set[str]:
        return {fault.host for fault in self.faults}


class FaultInjector:
    """Applies faults to a network and hands out the pending one-shot faults when they trigger."""

    def __init__(self, network: Network) -> None:
        self.network = network
        self.applied: list[Fault] = []
        self._drops: dict[str, list[Fault]] = {}
        self._races: dict[str, dict[int, Fault]] = {}
        self._crashes: dict[str, list[Fault]] = {}

    def at(self, time: float) -> FaultBuilder:
        """Return a builder whose faults start at virtual time `time`."""
        return FaultBuilder(self, time)

    def __getattr__(self, name: str):  # type: ignore[no-untyped-def]
        # network.faults.unreachable("h1") means "from now on".
        if name in FAULT_KINDS:
            return getattr(FaultBuilder(self, self.network.clock.monotonic()), name)
        raise AttributeError(name)

    def apply(self, fault: Fault) -> Fault:
        """Schedule `fault` to start at its `at` time (at once when that has passed)."""
        self.network.host(fault.host)  # raises KeyError for an unknown host
        self.applied.append(fault)
        self.network.clock.schedule_at(fault.at, lambda: self._activate(fault))
        if fault.until is not None:
            self.network.clock.schedule_at(fault.until, lambda: self._deactivate(fault))
        if fault.at <= self.network.clock.monotonic():
            self.network.clock.advance_to(self.network.clock.monotonic())
        return fault

    def _activate(self, fault: Fault) -> None:
        host = self.network.host(fault.host)
        self.network.record(fault.host, f"fault.{fault.kind}", _describe(fault))
        if fault.kind == "unreachable":
            host.unreachable = True
        elif fault.kind == "auth_failure":
            host.auth_fails = True
        elif fault.kind == "drop_connection":
            self._drops.setdefault(fault.host, []).append(fault)
        elif fault.kind == "foreign_port":
            assert fault.port is not None
            host.bind(fault.port, ForeignHolder(f"foreign process (fault at t={fault.at:g})"))
        elif fault.kind == "port_race":
            assert fault.port is not None
            self._races.setdefault(fault.host, {})[fault.port] = fault
        elif fault.kind == "slow_start":
            self.network.set_start_delay(fault.program or "*", fault.delay, host=fault.host)
        elif fault.kind == "crash":
            self._crashes.setdefault(fault.host, []).append(fault)
        elif fault.kind == "restart":
            self.network.restart_host(fault.host)

    def _deactivate(self, fault: Fault) -> None:
        host = self.network.host(fault.host)
        self.network.record(fault.host, f"fault.{fault.kind}.end", _describe(fault))
        if fault.kind == "unreachable":
            host.unreachable = False
        elif fault.kind == "auth_failure":
            host.auth_fails = False
        elif fault.kind == "foreign_port":
            holder = host.ports.get(fault.port)  # type: ignore[arg-type]
            if isinstance(holder, ForeignHolder):
                host.release(fault.port, holder)  # type: ignore[arg-type]

    # -- questions asked by the simulation -----------------------------------

    def take_drop(self, host: str, operation: str) -> bool:
        """Consume a pending connection drop for `operation` on `host`, if any."""
        pending = self._drops.get(host)
        if not pending:
            return False
        for index, fault in enumerate(pending):
            if fault.operation is None or fault.operation == operation:
                del pending[index]
                return True
        return False

    def after_port_check(self, host: SimHost, checked: list[int], used: set[int]) -> None:
        """Take racing ports that a check just reported free, before the caller can bind them."""
        races = self._races.get(host.name)
        if not races:
            return
        for port in checked:
            fault = races.get(port)
            if fault is not None and port not in used:
                del races[port]
                host.bind(port, ForeignHolder(f"foreign process (port race at t={fault.at:g})"))
                self.network.record(host.name, "fault.port_race.taken", f"port={port}")

    def take_crash(self, host: str, program: str) -> Fault | None:
        """Consume a pending crash for the next `program` started on `host`, if any."""
        pending = self._crashes.get(host)
        if not pending:
            return None
        for index, fault in enumerate(pending):
            if fault.program in (None, "*", program):
                del pending[index]
                return fault
        return None


class FaultBuilder:
    """Fluent constructor of faults that start at one time; every method applies its fault."""

    def __init__(self, injector: FaultInjector, time: float) -> None:
        self.injector = injector
        self.time = time

    def _add(self, kind: str, host: str, **fields: object) -> Fault:
        return self.injector.apply(Fault(kind, host, at=self.time, **fields))  # type: ignore[arg-type]

    def unreachable(self, host: str, until: float | None = None) -> Fault:
        return self._add("unreachable", host, until=until)

    def auth_failure(self, host: str, until: float | None = None) -> Fault:
        return self._add("auth_failure", host, until=until)

    def drop_connection(self, host: str, operation: str | None = None) -> Fault:
        return self._add("drop_connection", host, operation=operation)

    def foreign_port(self, host: str, port: int, until: float | None = None) -> Fault:
        return self._add("foreign_port", host, port=port, until=until)

    def port_race(self, host: str, port: int) -> Fault:
        return self._add("port_race", host, port=port)

    def slow_start(self, host: str, program: str, delay: float) -> Fault:
        return self._add("slow_start", host, program=program, delay=delay)

    def crash(self, host: str, program: str | None = None, after: float = 0.0, exit_code: int = 1) -> Fault:
        return self._add("crash", host, program=program, after=after, exit_code=exit_code)

    def restart(self, host: str) -> Fault:
        return self._add("restart", host)


def _describe(fault: Fault) -> str:
    parts = []
    for name in ("until", "port", "program", "operation"):
        value = getattr(fault, name)
        if value is not None:
            parts.append(f"{name}={value}")
    if fault.kind == "slow_start":
        parts.append(f"delay={fault.delay:g}")
    if fault.kind == "crash":
        parts.append(f"after={fault.after:g} exit_code={fault.exit_code}")
    return " ".join(parts)
