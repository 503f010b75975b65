"""Round-robin placement, port choice and port exhaustion, on the simulator and on Docker hosts."""

from __future__ import annotations

from hypothesis import given, note
from invariants import (
    check_clean,
    check_mesh,
    check_nothing_running,
    check_ports,
    check_round_robin,
    expect_start,
    new_cluster,
)
from profiles import settings_for
from scenario import Bed
from strategies import Start, free_starts, starts

from lazycluster.exceptions import LazyclusterError


def test_round_robin_placement(bed: Bed) -> None:
    @settings_for(bed)
    @given(free_starts(bed))
    def check(start: Start) -> None:
        note(f"start: {start!r}")
        with bed.open(start.scenario) as world:
            note(world.describe())
            cluster, launcher = new_cluster(world, start.ports, start.default_master_port)
            cluster.start(worker_count=start.workers, master_port=start.master_port)
            try:
                assert len(launcher.workers) == start.workers
                check_round_robin(world, launcher)
                check_mesh(world, start.master_port, [w.port for w in launcher.workers])
            finally:
                cluster.cleanup()
            check_nothing_running(world)
        check_clean(world)

    check()


def test_port_choice_and_exhaustion(bed: Bed) -> None:
    @settings_for(bed)
    @given(starts(bed))
    def check(start: Start) -> None:
        scenario = start.scenario
        expected = expect_start(
            start.ports,
            scenario.taken_anywhere,
            start.workers,
            start.master_port,
            start.default_master_port,
        )
        note(f"start: {start!r}\nexpected: {expected!r}")
        with bed.open(scenario) as world:
            note(world.describe())
            cluster, launcher = new_cluster(world, start.ports, start.default_master_port)
            try:
                cluster.start(worker_count=start.workers, master_port=start.master_port)
            except LazyclusterError as error:
                note(f"raised: {error!r}")
                assert expected.error is not None and type(error) is expected.error, (
                    f"raised {type(error).__name__}, expected {expected}"
                )
                assert cluster.master_port is None
                assert launcher.workers == []
                check_nothing_running(world)
            else:
                assert expected.error is None, (
                    f"start succeeded, expected {expected.error.__name__}"
                )
                try:
                    check_ports(cluster, launcher, expected)
                    check_round_robin(world, launcher)
                finally:
                    cluster.cleanup()
                check_nothing_running(world)
        check_clean(world)

    check()
