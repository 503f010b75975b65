"""Errors of the cluster layer, below `lazycluster.exceptions.LazyclusterError`.

LazyclusterError
 ├── MasterStartError     the master (Dask scheduler) did not come up
 └── WorkerStartError     one or more workers did not come up
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from lazycluster.exceptions import LazyclusterError

# Lines of a process log quoted in an error message.
LOG_TAIL_LINES = 20


class MasterStartError(LazyclusterError):
    """The master instance did not start on `host` at `port`, for the reason in `cause`."""

    def __init__(
        self,
        host: str,
        port: int | None,
        cause: str | BaseException,
        predecessor_excp: BaseException | None = None,
        log_tail: str = "",
    ) -> None:
        self.host = host
        self.port = port
        self.cause = cause
        self.log_tail = log_tail
        if predecessor_excp is None and isinstance(cause, BaseException):
            predecessor_excp = cause
        msg = (
            f"Failed to start the master on host {host!r} at port {port}: {cause}. "
            "Check that nothing else takes the port and that the timeout covers the start."
        )
        if log_tail:
            msg += f" Last log lines:\n{log_tail}"
        super().__init__(msg, predecessor_excp)


@dataclass(frozen=True)
class WorkerFailure:
    """Why one worker did not come up: where it ran, what went wrong and its last log lines."""

    host: str
    port: int
    name: str
    reason: str
    log_tail: str


class WorkerStartError(LazyclusterError):
    """Workers did not register with the scheduler; `failures` names each one."""

    def __init__(
        self, failures: Iterable[WorkerFailure], predecessor_excp: BaseException | None = None
    ) -> None:
        self.failures = list(failures)
        self.hosts = sorted({failure.host for failure in self.failures})
        self.ports = [failure.port for failure in self.failures]

        parts = [f"{len(self.failures)} worker(s) failed to start:"]
        for failure in self.failures:
            parts.append(
                f"- {failure.name} on host {failure.host!r} at port {failure.port}: "
                f"{failure.reason}. Last log lines:\n{failure.log_tail or '(log is empty)'}"
            )
        parts.append(
            "Check that `python3 -m distributed.cli.dask_worker --version` works on these "
            "hosts and that the manager can reach them over SSH."
        )
        super().__init__("\n".join(parts), predecessor_excp)
