"""LocalTransport on the manager's own machine: real processes, files and sockets."""

from __future__ import annotations

import os
import socket
import stat
import threading
import time
from collections.abc import Iterator

import pytest

from lazycluster.exceptions import (
    CommandError,
    CommandTimeoutError,
    PortInUseError,
    TransportError,
)
from lazycluster.transport.local import LocalTransport, port_is_bound


@pytest.fixture
def transport() -> Iterator[LocalTransport]:
    local = LocalTransport()
    yield local
    local.close()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat_file:
            state = stat_file.read().rpartition(")")[2].split()[0]
    except FileNotFoundError:
        return False
    return state not in ("Z", "X")


def wait_for(predicate, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


class EchoServer:
    """A TCP server on 127.0.0.1 that sends back what it receives."""

    def __init__(self, port: int = 0) -> None:
        self.socket = socket.socket()
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.socket.bind(("127.0.0.1", port))
        self.socket.listen(64)
        self.port = self.socket.getsockname()[1]
        self._threads: list[threading.Thread] = []
        self._accept = threading.Thread(target=self._serve, daemon=True)
        self._accept.start()

    def _serve(self) -> None:
        while True:
            try:
                connection, _ = self.socket.accept()
            except OSError:
                return
            thread = threading.Thread(target=self._echo, args=(connection,), daemon=True)
            thread.start()
            self._threads.append(thread)

    @staticmethod
    def _echo(connection: socket.socket) -> None:
        with connection:
            while data := connection.recv(65536):
                connection.sendall(data)

    def close(self) -> None:
        self.socket.shutdown(socket.SHUT_RDWR)
        self.socket.close()
        self._accept.join(5)
        for thread in self._threads:
            thread.join(5)


def exchange(port: int, payload: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
        client.sendall(payload)
        client.shutdown(socket.SHUT_WR)
        received = b""
        while data := client.recv(65536):
            received += data
    return received


# run


def test_run_argv_quotes_each_argument(transport):
    tricky = ["two words", "$HOME", "it's", '"double"', "; rm -rf /", "*"]
    result = transport.run(["printf", "%s\\n", *tricky])
    assert result.exit_code == 0
    assert result.stdout.splitlines() == tricky
    assert result.host == "localhost"


def test_run_shell_string_with_env_and_exit_code(transport):
    result = transport.run("echo $GREETING; echo oops >&2; exit 3", env={"GREETING": "hi there"})
    assert result.exit_code == 3
    assert result.stdout == "hi there\n"
    assert result.stderr == "oops\n"
    assert not result.ok


def test_run_env_is_merged_over_os_environ(transport, monkeypatch):
    monkeypatch.setenv("LAZYCLUSTER_TEST_OUTER", "outer")
    result = transport.run(["sh", "-c", "echo $LAZYCLUSTER_TEST_OUTER $INNER"], env={"INNER": "in"})
    assert result.stdout == "outer in\n"


@pytest.mark.parametrize("name", ["", "1ABC", "A-B", "A B", "A=B", "X;rm"])
def test_run_rejects_invalid_env_name(transport, name):
    with pytest.raises(ValueError, match="environment variable name"):
        transport.run(["true"], env={name: "x"})


def test_run_cwd(transport, tmp_path):
    result = transport.run(["pwd"], cwd=str(tmp_path))
    assert result.stdout.strip() == str(tmp_path)


def test_run_missing_cwd_is_nonzero_exit(transport, tmp_path):
    result = transport.run(["pwd"], cwd=str(tmp_path / "missing"))
    assert result.exit_code != 0
    assert "missing" in result.stderr


def test_run_command_not_found_exits_127(transport):
    result = transport.run(["lazycluster-no-such-command"])
    assert result.exit_code == 127
    assert "lazycluster-no-such-command" in result.stderr
    shell_result = transport.run("lazycluster-no-such-command")
    assert shell_result.exit_code == 127


def test_run_nonzero_exit_check_raises_command_error(transport):
    result = transport.run("echo failing >&2; exit 4")
    with pytest.raises(CommandError) as caught:
        result.check()
    assert caught.value.result is result
    assert "localhost" in str(caught.value)
    assert "failing" in str(caught.value)


def test_run_timeout_kills_command_group(transport, tmp_path):
    pid_file = tmp_path / "pids"
    command = f"sleep 30 & echo $! > {pid_file}; echo $$ >> {pid_file}; wait"
    started = time.monotonic()
    with pytest.raises(CommandTimeoutError) as caught:
        transport.run(command, timeout=0.5)
    assert time.monotonic() - started < 5
    assert "localhost" in str(caught.value)
    assert isinstance(caught.value, TimeoutError)

    pids = [int(line) for line in pid_file.read_text().split()]
    assert len(pids) == 2
    for pid in pids:
        assert wait_for(lambda pid=pid: not pid_alive(pid)), f"process {pid} survived the timeout"


def test_run_streams_lines(transport):
    lines: list[str] = []
    result = transport.run("echo one; echo two >&2; printf 'last'", on_output=lines.append)
    assert sorted(lines) == ["last", "one", "two"]
    assert result.stdout == "one\nlast"


def test_run_stdin_bytes(transport):
    payload = os.urandom(3 * 1024 * 1024)
    result = transport.run(["wc", "-c"], stdin=payload)
    assert int(result.stdout) == len(payload)


def test_run_stdin_closed_early_by_command(transport):
    result = transport.run(["head", "-c", "3"], stdin=b"x" * (4 * 1024 * 1024))
    assert result.stdout == "xxx"


def test_run_without_stdin_reads_eof(transport):
    result = transport.run(["cat"], timeout=5)
    assert result.exit_code == 0
    assert result.stdout == ""


def test_run_error_in_on_output_kills_command(transport, tmp_path):
    pid_file = tmp_path / "pid"

    def fail(line: str) -> None:
        raise RuntimeError(f"callback failed on {line}")

    with pytest.raises(RuntimeError, match="callback failed"):
        transport.run(f"echo $$ > {pid_file}; echo start; sleep 30", on_output=fail)
    pid = int(pid_file.read_text())
    assert wait_for(lambda: not pid_alive(pid))


# start_process


def test_start_process_logs_and_exits(transport):
    process = transport.start_process("echo hello; echo problem >&2; exit 5")
    assert process.wait(timeout=10) == 5
    assert process.poll() == 5
    assert not process.is_alive
    log = process.read_log()
    assert "hello" in log
    assert "problem" in log
    assert process in transport.processes


def test_start_process_runs_in_own_group(transport):
    process = transport.start_process(["sleep", "30"])
    assert process.is_alive
    assert os.getpgid(process.pid) == process.pid
    assert os.getsid(process.pid) == process.pid
    assert process.stop(grace=5) == 143
    assert not pid_alive(process.pid)


def test_start_process_env_cwd_and_log_path(transport, tmp_path):
    log_path = tmp_path / "nested" / "dir" / "out.log"
    process = transport.start_process(
        "echo $VALUE; pwd", env={"VALUE": "a b"}, cwd=str(tmp_path), log_path=str(log_path)
    )
    assert process.wait(10) == 0
    assert process.log_path == str(log_path)
    assert log_path.read_text() == f"a b\n{tmp_path}\n"


def test_start_process_argv_not_found_exits_127(transport):
    process = transport.start_process(["lazycluster-no-such-command", "x"])
    assert process.wait(10) == 127
    assert "lazycluster-no-such-command" in process.read_log()


def test_process_wait_timeout(transport):
    process = transport.start_process(["sleep", "30"])
    with pytest.raises(CommandTimeoutError, match="localhost"):
        process.wait(timeout=0.2)
    assert process.is_alive


def test_process_stop_kills_after_grace(transport, tmp_path):
    pid_file = tmp_path / "child"
    process = transport.start_process(f"trap '' TERM; sleep 30 & echo $! > {pid_file}; wait")
    assert wait_for(lambda: pid_file.exists() and pid_file.read_text().strip() != "")
    child = int(pid_file.read_text())

    started = time.monotonic()
    assert process.stop(grace=0.3) == 137
    assert time.monotonic() - started < 4
    assert not pid_alive(process.pid)
    assert not pid_alive(child)


def test_process_stop_after_exit_does_nothing(transport):
    process = transport.start_process(["true"])
    assert process.wait(10) == 0
    assert process.stop() == 0
    assert process.stop() == 0


def test_read_log_max_lines(transport):
    process = transport.start_process("for i in 1 2 3 4 5; do echo line$i; done")
    process.wait(10)
    assert process.read_log(max_lines=2) == "line4\nline5\n"
    assert process.read_log(max_lines=0) == ""
    assert process.read_log().count("\n") == 5


def test_close_stops_processes_and_removes_temp_logs():
    local = LocalTransport()
    process = local.start_process(["sleep", "30"])
    log_dir = os.path.dirname(process.log_path)
    assert os.path.isdir(log_dir)

    local.close()
    assert not pid_alive(process.pid)
    assert not os.path.exists(log_dir)
    local.close()


# put and get


def test_put_and_get_file_keep_mode(transport, tmp_path):
    source = tmp_path / "script.sh"
    source.write_text("#!/bin/sh\necho hi\n")
    source.chmod(0o750)

    target = tmp_path / "a" / "b" / "copy.sh"
    transport.put(str(source), str(target))
    assert target.read_text() == source.read_text()
    assert stat.S_IMODE(target.stat().st_mode) == 0o750

    back = tmp_path / "c" / "back.sh"
    transport.get(str(target), str(back))
    assert back.read_text() == source.read_text()
    assert stat.S_IMODE(back.stat().st_mode) == 0o750


def test_put_folder_recursively(transport, tmp_path):
    source = tmp_path / "src"
    (source / "sub").mkdir(parents=True)
    (source / "top.txt").write_text("top")
    (source / "sub" / "run").write_text("run")
    (source / "sub" / "run").chmod(0o700)
    (source / "sub").chmod(0o711)

    target = tmp_path / "deep" / "dst"
    transport.put(str(source), str(target))
    assert (target / "top.txt").read_text() == "top"
    assert stat.S_IMODE((target / "sub" / "run").stat().st_mode) == 0o700
    assert stat.S_IMODE((target / "sub").stat().st_mode) == 0o711


def test_put_missing_source_raises(transport, tmp_path):
    with pytest.raises(FileNotFoundError, match="localhost"):
        transport.put(str(tmp_path / "missing"), str(tmp_path / "target"))
    with pytest.raises(FileNotFoundError):
        transport.get(str(tmp_path / "missing"), str(tmp_path / "target"))


# ports_in_use


def test_ports_in_use_sees_listeners_and_connections(transport):
    loopback = socket.socket()
    loopback.bind(("127.0.0.1", 0))
    loopback.listen()
    wildcard = socket.socket()
    wildcard.bind(("0.0.0.0", 0))
    wildcard.listen()
    client = socket.create_connection(("127.0.0.1", loopback.getsockname()[1]))
    free = free_port()

    ports = [loopback.getsockname()[1], wildcard.getsockname()[1], client.getsockname()[1], free]
    try:
        assert transport.ports_in_use(ports) == set(ports[:3])
    finally:
        client.close()
        loopback.close()
        wildcard.close()


@pytest.mark.skipif(not socket.has_ipv6, reason="no IPv6 on this machine")
def test_ports_in_use_sees_ipv6_listener(transport):
    try:
        listener = socket.socket(socket.AF_INET6)
        listener.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        listener.bind(("::1", 0))
    except OSError:
        pytest.skip("IPv6 loopback is not configured")
    listener.listen()
    with listener:
        assert transport.ports_in_use([listener.getsockname()[1]]) == {listener.getsockname()[1]}


def test_ports_in_use_empty_list(transport):
    assert transport.ports_in_use([]) == set()


@pytest.mark.parametrize("port", [0, -1, 65536, 100000])
def test_ports_in_use_rejects_out_of_range(transport, port):
    with pytest.raises(ValueError, match=str(port)) as caught:
        transport.ports_in_use([8000, port])
    assert "localhost" in str(caught.value)


@pytest.mark.parametrize("port", ["8000", 8000.0, True, None])
def test_ports_in_use_rejects_non_int(transport, port):
    with pytest.raises(TypeError):
        transport.ports_in_use([port])


# tunnels


@pytest.mark.parametrize("kind", ["local", "remote"])
def test_tunnel_relays_many_streams(transport, kind):
    server = EchoServer()
    listen = free_port()
    forward = transport.forward_local if kind == "local" else transport.forward_remote
    try:
        (tunnel,) = forward([(listen, server.port)])
        assert tunnel.is_open
        assert tunnel.kind == kind
        assert (tunnel.listen_port, tunnel.target_port) == (listen, server.port)
        assert transport.ports_in_use([listen]) == {listen}

        payloads = [os.urandom(200_000 + i) for i in range(16)]
        results: list[bytes | None] = [None] * len(payloads)

        def send(index: int) -> None:
            results[index] = exchange(listen, payloads[index])

        threads = [threading.Thread(target=send, args=(i,)) for i in range(len(payloads))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        assert results == payloads
    finally:
        transport.close()
        server.close()
    assert not port_is_bound(listen)


def test_tunnel_same_port_is_noop(transport):
    port = free_port()
    (tunnel,) = transport.forward_local([(port, port)])
    assert tunnel.is_open
    assert not port_is_bound(port)
    assert transport.tunnels == [tunnel]
    tunnel.close()
    assert not tunnel.is_open
    assert transport.tunnels == []


def test_tunnel_listen_port_taken_raises_and_rolls_back(transport):
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    first = free_port()
    try:
        with pytest.raises(PortInUseError) as caught:
            transport.forward_local([(first, 9), (taken.getsockname()[1], 9)])
        assert str(taken.getsockname()[1]) in str(caught.value)
    finally:
        taken.close()
    assert transport.tunnels == []
    assert not port_is_bound(first)


def test_tunnel_to_port_nobody_listens_on(transport):
    listen, target = free_port(), free_port()
    (tunnel,) = transport.forward_local([(listen, target)])
    with socket.create_connection(("127.0.0.1", listen), timeout=5) as client:
        assert client.recv(10) == b""
    assert tunnel.is_open
    assert isinstance(tunnel.last_error, TransportError)
    assert isinstance(tunnel.last_error.__cause__, ConnectionRefusedError)
    assert str(target) in str(tunnel.last_error)

    # The tunnel keeps working once a server appears on the target port.
    server = EchoServer(target)
    try:
        assert exchange(listen, b"late") == b"late"
    finally:
        tunnel.close()
        server.close()


def test_tunnel_rejects_port_out_of_range(transport):
    with pytest.raises(ValueError):
        transport.forward_local([(70000, 8000)])
    with pytest.raises(ValueError):
        transport.forward_remote([(8000, 0)])


def test_tunnel_close_ends_open_streams(transport):
    server = EchoServer()
    listen = free_port()
    (tunnel,) = transport.forward_local([(listen, server.port)])
    client = socket.create_connection(("127.0.0.1", listen), timeout=5)
    client.sendall(b"ping")
    assert client.recv(4) == b"ping"

    tunnel.close()
    tunnel.close()
    assert client.recv(10) == b""
    client.close()
    server.close()
    assert not port_is_bound(listen)
    assert not [t for t in threading.enumerate() if t.name.startswith("lazycluster-tunnel")]


def test_close_leaves_no_threads_or_ports():
    before = set(threading.enumerate())
    local = LocalTransport()
    server = EchoServer()
    listen = free_port()
    local.forward_local([(listen, server.port)])
    assert exchange(listen, b"x") == b"x"
    local.start_process(["sleep", "30"])

    local.close()
    server.close()
    assert not port_is_bound(listen)
    assert local.tunnels == []
    assert local.processes == []
    assert wait_for(lambda: set(threading.enumerate()) <= before)


def test_home_relative_paths(transport, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    process = transport.start_process(["pwd"], cwd="~", log_path="~/logs/out.log")
    assert process.wait(10) == 0
    assert (tmp_path / "logs" / "out.log").read_text() == f"{tmp_path}\n"
    assert transport.run(["pwd"], cwd="~/logs").stdout.strip() == str(tmp_path / "logs")
    transport.put(str(tmp_path / "logs" / "out.log"), "~/copy.log")
    assert (tmp_path / "copy.log").exists()
