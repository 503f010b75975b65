"""Exceptions raised by lazycluster.

Every error the library raises on purpose derives from `LazyclusterError`.
Where a built-in exception names the same kind of failure, the class inherits
from it too, so `except TimeoutError` or `except ConnectionError` also works::

    LazyclusterError
     ├── TaskExecutionError            a step of a RuntimeTask failed
     ├── InvalidRuntimeError           a host cannot serve as a Runtime
     ├── NoRuntimesDetectedError       the SSH config names no usable host
     ├── PortInUseError                a requested port is taken
     ├── NoPortsLeftError              no port of a list is free
     ├── PathCreationError             a directory could not be created
     ├── VersionMismatchError          a host's package version is incompatible
     ├── CommandError                  a command exited with a non-zero code
     ├── CommandTimeoutError           a command or wait timed out (TimeoutError)
     └── TransportError                the connection to a host failed (ConnectionError)
          ├── HostUnreachableError     TCP connect or SSH handshake failed
          ├── AuthenticationError      no key or agent identity was accepted
          ├── HostKeyError             the host key is unknown or has changed
          └── ConnectionLostError      an open connection dropped

`lazycluster.cluster.exceptions` adds the cluster errors (`MasterStartError`,
`WorkerStartError`) below `LazyclusterError`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lazycluster.transport.base import CommandResult


class LazyclusterError(Exception):
    """Base of all errors raised by lazycluster.

    `predecessor_excp` is the lower-level exception that caused this one; it is
    also set as `__cause__` so tracebacks show both.
    """

    def __init__(self, msg: str, predecessor_excp: BaseException | None = None) -> None:
        super().__init__(msg)
        self.msg = msg
        self.predecessor_excp = predecessor_excp
        if predecessor_excp is not None:
            self.__cause__ = predecessor_excp

    def __str__(self) -> str:
        return self.msg


class TaskExecutionError(LazyclusterError):
    """A step of a `RuntimeTask` failed on a host."""

    def __init__(
        self,
        task_step_index: int,
        task: Any,
        host: str,
        execution_log_file_path: str | None,
        output: str,
        predecessor_excp: BaseException | None = None,
    ) -> None:
        self.task_step_index = task_step_index
        self.task = task
        self.host = host
        self.execution_log_file_path = execution_log_file_path
        self.output = output
        task_name = getattr(task, "name", task)
        tail = "\n".join(output.splitlines()[-20:])
        msg = (
            f"Step {task_step_index} of task {task_name!r} failed on host {host!r}. "
            f"Log file: {execution_log_file_path}. Last output:\n{tail}"
        )
        super().__init__(msg, predecessor_excp)


class InvalidRuntimeError(LazyclusterError):
    """A host cannot be used as a Runtime because SSH fails or no usable python3 is installed."""

    def __init__(
        self, host: str, reason: str = "", predecessor_excp: BaseException | None = None
    ) -> None:
        self.host = host
        self.reason = reason
        detail = f": {reason}" if reason else ""
        msg = (
            f"Host {host!r} is not a valid runtime{detail}. Check that `ssh {host}` "
            "logs in without a password prompt and that python3 is installed there."
        )
        super().__init__(msg, predecessor_excp)


class NoRuntimesDetectedError(LazyclusterError):
    """The SSH config names no host that works as a Runtime."""

    def __init__(
        self, msg: str | None = None, predecessor_excp: BaseException | None = None
    ) -> None:
        super().__init__(
            msg
            or "No usable runtime was found in the SSH config. Add a host with "
            "`lazycluster add-runtime NAME USER@HOST` and check that `ssh NAME` works.",
            predecessor_excp,
        )


class PortInUseError(LazyclusterError):
    """A requested port is already in use on a host, in a group or on the manager."""

    def __init__(
        self,
        port: int,
        group: Any = None,
        runtime: Any = None,
        predecessor_excp: BaseException | None = None,
        where: str | None = None,
    ) -> None:
        self.port = port
        self.group = group
        self.runtime = runtime
        if where is None:
            if runtime is not None:
                where = f"runtime {getattr(runtime, 'host', runtime)!r}"
            elif group is not None:
                where = "the runtime group"
            else:
                where = "the manager"
        # Where the port is in use, for example "host(s) 'h1'".
        self.where = where
        super().__init__(
            f"Port {port} is already in use on {where}. Stop what listens there or "
            "choose another port.",
            predecessor_excp,
        )


class NoPortsLeftError(LazyclusterError):
    """None, or too few, of the candidate ports are free."""

    def __init__(
        self, msg: str | None = None, predecessor_excp: BaseException | None = None
    ) -> None:
        super().__init__(
            msg
            or "No free port is left in the given port list. Pass a longer list "
            "or free some of its ports.",
            predecessor_excp,
        )


class PathCreationError(LazyclusterError):
    """A directory could not be created on a host."""

    def __init__(
        self,
        path: str,
        host: str | None = None,
        predecessor_excp: BaseException | None = None,
        reason: str = "",
    ) -> None:
        self.path = path
        self.host = host
        where = f" on host {host!r}" if host else ""
        detail = f": {reason}" if reason else ""
        super().__init__(
            f"Failed to create directory {path!r}{where}{detail}. Check that the user "
            "may write to its parent.",
            predecessor_excp,
        )


class VersionMismatchError(LazyclusterError):
    """A host has a package version that cannot work with the manager's."""

    def __init__(
        self,
        host: str,
        package: str,
        host_version: str | None,
        manager_version: str,
        other_hosts: Sequence[tuple[str, str | None]] = (),
        login: str | None = None,
    ):
        self.host = host
        self.package = package
        self.host_version = host_version
        self.manager_version = manager_version
        # (host, version) of every further host with a different version.
        self.other_hosts = list(other_hosts)
        others = ""
        if self.other_hosts:
            listed = ", ".join(
                f"{other!r} ({version or 'not installed'})" for other, version in self.other_hosts
            )
            others = f" These hosts differ too: {listed}."
        super().__init__(
            f"Host {host!r} has {_found(host_version)} of {package!r}, but the manager has "
            f"{manager_version}.{others} Install the same version there, for example "
            f"`{login or f'ssh {host}'} python3 -m pip install {package}=={manager_version}`."
        )


def _found(version: str | None) -> str:
    return f"version {version}" if version else "no installed version"


class CommandError(LazyclusterError):
    """A command on a host exited with a non-zero code."""

    def __init__(self, result: CommandResult, hint: str = "") -> None:
        self.result = result
        tail = "\n".join((result.stderr or result.stdout).splitlines()[-10:])
        msg = (
            f"Command {result.command!r} failed on host {result.host!r} with exit code "
            f"{result.exit_code}.{(' ' + hint) if hint else ''}"
        )
        if tail:
            msg += f" Last output:\n{tail}"
        super().__init__(msg)


class CommandTimeoutError(LazyclusterError, TimeoutError):
    """A command, a process or a readiness check did not finish within its timeout."""

    def __init__(
        self, host: str, what: str, timeout: float, predecessor_excp: BaseException | None = None
    ) -> None:
        self.host = host
        self.what = what
        self.timeout = timeout
        super().__init__(
            f"{what} on host {host!r} timed out after {timeout:g} s.", predecessor_excp
        )


class TransportError(LazyclusterError, ConnectionError):
    """The connection to a host failed."""

    def __init__(
        self, host: str, msg: str, predecessor_excp: BaseException | None = None
    ) -> None:
        self.host = host
        super().__init__(msg, predecessor_excp)


class HostUnreachableError(TransportError):
    """The TCP connection or the SSH handshake to a host failed."""


class AuthenticationError(TransportError):
    """The host accepted none of the keys offered."""


class HostKeyError(TransportError):
    """The host key is not in known_hosts, or differs from the one stored there."""


class ConnectionLostError(TransportError):
    """An open connection to a host dropped during an operation."""
