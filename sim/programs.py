"""Models of the Dask scheduler and worker, recognized from the argv that starts them.

They bind their ports after a start delay, write log lines in the format of
`distributed` (2026.8) and register workers only when the worker's host can
reach the scheduler through its ports and tunnels, as real ones would.
"""

from __future__ import annotations

import datetime
import posixpath
from typing import TYPE_CHECKING

from sim.commands import is_python
from sim.process import SIGINT, SIGTERM, Program, SimProcess

if TYPE_CHECKING:
    from sim.network import Network

SCHEDULER_MODULES = {"distributed.cli.dask_scheduler"}
WORKER_MODULES = {"distributed.cli.dask_worker"}

# How often an unregistered worker tries to reach its scheduler again (virtual seconds).
CONNECT_RETRY_INTERVAL = 0.5

# Flags that take a value; any other flag is taken as a switch unless written --flag=value.
VALUE_FLAGS = {
    "--host", "--port", "--dashboard-address", "--listen-address", "--contact-address",
    "--nthreads", "--name", "--death-timeout", "--worker-port", "--nanny-port", "--nworkers",
    "--memory-limit", "--local-directory", "--scheduler-file", "--protocol", "--interface",
    "--resources", "--preload", "--pid-file", "--dashboard-prefix", "--scheduler-address",
    "--lifetime", "--lifetime-stagger", "--idle-timeout", "--tls-ca-file", "--tls-cert",
    "--tls-key", "--jupyter", "--preload-nanny",
}


def parse_options(args: list[str]) -> tuple[dict[str, str], list[str]]:
    """Split CLI arguments into {flag: value} (switches get "") and positional arguments."""
    options: dict[str, str] = {}
    positional: list[str] = []
    index = 0
    while index < len(args):
        word = args[index]
        if word.startswith("--") and "=" in word:
            flag, _, value = word.partition("=")
            options[flag] = value
        elif word in VALUE_FLAGS and index + 1 < len(args):
            options[word] = args[index + 1]
            index += 1
        elif word.startswith("-"):
            options[word] = ""
        else:
            positional.append(word)
        index += 1
    return options, positional


def port_of(address: str) -> int | None:
    """Return the port of `tcp://host:port`, `host:port` or `:port`, or None without one."""
    tail = address.rsplit(":", 1)
    if len(tail) != 2 or not tail[1].isdigit():
        return None
    return int(tail[1])


def dask_module(argv: list[str]) -> tuple[str, list[str]] | None:
    """Return ("scheduler" or "worker", remaining arguments) for a Dask start command."""
    if len(argv) >= 3 and is_python(argv[0]) and argv[1] == "-m":
        if argv[2] in SCHEDULER_MODULES:
            return "scheduler", argv[3:]
        if argv[2] in WORKER_MODULES:
            return "worker", argv[3:]
    name = posixpath.basename(argv[0]) if argv else ""
    if name == "dask" and len(argv) >= 2 and argv[1] in ("scheduler", "worker"):
        return argv[1], argv[2:]
    if name in ("dask-scheduler", "dask-worker"):
        return name.split("-")[1], argv[1:]
    return None


def match_dask(network: Network, argv: list[str]) -> Program | None:
    """Build the program model for a Dask scheduler or worker argv, else None."""
    found = dask_module(argv)
    if found is None:
        return None
    role, args = found
    options, positional = parse_options(args)
    if role == "scheduler":
        return DaskScheduler.from_options(options)
    return DaskWorker.from_options(network, options, positional)


def log_line(process: SimProcess, logger_name: str, message: str, level: str = "INFO") -> None:
    """Write one line in distributed's default log format, timestamped with virtual time."""
    moment = datetime.datetime.fromtimestamp(process.network.clock.time(), datetime.timezone.utc)
    stamp = moment.strftime("%Y-%m-%d %H:%M:%S,") + f"{moment.microsecond // 1000:03d}"
    process.log(f"{stamp} - {logger_name} - {level} - {message}")


def address_in_use(process: SimProcess, role: str, port: int) -> None:
    """Log the failure of a bind to a taken port and exit with 1, like the real CLI."""
    process.log("Traceback (most recent call last):")
    process.log(f"OSError: [Errno 98] Address already in use: ('127.0.0.1', {port})")
    process.log(f"RuntimeError: {role} failed to start.")
    process.exit(1, f"port {port} in use")


class DaskProgram(Program):
    """Start delay, crash faults and SIGTERM handling shared by scheduler and worker."""

    logger_name = "distributed"

    def start(self, process: SimProcess) -> None:
        network = process.network
        delay = network.start_delay(process.host.name, self.name)
        crash = network.faults.take_crash(process.host.name, self.name)
        if crash is not None:
            process.after(crash.after, lambda: self.crash(process, crash.exit_code))
        process.after(delay, lambda: self.ready(process))

    def crash(self, process: SimProcess, exit_code: int) -> None:
        log_line(process, self.logger_name, "Simulated crash (fault)", "ERROR")
        process.exit(exit_code, "crash fault")

    def ready(self, process: SimProcess) -> None:
        """Bind ports and begin serving once the start delay has passed."""

    def on_signal(self, process: SimProcess, signum: int) -> None:
        """Close at once: the real CLI handles SIGTERM (and SIGINT) and exits with 0."""
        if signum not in (SIGTERM, SIGINT):
            process.exit(128 + signum, f"signal {signum}")
            return
        name = "SIGTERM" if signum == SIGTERM else "SIGINT"
        log_line(process, "distributed._signals", f"Received signal {name} ({signum})")
        self.close(process, f"signal-{signum}")
        process.exit(0, f"signal {signum}")

    def close(self, process: SimProcess, reason: str) -> None:
        """Write the log lines of a graceful close."""


class DaskScheduler(DaskProgram):
    """`python -m distributed.cli.dask_scheduler --host H --port P ...`"""

    name = "scheduler"
    logger_name = "distributed.scheduler"

    def __init__(self, port: int, dashboard_port: int) -> None:
        self.port = port
        # The HTTP server (dashboard, /health) listens even with --no-dashboard; 0 picks a free port.
        self.dashboard_port = dashboard_port
        self.serving = False
        self.workers: dict[str, DaskWorker] = {}
        self.worker_names: set[str] = set()

    @classmethod
    def from_options(cls, options: dict[str, str]) -> DaskScheduler:
        port = int(options.get("--port", "8786"))
        dashboard = port_of(options.get("--dashboard-address", ":8787"))
        return cls(port, 8787 if dashboard is None else dashboard)

    @property
    def address(self) -> str:
        return f"tcp://127.0.0.1:{self.port}"

    def start(self, process: SimProcess) -> None:
        log_line(process, self.logger_name, "-----------------------------------------------")
        super().start(process)

    def ready(self, process: SimProcess) -> None:
        if not process.bind(self.port):
            address_in_use(process, "Scheduler", self.port)
            return
        dashboard = self.bind_dashboard(process)
        log_line(process, self.logger_name, "State start")
        log_line(process, self.logger_name, "-----------------------------------------------")
        log_line(process, self.logger_name, f"  Scheduler at: {self.address:>25}")
        log_line(process, self.logger_name, f"  dashboard at:  http://127.0.0.1:{dashboard}/status")
        log_line(process, self.logger_name, "Registering Worker plugin shuffle")
        self.serving = True
        process.network.record(process.host.name, "scheduler.ready", self.address)

    def bind_dashboard(self, process: SimProcess) -> int:
        """Bind the HTTP server's port; a taken one is replaced by a free port with a warning."""
        requested = self.dashboard_port
        if requested and process.bind(requested):
            return requested
        port = process.network.free_ephemeral_port(process.host)
        process.bind(port)
        if requested:
            process.log(f"UserWarning: Port {requested} is already in use.")
            process.log("Perhaps you already have a cluster running?")
            process.log(f"Hosting the HTTP server on port {port} instead")
        return port

    def close(self, process: SimProcess, reason: str) -> None:
        log_line(process, self.logger_name, f"Closing scheduler. Reason: {reason}")
        log_line(process, self.logger_name, "Scheduler closing all comms")
        log_line(process, self.logger_name, f"Stopped scheduler at {self.address!r}")
        log_line(process, self.logger_name, "End scheduler")

    def register(self, process: SimProcess, worker: DaskWorker) -> bool:
        """Accept a worker; a name taken by another worker is rejected like in distributed."""
        if worker.worker_name in self.worker_names:
            return False
        self.workers[worker.address] = worker
        self.worker_names.add(worker.worker_name)
        log_line(process, self.logger_name, f"Register worker addr: {worker.address} name: {worker.worker_name}")
        log_line(process, self.logger_name, f"Starting worker compute stream, {worker.address}")
        process.network.record(process.host.name, "scheduler.register", f"{worker.address} name={worker.worker_name}")
        return True

    def unregister(self, process: SimProcess, worker: DaskWorker) -> None:
        if self.workers.pop(worker.address, None) is None:
            return
        self.worker_names.discard(worker.worker_name)
        if not process.alive:
            return
        stimulus = f"handle-worker-cleanup-{process.network.clock.time():.7f}"
        log_line(
            process,
            self.logger_name,
            f"Remove worker addr: {worker.address} name: {worker.worker_name} (stimulus_id={stimulus!r})",
        )

    def on_exit(self, process: SimProcess) -> None:
        self.serving = False
        workers, self.workers = list(self.workers.values()), {}
        self.worker_names.clear()
        for worker in workers:
            worker.lose_scheduler()


class DaskWorker(DaskProgram):
    """`python -m distributed.cli.dask_worker tcp://127.0.0.1:P --listen-address ... --name N ...`"""

    name = "worker"
    logger_name = "distributed.worker"

    def __init__(
        self,
        scheduler_port: int,
        listen_port: int,
        contact_port: int,
        worker_name: str,
        nthreads: int,
        death_timeout: float | None,
    ) -> None:
        self.scheduler_port = scheduler_port
        self.listen_port = listen_port
        self.contact_port = contact_port
        self.worker_name = worker_name
        self.nthreads = nthreads
        self.death_timeout = death_timeout
        self.process: SimProcess | None = None
        self.scheduler: SimProcess | None = None
        self.waiting_since = 0.0

    @classmethod
    def from_options(cls, network: Network, options: dict[str, str], positional: list[str]) -> DaskWorker:
        scheduler = options.get("--scheduler-address") or (positional[0] if positional else "")
        scheduler_port = port_of(scheduler)
        if scheduler_port is None:
            raise NotImplementedError(
                f"the simulator does not (yet) support a Dask worker without a scheduler "
                f"address with a port (got {scheduler!r})"
            )
        listen = port_of(options.get("--listen-address", "")) or _int(options.get("--worker-port"))
        if listen is None:
            listen = network.random.randrange(30000, 60000)
        contact = port_of(options.get("--contact-address", "")) or listen
        death = options.get("--death-timeout")
        return cls(
            scheduler_port,
            listen,
            contact,
            options.get("--name") or f"tcp://127.0.0.1:{contact}",
            _int(options.get("--nthreads")) or 1,
            float(death) if death else None,
        )

    @property
    def address(self) -> str:
        return f"tcp://127.0.0.1:{self.contact_port}"

    @property
    def scheduler_address(self) -> str:
        return f"tcp://127.0.0.1:{self.scheduler_port}"

    def ready(self, process: SimProcess) -> None:
        self.process = process
        if not process.bind(self.listen_port):
            address_in_use(process, "Worker", self.listen_port)
            return
        # NOTE: the worker's HTTP server is not modeled. A real one listens on a
        # random free port (with --dashboard-address 127.0.0.1:0), which can take
        # a port that the library later picks for another worker.
        log_line(process, self.logger_name, f"      Start worker at: {self.address:>26}")
        log_line(process, self.logger_name, f"         Listening to: {self.address:>26}")
        log_line(process, self.logger_name, f"          Worker name: {self.worker_name:>26}")
        log_line(process, self.logger_name, f"Waiting to connect to: {self.scheduler_address:>26}")
        log_line(process, self.logger_name, "-------------------------------------------------")
        log_line(process, self.logger_name, f"              Threads: {self.nthreads:>26}")
        self.waiting_since = process.network.clock.monotonic()
        self.try_register()

    def try_register(self) -> None:
        """Register if the scheduler is reachable; else retry until the death timeout."""
        process = self.process
        assert process is not None
        network = process.network
        found = network.resolve(process.host.name, self.scheduler_port)
        if found is not None:
            target, route = found
            program = target.program
            if isinstance(program, DaskScheduler) and program.serving:
                self.attach(process, target, program, route)
                return

        waited = network.clock.monotonic() - self.waiting_since
        if self.death_timeout is not None and waited >= self.death_timeout:
            log_line(
                process,
                "distributed.core",
                f"Timed out trying to connect to {self.scheduler_address} after {self.death_timeout:g} s",
                "ERROR",
            )
            process.exit(1, "death timeout")
            return
        process.after(CONNECT_RETRY_INTERVAL, self.try_register)

    def attach(self, process: SimProcess, scheduler: SimProcess, program: DaskScheduler, route: list) -> None:
        if not program.register(scheduler, self):
            log_line(process, self.logger_name, f"Unable to register worker: name taken, {self.worker_name}", "ERROR")
            process.exit(1, "worker name taken")
            return
        self.scheduler = scheduler
        log_line(process, self.logger_name, f"        Registered to: {self.scheduler_address:>26}")
        for tunnel in route:
            tunnel.watch_close(lambda _tunnel: self.lose_scheduler())

    def lose_scheduler(self) -> None:
        """React to a closed route or a gone scheduler: reconnect until the death timeout."""
        process = self.process
        if process is None or not process.alive or self.scheduler is None:
            return
        scheduler, self.scheduler = self.scheduler, None
        program = scheduler.program
        if isinstance(program, DaskScheduler):
            program.unregister(scheduler, self)
        log_line(process, self.logger_name, "Connection to scheduler broken. Reconnecting...")
        self.waiting_since = process.network.clock.monotonic()
        process.after(CONNECT_RETRY_INTERVAL, self.try_register)

    def close(self, process: SimProcess, reason: str) -> None:
        log_line(process, self.logger_name, f"Stopping worker at {self.address}. Reason: {reason}")
        log_line(process, "distributed.dask_worker", "End worker")

    def on_exit(self, process: SimProcess) -> None:
        scheduler, self.scheduler = self.scheduler, None
        if scheduler is not None and isinstance(scheduler.program, DaskScheduler):
            scheduler.program.unregister(scheduler, self)


def _int(value: str | None) -> int | None:
    return int(value) if value and value.isdigit() else None
