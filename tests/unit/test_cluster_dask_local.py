"""DaskCluster with real Dask processes on named hosts that all run on this machine.

Every host is a LocalTransport under its own name that counts as remote, so
the version probe, the worker argv with `python3` and the tunnel calls take
the same paths as over SSH. All hosts share this machine's ports, so a forward
from a port to the same port does nothing here. The Docker integration tests
cover the real tunnels.
"""

from __future__ import annotations

import _thread
import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

from lazycluster.cluster import MasterStartError, WorkerStartError
from lazycluster.cluster.dask_cluster import (
    DASHBOARD_PORTS,
    DaskCluster,
    LocalMasterLauncher,
    RoundRobinLauncher,
)
from lazycluster.exceptions import (
    LazyclusterError,
    NoPortsLeftError,
    PortInUseError,
    VersionMismatchError,
)
from lazycluster.group import RuntimeGroup
from lazycluster.runtime import Runtime
from lazycluster.transport import Backend, Transport, use_backend
from lazycluster.transport.local import LocalTransport
from tests.port_blocks import reserve_port_block

# Ports of these tests: below the ephemeral range (32768 on Linux), so no client
# connection takes one, and away from Dask's defaults.
MASTER_PORT, *PORTS = reserve_port_block(31, 29040, 29400)


class VenvHostTransport(LocalTransport):
    """This machine posing as a remote host whose python3 is the test interpreter's."""

    is_local = False
    path_prefix = os.path.dirname(sys.executable)

    def _with_path(self, env: Mapping[str, str] | None) -> dict[str, str]:
        return {**(env or {}), "PATH": f"{self.path_prefix}:{os.environ['PATH']}"}

    def run(self, command, *, env=None, **kwargs):  # type: ignore[no-untyped-def]
        return super().run(command, env=self._with_path(env), **kwargs)

    def start_process(self, command, *, env=None, **kwargs):  # type: ignore[no-untyped-def]
        return super().start_process(command, env=self._with_path(env), **kwargs)


class SystemPythonHostTransport(VenvHostTransport):
    """A host whose python3 has no `distributed` installed."""

    path_prefix = "/usr/bin"


class HostsBackend(Backend):
    def __init__(self, transport_class: type[LocalTransport] = VenvHostTransport) -> None:
        self.transport_class = transport_class
        self.manager = LocalTransport()
        self.clock = self.manager.clock
        self.connected: list[Transport] = []

    def connect(self, host: str, connection_kwargs: object = None) -> Transport:
        transport = self.transport_class(host)
        self.connected.append(transport)
        return transport

    def local(self) -> Transport:
        return self.manager

    def configured_hosts(self) -> list[str]:
        return []

    def all_processes(self) -> list:
        return [p for t in [self.manager, *self.connected] for p in t.processes]

    def close(self) -> None:
        for transport in [*self.connected, self.manager]:
            transport.close()


@pytest.fixture
def backend() -> Iterator[HostsBackend]:
    hosts_backend = HostsBackend()
    with use_backend(hosts_backend):
        yield hosts_backend
    hosts_backend.close()


def make_group(count: int) -> RuntimeGroup:
    return RuntimeGroup(hosts=[f"host-{index}" for index in range(count)])


@pytest.fixture
def group(backend: HostsBackend) -> Iterator[RuntimeGroup]:
    runtime_group = make_group(2)
    yield runtime_group
    runtime_group.cleanup()


def take_port(port: int) -> socket.socket:
    """Return a socket listening on `port`; SO_REUSEADDR lets it bind next to TIME_WAIT leftovers."""
    taken = socket.socket()
    taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    taken.bind(("127.0.0.1", port))
    taken.listen()
    return taken


def ports_in_use(ports: list[int]) -> set[int]:
    return LocalTransport().ports_in_use(ports)


def assert_nothing_left(backend: HostsBackend) -> None:
    alive = [process for process in backend.all_processes() if process.is_alive]
    assert alive == []
    assert ports_in_use([MASTER_PORT, *PORTS]) == set()


def test_start_round_robin_and_compute(backend: HostsBackend, group: RuntimeGroup) -> None:
    cluster = DaskCluster(group, ports=PORTS)

    cluster.start(worker_count=3, master_port=MASTER_PORT)
    try:
        assert cluster.master_port == MASTER_PORT
        assert cluster.scheduler_address == f"tcp://127.0.0.1:{MASTER_PORT}"
        ports_per_host = cluster._worker_launcher.ports_per_host
        assert ports_per_host == {"host-0": [PORTS[0], PORTS[2]], "host-1": [PORTS[1]]}
        assert ports_in_use(PORTS[:3]) == set(PORTS[:3])

        client = cluster.get_client()
        info = client.scheduler_info(n_workers=-1)
        assert sorted(int(a.rsplit(":", 1)[1]) for a in info["workers"]) == PORTS[:3]
        assert client.submit(sum, [1, 2, 3]).result(timeout=30) == 6
    finally:
        cluster.cleanup()

    assert cluster.master_port is None
    assert cluster.scheduler_address is None
    assert_nothing_left(backend)
    cluster.cleanup()


def test_default_worker_count_is_runtime_count(backend: HostsBackend, group: RuntimeGroup) -> None:
    with DaskCluster(group, ports=PORTS) as cluster:
        assert cluster.master_port in (DaskCluster.DEFAULT_MASTER_PORT, PORTS[0])
        counts = {host: len(p) for host, p in cluster._worker_launcher.ports_per_host.items()}
        assert counts == {"host-0": 1, "host-1": 1}

    assert_nothing_left(backend)


def test_second_start_workers_continues_round_robin(
    backend: HostsBackend, group: RuntimeGroup
) -> None:
    with DaskCluster(group, ports=PORTS) as cluster:
        cluster.start_workers(1)

        hosts = [worker.host for worker in cluster._worker_launcher.workers]
        assert sorted(hosts) == ["host-0", "host-0", "host-1"]
        assert len(cluster.get_client().scheduler_info(n_workers=-1)["workers"]) == 3


def test_master_port_in_use_raises(backend: HostsBackend, group: RuntimeGroup) -> None:
    with take_port(MASTER_PORT):
        cluster = DaskCluster(group, ports=PORTS)

        with pytest.raises(PortInUseError, match=str(MASTER_PORT)):
            cluster.start(master_port=MASTER_PORT)

    assert cluster.master_port is None
    assert_nothing_left(backend)


def test_exhausted_port_list_raises_before_starting(
    backend: HostsBackend, group: RuntimeGroup
) -> None:
    with take_port(PORTS[1]):
        cluster = DaskCluster(group, ports=PORTS[:3])

        with pytest.raises(NoPortsLeftError, match="Only 2 of the 3 ports"):
            cluster.start(worker_count=3, master_port=MASTER_PORT)

    assert backend.all_processes() and not any(p.is_alive for p in backend.all_processes())
    assert [p for t in backend.connected for p in t.processes] == []
    assert_nothing_left(backend)


def test_master_launcher_list_returns_rest(backend: HostsBackend, group: RuntimeGroup) -> None:
    launcher = LocalMasterLauncher(group)
    with take_port(PORTS[0]):
        remaining = launcher.start(PORTS[:5], timeout=30)
    try:
        assert launcher.port == PORTS[1]
        assert remaining == PORTS[2:5]
        assert launcher.process is not None and launcher.process.is_alive
    finally:
        launcher.cleanup()

    assert launcher.port is None
    assert_nothing_left(backend)


def test_master_launcher_single_port_returns_empty(
    backend: HostsBackend, group: RuntimeGroup
) -> None:
    launcher = LocalMasterLauncher(group)
    try:
        assert launcher.start(MASTER_PORT, timeout=30) == []
        with pytest.raises(LazyclusterError, match="already runs"):
            launcher.start(MASTER_PORT, timeout=30)
    finally:
        launcher.cleanup()
    launcher.cleanup()


def test_master_timeout_raises_master_start_error(
    backend: HostsBackend, group: RuntimeGroup
) -> None:
    cluster = DaskCluster(group, ports=PORTS)

    with pytest.raises(MasterStartError, match="did not listen within 0.05 s") as raised:
        cluster.start_master(MASTER_PORT, timeout=0.05)

    assert raised.value.port == MASTER_PORT
    assert cluster.master_port is None
    assert_nothing_left(backend)


def broken_distributed(directory: Path, body: str) -> str:
    """Create a `distributed` package that runs `body` on import; return the PYTHONPATH entry."""
    package = directory / "distributed"
    package.mkdir()
    (package / "__init__.py").write_text(body)
    return str(directory)


def test_master_that_exits_raises_with_exit_code(
    backend: HostsBackend, group: RuntimeGroup, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # Processes on the manager inherit its environment, so the scheduler imports the broken package.
    monkeypatch.setenv("PYTHONPATH", broken_distributed(tmp_path, "raise SystemExit(7)\n"))
    cluster = DaskCluster(group, ports=PORTS)

    with pytest.raises(MasterStartError, match="exited with code 7") as raised:
        cluster.start(master_port=MASTER_PORT)

    assert raised.value.host == "localhost"
    assert raised.value.port == MASTER_PORT
    assert_nothing_left(backend)


def test_worker_that_exits_fails_fast(
    backend: HostsBackend, group: RuntimeGroup, tmp_path: Path
) -> None:
    python_path = broken_distributed(tmp_path, "raise ImportError('broken on purpose')\n")
    group.get_runtime("host-1").add_env_variables({"PYTHONPATH": python_path})
    cluster = DaskCluster(group, ports=PORTS)

    with pytest.raises(WorkerStartError, match="exited with code 1") as raised:
        cluster.start(worker_count=2, master_port=MASTER_PORT)

    assert raised.value.hosts == ["host-1"]
    assert raised.value.ports == [PORTS[1]]
    assert "broken on purpose" in raised.value.failures[0].log_tail
    assert_nothing_left(backend)


def test_worker_registration_timeout(
    backend: HostsBackend, group: RuntimeGroup, tmp_path: Path
) -> None:
    # Workers boot while the scheduler does, so only a worker that hangs on
    # import is sure to miss the registration timeout.
    python_path = broken_distributed(tmp_path, "import time\ntime.sleep(60)\n")
    group.get_runtime("host-1").add_env_variables({"PYTHONPATH": python_path})
    cluster = DaskCluster(group, ports=PORTS)
    cluster.worker_start_timeout = 0.05

    with pytest.raises(
        WorkerStartError, match="did not register with the scheduler within 0.05 s"
    ) as raised:
        cluster.start(worker_count=2, master_port=MASTER_PORT)

    assert "host-1" in raised.value.hosts
    assert "worker_start_timeout" in str(raised.value)
    assert_nothing_left(backend)


def test_version_mismatch_names_host_and_versions() -> None:
    mismatch_backend = HostsBackend(SystemPythonHostTransport)
    with use_backend(mismatch_backend):
        group = RuntimeGroup(runtimes=[Runtime("old-host")])
        cluster = DaskCluster(group, ports=PORTS)
        try:
            with pytest.raises(VersionMismatchError, match="'old-host' has no installed version"):
                cluster.start(master_port=MASTER_PORT)
        finally:
            group.cleanup()
            assert_nothing_left(mismatch_backend)
            mismatch_backend.close()


def test_get_client_before_start_raises(group: RuntimeGroup) -> None:
    cluster = DaskCluster(group)

    with pytest.raises(LazyclusterError, match="not started"):
        cluster.get_client()


@pytest.mark.parametrize("timeout", [-1, 0, float("nan")])
def test_get_client_rejects_bad_timeout(group: RuntimeGroup, timeout: float) -> None:
    cluster = DaskCluster(group)

    with pytest.raises(ValueError, match=f"Invalid timeout {timeout!r}"):
        cluster.get_client(timeout=timeout)


def test_get_client_timeout_raises_timeout_error(
    backend: HostsBackend, group: RuntimeGroup
) -> None:
    cluster = DaskCluster(group, ports=PORTS)
    with cluster:
        cluster._master_launcher.process.stop()  # type: ignore[union-attr]

        with pytest.raises(TimeoutError, match=str(cluster.master_port)):
            cluster.get_client(timeout=1)


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"worker_count": 0}, ValueError),
        ({"worker_count": "2"}, TypeError),
        ({"master_port": 0}, ValueError),
        ({"master_port": "8786"}, TypeError),
    ],
)
def test_start_rejects_bad_input(
    backend: HostsBackend, group: RuntimeGroup, kwargs: dict, error: type[Exception]
) -> None:
    cluster = DaskCluster(group, ports=PORTS)

    with pytest.raises(error):
        cluster.start(**kwargs)

    assert_nothing_left(backend)


def test_constructor_rejects_bad_ports(group: RuntimeGroup) -> None:
    with pytest.raises(TypeError):
        DaskCluster(group, ports="60001")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        DaskCluster(group, ports=[0])


@pytest.mark.parametrize("bad", [-1, 0, float("nan"), float("inf")])
def test_launcher_timeout_must_be_finite_positive(group: RuntimeGroup, bad: float) -> None:
    with pytest.raises(ValueError, match=f"timeout {bad!r}"):
        LocalMasterLauncher(group).start(MASTER_PORT, timeout=bad)


def test_worker_start_timeout_checked_before_start(
    backend: HostsBackend, group: RuntimeGroup
) -> None:
    cluster = DaskCluster(group, ports=PORTS)
    cluster.worker_start_timeout = float("nan")

    with pytest.raises(ValueError, match="worker_start_timeout nan"):
        cluster.start(master_port=MASTER_PORT)

    assert [p for t in backend.connected for p in t.processes] == []
    assert_nothing_left(backend)


def test_round_robin_rejects_bad_count(group: RuntimeGroup) -> None:
    with pytest.raises(ValueError, match="worker count 0"):
        RoundRobinLauncher(group).start(0, MASTER_PORT, PORTS)
    with pytest.raises(TypeError, match="worker count '2'"):
        RoundRobinLauncher(group).start("2", MASTER_PORT, PORTS)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="worker count True"):
        RoundRobinLauncher(group).start(True, MASTER_PORT, PORTS)


def test_interrupted_start_cleans_up(
    backend: HostsBackend, group: RuntimeGroup, tmp_path: Path
) -> None:
    # The worker of host-1 hangs on import, so start() waits for its registration
    # until the timer delivers a KeyboardInterrupt as Ctrl-C would.
    python_path = broken_distributed(tmp_path, "import time\ntime.sleep(600)\n")
    group.get_runtime("host-1").add_env_variables({"PYTHONPATH": python_path})
    cluster = DaskCluster(group, ports=PORTS)
    timer = threading.Timer(3.0, _thread.interrupt_main)

    timer.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            cluster.start(worker_count=2, master_port=MASTER_PORT)
    finally:
        timer.cancel()

    assert cluster.master_port is None
    assert_nothing_left(backend)


def test_start_twice_keeps_running_cluster(backend: HostsBackend, group: RuntimeGroup) -> None:
    with DaskCluster(group, ports=PORTS) as cluster:
        with pytest.raises(LazyclusterError, match="already started") as raised:
            cluster.start()
        assert "call start() with your arguments before the block" in str(raised.value)

        assert cluster.master_port is not None
        assert len(cluster.get_client().scheduler_info(n_workers=-1)["workers"]) == 2


def listening_addresses_of(pid: int) -> list[str]:
    """Return the local address:port of every listening TCP socket of process `pid`."""
    rows = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, check=True).stdout
    return [row.split()[3] for row in rows.splitlines() if f"pid={pid}," in row]


def test_scheduler_without_dashboard_listens_on_loopback(
    backend: HostsBackend, group: RuntimeGroup
) -> None:
    launcher = LocalMasterLauncher(group)
    with contextlib.ExitStack() as taken:
        for port in DASHBOARD_PORTS:
            with contextlib.suppress(OSError):  # a port in use elsewhere is just as taken
                taken.enter_context(take_port(port))

        launcher.start(MASTER_PORT, timeout=30)
    try:
        assert launcher.dashboard_port is None
        addresses = listening_addresses_of(launcher.process.pid)  # type: ignore[union-attr]
        assert f"127.0.0.1:{MASTER_PORT}" in addresses
        assert [a for a in addresses if not a.startswith("127.0.0.1:")] == []
    finally:
        launcher.cleanup()


def test_scheduler_with_dashboard_listens_on_loopback(
    backend: HostsBackend, group: RuntimeGroup
) -> None:
    with DaskCluster(group, ports=PORTS) as cluster:
        link = cluster.dashboard_link
        assert link is not None and link.startswith("http://127.0.0.1:")
        addresses = listening_addresses_of(cluster._master_launcher.process.pid)  # type: ignore[union-attr]
        assert link.removeprefix("http://").removesuffix("/status") in addresses
        assert [a for a in addresses if not a.startswith("127.0.0.1:")] == []


def test_port_taken_during_scheduler_start_uses_next(
    backend: HostsBackend, group: RuntimeGroup
) -> None:
    launcher = LocalMasterLauncher(group)
    taken: list[socket.socket] = []

    def take_port_once_scheduler_runs() -> None:
        # The scheduler needs about a second to import distributed, so the port
        # is taken after the launcher checked it and before the scheduler binds it.
        deadline = time.monotonic() + 30
        while not backend.manager.processes and time.monotonic() < deadline:
            time.sleep(0.01)
        taken.append(take_port(PORTS[0]))

    racer = threading.Thread(target=take_port_once_scheduler_runs)
    racer.start()
    try:
        remaining = launcher.start(PORTS[:4], timeout=30)

        assert launcher.port == PORTS[1]
        assert remaining == PORTS[2:4]
    finally:
        racer.join()
        launcher.cleanup()
        for sock in taken:
            sock.close()
