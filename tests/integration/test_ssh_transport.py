"""SSHTransport and SSHBackend against real sshd hosts in Docker containers.

Every fault case checks the typed exception, the host in its message, and that
no thread, socket or process is left behind.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shlex
import socket
import stat
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from lazycluster.exceptions import (
    AuthenticationError,
    CommandError,
    CommandTimeoutError,
    ConnectionLostError,
    HostKeyError,
    HostUnreachableError,
    PortInUseError,
    TransportError,
)
from lazycluster.transport.ssh import SSHBackend, SSHTransport

REAL_PYTHON = "/usr/bin/python3"
HOST_TMP = "/tmp"  # noqa: S108 - the temp folder inside the test containers

# The start of each server script for the host: listens on port argv[1] and
# prints "listening".
SERVER_PRELUDE = """
import socket, struct, sys, threading
server = socket.socket()
server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
server.bind(("127.0.0.1", int(sys.argv[1])))
server.listen(128)
print("listening", flush=True)
"""

# A TCP echo server for the host that echoes every connection.
ECHO_SERVER = SERVER_PRELUDE + """
def echo(connection):
    with connection:
        while True:
            data = connection.recv(65536)
            if not data:
                break
            connection.sendall(data)
while True:
    connection, _ = server.accept()
    threading.Thread(target=echo, args=(connection,), daemon=True).start()
"""

# Opens N concurrent connections to a port on the host, sends SIZE bytes on
# each and checks the echo. Prints "ok", the count of good echoes and the
# lengths received on the failed ones.
ECHO_CLIENTS = """
import os, socket, sys, threading
port, count, size = map(int, sys.argv[1:4])
failures = []
def exchange():
    payload = os.urandom(size)
    with socket.create_connection(("127.0.0.1", port), timeout=20) as client:
        client.sendall(payload)
        client.shutdown(socket.SHUT_WR)
        received = b""
        while True:
            data = client.recv(65536)
            if not data:
                break
            received += data
    if received != payload:
        failures.append(len(received))
threads = [threading.Thread(target=exchange) for _ in range(count)]
for thread in threads:
    thread.start()
for thread in threads:
    thread.join()
print("ok", count - len(failures), failures)
"""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for(predicate, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def lazycluster_threads() -> list[threading.Thread]:
    return [
        thread
        for thread in threading.enumerate()
        if thread.name.startswith("lazycluster") or "paramiko" in type(thread).__module__
    ]


def open_tcp_sockets() -> set[int]:
    """Return the inodes of the TCP sockets this test process has open."""
    inodes = set()
    for table in ("/proc/self/net/tcp", "/proc/self/net/tcp6"):
        try:
            with open(table) as lines:
                next(lines)
                inodes |= {int(line.split()[9]) for line in lines}
        except FileNotFoundError:
            continue
    open_inodes = set()
    for descriptor in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{descriptor}")
        except OSError:
            continue
        if target.startswith("socket:["):
            open_inodes.add(int(target[len("socket:[") : -1]))
    return open_inodes & inodes


def exchange(port: int, payload: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=20) as client:
        client.sendall(payload)
        client.shutdown(socket.SHUT_WR)
        received = b""
        while data := client.recv(65536):
            received += data
    return received


def write_config(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def host_block(alias: str, host, group, **extra: str) -> str:
    options = {
        "HostName": "127.0.0.1",
        "Port": str(host.port),
        "User": group.user,
        "IdentityFile": str(group.key_path),
        "IdentitiesOnly": "yes",
        "UserKnownHostsFile": str(group.known_hosts_path),
        "StrictHostKeyChecking": "yes",
    }
    options.update(extra)
    lines = [f"Host {alias}"] + [f"    {key} {value}" for key, value in options.items()]
    return "\n".join(lines) + "\n"


class EchoServer:
    """A TCP echo server on the manager's 127.0.0.1."""

    def __init__(self) -> None:
        self.socket = socket.socket()
        self.socket.bind(("127.0.0.1", 0))
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


@pytest.fixture
def nothing_left() -> Iterator[None]:
    """Check after the test that it left no lazycluster thread and no TCP socket open."""
    threads_before = set(threading.enumerate())
    sockets_before = open_tcp_sockets()
    yield
    assert wait_for(lambda: set(lazycluster_threads()) <= threads_before), lazycluster_threads()
    assert wait_for(lambda: open_tcp_sockets() <= sockets_before), (
        open_tcp_sockets() - sockets_before
    )


@pytest.fixture
def host(ssh_hosts):
    return ssh_hosts[0]


@pytest.fixture
def transport(ssh_backend, host, nothing_left) -> Iterator[SSHTransport]:
    """Connect to the first host; after the test, close and check the host is clean."""
    connected = ssh_backend.connect(host.alias)
    yield connected
    connected.close()

    leftovers = host.leftovers(temp_pattern="lazycluster-*")
    assert leftovers.is_clean, str(leftovers)


def host_pids(host, prefix: str) -> list[int]:
    """Return the pids of the host's processes whose command line starts with `prefix`."""
    result = host.exec(["ps", "-eo", "pid=,args="])
    pids = []
    for line in result.stdout.splitlines():
        pid, _, args = line.strip().partition(" ")
        if args.strip().startswith(prefix):
            pids.append(int(pid))
    return pids


def start_echo_server(transport: SSHTransport, port: int):
    process = transport.start_process([REAL_PYTHON, "-c", ECHO_SERVER, str(port)])
    assert wait_for(lambda: "listening" in process.read_log()), process.read_log()
    return process


# Connection and SSH config


def test_configured_hosts_lists_aliases(ssh_backend, ssh_hosts):
    assert ssh_backend.configured_hosts() == ssh_hosts.aliases


def test_backend_uses_env_config(ssh_hosts, monkeypatch):
    monkeypatch.setenv("LAZYCLUSTER_SSH_CONFIG", str(ssh_hosts.ssh_config_path))
    backend = SSHBackend()
    assert backend.configured_hosts() == ssh_hosts.aliases
    with backend.connect(ssh_hosts[1].alias) as transport:
        assert transport.run(["hostname"]).stdout.strip() == ssh_hosts[1].alias


def test_connect_all_hosts_in_parallel(ssh_backend, ssh_hosts):
    aliases = ssh_hosts.aliases * 4
    transports = ssh_backend.clock.map(ssh_backend.connect, aliases)
    try:
        names = ssh_backend.clock.map(lambda t: t.run(["hostname"]).stdout.strip(), transports)
        assert names == aliases
    finally:
        for transport in transports:
            transport.close()


def test_include_and_host_star_defaults(ssh_hosts, tmp_path):
    host = ssh_hosts[1]
    included = tmp_path / "conf.d"
    included.mkdir()
    write_config(
        included / "10-hosts.conf",
        f"Host included-alias\n    HostName 127.0.0.1\n    Port {host.port}\n",
    )
    # The User of `Host *` applies because the host block sets none; its Port
    # loses because the first value wins.
    config = write_config(
        tmp_path / "config",
        f"Include {included}/*.conf\n"
        "Host *\n"
        f"    User {ssh_hosts.user}\n"
        "    Port 1\n"
        f"    IdentityFile {ssh_hosts.key_path}\n"
        "    IdentitiesOnly yes\n"
        f"    UserKnownHostsFile {ssh_hosts.known_hosts_path}\n",
    )
    backend = SSHBackend(str(config))
    assert backend.configured_hosts() == ["included-alias"]
    with backend.connect("included-alias") as transport:
        assert transport.run(["whoami"]).stdout.strip() == ssh_hosts.user
        assert transport.run(["hostname"]).stdout.strip() == host.alias


def test_proxy_jump_chain_of_two_hops(ssh_hosts, tmp_path):
    host = ssh_hosts[0]
    known_hosts = tmp_path / "known_hosts"
    inner = {
        "User": ssh_hosts.user,
        "IdentityFile": str(ssh_hosts.key_path),
        "IdentitiesOnly": "yes",
        "UserKnownHostsFile": str(known_hosts),
        "StrictHostKeyChecking": "accept-new",
    }
    inner_options = "".join(f"    {key} {value}\n" for key, value in inner.items())
    # Each hop reaches the next through the container's own loopback sshd.
    config = write_config(
        tmp_path / "config",
        host_block("jump-entry", host, ssh_hosts)
        + "Host inner-hop\n    HostName 127.0.0.1\n    Port 22\n"
        + inner_options
        + "Host behind-two-hops\n    HostName localhost\n    ProxyJump jump-entry,inner-hop\n"
        + inner_options,
    )
    backend = SSHBackend(str(config))
    login = f"sshd: {ssh_hosts.user} [priv]"
    # Logins of earlier tests may still be closing, or kept open by a fixture,
    # so the count below is taken relative to what is there before.
    wait_for(lambda: not host_pids(host, login))
    logins_before = len(host_pids(host, login))
    with backend.connect("behind-two-hops") as transport:
        assert transport.run(["hostname"]).stdout.strip() == host.alias
        # Three SSH connections: the entry hop, the inner hop and the target.
        assert len(host_pids(host, login)) == logins_before + 3
        assert transport.ports_in_use([22]) == {22}
    stored = known_hosts.read_text()
    assert stored.startswith("127.0.0.1 ")
    assert "\nlocalhost " in stored
    assert wait_for(lambda: len(host_pids(host, login)) <= logins_before)


class IPv6Relay:
    """Listens on [::1] of the manager and relays each connection to 127.0.0.1:`port`."""

    def __init__(self, port: int) -> None:
        self.target = port
        self.socket = socket.socket(socket.AF_INET6)
        self.socket.bind(("::1", 0))
        self.socket.listen(8)
        self.port = self.socket.getsockname()[1]
        self._threads: list[threading.Thread] = [threading.Thread(target=self._serve, daemon=True)]
        self._threads[0].start()

    def _serve(self) -> None:
        while True:
            try:
                incoming, _ = self.socket.accept()
            except OSError:
                return
            outgoing = socket.create_connection(("127.0.0.1", self.target))
            for source, target in ((incoming, outgoing), (outgoing, incoming)):
                thread = threading.Thread(target=self._pump, args=(source, target), daemon=True)
                thread.start()
                self._threads.append(thread)

    @staticmethod
    def _pump(source: socket.socket, target: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                target.sendall(data)
            target.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def close(self) -> None:
        self.socket.close()


def test_ipv6_literal_hostname(ssh_hosts, tmp_path):
    try:
        relay = IPv6Relay(ssh_hosts[0].port)
    except OSError:
        pytest.skip("the manager has no IPv6 loopback address")
    known_hosts = tmp_path / "known_hosts"
    config = write_config(
        tmp_path / "config",
        host_block(
            "over-ipv6",
            ssh_hosts[0],
            ssh_hosts,
            HostName="::1",
            Port=str(relay.port),
            UserKnownHostsFile=str(known_hosts),
            StrictHostKeyChecking="accept-new",
        ),
    )
    try:
        with SSHBackend(str(config)).connect("over-ipv6") as transport:
            assert transport.run(["hostname"]).stdout.strip() == ssh_hosts[0].alias
    finally:
        relay.close()
    assert known_hosts.read_text().startswith(f"[::1]:{relay.port} ")


def test_connection_kwargs_reach_paramiko(ssh_hosts, tmp_path):
    host = ssh_hosts[0]
    config = write_config(
        tmp_path / "config",
        f"Host no-key\n    HostName 127.0.0.1\n    Port {host.port}\n    User {ssh_hosts.user}\n"
        f"    UserKnownHostsFile {ssh_hosts.known_hosts_path}\n",
    )
    backend = SSHBackend(str(config))
    kwargs = {"key_filename": str(ssh_hosts.key_path), "look_for_keys": False, "compress": True}
    with backend.connect("no-key", kwargs) as transport:
        assert transport.run(["true"]).ok


def test_unknown_alias_raises(nothing_left, ssh_hosts):
    # resolve_unknown_hosts=False keeps the test off DNS: only 127.0.0.0/8 may be contacted.
    backend = SSHBackend(str(ssh_hosts.ssh_config_path), resolve_unknown_hosts=False)
    with pytest.raises(HostUnreachableError) as caught:
        backend.connect("no-such-alias")
    assert "no-such-alias" in str(caught.value)
    assert "not in the SSH config" in str(caught.value)
    assert caught.value.host == "no-such-alias"


def test_unreachable_port_raises(nothing_left, ssh_hosts, tmp_path):
    closed_port = free_port()
    config = write_config(
        tmp_path / "config", host_block("closed", ssh_hosts[0], ssh_hosts, Port=str(closed_port))
    )
    started = time.monotonic()
    with pytest.raises(HostUnreachableError) as caught:
        SSHBackend(str(config)).connect("closed")
    assert time.monotonic() - started < 5
    assert "'closed'" in str(caught.value)
    assert str(closed_port) in str(caught.value)


def test_wrong_key_raises(nothing_left, ssh_hosts, tmp_path):
    key = tmp_path / "other_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    config = write_config(
        tmp_path / "config", host_block("wrong-key", ssh_hosts[0], ssh_hosts, IdentityFile=str(key))
    )
    with pytest.raises(AuthenticationError) as caught:
        SSHBackend(str(config)).connect("wrong-key")
    assert "'wrong-key'" in str(caught.value)
    assert "ssh-copy-id" in str(caught.value)


def test_passphrase_key_without_agent_raises(nothing_left, ssh_hosts, tmp_path, monkeypatch):
    monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)
    key = tmp_path / "locked_key"
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "secret words", "-f", str(key)], check=True
    )
    config = write_config(
        tmp_path / "config", host_block("locked", ssh_hosts[0], ssh_hosts, IdentityFile=str(key))
    )
    with pytest.raises(AuthenticationError) as caught:
        SSHBackend(str(config)).connect("locked")
    message = str(caught.value)
    assert "'locked'" in message
    assert "passphrase" in message
    assert f"ssh-add {key}" in message


def test_unknown_host_key_rejected_by_default(nothing_left, ssh_hosts, tmp_path):
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    config = write_config(
        tmp_path / "config",
        host_block("new-host", ssh_hosts[0], ssh_hosts, UserKnownHostsFile=str(empty)),
    )
    with pytest.raises(HostKeyError) as caught:
        SSHBackend(str(config)).connect("new-host")
    message = str(caught.value)
    assert "'new-host'" in message
    assert "ssh-keyscan" in message
    assert "accept-new" in message
    assert empty.read_text() == ""


def test_accept_new_stores_key_then_verifies(ssh_hosts, tmp_path):
    known_hosts = tmp_path / "known_hosts"
    host = ssh_hosts[0]
    config = write_config(
        tmp_path / "config",
        host_block(
            "accepting",
            host,
            ssh_hosts,
            UserKnownHostsFile=str(known_hosts),
            StrictHostKeyChecking="accept-new",
        ),
    )
    with SSHBackend(str(config)).connect("accepting") as transport:
        assert transport.run(["true"]).ok
    assert known_hosts.read_text().startswith(f"[127.0.0.1]:{host.port} ")

    strict = SSHBackend(str(config), strict_host_key_checking="yes")
    with strict.connect("accepting") as transport:
        assert transport.run(["true"]).ok


def test_explicit_accept_new_overrides_config(ssh_hosts, tmp_path):
    known_hosts = tmp_path / "known_hosts"
    config = write_config(
        tmp_path / "config",
        host_block("explicit", ssh_hosts[0], ssh_hosts, UserKnownHostsFile=str(known_hosts)),
    )
    backend = SSHBackend(str(config))
    with pytest.raises(HostKeyError):
        backend.connect("explicit")
    with backend.connect("explicit", {"strict_host_key_checking": "accept-new"}) as transport:
        assert transport.run(["true"]).ok
    assert known_hosts.exists()


def test_changed_host_key_rejected(nothing_left, ssh_hosts, tmp_path):
    host = ssh_hosts[0]
    other = tmp_path / "other_host_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True)
    key_type, key_data = Path(f"{other}.pub").read_text().split()[:2]
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text(f"[127.0.0.1]:{host.port} {key_type} {key_data}\n")
    config = write_config(
        tmp_path / "config",
        host_block(
            "changed",
            host,
            ssh_hosts,
            UserKnownHostsFile=str(known_hosts),
            StrictHostKeyChecking="accept-new",
        ),
    )
    with pytest.raises(HostKeyError) as caught:
        SSHBackend(str(config)).connect("changed")
    assert "'changed'" in str(caught.value)
    assert "ssh-keygen -R" in str(caught.value)


def test_strict_checking_no_skips_known_hosts(ssh_hosts, tmp_path):
    known_hosts = tmp_path / "known_hosts"
    config = write_config(
        tmp_path / "config",
        host_block(
            "unchecked",
            ssh_hosts[0],
            ssh_hosts,
            UserKnownHostsFile=str(known_hosts),
            StrictHostKeyChecking="no",
        ),
    )
    with SSHBackend(str(config)).connect("unchecked") as transport:
        assert transport.run(["true"]).ok
    assert not known_hosts.exists()


def test_local_is_shared_local_transport(ssh_backend):
    local = ssh_backend.local()
    assert local is ssh_backend.local()
    assert local.is_local
    assert local.host == "localhost"


# Commands


def test_run_argv_env_and_cwd(transport):
    tricky = ["two words", "$HOME", "it's", '"double"', "; touch /tmp/lazycluster-bad", "*"]
    result = transport.run(["printf", "%s\\n", *tricky])
    assert result.stdout.splitlines() == tricky
    assert result.host == transport.host

    env = {"QUOTED": "a 'b' \"c\" $d `e`", "EMPTY": ""}
    result = transport.run('printf "%s|%s" "$QUOTED" "$EMPTY"; pwd', env=env, cwd="/usr/lib")
    assert result.stdout == "a 'b' \"c\" $d `e`|/usr/lib\n"


def test_run_rejects_invalid_env_name(transport):
    with pytest.raises(ValueError, match="environment variable name"):
        transport.run(["true"], env={"BAD;rm": "x"})


def test_run_missing_cwd_fails_before_command(transport):
    result = transport.run(["touch", "marker"], cwd="/no/such/dir")
    assert result.exit_code != 0
    assert "/no/such/dir" in result.stderr


def test_run_command_not_found(transport):
    result = transport.run(["lazycluster-no-such-command"])
    assert result.exit_code == 127
    assert "not found" in result.stderr
    with pytest.raises(CommandError) as caught:
        result.check()
    assert transport.host in str(caught.value)
    assert "127" in str(caught.value)


def test_run_nonzero_exit(transport):
    result = transport.run("echo partial; echo broken >&2; exit 7")
    assert result.exit_code == 7
    assert result.stdout == "partial\n"
    assert result.stderr == "broken\n"
    with pytest.raises(CommandError) as caught:
        result.check()
    assert transport.host in str(caught.value)
    assert "broken" in str(caught.value)


def test_run_timeout_kills_remote_command(transport, host):
    started = time.monotonic()
    with pytest.raises(CommandTimeoutError) as caught:
        transport.run("sleep 1234 & sleep 1235; wait", timeout=0.5)
    assert time.monotonic() - started < 5
    assert transport.host in str(caught.value)
    assert wait_for(lambda: not host_pids(host, "sleep 123")), host_pids(host, "sleep 123")


def test_run_streams_lines_and_stdin(transport):
    lines: list[str] = []
    result = transport.run(
        "cat; echo done; echo warn >&2", stdin=b"first\nsecond\n", on_output=lines.append
    )
    assert result.stdout == "first\nsecond\ndone\n"
    assert lines[:3] == ["first", "second", "done"]
    assert "warn" in lines


def test_run_large_output(transport):
    result = transport.run(["head", "-c", "5000000", "/dev/zero"])
    assert len(result.stdout) == 5_000_000


# Background processes


def test_process_detached_in_own_group(transport, host):
    process = transport.start_process(["sleep", "4321"])
    assert process.is_alive
    stat_line = host.exec(["cat", f"/proc/{process.pid}/stat"]).stdout
    fields = stat_line.rpartition(")")[2].split()
    assert int(fields[2]) == process.pid  # process group
    assert int(fields[3]) == process.pid  # session
    assert process in transport.processes

    assert process.stop(grace=5) == 143
    assert not host_pids(host, "sleep 4321")


def test_process_exit_code_log_env_cwd(transport, host):
    log_path = f"{HOST_TMP}/lazycluster-test-logs/nested/out.log"
    process = transport.start_process(
        "echo $VALUE; pwd; echo oops >&2; exit 9",
        env={"VALUE": "x y"},
        cwd="/usr",
        log_path=log_path,
    )
    assert process.wait(timeout=10) == 9
    assert process.poll() == 9
    assert process.log_path == log_path
    assert process.read_log() == "x y\n/usr\noops\n"
    assert process.read_log(max_lines=1) == "oops\n"
    host.exec(["rm", "-rf", f"{HOST_TMP}/lazycluster-test-logs"]).check()


def test_process_not_found_exits_127(transport):
    process = transport.start_process(["lazycluster-no-such-command"])
    assert process.wait(timeout=10) == 127
    assert "not found" in process.read_log()


def test_process_wait_timeout(transport):
    process = transport.start_process(["sleep", "30"])
    with pytest.raises(CommandTimeoutError, match=transport.host):
        process.wait(timeout=0.3)
    assert process.is_alive


def test_process_stop_kills_after_grace(transport, host):
    process = transport.start_process("trap '' TERM; sleep 4322 & wait; sleep 4323")
    assert wait_for(lambda: host_pids(host, "sleep 4322"))
    started = time.monotonic()
    assert process.stop(grace=0.5) == 137
    assert time.monotonic() - started < 8
    assert not host_pids(host, "sleep 432")


def test_close_stops_processes(ssh_backend, host):
    transport = ssh_backend.connect(host.alias)
    transport.start_process(["sleep", "4324"])
    transport.start_process("trap '' TERM; sleep 4325")
    assert wait_for(lambda: len(host_pids(host, "sleep 432")) == 2)
    transport.close()
    transport.close()
    assert not host_pids(host, "sleep 432")
    assert host.leftovers(temp_pattern="lazycluster-*").is_clean
    with pytest.raises(TransportError, match="closed"):
        transport.run(["true"])


# Files


def test_put_get_file_keeps_mode(transport, host, tmp_path):
    source = tmp_path / "tool.sh"
    source.write_bytes(os.urandom(300_000))
    source.chmod(0o751)
    remote = f"{HOST_TMP}/lazycluster-files/a/b/tool.sh"
    try:
        transport.put(str(source), remote)
        assert transport.run(["stat", "-c", "%a %s", remote]).stdout.split() == ["751", "300000"]

        back = tmp_path / "back" / "deeper" / "tool.sh"
        transport.get(remote, str(back))
        assert back.read_bytes() == source.read_bytes()
        assert stat.S_IMODE(back.stat().st_mode) == 0o751
    finally:
        host.exec(["rm", "-rf", f"{HOST_TMP}/lazycluster-files"])


def test_put_get_folder_recursively(transport, host, tmp_path):
    source = tmp_path / "project"
    (source / "pkg" / "data").mkdir(parents=True)
    (source / "top.txt").write_text("top")
    (source / "pkg" / "run.py").write_text("print(1)")
    (source / "pkg" / "run.py").chmod(0o700)
    (source / "pkg" / "data").chmod(0o750)
    try:
        transport.put(str(source), "~/lazycluster-folder/copy")
        listing = transport.run(
            "cd ~/lazycluster-folder/copy && find . | sort && stat -c %a pkg/data"
        )
        assert listing.stdout.split() == [
            ".",
            "./pkg",
            "./pkg/data",
            "./pkg/run.py",
            "./top.txt",
            "750",
        ]

        back = tmp_path / "back"
        transport.get("~/lazycluster-folder/copy", str(back))
        assert (back / "top.txt").read_text() == "top"
        assert stat.S_IMODE((back / "pkg" / "run.py").stat().st_mode) == 0o700
        assert stat.S_IMODE((back / "pkg" / "data").stat().st_mode) == 0o750
    finally:
        transport.run(["rm", "-rf", "lazycluster-folder"])


def test_copy_missing_paths_raise(transport, tmp_path):
    with pytest.raises(FileNotFoundError):
        transport.put(str(tmp_path / "missing"), f"{HOST_TMP}/lazycluster-never")
    with pytest.raises(FileNotFoundError) as caught:
        transport.get("/no/such/file", str(tmp_path / "target"))
    assert transport.host in str(caught.value)


# Ports


def test_ports_in_use_listeners_and_free(transport, host):
    ports = [free_port() for _ in range(3)]
    blockers = [host.occupy_port(ports[0], "0.0.0.0"), host.occupy_port(ports[1], "127.0.0.1")]
    try:
        assert transport.ports_in_use(ports + [22]) == {ports[0], ports[1], 22}
    finally:
        for blocker in blockers:
            blocker.stop()
    assert transport.ports_in_use(ports) == set()
    assert transport.ports_in_use([]) == set()


def test_ports_in_use_ipv6_listener(transport, host):
    port = free_port()
    try:
        blocker = host.occupy_port(port, "::1")
    except OSError:
        pytest.skip("IPv6 is disabled in the test containers")
    try:
        assert transport.ports_in_use([port]) == {port}
    finally:
        blocker.stop()


def test_ports_in_use_sees_connected_port(transport):
    # A connected socket occupies its local port even though nothing listens on it.
    script = (
        "import socket, time\n"
        "c = socket.create_connection(('127.0.0.1', 22))\n"
        "print(c.getsockname()[1], flush=True)\n"
        "time.sleep(30)\n"
    )
    process = transport.start_process([REAL_PYTHON, "-c", script])
    assert wait_for(lambda: process.read_log().strip().isdigit())
    port = int(process.read_log())
    assert transport.ports_in_use([port]) == {port}
    process.stop()


@pytest.mark.parametrize("port", [0, 65536, -5])
def test_ports_in_use_rejects_out_of_range(transport, port):
    with pytest.raises(ValueError, match=str(port)) as caught:
        transport.ports_in_use([22, port])
    assert transport.host in str(caught.value)


# Tunnels


def test_forward_local_many_streams(transport):
    host_port, manager_port = free_port(), free_port()
    server = start_echo_server(transport, host_port)
    (tunnel,) = transport.forward_local([(manager_port, host_port)])
    assert tunnel.kind == "local"
    assert tunnel in transport.tunnels

    payloads = [os.urandom(500_000 + index) for index in range(12)]
    results: list[bytes | None] = [None] * len(payloads)

    def send(index: int) -> None:
        results[index] = exchange(manager_port, payloads[index])

    threads = [threading.Thread(target=send, args=(index,)) for index in range(len(payloads))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert results == payloads

    tunnel.close()
    assert not tunnel.is_open
    assert tunnel not in transport.tunnels
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", manager_port), timeout=5)
    server.stop()


def test_forward_remote_many_streams(transport):
    server = EchoServer()
    host_port = free_port()
    try:
        (tunnel,) = transport.forward_remote([(host_port, server.port)])
        assert tunnel.kind == "remote"
        assert transport.ports_in_use([host_port]) == {host_port}

        result = transport.run(
            [REAL_PYTHON, "-c", ECHO_CLIENTS, str(host_port), "10", "300000"], timeout=60
        )
        assert result.stdout.strip() == "ok 10 []", result.stderr

        tunnel.close()
        assert transport.ports_in_use([host_port]) == set()
        assert tunnel not in transport.tunnels
    finally:
        server.close()


def test_forward_remote_batch_and_port_in_use(transport, host):
    server = EchoServer()
    free_ports = [free_port() for _ in range(3)]
    taken = free_port()
    blocker = host.occupy_port(taken, "127.0.0.1")
    try:
        with pytest.raises(PortInUseError) as caught:
            transport.forward_remote(
                [(port, server.port) for port in free_ports] + [(taken, server.port)]
            )
        assert str(taken) in str(caught.value)
        assert transport.host in str(caught.value)
        # The forwards opened before the failure were rolled back.
        assert transport.ports_in_use(free_ports) == set()
        assert transport.tunnels == []

        tunnels = transport.forward_remote([(port, server.port) for port in free_ports])
        assert transport.ports_in_use(free_ports) == set(free_ports)
        for tunnel in tunnels:
            tunnel.close()
    finally:
        blocker.stop()
        server.close()


def test_tunnels_reject_ports_out_of_range(transport):
    with pytest.raises(ValueError, match="70000") as caught:
        transport.forward_local([(70000, 22)])
    assert transport.host in str(caught.value)
    with pytest.raises(ValueError, match="target port 0") as caught:
        transport.forward_remote([(8000, 0)])
    assert transport.host in str(caught.value)
    with pytest.raises(TypeError):
        transport.forward_remote([("8000", 8001)])
    assert transport.tunnels == []


def test_forward_local_to_port_nobody_listens_on(transport, caplog):
    manager_port, host_port = free_port(), free_port()
    (tunnel,) = transport.forward_local([(manager_port, host_port)])
    with (
        caplog.at_level(logging.WARNING),
        socket.create_connection(("127.0.0.1", manager_port), timeout=5) as client,
    ):
        assert client.recv(10) == b""
    assert isinstance(tunnel.last_error, TransportError)
    assert transport.host in str(tunnel.last_error)
    assert str(host_port) in str(tunnel.last_error)
    assert tunnel.is_open
    tunnel.close()


# A server for the host that resets every connection after its first bytes.
RESETTING_SERVER = SERVER_PRELUDE + """
while True:
    connection, _ = server.accept()
    connection.recv(1000)
    connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    connection.close()
"""


def test_forward_local_peer_reset_keeps_connection(transport, host, caplog):
    # sshd closes a tunnel's channel when the host side resets, while the
    # manager side is still sending. Data that reaches sshd after our reply to
    # that close is a protocol error for sshd, which would then drop the
    # connection with every other tunnel of the host.
    host_port, manager_port = free_port(), free_port()
    server = transport.start_process([REAL_PYTHON, "-c", RESETTING_SERVER, str(host_port)])
    assert wait_for(lambda: "listening" in server.read_log()), server.read_log()
    transport.forward_local([(manager_port, host_port)])
    protocol_errors_before = host.logs(tail=10_000).count("nonexistent channel")

    def send_until_reset(_: int) -> None:
        for _ in range(40):
            try:
                with socket.create_connection(("127.0.0.1", manager_port), timeout=10) as client:
                    for _ in range(8):
                        client.sendall(bytes(1 << 20))
            except OSError:
                pass  # the reset, as expected

    with caplog.at_level(logging.WARNING, logger="lazycluster.transport.ssh"):
        transport.clock.map(send_until_reset, range(8))
        assert transport.run(["echo", "alive"]).stdout == "alive\n"

    assert host.logs(tail=10_000).count("nonexistent channel") == protocol_errors_before
    assert not [record.getMessage() for record in caplog.records]

    # sshd gives the freed channel numbers to new channels. A channel that is
    # closed before it sent anything (here: its manager port refuses) must
    # still close at sshd, so the host's client sees EOF.
    (refused,) = transport.forward_remote([(free_port(), free_port())])
    client = (
        "import socket, sys\n"
        "for _ in range(10):\n"
        "    s = socket.create_connection(('127.0.0.1', int(sys.argv[1])), timeout=10)\n"
        "    print(repr(s.recv(10)))\n"
    )
    result = transport.run([REAL_PYTHON, "-c", client, str(refused.listen_port)], timeout=60)
    assert result.stdout.split() == ["b''"] * 10


def test_forward_remote_to_port_nobody_listens_on(transport):
    host_port, manager_port = free_port(), free_port()
    (tunnel,) = transport.forward_remote([(host_port, manager_port)])
    client = (
        "import socket, sys\n"
        "s = socket.create_connection(('127.0.0.1', int(sys.argv[1])), timeout=10)\n"
        "print(repr(s.recv(10)))\n"
    )
    result = transport.run([REAL_PYTHON, "-c", client, str(host_port)], timeout=20)
    assert result.stdout.strip() == "b''"
    assert isinstance(tunnel.last_error, TransportError)
    assert str(manager_port) in str(tunnel.last_error)
    tunnel.close()


# Relay semantics: order, half-close, flow control and clean-up of each stream

# The start of each peer script below: one connection on the host, accepted
# on port argv[2] ("listen" in argv[1]) or opened to it ("connect").
PEER_CONNECTION = """
import hashlib, socket, sys
role, port = sys.argv[1], int(sys.argv[2])
if role == "listen":
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("127.0.0.1", port))
    server.listen(1)
    print("listening", flush=True)
    connection, _ = server.accept()
else:
    connection = socket.create_connection(("127.0.0.1", port), timeout=30)
"""

# One side of a half-close exchange on the host, over a connection it accepts
# ("listen") or opens ("connect"). Side "A" sends SIZE pattern bytes, half-closes
# and prints the reply it reads to EOF. Side "B" reads to EOF, then replies with
# the byte count and SHA-256 of what it read, and prints the same.
HALF_CLOSE_PEER = PEER_CONNECTION + """
side, size = sys.argv[3], int(sys.argv[4])
connection.settimeout(30)
def read_all():
    parts = []
    while data := connection.recv(65536):
        parts.append(data)
    return b"".join(parts)
if side == "A":
    connection.sendall(bytes(index % 251 for index in range(size)))
    connection.shutdown(socket.SHUT_WR)
    print("reply", read_all().decode(), flush=True)
else:
    data = read_all()
    reply = f"{len(data)} {hashlib.sha256(data).hexdigest()}"
    connection.sendall(reply.encode())
    print("reply", reply, flush=True)
connection.close()
"""

# Writes a pattern to one connection, accepted ("listen") or opened ("connect"),
# until a send makes no progress for 3 s or LIMIT bytes are out, then prints
# "sent COUNT SHA256", half-closes and waits for the peer to close.
FLOOD_PEER = PEER_CONNECTION + """
limit = int(sys.argv[3])
connection.settimeout(3)
block = bytes(index % 253 for index in range(1 << 20))
digest, sent = hashlib.sha256(), 0
try:
    while sent < limit:
        count = connection.send(block)
        digest.update(block[:count])
        sent += count
except socket.timeout:
    pass
print("sent", sent, digest.hexdigest(), flush=True)
connection.settimeout(60)
connection.shutdown(socket.SHUT_WR)
connection.recv(1)
connection.close()
"""

PATTERN_SIZE = 3_000_000

# A peer that flooded for this many bytes did not block: nothing throttled it.
FLOOD_LIMIT = 512 * 1024 * 1024

# What a blocked flood may have sent: the 16 MiB tunnel window (2 MiB for remote
# forwards) plus the socket buffers of the host, sshd and the manager's loopback.
MAX_BUFFERED = 96 * 1024 * 1024


def pattern(size: int) -> bytes:
    return bytes(index % 251 for index in range(size))


def read_to_eof(connection: socket.socket) -> bytes:
    parts = []
    while data := connection.recv(65536):
        parts.append(data)
    return b"".join(parts)


def digest_reply(data: bytes) -> str:
    return f"{len(data)} {hashlib.sha256(data).hexdigest()}"


def run_half_close_side(connection: socket.socket, side: str, size: int) -> str:
    """Play side A or B of HALF_CLOSE_PEER on the manager and return the reply line."""
    connection.settimeout(30)
    if side == "A":
        connection.sendall(pattern(size))
        connection.shutdown(socket.SHUT_WR)
        return read_to_eof(connection).decode()
    reply = digest_reply(read_to_eof(connection))
    connection.sendall(reply.encode())
    return reply


def wait_for_log(process, prefix: str, timeout: float = 60.0) -> str:
    """Return the first line of the process's log that starts with `prefix`."""

    def found() -> str | None:
        for line in process.read_log().splitlines():
            if line.startswith(prefix):
                return line
        return None

    assert wait_for(lambda: found() is not None, timeout), process.read_log()
    line = found()
    assert line is not None
    return line


def relay_threads() -> list[threading.Thread]:
    """Return the threads that relay tunnel streams, without the tunnels' accept threads."""
    return [
        thread
        for thread in threading.enumerate()
        if thread.name.startswith("lazycluster-tunnel-") and thread.name.count("-") >= 5
    ]


@pytest.mark.parametrize("size", [10, PATTERN_SIZE])
@pytest.mark.parametrize("manager_side", ["A", "B"])
def test_forward_local_half_close(transport, manager_side, size):
    host_port, manager_port = free_port(), free_port()
    host_side = "B" if manager_side == "A" else "A"
    peer = transport.start_process(
        [REAL_PYTHON, "-c", HALF_CLOSE_PEER, "listen", str(host_port), host_side, str(size)]
    )
    wait_for_log(peer, "listening")
    (tunnel,) = transport.forward_local([(manager_port, host_port)])

    with socket.create_connection(("127.0.0.1", manager_port), timeout=10) as client:
        manager_reply = run_half_close_side(client, manager_side, size)
    host_reply = wait_for_log(peer, "reply").removeprefix("reply ")

    expected = digest_reply(pattern(size))
    assert manager_reply == expected
    assert host_reply == expected
    assert wait_for(lambda: tunnel.stream_count == 0)
    tunnel.close()


@pytest.mark.parametrize("size", [10, PATTERN_SIZE])
@pytest.mark.parametrize("manager_side", ["A", "B"])
def test_forward_remote_half_close(transport, manager_side, size):
    host_port = free_port()
    host_side = "B" if manager_side == "A" else "A"
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        server.settimeout(30)
        (tunnel,) = transport.forward_remote([(host_port, server.getsockname()[1])])
        peer = transport.start_process(
            [REAL_PYTHON, "-c", HALF_CLOSE_PEER, "connect", str(host_port), host_side, str(size)]
        )
        connection, _ = server.accept()
        with connection:
            manager_reply = run_half_close_side(connection, manager_side, size)
    host_reply = wait_for_log(peer, "reply").removeprefix("reply ")

    expected = digest_reply(pattern(size))
    assert manager_reply == expected
    assert host_reply == expected
    assert wait_for(lambda: tunnel.stream_count == 0)
    tunnel.close()


def test_forward_local_small_messages_in_order(transport):
    host_port, manager_port = free_port(), free_port()
    server = start_echo_server(transport, host_port)
    (tunnel,) = transport.forward_local([(manager_port, host_port)])

    # Many small request-response pairs, as Dask sends them: each one travels
    # alone through the tunnel, so each is delivered by its own SSH packet.
    with socket.create_connection(("127.0.0.1", manager_port), timeout=20) as client:
        for index in range(2000):
            message = f"{index:08d}".encode() * (1 + index % 40)
            client.sendall(message)
            echoed = b""
            while len(echoed) < len(message):
                data = client.recv(65536)
                assert data, f"EOF after {index} messages"
                echoed += data
            assert echoed == message

    tunnel.close()
    server.stop()


def test_forward_local_streams_leave_no_threads(transport):
    host_port, manager_port = free_port(), free_port()
    server = start_echo_server(transport, host_port)
    (tunnel,) = transport.forward_local([(manager_port, host_port)])
    threads_before = set(relay_threads())

    for index in range(20):
        payload = os.urandom(1000 * index)
        assert exchange(manager_port, payload) == payload
    assert wait_for(lambda: tunnel.stream_count == 0)
    assert wait_for(lambda: set(relay_threads()) <= threads_before), relay_threads()

    tunnel.close()
    server.stop()


def test_forward_local_slow_reader_blocks_sender(transport):
    host_port, manager_port = free_port(), free_port()
    flood = transport.start_process(
        [REAL_PYTHON, "-c", FLOOD_PEER, "listen", str(host_port), str(FLOOD_LIMIT)]
    )
    wait_for_log(flood, "listening")
    (tunnel,) = transport.forward_local([(manager_port, host_port)])

    with socket.create_connection(("127.0.0.1", manager_port), timeout=60) as client:
        # The client reads nothing until the host's sender stalls.
        _, sent, digest = wait_for_log(flood, "sent", timeout=120).split()
        assert int(sent) < MAX_BUFFERED, f"the host sent {sent} bytes to a reader that read none"

        received = read_to_eof(client)
        assert len(received) == int(sent)
        assert hashlib.sha256(received).hexdigest() == digest

    assert wait_for(lambda: tunnel.stream_count == 0)
    tunnel.close()


def test_forward_local_slow_steady_reader_keeps_order(transport):
    host_port, manager_port = free_port(), free_port()
    size = 16 * 1024 * 1024
    flood = transport.start_process(
        [REAL_PYTHON, "-c", FLOOD_PEER, "listen", str(host_port), str(size)]
    )
    wait_for_log(flood, "listening")
    (tunnel,) = transport.forward_local([(manager_port, host_port)])

    # A reader slower than the tunnel, with a small receive buffer, keeps the
    # manager's socket full, so packets arrive while earlier ones still wait
    # in the relay.
    digest = hashlib.sha256()
    received = 0
    with socket.socket() as client:
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8192)
        client.settimeout(60)
        client.connect(("127.0.0.1", manager_port))
        while data := client.recv(8192):
            digest.update(data)
            received += len(data)
    _, sent, sent_digest = wait_for_log(flood, "sent").split()

    assert int(sent) == size
    assert received == size
    assert digest.hexdigest() == sent_digest
    assert wait_for(lambda: tunnel.stream_count == 0)
    tunnel.close()


def test_forward_remote_slow_reader_blocks_sender(transport):
    host_port = free_port()
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        server.settimeout(30)
        (tunnel,) = transport.forward_remote([(host_port, server.getsockname()[1])])
        flood = transport.start_process(
            [REAL_PYTHON, "-c", FLOOD_PEER, "connect", str(host_port), str(FLOOD_LIMIT)]
        )
        connection, _ = server.accept()
        with connection:
            _, sent, digest = wait_for_log(flood, "sent", timeout=120).split()
            assert int(sent) < MAX_BUFFERED, (
                f"the host sent {sent} bytes to a reader that read none"
            )

            connection.settimeout(60)
            received = read_to_eof(connection)
            assert len(received) == int(sent)
            assert hashlib.sha256(received).hexdigest() == digest

    assert wait_for(lambda: tunnel.stream_count == 0)
    tunnel.close()


def test_tunnel_close_with_backlog_leaves_nothing(transport):
    host_port, manager_port = free_port(), free_port()
    flood = transport.start_process(
        [REAL_PYTHON, "-c", FLOOD_PEER, "listen", str(host_port), str(FLOOD_LIMIT)]
    )
    wait_for_log(flood, "listening")
    (tunnel,) = transport.forward_local([(manager_port, host_port)])
    threads_before = set(relay_threads())

    with socket.create_connection(("127.0.0.1", manager_port), timeout=60) as client:
        wait_for_log(flood, "sent", timeout=120)
        assert tunnel.stream_count == 1

        # Closing the tunnel ends the stalled stream, whose data waits in the
        # relay, and the client reads EOF after at most what was buffered.
        tunnel.close()
        assert tunnel.stream_count == 0
        assert len(read_to_eof(client)) < MAX_BUFFERED
    assert wait_for(lambda: set(relay_threads()) <= threads_before), relay_threads()
    flood.stop()


# Dropped connections and stopped hosts


def reconfigure_sshd(host, line: str) -> None:
    """Make `line` win over the image's sshd settings and reload sshd."""
    # sshd keeps the first value of most keywords but the last of a few, such as
    # MaxStartups. The main config includes sshd_config.d/*.conf in name order
    # before its own lines, so the line goes both first and last.
    script = (
        f"echo '{line}' > /etc/ssh/sshd_config.d/00-test.conf && "
        f"echo '{line}' >> /etc/ssh/sshd_config"
    )
    host.exec(["sh", "-c", script]).check()
    (listener,) = host_pids(host, "sshd: /usr/sbin/sshd")
    host.exec(["kill", "-s", "HUP", str(listener)]).check()

    # After SIGHUP, sshd re-executes itself and accepts connections again. The
    # old listener may still accept a connection for a moment, hence the pause first.
    time.sleep(1.0)

    def answers() -> bool:
        with socket.socket() as probe:
            probe.settimeout(1)
            try:
                probe.connect(("127.0.0.1", host.port))
                return probe.recv(4) == b"SSH-"
            except OSError:
                return False

    assert wait_for(answers)


def kill_ssh_sessions(host) -> None:
    """Kill the sshd session processes of the host's test user, as a network drop would."""
    for pid in host_pids(host, f"sshd: {host.user}"):
        host.exec(["kill", "-s", "KILL", str(pid)])


def test_reconnect_after_dropped_connection(nothing_left, ssh_backend, host):
    transport = ssh_backend.connect(host.alias)
    try:
        process = transport.start_process(["sleep", "4326"])
        kill_ssh_sessions(host)
        assert wait_for(lambda: not transport._connection.transport.is_active())

        # The process was detached, so it survived the drop; the next calls reconnect.
        assert transport.ports_in_use([22]) == {22}
        assert process.is_alive
        assert transport.run(["echo", "back"]).stdout == "back\n"
    finally:
        transport.close()
    assert not host_pids(host, "sleep 4326")


def test_host_stopped_mid_transfer(nothing_left, make_ssh_hosts, tmp_path):
    group = make_ssh_hosts(1)
    host = group[0]
    backend = SSHBackend(str(group.ssh_config_path))
    transport = backend.connect(host.alias)
    big = tmp_path / "big.bin"
    with open(big, "wb") as file:
        file.truncate(400 * 1024 * 1024)

    errors: list[BaseException] = []

    def copy() -> None:
        try:
            transport.put(str(big), f"{HOST_TMP}/big.bin")
        except BaseException as error:  # handed to the test thread
            errors.append(error)

    copier = threading.Thread(target=copy)
    copier.start()
    assert wait_for(
        lambda: host.exec(["sh", "-c", "test -s /tmp/big.bin"]).exit_code == 0, timeout=20
    )
    host.kill()
    copier.join(60)
    assert not copier.is_alive()
    assert len(errors) == 1
    assert isinstance(errors[0], ConnectionLostError), repr(errors[0])
    assert host.alias in str(errors[0])

    with pytest.raises(ConnectionLostError, match=host.alias):
        transport.run(["true"])
    transport.close()


def test_parallel_commands_beyond_max_sessions(transport):
    # sshd allows 10 sessions per connection by default; 20 parallel commands must queue, not fail.
    outputs = transport.clock.map(
        lambda index: transport.run(["sh", "-c", f"sleep 0.3; echo {index}"]).stdout.strip(),
        range(20),
    )
    assert outputs == [str(index) for index in range(20)]


def test_connect_retries_when_sshd_drops_handshakes(make_ssh_hosts, caplog):
    group = make_ssh_hosts(1)
    host = group[0]
    # With MaxStartups 1, sshd drops every connection that arrives while another
    # one is still in its handshake, as a busy sshd does beyond its limit.
    reconfigure_sshd(host, "MaxStartups 1")
    (listener,) = host_pids(host, "sshd: /usr/sbin/sshd")
    title = host.exec(["ps", "-o", "args=", "-p", str(listener)]).stdout
    assert "of 1-1 startups" in title

    backend = SSHBackend(str(group.ssh_config_path))
    with caplog.at_level(logging.INFO, logger="lazycluster.transport.ssh_connect"):
        transports = backend.clock.map(backend.connect, [host.alias] * 6)
    try:
        assert all(transport.run(["true"]).ok for transport in transports)
    finally:
        for transport in transports:
            transport.close()
    assert any("retry" in record.getMessage() for record in caplog.records)


def distinct_free_ports(count: int) -> list[int]:
    ports: list[int] = []
    while len(ports) < count:
        port = free_port()
        if port not in ports:
            ports.append(port)
    return ports


def test_forward_remote_large_batch(transport):
    server = EchoServer()
    ports = distinct_free_ports(150)
    try:
        tunnels = transport.forward_remote([(port, server.port) for port in ports])
        assert len(tunnels) == len(ports)
        assert transport.ports_in_use(ports) == set(ports)
        for port in (ports[0], ports[75], ports[-1]):
            result = transport.run(
                [REAL_PYTHON, "-c", ECHO_CLIENTS, str(port), "3", "10000"], timeout=30
            )
            assert result.stdout.strip() == "ok 3 []", result.stderr

        for tunnel in tunnels:
            tunnel.close()
        assert transport.ports_in_use(ports) == set()
        assert transport.tunnels == []
    finally:
        server.close()


def test_forward_remote_rejected_by_sshd(nothing_left, make_ssh_hosts):
    group = make_ssh_hosts(1)
    host = group[0]
    # "AllowTcpForwarding local" lets sshd open direct-tcpip channels but reject remote forwards.
    reconfigure_sshd(host, "AllowTcpForwarding local")

    server = EchoServer()
    transport = SSHBackend(str(group.ssh_config_path)).connect(host.alias)
    try:
        for count in (1, 6):
            pairs = [(port, server.port) for port in distinct_free_ports(count)]
            with pytest.raises(TransportError) as caught:
                transport.forward_remote(pairs)
            assert "AllowTcpForwarding" in str(caught.value)
            assert host.alias in str(caught.value)
            assert transport.tunnels == []
            assert transport.ports_in_use([port for port, _ in pairs]) == set()
    finally:
        transport.close()
        server.close()


def test_forward_remote_rejects_duplicate_port(transport):
    with pytest.raises(ValueError, match="appears twice"):
        transport.forward_remote([(40001, 50001), (40001, 50002)])


def test_run_error_in_on_output_kills_command(transport, host):
    def fail(line: str) -> None:
        raise RuntimeError(f"callback failed on {line!r}")

    with pytest.raises(RuntimeError, match="callback failed"):
        transport.run("echo start; sleep 4327", on_output=fail)
    assert wait_for(lambda: not host_pids(host, "sleep 4327"))


def test_tunnels_survive_reconnect(ssh_backend, host):
    server = EchoServer()
    transport = ssh_backend.connect(host.alias)
    try:
        host_port, manager_port, remote_port = distinct_free_ports(3)
        echo = start_echo_server(transport, host_port)
        (local_tunnel,) = transport.forward_local([(manager_port, host_port)])
        (remote_tunnel,) = transport.forward_remote([(remote_port, server.port)])
        assert exchange(manager_port, b"before") == b"before"

        kill_ssh_sessions(host)
        assert wait_for(lambda: not transport._connection.transport.is_active())

        # The local tunnel's listener stays on the manager and uses the new
        # connection; the remote forward is requested again after reconnecting.
        assert exchange(manager_port, b"after") == b"after"
        assert transport.ports_in_use([remote_port]) == {remote_port}
        result = transport.run([REAL_PYTHON, "-c", ECHO_CLIENTS, str(remote_port), "2", "1000"])
        assert result.stdout.strip() == "ok 2 []", result.stderr
        assert local_tunnel.is_open
        assert remote_tunnel.is_open
        echo.stop()
    finally:
        transport.close()
        server.close()


def test_default_key_in_home_ssh(ssh_hosts, tmp_path, monkeypatch):
    monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    default_key = home / ".ssh" / "id_ed25519"
    default_key.write_bytes(Path(ssh_hosts.key_path).read_bytes())
    default_key.chmod(0o600)
    monkeypatch.setenv("HOME", str(home))
    host = ssh_hosts[0]
    config = write_config(
        tmp_path / "config",
        f"Host default-key\n    HostName 127.0.0.1\n    Port {host.port}\n    User {ssh_hosts.user}\n"
        f"    UserKnownHostsFile {ssh_hosts.known_hosts_path}\n",
    )
    with SSHBackend(str(config)).connect("default-key") as transport:
        assert transport.run(["whoami"]).stdout.strip() == ssh_hosts.user


def test_passphrase_key_through_agent(ssh_hosts, tmp_path, monkeypatch):
    host = ssh_hosts[0]
    locked = tmp_path / "locked_key"
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "agent words", "-f", str(locked)], check=True
    )
    public_key = Path(f"{locked}.pub").read_text().strip()
    home = host.exec(["sh", "-c", f"getent passwd {ssh_hosts.user} | cut -d: -f6"]).stdout.strip()
    host.exec(
        ["sh", "-c", f"echo {shlex.quote(public_key)} >> {home}/.ssh/authorized_keys"]
    ).check()

    socket_path = tmp_path / "agent.sock"
    agent = subprocess.Popen(["ssh-agent", "-D", "-a", str(socket_path)], stdout=subprocess.DEVNULL)
    try:
        assert wait_for(socket_path.exists)
        askpass = tmp_path / "askpass.sh"
        askpass.write_text("#!/bin/sh\necho 'agent words'\n")
        askpass.chmod(0o700)
        env = {
            **os.environ,
            "SSH_AUTH_SOCK": str(socket_path),
            "SSH_ASKPASS": str(askpass),
            "SSH_ASKPASS_REQUIRE": "force",
        }
        subprocess.run(
            ["ssh-add", "-q", str(locked)], env=env, check=True, stdin=subprocess.DEVNULL
        )

        monkeypatch.setenv("SSH_AUTH_SOCK", str(socket_path))
        config = write_config(
            tmp_path / "config", host_block("via-agent", host, ssh_hosts, IdentityFile=str(locked))
        )
        with SSHBackend(str(config)).connect("via-agent") as transport:
            assert transport.run(["true"]).ok
    finally:
        agent.terminate()
        agent.wait(10)
        line = public_key.split()[1]
        host.exec(["sed", "-i", f"\\#{line}#d", f"{home}/.ssh/authorized_keys"]).check()


def test_home_relative_paths(transport):
    log_path = "~/lazycluster-home-test/out.log"
    try:
        process = transport.start_process(["pwd"], cwd="~", log_path=log_path)
        assert process.wait(timeout=10) == 0
        home = transport.run("echo $HOME").stdout.strip()
        assert process.read_log() == f"{home}\n"
        assert transport.run(["pwd"], cwd="~/lazycluster-home-test").stdout.strip() == (
            f"{home}/lazycluster-home-test"
        )
    finally:
        transport.run(["rm", "-rf", "lazycluster-home-test"])


def test_close_frees_many_remote_forwards(ssh_backend, host, nothing_left):
    server = EchoServer()
    ports = distinct_free_ports(60)
    transport = ssh_backend.connect(host.alias)
    try:
        transport.forward_remote([(port, server.port) for port in ports])
        assert transport.ports_in_use(ports) == set(ports)
    finally:
        transport.close()
        server.close()
    assert transport.tunnels == []
    leftovers = host.leftovers(temp_pattern="lazycluster-*")
    assert leftovers.listening_ports == ()
    assert leftovers.is_clean, str(leftovers)


def test_run_output_complete_under_load(transport, host, caplog):
    # Output that arrives together with EOF must not be lost, on either stream.
    # Commands this short often end before their EOF from us is on the wire,
    # which must not make sshd drop the connection (paramiko could send that
    # EOF after the channel's close, a protocol error for sshd).
    def run_once(index: int) -> tuple[str, str]:
        result = transport.run(f"printf 'out{index}'; printf 'err{index}' >&2")
        return result.stdout, result.stderr

    protocol_errors_before = host.logs(tail=10_000).count("nonexistent channel")
    with caplog.at_level(logging.WARNING, logger="lazycluster.transport.ssh"):
        for _ in range(5):
            results = transport.clock.map(run_once, range(300))
            assert results == [(f"out{index}", f"err{index}") for index in range(300)]

    assert host.logs(tail=10_000).count("nonexistent channel") == protocol_errors_before
    assert not [record.getMessage() for record in caplog.records]


def test_start_process_unwritable_log_raises(transport):
    with pytest.raises(CommandError) as caught:
        transport.start_process(["true"], log_path="/proc/lazycluster/out.log")
    assert transport.host in str(caught.value)
    assert "start true" in str(caught.value)
    assert transport.processes == []


def test_paused_host_timeouts_and_bounded_close(make_ssh_hosts, nothing_left):
    group = make_ssh_hosts(1)
    host = group[0]
    transport = SSHBackend(str(group.ssh_config_path)).connect(host.alias)
    transport.start_process(["sleep", "4328"])
    host.pause()
    try:
        started = time.monotonic()
        with pytest.raises(CommandTimeoutError, match=host.alias):
            transport.run(["true"], timeout=1.0)
        assert time.monotonic() - started < 10

        started = time.monotonic()
        transport.close()
        assert time.monotonic() - started < 30
    finally:
        host.unpause()


def test_connect_to_paused_host_times_out(make_ssh_hosts, tmp_path, nothing_left):
    group = make_ssh_hosts(1)
    host = group[0]
    config = write_config(
        tmp_path / "config", host_block("frozen", host, group, ConnectTimeout="2")
    )
    host.pause()
    try:
        started = time.monotonic()
        with pytest.raises(HostUnreachableError) as caught:
            SSHBackend(str(config)).connect("frozen")
        # A frozen host either lets the banner time out or resets the
        # connection, which is retried a few times with backoff.
        assert time.monotonic() - started < 20
        assert "'frozen'" in str(caught.value)
    finally:
        host.unpause()
