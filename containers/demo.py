"""The main job: a Dask cluster over SSH hosts in Docker, a checked computation, a clean stop.

Run with `nox -s demo` or `python -m containers.demo [--hosts 3] [--workers 6]`.
It starts SSH hosts in Docker on 127.0.0.1 and builds a RuntimeGroup with
RuntimeManager from the generated SSH config. On a DaskCluster it runs a
dask.array reduction and a word count, and checks both results against values
computed here. It prints where each worker runs and how long each phase took,
and removes everything again, also after Ctrl-C. The exit code is 0 only when
every check passed.
"""

from __future__ import annotations

import argparse
import logging
import random
import sys
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

log = logging.getLogger("containers.demo")

# Words of the generated text; the seed makes the text the same in every run.
VOCABULARY = ("ssh", "tunnel", "dask", "worker", "scheduler", "port", "host", "cluster")
TEXT_SEED = 20261204
TEXT_LINES = 20_000
WORDS_PER_LINE = 12

ARRAY_SIDE = 2_000
ARRAY_CHUNK = 250

EXIT_FAILED = 1
EXIT_INTERRUPTED = 130


class Timings:
    """Wall-clock seconds per phase, in the order the phases ran."""

    def __init__(self) -> None:
        self.phases: list[tuple[str, float]] = []

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        print(f"== {name} ...", flush=True)
        started = time.monotonic()
        try:
            yield
        finally:
            seconds = time.monotonic() - started
            self.phases.append((name, seconds))
            print(f"   {name}: {seconds:.1f} s", flush=True)

    def report(self) -> None:
        print("\nTimings:")
        width = max(len(name) for name, _ in self.phases) if self.phases else 0
        for name, seconds in self.phases:
            print(f"  {name:<{width}} {seconds:7.1f} s")


def generate_text(lines: int = TEXT_LINES) -> list[str]:
    """Return reproducible lines of random words from VOCABULARY."""
    generator = random.Random(TEXT_SEED)
    return [" ".join(generator.choices(VOCABULARY, k=WORDS_PER_LINE)) for _ in range(lines)]


def check_array_reduction(client: Any) -> str:
    """Sum (i mod 1000)^2 over i = 0..n-1 after a rechunk that moves blocks between workers."""
    import dask.array as da

    count = ARRAY_SIDE * ARRAY_SIDE
    matrix = da.arange(count, chunks=ARRAY_SIDE * ARRAY_CHUNK, dtype="int64").reshape(
        (ARRAY_SIDE, ARRAY_SIDE)
    )
    # Row blocks to column blocks: every output block needs a piece of every input block.
    columns = matrix.rechunk((ARRAY_SIDE, ARRAY_CHUNK))
    total = int(client.compute(((columns % 1000) ** 2).sum()).result())

    # count is a multiple of 1000, so each residue k occurs count / 1000 times.
    expected = (count // 1000) * sum(k * k for k in range(1000))
    if total != expected:
        raise AssertionError(f"Array reduction returned {total}, expected {expected}.")
    return f"sum of (i mod 1000)^2 for i < {count} = {total} (matches the closed form)"


def check_word_count(client: Any) -> str:
    """Count words of the generated text on the cluster and compare with a local count."""
    import dask.bag as db

    lines = generate_text()
    counted = dict(
        db.from_sequence(lines, npartitions=24)
        .map(str.split)
        .flatten()
        .frequencies()
        .compute(scheduler=client.get)
    )

    expected = dict(Counter(word for line in lines for word in line.split()))
    if counted != expected:
        raise AssertionError(f"Word count returned {counted}, expected {expected}.")
    return (
        f"{sum(counted.values())} words counted, {len(counted)} distinct (matches the local count)"
    )


def print_placement(cluster: Any, client: Any) -> None:
    """Print each worker's host, address and threads as the scheduler lists them."""
    registered = client.scheduler_info(n_workers=-1)["workers"]
    print(
        f"\nScheduler {cluster.scheduler_address} on this machine; dashboard {cluster.dashboard_link}"
    )
    for worker in cluster.workers:
        info = registered.get(f"tcp://127.0.0.1:{worker.port}", {})
        print(
            f"  worker {worker.index}: host {worker.host:<10} port {worker.port} "
            f"threads {info.get('nthreads', '?')} name {worker.name}"
        )
    if len(registered) != len(cluster.workers):
        raise AssertionError(
            f"The scheduler lists {len(registered)} workers, expected {len(cluster.workers)}."
        )


def run(host_count: int, worker_count: int, timings: Timings) -> None:
    """Run every phase; the finally-blocks stop whatever started, in reverse order."""
    from containers.build import build_image
    from containers.hosts import start_hosts
    from lazycluster.cluster.dask_cluster import DaskCluster
    from lazycluster.manager import RuntimeManager
    from lazycluster.transport import use_backend
    from lazycluster.transport.ssh import SSHBackend

    with timings.phase("build or reuse the SSH host image"):
        image = build_image()
    with timings.phase(f"start {host_count} SSH hosts in Docker"):
        hosts = start_hosts(host_count, image=image)
    try:
        backend = SSHBackend(ssh_config_path=str(hosts.ssh_config_path))
        with use_backend(backend):
            with timings.phase("RuntimeManager over the SSH config"):
                group = RuntimeManager().create_group()
            print(f"   runtimes: {', '.join(group.hosts)}")
            try:
                cluster = DaskCluster(group)
                try:
                    with timings.phase(f"start DaskCluster with {worker_count} workers"):
                        cluster.start(worker_count=worker_count)
                    client = cluster.get_client(timeout=10)
                    print_placement(cluster, client)
                    with timings.phase("dask.array rechunk and reduction"):
                        print("   " + check_array_reduction(client))
                    with timings.phase("word count with dask.bag"):
                        print("   " + check_word_count(client))
                finally:
                    with timings.phase("stop the cluster"):
                        cluster.cleanup()
            finally:
                group.cleanup()
                close = getattr(backend, "close", None)
                if callable(close):
                    close()
    finally:
        with timings.phase("remove the SSH hosts"):
            hosts.close()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--hosts", type=int, default=3, help="number of SSH hosts to start (default 3)"
    )
    parser.add_argument("--workers", type=int, default=6, help="number of Dask workers (default 6)")
    parser.add_argument("--verbose", action="store_true", help="log every lifecycle event at INFO")
    args = parser.parse_args(argv)
    if args.hosts < 1 or args.workers < 1:
        parser.error("--hosts and --workers must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    timings = Timings()
    try:
        run(args.hosts, args.workers, timings)
    except KeyboardInterrupt:
        print("\nInterrupted; everything started was stopped.", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as error:
        log.exception("Demo failed")
        print(f"\nDEMO FAILED: {type(error).__name__}: {error}", file=sys.stderr)
        timings.report()
        return EXIT_FAILED

    timings.report()
    print("\nDEMO PASSED")
    return 0


if __name__ == "__main__":
    sys.exit(main())
