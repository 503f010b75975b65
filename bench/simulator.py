"""DaskCluster on the simulator: one large start and cleanup, and many small starts in a row.

The large cluster runs in a child process, because its 2 million simulated
tunnels take about half a gigabyte that the bench should not keep.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time

from bench.context import Context
from bench.report import Section
from bench.stats import Sample

log = logging.getLogger(__name__)

TITLE = "Simulator"

LARGE_HOSTS, LARGE_WORKERS = 1_000, 2_000
SMALL_HOSTS, SMALL_STARTS = 3, 200
CHILD_TIMEOUT = 300


def one_start(host_count: int, worker_count: int, with_cleanup: bool, seed: int = 0) -> dict[str, float]:
    """Build a simulated network, start a DaskCluster on it; return the seconds of each phase."""
    import sim
    from lazycluster.cluster.dask_cluster import DaskCluster
    from lazycluster.group import RuntimeGroup
    from lazycluster.transport import use_backend

    network = sim.Network(host_count, seed=seed)
    seconds: dict[str, float] = {}
    with use_backend(network):
        group = RuntimeGroup(hosts=list(network.hosts))
        # The default port range contains fewer ports than the large cluster needs.
        cluster = DaskCluster(group, ports=list(range(30000, 30000 + worker_count + 100)))
        started = time.perf_counter()
        cluster.start(worker_count=worker_count)
        seconds["start"] = time.perf_counter() - started
        if with_cleanup:
            started = time.perf_counter()
            cluster.cleanup()
            seconds["cleanup"] = time.perf_counter() - started
            group.cleanup()
            network.assert_clean()
    return seconds


def in_child(host_count: int, worker_count: int, with_cleanup: bool) -> dict[str, float]:
    code = (
        "import json, os, sys\n"
        "from bench.simulator import one_start\n"
        f"print(json.dumps(one_start({host_count}, {worker_count}, {with_cleanup})), flush=True)\n"
        "os._exit(0)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=CHILD_TIMEOUT, check=False, cwd=os.getcwd())
    if result.returncode != 0:
        raise RuntimeError(f"simulated start of {host_count} hosts failed:\n{result.stderr[-3000:]}")
    return dict(json.loads(result.stdout.strip().splitlines()[-1]))


def measure(context: Context, section: Section) -> None:
    runs = context.runs(3, 1)
    large = [in_child(LARGE_HOSTS, LARGE_WORKERS, True) for _ in range(runs)]
    section.add("sim-large", f"DaskCluster.start(), {LARGE_HOSTS:,} simulated hosts × {LARGE_WORKERS:,} workers", Sample(tuple(r["start"] for r in large)))
    section.add("sim-large-cleanup", f"DaskCluster.cleanup(), {LARGE_HOSTS:,} simulated hosts × {LARGE_WORKERS:,} workers", Sample(tuple(r["cleanup"] for r in large)))
    section.goal(f"Simulated start, {LARGE_HOSTS:,} hosts × {LARGE_WORKERS:,} workers", "sim-large", 2.0)

    per_start, cycles = [], []
    for seed in range(SMALL_STARTS):
        started = time.perf_counter()
        per_start.append(one_start(SMALL_HOSTS, 2 * SMALL_HOSTS, True, seed=seed)["start"])
        cycles.append(time.perf_counter() - started)
    section.add("sim-small", f"DaskCluster.start(), {SMALL_HOSTS} simulated hosts × {2 * SMALL_HOSTS} workers (each of {SMALL_STARTS} starts)", Sample(tuple(per_start)))
    section.add("sim-small-total", f"{SMALL_STARTS} cycles of new network, start, cleanup, clean check (total)", Sample((sum(cycles),)))
    section.goal(f"{SMALL_STARTS} simulated cluster starts in a row", "sim-small-total", 10.0)

    section.note(
        "Simulated time is virtual, so these figures are the library's own Python work plus the "
        "simulator's bookkeeping, on one core. The large start opens W × (H − 1) + W + H, about 2 "
        "million, simulated tunnels in one batch per host. In a cProfile run most of its time went "
        "to creating those tunnel objects, to the garbage collector scanning them and to planning "
        "the mesh. Each large run ends with the network's check that nothing is left running."
    )
    section.note(
        f"The {SMALL_STARTS} small starts are plain loops, not Hypothesis examples: Hypothesis adds "
        "its own generation and shrinking cost on top. Each cycle builds a new network with its own "
        "seed and checks at the end that nothing is left running."
    )
