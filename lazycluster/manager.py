"""RuntimeManager: every usable host of the SSH config, ready to form groups."""

from __future__ import annotations

import logging
from typing import Any

from lazycluster.exceptions import LazyclusterError, NoRuntimesDetectedError
from lazycluster.group import RuntimeGroup
from lazycluster.runtime import Runtime
from lazycluster.transport import get_backend
from lazycluster.validation import check_host_list, check_working_dir

logger = logging.getLogger(__name__)

# Seconds each host may take to log in and start python3 before it counts as inactive.
DEFAULT_PROBE_TIMEOUT = 20.0


class RuntimeManager:
    """Tries every host of the SSH config (no wildcard patterns) as a Runtime, in parallel.

    Hosts that fail are listed in `inactive_hosts`, with the reason in
    `inactive_host_reasons`. Each host gets the SSH connect timeout of the
    backend (ConnectTimeout of the SSH config, 30 s by default with SSHBackend)
    and then `probe_timeout` seconds for the python3 check.
    """

    def __init__(self, probe_timeout: float = DEFAULT_PROBE_TIMEOUT) -> None:
        backend = get_backend()
        hosts = backend.configured_hosts()
        logger.info("Probing %d hosts from the SSH config: %s", len(hosts), hosts)

        def probe(host: str) -> Runtime | str:
            try:
                return Runtime(host, probe_timeout=probe_timeout)
            except (LazyclusterError, OSError, ValueError) as error:
                logger.info("Host %s is inactive: %s", host, error)
                return str(error)

        outcomes = backend.clock.map(probe, hosts)

        self._runtimes: dict[str, Runtime] = {}
        self.inactive_host_reasons: dict[str, str] = {}
        for host, outcome in zip(hosts, outcomes, strict=True):
            if isinstance(outcome, Runtime):
                self._runtimes[host] = outcome
            else:
                self.inactive_host_reasons[host] = outcome

        if not self._runtimes:
            reasons = "; ".join(f"{host}: {reason}" for host, reason in self.inactive_host_reasons.items())
            # Backends without a config file (the simulator) have no path to name.
            config_path = getattr(backend, "config_path", None)
            config = f"the SSH config {config_path!r}" if config_path else "the SSH config"
            error = NoRuntimesDetectedError(
                f"No usable runtime was found in {config}"
                + (f" ({reasons})" if reasons else ", which names no host or does not exist")
                + ". Add a host with `lazycluster add-runtime NAME USER@HOST` and check that "
                "`ssh NAME` works."
            )
            # `lazycluster list-runtimes` shows these reasons even when no host works.
            error.inactive_host_reasons = dict(self.inactive_host_reasons)  # type: ignore[attr-defined]
            raise error

    @property
    def inactive_hosts(self) -> list[str]:
        """Hosts of the SSH config that could not be used as a Runtime."""
        return list(self.inactive_host_reasons)

    @property
    def hosts(self) -> list[str]:
        """Hosts that work as a Runtime."""
        return list(self._runtimes)

    @property
    def runtimes(self) -> list[Runtime]:
        return list(self._runtimes.values())

    def create_group(
        self,
        include_hosts: str | list[str] | None = None,
        exclude_hosts: str | list[str] | None = None,
        gpu_required: bool = False,
        min_memory: int | None = None,
        min_cpu_cores: int | None = None,
        installed_executables: str | list[str] | None = None,
        filter_commands: str | list[str] | None = None,
        working_dir: str | None = None,
    ) -> RuntimeGroup:
        """Return a group of the active runtimes that pass every filter; `min_memory` is in MB."""
        included = check_host_list(include_hosts, "include_hosts")
        excluded = check_host_list(exclude_hosts, "exclude_hosts")
        if working_dir is not None:
            check_working_dir(working_dir)
        for host in included:
            if host not in self._runtimes:
                reason = self.inactive_host_reasons.get(host, "it is not in the SSH config")
                raise ValueError(f"Invalid include_hosts: host {host!r} is not an active runtime: {reason}")
        for host in excluded:
            if host not in self._runtimes and host not in self.inactive_host_reasons:
                raise ValueError(f"Invalid exclude_hosts: host {host!r} is not in the SSH config.")

        candidates = [
            runtime
            for host, runtime in self._runtimes.items()
            if (not included or host in included) and host not in excluded
        ]
        filters: dict[str, Any] = {
            "gpu_required": gpu_required,
            "min_memory": min_memory,
            "min_cpu_cores": min_cpu_cores,
            "installed_executables": installed_executables,
            "filter_commands": filter_commands,
        }
        passed = get_backend().clock.map(lambda runtime: runtime.check_filter(**filters), candidates)
        selected = [runtime for runtime, ok in zip(candidates, passed, strict=True) if ok]
        if not selected:
            raise NoRuntimesDetectedError(
                f"No runtime of {[runtime.host for runtime in candidates]} passes the filters "
                f"{ {key: value for key, value in filters.items() if value} }. Relax the filters."
            )
        return RuntimeGroup(runtimes=selected, working_dir=working_dir)

    def print_hosts(self) -> None:
        print(f"Active hosts: {', '.join(self.hosts)}")

    def print_inactive_hosts(self) -> None:
        for host, reason in self.inactive_host_reasons.items():
            print(f"Inactive host {host}: {reason}")

    def print_runtime_info(self) -> None:
        for runtime in self._runtimes.values():
            runtime.print_info()

    def cleanup(self) -> None:
        """Clean up every runtime the manager created."""
        get_backend().clock.map(lambda runtime: runtime.cleanup(), self.runtimes)
