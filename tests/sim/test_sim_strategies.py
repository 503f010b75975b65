"""Hypothesis strategies of the simulator, and a cluster-start property built on them."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import sim
from lazycluster import RuntimeGroup
from lazycluster.cluster.dask_cluster import DaskCluster
from lazycluster.exceptions import LazyclusterError
from lazycluster.transport import use_backend
from sim.faults import FAULT_KINDS
from sim.strategies import fault_plans, networks, topologies

# Faults after which the library can still reach every host to clean up.
CLEANABLE_FAULTS = ("foreign_port", "port_race", "slow_start", "crash")


@given(topology=topologies(min_hosts=2, max_hosts=5))
def test_topologies_build_networks(topology):
    network = sim.Network(topology)
    assert network.configured_hosts() == list(topology)
    for name, specs in topology.items():
        assert network.host(name).cpu_cores == specs["cpu_cores"]


@given(plan=fault_plans(["h1", "h2"], max_faults=5))
def test_fault_plans_are_valid_and_ordered(plan):
    times = [fault.at for fault in plan]
    assert times == sorted(times)
    assert all(fault.kind in FAULT_KINDS and fault.host in ("h1", "h2") for fault in plan)
    sim.Network(["h1", "h2"], faults=plan)


@given(st.data())
def test_networks_note_replay_line(data):
    network = data.draw(networks(max_hosts=3, max_faults=2))
    assert isinstance(network, sim.Network)
    assert len(network.faults.applied) <= 2


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    network=networks(
        min_hosts=1,
        max_hosts=4,
        max_faults=3,
        kinds=CLEANABLE_FAULTS,
        fault_hosts_include_manager=True,
    )
)
def test_cluster_start_leaves_nothing(network):
    """A start hit by faults succeeds or raises a LazyclusterError, and cleanup leaves nothing."""
    with use_backend(network):
        group = RuntimeGroup(hosts=network.configured_hosts())
        cluster = DaskCluster(group)
        try:
            cluster.start()
        except LazyclusterError:
            pass
        cluster.cleanup()
        group.cleanup()
    network.assert_clean()
