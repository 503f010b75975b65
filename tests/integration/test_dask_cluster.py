"""DaskCluster on real SSH hosts in Docker: start, compute, every start error, clean hosts after.

The scheduler runs on this machine; the workers run in the containers and reach
the scheduler and each other only through SSH tunnels.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lazycluster.cluster import MasterStartError, WorkerStartError
from lazycluster.cluster.dask_cluster import DaskCluster
from lazycluster.exceptions import NoPortsLeftError, PortInUseError
from lazycluster.group import RuntimeGroup
from lazycluster.transport.local import LocalTransport
from tests.port_blocks import reserve_port_block

# Ports of these tests: below the ephemeral range (32768 on Linux), so no client
# connection on the manager takes one, and away from Dask's defaults. Each
# test that blocks ports on a host has ports of its own, because a port that a
# worker closed a moment ago may sit in TIME_WAIT there, where the blocker
# (without SO_REUSEADDR) cannot bind it.
BLOCK = reserve_port_block(100, 29400, 31400)
MASTER_PORT = BLOCK[0]
BLOCKED_MASTER_PORT = BLOCK[1]
PORTS = BLOCK[10:50]
FALLBACK_PORTS = BLOCK[50:60]
SHORT_PORTS = BLOCK[60:63]
KILLED_MANAGER_MASTER_PORT = BLOCK[63]
KILLED_MANAGER_PORTS = BLOCK[64:84]
RACE_PORTS = BLOCK[85:95]

# The temporary directories the library creates on hosts (host_commands.TEMP_DIR_PREFIX).
TEMP_PATTERN = "lazycluster-*"

REPO_ROOT = Path(__file__).resolve().parents[2]


def worker_hosts(cluster: DaskCluster) -> Counter[str]:
    return Counter(
        {host: len(ports) for host, ports in cluster._worker_launcher.ports_per_host.items()}
    )


def registered_workers(cluster: DaskCluster) -> dict[str, Any]:
    client = cluster.get_client(timeout=10)
    return client.scheduler_info(n_workers=-1)["workers"]


def worker_ports_running_on(host: Any) -> list[int]:
    """Return the ports of the Dask worker processes that run in a container, from `ps`."""
    processes = host.exec(["ps", "-eo", "args="]).check().stdout.splitlines()
    ports = []
    for args in processes:
        parts = args.split()
        # Only the interpreter itself; the wrapper shell of the transport names the command too.
        if parts[1:3] == ["-m", "distributed.cli.dask_worker"] and "--listen-address" in parts:
            ports.append(int(parts[parts.index("--listen-address") + 1].rsplit(":", 1)[1]))
    return sorted(ports)


@pytest.fixture
def group(ssh_backend: Any, ssh_hosts: Any) -> Iterator[RuntimeGroup]:
    """A RuntimeGroup of the 3 Docker hosts; asserts afterwards that no host keeps anything."""
    runtime_group = RuntimeGroup(hosts=ssh_hosts.aliases)
    try:
        yield runtime_group
    finally:
        runtime_group.cleanup()
        for host in ssh_hosts:
            host.release_ports()
            host.clear_slow_start()
    for host in ssh_hosts:
        leftovers = host.leftovers(temp_pattern=TEMP_PATTERN)
        assert leftovers.is_clean, str(leftovers)


def listening_addresses(ss_output: str) -> list[str]:
    """Return the local address:port of every listening socket in `ss -ltnH` output."""
    return [line.split()[3] for line in ss_output.splitlines() if line.strip()]


def assert_loopback_only(cluster: DaskCluster, ssh_hosts: Any) -> None:
    """Check that nothing the cluster started listens beyond loopback, on the hosts or here."""
    for host in ssh_hosts:
        addresses = listening_addresses(host.exec(["ss", "-ltnH"]).check().stdout)
        exposed = [a for a in addresses if not a.startswith("127.0.0.1:") and not a.endswith(":22")]
        assert exposed == [], f"host {host.alias} listens beyond loopback on {exposed}"

    scheduler_pid = cluster._master_launcher.process.pid
    rows = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, check=True).stdout
    scheduler_rows = [row for row in rows.splitlines() if f"pid={scheduler_pid}," in row]
    assert scheduler_rows, "the scheduler process listens nowhere"
    for address in listening_addresses("\n".join(scheduler_rows)):
        assert address.startswith("127.0.0.1:"), f"the scheduler listens on {address}"


def assert_manager_ports_free(ports: list[int]) -> None:
    assert LocalTransport().ports_in_use(ports) == set()


def test_default_start_one_worker_per_host(group: RuntimeGroup, ssh_hosts: Any) -> None:
    cluster = DaskCluster(group)

    cluster.start()
    try:
        assert worker_hosts(cluster) == Counter({alias: 1 for alias in ssh_hosts.aliases})
        assert len(registered_workers(cluster)) == 3
        assert cluster.dashboard_link is not None
        assert_loopback_only(cluster, ssh_hosts)
        master_port = cluster.master_port
        worker_ports = [
            p for ports in cluster._worker_launcher.ports_per_host.values() for p in ports
        ]
        assert master_port not in worker_ports
        assert all(port in range(60001, 60200) for port in worker_ports)
    finally:
        cluster.cleanup()

    assert_manager_ports_free([master_port, *worker_ports])
    cluster.cleanup()


@pytest.mark.parametrize("worker_count", [2, 3, 5])
def test_worker_counts_round_robin(group: RuntimeGroup, ssh_hosts: Any, worker_count: int) -> None:
    cluster = DaskCluster(group, ports=PORTS)
    cluster.start(worker_count=worker_count, master_port=MASTER_PORT)
    try:
        counts = worker_hosts(cluster)
        assert sum(counts.values()) == worker_count
        assert max(counts.values()) - min(counts.values()) <= 1
        assert len(counts) == min(worker_count, 3)

        workers = registered_workers(cluster)
        listening = sorted(int(address.rsplit(":", 1)[1]) for address in workers)
        assert listening == PORTS[:worker_count]
        runtimes = group.runtimes
        for worker in cluster._worker_launcher.workers:
            assert worker.host == runtimes[worker.index % len(runtimes)].host
        for host, ports in cluster._worker_launcher.ports_per_host.items():
            assert worker_ports_running_on(ssh_hosts.host(host)) == sorted(ports)
    finally:
        cluster.cleanup()

    assert_manager_ports_free([MASTER_PORT, *PORTS[:worker_count]])


def test_rechunk_moves_data_between_workers(group: RuntimeGroup) -> None:
    import dask.array as da
    from distributed import get_task_stream

    with DaskCluster(group, ports=PORTS) as cluster:
        client = cluster.get_client(timeout=10)
        matrix = da.arange(400 * 400, chunks=400 * 40).reshape((400, 400)).rechunk((40, 400))
        transposed = matrix.rechunk((400, 40))

        with get_task_stream(client) as stream:
            total = transposed.sum().compute()

        assert total == (400 * 400 - 1) * 400 * 400 // 2
        transfers = [
            part
            for record in stream.data
            for part in record["startstops"]
            if part["action"] == "transfer"
        ]
        assert transfers, "no task fetched data from another worker"
        ran_on = {record["worker"] for record in stream.data}
        assert len(ran_on) == 3


def test_dropped_connection_mid_computation(group: RuntimeGroup, ssh_hosts: Any) -> None:
    # A host whose SSH connection drops takes its workers with it: their
    # tunnels to the scheduler close, and they shut down. Dask reruns their
    # tasks on the others, and cleanup() reconnects to clean the host.
    dropped = ssh_hosts[1]

    # Nested, so that it travels by value: the hosts cannot import this module.
    def slow_negate(value: int) -> int:
        import time

        time.sleep(0.05)
        return -value

    cluster = DaskCluster(group, ports=PORTS)
    cluster.start(worker_count=6)
    client = cluster.get_client(timeout=10)
    futures = client.map(slow_negate, range(200), pure=False)
    total = client.submit(sum, futures, pure=False)
    deadline = time.monotonic() + 30
    while sum(future.done() for future in futures) < 20 and time.monotonic() < deadline:
        time.sleep(0.02)

    # The sshd processes of a session end the connection when killed, as a
    # cut network or a restarted sshd would.
    sessions = [
        int(line.split()[0])
        for line in dropped.exec(["ps", "-eo", "pid=,args="]).check().stdout.splitlines()
        if line.split(None, 1)[1].startswith(f"sshd: {dropped.user}")
    ]
    assert sessions, "no SSH session on the host"
    assert not total.done(), "the computation ended before the connection dropped"
    for pid in sessions:
        dropped.kill_process(pid)

    assert total.result(timeout=120) == -sum(range(200))
    deadline = time.monotonic() + 30
    while len(registered_workers(cluster)) > 4 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert len(registered_workers(cluster)) == 4

    started = time.monotonic()
    cluster.cleanup()
    assert time.monotonic() - started < 30
    assert_manager_ports_free(PORTS)


def test_word_count_over_all_workers(group: RuntimeGroup) -> None:
    import dask.bag as db

    lines = [f"alpha beta {'gamma ' * (i % 3)}".strip() for i in range(300)]
    with DaskCluster(group, ports=PORTS) as cluster:
        cluster.start_workers(3)
        client = cluster.get_client(timeout=10)
        counts = dict(
            db.from_sequence(lines, npartitions=12)
            .map(str.split)
            .flatten()
            .frequencies()
            .compute(scheduler=client.get)
        )

    assert counts == {"alpha": 300, "beta": 300, "gamma": 300}


def test_master_port_taken_on_host_raises(group: RuntimeGroup, ssh_hosts: Any) -> None:
    master_port = BLOCKED_MASTER_PORT
    blocked = ssh_hosts[1]
    blocked.occupy_port(master_port)
    cluster = DaskCluster(group, ports=PORTS)

    with pytest.raises(PortInUseError, match=blocked.alias) as raised:
        cluster.start(master_port=master_port)

    assert raised.value.port == master_port
    assert cluster.master_port is None
    assert_manager_ports_free([master_port, *PORTS])


def test_default_master_port_taken_uses_list(group: RuntimeGroup, ssh_hosts: Any) -> None:
    ports = FALLBACK_PORTS
    blocked = ssh_hosts[0]
    blocked.occupy_port(DaskCluster.DEFAULT_MASTER_PORT)
    blocked.occupy_port(ports[0])

    with DaskCluster(group, ports=ports) as cluster:
        assert cluster.master_port == ports[1]
        worker_ports = sorted(
            p for ports in cluster._worker_launcher.ports_per_host.values() for p in ports
        )
        assert worker_ports == ports[2:5]
        assert cluster.ports == ports[5:]


def test_exhausted_port_list_raises_before_workers(group: RuntimeGroup, ssh_hosts: Any) -> None:
    ports = SHORT_PORTS
    ssh_hosts[2].occupy_port(ports[1])
    cluster = DaskCluster(group, ports=ports)

    with pytest.raises(NoPortsLeftError, match="Only 2 of the 3 ports"):
        cluster.start(worker_count=3, master_port=MASTER_PORT)

    assert cluster.master_port is None
    assert_manager_ports_free([MASTER_PORT, *ports])


def test_scheduler_that_does_not_listen_in_time(group: RuntimeGroup) -> None:
    cluster = DaskCluster(group, ports=PORTS)
    cluster.master_start_timeout = 0.05

    started = time.monotonic()
    with pytest.raises(MasterStartError, match="did not listen within 0.05 s"):
        cluster.start(master_port=MASTER_PORT)

    assert time.monotonic() - started < 10
    assert_manager_ports_free([MASTER_PORT])


def test_slow_worker_fails_with_host_port_and_log(group: RuntimeGroup, ssh_hosts: Any) -> None:
    slow = ssh_hosts[2]
    slow.set_slow_start("python3 -m distributed.cli.dask_worker *", 120)
    cluster = DaskCluster(group, ports=PORTS)
    cluster.worker_start_timeout = 8

    started = time.monotonic()
    with pytest.raises(WorkerStartError, match="did not register") as raised:
        cluster.start(master_port=MASTER_PORT)

    assert time.monotonic() - started < 60
    assert raised.value.hosts == [slow.alias]
    assert raised.value.ports == [PORTS[2]]
    assert_manager_ports_free([MASTER_PORT, *PORTS[:3]])


def test_worker_port_taken_before_bind_moves_worker(group: RuntimeGroup, ssh_hosts: Any) -> None:
    racing = ssh_hosts[0]
    racing.set_slow_start("python3 -m distributed.cli.dask_worker *", 5)
    cluster = DaskCluster(group, ports=RACE_PORTS)
    cluster.start_master(MASTER_PORT, timeout=30)
    errors: list[BaseException] = []

    def start_workers() -> None:
        try:
            cluster.start_workers(3)
        except BaseException as error:
            errors.append(error)

    starter = threading.Thread(target=start_workers)
    starter.start()
    try:
        # Worker 0 is listed once its tunnels are open and its process runs,
        # which waits 5 s before it binds: take its port on its host now.
        deadline = time.monotonic() + 30
        while not any(w.index == 0 for w in cluster.workers) and time.monotonic() < deadline:
            time.sleep(0.05)
        first = cluster.workers[0]
        assert (first.index, first.host, first.port) == (0, racing.alias, RACE_PORTS[0])
        racing.occupy_port(first.port, "127.0.0.1")
    finally:
        starter.join(timeout=120)

    try:
        assert not starter.is_alive()
        assert errors == []
        assert [worker.port for worker in cluster.workers] == [
            RACE_PORTS[3],
            RACE_PORTS[1],
            RACE_PORTS[2],
        ]
        assert cluster.ports == RACE_PORTS[4:]
        assert worker_ports_running_on(racing) == [RACE_PORTS[3]]
        assert len(registered_workers(cluster)) == 3
    finally:
        cluster.cleanup()
    assert_manager_ports_free([MASTER_PORT, *RACE_PORTS])


def test_with_block_cleans_up_after_error(group: RuntimeGroup) -> None:
    with pytest.raises(ZeroDivisionError):
        with DaskCluster(group, ports=PORTS) as cluster:
            assert len(registered_workers(cluster)) == 3
            1 / 0  # noqa: B018

    assert cluster.master_port is None
    assert_manager_ports_free([*PORTS[:4]])


MANAGER_SCRIPT = """
import sys
from lazycluster.cluster.dask_cluster import DaskCluster
from lazycluster.group import RuntimeGroup

master_port, first_port, last_port, *hosts = sys.argv[1:]
ports = list(range(int(first_port), int(last_port) + 1))
cluster = DaskCluster(RuntimeGroup(hosts=hosts), ports=ports)
cluster.start(master_port=int(master_port))
print("ready", cluster._master_launcher.process.pid, flush=True)
sys.stdin.read()
"""


def process_running(pid: int) -> bool:
    """Return whether `pid` exists and is not a zombie waiting for its parent."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_workers_exit_after_manager_is_killed(ssh_backend: Any, ssh_hosts: Any) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    manager = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(MANAGER_SCRIPT),
            str(KILLED_MANAGER_MASTER_PORT),
            str(KILLED_MANAGER_PORTS[0]),
            str(KILLED_MANAGER_PORTS[-1]),
            *ssh_hosts.aliases,
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=env,
        start_new_session=True,
    )
    try:
        assert manager.stdout is not None
        word, scheduler_pid = manager.stdout.readline().split()
        assert word == b"ready"
        os.killpg(manager.pid, signal.SIGKILL)
        manager.wait(timeout=10)

        # The scheduler runs in a session of its own, so the kill did not reach it.
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and process_running(int(scheduler_pid)):
            time.sleep(0.5)
        assert not process_running(int(scheduler_pid)), "the scheduler outlived the manager"

        deadline = time.monotonic() + 90
        leftovers = [host.leftovers(temp_pattern="no-such-path") for host in ssh_hosts]
        while time.monotonic() < deadline and not all(item.is_clean for item in leftovers):
            time.sleep(1)
            leftovers = [host.leftovers(temp_pattern="no-such-path") for host in ssh_hosts]
        assert all(item.is_clean for item in leftovers), "\n".join(map(str, leftovers))
    finally:
        if manager.poll() is None:
            os.killpg(manager.pid, signal.SIGKILL)
            manager.wait(timeout=10)
        # The killed manager could not remove its temporary directories.
        for host in ssh_hosts:
            host.exec(["sh", "-c", "rm -rf /tmp/lazycluster-*"])


def test_version_mismatch_on_real_host(make_ssh_hosts: Any) -> None:
    from lazycluster.exceptions import VersionMismatchError
    from lazycluster.transport import use_backend
    from lazycluster.transport.ssh import SSHBackend

    hosts = make_ssh_hosts(1)
    host = hosts[0]
    # Hide the package metadata of distributed, as an install of another version would change it.
    locate = "import importlib.metadata as m; print(m.distribution('distributed')._path)"
    dist_info = host.exec(["/usr/bin/python3", "-c", locate]).check().stdout.strip()
    host.exec(["mv", dist_info, dist_info + ".hidden"]).check()

    backend = SSHBackend(ssh_config_path=str(hosts.ssh_config_path))
    with use_backend(backend):
        group = RuntimeGroup(hosts=hosts.aliases)
        try:
            with pytest.raises(
                VersionMismatchError, match=f"'{host.alias}' has no installed version"
            ) as raised:
                DaskCluster(group, ports=PORTS).start(master_port=MASTER_PORT)
        finally:
            group.cleanup()
            backend.close()

    # The hint logs in with the same SSH config, which `ssh` alone would not read.
    login = f"ssh -F {hosts.ssh_config_path} {host.alias}"
    assert f"`{login} python3 -m pip install distributed==" in str(raised.value)
    assert host.leftovers(temp_pattern=TEMP_PATTERN).is_clean
    assert_manager_ports_free([MASTER_PORT, *PORTS[:1]])
