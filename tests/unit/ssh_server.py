"""An in-process paramiko SSH server policy and loopback socket pairs for relay tests."""

from __future__ import annotations

import socket

import paramiko


class AcceptAll(paramiko.ServerInterface):
    """An SSH server policy that lets anyone in and opens any tunnel channel."""

    def get_allowed_auths(self, username: str) -> str:
        return "none"

    def check_auth_none(self, username: str) -> int:
        return paramiko.AUTH_SUCCESSFUL

    def check_channel_direct_tcpip_request(
        self, chanid: int, origin: tuple[str, int], destination: tuple[str, int]
    ) -> int:
        return paramiko.OPEN_SUCCEEDED


def tcp_pair(buffer_size: int | None = None) -> tuple[socket.socket, socket.socket]:
    """Return two connected loopback TCP sockets, optionally with small kernel buffers."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        client = socket.socket()
        if buffer_size is not None:
            client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, buffer_size)
            client.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, buffer_size)
        client.connect(listener.getsockname())
        server, _ = listener.accept()
    if buffer_size is not None:
        server.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, buffer_size)
        server.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, buffer_size)
    return client, server
