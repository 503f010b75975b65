"""Clusters on a RuntimeGroup: the generic master/worker machinery and the Dask cluster.

Importing this package does not import `distributed`; `DaskCluster` imports it
when a client is requested.
"""

from lazycluster.cluster.dask_cluster import DaskCluster, LocalMasterLauncher, RoundRobinLauncher
from lazycluster.cluster.exceptions import MasterStartError, WorkerFailure, WorkerStartError
from lazycluster.cluster.runtime_cluster import (
    MasterLauncher,
    MasterWorkerCluster,
    RuntimeCluster,
    WorkerLauncher,
    WorkerProcess,
)

__all__ = [
    "DaskCluster",
    "LocalMasterLauncher",
    "MasterLauncher",
    "MasterStartError",
    "MasterWorkerCluster",
    "RoundRobinLauncher",
    "RuntimeCluster",
    "WorkerFailure",
    "WorkerLauncher",
    "WorkerProcess",
    "WorkerStartError",
]
