"""The tunnels each host needs so that every worker port works on every machine.

A worker listens on 127.0.0.1:p of its host. The manager reaches it through a
local forward (manager p -> host p), and every other remote host through a
remote forward to the manager (host' p -> manager p), which then goes on
through that local forward. A worker on the manager's own machine needs no
local forward. The same port number is used everywhere, so every process
addresses a worker as tcp://127.0.0.1:p.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Set
from dataclasses import dataclass, field

from lazycluster.exceptions import LazyclusterError


@dataclass
class HostTunnels:
    """The forwards to open on one remote host, as (listen port, target port) pairs."""

    local_pairs: list[tuple[int, int]] = field(default_factory=list)
    remote_pairs: list[tuple[int, int]] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.local_pairs or self.remote_pairs)


def plan_worker_tunnels(
    ports_per_host: Mapping[str, Iterable[int]],
    remote_hosts: Iterable[str],
    already_open: Set[tuple[str, str, int]] = frozenset(),
) -> dict[str, HostTunnels]:
    """Return the forwards each remote host still needs for the given worker ports.

    `already_open` holds (host, kind, port) triples of forwards opened before;
    they are left out, so calling this after more workers started only adds
    the new forwards. Hosts that need nothing are left out of the result.
    """
    # Every host gets the same pairs for a given worker host, so they are built
    # once and shared: a mesh of 2,000 workers on 1,000 hosts has 2 million pairs.
    pairs_of = {
        worker_host: [(port, port) for port in ports]
        for worker_host, ports in ports_per_host.items()
    }
    plan: dict[str, HostTunnels] = {}
    for host in remote_hosts:
        tunnels = HostTunnels()
        for worker_host, pairs in pairs_of.items():
            kind = "local" if worker_host == host else "remote"
            target = tunnels.local_pairs if kind == "local" else tunnels.remote_pairs
            if already_open:
                target.extend(pair for pair in pairs if (host, kind, pair[0]) not in already_open)
            else:
                target.extend(pairs)
        if tunnels:
            plan[host] = tunnels
    return plan


@dataclass(frozen=True)
class RejectedBatch:
    """A batch of forwards that failed because one of its ports may be taken.

    `kind` "local" means the ports listen on the manager (opened through
    `host`'s connection), "remote" means they listen on `host` itself.
    """

    host: str
    kind: str
    ports: tuple[int, ...]
    error: LazyclusterError
