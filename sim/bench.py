"""Time `DaskCluster.start()` on a large simulated network.

    python -m sim.bench --hosts 1000 --workers 2000

Prints the wall-clock seconds of the start and of the cleanup, the virtual
seconds the start took and the number of tunnels it opened. The numbers
depend on the machine and its load; they are measurements, not limits.
"""

from __future__ import annotations

import argparse
import os
import time

from lazycluster.cluster.dask_cluster import DaskCluster
from lazycluster.environment import Environment
from lazycluster.group import RuntimeGroup
from lazycluster.transport import use_backend
from sim.network import Network

FIRST_PORT = 20000


def measure(hosts: int, workers: int, seed: int = 0, cleanup: bool = True) -> dict[str, float]:
    """Start a cluster of `workers` workers on `hosts` simulated hosts, then clean it up."""
    network = Network(hosts, seed=seed)
    with use_backend(network):
        group = RuntimeGroup(hosts=network.configured_hosts())
        cluster = DaskCluster(group, ports=list(range(FIRST_PORT, FIRST_PORT + workers + 10)))

        started = time.perf_counter()
        cluster.start(worker_count=workers)
        start_seconds = time.perf_counter() - started
        virtual_seconds = network.clock.monotonic()
        tunnels = len(network.open_tunnels())

        if not cleanup:
            return {
                "start_seconds": start_seconds,
                "cleanup_seconds": float("nan"),
                "virtual_seconds": virtual_seconds,
                "tunnels": tunnels,
            }
        started = time.perf_counter()
        cluster.cleanup()
        group.cleanup()
        cleanup_seconds = time.perf_counter() - started
    network.assert_clean()
    return {
        "start_seconds": start_seconds,
        "cleanup_seconds": cleanup_seconds,
        "virtual_seconds": virtual_seconds,
        "tunnels": tunnels,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hosts", type=int, default=100, help="number of simulated hosts")
    parser.add_argument("--workers", type=int, default=200, help="number of Dask workers")
    parser.add_argument("--seed", type=int, default=0, help="seed of the simulated network")
    parser.add_argument(
        "--log-dir", default=None, help="folder for task execution logs (default: ./lazycluster)"
    )
    parser.add_argument(
        "--no-cleanup", action="store_true", help="measure the start only and leave the cluster"
    )
    args = parser.parse_args(argv)
    if args.log_dir:
        Environment.set_main_directory(args.log_dir)

    result = measure(args.hosts, args.workers, args.seed, cleanup=not args.no_cleanup)
    print(
        f"hosts={args.hosts} workers={args.workers} tunnels={result['tunnels']:.0f} "
        f"start={result['start_seconds']:.3f}s cleanup={result['cleanup_seconds']:.3f}s "
        f"virtual={result['virtual_seconds']:.3f}s",
        flush=True,
    )
    if args.no_cleanup:
        # The cluster's exit-time cleanup would close millions of tunnels for nothing.
        os._exit(0)


if __name__ == "__main__":
    main()
