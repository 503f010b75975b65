"""Runtime, RuntimeTask, RuntimeGroup and RuntimeManager on real SSH hosts in Docker.

These are the usage examples of lazycluster 0.2: run a command and a function,
send and get a file, expose ports both ways, broadcast to a group, preprocess
in parallel. After every test, no host may keep a process, a listening port or
a temporary directory of the library.
"""

from __future__ import annotations

import copy
import importlib.metadata
import os
import socket
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import cloudpickle
import pytest

from lazycluster import (
    InvalidRuntimeError,
    NoPortsLeftError,
    PortInUseError,
    Runtime,
    RuntimeGroup,
    RuntimeManager,
    RuntimeTask,
    TaskExecutionError,
)

cloudpickle.register_pickle_by_value(sys.modules[__name__])

# The temporary directories the library creates on hosts start with this name.
TEMP_PATTERN = "lazycluster-*"

# Ports of these tests: below the ephemeral range (32768 on Linux) and apart
# from the ports of the Dask cluster tests.
PORTS = list(range(29500, 29540))

# Reads one line from a TCP port on the host and prints it; run with `python3 -c`.
READ_PORT_SNIPPET = (
    "import socket, sys\n"
    "with socket.create_connection(('127.0.0.1', int(sys.argv[1])), timeout=10) as s:\n"
    "    s.sendall(b'ping')\n"
    "    print(s.recv(100).decode())\n"
)

# Serves one reply per connection on 127.0.0.1 of the host, until stopped.
SERVE_SNIPPET = (
    "import socket, sys\n"
    "server = socket.create_server(('127.0.0.1', int(sys.argv[1])))\n"
    "print('listening', flush=True)\n"
    "while True:\n"
    "    connection, _ = server.accept()\n"
    "    connection.recv(100)\n"
    "    connection.sendall(sys.argv[2].encode())\n"
    "    connection.close()\n"
)


@pytest.fixture(autouse=True)
def clean_hosts(ssh_backend: Any, ssh_hosts: Any, tmp_path: Any, monkeypatch: Any) -> Iterator[None]:
    """Write logs to tmp_path; afterwards assert that no host keeps anything of the library."""
    from lazycluster.environment import Environment

    monkeypatch.setattr(Environment, "main_directory", str(tmp_path / "main"))
    yield
    from lazycluster.runtime import _cleanup_live_runtimes

    # Runtimes a failing test did not clean up would otherwise show as leftovers of the next test.
    _cleanup_live_runtimes()
    for host in ssh_hosts:
        host.release_ports()
    for host in ssh_hosts:
        leftovers = host.leftovers(temp_pattern=TEMP_PATTERN)
        assert leftovers.is_clean, str(leftovers)


@pytest.fixture
def alias(ssh_hosts: Any) -> str:
    return str(ssh_hosts.aliases[0])


class ManagerServer:
    """A TCP server on the manager's 127.0.0.1 that sends `reply` on every connection."""

    def __init__(self, reply: bytes) -> None:
        self.reply = reply
        self.socket = socket.create_server(("127.0.0.1", 0))
        self.port = self.socket.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                connection, _ = self.socket.accept()
            except OSError:
                return
            with connection:
                connection.recv(100)
                connection.sendall(self.reply)


def request(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as connection:
        connection.sendall(b"ping")
        return connection.recv(100)


def hello(name: str) -> str:
    return f"Hello {name} from {socket.gethostname()}"


# --- one runtime ---------------------------------------------------------------------


def test_command_and_function(alias: str) -> None:
    with Runtime(alias) as runtime:
        task = RuntimeTask("hello").run_command("echo Hello from $(hostname)").run_function(hello, name="World")
        runtime.execute_task(task, execute_async=False)
        hostname = runtime.echo("$(hostname)")
        assert hostname == "$(hostname)"
        host_name = task.execution_log[0].splitlines()[-1].split()[-1]
        assert task.execution_log[0].splitlines()[-1] == f"Hello from {host_name}"
        assert list(task.function_returns) == [f"Hello World from {host_name}"]
        assert os.path.isfile(task.execution_log_file_path)


def test_host_info(alias: str) -> None:
    with Runtime(alias) as runtime:
        assert runtime.os.startswith("Linux")
        assert runtime.cpu_cores >= 1
        assert runtime.memory_in_mb > 0
        assert runtime.python_version.startswith("3.")
        assert runtime.gpus == []
        # The image installs the manager's wheels, so the versions agree.
        assert runtime.distributed_version == importlib.metadata.version("distributed")


def test_function_error_brings_traceback(alias: str) -> None:
    def divide(a: int, b: int) -> float:
        return a / b

    with Runtime(alias) as runtime:
        task = RuntimeTask().run_function(divide, a=1, b=0)
        with pytest.raises(TaskExecutionError) as caught:
            runtime.execute_task(task, execute_async=False)
        assert "ZeroDivisionError" in caught.value.output
        assert "divide" in caught.value.output
        assert isinstance(caught.value.__cause__, ZeroDivisionError)


def test_send_and_get_file(alias: str, tmp_path: Any) -> None:
    source = tmp_path / "numbers.txt"
    source.write_text("".join(f"{number}\n" for number in range(100)))
    with Runtime(alias) as runtime:
        task = (
            RuntimeTask("files")
            .send_file(str(source))
            .run_command("wc -l < numbers.txt > count.txt")
            .get_file("count.txt", str(tmp_path / "count.txt"))
        )
        runtime.execute_task(task, execute_async=False)
        runtime.get_file("numbers.txt", str(tmp_path / "back" / "numbers.txt"))
    assert (tmp_path / "count.txt").read_text().strip() == "100"
    assert (tmp_path / "back" / "numbers.txt").read_text() == source.read_text()


def test_given_working_dir_kept(alias: str, ssh_hosts: Any) -> None:
    path = "/tmp/lazycluster-kept-by-test"  # noqa: S108 - path inside the container
    with Runtime(alias, working_dir=path) as runtime:
        runtime.execute_task(RuntimeTask().run_command("touch marker"), execute_async=False)
    host = ssh_hosts.host(alias)
    assert host.exec(["test", "-f", f"{path}/marker"]).exit_code == 0
    host.exec(["rm", "-rf", path]).check()


def test_env_values_kept_verbatim(alias: str) -> None:
    tricky = "it's \"quoted\" $HOME `id`; echo x\nsecond line \\ end"
    with Runtime(alias) as runtime:
        runtime.add_env_variables({"TRICKY": tricky})
        task = RuntimeTask().run_function(lambda: os.environ["TRICKY"]).run_command('printf "%s" "$TRICKY"')
        runtime.execute_task(task, execute_async=False)
        assert list(task.function_returns) == [tricky]
        assert task.execution_log[1].endswith(tricky)


def test_unknown_host_invalid(ssh_backend: Any) -> None:
    with pytest.raises(InvalidRuntimeError, match="no-such-host"):
        Runtime("no-such-host.invalid")


def test_expose_port_to_runtime(alias: str) -> None:
    server = ManagerServer(b"from-manager")
    with Runtime(alias) as runtime:
        runtime_port = runtime.get_free_port(PORTS)
        key = runtime.expose_port_to_runtime(server.port, runtime_port)
        task = RuntimeTask().run_command(f"python3 -c \"$SNIPPET\" {runtime_port}")
        task.env_variables = {"SNIPPET": READ_PORT_SNIPPET}
        runtime.execute_task(task, execute_async=False)
        assert task.execution_log[0].splitlines()[-1] == "from-manager"
        with pytest.raises(PortInUseError):
            runtime.expose_port_to_runtime(server.port, runtime_port)
        runtime.stop_process(key)
        assert runtime.has_free_port(runtime_port)
    server.socket.close()


def test_expose_port_from_runtime(alias: str) -> None:
    with Runtime(alias) as runtime:
        runtime_port = runtime.get_free_port(PORTS)
        server = runtime.transport.start_process(["python3", "-c", SERVE_SNIPPET, str(runtime_port), "from-host"])
        assert runtime.transport.clock.wait_until(lambda: not runtime.has_free_port(runtime_port), 10)
        runtime.expose_port_from_runtime(runtime_port, PORTS[-1])
        assert request(PORTS[-1]) == b"from-host"
        server.stop()


def test_async_task_stopped_by_cleanup(alias: str, ssh_hosts: Any) -> None:
    host = ssh_hosts.host(alias)
    runtime = Runtime(alias)
    task = runtime.execute_task(RuntimeTask("forever").run_command("sleep 600"), omit_on_join=True)
    assert runtime.transport.clock.wait_until(
        lambda: "sleep 600" in host.exec(["ps", "-eo", "args="]).stdout, 10
    )
    assert runtime.alive_task_process_count == 1
    runtime.join()
    runtime.cleanup()
    with pytest.raises(TaskExecutionError):
        task.join()
    assert "sleep 600" not in host.exec(["ps", "-eo", "args="]).stdout


def test_busy_port(alias: str, ssh_hosts: Any) -> None:
    # Ports of their own: a port that an earlier test served may linger in TIME_WAIT.
    busy, free = 29590, 29591
    ssh_hosts.host(alias).occupy_port(busy)
    with Runtime(alias) as runtime:
        assert not runtime.has_free_port(busy)
        assert runtime.get_free_port([busy, free]) == free
        with pytest.raises(NoPortsLeftError):
            runtime.get_free_port([busy])


# --- groups -----------------------------------------------------------------------------


def test_group_broadcast(ssh_hosts: Any) -> None:
    with RuntimeGroup(hosts=ssh_hosts.aliases) as group:
        task = RuntimeTask("where").run_function(socket.gethostname)
        tasks = group.execute_task(task, broadcast=True)
        group.join()
        names = list(group.function_returns)
        assert len(tasks) == len(ssh_hosts)
        assert len(set(names)) == len(ssh_hosts)


def test_group_runs_hosts_in_parallel(ssh_hosts: Any) -> None:
    with RuntimeGroup(hosts=ssh_hosts.aliases) as group:
        group.execute_task(RuntimeTask().run_command("true"), broadcast=True, execute_async=False)
        started = time.monotonic()
        group.execute_task(RuntimeTask().run_command("sleep 2"), broadcast=True, execute_async=False)
        elapsed = time.monotonic() - started
    # One after another would take 2 s per host; in parallel about 2 s in all.
    assert elapsed < 2 * len(ssh_hosts) - 1.5, elapsed


def test_preprocessing_in_parallel(ssh_hosts: Any) -> None:
    def preprocess(index: int, total: int) -> tuple[int, int]:
        return index, sum(range(index, 1000, total))

    with RuntimeGroup(hosts=ssh_hosts.aliases) as group:
        total = group.runtime_count
        for index in range(total):
            group.execute_task(RuntimeTask(f"part-{index}").run_function(preprocess, index=index, total=total))
        group.join()
        results = dict(group.function_returns)
        assert sorted(results) == list(range(total))
        assert sum(results.values()) == sum(range(1000))
        assert all(runtime.task_processes for runtime in group.runtimes)


def test_group_send_file(ssh_hosts: Any, tmp_path: Any) -> None:
    source = tmp_path / "shared.txt"
    source.write_text("for all")
    with RuntimeGroup(hosts=ssh_hosts.aliases) as group:
        group.send_file(str(source))
        group.join()
        check = RuntimeTask().run_command("cat shared.txt")
        tasks = group.execute_task(check, broadcast=True, execute_async=False)
        assert [task.execution_log[0].splitlines()[-1] for task in tasks] == ["for all"] * len(ssh_hosts)


def test_group_ports_and_tunnels(ssh_hosts: Any) -> None:
    server = ManagerServer(b"from-manager")
    with RuntimeGroup(hosts=ssh_hosts.aliases) as group:
        port = group.get_free_port(PORTS, enforce_check_on_localhost=True)
        assert group.expose_port_to_runtimes(server.port, PORTS) == port
        assert not group.has_free_port(port)

        source = group.runtimes[0]
        service_port = source.get_free_port(PORTS[10:])
        source.transport.start_process(["python3", "-c", SERVE_SNIPPET, str(service_port), "from-first"])
        assert source.transport.clock.wait_until(lambda: not source.has_free_port(service_port), 10)
        group_port = group.expose_port_from_runtime_to_group(source.host, service_port, PORTS[20:])

        check = RuntimeTask().run_command(f"python3 -c \"$SNIPPET\" {group_port}")
        check.env_variables = {"SNIPPET": READ_PORT_SNIPPET}
        replies = []
        for runtime in group.runtimes[1:]:
            task = group.execute_task(copy.deepcopy(check), host=runtime.host, execute_async=False)
            replies.append(task.execution_log[0].splitlines()[-1])
        assert replies == ["from-first"] * (len(ssh_hosts) - 1)
        assert request(group_port) == b"from-first"
    server.socket.close()


def test_stop_process_ends_task(alias: str, ssh_hosts: Any) -> None:
    host = ssh_hosts.host(alias)
    with Runtime(alias) as runtime:
        task = runtime.execute_task(RuntimeTask("long").run_command("sleep 700").run_command("touch never"))
        (key,) = runtime.get_processes()
        assert runtime.transport.clock.wait_until(
            lambda: "sleep 700" in host.exec(["ps", "-eo", "args="]).stdout, 10
        )
        runtime.stop_process(key)
        with pytest.raises(TaskExecutionError):
            task.join()
        assert "sleep 700" not in host.exec(["ps", "-eo", "args="]).stdout
        assert runtime.echo("$WORKING_DIR") == "$WORKING_DIR"
        check = RuntimeTask().run_command("ls -A")
        runtime.execute_task(check, execute_async=False)
        assert "never" not in check.execution_log[0]


def test_group_with_unreachable_host(ssh_hosts: Any, tmp_path: Any) -> None:
    from lazycluster.transport import use_backend
    from lazycluster.transport.ssh import SSHBackend

    # Port 1 of the manager's loopback has no listener, so the login fails at once.
    config = tmp_path / "ssh_config"
    config.write_text(
        ssh_hosts.ssh_config_path.read_text() + "\nHost lc-broken\n    HostName 127.0.0.1\n    Port 1\n"
    )
    backend = SSHBackend(ssh_config_path=str(config))
    with use_backend(backend):
        with pytest.raises(InvalidRuntimeError, match="lc-broken"):
            RuntimeGroup(hosts=[*ssh_hosts.aliases, "lc-broken"], working_dir="lazycluster-group-test")

        manager = RuntimeManager()
        try:
            assert manager.hosts == ssh_hosts.aliases
            assert manager.inactive_hosts == ["lc-broken"]
            assert manager.inactive_host_reasons["lc-broken"]
        finally:
            manager.cleanup()
    for host in ssh_hosts:
        host.exec(["rm", "-rf", "/home/lazy/lazycluster-group-test"]).check()


def test_runtime_manager(ssh_hosts: Any) -> None:
    manager = RuntimeManager()
    try:
        assert manager.hosts == ssh_hosts.aliases
        assert manager.inactive_hosts == []
        group = manager.create_group(installed_executables="python3", filter_commands="echo true")
        assert group.hosts == ssh_hosts.aliases
        with pytest.raises(Exception, match="passes the filters"):
            manager.create_group(installed_executables="no-such-tool-4711")
    finally:
        manager.cleanup()
