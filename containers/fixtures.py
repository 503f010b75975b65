"""pytest fixtures that start SSH hosts in Docker containers.

Loaded from tests/conftest.py with `pytest_plugins`. Docker, testcontainers and
the transport are imported inside the fixtures, so collecting tests needs none
of them.

- `ssh_hosts` (session): 3 hosts shared by every test of the run. A test that
  pauses, stops or kills a host must use `make_ssh_hosts` instead.
- `make_ssh_hosts` (function): `make_ssh_hosts(n, user=...)` starts private
  hosts that are removed when the test ends.
- `ssh_backend` (function): installs `SSHBackend` for the `ssh_hosts` config
  as the active backend and restores the previous one afterwards.

Tests that request one of these fixtures get the `docker` marker.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from containers.hosts import HostGroup

log = logging.getLogger(__name__)

SESSION_HOST_COUNT = 3
DOCKER_FIXTURES = frozenset({"ssh_hosts", "make_ssh_hosts", "ssh_backend"})


# tryfirst: the marker must be in place before pytest's own `-m` deselection runs.
@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test that uses a Docker fixture with `docker`, wherever it lives."""
    for item in items:
        if DOCKER_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.docker)


def _start_group(tmp_path_factory: pytest.TempPathFactory, count: int, **kwargs: Any) -> HostGroup:
    from containers.build import build_image
    from containers.hosts import start_hosts

    image = build_image()
    workdir = tmp_path_factory.mktemp("ssh-hosts")
    return start_hosts(count, image=image, workdir=workdir, **kwargs)


@pytest.fixture(scope="session")
def ssh_hosts(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HostGroup]:
    """Start 3 SSH hosts for the whole session; see `containers.hosts.HostGroup`."""
    group = _start_group(tmp_path_factory, SESSION_HOST_COUNT)
    try:
        yield group
    finally:
        group.close()


@pytest.fixture(autouse=True)
def _undo_session_host_faults(request: pytest.FixtureRequest) -> Iterator[None]:
    """After a test that used `ssh_hosts`, undo faults it left on them, so later tests start clean."""
    yield
    if "ssh_hosts" not in request.fixturenames:
        return
    group = request.getfixturevalue("ssh_hosts")
    for host in group.hosts:
        undone = host.undo_faults()
        if undone:
            log.warning("test %s left %s on host %s; undone", request.node.nodeid, ", ".join(undone), host.alias)


@pytest.fixture
def make_ssh_hosts(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., HostGroup]]:
    """Return a factory of private host groups, all removed when the test ends."""
    groups: list[HostGroup] = []

    def make(count: int = 1, **kwargs: Any) -> HostGroup:
        group = _start_group(tmp_path_factory, count, **kwargs)
        groups.append(group)
        return group

    try:
        yield make
    finally:
        for group in groups:
            group.close()


@pytest.fixture
def ssh_backend(ssh_hosts: HostGroup, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """Install an `SSHBackend` reading the hosts' SSH config, and restore the previous backend after."""
    from lazycluster.transport import set_backend
    from lazycluster.transport.ssh import SSHBackend

    # The environment variable covers code that builds its own default backend.
    monkeypatch.setenv("LAZYCLUSTER_SSH_CONFIG", str(ssh_hosts.ssh_config_path))
    backend = SSHBackend(ssh_config_path=str(ssh_hosts.ssh_config_path))
    previous = set_backend(backend)
    try:
        yield backend
    finally:
        set_backend(previous)
        close = getattr(backend, "close", None)
        if callable(close):
            close()
