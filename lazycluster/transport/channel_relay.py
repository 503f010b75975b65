"""A relay between a paramiko channel and a socket that writes incoming data on paramiko's thread.

paramiko's transport thread stores each data packet of a channel in the
channel's `BufferedPipe`, and a reader of `Channel.recv` must then wake up to
take it. `ChannelRelay` hooks that pipe instead: the transport thread sends each
packet straight to the socket without blocking, so a small message costs no
thread switch. Only when the socket would block does the rest wait in a
backlog, which a writer thread drains with blocking writes.

Flow control still holds: the SSH window is acknowledged only for bytes that
the socket took, so the peer can have at most one window of data in flight and
the backlog never grows beyond one window.

The hook uses paramiko internals (`Channel.in_buffer` and its lock, buffer,
event and `_buffer_frombytes`, `Channel._check_add_window`), which paramiko has
kept from 2.x through 5.1. `relay_stream` checks them once and falls back to
the two-thread `StreamRelay` when they are missing.
"""

from __future__ import annotations

import collections
import logging
import socket
import threading
from collections.abc import Callable
from typing import Any

import paramiko
from paramiko.common import cMSG_CHANNEL_WINDOW_ADJUST
from paramiko.message import Message

from lazycluster.transport.forwarding import (
    BUFFER_SIZE,
    StreamEnd,
    StreamRelay,
)

logger = logging.getLogger(__name__)

# Bytes the writer thread sends per blocking write, so that the window is
# acknowledged in steps while a slow reader drains a large backlog.
MAX_WRITE_SIZE = 4 * BUFFER_SIZE

_PIPE_ATTRIBUTES = ("_lock", "_buffer", "_buffer_frombytes", "_closed", "_event")
_CHANNEL_ATTRIBUTES = (
    "in_buffer",
    "in_window_size",
    "in_window_threshold",
    "remote_chanid",
    "_check_add_window",
)


def _hook_supported() -> bool:
    """Return whether this paramiko has the channel internals the hook uses."""
    channel = paramiko.Channel(0)
    return all(hasattr(channel, name) for name in _CHANNEL_ATTRIBUTES) and all(
        hasattr(channel.in_buffer, name) for name in _PIPE_ATTRIBUTES
    )


HOOK_SUPPORTED = _hook_supported()
if not HOOK_SUPPORTED:
    # NOTE: with a paramiko that lacks these internals, every tunnel stream
    # costs a thread wake-up per packet, as with any `Channel.recv` reader.
    logger.info(
        "paramiko %s lacks the channel internals for direct delivery; tunnels use "
        "one relay thread per direction",
        paramiko.__version__,
    )


def relay_stream(
    left: StreamEnd, right: StreamEnd, name: str, on_done: Callable[[StreamRelay], None]
) -> StreamRelay:
    """Return a `ChannelRelay` when one end is a channel and the other a socket, else a `StreamRelay`."""
    if HOOK_SUPPORTED:
        if isinstance(left, paramiko.Channel) and isinstance(right, socket.socket):
            return ChannelRelay(left, right, name, on_done)
        if isinstance(right, paramiko.Channel) and isinstance(left, socket.socket):
            return ChannelRelay(right, left, name, on_done)
    return StreamRelay(left, right, name, on_done)


class _CloseSignal:
    """A stand-in for the pipe's event, which paramiko sets under the pipe's lock on each feed and on close."""

    def __init__(self, relay: ChannelRelay) -> None:
        self._relay = relay

    def set(self) -> None:
        self._relay._on_pipe_event()

    def clear(self) -> None:
        pass


class ChannelRelay(StreamRelay):
    """A relay between a channel and a socket.

    A thread reads the socket and sends to the channel. paramiko's transport
    thread writes the channel's data to the socket, and a writer thread sends
    what the socket did not take at once.
    """

    def __init__(
        self,
        channel: paramiko.Channel,
        sock: socket.socket,
        name: str,
        on_done: Callable[[StreamRelay], None],
    ) -> None:
        self._channel = channel
        self._sock = sock
        self._name = name
        self._pipe: Any = channel.in_buffer

        # Every field below is guarded by the pipe's lock, which paramiko holds
        # while it feeds data, so the hook and the writer share one lock.
        self._wake = threading.Condition(self._pipe._lock)
        self._backlog: collections.deque[bytes] = collections.deque()
        self._backlog_bytes = 0
        self._writing = False
        self._unacknowledged = 0
        self._eof = False
        self._ended = False
        self._ack_threshold = max(1, int(channel.in_window_threshold))
        # A peer that respects the window cannot make the backlog larger than it.
        self._max_backlog = int(channel.in_window_size) + BUFFER_SIZE
        super().__init__(sock, channel, name, on_done)

    def _make_threads(self, left: StreamEnd, right: StreamEnd, name: str) -> list[threading.Thread]:
        return [
            threading.Thread(
                target=self._pump, args=(self._sock, self._channel), name=f"{name}-tx", daemon=True
            ),
            threading.Thread(target=self._write_loop, name=f"{name}-rx", daemon=True),
        ]

    def start(self) -> None:
        # A socket with a timeout would make Python wait for it inside send(),
        # even with MSG_DONTWAIT, and that wait would stall paramiko's thread.
        self._sock.settimeout(None)
        self._install_hook()
        super().start()

    def _install_hook(self) -> None:
        """Route the pipe's incoming data to the socket, keeping what it already holds."""
        pipe = self._pipe
        with self._wake:
            # paramiko looks up `_buffer_frombytes` and the event under this
            # lock, so no packet can slip past the hook once it is set.
            buffered = pipe._buffer.tobytes()
            del pipe._buffer[:]
            pipe._buffer_frombytes = self._feed
            pipe._event = _CloseSignal(self)
            if buffered:
                self._queue(buffered)
            self._eof = bool(pipe._closed)

    def _on_pipe_event(self) -> None:
        # Called with the pipe's lock held, before each feed and on close.
        if self._pipe._closed and not self._eof:
            self._eof = True
            self._wake.notify()

    def _feed(self, data: bytes) -> None:
        """Send a packet's data to the socket. Runs on paramiko's transport thread."""
        # An exception here would end paramiko's transport thread and so the whole
        # SSH connection, so every error ends only this direction.
        try:
            if self._ended:
                return
            if self._backlog or self._writing:
                self._queue(data)
                return
            try:
                sent = self._sock.send(data, socket.MSG_DONTWAIT)
            except BlockingIOError:
                sent = 0
            self._unacknowledged += sent
            if sent < len(data):
                self._queue(data[sent:])
            elif self._unacknowledged > self._ack_threshold:
                self._wake.notify()
        except OSError as error:
            self._end(error)
        except Exception:
            logger.exception("Relay %s failed to deliver channel data", self._name)
            self._end(None)

    def _queue(self, data: bytes) -> None:
        self._backlog.append(data)
        self._backlog_bytes += len(data)
        if self._backlog_bytes > self._max_backlog:
            logger.warning(
                "Relay %s ended: %d bytes wait for the socket, more than the %d bytes "
                "the channel's window allows the peer to send",
                self._name,
                self._backlog_bytes,
                self._max_backlog,
            )
            self._end(None)
            return
        self._wake.notify()

    def _end(self, error: OSError | None) -> None:
        """End the channel-to-socket direction and drop the backlog. The caller holds the lock."""
        if error is not None:
            logger.debug("Relay %s ended: %s", self._name, error)
        self._ended = True
        self._backlog.clear()
        self._backlog_bytes = 0
        self._wake.notify()

    def _take_work(self) -> tuple[bytes, int] | None:
        """Wait for data to write or bytes to acknowledge, or return None when the direction is over."""
        while not (
            self._backlog or self._unacknowledged > self._ack_threshold or self._eof or self._ended
        ):
            self._wake.wait()
        if self._ended:
            return None

        parts: list[bytes] = []
        size = 0
        while self._backlog and size < MAX_WRITE_SIZE:
            part = self._backlog.popleft()
            parts.append(part)
            size += len(part)
        self._backlog_bytes -= size
        chunk = b"".join(parts)
        self._writing = bool(chunk)

        acknowledged = 0
        if self._unacknowledged > self._ack_threshold:
            acknowledged, self._unacknowledged = self._unacknowledged, 0
        if not chunk and not acknowledged and self._eof:
            return None
        return chunk, acknowledged

    def _write_loop(self) -> None:
        """Write the backlog with blocking writes and acknowledge the window, off paramiko's thread."""
        while True:
            with self._wake:
                work = self._take_work()
            if work is None:
                break
            chunk, acknowledged = work

            # paramiko's thread never sends the window adjustment itself, because
            # during a key exchange that send would wait for paramiko's thread.
            if acknowledged:
                self._acknowledge(acknowledged)
            if not chunk:
                continue
            try:
                self._sock.sendall(chunk)
            except OSError as error:
                with self._wake:
                    self._writing = False
                    self._end(error)
                break
            with self._wake:
                self._writing = False
                self._unacknowledged += len(chunk)
        self._direction_ended(self._sock)

    def _acknowledge(self, size: int) -> None:
        """Grant the peer `size` more bytes of window."""
        increment = self._channel._check_add_window(size)
        if increment <= 0:
            return
        message = Message()
        message.add_byte(cMSG_CHANNEL_WINDOW_ADJUST)
        message.add_int(self._channel.remote_chanid)
        message.add_int(increment)
        try:
            self._channel.transport._send_user_message(message)
        except (paramiko.SSHException, OSError, EOFError) as error:
            logger.debug("Relay %s failed to adjust the window: %s", self._name, error)
