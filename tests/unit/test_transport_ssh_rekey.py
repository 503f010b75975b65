"""SSH connections and tunnel relays across key exchanges.

A connection made by lazycluster must survive a channel close that crosses a
key exchange. paramiko's thread replies to a channel close only after a key exchange that
it requested has ended, and only that thread can end the exchange. The test
replays the crossing deterministically: an in-process paramiko server plays
sshd behind a relay that can hold back the server's messages, the server closes
a channel while the relay keeps its messages back, and meanwhile the client's
packetizer reaches paramiko's rekey limit.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import paramiko
import pytest

from lazycluster.transport.channel_relay import relay_stream
from lazycluster.transport.ssh_connect import _make_transport
from tests.unit.ssh_server import AcceptAll, tcp_pair

# paramiko's default limit of bytes sent, after which it requests new keys itself.
PARAMIKO_REKEY_BYTES = paramiko.Packetizer.REKEY_BYTES


def copy(source: socket.socket, target: socket.socket, open_gate: threading.Event) -> None:
    """Copy bytes from `source` to `target`, waiting while the gate is shut."""
    try:
        while data := source.recv(65536):
            open_gate.wait()
            target.sendall(data)
    except OSError:
        pass  # the test closed the relay


@pytest.fixture
def gated_connection() -> Iterator[tuple[paramiko.Transport, paramiko.Transport, threading.Event]]:
    """A client transport built as lazycluster builds it, a paramiko server, and
    the gate of the server-to-client direction between them."""
    client_socket, relay_client_side = tcp_pair()
    relay_server_side, server_socket = tcp_pair()
    to_server, to_client = threading.Event(), threading.Event()
    to_server.set()
    to_client.set()
    for args in (
        (relay_client_side, relay_server_side, to_server),
        (relay_server_side, relay_client_side, to_client),
    ):
        threading.Thread(target=copy, args=args, daemon=True).start()

    server = paramiko.Transport(server_socket)
    server.add_server_key(paramiko.ECDSAKey.generate())
    client = _make_transport(client_socket)
    starter = threading.Thread(target=server.start_server, kwargs={"server": AcceptAll()})
    starter.start()
    client.start_client(timeout=10)
    client.auth_none("tester")
    starter.join(10)
    # A short wait keeps a stalled thread from holding the test for paramiko's 30 s.
    client.clear_to_send_timeout = 3.0

    yield client, server, to_client
    to_client.set()
    client.close()
    server.close()
    for end in (relay_client_side, relay_server_side):
        end.close()


def read_to_eof(end: socket.socket, timeout: float = 10.0) -> bytes:
    end.settimeout(timeout)
    parts = []
    while data := end.recv(65536):
        parts.append(data)
    return b"".join(parts)


def open_channel(client: paramiko.Transport, server: paramiko.Transport) -> tuple:
    channel = client.open_channel("direct-tcpip", ("localhost", 1), ("127.0.0.1", 2), timeout=10)
    far_end = server.accept(10)
    assert far_end is not None
    return channel, far_end


def test_channel_close_across_rekey_limit_keeps_connection(gated_connection):
    client, server, to_client = gated_connection
    channel, far_end = open_channel(client, server)

    # The server's close waits in the relay, as if still on the wire.
    to_client.clear()
    far_end.close()
    time.sleep(0.2)

    # The client's next message passes paramiko's limit of bytes sent.
    client.packetizer._Packetizer__sent_bytes = PARAMIKO_REKEY_BYTES - 1
    client.global_request("keepalive@lazycluster", wait=False)
    time.sleep(0.5)
    to_client.set()

    deadline = time.monotonic() + 6.0
    while not channel.closed and time.monotonic() < deadline:
        time.sleep(0.05)
    assert channel.closed
    assert client.is_active(), "the connection dropped after the channel close"

    # The connection still carries data both ways.
    channel, far_end = open_channel(client, server)
    channel.sendall(b"ping")
    far_end.settimeout(10)
    assert far_end.recv(4) == b"ping"
    far_end.sendall(b"pong")
    channel.settimeout(10)
    assert channel.recv(4) == b"pong"


def test_server_key_exchange_keeps_tunnels_working(gated_connection):
    client, server, _ = gated_connection
    channel, far_end = open_channel(client, server)

    # The server requests new keys, as sshd does, while channels carry data and close.
    for _ in range(3):
        server.renegotiate_keys()
        channel.sendall(b"x" * 100_000)
        far_end.settimeout(10)
        received = b""
        while len(received) < 100_000:
            received += far_end.recv(65536)
        closing, closing_far_end = open_channel(client, server)
        closing_far_end.close()
        deadline = time.monotonic() + 5.0
        while not closing.closed and time.monotonic() < deadline:
            time.sleep(0.05)
        assert closing.closed
    assert client.is_active()


def test_relay_ends_after_key_exchange_timeout(gated_connection):
    client, server, _ = gated_connection
    channel, far_end = open_channel(client, server)
    application, relayed = tcp_pair()
    done = threading.Event()
    relay = relay_stream(relayed, channel, "lazycluster-tunnel-rekey-test", lambda _: done.set())
    relay.start()

    # A key exchange that never ends, as with a host that froze during one:
    # paramiko holds back every send and raises SSHException after its timeout.
    client.clear_to_send_timeout = 0.5
    client.clear_to_send.clear()
    application.sendall(b"stuck")
    time.sleep(2.0)
    client.clear_to_send.set()

    # The far end's data and close still reach the application, and the relay ends.
    far_end.sendall(b"late")
    far_end.close()
    assert read_to_eof(application) == b"late"
    assert done.wait(10), "the relay did not end after its send to the channel failed"
    application.close()
