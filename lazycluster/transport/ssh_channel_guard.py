"""A paramiko transport that keeps two orderings paramiko leaves to its callers.

First, it sends nothing on a channel after the channel's close.

paramiko builds a channel's messages under the channel's lock but sends them
after releasing it. When sshd closes a channel, paramiko's thread replies with
a close of its own. A message that another thread built just before (the EOF
after a command's input, a window adjustment, tunnel data) can then follow that
close onto the wire. sshd has freed the channel by then and treats the late
message as a protocol error: it drops the whole connection with every command
and tunnel on it ("packet referred to nonexistent channel" in its log).

`GuardedTransport` serializes the sends of channel messages, remembers the
channels it sent a close for, and drops later messages to them.

NOTE: a message is matched to its channel by the peer's channel number only.
A message held up for longer than sshd takes to free that number and give it
to a new channel of ours still reaches the new channel.

Second, it makes global requests that want a reply take turns. paramiko hands
each reply to the latest caller that waits, so a keepalive sent while a port
forwarding request waits would have its reply taken for the forwarding's.
"""

from __future__ import annotations

import logging
import threading

import paramiko

logger = logging.getLogger(__name__)

# SSH message numbers (RFC 4254): the messages a channel sends during its life,
# each starting with the peer's channel number, and the close that ends it.
_WINDOW_ADJUST = 93
_CHANNEL_FAILURE = 100
_CHANNEL_CLOSE = 97


def message_header(message: object) -> tuple[int, int | None]:
    """Return the message number of a paramiko message and, for a channel message, its channel."""
    packet = getattr(message, "packet", None)
    if packet is None:
        return -1, None

    # A view instead of getvalue(), which would copy a data message of 256 KiB.
    with packet.getbuffer() as view:
        head = bytes(view[:5])
    if not head:
        return -1, None
    kind = head[0]
    if _WINDOW_ADJUST <= kind <= _CHANNEL_FAILURE and len(head) == 5:
        return kind, int.from_bytes(head[1:5], "big")
    return kind, None


class GuardedTransport(paramiko.Transport):
    """paramiko's transport, minus the messages that would follow a channel's close."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self._send_order = threading.Lock()
        # Held while waiting for a global reply. Reentrant, so that a caller may
        # hold it around its own bounded wait (see ssh_alive).
        self.global_requests = threading.RLock()
        # Peer channel numbers we sent a close for. sshd reuses a number once
        # both sides closed it, so an open channel with that number is a new one.
        self._closed_peer_channels: set[int] = set()

    def _send_user_message(self, data: object) -> None:
        kind, peer_channel = message_header(data)
        if peer_channel is None:
            super()._send_user_message(data)
            return

        # The lock makes "checked, then sent" one step for every channel
        # message, so a close cannot overtake a message between the two.
        # paramiko's own send lock is taken inside; waits behind this one are
        # the ones that paramiko's lock would have caused.
        with self._send_order:
            # paramiko closes each channel once, so a close always belongs to
            # a channel that is still open at sshd, possibly one that reuses
            # the number.
            if kind == _CHANNEL_CLOSE:
                self._closed_peer_channels.add(peer_channel)
                super()._send_user_message(data)
                return

            if peer_channel in self._closed_peer_channels:
                if not self._has_open_channel(peer_channel):
                    logger.debug(
                        "Dropped SSH message %d for channel %d after its close",
                        kind,
                        peer_channel,
                    )
                    return
                self._closed_peer_channels.discard(peer_channel)
            super()._send_user_message(data)

    def global_request(self, kind: str, data: object = None, wait: bool = True) -> object:
        if not wait:
            # No reply comes, so nothing waits for one.
            return super().global_request(kind, data, wait)
        with self.global_requests:
            return super().global_request(kind, data, wait)

    def _has_open_channel(self, peer_channel: int) -> bool:
        # A channel still waiting for its open confirmation is not active and
        # has no peer number yet (paramiko shows 0).
        return any(
            channel.active and not channel.closed and channel.remote_chanid == peer_channel
            for channel in self._channels.values()
        )
