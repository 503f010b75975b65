"""Runtime, RuntimeGroup and RuntimeManager against the simulator.

The same behaviours as the local-host tests, on simulated hosts with a
virtual clock: runs are deterministic and the simulator checks that nothing
of the library is left on any host.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator

import cloudpickle
import pytest

import sim
from lazycluster import (
    InvalidRuntimeError,
    NoPortsLeftError,
    NoRuntimesDetectedError,
    PortInUseError,
    Runtime,
    RuntimeGroup,
    RuntimeManager,
    RuntimeTask,
    TaskExecutionError,
)
from lazycluster.environment import Environment
from lazycluster.group import INTERNAL_PORT_RANGE
from lazycluster.transport import use_backend

cloudpickle.register_pickle_by_value(sys.modules[__name__])


@pytest.fixture
def network(tmp_path, monkeypatch) -> Iterator[sim.Network]:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(Environment, "main_directory", str(tmp_path / "main"))
    simulated = sim.Network(3, seed=11)
    with use_backend(simulated):
        yield simulated


def triple(value: int) -> int:
    return value * 3


def test_command_and_function(network):
    with Runtime("h1") as runtime:
        task = RuntimeTask().run_command("echo $WORKING_DIR").run_function(triple, value=5)
        runtime.execute_task(task, execute_async=False)
        assert task.execution_log[0].splitlines()[-1] == runtime.working_dir
        assert list(task.function_returns) == [15]
    network.assert_clean()


def test_async_function(network):
    with Runtime("h2") as runtime:
        task = runtime.execute_task(RuntimeTask().run_function(triple, value=2))
        runtime.join()
        assert list(task.function_returns) == [6]
    network.assert_clean()


def test_function_raising(network):
    def fail() -> None:
        raise RuntimeError("broken on purpose")

    with Runtime("h1") as runtime:
        with pytest.raises(TaskExecutionError, match="broken on purpose"):
            runtime.execute_task(RuntimeTask().run_function(fail), execute_async=False)
    network.assert_clean()


def test_unreachable_host(network):
    network.faults.unreachable("h1")
    with pytest.raises(InvalidRuntimeError, match="h1"):
        Runtime("h1")
    network.assert_clean()


def test_temp_dir_removed(network):
    runtime = Runtime("h3")
    working_dir = runtime.working_dir
    assert working_dir in network.temp_dirs("h3")
    runtime.cleanup()
    assert working_dir not in network.temp_dirs("h3")
    network.assert_clean()


def test_ports(network):
    network.hold_port("h1", 8000)
    with Runtime("h1") as runtime:
        assert not runtime.has_free_port(8000)
        assert runtime.get_free_port([8000, 8001]) == 8001
        with pytest.raises(NoPortsLeftError):
            runtime.get_free_port([8000])
        with pytest.raises(PortInUseError):
            runtime.expose_port_to_runtime(9000, 8000)
        key = runtime.expose_port_to_runtime(9000, 8001)
        assert runtime.get_process(key).is_open
    network.release_port("h1", 8000)
    network.assert_clean()


def test_group_broadcast(network):
    with RuntimeGroup(hosts=["h1", "h2", "h3"]) as group:
        tasks = group.execute_task(RuntimeTask().run_function(lambda: os.environ["WORKING_DIR"]), broadcast=True)
        group.join()
        assert list(group.function_returns) == [runtime.working_dir for runtime in group.runtimes]
        assert [task.host for task in tasks] == ["h1", "h2", "h3"]
    network.assert_clean()


def test_group_port_first_free(network):
    network.hold_port("h2", 8000)
    with RuntimeGroup(hosts=["h1", "h2", "h3"]) as group:
        assert group.get_free_port([8000, 8001]) == 8001
        assert not group.has_free_port(8000)
        assert group.has_free_port(8000, exclude_hosts=["h2"])
    network.release_port("h2", 8000)
    network.assert_clean()


def test_group_tunnel_internal_port(network):
    network.hold_port("localhost", 8001)
    network.hold_port("localhost", INTERNAL_PORT_RANGE[0])
    with RuntimeGroup(hosts=["h1", "h2", "h3"]) as group:
        assert group.expose_port_from_runtime_to_group("h1", 8000, 8001) == 8001
        (tunnel,) = [value for value in group.get_runtime("h1").get_processes().values() if value]
        assert tunnel.listen_port == INTERNAL_PORT_RANGE[1]
        for host in ("h2", "h3"):
            (remote,) = [value for value in group.get_runtime(host).get_processes().values() if value]
            assert (remote.listen_port, remote.target_port) == (8001, INTERNAL_PORT_RANGE[1])
    network.release_port("localhost", 8001)
    network.release_port("localhost", INTERNAL_PORT_RANGE[0])
    network.assert_clean()


def test_manager_inactive_host(network):
    network.faults.unreachable("h2")
    manager = RuntimeManager()
    assert manager.hosts == ["h1", "h3"]
    assert manager.inactive_hosts == ["h2"]
    assert "unreachable" in manager.inactive_host_reasons["h2"]
    group = manager.create_group(min_cpu_cores=1)
    assert group.hosts == ["h1", "h3"]
    with pytest.raises(NoRuntimesDetectedError):
        manager.create_group(gpu_required=True)
    manager.cleanup()
    network.assert_clean()


def test_manager_gpu_filter(tmp_path, monkeypatch):
    monkeypatch.setattr(Environment, "main_directory", str(tmp_path / "main"))
    network = sim.Network({"cpu1": {}, "gpu1": {"gpus": ["A100, 40960 MiB"]}}, seed=3)
    with use_backend(network):
        manager = RuntimeManager()
        group = manager.create_group(gpu_required=True)
        assert group.hosts == ["gpu1"]
        assert group.get_runtime("gpu1").gpu_count == 1
        manager.cleanup()
    network.assert_clean()
