"""The Docker SSH test hosts: image, SSH files, logins, fault injection, leftovers, cleanup.

Logins use paramiko (and the OpenSSH client where installed) with nothing but
the generated ssh_config, as a user of the hosts would.
"""

from __future__ import annotations

import importlib.metadata
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import paramiko
import pytest

from containers import cleanup
from containers.build import build_image
from containers.hosts import DockerHost, HostGroup, start_hosts

REPO_ROOT = Path(__file__).resolve().parents[2]
VERSION_COMMAND = 'python3 -c "import distributed; print(distributed.__version__)"'


def login(group: HostGroup, alias: str, user: str | None = None, timeout: float = 10.0) -> paramiko.SSHClient:
    """Log in to `alias` using only the settings of the group's ssh_config."""
    config = paramiko.SSHConfig.from_path(str(group.ssh_config_path)).lookup(alias)
    assert config["stricthostkeychecking"] == "yes"
    client = paramiko.SSHClient()
    client.load_host_keys(config["userknownhostsfile"])
    client.set_missing_host_key_policy(paramiko.RejectPolicy())
    client.connect(
        config["hostname"],
        port=int(config["port"]),
        username=user or config["user"],
        key_filename=config["identityfile"],
        look_for_keys=False,
        allow_agent=False,
        timeout=timeout,
        banner_timeout=timeout,
        auth_timeout=timeout,
    )
    return client


def run(client: paramiko.SSHClient, command: str, timeout: float = 60.0) -> tuple[int, str, str]:
    _stdin, stdout, stderr = client.exec_command(command, timeout=timeout)
    out = stdout.read().decode()
    err = stderr.read().decode()
    return stdout.channel.recv_exit_status(), out, err


def run_labelled(label: str) -> list[object]:
    # Imported here so that `-m "not docker"` collects this file without the Docker SDK.
    import docker

    # sparse: without it the SDK inspects each listed container, which fails
    # with NotFound when the harness removes one between the list and the inspect.
    return docker.from_env().containers.list(all=True, sparse=True, filters={"label": label})


# Image and start-up.


def test_second_build_is_fast_noop(ssh_hosts: HostGroup) -> None:
    first_tag = build_image()
    started = time.monotonic()
    second_tag = build_image()
    elapsed = time.monotonic() - started

    assert second_tag == first_tag
    assert elapsed < 10, f"second build took {elapsed:.1f} s"


def test_temporary_workdir_removed_on_close(ssh_hosts: HostGroup) -> None:
    group = start_hosts(1, image=build_image())
    key_path = group.key_path
    assert key_path.exists()

    group.close()

    assert not group.workdir.exists(), "the private key of the hosts outlived close()"


def test_hosts_run_manager_versions(ssh_hosts: HostGroup) -> None:
    expected = importlib.metadata.version("distributed")
    assert len(ssh_hosts.hosts) == 3

    for alias in ssh_hosts.aliases:
        client = login(ssh_hosts, alias)
        try:
            exit_code, out, err = run(client, VERSION_COMMAND)
            assert exit_code == 0, err
            assert out.strip() == expected

            packages = "dask cloudpickle numpy".split()
            script = f"import importlib.metadata as m; print(*[m.version(p) for p in {packages!r}])"
            exit_code, out, err = run(client, f"python3 -c {script!r}")
            assert exit_code == 0, err
            assert out.split() == [importlib.metadata.version(p) for p in packages]
        finally:
            client.close()


def test_dask_array_runs_on_host(ssh_hosts: HostGroup) -> None:
    client = login(ssh_hosts, ssh_hosts.aliases[0])
    try:
        exit_code, out, err = run(
            client, "python3 -c 'import dask.array as da; print(int(da.ones((100, 100), chunks=10).sum().compute()))'"
        )
    finally:
        client.close()

    assert exit_code == 0, err
    assert out.strip() == "10000"


def test_ports_published_on_loopback_only(ssh_hosts: HostGroup) -> None:
    for host in ssh_hosts:
        host.container.reload()
        bindings = host.container.attrs["NetworkSettings"]["Ports"]
        published = [binding for values in bindings.values() if values for binding in values]

        assert published == [{"HostIp": "127.0.0.1", "HostPort": str(host.port)}]


def test_ssh_config_has_one_block_per_host(ssh_hosts: HostGroup) -> None:
    config = paramiko.SSHConfig.from_path(str(ssh_hosts.ssh_config_path))

    assert sorted(config.get_hostnames() - {"*"}) == sorted(ssh_hosts.aliases)
    for host in ssh_hosts:
        entry = config.lookup(host.alias)
        assert entry["hostname"] == "127.0.0.1"
        assert int(entry["port"]) == host.port
        assert entry["user"] == "lazy"
        assert entry["identitiesonly"] == "yes"
        assert entry["identityfile"] == [str(ssh_hosts.key_path)]
        assert entry["userknownhostsfile"] == str(ssh_hosts.known_hosts_path)


def test_key_file_is_private(ssh_hosts: HostGroup) -> None:
    assert ssh_hosts.key_path.stat().st_mode & 0o077 == 0


def test_openssh_client_logs_in_with_config(ssh_hosts: HostGroup) -> None:
    if not os.path.exists("/usr/bin/ssh"):
        pytest.skip("the OpenSSH client is not installed on this machine")
    alias = ssh_hosts.aliases[1]

    result = subprocess.run(
        ["ssh", "-F", str(ssh_hosts.ssh_config_path), "-o", "BatchMode=yes", alias, VERSION_COMMAND],
        capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL, check=False,
    )

    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == importlib.metadata.version("distributed")


def test_root_login_by_key(ssh_hosts: HostGroup) -> None:
    client = login(ssh_hosts, ssh_hosts.aliases[0], user="root")
    try:
        exit_code, out, _err = run(client, "id -u")
    finally:
        client.close()

    assert exit_code == 0
    assert out.strip() == "0"


def test_wrong_host_key_is_rejected(ssh_hosts: HostGroup, tmp_path: Path) -> None:
    host = ssh_hosts[0]
    wrong_key = paramiko.RSAKey.generate(2048)
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text(f"[127.0.0.1]:{host.port} ssh-rsa {wrong_key.get_base64()}\n")

    client = paramiko.SSHClient()
    client.load_host_keys(str(known_hosts))
    client.set_missing_host_key_policy(paramiko.RejectPolicy())
    with pytest.raises(paramiko.BadHostKeyException):
        client.connect(
            "127.0.0.1", port=host.port, username="lazy", key_filename=str(ssh_hosts.key_path),
            look_for_keys=False, allow_agent=False, timeout=10,
            disabled_algorithms={"keys": ["ssh-ed25519", "ecdsa-sha2-nistp256"]},
        )
    client.close()


@pytest.mark.parametrize("user", ["lazy", "root"])
def test_password_and_foreign_key_rejected(ssh_hosts: HostGroup, user: str) -> None:
    host = ssh_hosts[0]
    client = paramiko.SSHClient()
    client.load_host_keys(str(ssh_hosts.known_hosts_path))
    client.set_missing_host_key_policy(paramiko.RejectPolicy())

    with pytest.raises(paramiko.AuthenticationException):
        client.connect("127.0.0.1", port=host.port, username=user, password="*",
                       look_for_keys=False, allow_agent=False, timeout=10)
    with pytest.raises(paramiko.AuthenticationException):
        client.connect("127.0.0.1", port=host.port, username=user, pkey=paramiko.RSAKey.generate(2048),
                       look_for_keys=False, allow_agent=False, timeout=10)
    client.close()


@pytest.mark.parametrize("count", [0, -1, True, "3", 1.5])
def test_start_hosts_rejects_bad_count(count: object) -> None:
    with pytest.raises(ValueError, match="host count"):
        start_hosts(count, image="unused")  # type: ignore[arg-type]


def test_start_hosts_rejects_unknown_user() -> None:
    with pytest.raises(ValueError, match="user"):
        start_hosts(1, image="unused", user="nobody")


def test_close_removes_group_containers(make_ssh_hosts) -> None:
    group = make_ssh_hosts(2, user="root")
    label = f"{cleanup.GROUP_LABEL}={group.group_id}"
    assert len(run_labelled(label)) == 2
    client = login(group, group.aliases[0])
    assert run(client, "id -u")[1].strip() == "0"
    client.close()

    group.close()
    group.close()

    assert run_labelled(label) == []


def test_ssh_backend_fixture_reaches_hosts(ssh_hosts: HostGroup, ssh_backend) -> None:
    from lazycluster.transport import get_backend

    assert get_backend() is ssh_backend
    assert os.environ["LAZYCLUSTER_SSH_CONFIG"] == str(ssh_hosts.ssh_config_path)
    assert sorted(ssh_backend.configured_hosts()) == sorted(ssh_hosts.aliases)

    for alias in ssh_hosts.aliases:
        transport = ssh_backend.connect(alias)
        try:
            result = transport.run(VERSION_COMMAND, timeout=60)
        finally:
            transport.close()
        assert result.exit_code == 0, result.stderr
        assert result.stdout.strip() == importlib.metadata.version("distributed")


# Fault injection on the shared hosts (each test undoes its fault).


def test_occupy_port_starts_real_listener(ssh_hosts: HostGroup) -> None:
    host = ssh_hosts[0]
    blocker = host.occupy_port(45123)
    try:
        assert host.occupied_ports() == [blocker]
        assert 45123 in _listening_ports(host)
        assert host.process_alive(blocker.pid)

        client = login(ssh_hosts, host.alias)
        try:
            channel = client.get_transport().open_channel("direct-tcpip", ("127.0.0.1", 45123), ("127.0.0.1", 0))
            channel.close()
        finally:
            client.close()

        with pytest.raises(OSError, match="45123"):
            host.occupy_port(45123)
        assert host.leftovers().is_clean, str(host.leftovers())
    finally:
        blocker.stop()

    assert host.occupied_ports() == []
    assert 45123 not in _listening_ports(host)
    assert not host.process_alive(blocker.pid)
    blocker.stop()


def test_occupy_port_on_loopback_only(ssh_hosts: HostGroup) -> None:
    host = ssh_hosts[1]
    host.occupy_port(45124, address="127.0.0.1")
    try:
        result = host.exec(["ss", "-H", "-l", "-t", "-n", "sport = :45124"]).check()
        assert "127.0.0.1:45124" in result.stdout
    finally:
        host.release_ports()
    assert host.occupied_ports() == []


@pytest.mark.parametrize("port", [0, 70000, -5, "80", True])
def test_occupy_port_rejects_bad_port(ssh_hosts: HostGroup, port: object) -> None:
    with pytest.raises(ValueError, match="port"):
        ssh_hosts[0].occupy_port(port)  # type: ignore[arg-type]


def test_kill_process_by_pid(ssh_hosts: HostGroup) -> None:
    host = ssh_hosts[2]
    client = login(ssh_hosts, host.alias)
    try:
        exit_code, out, _err = run(client, "nohup sleep 300 >/dev/null 2>&1 </dev/null & echo $!")
    finally:
        client.close()
    assert exit_code == 0
    pid = int(out.strip())
    assert host.process_alive(pid)
    assert pid in [process.pid for process in host.leftovers().processes]

    host.kill_process(pid, "KILL")

    assert not host.process_alive(pid)
    assert host.leftovers().is_clean, str(host.leftovers())
    with pytest.raises(ProcessLookupError, match=str(pid)):
        host.kill_process(pid, "TERM")


@pytest.mark.parametrize(("pid", "signal_name"), [(0, "KILL"), (1, "KILL"), (-3, "KILL"), (100, "KILL; true")])
def test_kill_process_rejects_bad_input(ssh_hosts: HostGroup, pid: int, signal_name: str) -> None:
    with pytest.raises(ValueError):
        ssh_hosts[0].kill_process(pid, signal_name)


def test_slow_start_delays_matching_command(ssh_hosts: HostGroup) -> None:
    host = ssh_hosts[1]
    client = login(ssh_hosts, host.alias)
    host.set_slow_start("python3 -c *slow-marker*", 3)
    try:
        started = time.monotonic()
        exit_code, out, _err = run(client, "python3 -c 'print(\"slow-marker\")'")
        slow = time.monotonic() - started

        started = time.monotonic()
        run(client, "python3 -c 'print(\"other\")'")
        other = time.monotonic() - started
    finally:
        host.clear_slow_start()

    try:
        started = time.monotonic()
        run(client, "python3 -c 'print(\"slow-marker\")'")
        cleared = time.monotonic() - started
    finally:
        client.close()

    assert exit_code == 0
    assert out.strip() == "slow-marker"
    # Margins leave room for a loaded machine: a plain python3 over SSH takes well under a second.
    assert slow >= 3.0
    assert other < 2.5
    assert cleared < 2.5


@pytest.mark.parametrize(
    ("pattern", "command"),
    [
        ("*distributed.cli.dask_worker*", "python3 -m distributed.cli.dask_worker --version"),
        ("dask *", "dask --version"),
    ],
)
def test_slow_start_of_dask_commands(ssh_hosts: HostGroup, pattern: str, command: str) -> None:
    host = ssh_hosts[0]
    client = login(ssh_hosts, host.alias)
    host.set_slow_start(pattern, 3)
    try:
        started = time.monotonic()
        exit_code, _out, err = run(client, command)
        elapsed = time.monotonic() - started
    finally:
        host.clear_slow_start()
        client.close()

    assert exit_code == 0, err
    assert elapsed >= 3.0


@pytest.mark.parametrize(("pattern", "delay"), [("", 1), ("a\nb", 1), ("x", -1), ("x", "1"), ("x", 99999)])
def test_slow_start_rejects_bad_rule(ssh_hosts: HostGroup, pattern: str, delay: object) -> None:
    with pytest.raises(ValueError, match="slow-start"):
        ssh_hosts[0].set_slow_start(pattern, delay)  # type: ignore[arg-type]


def test_leftovers_lists_process_port_and_temp_dir(ssh_hosts: HostGroup) -> None:
    host = ssh_hosts[2]
    assert host.leftovers().is_clean, str(host.leftovers())
    client = login(ssh_hosts, host.alias)
    listener = "import socket, time; s = socket.socket(); s.bind(('127.0.0.1', 45125)); s.listen(); time.sleep(300)"
    try:
        exit_code, out, _err = run(
            client,
            "mkdir /tmp/lazycluster-leftover-test && "
            f"(nohup python3 -c \"{listener}\" >/dev/null 2>&1 </dev/null & echo $!)",
        )
        assert exit_code == 0
        pid = int(out.strip())
        _wait_until(lambda: 45125 in _listening_ports(host))

        leftovers = host.leftovers()
        assert pid in [process.pid for process in leftovers.processes]
        assert leftovers.listening_ports == (45125,)
        assert leftovers.temp_paths == ("/tmp/lazycluster-leftover-test",)  # noqa: S108 - in the container
        assert host.leftovers(temp_pattern="other-*").temp_paths == ()
        assert not leftovers.is_clean
        assert "45125" in str(leftovers)
    finally:
        run(client, "rm -rf /tmp/lazycluster-leftover-test")
        client.close()
        if "pid" in locals():
            host.kill_process(pid, "KILL")

    assert host.leftovers().is_clean, str(host.leftovers())


# Faults that take a whole host down use private hosts.


def test_pause_and_unpause_host(make_ssh_hosts) -> None:
    group = make_ssh_hosts(1)
    host = group[0]

    host.pause()
    assert host.status() == "paused"
    with pytest.raises((paramiko.SSHException, OSError, EOFError)):
        login(group, host.alias, timeout=2).close()

    host.unpause()
    assert host.status() == "running"
    client = login(group, host.alias)
    assert run(client, "true")[0] == 0
    client.close()


def test_stop_host(make_ssh_hosts) -> None:
    group = make_ssh_hosts(1)
    host = group[0]

    host.stop(timeout=2)

    assert host.status() == "exited"
    with pytest.raises((paramiko.SSHException, OSError, EOFError)):
        login(group, host.alias, timeout=2).close()


def test_kill_host_cuts_open_connection(make_ssh_hosts) -> None:
    group = make_ssh_hosts(1)
    host = group[0]
    client = login(group, host.alias)

    host.kill()

    assert host.status() == "exited"
    with pytest.raises((paramiko.SSHException, OSError, EOFError)):
        run(client, "true", timeout=5)
    client.close()


def test_undo_faults_restores_host(make_ssh_hosts) -> None:
    group = make_ssh_hosts(1)
    host = group[0]
    blocker = host.occupy_port(45126)
    host.set_slow_start("*", 30)
    host.pause()

    undone = host.undo_faults()

    assert undone == ["pause", "occupied ports", "slow start"]
    assert host.status() == "running"
    assert host.occupied_ports() == []
    assert not host.process_alive(blocker.pid)
    assert host.exec(["test", "-e", "/etc/lazycluster-test/slow-start"]).exit_code == 1
    client = login(group, host.alias)
    started = time.monotonic()
    assert run(client, "python3 -c pass")[0] == 0
    assert time.monotonic() - started < 10
    client.close()
    assert host.undo_faults() == []


def test_remove_leftovers_cleans_host(make_ssh_hosts) -> None:
    group = make_ssh_hosts(1)
    host = group[0]
    client = login(group, host.alias)
    try:
        exit_code, out, _err = run(client, "mkdir /tmp/junk-dir && (nohup sleep 300 >/dev/null 2>&1 </dev/null & echo $!)")
    finally:
        client.close()
    assert exit_code == 0
    pid = int(out.strip())

    removed = host.remove_leftovers()

    assert pid in [process.pid for process in removed.processes]
    assert removed.temp_paths == ("/tmp/junk-dir",)  # noqa: S108 - in the container
    assert not host.process_alive(pid)
    assert host.leftovers().is_clean, str(host.leftovers())


_ISOLATION_TESTS = """
def test_fails_and_leaves_junk(ssh_hosts):
    host = ssh_hosts[0]
    host.exec(["mkdir", "/tmp/junk-of-failed-test"]).check()
    host.exec(["sh", "-c", "nohup sleep 300 >/dev/null 2>&1 </dev/null &"]).check()
    host.set_slow_start("*", 60)
    host.occupy_port(45127)
    assert False, "fails on purpose"


def test_next_test_finds_clean_hosts(ssh_hosts):
    for host in ssh_hosts:
        assert host.leftovers().is_clean, str(host.leftovers())
        assert host.occupied_ports() == []
        assert host.exec(["test", "-e", "/etc/lazycluster-test/slow-start"]).exit_code == 1
"""


def test_failed_test_does_not_spoil_next(tmp_path: Path) -> None:
    test_file = tmp_path / "test_isolation.py"
    test_file.write_text(_ISOLATION_TESTS)

    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "containers.fixtures", "-p", "no:cacheprovider", "-q", "-rA", str(test_file)],
        cwd=tmp_path, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
    )

    assert "FAILED test_isolation.py::test_fails_and_leaves_junk" in result.stdout, result.stdout
    assert "PASSED test_isolation.py::test_next_test_finds_clean_hosts" in result.stdout, result.stdout


# Cleanup on interrupt and signals.

# Both children reset SIGINT to KeyboardInterrupt, because a shell without job
# control starts background commands with SIGINT ignored.
_START_SCRIPT = """
import signal, sys
signal.signal(signal.SIGINT, signal.default_int_handler)
from containers.hosts import start_hosts
start_hosts(3, image=sys.argv[1], ready_timeout=120)
print("started", flush=True)
# Wait for the signal, so that a start that beats the signal still exits by it
# and atexit has to remove the containers.
import threading
threading.Event().wait()
"""


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_signal_during_start(ssh_hosts: HostGroup, signum: int) -> None:
    image = build_image()
    run_id = uuid.uuid4().hex
    label = f"{cleanup.RUN_LABEL}={run_id}"
    process = subprocess.Popen(
        [sys.executable, "-c", _START_SCRIPT, image],
        cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT), "LAZYCLUSTER_TEST_RUN_ID": run_id},
    )
    try:
        _wait_until(lambda: len(run_labelled(label)) >= 1, timeout=60)

        process.send_signal(signum)
        _stdout, stderr = process.communicate(timeout=120)
        assert process.returncode != 0, stderr
        assert run_labelled(label) == [], stderr
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        # After a failure, leave no containers of the child run behind.
        cleanup.remove_containers(run_id=run_id)


_PYTEST_SCRIPT = """
import signal, sys
signal.signal(signal.SIGINT, signal.default_int_handler)
import pytest
sys.exit(pytest.main(["-q", "-p", "no:cacheprovider", sys.argv[1]]))
"""


def test_pytest_interrupted_during_start(ssh_hosts: HostGroup) -> None:
    build_image()
    run_id = uuid.uuid4().hex
    label = f"{cleanup.RUN_LABEL}={run_id}"
    process = subprocess.Popen(
        # A test that runs at least 3 s, so the signal arrives before pytest ends.
        [sys.executable, "-c", _PYTEST_SCRIPT, "tests/integration/test_hosts.py::test_slow_start_delays_matching_command"],
        cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True,
        env={**os.environ, "LAZYCLUSTER_TEST_RUN_ID": run_id},
    )
    try:
        _wait_until(lambda: len(run_labelled(label)) >= 1, timeout=120)

        process.send_signal(signal.SIGINT)
        output, _ = process.communicate(timeout=120)
        assert "KeyboardInterrupt" in output, output
        assert process.returncode == 2, output
        assert run_labelled(label) == [], output
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        # After a failure, leave no containers of the child run behind.
        cleanup.remove_containers(run_id=run_id)


# Helpers.


def _listening_ports(host: DockerHost) -> list[int]:
    from containers.leftovers import list_listening_ports

    return list_listening_ports(host)


def _wait_until(condition, timeout: float = 30.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        time.sleep(0.1)
