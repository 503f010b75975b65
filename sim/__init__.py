"""Deterministic simulator of hosts for lazycluster, for its own tests and downstream ones.

    import sim
    from lazycluster.transport import use_backend

    network = sim.Network(3, seed=7)          # the manager plus hosts h1, h2, h3
    with use_backend(network):
        ...                                    # Runtime, RuntimeGroup, DaskCluster as usual
    network.assert_clean()

See docs/simulator.md for the guide. The names below load on first use, so
importing the pytest plugin (`sim.pytest_plugin`) loads neither the rest of
the package nor lazycluster.
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
    "SimProcessHandle": "sim.handles",
    "SimTransport": "sim.transport",
    "SimTunnel": "sim.handles",
    "TraceEvent": "sim.network",
    "VirtualClock": "sim.clock",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from sim.clock import VirtualClock as VirtualClock
    from sim.commands import Call as Call
    from sim.faults import Fault as Fault
    from sim.faults import FaultPlan as FaultPlan
    from sim.host import ForeignHolder as ForeignHolder
    from sim.host import SimHost as SimHost
    from sim.network import Network as Network
    from sim.network import TraceEvent as TraceEvent
    from sim.process import Program as Program
    from sim.process import SimProcess as SimProcess
    from sim.programs import DaskScheduler as DaskScheduler
    from sim.programs import DaskWorker as DaskWorker
    from sim.transport import SimProcessHandle as SimProcessHandle
    from sim.transport import SimTransport as SimTransport
    from sim.transport import SimTunnel as SimTunnel


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'sim' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
