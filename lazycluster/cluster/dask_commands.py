"""The commands that start Dask processes, and how to read their logs.

Every Dask argv the library runs is built here, so the simulator can interpret
exactly these. The processes run the `distributed` CLI modules with
`python -m`, because `distributed` 2026.6.0 removed the `dask-scheduler` and
`dask-worker` scripts. Every server binds 127.0.0.1 only: other machines reach
it through SSH tunnels.
"""

from __future__ import annotations

import os
import re
import sys

from lazycluster.host_commands import PYTHON_EXECUTABLE

# Interpreter that runs workers on a remote host; the manager uses its own.
PYTHON_ON_HOST = PYTHON_EXECUTABLE

LOOPBACK = "127.0.0.1"

# Preload file that closes the scheduler when the manager process is gone.
SCHEDULER_WATCHDOG = os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "scheduler_watchdog.py"
)

# distributed 2026.8 logs this INFO line on the scheduler when a worker joins;
# the address is the worker's contact address.
_REGISTERED_WORKER = re.compile(r"Register worker addr: tcp://127\.0\.0\.1:(\d+)\b")


def tcp_address(port: int) -> str:
    """Return the Dask address of a loopback port."""
    return f"tcp://{LOOPBACK}:{port}"


def scheduler_command(port: int, dashboard_port: int | None) -> list[str]:
    """Build the argv of a scheduler on the manager, with its dashboard or without one."""
    argv = [
        sys.executable,
        "-m",
        "distributed.cli.dask_scheduler",
        "--host",
        LOOPBACK,
        "--port",
        str(port),
        "--preload",
        SCHEDULER_WATCHDOG,
    ]
    # Without a dashboard the scheduler of distributed 2026.8 still serves /health
    # and /metrics, by default on 0.0.0.0:8787, so the address is always given.
    argv += ["--dashboard-address", f"{LOOPBACK}:{dashboard_port or 0}"]
    if dashboard_port is None:
        argv.append("--no-dashboard")
    return argv


def worker_command(
    python: str,
    scheduler_port: int,
    port: int,
    nthreads: int,
    name: str,
    death_timeout: float,
) -> list[str]:
    """Build the argv of one worker that listens on and advertises loopback `port`.

    Without a nanny the worker is a single process, so stopping the handle stops
    the worker. `death_timeout` makes it exit on its own when it cannot reach the
    scheduler, for example after the manager died.
    """
    address = tcp_address(port)
    return [
        python,
        "-m",
        "distributed.cli.dask_worker",
        tcp_address(scheduler_port),
        "--listen-address",
        address,
        "--contact-address",
        address,
        "--no-nanny",
        "--nthreads",
        str(nthreads),
        "--name",
        name,
        "--no-dashboard",
        # distributed 2026.8 serves /health and /metrics even without a dashboard,
        # on all interfaces unless this address sets another one.
        "--dashboard-address",
        f"{LOOPBACK}:0",
        "--death-timeout",
        f"{death_timeout:g}",
    ]


def scheduler_serves(scheduler_log: str, port: int) -> bool:
    """Return whether the scheduler log shows it serving at loopback `port`."""
    return re.search(rf"Scheduler at:\s+tcp://127\.0\.0\.1:{port}\b", scheduler_log) is not None


def dashboard_port_in_log(scheduler_log: str) -> int | None:
    """Return the port of the scheduler's HTTP server from its log, or None before it is logged.

    distributed takes a random port when the requested one is in use, so the
    log, not the request, gives the dashboard port.
    """
    match = re.search(r"dashboard at:\s+http://127\.0\.0\.1:(\d+)/", scheduler_log)
    return int(match.group(1)) if match else None


def bind_failed(process_log: str) -> bool:
    """Return whether a Dask process log shows that its port was taken (EADDRINUSE)."""
    return "Address already in use" in process_log


def registered_worker_ports(scheduler_log: str) -> set[int]:
    """Return the ports of the workers that the scheduler log shows as registered."""
    return {int(port) for port in _REGISTERED_WORKER.findall(scheduler_log)}
