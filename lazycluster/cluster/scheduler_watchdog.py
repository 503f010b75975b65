"""Dask scheduler preload that closes the scheduler once the manager process is gone.

The scheduler runs in its own session, so it outlives a manager that is killed
outright. Loaded with `--preload <this file>`, it checks every
CHECK_INTERVAL_MS whether its parent process changed, which happens when the
manager died and the scheduler was handed to init. It then closes the
scheduler, the scheduler CLI exits, and the workers lose their scheduler and
exit by themselves.

distributed runs this file inside the scheduler process and calls
`dask_setup(scheduler)` there. The scheduler argv runs the scheduler CLI
directly (no shell in between), so the parent is the manager itself.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from tornado.ioloop import PeriodicCallback

logger = logging.getLogger(__name__)

CHECK_INTERVAL_MS = 1000


def dask_setup(scheduler: Any) -> None:
    """Start the periodic check of the parent process in the scheduler's event loop."""
    manager_pid = os.getppid()

    def close_when_orphaned() -> None:
        if os.getppid() == manager_pid:
            return
        logger.warning(
            "Manager process %d exited; closing the scheduler at %s", manager_pid, scheduler.address
        )
        watch.stop()
        scheduler.loop.add_callback(scheduler.close, reason="lazycluster manager exited")

    watch = PeriodicCallback(close_when_orphaned, CHECK_INTERVAL_MS)
    watch.start()
