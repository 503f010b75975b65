"""Ports, tunnels and the process table of a Runtime.

Port checks ask the host once for a whole list (`Transport.ports_in_use`).
Tunnels go through `Transport.forward_local` and `forward_remote`, bound to
127.0.0.1 on the listening side. Every tunnel and task a Runtime starts is
kept under a string key in its process table.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from lazycluster.exceptions import NoPortsLeftError, PortInUseError
from lazycluster.transport import Transport, Tunnel, get_backend, validate_port
from lazycluster.validation import check_ports

if TYPE_CHECKING:
    from lazycluster.task import RuntimeTask

logger = logging.getLogger(__name__)

LOCALHOST = "localhost"

# Host names that mean the manager's own machine.
_MANAGER_NAMES = frozenset({LOCALHOST, "127.0.0.1", "::1"})


def manager_transport() -> Transport:
    """Return the transport of the manager's own machine, shared by the whole process."""
    return get_backend().local()


class RuntimePortsMixin:
    """Port checks, port exposure and the process table; mixed into Runtime."""

    _processes: dict[str, RuntimeTask | Tunnel | None]
    _key_counter: itertools.count[int]

    @property
    def host(self) -> str:
        raise NotImplementedError  # provided by Runtime

    @property
    def transport(self) -> Transport:
        raise NotImplementedError  # provided by Runtime

    def _new_key(self, prefix: str) -> str:
        return f"{prefix}#{next(self._key_counter)}"

    @property
    def is_manager(self) -> bool:
        """Whether this runtime is the manager's own machine."""
        return self.transport.is_local or self.host in _MANAGER_NAMES

    # --- port checks ---------------------------------------------------------------

    def has_free_port(self, port: int) -> bool:
        """Return whether `port` is free on the host."""
        port = validate_port(port)
        return port not in self.transport.ports_in_use([port])

    def get_free_port(self, ports: Iterable[int]) -> int:
        """Return the first port of `ports` that is free on the host, in one round trip."""
        candidates = check_ports(ports)
        if not candidates:
            raise NoPortsLeftError("No port to choose from: pass a non-empty port list.")
        in_use = self.transport.ports_in_use(candidates)
        for port in candidates:
            if port not in in_use:
                return port
        raise NoPortsLeftError(
            f"None of the {len(candidates)} ports from {candidates[0]} to {candidates[-1]} "
            f"is free on host {self.host!r}. Pass other ports or free some of these."
        )

    # --- port exposure -------------------------------------------------------------

    def expose_port_to_runtime(self, local_port: int, runtime_port: int | None = None) -> str:
        """Make the manager's `local_port` reachable on the host at `runtime_port` (SSH remote forwarding).

        `runtime_port` defaults to `local_port`. Returns the process key of the tunnel.
        """
        local_port = validate_port(local_port, "local_port")
        runtime_port = local_port if runtime_port is None else validate_port(runtime_port, "runtime_port")
        return self._expose_to_runtime(local_port, runtime_port, check_port=True)

    def _expose_to_runtime(self, local_port: int, runtime_port: int, check_port: bool) -> str:
        key = self._new_key(f"expose-to-runtime:{local_port}->{runtime_port}")
        if self.is_manager and local_port == runtime_port:
            # Both ends are the same port of the same machine: nothing to forward.
            self._processes[key] = None
            return key

        if check_port and not self.has_free_port(runtime_port):
            raise PortInUseError(runtime_port, runtime=self)
        tunnel = self.transport.forward_remote([(runtime_port, local_port)])[0]
        self._processes[key] = tunnel
        logger.info("Exposed manager port %d to host %s port %d", local_port, self.host, runtime_port)
        return key

    def expose_port_from_runtime(self, runtime_port: int, local_port: int | None = None) -> str:
        """Make the host's `runtime_port` reachable on the manager at `local_port` (SSH local forwarding).

        `local_port` defaults to `runtime_port`. Returns the process key of the tunnel.
        """
        runtime_port = validate_port(runtime_port, "runtime_port")
        local_port = runtime_port if local_port is None else validate_port(local_port, "local_port")
        return self._expose_from_runtime(runtime_port, local_port, check_port=True)

    def _expose_from_runtime(self, runtime_port: int, local_port: int, check_port: bool) -> str:
        key = self._new_key(f"expose-from-runtime:{runtime_port}->{local_port}")
        if self.is_manager and local_port == runtime_port:
            self._processes[key] = None
            return key

        if check_port and local_port in manager_transport().ports_in_use([local_port]):
            raise PortInUseError(local_port, where="the manager")
        tunnel = self.transport.forward_local([(local_port, runtime_port)])[0]
        self._processes[key] = tunnel
        logger.info("Exposed host %s port %d to manager port %d", self.host, runtime_port, local_port)
        return key

    # --- process table ---------------------------------------------------------------

    def get_process(self, key: str) -> Any:
        """Return the tunnel or task stored under `key`; None for a skipped self-forward."""
        self._check_key(key)
        return self._processes[key]

    def get_processes(self, only_alive: bool = False) -> dict[str, Any]:
        """Return the process table: key to Tunnel, RuntimeTask or None (skipped self-forward)."""
        if not only_alive:
            return dict(self._processes)
        return {key: value for key, value in self._processes.items() if _is_alive(value)}

    def stop_process(self, key: str) -> None:
        """Close the tunnel under `key`, or stop the task under it, and forget the key."""
        self._check_key(key)
        value = self._processes.pop(key)
        if isinstance(value, Tunnel):
            value.close()
            logger.info("Closed tunnel %s of host %s", key, self.host)
        elif value is not None:
            value.stop()

    def is_runtime_task_process(self, key: str) -> bool:
        """Return whether `key` belongs to a task."""
        from lazycluster.task import RuntimeTask

        self._check_key(key)
        return isinstance(self._processes[key], RuntimeTask)

    def is_port_exposure_process(self, key: str) -> bool:
        """Return whether `key` belongs to a port exposure (a tunnel or a skipped self-forward)."""
        self._check_key(key)
        return key.startswith("expose-")

    @property
    def alive_process_count(self) -> int:
        return sum(1 for value in self._processes.values() if _is_alive(value))

    @property
    def alive_task_process_count(self) -> int:
        from lazycluster.task import RuntimeTask

        return sum(
            1 for value in self._processes.values() if isinstance(value, RuntimeTask) and value.is_running
        )

    def _check_key(self, key: str) -> None:
        if key not in self._processes:
            raise ValueError(
                f"No process with key {key!r} on runtime {self.host!r}. Known keys: "
                f"{sorted(self._processes)}."
            )


def _is_alive(value: Any) -> bool:
    if isinstance(value, Tunnel):
        return value.is_open
    if value is None:
        return False
    return bool(value.is_running)
