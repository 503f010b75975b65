"""A cluster start with faults, used to compare traces across runs and processes."""

from __future__ import annotations

import sys

import sim
from lazycluster import Runtime, RuntimeGroup, RuntimeTask
from lazycluster.cluster.dask_cluster import DaskCluster
from lazycluster.exceptions import LazyclusterError
from lazycluster.transport import use_backend


def add(a: int, b: int) -> int:
    return a + b


def run_scenario(seed: int) -> list[sim.TraceEvent]:
    """Run tasks and two cluster starts (one hit by faults) and return the trace."""
    plan = sim.FaultPlan(
        (
            sim.Fault("port_race", "h2", at=0.0, port=60002),
            sim.Fault("crash", "h3", at=0.0, program="worker", after=2.0),
            sim.Fault("unreachable", "h4", at=1.0, until=50.0),
        )
    )
    network = sim.Network(4, seed=seed, faults=plan)
    with use_backend(network):
        runtime = Runtime("h1")
        task = RuntimeTask("greet").run_command("echo hi $WORKING_DIR").run_function(add, a=1, b=2)
        runtime.execute_task(task, execute_async=False)
        runtime.cleanup()

        group = RuntimeGroup(hosts=["h1", "h2", "h3"])
        for _ in range(2):
            cluster = DaskCluster(group)
            try:
                cluster.start(worker_count=5)
            except LazyclusterError as error:
                network.record("test", "start.failed", type(error).__name__)
            cluster.cleanup()
        group.cleanup()
    return network.trace


if __name__ == "__main__":
    import tempfile

    from lazycluster.environment import Environment

    with tempfile.TemporaryDirectory(prefix="sim-scenario-logs-") as log_dir:
        Environment.main_directory = log_dir
        for event in run_scenario(int(sys.argv[1])):
            print(event)
