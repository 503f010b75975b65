"""A backend of named hosts that all run on the manager, for the user API unit tests.

Each host is a `LocalTransport` under its own name with `is_local` off, so a
Runtime treats it as a remote host: tunnels are really opened, files really
copied, commands really run, only on this machine.
"""

from __future__ import annotations

from collections.abc import Mapping

from lazycluster.clock import SYSTEM_CLOCK, Clock
from lazycluster.exceptions import HostUnreachableError
from lazycluster.transport import Backend, Transport
from lazycluster.transport.local import LocalTransport


class NamedLocalTransport(LocalTransport):
    """The manager's machine posing as a remote host."""

    is_local = False


class NamedLocalBackend(Backend):
    """Connects every host name in `hosts` to the manager's machine; others are unreachable."""

    def __init__(self, hosts: list[str], clock: Clock = SYSTEM_CLOCK) -> None:
        self.hosts = list(hosts)
        self.clock = clock
        self.connected: list[NamedLocalTransport] = []
        self.unreachable: set[str] = set()
        self._local = LocalTransport(clock=clock)

    def connect(
        self, host: str, connection_kwargs: Mapping[str, object] | None = None
    ) -> Transport:
        if host in self.unreachable or host not in self.hosts:
            raise HostUnreachableError(host, f"Host {host!r} is unreachable in this test.")
        transport = NamedLocalTransport(host, self.clock)
        self.connected.append(transport)
        return transport

    def local(self) -> Transport:
        return self._local

    def configured_hosts(self) -> list[str]:
        return list(self.hosts)

    def close(self) -> None:
        for transport in self.connected:
            transport.close()
        self._local.close()
