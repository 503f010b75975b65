"""The same seeded scenario on the simulator and on Docker hosts gives the same observable outcome.

Observable means the error type, or else the master port, each worker's
index, host index and port, the ports left in the list and the ports the
workers listen on. Whether anything was left running is observable too. Host names differ between the
backends, so hosts are compared by their index in the group.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, note
from invariants import new_cluster
from profiles import DOCKER_SETTINGS
from scenario import Bed
from sim_world import SimBed
from strategies import Start, any_outcome, bed_allowance

from lazycluster.exceptions import LazyclusterError


def outcome(bed: Bed, start: Start) -> dict[str, Any]:
    """Run one start on `bed` and return what a user can observe of it."""
    with bed.open(start.scenario) as world:
        cluster, launcher = new_cluster(world, start.ports, start.default_master_port)
        cluster.master_start_timeout = bed_allowance(bed) + 1.0
        cluster.worker_start_timeout = bed_allowance(bed) + 2.0
        result: dict[str, Any] = {"error": None}
        try:
            cluster.start(worker_count=start.workers, master_port=start.master_port)
        except LazyclusterError as error:
            result["error"] = type(error).__name__
        else:
            result["master_port"] = cluster.master_port
            result["workers"] = sorted(
                (w.index, world.index(w.host), w.port) for w in launcher.workers
            )
            result["remaining"] = cluster.ports
            result["listening"] = {
                index: sorted(world.worker_ports(index)) for index in range(len(world.hosts))
            }
            cluster.cleanup()
        left = world.leftovers().running
        note(f"{bed.name} left running: {left}")
        result["left_running"] = left != []
    return result


@pytest.mark.docker
def test_sim_and_docker_agree(ssh_hosts: Any) -> None:
    from docker_world import DockerBed

    docker_bed = DockerBed(ssh_hosts)
    sim_bed = SimBed()
    sim_bed.max_hosts = docker_bed.max_hosts
    try:

        @DOCKER_SETTINGS
        @given(any_outcome(docker_bed))
        def check(case: tuple[Start, type[Exception] | None]) -> None:
            start, _expected = case
            note(f"start: {start!r}")
            on_sim = outcome(sim_bed, start)
            on_docker = outcome(docker_bed, start)
            note(f"sim: {on_sim}\ndocker: {on_docker}")
            assert on_sim == on_docker

        check()
    finally:
        docker_bed.close()
