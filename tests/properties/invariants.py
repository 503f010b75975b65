"""The invariants of design.md, checked on a `World`, and the expected port choice.

`expect_start` writes out the specification of port choice. The master takes
the given port, else the default port when it is free everywhere, else the
first free port of the list. The workers then take the first free ports of
the rest. The properties compare the library with it and with the invariants.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from scenario import MANAGER, World

from lazycluster.cluster.dask_cluster import DaskCluster, RoundRobinLauncher
from lazycluster.exceptions import NoPortsLeftError, PortInUseError


@dataclass(frozen=True)
class Expected:
    """What a start must give: an error type, or master port, worker ports and remaining list."""

    error: type[Exception] | None
    stage: str = ""  # where the error comes from: "master" or "workers"
    master_port: int | None = None
    worker_ports: tuple[int, ...] = ()
    remaining: tuple[int, ...] = ()


def expect_start(
    ports: Sequence[int],
    taken: Iterable[int],
    workers: int,
    master_port: int | None,
    default_master_port: int,
) -> Expected:
    """Return what DaskCluster.start(workers, master_port) must do with `taken` busy somewhere."""
    busy = set(taken)
    rest = list(ports)
    if master_port is not None:
        if master_port in busy:
            return Expected(PortInUseError, "master")
        master = master_port
    elif default_master_port not in busy:
        master = default_master_port
    else:
        free = [index for index, port in enumerate(rest) if port not in busy]
        if not free:
            return Expected(NoPortsLeftError, "master")
        master, rest = rest[free[0]], rest[free[0] + 1 :]

    chosen: list[int] = []
    for index, port in enumerate(rest):
        if port in busy or port == master or port in chosen:
            continue
        chosen.append(port)
        if len(chosen) == workers:
            return Expected(None, "", master, tuple(chosen), tuple(rest[index + 1 :]))
    return Expected(NoPortsLeftError, "workers", master)


def check_round_robin(
    world: World, launcher: RoundRobinLauncher, killed: Iterable[int] = ()
) -> None:
    """Worker i on runtime i mod N, balanced counts, ports_per_host equal to the live listeners."""
    hosts = world.group.hosts
    assert hosts == world.hosts, f"group order {hosts} differs from the requested {world.hosts}"
    workers = launcher.workers
    for worker in workers:
        expected = hosts[worker.index % len(hosts)]
        assert worker.host == expected, (
            f"worker {worker.index} runs on {worker.host}, expected {expected}"
        )

    counts = Counter({host: 0 for host in hosts})
    counts.update(worker.host for worker in workers)
    assert max(counts.values()) - min(counts.values()) <= 1, (
        f"unbalanced worker counts {dict(counts)}"
    )

    per_host = launcher.ports_per_host
    dead = set(killed)
    for index, host in enumerate(hosts):
        recorded = per_host.get(host, [])
        assert recorded == [
            w.port for w in sorted(workers, key=lambda w: w.index) if w.host == host
        ]
        listening = world.worker_ports(index)
        assert listening == set(recorded) - dead, (
            f"host {host}: ports_per_host says {recorded} (killed {sorted(dead)}), workers listen on {sorted(listening)}"
        )


def check_mesh(world: World, master_port: int, worker_ports: Iterable[int]) -> None:
    """Check that the master port and every worker port listen on every host and on the manager."""
    wanted = {master_port, *worker_ports}
    for where in [MANAGER, *range(len(world.hosts))]:
        missing = wanted - world.listening(where, wanted)
        assert not missing, f"ports {sorted(missing)} do not listen on {world.host(where)}"


def check_ports(cluster: DaskCluster, launcher: RoundRobinLauncher, expected: Expected) -> None:
    """The master and worker ports and the remaining list are those of `expected`."""
    chosen = tuple(worker.port for worker in sorted(launcher.workers, key=lambda w: w.index))
    assert cluster.master_port == expected.master_port
    assert chosen == expected.worker_ports, (
        f"worker ports {chosen}, expected {expected.worker_ports}"
    )
    assert len(set(chosen)) == len(chosen)
    assert cluster.master_port not in chosen
    assert tuple(cluster.ports) == expected.remaining


def check_nothing_running(world: World) -> None:
    """No process, listening port or tunnel from the library remains on any host or the manager."""
    left = world.leftovers()
    assert not left.running, "left running after cleanup:\n" + "\n".join(left.running)


def check_clean(world: World) -> None:
    """Nothing at all from the library remains, temporary directories included."""
    left = world.leftovers()
    assert not (left.running or left.temp_dirs), left.describe()


def new_cluster(
    world: World, ports: Sequence[int], default_master_port: int
) -> tuple[DaskCluster, RoundRobinLauncher]:
    """Return a DaskCluster on the world's group with its own RoundRobinLauncher, not started."""
    launcher = RoundRobinLauncher(world.group)
    cluster = DaskCluster(world.group, ports=list(ports), worker_launcher=launcher)
    # The default master port (8786) belongs to whoever runs Dask on the manager;
    # each start names its own so that the fallback to the list is exercised.
    cluster.DEFAULT_MASTER_PORT = default_master_port
    return cluster, launcher
