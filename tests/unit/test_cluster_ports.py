"""Port choice and tunnel planning of the cluster, against real sockets on this machine."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from lazycluster.cluster.ports import (
    find_busy_ports,
    pick_free_ports,
    require_free_port,
    validate_port_list,
)
from lazycluster.cluster.tunnel_mesh import plan_worker_tunnels
from lazycluster.exceptions import NoPortsLeftError, PortInUseError
from lazycluster.transport.local import LocalTransport


@pytest.fixture
def listening_port() -> Iterator[int]:
    """A port that a listening socket on 127.0.0.1 holds for the test."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        yield server.getsockname()[1]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_pick_free_ports_skips_busy_and_excluded() -> None:
    busy = {"a": {101}, "b": {103}, "manager": set()}

    chosen, remaining = pick_free_ports([100, 101, 102, 103, 104, 105], 3, busy, exclude=[100])

    assert chosen == [102, 104, 105]
    assert remaining == []


def test_pick_free_ports_returns_list_after_last_used() -> None:
    chosen, remaining = pick_free_ports([10, 11, 12, 13, 14], 2, {"a": {10}})

    assert chosen == [11, 12]
    assert remaining == [13, 14]


def test_pick_free_ports_skips_duplicates_in_list() -> None:
    chosen, remaining = pick_free_ports([10, 10, 11, 12], 2, {})

    assert chosen == [10, 11]
    assert remaining == [12]


def test_pick_free_ports_too_few_raises() -> None:
    with pytest.raises(NoPortsLeftError, match="Only 1 of the 3 ports"):
        pick_free_ports([10, 11, 12], 2, {"a": {10}, "b": {12}})


def test_pick_free_ports_empty_list_raises() -> None:
    with pytest.raises(NoPortsLeftError):
        pick_free_ports([], 1, {})


def test_pick_free_ports_rejects_zero_count() -> None:
    with pytest.raises(ValueError, match="port count 0"):
        pick_free_ports([10], 0, {})


def test_require_free_port_names_hosts() -> None:
    with pytest.raises(PortInUseError, match="'b'") as raised:
        require_free_port(50, {"a": set(), "b": {50}})

    assert raised.value.port == 50
    require_free_port(51, {"a": set(), "b": {50}})


@pytest.mark.parametrize("bad", ["8786", 8786, None, [1, "2"], [0], [70000], [True]])
def test_validate_port_list_rejects_bad_input(bad: object) -> None:
    with pytest.raises((TypeError, ValueError)):
        validate_port_list(bad)


def test_find_busy_ports_sees_listening_socket(listening_port: int) -> None:
    transports = [LocalTransport("manager"), LocalTransport("other")]
    unused = free_port()

    busy = find_busy_ports(transports, [listening_port, unused])

    assert busy == {"manager": {listening_port}, "other": {listening_port}}


def test_find_busy_ports_calls_each_host_once() -> None:
    class CountingTransport(LocalTransport):
        calls = 0

        def ports_in_use(self, ports):  # type: ignore[no-untyped-def]
            CountingTransport.calls += 1
            return super().ports_in_use(ports)

    transports = [CountingTransport("a"), CountingTransport("b"), CountingTransport("c")]

    find_busy_ports(transports, range(40000, 40200))

    assert CountingTransport.calls == 3


def test_plan_worker_tunnels_full_mesh() -> None:
    plan = plan_worker_tunnels({"a": [1, 3], "b": [2]}, ["a", "b", "c"])

    assert plan["a"].local_pairs == [(1, 1), (3, 3)]
    assert plan["a"].remote_pairs == [(2, 2)]
    assert plan["b"].local_pairs == [(2, 2)]
    assert plan["b"].remote_pairs == [(1, 1), (3, 3)]
    assert plan["c"].local_pairs == []
    assert sorted(plan["c"].remote_pairs) == [(1, 1), (2, 2), (3, 3)]


def test_plan_skips_open_forwards() -> None:
    already_open = {("a", "local", 1), ("b", "remote", 1)}

    plan = plan_worker_tunnels({"a": [1, 2]}, ["a", "b"], already_open)

    assert plan["a"].local_pairs == [(2, 2)]
    assert plan["b"].remote_pairs == [(2, 2)]


def test_plan_manager_workers_need_no_local_forward() -> None:
    plan = plan_worker_tunnels({"a": [1], "manager": [5]}, ["a", "b"])

    assert plan["a"].local_pairs == [(1, 1)]
    assert plan["a"].remote_pairs == [(5, 5)]
    assert sorted(plan["b"].remote_pairs) == [(1, 1), (5, 5)]
    assert "manager" not in plan


def test_plan_worker_tunnels_count_matches_mesh_cost() -> None:
    hosts = [f"h{i}" for i in range(5)]
    ports_per_host = {host: [1000 + 10 * i, 1001 + 10 * i] for i, host in enumerate(hosts)}

    plan = plan_worker_tunnels(ports_per_host, hosts)

    workers = 10
    assert sum(len(p.local_pairs) for p in plan.values()) == workers
    assert sum(len(p.remote_pairs) for p in plan.values()) == workers * (len(hosts) - 1)


def test_validate_port_list_rejects_duplicates() -> None:
    with pytest.raises(ValueError, match=r"\[8786\] appear more than once"):
        validate_port_list([8786, 60001, 8786])
