"""Clusters on a RuntimeGroup: the generic master/worker machinery and the Dask cluster.

`DaskCluster` lives in `lazycluster.cluster.dask_cluster`; it is not imported
here, so importing this package does not import `distributed`.
"""

from lazycluster.cluster.exceptions import MasterStartError, WorkerFailure, WorkerStartError
from lazycluster.cluster.runtime_cluster import (
    MasterLauncher,
    MasterWorkerCluster,
    RuntimeCluster,
    WorkerLauncher,
    WorkerProcess,
)

__all__ = [
    "MasterLauncher",
    "MasterStartError",
    "MasterWorkerCluster",
    "RuntimeCluster",
    "WorkerFailure",
    "WorkerLauncher",
    "WorkerProcess",
    "WorkerStartError",
]
