"""A backend of named hosts that all run on the manager, for the user API unit tests.

Each host is a `LocalTransport` under its own name with `is_local` off, so a
Runtime treats it as a remote host: tunnels are really opened, files really
copied, commands really run, only on this machine. Test modules import the
fixtures below by name.
"""

from __future__ import annotations

import os
import shlex
import socket
import sys
import threading
from collections.abc import Iterable, Iterator, Mapping

import pytest

from lazycluster.clock import SYSTEM_CLOCK, Clock
from lazycluster.environment import Environment
from lazycluster.exceptions import HostUnreachableError
from lazycluster.transport import Backend, Transport, set_backend
from lazycluster.transport.local import LocalTransport

HOSTS = ["node-1", "node-2", "node-3"]


class NamedLocalTransport(LocalTransport):
    """The manager's machine posing as a remote host; counts port checks."""

    is_local = False

    def __init__(self, host: str, clock: Clock = SYSTEM_CLOCK) -> None:
        super().__init__(host, clock)
        self.port_check_calls = 0
        self.commands: list[str] = []
        self.closed = False

    def run(self, command, **kwargs):  # type: ignore[no-untyped-def, override]
        self.commands.append(command if isinstance(command, str) else " ".join(command))
        return super().run(command, **kwargs)

    def ports_in_use(self, ports: Iterable[int]) -> set[int]:
        self.port_check_calls += 1
        return super().ports_in_use(ports)

    def close(self) -> None:
        self.closed = True
        super().close()


class ManagerTransport(LocalTransport):
    """The manager's machine, where a test can mark ports as taken without binding them."""

    def __init__(self, clock: Clock = SYSTEM_CLOCK) -> None:
        super().__init__(clock=clock)
        self.busy_ports: set[int] = set()

    def ports_in_use(self, ports: Iterable[int]) -> set[int]:
        port_list = list(ports)
        return super().ports_in_use(port_list) | (self.busy_ports & set(port_list))


class NamedLocalBackend(Backend):
    """Connects each name in `hosts` to the manager's machine; other names are unreachable."""

    def __init__(self, hosts: list[str], clock: Clock = SYSTEM_CLOCK) -> None:
        self.hosts = list(hosts)
        self.clock = clock
        self.connected: list[NamedLocalTransport] = []
        self.unreachable: set[str] = set()
        self.manager = ManagerTransport(clock)

    def connect(
        self, host: str, connection_kwargs: Mapping[str, object] | None = None
    ) -> Transport:
        if host in self.unreachable or host not in self.hosts:
            raise HostUnreachableError(host, f"Host {host!r} is unreachable in this test.")
        transport = NamedLocalTransport(host, self.clock)
        self.connected.append(transport)
        return transport

    def transports_of(self, host: str) -> list[NamedLocalTransport]:
        return [transport for transport in self.connected if transport.host == host]

    def local(self) -> Transport:
        return self.manager

    def configured_hosts(self) -> list[str]:
        return list(self.hosts)

    def close(self) -> None:
        for transport in self.connected:
            transport.close()
        self.manager.close()


@pytest.fixture
def backend(tmp_path, monkeypatch) -> Iterator[NamedLocalBackend]:  # type: ignore[no-untyped-def]
    """Install a NamedLocalBackend of HOSTS; logs go to tmp_path; python3 is this interpreter."""
    # The function runner needs the manager's cloudpickle, so "python3" on the
    # hosts must be the interpreter running the tests.
    # A wrapper script rather than a symlink: a symlinked venv interpreter
    # outside the venv directory would not find the venv's packages.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    wrapper = bin_dir / "python3"
    wrapper.write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} "$@"\n')
    wrapper.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setattr(Environment, "main_directory", str(tmp_path / "main"))

    named = NamedLocalBackend(HOSTS)
    previous = set_backend(named)
    try:
        yield named
    finally:
        set_backend(previous)
        named.close()


class EchoServer:
    """A TCP server on 127.0.0.1 that sends back what it receives, to test tunnels."""

    def __init__(self) -> None:
        self.socket = socket.create_server(("127.0.0.1", 0))
        self.port = self.socket.getsockname()[1]
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                connection, _ = self.socket.accept()
            except OSError:
                return
            with connection:
                data = connection.recv(1024)
                connection.sendall(data)

    def close(self) -> None:
        self.socket.close()


@pytest.fixture
def echo_server() -> Iterator[EchoServer]:
    server = EchoServer()
    try:
        yield server
    finally:
        server.close()


def echo_through(port: int, message: bytes = b"ping") -> bytes:
    """Send `message` to 127.0.0.1:`port` and return the reply."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as connection:
        connection.sendall(message)
        return connection.recv(1024)


def free_ports(count: int) -> list[int]:
    """Return `count` distinct ports that were free a moment ago, chosen by the OS."""
    sockets = [socket.create_server(("127.0.0.1", 0)) for _ in range(count)]
    ports = [sock.getsockname()[1] for sock in sockets]
    for sock in sockets:
        sock.close()
    return ports


@pytest.fixture
def busy_port() -> Iterator[int]:
    """A port with a listening socket on 127.0.0.1 for the duration of the test."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        yield server.getsockname()[1]
