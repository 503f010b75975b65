"""Stopping processes and closing tunnels in parallel, without letting one failure stop the rest.

Cleanup must go on after an error: a host that cannot be reached must not keep
the processes and tunnels of the other hosts alive. Errors are logged here and
not raised.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Sequence

from lazycluster.clock import Clock
from lazycluster.transport import ProcessHandle, Tunnel

logger = logging.getLogger(__name__)

# Seconds between SIGTERM and SIGKILL. Dask processes close within a second on
# SIGTERM, so a short grace keeps cleanup quick.
STOP_GRACE = 3.0


def stop_processes(handles: Sequence[ProcessHandle], clock: Clock, role: str = "process") -> None:
    """Stop every process that still runs, all in parallel."""

    def stop(handle: ProcessHandle) -> None:
        try:
            if handle.poll() is not None:
                return
            code = handle.stop(grace=STOP_GRACE)
            logger.info(
                "Stopped %s on host %s (pid %d, exit code %s)", role, handle.host, handle.pid, code
            )
        except Exception as error:  # cleanup goes on with the other processes
            logger.warning(
                "Failed to stop %s on host %s (pid %d): %s", role, handle.host, handle.pid, error
            )

    clock.map(stop, list(handles))


def close_tunnels(tunnels: Sequence[Tunnel], clock: Clock) -> None:
    """Close tunnels, the hosts in parallel and the tunnels of one host one after another."""
    by_host: dict[str, list[Tunnel]] = defaultdict(list)
    for tunnel in tunnels:
        by_host[tunnel.host].append(tunnel)

    def close_host(host: str) -> None:
        closed = 0
        for tunnel in by_host[host]:
            try:
                tunnel.close()
                closed += 1
            except Exception as error:  # cleanup goes on with the other tunnels
                logger.warning("Failed to close tunnel %r on host %s: %s", tunnel, host, error)
        logger.info("Closed %d tunnel(s) on host %s", closed, host)

    clock.map(close_host, sorted(by_host))
