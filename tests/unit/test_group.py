"""RuntimeGroup on named local hosts: construction, broadcast, ports, group tunnels, cleanup."""

from __future__ import annotations

import os
import sys

import cloudpickle
import pytest

from lazycluster import (
    InvalidRuntimeError,
    NoPortsLeftError,
    PortInUseError,
    Runtime,
    RuntimeGroup,
    RuntimeTask,
    TaskExecutionError,
)
from lazycluster.clock import SystemClock
from lazycluster.group import INTERNAL_PORT_RANGE
from lazycluster.runtime import _live_runtimes
from tests.unit.runtime_fixtures import (  # noqa: F401 - pytest fixtures
    HOSTS,
    backend,
    busy_port,
    echo_server,
    echo_through,
    free_ports,
)

cloudpickle.register_pickle_by_value(sys.modules[__name__])


class RecordingClock(SystemClock):
    """The system clock, recording how many items each parallel map call got."""

    def __init__(self) -> None:
        self.map_sizes: list[int] = []

    def map(self, function, items):  # type: ignore[no-untyped-def, override]
        item_list = list(items)
        self.map_sizes.append(len(item_list))
        return super().map(function, item_list)


@pytest.fixture
def group(backend):  # noqa: F811
    with RuntimeGroup(hosts=HOSTS) as group:
        yield group


# --- construction ------------------------------------------------------------------------


def test_needs_runtimes_or_hosts(backend):  # noqa: F811
    with pytest.raises(ValueError, match="exactly one"):
        RuntimeGroup()
    runtime = Runtime("node-1")
    with pytest.raises(ValueError, match="exactly one"):
        RuntimeGroup(runtimes=[runtime], hosts=["node-2"])
    runtime.cleanup()


def test_duplicate_hosts_rejected(backend):  # noqa: F811
    with pytest.raises(ValueError, match="node-1"):
        RuntimeGroup(hosts=["node-1", "node-2", "node-1"])
    assert backend.connected == []


def test_duplicate_runtimes_rejected(backend):  # noqa: F811
    first, second = Runtime("node-1"), Runtime("node-1")
    with pytest.raises(ValueError, match="more than once"):
        RuntimeGroup(runtimes=[first, second])
    first.cleanup()
    second.cleanup()


def test_empty_hosts_rejected(backend):  # noqa: F811
    with pytest.raises(ValueError, match="empty"):
        RuntimeGroup(hosts=[])


def test_runtimes_wrong_type(backend):  # noqa: F811
    with pytest.raises(TypeError, match="Runtime"):
        RuntimeGroup(runtimes=["node-1"])


def test_bad_working_dir_rejected_first(backend):  # noqa: F811
    with pytest.raises(ValueError, match="working_dir"):
        RuntimeGroup(hosts=HOSTS, working_dir="/data/x; reboot")
    assert backend.connected == []


def test_hosts_connected_in_parallel(backend):  # noqa: F811
    backend.clock = RecordingClock()
    with RuntimeGroup(hosts=HOSTS) as group:
        assert group.hosts == HOSTS
    assert len(HOSTS) in backend.clock.map_sizes


def test_failed_host_cleans_up_others(backend):  # noqa: F811
    backend.unreachable.add("node-2")
    with pytest.raises(InvalidRuntimeError, match="node-2"):
        RuntimeGroup(hosts=HOSTS)
    assert all(transport.closed for transport in backend.connected)
    assert not [runtime for runtime in _live_runtimes if runtime.host in HOSTS]


def test_working_dir_given_to_runtimes(backend, tmp_path):  # noqa: F811
    runtimes = [Runtime("node-1"), Runtime("node-2")]
    with RuntimeGroup(runtimes=runtimes, working_dir=str(tmp_path / "shared")) as group:
        assert [runtime.working_dir for runtime in group.runtimes] == [str(tmp_path / "shared")] * 2


# --- membership ---------------------------------------------------------------------------


def test_membership(group):
    assert group.runtime_count == 3
    assert group.contains_runtime("node-2")
    group.remove_runtime("node-2")
    assert not group.contains_runtime("node-2")
    group.add_runtime(host="node-2")
    assert group.hosts == ["node-1", "node-3", "node-2"]
    with pytest.raises(ValueError, match="already"):
        group.add_runtime(host="node-2")
    with pytest.raises(ValueError, match="exactly one"):
        group.add_runtime()


def test_unknown_host(group):
    for call in (
        lambda: group.get_runtime("node-9"),
        lambda: group.remove_runtime("node-9"),
        lambda: group.get_runtimes(include_hosts=["node-9"]),
        lambda: group.execute_task(RuntimeTask().run_command("true"), host="node-9"),
        lambda: group.expose_port_from_runtime_to_group("node-9", 8000),
    ):
        with pytest.raises(ValueError, match="node-9"):
            call()


def test_get_runtimes_filters(group):
    assert list(group.get_runtimes(include_hosts=["node-1", "node-3"])) == ["node-1", "node-3"]
    assert list(group.get_runtimes(exclude_hosts="node-1")) == ["node-2", "node-3"]


def test_get_runtime_least_busy(group):
    busy = group.get_runtime("node-1")
    task = busy.execute_task(RuntimeTask().run_command("sleep 0.5"))
    assert group.get_runtime().host == "node-2"
    task.join()


# --- tasks ---------------------------------------------------------------------------------


def test_broadcast_copies_task(group):
    task = RuntimeTask("everywhere").run_function(lambda: os.environ["MARK"])
    group.add_env_variables({"MARK": "set"})
    tasks = group.execute_task(task, broadcast=True)
    group.join()
    assert len(tasks) == 3
    assert task not in tasks
    assert [copy.host for copy in tasks] == HOSTS
    assert len({id(copy) for copy in tasks}) == 3
    assert list(group.function_returns) == ["set", "set", "set"]
    assert task.execution_log == []


def test_broadcast_sync(group):
    tasks = group.execute_task(RuntimeTask().run_command("echo $WORKING_DIR"), broadcast=True, execute_async=False)
    working_dirs = [runtime.working_dir for runtime in group.runtimes]
    assert [task.execution_log[0].splitlines()[-1] for task in tasks] == working_dirs
    assert len(set(working_dirs)) == 3


def test_broadcast_and_host_rejected(group):
    with pytest.raises(ValueError, match="not both"):
        group.execute_task(RuntimeTask().run_command("true"), host="node-1", broadcast=True)


def test_execute_on_host(group):
    task = group.execute_task(RuntimeTask().run_command("true"), host="node-3", execute_async=False)
    assert task.host == "node-3"


def test_join_raises_after_all(group):
    group.execute_task(RuntimeTask().run_command("exit 2"), host="node-1")
    ok = group.execute_task(RuntimeTask().run_command("sleep 0.3"), host="node-2")
    with pytest.raises(TaskExecutionError):
        group.join()
    assert not ok.is_running


def test_send_file_to_all(group, tmp_path):
    source = tmp_path / "shared.txt"
    source.write_text("x")
    tasks = group.send_file(str(source))
    group.join()
    assert len(tasks) == 3
    for runtime in group.runtimes:
        assert os.path.isfile(os.path.join(runtime.working_dir, "shared.txt"))


def test_set_env_variables(group):
    group.set_env_variables({"ONLY": "1"})
    assert all(runtime.env_variables["ONLY"] == "1" for runtime in group.runtimes)


# --- ports -----------------------------------------------------------------------------------


def test_has_free_port(group, busy_port):  # noqa: F811
    (free,) = free_ports(1)
    assert group.has_free_port(free)
    assert not group.has_free_port(busy_port)
    with pytest.raises(ValueError):
        group.has_free_port(-5)


def test_get_free_port_one_check_per_host(group, backend, busy_port):  # noqa: F811
    free = free_ports(1)[0]
    ports = [busy_port, *range(1, 50), free]
    for transport in backend.connected:
        transport.port_check_calls = 0
    chosen = group.get_free_port(ports)
    assert chosen not in (busy_port,)
    assert [transport.port_check_calls for transport in backend.connected] == [1, 1, 1]


def test_get_free_port_none_left(group, busy_port):  # noqa: F811
    with pytest.raises(NoPortsLeftError):
        group.get_free_port([busy_port])
    with pytest.raises(NoPortsLeftError):
        group.get_free_port([])
    with pytest.raises(ValueError):
        group.get_free_port([70000])


def test_get_free_port_enforced_on_manager(group, backend):  # noqa: F811
    first, second = free_ports(2)
    backend.manager.busy_ports.add(first)
    assert group.get_free_port([first, second]) == first
    assert group.get_free_port([first, second], enforce_check_on_localhost=True) == second


def test_expose_port_to_runtimes(group, echo_server, busy_port):  # noqa: F811
    (free,) = free_ports(1)
    port = group.expose_port_to_runtimes(echo_server.port, [busy_port, free], exclude_hosts=["node-2", "node-3"])
    assert port == free
    assert echo_through(port) == b"ping"
    with pytest.raises(PortInUseError):
        group.expose_port_to_runtimes(echo_server.port, busy_port)


def test_expose_to_group_uses_group_port(group, backend, echo_server):  # noqa: F811
    (group_port,) = free_ports(1)
    port = group.expose_port_from_runtime_to_group("node-1", echo_server.port, group_port)
    assert port == group_port
    source = group.get_runtime("node-1")
    (tunnel,) = [value for value in source.get_processes().values() if value is not None]
    assert tunnel.listen_port == group_port
    assert echo_through(group_port) == b"ping"


def test_expose_to_group_first_free_internal_port(backend, echo_server):  # noqa: F811
    # Two hosts only: every named host is this machine, where one port takes one listener.
    group = RuntimeGroup(hosts=["node-1", "node-2"])
    (group_port,) = free_ports(1)
    backend.manager.busy_ports |= {group_port, INTERNAL_PORT_RANGE[0], INTERNAL_PORT_RANGE[1]}
    expected = INTERNAL_PORT_RANGE[2]
    group.expose_port_from_runtime_to_group("node-1", echo_server.port, group_port)
    source = group.get_runtime("node-1")
    (tunnel,) = [value for value in source.get_processes().values() if value is not None]
    assert tunnel.listen_port == expected
    tunnels = [value for value in group.get_runtime("node-2").get_processes().values() if value]
    assert [(tunnel.listen_port, tunnel.target_port) for tunnel in tunnels] == [(group_port, expected)]
    assert echo_through(group_port) == b"ping"
    group.cleanup()


def test_expose_to_group_port_busy(group, echo_server, busy_port):  # noqa: F811
    with pytest.raises(PortInUseError):
        group.expose_port_from_runtime_to_group("node-1", echo_server.port, busy_port)
    assert all(runtime.get_processes() == {} for runtime in group.runtimes)


# --- cleanup -----------------------------------------------------------------------------------


def test_cleanup_idempotent(backend, echo_server):  # noqa: F811
    group = RuntimeGroup(hosts=HOSTS)
    working_dirs = [runtime.working_dir for runtime in group.runtimes]
    (port,) = free_ports(1)
    group.expose_port_to_runtimes(echo_server.port, port, exclude_hosts=["node-1", "node-2"])
    group.cleanup()
    group.cleanup()
    assert not any(os.path.exists(path) for path in working_dirs)
    assert all(transport.closed for transport in backend.connected)
    assert group.has_free_port(port)
