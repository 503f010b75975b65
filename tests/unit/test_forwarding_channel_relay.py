"""ChannelRelay between a real paramiko channel and real loopback TCP sockets.

An in-process paramiko SSH server on 127.0.0.1 replaces sshd. Each test
opens a direct-tcpip channel to it and plays the far end of the tunnel on the
server's side of that channel, so the relay runs against paramiko's own
transport threads, windows and packets.
"""

from __future__ import annotations

import hashlib
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import paramiko
import pytest

from lazycluster.transport import channel_relay
from lazycluster.transport.channel_relay import ChannelRelay, relay_stream
from lazycluster.transport.forwarding import StreamRelay
from tests.unit.ssh_server import AcceptAll, tcp_pair

WINDOW_SIZE = 64 * 1024
MAX_PACKET_SIZE = 16 * 1024


@dataclass
class Tunnel:
    """One tunnel stream: the relay, the far end's channel and the local application's socket."""

    relay: StreamRelay
    far_end: paramiko.Channel
    application: socket.socket
    done: threading.Event


@pytest.fixture(scope="module")
def host_key() -> paramiko.PKey:
    return paramiko.ECDSAKey.generate()


@pytest.fixture
def connection(host_key) -> Iterator[tuple[paramiko.Transport, paramiko.Transport]]:
    """A client and a server paramiko transport, connected over loopback TCP."""
    client_socket, server_socket = tcp_pair()
    server = paramiko.Transport(server_socket)
    server.add_server_key(host_key)
    client = paramiko.Transport(client_socket)

    starter = threading.Thread(target=server.start_server, kwargs={"server": AcceptAll()})
    starter.start()
    client.start_client(timeout=10)
    client.auth_none("tester")
    starter.join(10)

    yield client, server
    client.close()
    server.close()


@pytest.fixture
def open_tunnel(connection) -> Iterator:
    """Return a function that opens one relayed tunnel stream. The streams close after the test."""
    client, server = connection
    opened: list[Tunnel] = []

    def open_one(buffer_size: int | None = None, early: bytes = b"") -> Tunnel:
        channel = client.open_channel(
            "direct-tcpip",
            ("localhost", 1),
            ("127.0.0.1", 2),
            window_size=WINDOW_SIZE,
            max_packet_size=MAX_PACKET_SIZE,
            timeout=10,
        )
        far_end = server.accept(10)
        assert far_end is not None
        if early:
            # Data that reaches the channel before the relay starts waits in
            # paramiko's pipe, and the relay must deliver it first.
            far_end.sendall(early)
            assert wait_for(lambda: len(channel.in_buffer) == len(early))

        application, relayed = tcp_pair(buffer_size)
        done = threading.Event()
        relay = relay_stream(relayed, channel, "lazycluster-tunnel-test-1", lambda _: done.set())
        relay.start()
        tunnel = Tunnel(relay, far_end, application, done)
        opened.append(tunnel)
        return tunnel

    yield open_one
    for tunnel in opened:
        tunnel.relay.close()
        tunnel.application.close()
        tunnel.far_end.close()


def wait_for(predicate, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


def read_to_eof(end, timeout: float = 30.0) -> bytes:
    end.settimeout(timeout)
    parts = []
    while data := end.recv(65536):
        parts.append(data)
    return b"".join(parts)


def relay_threads() -> list[threading.Thread]:
    return [
        thread
        for thread in threading.enumerate()
        if thread.name.startswith("lazycluster-tunnel-test-1")
    ]


def test_relay_stream_picks_channel_relay(open_tunnel):
    tunnel = open_tunnel()
    assert channel_relay.HOOK_SUPPORTED
    assert isinstance(tunnel.relay, ChannelRelay)


def test_channel_relay_keeps_order_both_ways(open_tunnel):
    tunnel = open_tunnel()
    messages = [f"{index:06d}".encode() * (1 + index % 50) for index in range(3000)]
    expected = b"".join(messages)

    def far_end_sends() -> None:
        for message in messages:
            tunnel.far_end.sendall(message)
        tunnel.far_end.shutdown_write()

    sender = threading.Thread(target=far_end_sends)
    sender.start()
    assert read_to_eof(tunnel.application) == expected
    sender.join(10)

    tunnel.application.sendall(expected)
    tunnel.application.shutdown(socket.SHUT_WR)
    assert read_to_eof(tunnel.far_end) == expected
    assert tunnel.done.wait(10)


def test_channel_relay_delivers_data_from_before_start(open_tunnel):
    tunnel = open_tunnel(early=b"early ")
    tunnel.far_end.sendall(b"late")
    tunnel.far_end.shutdown_write()
    assert read_to_eof(tunnel.application) == b"early late"


def test_channel_relay_half_close_far_end_first(open_tunnel):
    tunnel = open_tunnel()
    tunnel.far_end.sendall(b"greeting")
    tunnel.far_end.shutdown_write()
    assert read_to_eof(tunnel.application) == b"greeting"

    # The other direction still carries data after the far end's EOF.
    tunnel.application.sendall(b"answer")
    tunnel.application.shutdown(socket.SHUT_WR)
    assert read_to_eof(tunnel.far_end) == b"answer"
    assert tunnel.done.wait(10)
    assert wait_for(lambda: not relay_threads()), relay_threads()


def test_channel_relay_half_close_application_first(open_tunnel):
    tunnel = open_tunnel()
    tunnel.application.sendall(b"request")
    tunnel.application.shutdown(socket.SHUT_WR)
    assert read_to_eof(tunnel.far_end) == b"request"

    assert not tunnel.done.is_set()
    tunnel.far_end.sendall(b"response")
    tunnel.far_end.shutdown_write()
    assert read_to_eof(tunnel.application) == b"response"
    assert tunnel.done.wait(10)
    assert wait_for(lambda: not relay_threads()), relay_threads()


def test_channel_relay_slow_reader_blocks_far_end(open_tunnel):
    tunnel = open_tunnel(buffer_size=8192)
    block = bytes(index % 251 for index in range(MAX_PACKET_SIZE))
    tunnel.far_end.settimeout(2)
    digest = hashlib.sha256()
    sent = 0
    with pytest.raises(TimeoutError):
        while sent < 64 * 1024 * 1024:
            count = tunnel.far_end.send(block)
            digest.update(block[:count])
            sent += count

    # The application read nothing, so the far end may have sent one window
    # plus what the loopback sockets buffer, which 8 KiB buffers keep small.
    assert sent <= WINDOW_SIZE + 1024 * 1024, sent

    # Reading resumes the flow: the far end can send again once the relay
    # passes on bytes and grants the window for them.
    tunnel.far_end.settimeout(30)
    rest = block * 64
    reader_data: list[bytes] = []
    reader = threading.Thread(target=lambda: reader_data.append(read_to_eof(tunnel.application)))
    reader.start()
    tunnel.far_end.sendall(rest)
    digest.update(rest)
    tunnel.far_end.shutdown_write()
    reader.join(30)
    (received,) = reader_data
    assert len(received) == sent + len(rest)
    assert hashlib.sha256(received).hexdigest() == digest.hexdigest()


def test_channel_relay_close_with_backlog(open_tunnel):
    tunnel = open_tunnel(buffer_size=8192)
    tunnel.far_end.settimeout(2)
    sent = 0
    with pytest.raises(TimeoutError):
        while sent < 64 * 1024 * 1024:
            sent += tunnel.far_end.send(b"x" * MAX_PACKET_SIZE)
    assert sent <= WINDOW_SIZE + 1024 * 1024, sent

    tunnel.relay.close()
    assert tunnel.done.wait(10)
    assert not relay_threads(), relay_threads()
    assert wait_for(lambda: tunnel.far_end.closed or tunnel.far_end.eof_received)
    assert len(read_to_eof(tunnel.application)) <= WINDOW_SIZE + 1024 * 1024


def test_channel_relay_survives_key_exchanges(connection, open_tunnel):
    client, _ = connection
    tunnel = open_tunnel()
    payload = bytes(index % 251 for index in range(8 * 1024 * 1024))

    # With a 64 KiB window the relay grants window about every 6 KiB, so
    # window adjustments fall inside each key exchange, when paramiko holds
    # back every message but those of the exchange.
    sender = threading.Thread(target=tunnel.far_end.sendall, args=(payload,))
    sender.start()
    received = bytearray()
    tunnel.application.settimeout(30)
    exchanges = 0
    while len(received) < len(payload):
        data = tunnel.application.recv(65536)
        assert data, f"EOF after {len(received)} bytes"
        received += data
        if len(received) > (exchanges + 1) * len(payload) // 4 and exchanges < 3:
            client.renegotiate_keys()
            exchanges += 1
    sender.join(30)

    assert exchanges == 3
    assert bytes(received) == payload
    assert client.is_active()


def test_relay_stream_falls_back_without_hook(open_tunnel, monkeypatch):
    monkeypatch.setattr(channel_relay, "HOOK_SUPPORTED", False)
    tunnel = open_tunnel()
    assert type(tunnel.relay) is StreamRelay

    tunnel.far_end.sendall(b"through the pipe")
    tunnel.far_end.shutdown_write()
    assert read_to_eof(tunnel.application) == b"through the pipe"
    tunnel.application.sendall(b"back")
    tunnel.application.shutdown(socket.SHUT_WR)
    assert read_to_eof(tunnel.far_end) == b"back"
    assert tunnel.done.wait(10)
