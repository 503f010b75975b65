"""Each fault of the simulator, on the transport and through the library's real error paths."""

from __future__ import annotations

import pytest

import sim
from lazycluster import Runtime, RuntimeGroup
from lazycluster.cluster.dask_cluster import DaskCluster, RoundRobinLauncher
from lazycluster.cluster.exceptions import MasterStartError, WorkerStartError
from lazycluster.exceptions import (
    AuthenticationError,
    ConnectionLostError,
    HostUnreachableError,
    InvalidRuntimeError,
    PortInUseError,
)
from lazycluster.transport import use_backend
from sim.host import TMP_DIR


@pytest.fixture
def network() -> sim.Network:
    return sim.Network(["h1", "h2"], seed=21)


# fault records


def test_fault_rejects_unknown_kind():
    with pytest.raises(ValueError, match="Invalid fault kind 'meteor'"):
        sim.Fault("meteor", "h1")


def test_fault_needs_port_for_port_faults():
    with pytest.raises(ValueError, match="needs a port"):
        sim.Fault("foreign_port", "h1")


def test_fault_rejects_end_before_start():
    with pytest.raises(ValueError, match="ends"):
        sim.Fault("unreachable", "h1", at=5, until=1)


def test_fault_on_unknown_host_raises(network):
    with pytest.raises(KeyError, match="h9"):
        network.faults.unreachable("h9")


def test_fault_plan_given_to_network_is_applied():
    plan = sim.FaultPlan((sim.Fault("unreachable", "h1", at=0.0),))
    network = sim.Network(["h1"], faults=plan)
    with pytest.raises(HostUnreachableError):
        network.connect("h1")
    assert "faults=FaultPlan" in network.describe()


# connection faults


def test_unreachable_host_fails_connect(network):
    network.faults.unreachable("h1")
    with pytest.raises(HostUnreachableError) as caught:
        network.connect("h1")
    assert isinstance(caught.value, ConnectionError)
    assert network.connect("h2").run(["true"]).ok


def test_unreachable_at_time_and_until(network):
    network.faults.at(5).unreachable("h1", until=8)
    network.connect("h1")
    network.clock.sleep(6)
    with pytest.raises(HostUnreachableError):
        network.connect("h1")
    network.clock.sleep(3)
    assert network.connect("h1").run(["true"]).ok


def test_unreachable_drops_open_connection(network):
    transport = network.connect("h1")
    network.faults.unreachable("h1")
    with pytest.raises(ConnectionLostError):
        transport.run(["true"])


def test_unknown_host_is_unreachable(network):
    with pytest.raises(HostUnreachableError, match="nowhere"):
        network.connect("nowhere")


def test_auth_failure(network):
    network.faults.auth_failure("h2")
    with pytest.raises(AuthenticationError):
        network.connect("h2")


def test_runtime_on_failing_hosts_raises_invalid_runtime(network):
    network.faults.auth_failure("h1")
    network.faults.unreachable("h2")
    with use_backend(network):
        for host in ("h1", "h2"):
            with pytest.raises(InvalidRuntimeError, match=host):
                Runtime(host)
    network.assert_clean()


def test_drop_fails_named_operation_then_reconnects(network):
    transport = network.connect("h1")
    handle = transport.start_process(["sleep", "100"])
    local = transport.forward_local([(5000, 6000)])[0]
    remote = transport.forward_remote([(7000, 8000)])[0]
    network.faults.drop_connection("h1", operation="run")

    with pytest.raises(ConnectionLostError, match="lost during run"):
        transport.run(["true"])
    assert network.connect("h2").ports_in_use([7000]) == set()
    assert transport.ports_in_use([7000]) == {7000}

    assert handle.process.alive
    assert local.is_open
    assert remote.is_open
    assert transport.run(["true"]).ok


def test_drop_during_ports_in_use_is_retried(network):
    transport = network.connect("h1")
    network.hold_port("h1", 7000)
    network.faults.drop_connection("h1", operation="ports_in_use")
    assert transport.ports_in_use([7000, 7001]) == {7000}
    assert [event.kind for event in network.trace[-2:]] == ["connection.lost", "connection.restored"]


def test_remote_forward_taken_while_down_is_not_restored(network):
    transport = network.connect("h1")
    remote = transport.forward_remote([(7000, 8000)])[0]
    network.faults.drop_connection("h1")
    with pytest.raises(ConnectionLostError):
        transport.run(["true"])
    network.hold_port("h1", 7000)

    assert transport.run(["true"]).ok
    assert not isinstance(network.listening_ports("h1")[7000], sim.SimTunnel)
    remote.close()
    assert not remote.is_open


def test_reconnect_fails_while_unreachable(network):
    transport = network.connect("h1")
    network.faults.unreachable("h1", until=5)
    with pytest.raises(ConnectionLostError, match="reconnecting failed"):
        transport.run(["true"])
    network.clock.sleep(6)
    assert transport.run(["true"]).ok


def test_close_of_unreachable_host_leaves_processes(network, caplog):
    transport = network.connect("h1")
    handle = transport.start_process(["sleep", "100"])
    network.faults.unreachable("h1")
    transport.close()

    assert handle.process.alive
    assert "does not respond" in caplog.text
    assert any("still running: sleep 100" in line for line in network.leftovers())


def test_drop_is_consumed_once(network):
    network.faults.drop_connection("h1")
    with pytest.raises(ConnectionLostError):
        network.connect("h1").run(["true"])
    assert network.connect("h1").run(["true"]).ok


# port faults


def test_foreign_port_until(network):
    network.faults.at(1).foreign_port("h1", 7000, until=3)
    transport = network.connect("h1")
    assert transport.ports_in_use([7000]) == set()
    network.clock.sleep(1)
    assert transport.ports_in_use([7000]) == {7000}
    assert isinstance(network.listening_ports("h1")[7000], sim.ForeignHolder)
    network.clock.sleep(2)
    assert transport.ports_in_use([7000]) == set()


def test_port_race_takes_port_after_check(network):
    network.faults.port_race("h1", 7000)
    transport = network.connect("h1")
    assert transport.ports_in_use([7000, 7001]) == set()
    with pytest.raises(PortInUseError, match="7000"):
        transport.forward_remote([(7000, 8000)])
    assert transport.ports_in_use([7000]) == {7000}


def test_port_race_on_worker_port_moves_worker(network):
    network.faults.port_race("h1", 60001)
    with use_backend(network):
        group = RuntimeGroup(hosts=["h1", "h2"])
        cluster = DaskCluster(group)
        cluster.start()
        assert 60001 not in [worker.port for worker in cluster.workers]
        cluster.cleanup()
        group.cleanup()
    network.release_port("h1", 60001)
    network.assert_clean()


def test_foreign_port_is_skipped_by_cluster(network):
    network.hold_port("h2", 60001)
    with use_backend(network):
        group = RuntimeGroup(hosts=["h1", "h2"])
        launcher = RoundRobinLauncher(group)
        cluster = DaskCluster(group, worker_launcher=launcher)
        cluster.start()
        used = launcher.ports_per_host
        holders = {host: network.listening_ports(host) for host in used}
        cluster.cleanup()
        group.cleanup()

    assert 60001 not in [port for ports in used.values() for port in ports]
    for host, ports in used.items():
        for port in ports:
            assert isinstance(holders[host][port].program, sim.DaskWorker)
    network.assert_clean()


# program faults


def test_slow_scheduler_beyond_timeout_fails_start(network):
    network.faults.slow_start("localhost", "scheduler", delay=1000)
    with use_backend(network):
        group = RuntimeGroup(hosts=["h1"])
        cluster = DaskCluster(group)
        with pytest.raises(MasterStartError, match="did not listen"):
            cluster.start()
        group.cleanup()
    assert network.clock.monotonic() < 1000
    network.assert_clean()


def test_slow_worker_beyond_timeout_fails_start(network):
    network.faults.slow_start("h2", "worker", delay=1000)
    with use_backend(network):
        group = RuntimeGroup(hosts=["h1", "h2"])
        cluster = DaskCluster(group)
        with pytest.raises(WorkerStartError) as caught:
            cluster.start()
        group.cleanup()
    assert caught.value.hosts == ["h2"]
    network.assert_clean()


def test_scheduler_crash_at_start(network):
    network.faults.crash("localhost", "scheduler", after=0.0, exit_code=1)
    with use_backend(network):
        group = RuntimeGroup(hosts=["h1"])
        with pytest.raises(MasterStartError, match="code 1"):
            DaskCluster(group).start()
        group.cleanup()
    network.assert_clean()


def test_worker_crash_after_registration(network):
    network.faults.crash("h1", "worker", after=5.0, exit_code=2)
    with use_backend(network):
        group = RuntimeGroup(hosts=["h1"])
        cluster = DaskCluster(group)
        cluster.start()
        worker = network.processes("h1")[0]
        network.clock.sleep(10)
        assert worker.exit_code == 2
        cluster.cleanup()
        group.cleanup()
    network.assert_clean()


def test_worker_crash_during_start_fails_start(network):
    network.faults.crash("h2", "worker", after=0.1)
    with use_backend(network):
        group = RuntimeGroup(hosts=["h1", "h2"])
        with pytest.raises(WorkerStartError, match="exited with code 1"):
            DaskCluster(group).start()
        group.cleanup()
    network.assert_clean()


# host restart


def test_restart_ends_processes_and_reconnects(network):
    transport = network.connect("h1")
    handle = transport.start_process(["sleep", "100"])
    network.hold_port("h1", 7000)
    network.faults.at(2).restart("h1")
    network.clock.sleep(3)

    assert handle.process.exit_code == 128 + 9
    assert network.listening_ports("h1") == {}
    assert network.files("h1", TMP_DIR) == []
    assert transport.run(["true"]).ok
    assert [event.kind for event in network.trace if event.kind.startswith("connection.")] == [
        "connection.lost",
        "connection.restored",
    ]


def test_restart_of_worker_host_stops_worker_and_tunnels(network):
    with use_backend(network):
        group = RuntimeGroup(hosts=["h1", "h2"])
        cluster = DaskCluster(group)
        cluster.start()
        network.restart_host("h1")
        assert network.processes("h1") == []
        assert network.listening_ports("h1") == {}
        assert {tunnel.kind for tunnel in network.open_tunnels("h1")} == {"local"}
        cluster.cleanup()
        group.cleanup()
    network.assert_clean()
