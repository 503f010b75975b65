"""Tests of a small downstream project that uses lazycluster, run on the simulator.

The project under test is `train_everywhere` below: it sends a training command
to every host of a group and collects the reported losses. Nothing here starts
a real machine: the `sim_network` and `sim_group` fixtures come from the
lazycluster simulator's pytest plugin, which pytest loads by itself once
lazycluster is installed.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings

from lazycluster import RuntimeGroup, RuntimeTask
from lazycluster.cluster.dask_cluster import DaskCluster
from lazycluster.cluster.exceptions import WorkerStartError
from lazycluster.transport import use_backend
from sim.strategies import networks

# --- the downstream code under test ------------------------------------------------


def train_everywhere(group: RuntimeGroup, epochs: int) -> dict[str, float]:
    """Run `train` on every host and return the final loss per host."""
    tasks = group.execute_task(
        RuntimeTask("train").run_command(f"train --epochs {epochs}"), broadcast=True
    )
    group.join()
    losses = {}
    for task in tasks:
        last_line = task.execution_log[-1].splitlines()[-1]
        losses[task.host] = float(last_line.rpartition("loss=")[2])
    return losses


# --- a fake `train` executable for the simulated hosts ------------------------------


def fake_train(call):
    """Pretend to train: take 10 virtual seconds per epoch and print a loss."""
    epochs = int(call.argv[call.argv.index("--epochs") + 1])
    call.sleep(10 * epochs)
    call.write(f"loss={1 / (epochs + 1):.3f}")
    return 0


# --- tests ---------------------------------------------------------------------------


def test_training_reports_one_loss_per_host(sim_network, sim_group):
    sim_network.register_command("train", fake_train)

    losses = train_everywhere(sim_group, epochs=3)

    assert sorted(losses) == ["h1", "h2", "h3"]
    assert set(losses.values()) == {0.25}


@pytest.mark.sim(hosts=["gpu1", "cpu1"], seed=7)
def test_dask_cluster_on_two_hosts(sim_network):
    with RuntimeGroup(hosts=["gpu1", "cpu1"]) as group:
        cluster = DaskCluster(group)
        cluster.start(worker_count=4)
        assert cluster.master_port == 8786
        assert sim_network.clock.monotonic() < 5  # virtual seconds
        cluster.cleanup()
    sim_network.assert_clean()


def test_crashing_worker_fails_the_start_and_leaves_nothing(sim_network, sim_group):
    sim_network.faults.crash("h2", "worker", after=0.1)

    with pytest.raises(WorkerStartError) as caught:
        DaskCluster(sim_group).start()

    assert caught.value.hosts == ["h2"]
    sim_group.cleanup()
    sim_network.assert_clean()


@settings(max_examples=20, deadline=None)
@given(network=networks(min_hosts=1, max_hosts=4))
def test_cluster_start_on_any_topology(network):
    with use_backend(network):
        group = RuntimeGroup(hosts=network.configured_hosts())
        cluster = DaskCluster(group)
        cluster.start()
        cluster.cleanup()
        group.cleanup()
    network.assert_clean()
