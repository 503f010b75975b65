"""Deterministic simulator of hosts for lazycluster, for its own tests and downstream ones.

    import sim
    from lazycluster.transport import use_backend

    network = sim.Network(3, seed=7)          # the manager plus hosts h1, h2, h3
    with use_backend(network):
        ...                                    # Runtime, RuntimeGroup, DaskCluster as usual
    network.assert_clean()

See docs/simulator.md for the guide. The names below load on first use, so
that importing the pytest plugin (`sim.pytest_plugin`) stays cheap and never
fails because of the rest of the package.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "Call": "sim.commands",
    "DaskScheduler": "sim.programs",
    "DaskWorker": "sim.programs",
    "Fault": "sim.faults",
    "FaultPlan": "sim.faults",
    "ForeignHolder": "sim.host",
    "Network": "sim.network",
    "Program": "sim.process",
    "SimHost": "sim.host",
    "SimProcess": "sim.process",
    "SimProcessHandle": "sim.transport",
    "SimTransport": "sim.transport",
    "SimTunnel": "sim.transport",
    "TraceEvent": "sim.network",
    "VirtualClock": "sim.clock",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from sim.clock import VirtualClock
    from sim.commands import Call
    from sim.faults import Fault, FaultPlan
    from sim.host import ForeignHolder, SimHost
    from sim.network import Network, TraceEvent
    from sim.process import Program, SimProcess
    from sim.programs import DaskScheduler, DaskWorker
    from sim.transport import SimProcessHandle, SimTransport, SimTunnel


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'sim' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
