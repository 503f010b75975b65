"""Hypothesis strategies for scenarios and cluster starts, bounded by what a bed offers."""

from __future__ import annotations

from dataclasses import dataclass

from hypothesis import strategies as st
from invariants import expect_start
from scenario import MANAGER, PORT_UNIVERSE, Bed, Scenario

from lazycluster.cluster import MasterStartError, WorkerStartError

# Candidate lists come from the first ports of the universe and master ports
# from the last ones. The ranges overlap, so a master port can be in the list.
LIST_PORTS = PORT_UNIVERSE[:40]
MASTER_PORTS = PORT_UNIVERSE[30:]

seeds = st.integers(0, 2**32 - 1)


@dataclass(frozen=True)
class Start:
    """One call of DaskCluster.start on a scenario: port list, worker count, master port choice."""

    scenario: Scenario
    ports: tuple[int, ...]
    workers: int
    master_port: int | None
    default_master_port: int


def max_workers(bed: Bed, hosts: int) -> int:
    # Real workers cost about a second each on Docker; more than two per host
    # adds time without adding cases that the simulator does not cover.
    return 2 * hosts + 1 if bed.name == "docker" else 3 * hosts + 2


@st.composite
def starts(draw: st.DrawFn, bed: Bed, max_taken: int = 6) -> Start:
    """A scenario with ports taken anywhere and a start that may or may not have enough ports."""
    hosts = draw(st.integers(1, bed.max_hosts))
    places = st.sampled_from([MANAGER, *range(hosts)])
    taken = draw(
        st.lists(
            st.tuples(places, st.sampled_from(PORT_UNIVERSE)),
            max_size=max_taken,
            unique_by=lambda t: t[1],
        )
    )
    workers = draw(st.integers(1, max_workers(bed, hosts)))
    ports = draw(
        st.lists(st.sampled_from(LIST_PORTS), min_size=0, max_size=workers + 4, unique=True)
    )
    master_port = draw(st.none() | st.sampled_from(MASTER_PORTS))
    default_master_port = draw(st.sampled_from(MASTER_PORTS))
    scenario = Scenario(hosts=hosts, taken=tuple(taken), seed=draw(seeds))
    return Start(scenario, tuple(ports), workers, master_port, default_master_port)


@st.composite
def free_starts(draw: st.DrawFn, bed: Bed) -> Start:
    """A start with enough free ports: any host count, fewer, equal or more workers than hosts."""
    hosts = draw(st.integers(1, bed.max_hosts))
    workers = draw(st.integers(1, max_workers(bed, hosts)))
    ports = tuple(PORT_UNIVERSE[: workers + 2])
    scenario = Scenario(hosts=hosts, seed=draw(seeds))
    return Start(scenario, ports, workers, PORT_UNIVERSE[-1], PORT_UNIVERSE[-2])


def bed_allowance(bed: Bed) -> float:
    return bed.start_allowance


@st.composite
def any_outcome(draw: st.DrawFn, bed: Bed) -> tuple[Start, type[Exception] | None]:
    """A start that may lack ports and may have a slow scheduler or a slow worker host.

    Returns the start and the error it must raise (None for success).
    """
    start = draw(starts(bed))
    ports = expect_start(
        start.ports,
        start.scenario.taken_anywhere,
        start.workers,
        start.master_port,
        start.default_master_port,
    )
    # The scheduler's port is chosen first, then the workers' ports, and only
    # then does the start wait for the scheduler to listen. The workers start
    # only with enough ports.
    slowness = draw(st.sampled_from(["none", "scheduler", "worker"]))
    delays: tuple = ()
    expected = ports.error
    if slowness == "scheduler":
        delays = ((MANAGER, "scheduler", 30.0),)
        if ports.error is None:
            expected = MasterStartError
    elif slowness == "worker":
        slow_host = draw(st.integers(0, start.scenario.hosts - 1))
        delays = ((slow_host, "worker", 60.0),)
        # Worker i runs on host i mod N, so host s gets a worker when s < W.
        if slow_host < start.workers and ports.error is None:
            expected = WorkerStartError
    scenario = Scenario(start.scenario.hosts, start.scenario.taken, delays, start.scenario.seed)
    return Start(
        scenario, start.ports, start.workers, start.master_port, start.default_master_port
    ), expected
