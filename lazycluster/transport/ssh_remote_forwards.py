"""Remote port forwarding on an SSH connection: the host listens, the manager serves.

sshd listens on 127.0.0.1 of the host for each forwarded port and opens a
`forwarded-tcpip` channel per incoming connection. One handler on paramiko's
transport thread hands each channel to the tunnel of its port, which relays it
to the manager's target port.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Callable, Iterable, Sequence
from typing import TypeVar

import paramiko

from lazycluster.exceptions import ConnectionLostError, PortInUseError, TransportError
from lazycluster.transport.base import Tunnel
from lazycluster.transport.channel_relay import relay_stream
from lazycluster.transport.forwarding import RelaySet, close_end, connect_loopback

logger = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"

# Up to this many remote forwards are requested one by one, each waiting for
# its reply. Larger batches use a fixed number of round trips.
MAX_SEQUENTIAL_FORWARDS = 3

_NETWORK_ERRORS = (paramiko.SSHException, EOFError, OSError)

# Seconds to wait for sshd's reply to a forwarding request. paramiko itself
# waits without a bound, so a frozen host would block the caller, cleanup
# included, for as long as it stays frozen. Past this bound the connection
# counts as lost and is closed, which also ends its forwards.
REPLY_TIMEOUT = 30.0

T = TypeVar("T")


def wait_for_reply(
    transport: paramiko.Transport,
    host: str,
    action: str,
    call: Callable[[], T],
    timeout: float | None = None,
) -> T:
    """Return `call()`, closing `transport` when sshd has not replied within `timeout` seconds.

    `timeout` defaults to REPLY_TIMEOUT.

    A closed transport ends paramiko's wait for the reply, so `call` returns
    or raises soon after.
    """

    limit = REPLY_TIMEOUT if timeout is None else timeout

    def give_up() -> None:
        logger.warning(
            "Host %s did not reply to %s within %g s; closing its connection",
            host,
            action,
            limit,
        )
        transport.close()

    timer = threading.Timer(limit, give_up)
    timer.daemon = True
    timer.start()
    try:
        return call()
    finally:
        timer.cancel()


class RemoteTunnel(Tunnel):
    """A port the host listens on (sshd's remote forwarding), relayed to the manager.

    When the manager's target port refuses a connection, the incoming stream is
    closed and the error is kept in `last_error`; the tunnel keeps listening.
    """

    def __init__(self, owner: RemoteForwards, listen_port: int, target_port: int) -> None:
        self.host = owner.host
        self.kind = "remote"
        self.listen_port = listen_port
        self.target_port = target_port
        self._owner = owner
        self.last_error: BaseException | None = None
        self._relays = RelaySet(f"lazycluster-tunnel-{owner.host}-{listen_port}", relay_stream)
        # Whether the last incoming stream found the manager's target port closed.
        self._target_closed = False
        self._closed = False

    def accept(self, channel: paramiko.Channel) -> None:
        """Relay an incoming channel to the manager's target port."""
        try:
            sock = connect_loopback(self.target_port)
        except OSError as error:
            self.last_error = TransportError(
                self.host,
                f"Tunnel from port {self.listen_port} of host {self.host!r} failed to connect to "
                f"manager port {self.target_port}: {error}. Check that a server listens there.",
                error,
            )
            # A server that is still starting refuses every few milliseconds
            # (Dask workers retry at once), so only the first refusal of a streak is
            # logged above DEBUG. The client at the other end gets each refusal anyway.
            level = logging.DEBUG if self._target_closed else logging.INFO
            self._target_closed = True
            logger.log(
                level,
                "Tunnel on host %s failed to connect port %d -> manager port %d: %s",
                self.host,
                self.listen_port,
                self.target_port,
                error,
            )
            close_end(channel)
            return
        self._target_closed = False
        self._relays.relay(channel, sock)

    @property
    def stream_count(self) -> int:
        """Number of streams relayed right now."""
        return len(self._relays)

    @property
    def is_open(self) -> bool:
        return not self._closed

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        was_forwarded = self._owner.cancel(self)
        self._relays.close()
        if not was_forwarded:
            return
        logger.debug(
            "Tunnel closed on host %s: remote port %d -> %d",
            self.host,
            self.listen_port,
            self.target_port,
        )


class RemoteForwards:
    """The remote forwards of one SSH transport, kept across reconnects.

    `live_transport` returns the connection's paramiko transport, reconnecting
    when it dropped; `current_transport` returns it as it is. `ports_in_use`
    reads the host's socket tables and `lost` builds the error for a dropped
    connection.
    """

    def __init__(
        self,
        host: str,
        live_transport: Callable[[], paramiko.Transport],
        current_transport: Callable[[], paramiko.Transport],
        ports_in_use: Callable[[Iterable[int]], set[int]],
        lost: Callable[[str, BaseException], ConnectionLostError],
    ) -> None:
        self.host = host
        self._live_transport = live_transport
        self._current_transport = current_transport
        self._ports_in_use = ports_in_use
        self._lost = lost
        self._lock = threading.Lock()
        self._tunnels: dict[int, RemoteTunnel] = {}

    def open(self, pairs: Sequence[tuple[int, int]]) -> list[RemoteTunnel]:
        """Forward each (host_port, manager_port) pair; on failure none stays open."""
        host_ports = [host_port for host_port, _ in pairs]
        if len(set(host_ports)) != len(host_ports):
            raise ValueError(f"Invalid remote forwards {list(pairs)}: a host port appears twice.")

        tunnels = [RemoteTunnel(self, host_port, manager_port) for host_port, manager_port in pairs]
        try:
            if len(tunnels) <= MAX_SEQUENTIAL_FORWARDS:
                for tunnel in tunnels:
                    self._request_one(tunnel)
            else:
                self._request_batch(tunnels)
        except BaseException:
            for tunnel in tunnels:
                tunnel.close()
            raise
        logger.info(
            "Tunnels opened on host %s: remote ports -> manager ports %s",
            self.host,
            _describe_pairs(pairs),
        )
        return tunnels

    def _request_one(self, tunnel: RemoteTunnel) -> None:
        """Forward one host port, waiting for sshd's reply."""
        port = tunnel.listen_port
        transport = self._live_transport()
        with self._lock:
            if port in self._tunnels:
                raise PortInUseError(port, where=f"host {self.host!r} (already forwarded)")
            self._tunnels[port] = tunnel
            try:
                wait_for_reply(
                    transport,
                    self.host,
                    f"the request to forward port {port}",
                    lambda: transport.request_port_forward(
                        LOOPBACK, port, handler=self._on_channel
                    ),
                )
                return
            except _NETWORK_ERRORS as error:
                del self._tunnels[port]
                failure: BaseException = error
        if not transport.is_active():
            raise self._lost(f"forwarding port {port}", failure) from failure
        if port in self._ports_in_use([port]):
            raise PortInUseError(port, predecessor_excp=failure, where=f"host {self.host!r}")
        raise TransportError(
            self.host,
            f"Host {self.host!r} rejected forwarding its port {port}: {failure}. Check that "
            "sshd there allows it (AllowTcpForwarding yes) and, for ports below 1024, that "
            "the user is root.",
            failure,
        ) from failure

    def _request_batch(self, tunnels: list[RemoteTunnel]) -> None:
        """Forward many host ports in four round trips, whatever their number.

        The caller closes every tunnel of the batch when this raises.
        """
        ports = [tunnel.listen_port for tunnel in tunnels]
        in_use = self._ports_in_use(ports)
        if in_use:
            raise PortInUseError(min(in_use), where=f"host {self.host!r}")

        transport = self._live_transport()
        with self._lock:
            forwarded = [port for port in ports if port in self._tunnels]
            if forwarded:
                raise PortInUseError(forwarded[0], where=f"host {self.host!r} (already forwarded)")
            for tunnel in tunnels:
                self._tunnels[tunnel.listen_port] = tunnel
            try:
                reply = wait_for_reply(
                    transport,
                    self.host,
                    f"the requests to forward ports {ports[0]} to {ports[-1]}",
                    lambda: self._send_batch(transport, ports),
                )
            except _NETWORK_ERRORS as error:
                if not transport.is_active():
                    raise self._lost(f"forwarding ports {ports}", error) from error
                reply, failure = None, error
            else:
                failure = None

        # NOTE: a port taken by another program between the first check and the
        # request shows as listening below, so it is not detected.
        listening = self._ports_in_use(ports)
        missing = sorted(set(ports) - listening)
        if reply is None or missing:
            raise TransportError(
                self.host,
                f"Host {self.host!r} rejected forwarding its ports {missing or ports[-1:]}"
                f"{f': {failure}' if failure else ''}. Check that sshd there allows it "
                "(AllowTcpForwarding yes) and, for ports below 1024, that the user is root.",
                failure,
            )

    def _send_batch(self, transport: paramiko.Transport, ports: list[int]) -> object:
        """Request forwarding of `ports`; return sshd's reply to the last request, or None."""
        # The first request installs the handler of incoming connections
        # before any port of the batch listens.
        transport.request_port_forward(LOOPBACK, ports[0], handler=self._on_channel)
        # The middle requests want no reply, so they go out back to back.
        # sshd handles global requests in order, so the reply to the last
        # one arrives after every earlier one was handled.
        for port in ports[1:-1]:
            transport.global_request("tcpip-forward", (LOOPBACK, port), wait=False)
        return transport.global_request("tcpip-forward", (LOOPBACK, ports[-1]), wait=True)

    def _on_channel(
        self, channel: paramiko.Channel, origin: tuple[str, int], server: tuple[str, int]
    ) -> None:
        # Called on paramiko's transport thread for each connection to a forwarded port.
        tunnel = self._tunnels.get(server[1])
        if tunnel is None or not tunnel.is_open:
            logger.warning(
                "Host %s sent a connection for port %d, which has no open tunnel",
                self.host,
                server[1],
            )
            close_end(channel)
            return
        tunnel.accept(channel)

    def cancel(self, tunnel: RemoteTunnel) -> bool:
        """Stop forwarding the tunnel's port; return False when it was not forwarded."""
        with self._lock:
            if self._tunnels.get(tunnel.listen_port) is not tunnel:
                return False
            del self._tunnels[tunnel.listen_port]
            transport = self._current_transport()
            if not transport.is_active():
                return True
            try:
                # paramiko's cancel_port_forward would also drop the handler that
                # serves the other forwarded ports, so the request is sent directly.
                wait_for_reply(
                    transport,
                    self.host,
                    f"the request to stop forwarding port {tunnel.listen_port}",
                    lambda: transport.global_request(
                        "cancel-tcpip-forward", (LOOPBACK, tunnel.listen_port), wait=True
                    ),
                )
            except _NETWORK_ERRORS as error:
                logger.warning(
                    "Failed to cancel forwarding of port %d on host %s: %s",
                    tunnel.listen_port,
                    self.host,
                    error,
                )
            return True

    def close_all(self, notify: bool) -> None:
        """Close every forward; with `notify`, cancel them on the host first.

        Only the reply to the last cancel is awaited.
        """
        with self._lock:
            tunnels = list(self._tunnels.values())
            self._tunnels.clear()
            transport = self._current_transport()
            ports = [tunnel.listen_port for tunnel in tunnels] if notify else []
            try:
                # sshd handles global requests in order, so once the last cancel
                # is answered every port of the list is free.
                for port in ports[:-1]:
                    if transport.is_active():
                        transport.global_request(
                            "cancel-tcpip-forward", (LOOPBACK, port), wait=False
                        )
                if ports and transport.is_active():
                    wait_for_reply(
                        transport,
                        self.host,
                        f"the requests to stop forwarding ports {ports}",
                        lambda: transport.global_request(
                            "cancel-tcpip-forward", (LOOPBACK, ports[-1]), wait=True
                        ),
                    )
            except _NETWORK_ERRORS as error:
                logger.warning(
                    "Failed to cancel forwarding of ports %s on host %s: %s",
                    ports,
                    self.host,
                    error,
                )
        for tunnel in tunnels:
            tunnel.close()
        if tunnels:
            logger.info(
                "Tunnels closed on host %s: remote ports -> manager ports %s",
                self.host,
                _describe_pairs([(tunnel.listen_port, tunnel.target_port) for tunnel in tunnels]),
            )

    def restore(self) -> None:
        """Request every open forward again, on a new connection."""
        with self._lock:
            tunnels = list(self._tunnels.values())
            transport = self._current_transport()
            for tunnel in tunnels:
                try:
                    wait_for_reply(
                        transport,
                        self.host,
                        f"the request to forward port {tunnel.listen_port} again",
                        functools.partial(
                            transport.request_port_forward,
                            LOOPBACK,
                            tunnel.listen_port,
                            handler=self._on_channel,
                        ),
                    )
                except _NETWORK_ERRORS as error:
                    logger.warning(
                        "Failed to restore forwarding of port %d on host %s: %s",
                        tunnel.listen_port,
                        self.host,
                        error,
                    )

    @property
    def tunnels(self) -> list[RemoteTunnel]:
        """The forwards that are open."""
        with self._lock:
            return list(self._tunnels.values())


def _describe_pairs(pairs: Sequence[tuple[int, int]], limit: int = 10) -> str:
    listed = ", ".join(f"{listen}->{target}" for listen, target in pairs[:limit])
    return listed + (f" and {len(pairs) - limit} more" if len(pairs) > limit else "")
