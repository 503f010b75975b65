"""Blocks of manager ports that no other run of the tests on this machine uses.

Several test runs may share one manager, for example a developer's run and a
CI run of the same checkout. A run listens on the port before its block for as
long as its process lives, and every other run skips a block whose marker port
it cannot bind.
"""

from __future__ import annotations

import socket

from lazycluster.transport.local import LocalTransport

# Marker sockets of the blocks this process reserved. They stay open until it exits.
_block_markers: list[socket.socket] = []


def reserve_port_block(size: int, first: int, last: int) -> list[int]:
    """Return `size` consecutive free manager ports between `first` and `last`, reserved for this process."""
    for start in range(first, last - size, size + 1):
        marker = socket.socket()
        try:
            marker.bind(("127.0.0.1", start))
            marker.listen(1)
        except OSError:
            marker.close()
            continue

        block = list(range(start + 1, start + 1 + size))
        if not LocalTransport().ports_in_use(block):
            _block_markers.append(marker)
            return block
        marker.close()

    raise RuntimeError(
        f"No block of {size} free ports from {first} to {last} on 127.0.0.1: "
        "stop other test runs or widen the range."
    )
