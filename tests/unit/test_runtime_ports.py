"""Runtime port checks, port exposure and the process table, on named local hosts."""

from __future__ import annotations

import pytest

from lazycluster import NoPortsLeftError, PortInUseError, Runtime, RuntimeTask, TaskExecutionError
from lazycluster.transport.local import LocalTransport
from tests.unit.runtime_fixtures import (  # noqa: F401 - pytest fixtures
    backend,
    busy_port,
    echo_server,
    echo_through,
    free_ports,
)


@pytest.fixture
def runtime(backend):  # noqa: F811
    with Runtime("node-1") as runtime:
        yield runtime


@pytest.mark.parametrize("port", [-1, 0, 65536, 10**6])
def test_port_out_of_range(runtime, port):
    with pytest.raises(ValueError, match=str(port)):
        runtime.has_free_port(port)
    with pytest.raises(ValueError):
        runtime.get_free_port([port])
    with pytest.raises(ValueError):
        runtime.expose_port_to_runtime(port)
    with pytest.raises(ValueError):
        runtime.expose_port_from_runtime(port)


@pytest.mark.parametrize("port", ["8080", 80.0, True, None])
def test_port_wrong_type(runtime, port):
    with pytest.raises(TypeError):
        runtime.has_free_port(port)


def test_has_free_port(runtime, busy_port):  # noqa: F811
    (free,) = free_ports(1)
    assert runtime.has_free_port(free)
    assert not runtime.has_free_port(busy_port)


def test_get_free_port_skips_busy(runtime, busy_port, backend):  # noqa: F811
    (free,) = free_ports(1)
    assert runtime.get_free_port([busy_port, free]) == free
    assert backend.transports_of("node-1")[0].port_check_calls == 1


def test_get_free_port_none_left(runtime, busy_port):  # noqa: F811
    with pytest.raises(NoPortsLeftError, match="node-1"):
        runtime.get_free_port([busy_port])
    with pytest.raises(NoPortsLeftError):
        runtime.get_free_port([])


def test_expose_port_from_runtime(runtime, echo_server):  # noqa: F811
    (local_port,) = free_ports(1)
    key = runtime.expose_port_from_runtime(echo_server.port, local_port)
    assert echo_through(local_port) == b"ping"
    assert runtime.is_port_exposure_process(key)
    assert not runtime.is_runtime_task_process(key)
    runtime.stop_process(key)
    assert runtime.has_free_port(local_port)


def test_expose_from_runtime_local_port_busy(runtime, echo_server, busy_port):  # noqa: F811
    with pytest.raises(PortInUseError, match="manager"):
        runtime.expose_port_from_runtime(echo_server.port, busy_port)


def test_expose_port_to_runtime(runtime, echo_server):  # noqa: F811
    (runtime_port,) = free_ports(1)
    key = runtime.expose_port_to_runtime(echo_server.port, runtime_port)
    assert echo_through(runtime_port, b"pong") == b"pong"
    assert runtime.get_process(key).is_open
    assert list(runtime.get_processes(only_alive=True)) == [key]


def test_expose_to_runtime_port_busy(runtime, echo_server, busy_port):  # noqa: F811
    with pytest.raises(PortInUseError, match="node-1"):
        runtime.expose_port_to_runtime(echo_server.port, busy_port)


def test_cleanup_closes_tunnels(backend, echo_server):  # noqa: F811
    runtime = Runtime("node-1")
    (runtime_port,) = free_ports(1)
    runtime.expose_port_to_runtime(echo_server.port, runtime_port)
    runtime.cleanup()
    assert runtime.has_free_port(runtime_port)
    runtime.cleanup()


def test_self_forward_skipped_on_manager(backend):  # noqa: F811
    runtime = Runtime("localhost", transport=LocalTransport())
    (port,) = free_ports(1)
    key = runtime.expose_port_to_runtime(port)
    assert runtime.get_process(key) is None
    assert runtime.is_port_exposure_process(key)
    assert runtime.has_free_port(port)
    assert runtime.get_processes(only_alive=True) == {}
    runtime.stop_process(key)
    runtime.cleanup()


def test_unknown_process_key(runtime):
    for method in (
        runtime.get_process,
        runtime.stop_process,
        runtime.is_runtime_task_process,
        runtime.is_port_exposure_process,
    ):
        with pytest.raises(ValueError, match="no-such-key"):
            method("no-such-key")


def test_task_in_process_table(runtime):
    task = runtime.execute_task(RuntimeTask("sleeper").run_command("sleep 0.5"))
    (key,) = runtime.get_processes()
    assert runtime.is_runtime_task_process(key)
    assert runtime.get_process(key) is task
    assert runtime.alive_task_process_count == 1
    assert runtime.alive_process_count == 1
    task.join()
    assert runtime.get_processes(only_alive=True) == {}


def test_stop_process_stops_task(runtime, tmp_path):
    marker = tmp_path / "never"
    task = runtime.execute_task(RuntimeTask().run_command("sleep 600").run_command(f"touch {marker}"))
    (key,) = runtime.get_processes()
    transport = runtime.transport
    assert transport.clock.wait_until(lambda: task._current_process is not None, 10)
    runtime.stop_process(key)
    with pytest.raises(TaskExecutionError):
        task.join()
    assert not marker.exists()
    assert all(process.poll() is not None for process in transport.processes)
    assert runtime.get_processes() == {}
