"""A block of manager ports that no other run of these tests on this machine uses.

Several test runs may share one manager (for example a developer's run and a
CI run of the same checkout). Each run listens on the first port of a block
for as long as it lives, and every other run skips a block whose first port
is taken. The ports after the first one are the run's ports.
"""

from __future__ import annotations

import errno
import socket

# Blocks start below the ports of tests/integration (29400-29540) and below
# Linux's ephemeral range (32768), so no client socket takes one by chance.
FIRST_BLOCK_START = 20000
LAST_BLOCK_START = 29000
BLOCK_SIZE = 64

# The listener that marks this run's block; kept open until the process exits.
_reservation: socket.socket | None = None


def _is_free(port: int) -> bool:
    probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    with probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError as error:
            if error.errno == errno.EADDRINUSE:
                return False
            raise
    return True


def reserve_port_block(size: int) -> tuple[int, ...]:
    """Return `size` consecutive free ports on the manager, reserved for this process."""
    global _reservation
    if size >= BLOCK_SIZE:
        raise ValueError(f"Invalid block size {size}: expected fewer than {BLOCK_SIZE} ports.")

    for start in range(FIRST_BLOCK_START, LAST_BLOCK_START, BLOCK_SIZE):
        marker = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            marker.bind(("127.0.0.1", start))
            marker.listen(1)
        except OSError:
            marker.close()
            continue

        ports = tuple(range(start + 1, start + 1 + size))
        if all(_is_free(port) for port in ports):
            _reservation = marker
            return ports
        marker.close()

    raise RuntimeError(
        f"No block of {size} free ports between {FIRST_BLOCK_START} and {LAST_BLOCK_START} on "
        "127.0.0.1: stop other test runs or widen the range."
    )
