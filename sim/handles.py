"""Handles the simulated transport gives out: tunnels and background processes."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from lazycluster.exceptions import CommandTimeoutError
from lazycluster.transport.base import DEFAULT_STOP_GRACE, ProcessHandle, Tunnel

if TYPE_CHECKING:
    from sim.host import SimHost
    from sim.process import SimProcess
    from sim.transport import SimTransport


class SimTunnel(Tunnel):
    """A forwarded port. A "local" tunnel listens on the manager and leads to the host,
    a "remote" one listens on the host and leads to the manager.

    A tunnel is open while the port table of its listening host maps its listen
    port to it, or while it waits for its connection to come back. Close
    watchers live in the network, so a tunnel has four fields only, which
    matters because a full mesh has millions of tunnels.
    """

    __slots__ = ("transport", "kind", "listen_port", "target_port")

    def __init__(self, transport: SimTransport, kind: str, listen_port: int, target_port: int) -> None:
        self.transport = transport
        self.kind = kind
        self.listen_port = listen_port
        self.target_port = target_port

    @property
    def host(self) -> str:  # type: ignore[override]
        return self.transport.host

    @property
    def listen_host(self) -> SimHost:
        return self.transport.network.manager if self.kind == "local" else self.transport.sim_host

    @property
    def target_host(self) -> SimHost:
        return self.transport.sim_host if self.kind == "local" else self.transport.network.manager

    @property
    def is_open(self) -> bool:
        return self.listen_host.ports.get(self.listen_port) is self or self in self.transport._suspended

    def suspend(self) -> None:
        """Give up the listen port while the connection is down; tell the close watchers."""
        ports = self.listen_host.ports
        if ports.get(self.listen_port) is self:
            del ports[self.listen_port]
        self.transport._suspended.add(self)
        self._notify_watchers()

    def resume(self) -> bool:
        """Listen again after a reconnect; return False when the port was taken meanwhile."""
        if not self.listen_host.bind(self.listen_port, self):
            return False
        self.transport._suspended.discard(self)
        return True

    def watch_close(self, watcher: Callable[[SimTunnel], None]) -> None:
        """Call `watcher(tunnel)` once when the tunnel closes or its host loses the port."""
        self.transport.network.tunnel_watchers.setdefault(self, []).append(watcher)

    def close(self) -> None:
        ports = self.listen_host.ports
        if ports.get(self.listen_port) is self:
            del ports[self.listen_port]
        self.transport._suspended.discard(self)
        self._notify_watchers()

    def _notify_watchers(self) -> None:
        watchers = self.transport.network.tunnel_watchers.pop(self, None)
        for watcher in watchers or ():
            watcher(self)


class SimProcessHandle(ProcessHandle):
    """The library's handle to a simulated process; every call is a round trip to the host."""

    def __init__(self, transport: SimTransport, process: SimProcess) -> None:
        self.transport = transport
        self.process = process
        self.host = transport.host
        self.pid = process.pid
        self.command = process.command
        self.log_path = process.log_path

    def poll(self) -> int | None:
        # After close() every process was stopped; the handle reports the stored code.
        if not self.transport._closed:
            self.transport._enter("poll")
        return self.process.exit_code

    def wait(self, timeout: float | None = None) -> int:
        self.transport._enter("wait")
        clock = self.transport.network.clock
        deadline = None if timeout is None else clock.monotonic() + timeout
        while self.process.alive:
            due = clock.next_event_time()
            if deadline is not None and (due is None or due > deadline):
                clock.advance_to(deadline)
                raise CommandTimeoutError(self.host, f"Waiting for process {self.pid}", timeout or 0)
            if due is None:
                raise RuntimeError(
                    f"Process {self.pid} on simulated host {self.host!r} never exits and nothing "
                    "else is scheduled; waiting without a timeout would hang forever."
                )
            clock.advance_to(due)
        assert self.process.exit_code is not None
        return self.process.exit_code

    def stop(self, grace: float = DEFAULT_STOP_GRACE) -> int | None:
        self.transport._enter("stop")
        return self.transport._stop_process(self.process, grace)

    def read_log(self, max_lines: int | None = None) -> str:
        self.transport._enter("read_log")
        try:
            text = self.transport.sim_host.fs.read(self.process.log_path).decode(errors="replace")
        except OSError:
            return ""
        if max_lines is None:
            return text
        return "".join(text.splitlines(keepends=True)[-max_lines:]) if max_lines > 0 else ""
