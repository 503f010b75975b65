"""Interpretation of the commands the library itself runs (lazycluster.host_commands)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sim.network import Network


def install(network: Network) -> None:
    """Register handlers for the library's own snippets on `network`."""
