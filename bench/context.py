"""Inputs of every measurement module: the Docker hosts, the run's scale and a scratch folder."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# sshd's port inside each container.
CONTAINER_SSH_PORT = 22


def container_address(host: Any) -> str:
    """Return the address of a host's container on its Docker network."""
    host.container.reload()
    networks = host.container.attrs["NetworkSettings"]["Networks"]
    return str(next(iter(networks.values()))["IPAddress"])


@dataclass
class Context:
    """The hosts (None for simulator-only runs), a repeat factor and a scratch folder."""

    hosts: Any  # containers.hosts.HostGroup
    quick: bool
    workdir: Path
    _direct_config: Path | None = field(default=None, repr=False)

    def runs(self, full: int, quick: int = 2) -> int:
        """Return how many timed runs a figure gets: `full`, or `quick` with --quick."""
        return quick if self.quick else full

    @property
    def ssh_config(self) -> str:
        return str(self.hosts.ssh_config_path)

    @property
    def direct_ssh_config(self) -> str:
        """An ssh_config whose aliases reach each container at its own address on port 22.

        The cluster figures use it for both clusters. Through the published
        ports, Docker's userland proxy would copy every byte of our tunnels,
        but not the traffic that SSHCluster sends to the containers directly.
        """
        if self._direct_config is None:
            from containers.ssh_files import HostEntry, config_text, known_hosts_lines

            folder = self.workdir / "direct-ssh"
            folder.mkdir(parents=True, exist_ok=True)
            entries = [
                HostEntry(
                    host.alias,
                    CONTAINER_SSH_PORT,
                    host.user,
                    host.host_keys(),
                    address=container_address(host),
                )
                for host in self.hosts
            ]
            known_hosts = folder / "known_hosts"
            known_hosts.write_text("\n".join(known_hosts_lines(entries)) + "\n")
            config = folder / "ssh_config"
            config.write_text(config_text(entries, self.hosts.key_path, known_hosts))
            self._direct_config = config
        return str(self._direct_config)

    @property
    def direct_known_hosts(self) -> str:
        """The known_hosts file of `direct_ssh_config`."""
        return str(Path(self.direct_ssh_config).with_name("known_hosts"))
