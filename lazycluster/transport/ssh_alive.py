"""Detecting a host that stopped replying, as OpenSSH's ServerAliveInterval does.

A frozen host (a paused VM or container, a hung kernel) keeps its TCP
connections open, so a command or tunnel waiting on it would wait forever.
`AliveCheck` sends a keepalive that wants a reply every interval and closes the
connection when no reply came within `count_max` intervals. Waiting callers
then fail with ConnectionLostError, and the next call reconnects.
"""

from __future__ import annotations

import logging
import threading

import paramiko

from lazycluster.transport.ssh_channel_guard import GuardedTransport
from lazycluster.transport.ssh_remote_forwards import wait_for_reply

logger = logging.getLogger(__name__)

# sshd replies to this unknown request with a failure, which counts as a reply.
KEEPALIVE_REQUEST = "keepalive@openssh.com"

# Seconds close() waits for the thread to end.
JOIN_TIMEOUT = 5.0


class AliveCheck:
    """A thread that keeps asking one connection's host for a reply."""

    def __init__(
        self, host: str, transport: GuardedTransport, interval: float, count_max: int
    ) -> None:
        self._host = host
        self._transport = transport
        self._interval = interval
        self._count_max = count_max
        self._stopped = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name=f"lazycluster-alive-{host}", daemon=True
        )
        self._thread.start()

    def _run(self) -> None:
        while not self._stopped.wait(self._interval):
            if not self._transport.is_active():
                return
            self._ask()

    def _ask(self) -> None:
        transport = self._transport
        # The turn is taken before the clock starts, so a forwarding request
        # that waits for its own reply does not count against this one.
        with transport.global_requests:
            if self._stopped.is_set() or not transport.is_active():
                return
            try:
                wait_for_reply(
                    transport,
                    self._host,
                    "a keepalive",
                    lambda: transport.global_request(KEEPALIVE_REQUEST, wait=True),
                    timeout=self._interval * self._count_max,
                )
            except (paramiko.SSHException, EOFError, OSError) as error:
                logger.debug("Keepalive to host %s failed: %s", self._host, error)

    def stop(self) -> None:
        """End the thread; call after closing the connection, which ends a wait for a reply."""
        self._stopped.set()
        if self._thread is not threading.current_thread():
            self._thread.join(JOIN_TIMEOUT)
