"""The Dask scheduler and worker models, started with the library's own argv."""

from __future__ import annotations

import pytest

import sim
from lazycluster.cluster.dask_commands import (
    dashboard_port_in_log,
    registered_worker_ports,
    scheduler_command,
    scheduler_serves,
    worker_command,
)
from lazycluster.exceptions import ConnectionLostError

SCHEDULER_PORT = 8786


@pytest.fixture
def network() -> sim.Network:
    network = sim.Network(["h1", "h2"], seed=11)
    network.set_start_delay("scheduler", 0.5)
    network.set_start_delay("worker", 0.3)
    return network


def start_scheduler(network: sim.Network, port: int = SCHEDULER_PORT):
    return network.local().start_process(scheduler_command(port, None))


def start_worker(network: sim.Network, host: str, port: int, name: str, death_timeout: float = 60):
    transport = network.local() if host == "localhost" else network.connect(host)
    handle = transport.start_process(
        worker_command("python3", SCHEDULER_PORT, port, 1, name, death_timeout)
    )
    return transport, handle


def test_scheduler_binds_after_start_delay(network):
    scheduler = start_scheduler(network)
    assert network.local().ports_in_use([SCHEDULER_PORT]) == set()

    network.clock.sleep(0.5)

    assert network.local().ports_in_use([SCHEDULER_PORT]) == {SCHEDULER_PORT}
    assert "Scheduler at:      tcp://127.0.0.1:8786" in scheduler.read_log()


def test_scheduler_dashboard_port(network):
    handle = network.local().start_process(scheduler_command(SCHEDULER_PORT, 8787))
    network.clock.sleep(1)
    assert network.local().ports_in_use([SCHEDULER_PORT, 8787]) == {SCHEDULER_PORT, 8787}
    assert "dashboard at:  http://127.0.0.1:8787/status" in handle.read_log()


def test_scheduler_port_taken_meanwhile_exits_1(network):
    scheduler = start_scheduler(network)
    network.hold_port("localhost", SCHEDULER_PORT)

    assert scheduler.wait(timeout=5) == 1
    assert "Address already in use" in scheduler.read_log()
    assert "RuntimeError: Scheduler failed to start." in scheduler.read_log()


def test_worker_on_manager_registers_directly(network):
    scheduler = start_scheduler(network)
    start_worker(network, "localhost", 9001, "local-0")
    network.clock.sleep(1)

    log = scheduler.read_log()
    assert "Register worker addr: tcp://127.0.0.1:9001 name: local-0" in log
    assert registered_worker_ports(log) == {9001}


def test_remote_worker_needs_scheduler_tunnel(network):
    scheduler = start_scheduler(network)
    transport, worker = start_worker(network, "h1", 9001, "h1-0")
    network.clock.sleep(5)
    assert registered_worker_ports(scheduler.read_log()) == set()
    waiting = [line for line in worker.read_log().splitlines() if "Waiting to connect to:" in line]
    assert waiting and waiting[0].endswith(" tcp://127.0.0.1:8786")

    transport.forward_remote([(SCHEDULER_PORT, SCHEDULER_PORT)])
    network.clock.sleep(1)

    assert registered_worker_ports(scheduler.read_log()) == {9001}
    assert "Registered to:" in worker.read_log()


def test_tunnel_to_wrong_port_does_not_register(network):
    scheduler = start_scheduler(network)
    transport, _ = start_worker(network, "h1", 9001, "h1-0")
    transport.forward_remote([(SCHEDULER_PORT, 9999)])
    network.clock.sleep(5)
    assert registered_worker_ports(scheduler.read_log()) == set()


def test_worker_without_scheduler_exits_after_death_timeout(network):
    _, worker = start_worker(network, "h1", 9001, "h1-0", death_timeout=10)
    network.clock.sleep(9)
    assert worker.poll() is None
    network.clock.sleep(2)
    assert worker.poll() == 1
    assert "Timed out trying to connect to tcp://127.0.0.1:8786 after 10 s" in worker.read_log()


def test_workers_exit_when_scheduler_stops(network):
    scheduler = start_scheduler(network)
    _, worker = start_worker(network, "localhost", 9001, "local-0", death_timeout=5)
    network.clock.sleep(1)
    scheduler.stop()

    network.clock.sleep(4)
    assert worker.poll() is None
    network.clock.sleep(2)
    assert worker.poll() == 1


def test_closing_scheduler_tunnel_unregisters_worker(network):
    scheduler = start_scheduler(network)
    transport, worker = start_worker(network, "h1", 9001, "h1-0", death_timeout=3)
    tunnel = transport.forward_remote([(SCHEDULER_PORT, SCHEDULER_PORT)])[0]
    network.clock.sleep(1)
    tunnel.close()

    assert "Remove worker addr: tcp://127.0.0.1:9001 name: h1-0" in scheduler.read_log()
    network.clock.sleep(5)
    assert worker.poll() == 1


def test_duplicate_worker_name_is_rejected(network):
    scheduler = start_scheduler(network)
    start_worker(network, "localhost", 9001, "same")
    _, second = start_worker(network, "localhost", 9002, "same")
    network.clock.sleep(2)

    assert registered_worker_ports(scheduler.read_log()) == {9001}
    assert second.poll() == 1
    assert "name taken" in second.read_log()


def test_worker_port_taken_before_bind_exits_1(network):
    start_scheduler(network)
    _, worker = start_worker(network, "h1", 9001, "h1-0")
    network.hold_port("h1", 9001)
    network.clock.sleep(1)
    assert worker.poll() == 1
    assert "Address already in use" in worker.read_log()


def test_sigterm_closes_gracefully_and_frees_ports(network):
    scheduler = start_scheduler(network)
    network.clock.sleep(1)
    assert scheduler.stop() == 0
    assert network.local().ports_in_use([SCHEDULER_PORT]) == set()
    assert "distributed._signals - INFO - Received signal SIGTERM (15)" in scheduler.read_log()
    assert "End scheduler" in scheduler.read_log()


def test_sigkill_exits_137(network):
    _, worker = start_worker(network, "h1", 9001, "h1-0")
    network.clock.sleep(1)
    worker.process.signal(9)
    assert worker.poll() == 128 + 9
    assert network.connect("h1").ports_in_use([9001]) == set()


def test_taken_dashboard_port_moves_to_free_port(network):
    network.hold_port("localhost", 8787)
    scheduler = network.local().start_process(scheduler_command(SCHEDULER_PORT, 8787))
    network.clock.sleep(1)
    log = scheduler.read_log()
    assert "Port 8787 is already in use." in log
    port = dashboard_port_in_log(log)
    assert port is not None
    assert port != 8787
    assert network.local().ports_in_use([port]) == {port}


def test_no_dashboard_still_serves_http_on_free_port(network):
    scheduler = start_scheduler(network)
    network.clock.sleep(1)
    port = dashboard_port_in_log(scheduler.read_log())
    assert port is not None
    assert 32768 <= port < 61000
    assert scheduler_serves(scheduler.read_log(), SCHEDULER_PORT)


def test_worker_without_scheduler_address_is_not_supported(network):
    with pytest.raises(NotImplementedError, match="scheduler address"):
        network.connect("h1").start_process(
            ["python3", "-m", "distributed.cli.dask_worker", "--nthreads", "1"]
        )


def test_unknown_worker_flags_are_ignored(network):
    scheduler = start_scheduler(network)
    argv = worker_command("python3", SCHEDULER_PORT, 9001, 2, "w", 60) + [
        "--memory-limit",
        "2GB",
        "--new-flag",
    ]
    network.local().start_process(argv)
    network.clock.sleep(1)
    assert registered_worker_ports(scheduler.read_log()) == {9001}


def test_worker_registers_again_after_reconnect(network):
    scheduler = start_scheduler(network)
    transport, worker = start_worker(network, "h1", 9001, "h1-0", death_timeout=30)
    transport.forward_remote([(SCHEDULER_PORT, SCHEDULER_PORT)])
    network.clock.sleep(1)
    network.faults.drop_connection("h1")

    with pytest.raises(ConnectionLostError):
        transport.run(["true"])
    assert "Remove worker addr: tcp://127.0.0.1:9001" in scheduler.read_log()

    transport.run(["true"])
    network.clock.sleep(1)
    assert scheduler.read_log().count("Register worker addr: tcp://127.0.0.1:9001 name: h1-0") == 2
    assert worker.poll() is None
