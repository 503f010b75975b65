"""A frozen host (docker pause): calls on its connection end within their bounds.

A paused container keeps its TCP connections open but its sshd never replies,
so every wait for a reply must have a bound of its own.
"""

from __future__ import annotations

import time
from typing import Any

import pytest

from lazycluster.exceptions import ConnectionLostError
from lazycluster.transport import ssh_exec, ssh_remote_forwards
from lazycluster.transport.ssh import SSHBackend

# Seconds each bound is cut to in these tests.
BOUND = 2.0

# Slack for the container's pause and for a loaded machine.
MARGIN = 8.0


@pytest.fixture
def frozen_bounds(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ssh_remote_forwards, "REPLY_TIMEOUT", BOUND)
    monkeypatch.setattr(ssh_exec, "CHANNEL_OPEN_TIMEOUT", BOUND)


def test_remote_tunnel_close_bounded(make_ssh_hosts: Any, frozen_bounds: None) -> None:
    hosts = make_ssh_hosts(1)
    backend = SSHBackend(ssh_config_path=str(hosts.ssh_config_path), resolve_unknown_hosts=False)
    transport = backend.connect(hosts[0].alias)
    [tunnel] = transport.forward_remote([(40123, 40123)])
    hosts[0].pause()
    try:
        started = time.monotonic()
        tunnel.close()
        elapsed = time.monotonic() - started
    finally:
        hosts[0].unpause()
        transport.close()

    assert not tunnel.is_open
    assert elapsed < BOUND + MARGIN, elapsed


def test_command_on_frozen_host_raises_connection_lost(
    make_ssh_hosts: Any, frozen_bounds: None
) -> None:
    hosts = make_ssh_hosts(1)
    backend = SSHBackend(ssh_config_path=str(hosts.ssh_config_path), resolve_unknown_hosts=False)
    transport = backend.connect(hosts[0].alias)
    assert transport.run(["true"]).ok
    hosts[0].pause()
    try:
        started = time.monotonic()
        with pytest.raises(ConnectionLostError, match=hosts[0].alias):
            transport.run(["true"])
        elapsed = time.monotonic() - started
    finally:
        hosts[0].unpause()

    assert elapsed < BOUND + MARGIN, elapsed

    # The closed connection is replaced on the next call once the host responds again.
    assert transport.run(["true"]).ok
    transport.close()
