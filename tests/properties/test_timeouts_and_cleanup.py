"""Start timeouts of scheduler and workers, and cleanup after every outcome, on both backends.

Elapsed time is read from the clock the library uses: virtual on the
simulator, real on Docker. Each backend states its `timeout_margin` (how long
a failed start may take beyond its timeout) and `start_allowance` (how long a
program without added delay needs) next to its world.
"""

from __future__ import annotations

import pytest
from hypothesis import given, note
from hypothesis import strategies as st
from invariants import check_clean, check_nothing_running, new_cluster
from profiles import settings_for
from scenario import MANAGER, PORT_UNIVERSE, Bed, Scenario
from strategies import Start, any_outcome, bed_allowance, seeds

from lazycluster.cluster import MasterStartError, WorkerStartError
from lazycluster.exceptions import LazyclusterError

MASTER_PORT = PORT_UNIVERSE[-1]
WORKER_PORTS = PORT_UNIVERSE[:20]

# Rounding of drawn seconds, so that a delay prints the same in a shell script.
PLACES = 3

# The range of how much later than its timeout a slow program starts, per
# backend. On Docker the wrapper is killed at cleanup, so a long delay is free.
SLOW_BY = {"sim": (0.001, 30.0), "docker": (30.0, 30.0)}


def seconds(low: float, high: float) -> st.SearchStrategy[float]:
    return st.floats(low, high, allow_nan=False).map(lambda value: round(value, PLACES))


@st.composite
def master_timings(draw: st.DrawFn, bed: Bed) -> tuple[bool, float, float]:
    """(slow, timeout, scheduler delay): slow delays exceed the timeout, fast ones leave room."""
    slow = draw(st.booleans())
    if slow:
        timeout = draw(seconds(0.1, 20.0) if bed.name == "sim" else seconds(1.0, 3.0))
        low, high = SLOW_BY[bed.name]
        return True, timeout, round(timeout + draw(seconds(low, high)), PLACES)
    delay = draw(seconds(0.0, 20.0) if bed.name == "sim" else seconds(0.0, 2.0))
    return False, round(delay + bed_allowance(bed) + draw(seconds(0.001, 1.0)), PLACES), delay


def test_scheduler_start_timeout(bed: Bed) -> None:
    @settings_for(bed)
    @given(master_timings(bed), st.integers(1, bed.max_hosts), seeds)
    def check(timing: tuple[bool, float, float], hosts: int, seed: int) -> None:
        slow, timeout, delay = timing
        scenario = Scenario(hosts=hosts, delays=((MANAGER, "scheduler", delay),), seed=seed)
        note(f"slow={slow} timeout={timeout} delay={delay}")
        with bed.open(scenario) as world:
            note(world.describe())
            cluster, _launcher = new_cluster(world, WORKER_PORTS, MASTER_PORT)
            started = world.clock.monotonic()
            try:
                cluster.start_master(MASTER_PORT, timeout=timeout)
            except MasterStartError as error:
                elapsed = world.clock.monotonic() - started
                note(f"raised after {elapsed:.3f} s: {error}")
                assert slow, f"a scheduler {delay} s late failed with timeout {timeout} s"
                assert timeout - 1e-6 <= elapsed <= timeout + world.timeout_margin
                assert cluster.master_port is None
            else:
                assert not slow, f"a scheduler {delay} s late started within timeout {timeout} s"
                assert cluster.master_port == MASTER_PORT
            cluster.cleanup()
            check_nothing_running(world)
        check_clean(world)

    check()


@st.composite
def worker_timings(draw: st.DrawFn, bed: Bed) -> tuple[Scenario, float, frozenset[int]]:
    """A scenario whose hosts in the returned set start workers after the timeout, the others in time."""
    hosts = draw(st.integers(1, bed.max_hosts))
    allowance = bed_allowance(bed)
    slow_hosts = draw(st.frozensets(st.integers(0, hosts - 1), max_size=hosts))
    if slow_hosts:
        timeout = round(allowance + draw(seconds(0.5, 3.0)), PLACES)
        low, high = SLOW_BY[bed.name]
        late = round(timeout + draw(seconds(low, high)), PLACES)
        delays = tuple(
            (index, "worker", late if index in slow_hosts else 0.0) for index in range(hosts)
        )
    else:
        delay = draw(seconds(0.0, 20.0) if bed.name == "sim" else seconds(0.0, 2.0))
        timeout = round(delay + allowance + draw(seconds(0.001, 1.0)), PLACES)
        delays = tuple((index, "worker", delay) for index in range(hosts))
    return Scenario(hosts=hosts, delays=delays, seed=draw(seeds)), timeout, slow_hosts


def test_worker_start_timeout(bed: Bed) -> None:
    @settings_for(bed)
    @given(worker_timings(bed))
    def check(timing: tuple[Scenario, float, frozenset[int]]) -> None:
        scenario, timeout, slow_hosts = timing
        note(f"timeout={timeout} slow host indexes={sorted(slow_hosts)}")
        with bed.open(scenario) as world:
            note(world.describe())
            cluster, launcher = new_cluster(world, WORKER_PORTS, MASTER_PORT)
            cluster.start_master(MASTER_PORT, timeout=30)
            cluster.worker_start_timeout = timeout
            started = world.clock.monotonic()
            try:
                cluster.start_workers(scenario.hosts)
            except WorkerStartError as error:
                elapsed = world.clock.monotonic() - started
                note(f"raised after {elapsed:.3f} s: {error}")
                assert error.hosts == sorted(world.hosts[index] for index in slow_hosts)
                assert timeout - 1e-6 <= elapsed <= timeout + world.timeout_margin
                assert launcher.workers == []
                for index in range(scenario.hosts):
                    assert world.worker_ports(index) == set()
            else:
                assert not slow_hosts, (
                    f"workers on {sorted(slow_hosts)} were late but the start succeeded"
                )
                assert len(launcher.workers) == scenario.hosts
            cluster.cleanup()
            check_nothing_running(world)
        check_clean(world)

    check()


def test_cleanup_after_any_start(bed: Bed) -> None:
    @settings_for(bed)
    @given(any_outcome(bed))
    def check(case: tuple[Start, type[Exception] | None]) -> None:
        start, expected = case
        note(f"start: {start!r}\nexpected error: {expected}")
        with bed.open(start.scenario) as world:
            note(world.describe())
            cluster, launcher = new_cluster(world, start.ports, start.default_master_port)
            cluster.master_start_timeout = bed_allowance(bed) + 1.0
            cluster.worker_start_timeout = bed_allowance(bed) + 2.0
            try:
                cluster.start(worker_count=start.workers, master_port=start.master_port)
            except LazyclusterError as error:
                note(f"raised: {error!r}")
                assert type(error) is expected, (
                    f"raised {type(error).__name__}, expected {expected}"
                )
                assert cluster.master_port is None
                assert launcher.workers == []
            else:
                assert expected is None, f"start succeeded, expected {expected.__name__}"
                cluster.cleanup()
            check_nothing_running(world)
            cluster.cleanup()  # a second cleanup is harmless
            check_nothing_running(world)
        check_clean(world)

    check()


def test_invalid_timeouts_are_refused(bed: Bed) -> None:
    with bed.open(Scenario(hosts=1)) as world:
        cluster, _launcher = new_cluster(world, WORKER_PORTS, MASTER_PORT)
        for bad in (0, -1, "3", True):
            with pytest.raises((TypeError, ValueError)):
                cluster.start_master(MASTER_PORT, timeout=bad)  # type: ignore[arg-type]
        check_nothing_running(world)


def test_nan_timeout_is_refused(bed: Bed) -> None:
    # A NaN deadline never passes, so the start waits for as long as the scheduler
    # takes; 5 s late keeps a failing run short on both backends.
    with bed.open(Scenario(hosts=1, delays=((MANAGER, "scheduler", 5.0),))) as world:
        cluster, _launcher = new_cluster(world, WORKER_PORTS, MASTER_PORT)
        with pytest.raises(ValueError):
            cluster.start_master(MASTER_PORT, timeout=float("nan"))
        check_nothing_running(world)
