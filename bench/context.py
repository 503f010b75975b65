"""Inputs of every measurement module: the Docker hosts, the run's scale and a scratch folder."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass
class Context:
    """The hosts (None for simulator-only runs), a repeat factor and a scratch folder."""

    hosts: Any  # containers.hosts.HostGroup
    quick: bool
    workdir: Path

    def runs(self, full: int, quick: int = 2) -> int:
        """Return how many timed runs a figure gets: `full`, or `quick` with --quick."""
        return quick if self.quick else full

    @property
    def ssh_config(self) -> str:
        return str(self.hosts.ssh_config_path)
