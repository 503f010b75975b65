"""CPU seconds of the processes behind a cluster, split by role.

The map figures are bound by CPU on 2 cores, so where that CPU goes explains
a ratio better than the wall time alone. A role is a set of processes: this
process (the Dask client, and for lazycluster the tunnels), the scheduler,
the workers with their process managers, and sshd in the containers. Only
this process's children and the processes in the bench's own containers
count, so other work on the machine stays out.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import psutil

MANAGER = "manager process"
SCHEDULER = "scheduler"
WORKERS = "workers"
SSHD = "sshd"
ROLES = (MANAGER, SCHEDULER, WORKERS, SSHD)


def _container_of(pid: int, container_ids: Iterable[str]) -> str | None:
    """Return the id of the bench container that `pid` runs in, from its cgroup, or None."""
    try:
        cgroups = Path(f"/proc/{pid}/cgroup").read_text()
    except OSError:
        return None
    return next((cid for cid in container_ids if cid in cgroups), None)


def _role(process: psutil.Process, children: set[int], container_ids: list[str]) -> str | None:
    if process.pid == os.getpid():
        return MANAGER
    in_container = _container_of(process.pid, container_ids) is not None
    if process.pid not in children and not in_container:
        return None

    args = " ".join(process.cmdline())
    # lazycluster starts `distributed.cli.dask_scheduler`; SSHCluster starts
    # `distributed.cli.dask_spec` with a Scheduler spec.
    if "dask_scheduler" in args or ("dask_spec" in args and "Scheduler" in args):
        return SCHEDULER
    if in_container and args.startswith("sshd"):
        return SSHD
    if in_container and "python" in args:
        return WORKERS
    return None


def cpu_by_role(container_ids: list[str]) -> Counter[str]:
    """Return the user plus system CPU seconds that each role's processes used so far."""
    children = {child.pid for child in psutil.Process().children(recursive=True)}
    totals: Counter[str] = Counter()
    for process in psutil.process_iter():
        try:
            role = _role(process, children, container_ids)
            if role is None:
                continue
            times = process.cpu_times()
        except psutil.Error:
            continue  # the process ended during the scan
        totals[role] += times.user + times.system
    return totals
