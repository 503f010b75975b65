"""Relays that carry forwarded TCP streams, shared by the local and SSH transports.

A stream end is a connected `socket.socket` or a paramiko `Channel`: both offer
`recv`, `sendall`, `shutdown` and `close`. Each relayed stream uses two threads,
one per direction, so a slow reader on one side never stalls the other side.
SSH tunnels relay through `channel_relay.ChannelRelay` where paramiko allows it.
"""

from __future__ import annotations

import errno
import logging
import socket
import threading
from collections.abc import Callable, Iterable
from typing import Any, Protocol

from paramiko import SSHException

from lazycluster.exceptions import PortInUseError, TransportError
from lazycluster.transport.base import Tunnel, validate_port

logger = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"

# Bytes read per call. Large reads keep the per-call overhead of paramiko and of
# Python small relative to the data moved.
BUFFER_SIZE = 256 * 1024

# Errors that end a stream. paramiko's channels also raise SSHException, when a
# send waited longer than paramiko's timeout for a key exchange to end.
STREAM_ERRORS = (OSError, EOFError, SSHException)

# Seconds to wait for a relay or accept thread to finish after its ends are closed.
JOIN_TIMEOUT = 5.0


class StreamEnd(Protocol):
    def recv(self, size: int) -> bytes: ...

    def sendall(self, data: bytes) -> Any: ...

    def shutdown(self, how: int) -> Any: ...

    def close(self) -> Any: ...


def validate_host_port(port: object, host: str, name: str = "port") -> int:
    """Return `port` as an int, or raise like `validate_port` with `host` in the message."""
    try:
        return validate_port(port, name)
    except (TypeError, ValueError) as error:
        raise type(error)(f"{error} Host: {host!r}.") from None


def validate_pairs(pairs: Iterable[tuple[int, int]], host: str) -> list[tuple[int, int]]:
    """Return the (listen port, target port) pairs of a tunnel request, validated."""
    return [
        (
            validate_host_port(listen, host, "listen port"),
            validate_host_port(target, host, "target port"),
        )
        for listen, target in pairs
    ]


def _shutdown(end: StreamEnd, how: int) -> None:
    try:
        end.shutdown(how)
    except STREAM_ERRORS:
        pass  # the other side already closed this end


def close_end(end: StreamEnd) -> None:
    """Close a stream end, waking any thread blocked in its `recv`."""
    # On Linux, close() alone does not wake a thread blocked in recv() on a
    # socket, but shutdown() does.
    _shutdown(end, socket.SHUT_RDWR)
    try:
        end.close()
    except STREAM_ERRORS:
        pass


class StreamRelay:
    """Copies bytes both ways between two stream ends until both directions end."""

    def __init__(
        self, left: StreamEnd, right: StreamEnd, name: str, on_done: Callable[[StreamRelay], None]
    ) -> None:
        self._ends = (left, right)
        self._on_done = on_done
        self._lock = threading.Lock()
        self._running = 2
        self._threads = self._make_threads(left, right, name)

    def _make_threads(self, left: StreamEnd, right: StreamEnd, name: str) -> list[threading.Thread]:
        """Return one thread per direction. Each calls `_direction_ended` as its last step."""
        # NOTE: two threads per stream keep the code simple, but a mesh with
        # many thousands of concurrent streams needs a selector-based relay.
        return [
            threading.Thread(
                target=self._pump, args=(left, right), name=f"{name}-out", daemon=True
            ),
            threading.Thread(target=self._pump, args=(right, left), name=f"{name}-in", daemon=True),
        ]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def _pump(self, source: StreamEnd, target: StreamEnd) -> None:
        try:
            while True:
                data = source.recv(BUFFER_SIZE)
                if not data:
                    break
                target.sendall(data)
        except STREAM_ERRORS as error:
            logger.debug("Relay stream ended: %s", error)
        self._direction_ended(target)

    def _direction_ended(self, target: StreamEnd) -> None:
        """Half-close `target`, and close both ends once the other direction ended too."""
        # The half-close lets the target's peer read EOF while the opposite
        # direction may still carry data.
        _shutdown(target, socket.SHUT_WR)
        with self._lock:
            self._running -= 1
            finished = self._running == 0
        if finished:
            for end in self._ends:
                close_end(end)
            self._on_done(self)

    def close(self) -> None:
        """Close both ends and wait for both threads."""
        for end in self._ends:
            close_end(end)
        current = threading.current_thread()
        for thread in self._threads:
            if thread is not current and thread.ident is not None:
                thread.join(JOIN_TIMEOUT)


# Builds the relay of one stream: (left end, right end, thread name, on_done).
RelayFactory = Callable[[StreamEnd, StreamEnd, str, Callable[[StreamRelay], None]], StreamRelay]


class RelaySet:
    """The live relays of one tunnel, closed together."""

    def __init__(self, name: str, relay_factory: RelayFactory = StreamRelay) -> None:
        self._name = name
        self._relay_factory = relay_factory
        self._lock = threading.Lock()
        self._relays: set[StreamRelay] = set()
        self._count = 0
        self._closed = False

    def relay(self, left: StreamEnd, right: StreamEnd) -> None:
        """Start relaying between two ends; closes both when the set is already closed."""
        with self._lock:
            if self._closed:
                close_end(left)
                close_end(right)
                return
            self._count += 1
            relay = self._relay_factory(left, right, f"{self._name}-{self._count}", self._forget)
            self._relays.add(relay)
        relay.start()

    def _forget(self, relay: StreamRelay) -> None:
        with self._lock:
            self._relays.discard(relay)

    def __len__(self) -> int:
        with self._lock:
            return len(self._relays)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            relays = list(self._relays)
            self._relays.clear()
        for relay in relays:
            relay.close()


def listen_loopback(port: int, host: str) -> socket.socket:
    """Return a socket listening on 127.0.0.1:`port` of the manager.

    Raises `PortInUseError` when the port is taken.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        # SO_REUSEADDR lets a tunnel reopen a port whose old streams linger in
        # TIME_WAIT, but Linux still rejects a port that another socket listens on.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((LOOPBACK, port))
        sock.listen(128)
    except OSError as error:
        sock.close()
        if error.errno == errno.EADDRINUSE:
            raise PortInUseError(port, predecessor_excp=error, where="the manager") from error
        raise TransportError(
            host,
            f"Failed to listen on {LOOPBACK}:{port} of the manager for host {host!r}: {error}",
            error,
        ) from error
    return sock


class ListeningTunnel(Tunnel):
    """A tunnel whose listening socket is on the manager.

    Every accepted connection is relayed to the stream that `open_target`
    returns. When `open_target` fails, the accepted connection is closed, the
    failure is logged and kept in `last_error`, and the tunnel keeps
    listening, as `ssh -L` does.
    """

    def __init__(
        self,
        host: str,
        kind: str,
        listen_port: int,
        target_port: int,
        open_target: Callable[[], StreamEnd],
        relay_factory: RelayFactory = StreamRelay,
    ) -> None:
        self.host = host
        self.kind = kind
        self.listen_port = listen_port
        self.target_port = target_port
        self._open_target = open_target
        self.last_error: BaseException | None = None
        self._closed = False
        self._lock = threading.Lock()
        name = f"lazycluster-tunnel-{host}-{listen_port}"
        self._relays = RelaySet(name, relay_factory)
        self._socket = listen_loopback(listen_port, host)
        self._thread = threading.Thread(target=self._accept_loop, name=name, daemon=True)
        self._thread.start()
        # DEBUG, because a worker mesh opens one per worker and host.
        logger.debug(
            "Tunnel opened on host %s: %s port %d -> %d", host, kind, listen_port, target_port
        )

    def _accept_loop(self) -> None:
        while True:
            try:
                connection, _ = self._socket.accept()
            except OSError:
                return  # the listening socket was closed
            connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            try:
                target = self._open_target()
            except (OSError, TransportError) as error:
                self._record_failure(error)
                close_end(connection)
                continue
            self._relays.relay(connection, target)

    def _record_failure(self, error: OSError | TransportError) -> None:
        if not isinstance(error, TransportError):
            error = TransportError(
                self.host,
                f"Tunnel from port {self.listen_port} failed to connect to port "
                f"{self.target_port} on host {self.host!r}: {error}. Check that a server "
                "listens there.",
                error,
            )
        self.last_error = error
        logger.warning(
            "Tunnel on host %s failed to connect port %d -> %d: %s",
            self.host,
            self.listen_port,
            self.target_port,
            error.__cause__ or error,
        )

    @property
    def stream_count(self) -> int:
        """Number of streams relayed right now."""
        return len(self._relays)

    @property
    def is_open(self) -> bool:
        return not self._closed

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True

        close_end(self._socket)
        if self._thread is not threading.current_thread():
            self._thread.join(JOIN_TIMEOUT)
        self._relays.close()
        logger.debug(
            "Tunnel closed on host %s: %s port %d -> %d",
            self.host,
            self.kind,
            self.listen_port,
            self.target_port,
        )


class NoOpTunnel(Tunnel):
    """A tunnel from a port to the same port on the same machine: nothing to relay."""

    def __init__(self, host: str, kind: str, port: int) -> None:
        self.host = host
        self.kind = kind
        self.listen_port = port
        self.target_port = port
        self._closed = False

    @property
    def is_open(self) -> bool:
        return not self._closed

    def close(self) -> None:
        self._closed = True


def connect_loopback(port: int) -> socket.socket:
    """Return a socket connected to 127.0.0.1:`port` of the manager."""
    sock = socket.create_connection((LOOPBACK, port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock
