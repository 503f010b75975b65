"""The transport seam and the active backend.

`get_backend()` returns the backend that makes transports for every host the
library touches. By default it is `SSHBackend` (paramiko and the user's SSH
config); a simulator installs its own with `set_backend` or `use_backend`.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

from lazycluster.transport.base import (
    DEFAULT_STOP_GRACE,
    Backend,
    Command,
    CommandResult,
    ProcessHandle,
    Transport,
    Tunnel,
    command_to_shell,
    validate_port,
)

__all__ = [
    "DEFAULT_STOP_GRACE",
    "Backend",
    "Command",
    "CommandResult",
    "ProcessHandle",
    "Transport",
    "Tunnel",
    "command_to_shell",
    "get_backend",
    "set_backend",
    "use_backend",
    "validate_port",
]

_lock = threading.Lock()
_backend: Backend | None = None


def get_backend() -> Backend:
    """Return the active backend, creating the default SSH backend on first use."""
    global _backend
    with _lock:
        if _backend is None:
            from lazycluster.transport.ssh import SSHBackend

            _backend = SSHBackend()
        return _backend


def set_backend(backend: Backend | None) -> Backend | None:
    """Make `backend` the active one (None restores the default) and return the previous one."""
    global _backend
    with _lock:
        previous, _backend = _backend, backend
        return previous


@contextmanager
def use_backend(backend: Backend) -> Iterator[Backend]:
    """Make `backend` the active one inside a with-block."""
    previous = set_backend(backend)
    try:
        yield backend
    finally:
        set_backend(previous)
