"""A simulated process: its pid, log file, held ports and exit code.

What a process does is up to its `Program` (see `sim.programs` for the Dask
models and `sim.commands` for one-shot commands run in the background).
"""

from __future__ import annotations

import posixpath
import signal
from collections.abc import Callable
from typing import TYPE_CHECKING

from sim.clock import ScheduledEvent

if TYPE_CHECKING:
    from sim.host import SimHost
    from sim.network import Network

SIGINT = int(signal.SIGINT)
SIGTERM = int(signal.SIGTERM)
SIGKILL = int(signal.SIGKILL)


class Program:
    """Behaviour of a simulated process. The default one runs until a signal ends it."""

    name = "process"

    def start(self, process: SimProcess) -> None:
        """Begin running; schedule later steps with `process.after`."""

    def on_signal(self, process: SimProcess, signum: int) -> None:
        """React to a signal; the default exits with -signum like a killed subprocess."""
        process.exit(128 + signum, f"signal {signum}")

    def on_exit(self, process: SimProcess) -> None:
        """Undo what the program set up (registrations, watchers)."""


class SimProcess:
    """State of one process on a simulated host."""

    def __init__(
        self,
        network: Network,
        host: SimHost,
        pid: int,
        argv: list[str],
        command: str,
        env: dict[str, str],
        cwd: str,
        log_path: str,
        program: Program,
        started_by_library: bool = True,
    ) -> None:
        self.network = network
        self.host = host
        self.pid = pid
        self.argv = argv
        self.command = command
        self.env = env
        self.cwd = cwd
        self.log_path = log_path
        self.program = program
        self.started_by_library = started_by_library
        self.started_at = network.clock.monotonic()
        self.exit_code: int | None = None
        self.exit_reason = ""
        self.ports: set[int] = set()
        self._events: list[ScheduledEvent] = []
        self._exit_watchers: list[Callable[[SimProcess], None]] = []

    @property
    def alive(self) -> bool:
        return self.exit_code is None

    def launch(self) -> None:
        """Create the log file and hand control to the program."""
        self.host.fs.make_directory(posixpath.dirname(self.log_path), parents=True)
        self.host.fs.write(self.log_path, b"", append=True)
        self.host.processes[self.pid] = self
        self.network.record(self.host.name, "process.start", f"pid={self.pid} {self.program.name}")
        self.program.start(self)

    def after(self, delay: float, step: Callable[[], object]) -> ScheduledEvent:
        """Run `step` after `delay` virtual seconds unless the process has exited by then."""

        def guarded() -> None:
            if self.alive:
                step()

        event = self.network.clock.schedule(delay, guarded)
        self._events.append(event)
        return event

    def log(self, text: str) -> None:
        """Append lines to the process's log file (the file may have been removed meanwhile)."""
        if not text.endswith("\n"):
            text += "\n"
        try:
            self.host.fs.write(self.log_path, text.encode(), append=True)
        except OSError:
            pass  # a removed log directory loses output, as on a real host

    def bind(self, port: int) -> bool:
        """Listen on `port`; return False when it is taken."""
        if not self.host.bind(port, self):
            return False
        self.ports.add(port)
        return True

    def watch_exit(self, watcher: Callable[[SimProcess], None]) -> None:
        self._exit_watchers.append(watcher)

    def signal(self, signum: int) -> None:
        if not self.alive:
            return
        self.network.record(self.host.name, "process.signal", f"pid={self.pid} sig={signum}")
        if signum == SIGKILL:
            self.exit(128 + SIGKILL, "killed")
        else:
            self.program.on_signal(self, signum)

    def exit(self, code: int, reason: str = "") -> None:
        """End the process: free its ports, cancel its pending steps, tell the watchers."""
        if not self.alive:
            return
        self.exit_code = code
        self.exit_reason = reason
        for event in self._events:
            event.cancel()
        for port in self.ports:
            self.host.release(port, self)
        self.ports.clear()
        self.network.record(
            self.host.name, "process.exit", f"pid={self.pid} code={code} {reason}".rstrip()
        )
        self.program.on_exit(self)
        watchers, self._exit_watchers = self._exit_watchers, []
        for watcher in watchers:
            watcher(self)

    def __repr__(self) -> str:
        state = "running" if self.alive else f"exited {self.exit_code}"
        return f"<SimProcess {self.host.name}:{self.pid} {self.program.name} {state}>"
