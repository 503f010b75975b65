"""`Network`: the simulated world of the manager and its hosts, and the backend for it.

Install it with `lazycluster.transport.use_backend(network)` and every
`Runtime`, `RuntimeGroup` and `DaskCluster` runs on simulated hosts. One seed
fixes every random choice, so the same seed and the same test give the same
trace.
"""

from __future__ import annotations

import gc
import logging
import random
from collections.abc import Callable, Iterable, Mapping
from typing import Any, NamedTuple

from lazycluster.exceptions import AuthenticationError, HostUnreachableError
from lazycluster.transport.base import Backend
from sim.builtins import find_builtin
from sim.clock import VirtualClock
from sim.commands import Call, Handler
from sim.faults import Fault, FaultInjector, FaultPlan
from sim.handles import SimTunnel
from sim.host import TMP_DIR, ForeignHolder, SimHost
from sim.process import SIGKILL, Program, SimProcess
from sim.programs import match_dask
from sim.transport import TEMP_PREFIX, SimTransport

logger = logging.getLogger(__name__)

ProgramMatcher = Callable[["Network", list[str]], "Program | None"]
SnippetHandler = Callable[..., "int | None"]

# Base start time of each program kind, in virtual seconds. A seeded jitter of up
# to START_JITTER is added, unless a test sets the delay with set_start_delay.
DEFAULT_START_DELAYS = {"scheduler": 0.5, "worker": 0.3}
START_JITTER = 0.2
FIRST_PID = 1000
MAX_ROUTE_HOPS = 8
EPHEMERAL_PORTS = range(32768, 61000)


def unmodeled_executable(call: Call) -> int:
    """Stand-in for an executable a host lists as installed but nothing simulates."""
    raise NotImplementedError(
        f"the simulator does not (yet) support running {call.argv[0]!r} on host "
        f"{call.host.name!r}: it is listed as installed, but no handler is registered. "
        "Register one with network.register_command(name, handler)."
    )


class TraceEvent(NamedTuple):
    """One thing that happened: virtual time, host, event kind and details."""

    time: float
    host: str
    kind: str
    detail: str

    def __str__(self) -> str:
        return f"{self.time:10.4f} {self.host:<12} {self.kind:<20} {self.detail}"


class Network(Backend):
    """The manager plus named hosts, a virtual clock, a seeded random source and faults.

    `hosts` is a count (hosts h1..hN), an iterable of names, or a mapping of
    name to `SimHost` keyword arguments (e.g. {"gpu1": {"gpus": ["A100"]}}).
    """

    def __init__(
        self,
        hosts: int | Iterable[str] | Mapping[str, Mapping[str, Any]] = 3,
        *,
        seed: int = 0,
        manager: str = "localhost",
        faults: FaultPlan | Iterable[Fault] = (),
        clock: VirtualClock | None = None,
    ) -> None:
        self.seed = seed
        self.random = random.Random(seed)
        self.clock: VirtualClock = clock or VirtualClock()
        self.trace: list[TraceEvent] = []
        self.faults = FaultInjector(self)
        self.manager = SimHost(manager)
        self.hosts: dict[str, SimHost] = {}
        self.start_delays: dict[tuple[str | None, str], float] = {}
        self._commands: dict[str, Handler] = {}
        self._host_commands: dict[tuple[str, str], Handler] = {}
        self._snippets: dict[str, SnippetHandler] = {}
        self._scripts: dict[str, Handler] = {}
        self._programs: list[ProgramMatcher] = [match_dask]
        self._connections: dict[str, list[SimTransport]] = {}
        self._local: SimTransport | None = None
        self.tunnel_watchers: dict[SimTunnel, list[Callable[[SimTunnel], None]]] = {}
        self._next_pid = FIRST_PID
        self._gc_paused = False
        self.clock.add_advance_hook(self.resume_gc)

        if isinstance(hosts, int):
            hosts = [f"h{index}" for index in range(1, hosts + 1)]
        if isinstance(hosts, Mapping):
            for name, specs in hosts.items():
                self.add_host(name, **specs)
        else:
            for name in hosts:
                self.add_host(name)
        self._install_library_commands()
        self.apply(faults)

    def _install_library_commands(self) -> None:
        # Imported here because it follows lazycluster.host_commands, which imports more.
        from sim.library import install

        install(self)

    # -- building the world ----------------------------------------------------

    def add_host(self, name: str, **specs: Any) -> SimHost:
        """Add a host named `name`; `specs` are `SimHost` fields (cpu_cores, gpus, env, ...)."""
        if name in self.hosts or name == self.manager.name:
            raise ValueError(f"Host {name!r} already exists in the simulated network.")
        host = SimHost(name, **specs)
        self.hosts[name] = host
        return host

    def host(self, name: str) -> SimHost:
        """Return the host (or the manager) named `name`; KeyError names the known hosts."""
        if name == self.manager.name:
            return self.manager
        try:
            return self.hosts[name]
        except KeyError:
            raise KeyError(
                f"No simulated host {name!r}. Known hosts: {[self.manager.name, *self.hosts]}."
            ) from None

    def apply(self, faults: FaultPlan | Iterable[Fault]) -> None:
        """Schedule every fault of a plan."""
        for fault in faults:
            self.faults.apply(fault)

    def register_command(self, name: str, handler: Handler, hosts: Iterable[str] | None = None) -> None:
        """Run `handler(call)` for commands whose argv[0] is `name`, on `hosts` or on every host."""
        if hosts is None:
            self._commands[name] = handler
            return
        for host in hosts:
            self.host(host)
            self._host_commands[(host, name)] = handler

    def register_snippet(self, text: str, handler: SnippetHandler) -> None:
        """Run `handler(call)` for `python3 -c TEXT`; call.argv[3:] are the snippet's arguments."""
        self._snippets[text] = handler

    def register_script(self, text: str, handler: Handler) -> None:
        """Run `handler(call)` for `sh -c TEXT NAME ARGS...`; call.argv is [NAME, ARGS...]."""
        self._scripts[text] = handler

    def register_program(self, matcher: ProgramMatcher) -> None:
        """Let `matcher(network, argv)` return a `Program` for background processes it models."""
        self._programs.insert(0, matcher)

    def set_start_delay(self, program: str, seconds: float, host: str | None = None) -> None:
        """Fix the start delay of `program` ("scheduler", "worker" or "*") on one or every host."""
        if seconds < 0:
            raise ValueError(f"Invalid start delay {seconds!r}: expected a value >= 0.")
        self.start_delays[(host, program)] = seconds

    def hold_port(self, host: str, port: int, label: str = "foreign process") -> None:
        """Let a process outside the library take `port` on `host` now."""
        if not self.host(host).bind(port, ForeignHolder(label)):
            raise ValueError(
                f"Port {port} on {host!r} is already taken by {self.host(host).ports[port]!r}. "
                "Release it first or choose another port."
            )
        self.record(host, "port.hold", f"port={port} {label}")

    def release_port(self, host: str, port: int) -> None:
        """Free a port taken with `hold_port`."""
        holder = self.host(host).ports.get(port)
        if isinstance(holder, ForeignHolder):
            self.host(host).release(port, holder)

    # -- the Backend interface ------------------------------------------------

    def connect(self, host: str, connection_kwargs: Mapping[str, object] | None = None) -> SimTransport:
        if host != self.manager.name and host not in self.hosts:
            raise HostUnreachableError(
                host, f"Could not resolve hostname {host!r}: it is not a host of the simulated network."
            )
        sim_host = self.host(host)
        if sim_host.unreachable:
            self.record(host, "connect.failed", "unreachable")
            raise HostUnreachableError(host, f"Connection to host {host!r} timed out: host unreachable.")
        if sim_host.auth_fails:
            self.record(host, "connect.failed", "authentication")
            raise AuthenticationError(
                host, f"Authentication to host {host!r} failed: no key was accepted. Check the IdentityFile."
            )
        transport = SimTransport(self, sim_host)
        self._connections.setdefault(host, []).append(transport)
        self.record(host, "connect", "")
        return transport

    def local(self) -> SimTransport:
        if self._local is None or self._local._closed:
            self._local = SimTransport(self, self.manager, is_local=True)
        return self._local

    def configured_hosts(self) -> list[str]:
        return list(self.hosts)

    # -- used by transports and programs ---------------------------------------

    def pause_gc(self) -> None:
        """Pause Python's cyclic garbage collector until the next operation that is no tunnel batch.

        A full mesh creates millions of tunnels in back-to-back batches, and every
        collection they trigger scans all tracked objects again: that took most of
        the time of a 1,000-host start. Collection resumes with the next other
        transport operation, close, advance of the clock or `leftovers()`.
        """
        if not self._gc_paused and gc.isenabled():
            gc.disable()
            self._gc_paused = True

    def resume_gc(self) -> None:
        """Turn the garbage collector back on if `pause_gc` turned it off."""
        if self._gc_paused:
            self._gc_paused = False
            gc.enable()

    def record(self, host: str, kind: str, detail: str = "") -> None:
        self.trace.append(TraceEvent(round(self.clock.monotonic(), 9), host, kind, detail))

    def next_pid(self) -> int:
        self._next_pid += 1
        return self._next_pid

    def forget(self, transport: SimTransport) -> None:
        connections = self._connections.get(transport.host)
        if connections and transport in connections:
            connections.remove(transport)

    def find_command(self, host: SimHost, executable: str) -> Handler | None:
        """Return the handler of `executable` on `host`, or None when it is not installed there."""
        name = executable.rsplit("/", 1)[-1]
        handler = (
            self._host_commands.get((host.name, executable))
            or self._commands.get(executable)
            or self._host_commands.get((host.name, name))
            or self._commands.get(name)
            or find_builtin(host, executable)
        )
        if handler is None and name in host.executables:
            return unmodeled_executable
        return handler

    def find_script(self, text: str) -> Handler | None:
        return self._scripts.get(text)

    def find_snippet(self, text: str) -> SnippetHandler | None:
        return self._snippets.get(text)

    def match_program(self, argv: list[str]) -> Program | None:
        for matcher in self._programs:
            program = matcher(self, argv)
            if program is not None:
                return program
        return None

    def start_delay(self, host: str, program: str) -> float:
        for key in ((host, program), (host, "*"), (None, program), (None, "*")):
            if key in self.start_delays:
                return self.start_delays[key]
        return DEFAULT_START_DELAYS.get(program, 0.0) + self.random.uniform(0, START_JITTER)

    def free_ephemeral_port(self, host: SimHost) -> int:
        """Pick a free port of Linux's default ephemeral range (32768-60999), as bind(0) does."""
        while True:
            port = self.random.randrange(EPHEMERAL_PORTS.start, EPHEMERAL_PORTS.stop)
            if port not in host.ports:
                return port

    def resolve(self, host: str, port: int) -> tuple[SimProcess, list[SimTunnel]] | None:
        """Follow tunnels from `host`:`port` to the process listening at the end, if any."""
        route: list[SimTunnel] = []
        current, current_port = self.host(host), port
        for _ in range(MAX_ROUTE_HOPS):
            holder = current.ports.get(current_port)
            if isinstance(holder, SimProcess):
                return (holder, route) if holder.alive else None
            if not isinstance(holder, SimTunnel):
                return None
            route.append(holder)
            current, current_port = holder.target_host, holder.target_port
        return None

    def restart_host(self, name: str) -> None:
        """Reboot a host: every process ends, every port is free, connections are lost.

        /tmp is emptied, as on systems that keep it in memory (tmpfs). Remote
        forwards of open connections come back when those connections reconnect.
        """
        host = self.host(name)
        host.boot_count += 1
        self.record(name, "host.restart", f"boot={host.boot_count}")
        for process in list(host.processes.values()):
            process.exit(128 + SIGKILL, "host restart")
        for transport in list(self._connections.get(name, [])):
            if transport._connected:
                transport._disconnect("host restarted")
        for port, holder in list(host.ports.items()):
            if isinstance(holder, SimTunnel):
                holder.close()
            else:
                host.ports.pop(port, None)
        for path in host.fs.under(TMP_DIR):
            if host.fs.exists(path):
                host.fs.remove(path, recursive=True)

    # -- queries for tests ---------------------------------------------------------

    def all_hosts(self) -> list[SimHost]:
        return [self.manager, *self.hosts.values()]

    def processes(self, host: str | None = None, alive: bool = True) -> list[SimProcess]:
        """Return the processes of one host or of all hosts (only running ones by default)."""
        hosts = [self.host(host)] if host else self.all_hosts()
        return [p for h in hosts for p in h.processes.values() if p.alive or not alive]

    def listening_ports(self, host: str) -> dict[int, object]:
        """Return {port: holder} of every port in use on `host`, sorted by port."""
        return dict(sorted(self.host(host).ports.items()))

    def open_tunnels(self, host: str | None = None) -> list[SimTunnel]:
        """Return the open tunnels whose connection goes to `host` (or to any host)."""
        tunnels = [
            holder
            for sim_host in self.all_hosts()
            for holder in sim_host.ports.values()
            if isinstance(holder, SimTunnel)
        ]
        return [tunnel for tunnel in tunnels if host is None or tunnel.host == host]

    def files(self, host: str, under: str = "/") -> list[str]:
        """Return every file and directory below `under` on `host`."""
        return self.host(host).fs.under(under)

    def temp_dirs(self, host: str) -> list[str]:
        """Return the lazycluster temporary directories left in /tmp of `host`.

        The log directory of the shared manager transport (`local()`) belongs to
        the backend, not to the library code under test, so it is not listed.
        """
        fs = self.host(host).fs
        backend_owned = self._local._log_dir if self._local is not None else None
        return sorted(
            path
            for path in fs.directories
            if path.startswith(f"{TMP_DIR}/{TEMP_PREFIX}") and path.count("/") == 2 and path != backend_owned
        )

    def leftovers(self) -> list[str]:
        """Describe everything the library started that is still there."""
        self.resume_gc()
        found = []
        for sim_host in self.all_hosts():
            name = sim_host.name
            for process in sim_host.processes.values():
                if process.alive and process.started_by_library:
                    found.append(f"{name}: process {process.pid} still running: {process.command}")
            for port, holder in sorted(sim_host.ports.items()):
                if isinstance(holder, SimTunnel):
                    found.append(f"{name}: port {port} still listening for tunnel {holder!r}")
            for path in self.temp_dirs(name):
                found.append(f"{name}: temporary directory {path} still exists")
        return found

    def assert_clean(self) -> None:
        """Raise AssertionError listing every process, tunnel and temp dir the library left."""
        leftovers = self.leftovers()
        if leftovers:
            raise AssertionError(
                f"The simulated network is not clean ({len(leftovers)} leftovers):\n  "
                + "\n  ".join(leftovers)
            )

    def format_trace(self, last: int | None = None) -> str:
        events = self.trace if last is None else self.trace[-last:]
        return "\n".join(str(event) for event in events)

    def describe(self) -> str:
        """Return what is needed to replay this network: seed, hosts and faults."""
        plan = FaultPlan(tuple(self.faults.applied))
        return f"Network(hosts={list(self.hosts)!r}, seed={self.seed!r}, faults={plan!r})"

    def __repr__(self) -> str:
        return f"<Network seed={self.seed} hosts={len(self.hosts)} t={self.clock.monotonic():g}>"
