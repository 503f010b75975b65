"""RuntimeManager on named local hosts: probing, inactive hosts and group filters."""

from __future__ import annotations

import pytest

from lazycluster import NoRuntimesDetectedError, RuntimeGroup, RuntimeManager
from lazycluster.runtime_mgmt import RuntimeManager as RuntimeManagerFromOldPath
from tests.unit.runtime_fixtures import HOSTS, backend  # noqa: F401 - pytest fixture


@pytest.fixture
def manager(backend):  # noqa: F811
    manager = RuntimeManager()
    yield manager
    manager.cleanup()


def test_old_import_path():
    assert RuntimeManagerFromOldPath is RuntimeManager


def test_all_hosts_active(manager):
    assert manager.hosts == HOSTS
    assert manager.inactive_hosts == []


def test_unreachable_host_inactive(backend):  # noqa: F811
    backend.unreachable.add("node-2")
    manager = RuntimeManager()
    assert manager.hosts == ["node-1", "node-3"]
    assert manager.inactive_hosts == ["node-2"]
    assert "unreachable" in manager.inactive_host_reasons["node-2"]
    manager.cleanup()


def test_no_usable_host(backend):  # noqa: F811
    backend.unreachable.update(HOSTS)
    with pytest.raises(NoRuntimesDetectedError, match="node-1"):
        RuntimeManager()


def test_empty_config(backend):  # noqa: F811
    backend.hosts = []
    with pytest.raises(NoRuntimesDetectedError, match="names no host"):
        RuntimeManager()


def test_missing_ssh_config_named(tmp_path):
    from lazycluster.transport import use_backend
    from lazycluster.transport.ssh import SSHBackend

    missing = tmp_path / "no-such-config"
    with use_backend(SSHBackend(ssh_config_path=str(missing), resolve_unknown_hosts=False)):
        with pytest.raises(NoRuntimesDetectedError) as raised:
            RuntimeManager()

    assert str(missing) in str(raised.value)
    assert "does not exist" in str(raised.value)


def test_create_group_all(manager):
    group = manager.create_group()
    assert isinstance(group, RuntimeGroup)
    assert group.hosts == HOSTS


def test_create_group_include_exclude(manager):
    assert manager.create_group(include_hosts=["node-1", "node-2"]).hosts == ["node-1", "node-2"]
    assert manager.create_group(exclude_hosts="node-1").hosts == ["node-2", "node-3"]


def test_create_group_unknown_hosts(manager):
    with pytest.raises(ValueError, match="node-9"):
        manager.create_group(include_hosts=["node-9"])
    with pytest.raises(ValueError, match="node-9"):
        manager.create_group(exclude_hosts=["node-9"])


def test_create_group_inactive_include(backend):  # noqa: F811
    backend.unreachable.add("node-3")
    manager = RuntimeManager()
    with pytest.raises(ValueError, match="unreachable"):
        manager.create_group(include_hosts="node-3")
    manager.cleanup()


def test_create_group_filters(manager):
    assert manager.create_group(min_cpu_cores=1, installed_executables=["sh"]).runtime_count == 3
    assert manager.create_group(filter_commands='[ "$WORKING_DIR" ] && echo true').runtime_count == 3
    with pytest.raises(NoRuntimesDetectedError, match="min_cpu_cores"):
        manager.create_group(min_cpu_cores=100_000)
    with pytest.raises(NoRuntimesDetectedError):
        manager.create_group(installed_executables="no-such-tool-4711")
    with pytest.raises(NoRuntimesDetectedError):
        manager.create_group(filter_commands="echo false")
    with pytest.raises(NoRuntimesDetectedError):
        manager.create_group(min_memory=10**9)


def test_create_group_host_specific_filter(manager):
    manager.runtimes[1].add_env_variables({"HOST_ROLE": "gpu"})
    group = manager.create_group(filter_commands='[ "$HOST_ROLE" = gpu ] && echo true || echo false')
    assert group.hosts == ["node-2"]
