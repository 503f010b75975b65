"""lazycluster: a Dask cluster on a handful of SSH hosts with one call.

The public classes are imported on first access, so `import lazycluster`
stays cheap and loads neither paramiko nor cloudpickle.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from lazycluster.exceptions import (
    AuthenticationError,
    CommandError,
    CommandTimeoutError,
    ConnectionLostError,
    HostKeyError,
    HostUnreachableError,
    InvalidRuntimeError,
    LazyclusterError,
    NoPortsLeftError,
    NoRuntimesDetectedError,
    PathCreationError,
    PortInUseError,
    TaskExecutionError,
    TransportError,
    VersionMismatchError,
)

if TYPE_CHECKING:
    from lazycluster.cluster.dask_cluster import DaskCluster
    from lazycluster.cluster.runtime_cluster import MasterLauncher, WorkerLauncher
    from lazycluster.environment import Environment
    from lazycluster.group import RuntimeGroup
    from lazycluster.manager import RuntimeManager
    from lazycluster.runtime import Runtime
    from lazycluster.task import RuntimeTask

__version__ = "0.3.0.dev0"

# Public name -> module that defines it, imported on first attribute access.
_LAZY_NAMES = {
    "DaskCluster": "lazycluster.cluster.dask_cluster",
    "Environment": "lazycluster.environment",
    "MasterLauncher": "lazycluster.cluster.runtime_cluster",
    "WorkerLauncher": "lazycluster.cluster.runtime_cluster",
    "Runtime": "lazycluster.runtime",
    "RuntimeGroup": "lazycluster.group",
    "RuntimeManager": "lazycluster.manager",
    "RuntimeTask": "lazycluster.task",
}


def __getattr__(name: str) -> Any:
    module_name = _LAZY_NAMES.get(name)
    if module_name is None:
        raise AttributeError(f"module 'lazycluster' has no attribute {name!r}")
    value = getattr(importlib.import_module(module_name), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY_NAMES))


__all__ = [
    "AuthenticationError",
    "CommandError",
    "CommandTimeoutError",
    "ConnectionLostError",
    "DaskCluster",
    "Environment",
    "HostKeyError",
    "HostUnreachableError",
    "InvalidRuntimeError",
    "LazyclusterError",
    "MasterLauncher",
    "NoPortsLeftError",
    "NoRuntimesDetectedError",
    "PathCreationError",
    "PortInUseError",
    "Runtime",
    "RuntimeGroup",
    "RuntimeManager",
    "RuntimeTask",
    "TaskExecutionError",
    "TransportError",
    "VersionMismatchError",
    "WorkerLauncher",
    "__version__",
]
