"""Deterministic simulator of hosts for lazycluster, for its own tests and downstream ones.

    import sim
    from lazycluster.transport import use_backend

    network = sim.Network(3, seed=7)          # the manager plus hosts h1, h2, h3
    with use_backend(network):
        ...                                    # Runtime, RuntimeGroup, DaskCluster as usual
    network.assert_clean()

See docs/simulator.md for the guide.
"""

from sim.clock import VirtualClock
from sim.commands import Call
from sim.faults import Fault, FaultPlan
from sim.host import ForeignHolder, SimHost
from sim.network import Network, TraceEvent
from sim.process import Program, SimProcess
from sim.programs import DaskScheduler, DaskWorker
from sim.transport import SimProcessHandle, SimTransport, SimTunnel

__all__ = [
    "Call",
    "DaskScheduler",
    "DaskWorker",
    "Fault",
    "FaultPlan",
    "ForeignHolder",
    "Network",
    "Program",
    "SimHost",
    "SimProcess",
    "SimProcessHandle",
    "SimTransport",
    "SimTunnel",
    "TraceEvent",
    "VirtualClock",
]
