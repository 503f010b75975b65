"""Run by the Python of lazycluster 0.2.4's own virtualenv; prints one JSON line of seconds.

    python legacy_driver.py HOST [HOST ...]

It is started as a file (not with -m) from outside the repository, so that
`import lazycluster` finds 0.2.4 and not the project's package.
"""

import json
import sys
import time

PORT_CHECK_PORT = 41000
PORT_CHECK_RUNS = 3
MASTER_PORT = 46999
WORKER_PORTS = list(range(47000, 47200))
REGISTER_TIMEOUT = 300


def main(hosts):
    from distributed import Client

    from lazycluster import RuntimeGroup
    from lazycluster.cluster.dask_cluster import DaskCluster

    seconds: dict = {}
    started = time.perf_counter()
    group = RuntimeGroup(hosts=hosts)
    seconds["group"] = time.perf_counter() - started

    checks = []
    for _ in range(PORT_CHECK_RUNS):
        started = time.perf_counter()
        group.has_free_port(PORT_CHECK_PORT)
        checks.append(time.perf_counter() - started)
    seconds["port_checks"] = checks

    # 0.2.4's default ports (8786, 60001-60199) may be taken on a busy manager and
    # it checks worker ports on the hosts only, so the ports are given explicitly.
    workers = 2 * len(hosts)
    started = time.perf_counter()
    cluster = DaskCluster(group, ports=WORKER_PORTS)
    cluster.start(worker_count=workers, master_port=MASTER_PORT)
    seconds["start_returned"] = time.perf_counter() - started
    client = Client(f"tcp://127.0.0.1:{cluster.master_port}", timeout=10)
    client.wait_for_workers(workers, timeout=REGISTER_TIMEOUT)
    seconds["registered"] = time.perf_counter() - started

    client.close()
    cluster.cleanup()
    group.cleanup()
    print(json.dumps(seconds), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
