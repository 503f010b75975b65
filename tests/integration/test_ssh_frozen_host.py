"""A frozen host (docker pause): calls on its connection end within their bounds.

A paused container keeps its TCP connections open but its sshd never replies,
so every wait for a reply must have a bound of its own.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
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


def test_running_command_on_frozen_host_ends(make_ssh_hosts: Any, tmp_path: Path) -> None:
    # A command that already runs when its host freezes gets no more output
    # and no EOF; only the unanswered keepalives end its wait.
    interval, count_max = 1, 2
    # The first keepalive after the freeze goes out within one interval and
    # then waits for `count_max` intervals.
    detection = interval + interval * count_max
    hosts = make_ssh_hosts(1)
    config = tmp_path / "config"
    config.write_text(
        hosts.ssh_config_path.read_text()
        + f"\nHost *\n    ServerAliveInterval {interval}\n    ServerAliveCountMax {count_max}\n"
    )
    transport = SSHBackend(ssh_config_path=str(config), resolve_unknown_hosts=False).connect(
        hosts[0].alias
    )
    try:
        # Keepalives that get replies leave a quiet command alone.
        assert transport.run(["sleep", "3"]).ok

        errors: list[BaseException] = []

        def run_quiet_command() -> None:
            try:
                transport.run(["sleep", "120"])
            except BaseException as error:
                errors.append(error)

        waiter = threading.Thread(target=run_quiet_command)
        waiter.start()
        time.sleep(0.5)
        hosts[0].pause()
        try:
            started = time.monotonic()
            waiter.join(detection + MARGIN)
            elapsed = time.monotonic() - started
        finally:
            hosts[0].unpause()

        assert not waiter.is_alive(), "the command still waits on the frozen host"
        assert elapsed < detection + MARGIN, elapsed
        assert len(errors) == 1
        assert isinstance(errors[0], ConnectionLostError), repr(errors[0])
        assert hosts[0].alias in str(errors[0])

        # The next call connects again.
        assert transport.run(["true"]).ok
    finally:
        transport.close()

