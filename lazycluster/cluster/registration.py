"""Waiting until Dask workers have registered with the scheduler.

The scheduler runs on the manager and logs one line per registered worker, so
each poll reads one local file, however many hosts and workers there are.
While waiting, a worker that exits fails the wait at once instead of at the
timeout.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

from lazycluster.clock import Clock
from lazycluster.cluster.dask_commands import bind_failed, registered_worker_ports
from lazycluster.cluster.exceptions import (
    LOG_TAIL_LINES,
    MasterStartError,
    WorkerFailure,
    WorkerStartError,
)
from lazycluster.cluster.runtime_cluster import WorkerProcess
from lazycluster.transport import ProcessHandle

logger = logging.getLogger(__name__)

# Seconds between checks whether the workers that have not registered yet still run.
LIVENESS_CHECK_INTERVAL = 1.0

# First interval between reads of the scheduler's log, which is a local file.
# The clock lets the interval grow to ten times this, so start() returns at
# most about 50 ms after the last worker registered.
LOG_POLL_INTERVAL = 0.005


def read_tail(process: ProcessHandle) -> str:
    """Return the last lines of a process log, or why they could not be read."""
    try:
        return process.read_log(max_lines=LOG_TAIL_LINES)
    except Exception as error:  # the error message must still name the worker
        return f"(log {process.log_path!r} is unreadable: {error})"


def wait_for_registration(
    scheduler: ProcessHandle,
    scheduler_port: int,
    workers: Sequence[WorkerProcess],
    timeout: float,
    clock: Clock,
    restart: Callable[[list[WorkerProcess]], list[WorkerProcess]] | None = None,
) -> None:
    """Return once every worker has registered; raise WorkerStartError otherwise.

    Workers that exit because their port was taken (EADDRINUSE in their log)
    are passed to `restart`, when given, and the workers it returns are
    awaited in their place within the same timeout. Raises MasterStartError
    when the scheduler exits while waiting.
    """
    pending = {worker.port: worker for worker in workers}
    exited: list[tuple[WorkerProcess, int]] = []
    last_liveness_check = float("-inf")

    def all_registered_or_failed() -> bool:
        nonlocal last_liveness_check
        if scheduler.poll() is not None:
            return True
        for port in registered_worker_ports(scheduler.read_log()):
            pending.pop(port, None)
        if not pending:
            return True

        # Each poll of a remote worker is a round trip, so they are spaced out
        # more than the reads of the local scheduler log.
        now = clock.monotonic()
        if now - last_liveness_check < LIVENESS_CHECK_INTERVAL:
            return False
        last_liveness_check = now
        checked = list(pending.values())
        codes = clock.map(lambda worker: worker.process.poll(), checked)
        stopped = [
            (worker, code) for worker, code in zip(checked, codes, strict=True) if code is not None
        ]
        if restart is not None:
            stopped = restart_taken(stopped)
        exited.extend(stopped)
        return bool(exited)

    def restart_taken(stopped: list[tuple[WorkerProcess, int]]) -> list[tuple[WorkerProcess, int]]:
        """Restart the stopped workers that lost their port; return the other stopped ones."""
        assert restart is not None
        # The whole log, because the EADDRINUSE error comes first in a chained
        # traceback that is longer than the tail.
        logs = clock.map(lambda item: item[0].process.read_log(), stopped)
        taken = [worker for (worker, _), log in zip(stopped, logs, strict=True) if bind_failed(log)]
        if not taken:
            return stopped
        for worker in taken:
            del pending[worker.port]
        for worker in restart(taken):
            pending[worker.port] = worker
        restarted = {id(worker) for worker in taken}
        return [(worker, code) for worker, code in stopped if id(worker) not in restarted]

    clock.wait_until(all_registered_or_failed, timeout, interval=LOG_POLL_INTERVAL)

    code = scheduler.poll()
    if code is not None:
        raise MasterStartError(
            scheduler.host,
            scheduler_port,
            f"the scheduler exited with code {code} while workers registered",
            log_tail=read_tail(scheduler),
        )
    if exited:
        raise WorkerStartError(
            failure_of(worker, f"exited with code {code}") for worker, code in exited
        )
    if pending:
        reason = (
            f"did not register with the scheduler within {timeout:g} s "
            "(worker_start_timeout; raise it for slow hosts)"
        )
        raise WorkerStartError(failure_of(worker, reason) for worker in pending.values())


def failure_of(worker: WorkerProcess, reason: str) -> WorkerFailure:
    """Describe a failed worker with the tail of its log."""
    return WorkerFailure(worker.host, worker.port, worker.name, reason, read_tail(worker.process))
