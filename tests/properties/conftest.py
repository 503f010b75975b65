"""The `bed` fixture: every property runs once per backend, "sim" and "docker".

The docker parametrization carries the `docker` marker, so `nox -s tests`
(-m "not docker") runs the simulator half and `nox -s integration` the Docker
half. Hypothesis settings differ per backend; see profiles.py.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from scenario import Bed


@pytest.fixture(scope="session", params=["sim", pytest.param("docker", marks=pytest.mark.docker)])
def bed(request: pytest.FixtureRequest) -> Iterator[Bed]:
    if request.param == "sim":
        from sim_world import SimBed

        yield SimBed()
        return

    from docker_world import DockerBed

    docker_bed = DockerBed(request.getfixturevalue("ssh_hosts"))
    try:
        yield docker_bed
    finally:
        docker_bed.close()
