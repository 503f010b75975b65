"""The network as a backend and its queries: assert_clean, listings, hosts, describe."""

from __future__ import annotations

import pytest

import sim
from lazycluster import Runtime, RuntimeGroup, RuntimeManager, RuntimeTask
from lazycluster.cluster.dask_cluster import DaskCluster
from lazycluster.exceptions import NoRuntimesDetectedError, PortInUseError, TaskExecutionError
from lazycluster.transport import get_backend, set_backend, use_backend


@pytest.fixture
def network() -> sim.Network:
    return sim.Network(3, seed=2)


# assert_clean


def test_new_network_is_clean(network):
    network.assert_clean()
    assert network.leftovers() == []


def test_assert_clean_lists_process_tunnel_and_temp_dir(network):
    transport = network.connect("h1")
    handle = transport.start_process(["sleep", "100"])
    transport.forward_remote([(7000, 8000)])
    temp_dir = transport.run(["mktemp", "-d", "-t", "lazycluster-XXXXXXXXXX"]).stdout.strip()

    with pytest.raises(AssertionError) as caught:
        network.assert_clean()

    message = str(caught.value)
    assert f"process {handle.pid} still running: sleep 100" in message
    assert "port 7000 still listening for tunnel" in message
    assert f"temporary directory {temp_dir} still exists" in message
    assert "temporary directory /tmp/lazycluster-logs-" in message
    assert "4 leftovers" in message


def test_close_makes_network_clean(network):
    transport = network.connect("h1")
    transport.start_process(["sleep", "100"])
    transport.forward_local([(7000, 8000)])
    transport.close()
    network.assert_clean()


def test_foreign_holders_are_not_leftovers(network):
    network.hold_port("h1", 5432, label="postgres")
    network.assert_clean()
    assert repr(network.listening_ports("h1")[5432]) == "<postgres>"


def test_hold_port_twice_raises(network):
    network.hold_port("h1", 5432)
    with pytest.raises(ValueError, match="already taken"):
        network.hold_port("h1", 5432)
    network.release_port("h1", 5432)
    assert network.listening_ports("h1") == {}


# queries


def test_queries_list_processes_ports_tunnels_files(network):
    transport = network.connect("h2")
    handle = transport.start_process(["sleep", "100"], log_path="/var/q/sleep.log")
    tunnel = transport.forward_remote([(7000, 8000)])[0]

    assert [process.pid for process in network.processes("h2")] == [handle.pid]
    assert network.processes("h1") == []
    assert network.listening_ports("h2") == {7000: tunnel}
    assert network.open_tunnels("h2") == [tunnel]
    assert network.open_tunnels("h3") == []
    assert network.files("h2", "/var/q") == ["/var/q/sleep.log"]

    handle.stop()
    assert network.processes("h2") == []
    assert len(network.processes("h2", alive=False)) == 1


def test_host_specs_and_lookup():
    network = sim.Network({"big": {"cpu_cores": 64, "memory": 2**40}, "small": {}})
    assert network.configured_hosts() == ["big", "small"]
    assert network.host("big").cpu_cores == 64
    assert network.host("localhost") is network.manager
    with pytest.raises(KeyError, match="Known hosts"):
        network.host("missing")
    with pytest.raises(ValueError, match="already exists"):
        network.add_host("big")


def test_describe_names_seed_hosts_and_faults(network):
    network.faults.at(3).unreachable("h2")
    text = network.describe()
    assert "seed=2" in text
    assert "'h1', 'h2', 'h3'" in text
    assert "Fault(kind='unreachable', host='h2', at=3" in text


def test_start_delay_validation(network):
    with pytest.raises(ValueError, match="start delay"):
        network.set_start_delay("worker", -1)


def test_use_backend_installs_and_restores(network):
    outer = sim.Network(1)
    previous = set_backend(outer)
    try:
        with use_backend(network) as active:
            assert active is network
            assert get_backend() is network
        assert get_backend() is outer
    finally:
        set_backend(previous)


# the library on the simulator


def test_runtime_info_reflects_host_specs():
    network = sim.Network({"gpu1": {"gpus": ["Tesla T4, 15360 MiB"], "cpu_cores": 16}})
    with use_backend(network):
        runtime = Runtime("gpu1")
        assert runtime.cpu_cores == 16
        assert runtime.gpu_count == 1
        assert runtime.check_filter(gpu_required=True, min_cpu_cores=8)
        assert not runtime.check_filter(min_cpu_cores=32)
        runtime.cleanup()
    network.assert_clean()


def test_task_uses_host_env(network):
    def read_env() -> str:
        import os

        return os.environ["WORKING_DIR"]

    with use_backend(network):
        runtime = Runtime("h1")
        runtime.add_env_variables({"GREETING": "moin"})
        task = RuntimeTask("t").run_command("echo $GREETING").run_function(read_env)
        runtime.execute_task(task, execute_async=False)
        assert list(task.function_returns) == [runtime.working_dir]
        assert "moin" in "\n".join(task.execution_log)
        runtime.cleanup()
    network.assert_clean()


def test_runtime_task_with_registered_command(network):
    calls = []
    network.register_command(
        "train", lambda call: calls.append(call.host.name) or call.write("loss=0.1")
    )
    with use_backend(network):
        group = RuntimeGroup(hosts=network.configured_hosts())
        tasks = group.execute_task(
            RuntimeTask("train").run_command("train --epochs 1"), broadcast=True
        )
        group.join()
        assert sorted(calls) == ["h1", "h2", "h3"]
        assert all("loss=0.1" in "\n".join(task.execution_log) for task in tasks)
        group.cleanup()
    network.assert_clean()


def test_runtime_manager_skips_unreachable_hosts(network):
    network.faults.unreachable("h2")
    with use_backend(network):
        manager = RuntimeManager()
        assert sorted(manager.inactive_hosts) == ["h2"]
        group = manager.create_group()
        assert sorted(group.hosts) == ["h1", "h3"]
        group.cleanup()
        manager.cleanup()
    network.assert_clean()


def test_runtime_manager_without_usable_hosts():
    network = sim.Network(["h1"])
    network.faults.auth_failure("h1")
    with use_backend(network), pytest.raises(NoRuntimesDetectedError):
        RuntimeManager()


def test_dask_cluster_starts_registers_and_cleans_up(network):
    with use_backend(network):
        group = RuntimeGroup(hosts=network.configured_hosts())
        cluster = DaskCluster(group)
        cluster.start(worker_count=5)
        registered = [event for event in network.trace if event.kind == "scheduler.register"]
        assert len(registered) == 5
        cluster.cleanup()
        cluster.cleanup()
        group.cleanup()
    network.assert_clean()


def test_manager_forward_to_same_port_is_noop(network):
    manager = network.local()
    tunnel = manager.forward_local([(8786, 8786)])[0]
    assert tunnel.is_open
    assert network.listening_ports("localhost") == {}
    tunnel.close()
    assert not tunnel.is_open


def test_wait_without_timeout_on_endless_process_raises(network):
    handle = network.connect("h1").start_process(["python3", "-m", "distributed.cli.dask_scheduler"])
    network.clock.sleep(1)
    with pytest.raises(RuntimeError, match="never exits"):
        handle.wait()
    handle.stop()


def test_registered_program_models_background_process(network):
    class Server(sim.Program):
        name = "server"

        def start(self, process: sim.SimProcess) -> None:
            process.after(2.0, lambda: process.bind(9000))

    network.register_program(lambda net, argv: Server() if argv[:1] == ["my-server"] else None)
    transport = network.connect("h1")
    handle = transport.start_process(["my-server", "--port", "9000"])

    assert transport.ports_in_use([9000]) == set()
    network.clock.sleep(2.5)
    assert transport.ports_in_use([9000]) == {9000}
    assert handle.stop() == 128 + 15
    assert transport.ports_in_use([9000]) == set()


def test_async_task_runs_function_from_payload_file(network):
    def triple(value: int) -> int:
        return value * 3

    with use_backend(network):
        runtime = Runtime("h1")
        task = RuntimeTask("async").run_function(triple, value=5)
        runtime.execute_task(task, execute_async=True)
        runtime.join()
        assert list(task.function_returns) == [15]
        assert [path for path in network.files("h1", runtime.working_dir) if path.endswith(".pickle")] == []
        runtime.cleanup()
    network.assert_clean()


def test_async_task_function_error_fails_task(network):
    def broken() -> None:
        raise KeyError("missing")

    with use_backend(network):
        runtime = Runtime("h1")
        task = RuntimeTask("async-error").run_function(broken)
        runtime.execute_task(task, execute_async=True)
        with pytest.raises(TaskExecutionError, match="KeyError"):
            runtime.join()
        runtime.cleanup()
    network.assert_clean()


def test_tunnel_batches_defer_garbage_collection(network):
    import gc

    assert gc.isenabled()
    transport = network.connect("h1")
    transport.forward_remote([(7000, 8000)])
    transport.forward_local([(7001, 8001)])
    assert not gc.isenabled()

    transport.ports_in_use([7000])
    assert gc.isenabled()
    transport.close()


def test_garbage_collection_resumes_on_close_and_clock(network):
    import gc

    transport = network.connect("h1")
    transport.forward_remote([(7000, 8000)])
    transport.close()
    assert gc.isenabled()

    network.connect("h2").forward_remote([(7000, 8000)])
    network.clock.sleep(0)
    assert gc.isenabled()


def test_remote_forward_batch_with_duplicate_port_raises(network):
    transport = network.connect("h1")
    with pytest.raises(ValueError, match="appears twice"):
        transport.forward_remote([(7000, 8000), (7000, 8001)])
    assert network.listening_ports("h1") == {}


def test_remote_forward_to_taken_host_port_raises(network):
    network.hold_port("h1", 7000)
    with pytest.raises(PortInUseError, match="host 'h1'"):
        network.connect("h1").forward_remote([(7001, 8000), (7000, 8000)])
    assert list(network.listening_ports("h1")) == [7000]
