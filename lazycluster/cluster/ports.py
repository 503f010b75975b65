"""Choosing ports that are free on every runtime of a group and on the manager.

Each machine is asked once for the whole candidate list, all machines in
parallel, so the cost of a port choice does not grow with the number of ports
or workers. A port counts as free only when no machine uses it, because the
tunnel mesh listens on the same port number on every machine.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from lazycluster.exceptions import NoPortsLeftError, PortInUseError
from lazycluster.transport import Transport, get_backend, validate_port

if TYPE_CHECKING:
    from lazycluster.cluster.tunnel_mesh import RejectedBatch
    from lazycluster.runtime_mgmt import RuntimeGroup

logger = logging.getLogger(__name__)


def manager_transport() -> Transport:
    """Return the transport of the manager's own machine from the active backend."""
    return get_backend().local()


def on_manager(runtime: Any) -> bool:
    """Return whether a runtime is the manager's own machine, where it shares the manager's ports.

    That is the case for a local transport, and also for an SSH connection to
    localhost, which `Runtime.is_manager` recognizes by the host name.
    """
    return bool(runtime.transport.is_local or getattr(runtime, "is_manager", False))


def remote_transports(group: RuntimeGroup) -> list[Transport]:
    """Return the transports of the group's runtimes that are not the manager's machine."""
    return [runtime.transport for runtime in group.runtimes if not on_manager(runtime)]


def validate_port_list(ports: Any, name: str = "ports") -> list[int]:
    """Return `ports` as a list of valid port numbers, or raise TypeError/ValueError."""
    if isinstance(ports, (str, bytes)) or not isinstance(ports, Iterable):
        raise TypeError(f"Invalid {name} {ports!r}: expected a list of port numbers.")
    checked = [validate_port(port, f"port in {name}") for port in ports]
    duplicates = sorted({port for port in checked if checked.count(port) > 1})
    if duplicates:
        raise ValueError(
            f"Invalid {name}: ports {duplicates} appear more than once. Pass each port once."
        )
    return checked


def find_busy_ports(
    transports: Sequence[Transport], candidates: Iterable[int]
) -> dict[str, set[int]]:
    """Return, per host, which of `candidates` are in use: one request per host, in parallel."""
    unique = sorted(set(candidates))
    if not unique or not transports:
        return {transport.host: set() for transport in transports}

    clock = transports[0].clock
    results = clock.map(lambda transport: set(transport.ports_in_use(unique)), transports)
    busy = {transport.host: used for transport, used in zip(transports, results, strict=True)}
    logger.debug("Ports in use among %d candidates: %s", len(unique), busy)
    return busy


def hosts_using(port: int, busy: Mapping[str, set[int]]) -> list[str]:
    """Return the hosts on which `port` is in use."""
    return [host for host, used in busy.items() if port in used]


def require_free_port(port: int, busy: Mapping[str, set[int]], group: Any = None) -> None:
    """Raise PortInUseError naming the hosts when `port` is in use on any of them."""
    hosts = hosts_using(port, busy)
    if hosts:
        where = "host(s) " + ", ".join(repr(host) for host in hosts)
        raise PortInUseError(port, group=group, where=where)


def pick_free_ports(
    candidates: Sequence[int],
    count: int,
    busy: Mapping[str, set[int]],
    exclude: Iterable[int] = (),
) -> tuple[list[int], list[int]]:
    """Pick the first `count` ports of `candidates` that no host uses.

    Returns the chosen ports and the candidates after the last chosen one.
    Raises NoPortsLeftError when fewer than `count` are free, and ValueError when
    `count` is below 1.
    """
    if count < 1:
        raise ValueError(f"Invalid port count {count}: expected at least 1.")

    in_use = set(exclude).union(*busy.values())
    chosen: list[int] = []
    for index, port in enumerate(candidates):
        if port in in_use or port in chosen:
            continue
        chosen.append(port)
        if len(chosen) == count:
            return chosen, list(candidates[index + 1 :])

    raise NoPortsLeftError(
        f"Only {len(chosen)} of the {len(candidates)} ports left in the port list "
        f"({describe_ports(candidates)}) are free on every runtime and on the manager, but "
        f"{count} are needed. Pass a longer port list or free some of its ports."
    )


def describe_ports(ports: Sequence[int], limit: int = 6) -> str:
    """Return `ports` for a message: a range when they are consecutive, else the first few."""
    if not ports:
        return "none"
    if len(ports) > 2 and list(ports) == list(range(ports[0], ports[0] + len(ports))):
        return f"{ports[0]} to {ports[-1]}"
    listed = ", ".join(str(port) for port in ports[:limit])
    return listed + (f" and {len(ports) - limit} more" if len(ports) > limit else "")


def find_taken_ports(
    rejected: Sequence[RejectedBatch], manager: Transport, transports: Mapping[str, Transport]
) -> set[int]:
    """Return the ports of rejected forward batches that something else now uses.

    Asks each machine where a rejected batch listens once, all in parallel. The
    batches' tunnels are closed after a failure and their ports are new worker
    ports, so a port in use there belongs to another program. The port named
    by a PortInUseError counts as taken even when it is free again by now.
    """
    ports_by_machine: dict[str, set[int]] = {}
    machines: dict[str, Transport] = {}
    taken: set[int] = set()
    for batch in rejected:
        listener = manager if batch.kind == "local" else transports[batch.host]
        machines[listener.host] = listener
        ports_by_machine.setdefault(listener.host, set()).update(batch.ports)
        if isinstance(batch.error, PortInUseError):
            taken.add(batch.error.port)

    hosts = sorted(machines)
    results = manager.clock.map(
        lambda host: machines[host].ports_in_use(sorted(ports_by_machine[host])), hosts
    )
    for host, used in zip(hosts, results, strict=True):
        if used:
            logger.info("Ports %s were taken on host %s after the port check", sorted(used), host)
        taken.update(used)
    return taken
