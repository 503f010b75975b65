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

After every test, faults set on the session hosts through their fault methods
are undone. After a failed test, leftover processes and temp paths on them are
removed too, so that one failure does not fail every later test that checks
for a clean host. Both log a warning naming the test.

Tests that request one of these fixtures get the `docker` marker.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Generator, Iterator
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from containers.hosts import HostGroup

log = logging.getLogger(__name__)

SESSION_HOST_COUNT = 3
DOCKER_FIXTURES = frozenset({"ssh_hosts", "make_ssh_hosts", "ssh_backend"})

_TEST_FAILED = pytest.StashKey[bool]()
# The running session group, also when a test reached it through
# request.getfixturevalue and so does not list it in its fixture names.
_session_groups: list[HostGroup] = []


# tryfirst: the marker must be in place before pytest's own `-m` deselection runs.
@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test that uses a Docker fixture with `docker`, wherever it lives."""
    for item in items:
        if DOCKER_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.docker)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, Any, Any]:
    report = yield
    if report.failed:
        item.stash[_TEST_FAILED] = True
    return report


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
    _session_groups.append(group)
    try:
        yield group
    finally:
        _session_groups.remove(group)
        group.close()


@pytest.fixture(autouse=True)
def _reset_session_hosts(request: pytest.FixtureRequest) -> Iterator[None]:
    """After each test, undo its faults on the session hosts, and after a failure remove its leftovers."""
    yield
    if not _session_groups:
        return
    import docker

    failed = request.node.stash.get(_TEST_FAILED, False)
    for group in _session_groups:
        for host in group.hosts:
            try:
                _reset_host(host, request.node.nodeid, failed)
            except (docker.errors.DockerException, RuntimeError, OSError) as error:
                log.warning("could not reset host %s after test %s: %s", host.alias, request.node.nodeid, error)


def _reset_host(host: Any, test_id: str, failed: bool) -> None:
    undone = host.undo_faults()
    if undone:
        log.warning("test %s left %s on host %s; undone", test_id, ", ".join(undone), host.alias)
    if failed:
        removed = host.remove_leftovers()
        if not removed.is_clean:
            log.warning("failed test %s left on %s; removed:\n%s", test_id, host.alias, removed)


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
