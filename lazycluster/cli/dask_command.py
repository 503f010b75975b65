"""`lazycluster dask`: run a Dask cluster on the runtimes until Ctrl-C, SIGTERM or SIGHUP.

Progress goes to stderr. The scheduler address and the dashboard link go to
stdout, one `Scheduler: ...` and one `Dashboard: ...` line, so a script can
wait for them.
"""

from __future__ import annotations

import argparse
import logging
import signal
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from types import FrameType
from typing import Any

from lazycluster.cli.hosts import check_hosts_configured, progress, use_ssh_config
from lazycluster.exceptions import LazyclusterError
from lazycluster.transport import get_backend

logger = logging.getLogger(__name__)

# Seconds between checks that the scheduler still runs while the cluster is up.
WATCH_INTERVAL = 1.0


class SchedulerExitedError(LazyclusterError):
    """The scheduler process ended while the cluster was supposed to be up."""


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


# A terminal sends SIGHUP when it closes, and the cluster should not outlive it.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


@contextmanager
def _handle_stop_signals(handler: Callable[[int, FrameType | None], None]) -> Iterator[None]:
    previous = {signum: signal.signal(signum, handler) for signum in STOP_SIGNALS}
    try:
        yield
    finally:
        for signum, previous_handler in previous.items():
            signal.signal(signum, previous_handler)


def _signals_as_interrupt() -> AbstractContextManager[None]:
    """Make SIGINT, SIGTERM and SIGHUP raise KeyboardInterrupt, so `kill PID` cleans up like Ctrl-C.

    SIGINT is set too because a shell starts background jobs with SIGINT
    ignored, and Python then keeps it ignored.
    """
    return _handle_stop_signals(_raise_interrupt)


@contextmanager
def _interrupts_deferred() -> Iterator[None]:
    """Let cleanup finish: the first stop signal only prints a notice, the second aborts."""
    received: list[int] = []

    def on_signal(signum: int, frame: FrameType | None) -> None:
        received.append(signum)
        if len(received) >= 2:
            raise KeyboardInterrupt(signal.Signals(signum).name)
        progress("Still stopping the cluster. Press Ctrl-C again to abort and leave processes behind.")

    with _handle_stop_signals(on_signal):
        yield


def _create_manager(probe_timeout: float | None) -> Any:
    from lazycluster.manager import DEFAULT_PROBE_TIMEOUT, RuntimeManager

    progress("Connecting to the hosts of the SSH config...")
    manager = RuntimeManager(probe_timeout=probe_timeout or DEFAULT_PROBE_TIMEOUT)
    for host, reason in sorted(manager.inactive_host_reasons.items()):
        progress(f"Host {host} is inactive: {reason}")
    return manager


def _check_hosts_active(manager: Any, hosts: list[str] | None) -> None:
    inactive = [host for host in hosts or [] if host in manager.inactive_host_reasons]
    if inactive:
        raise LazyclusterError(
            f"Host {', '.join(inactive)} given in --hosts is inactive (reason above). Fix it or "
            "leave it out of --hosts."
        )


def _start(cluster: Any, args: argparse.Namespace) -> None:
    if args.timeout is not None:
        cluster.master_start_timeout = args.timeout
        cluster.worker_start_timeout = args.timeout

    progress("Starting the scheduler on this machine...")
    cluster.start_master(master_port=args.port, timeout=cluster.master_start_timeout)
    progress(f"Scheduler listening on port {cluster.master_port}")

    group = cluster.runtime_group
    count = args.workers or group.runtime_count
    progress(f"Starting {count} worker(s) on {group.runtime_count} runtime(s): {', '.join(group.hosts)}...")
    cluster.start_workers(count)
    progress(f"All {count} worker(s) registered with the scheduler")


def _wait_until_stopped(launcher: Any) -> None:
    """Block until a stop signal (Ctrl-C, SIGTERM, SIGHUP) raises KeyboardInterrupt.

    Raises SchedulerExitedError when the scheduler process exits first.
    """
    clock = get_backend().clock
    while True:
        clock.sleep(WATCH_INTERVAL)
        process = launcher.process
        exit_code = process.poll() if process is not None else None
        if exit_code is not None:
            tail = process.read_log(max_lines=5).strip()
            raise SchedulerExitedError(
                f"The scheduler exited with code {exit_code}. Last log lines: {tail or '(empty)'}"
            )


# The shell's exit code for a command ended by SIGINT (128 + 2).
INTERRUPTED_EXIT_CODE = 130


def run_dask(args: argparse.Namespace) -> int:
    """Start the cluster, print its addresses and keep it up until Ctrl-C, SIGTERM or SIGHUP."""
    from lazycluster.cluster.dask_cluster import DaskCluster, LocalMasterLauncher

    path = use_ssh_config(args.ssh_config)
    check_hosts_configured(args.hosts, path)

    manager = None
    cluster = None
    is_up = False
    with _signals_as_interrupt():
        try:
            manager = _create_manager(args.timeout)
            _check_hosts_active(manager, args.hosts)
            group = manager.create_group(include_hosts=args.hosts)
            launcher = LocalMasterLauncher(group)
            cluster = DaskCluster(group, ports=args.ports, master_launcher=launcher)
            _start(cluster, args)
            # Up from here: a stop signal that arrives while the addresses are
            # printed is already the normal end, not an interrupted start.
            is_up = True

            print(f"Scheduler: {cluster.scheduler_address}", flush=True)
            print(f"Dashboard: {cluster.dashboard_link or 'not available (install bokeh)'}", flush=True)
            logger.info("Cluster up on hosts %s at %s", ", ".join(group.hosts), cluster.scheduler_address)
            progress("Cluster is up. Press Ctrl-C to stop it.")
            _wait_until_stopped(launcher)
        except KeyboardInterrupt as interrupt:
            logger.info("Interrupted by %s, stopping the cluster", str(interrupt) or "SIGINT")
            progress("Stopping the cluster...")
        finally:
            with _interrupts_deferred():
                _cleanup(cluster, manager)
    progress("Cluster stopped.")

    # A stop signal is the normal end of a running cluster, but one that came
    # during the start interrupted it, so exit like an interrupted command.
    return 0 if is_up else INTERRUPTED_EXIT_CODE


def _cleanup(cluster: Any, manager: Any) -> None:
    # Both are idempotent. The manager's cleanup closes the SSH connections of
    # every runtime it opened, also those not in the group.
    if cluster is not None:
        cluster.cleanup()
    if manager is not None:
        manager.cleanup()
