"""The transport contract, checked on LocalTransport and on the simulator's transports.

Each test runs three times: on the real LocalTransport, on the simulated
manager (`network.local()`) and on a simulated remote host. A difference in
behaviour between the real and the simulated transport fails here.
"""

from __future__ import annotations

import os
import socket
import stat
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import pytest

import sim
from lazycluster.exceptions import CommandError, CommandTimeoutError, PortInUseError
from lazycluster.transport import Transport
from lazycluster.transport.local import LocalTransport


@dataclass
class World:
    """A transport plus ways to take ports on its host and on the manager."""

    transport: Transport
    manager: Transport
    hold_on_host: Callable[[int], object]
    hold_on_manager: Callable[[int], object]
    free_port: Callable[[], int]


def real_free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def real_world() -> Iterator[World]:
    transport = LocalTransport()
    sockets: list[socket.socket] = []

    def hold(port: int) -> None:
        listener = socket.socket()
        listener.bind(("127.0.0.1", port))
        listener.listen(1)
        sockets.append(listener)

    try:
        yield World(transport, transport, hold, hold, real_free_port)
    finally:
        transport.close()
        for listener in sockets:
            listener.close()


@contextmanager
def sim_world(remote: bool) -> Iterator[World]:
    network = sim.Network(1, seed=3)
    transport = network.connect("h1") if remote else network.local()
    ports = iter(range(41000, 42000))
    host = "h1" if remote else "localhost"
    try:
        yield World(
            transport,
            network.local(),
            lambda port: network.hold_port(host, port),
            lambda port: network.hold_port("localhost", port),
            lambda: next(ports),
        )
    finally:
        transport.close()


@pytest.fixture(params=["local", "sim-manager", "sim-remote"])
def world(request: pytest.FixtureRequest) -> Iterator[World]:
    if request.param == "local":
        with real_world() as made:
            yield made
    else:
        with sim_world(remote=request.param == "sim-remote") as made:
            yield made


# run


def test_run_argv_quotes_each_argument(world):
    result = world.transport.run(["printf", "%s\n", "a b; $HOME 'q'"])
    assert result.exit_code == 0
    assert result.stdout == "a b; $HOME 'q'\n"


def test_run_shell_string_with_env_and_exit_code(world):
    result = world.transport.run("echo $GREETING && false", env={"GREETING": "hello"})
    assert result.stdout == "hello\n"
    assert result.exit_code == 1
    assert not result.ok


@pytest.mark.parametrize("name", ["", "1ABC", "A-B", "A B", "A=B"])
def test_run_rejects_invalid_env_name(world, name):
    with pytest.raises(ValueError, match="environment variable"):
        world.transport.run(["true"], env={name: "x"})


def test_run_missing_cwd_is_nonzero_exit(world):
    result = world.transport.run(["true"], cwd="/no/such/directory/anywhere")
    assert result.exit_code != 0


def test_run_command_not_found_exits_127(world):
    result = world.transport.run(["no-such-command-lazycluster"])
    assert result.exit_code == 127


def test_run_nonzero_exit_check_raises_command_error(world):
    result = world.transport.run(["false"])
    with pytest.raises(CommandError) as caught:
        result.check()
    assert caught.value.result is result


def test_run_timeout_raises_command_timeout_error(world):
    with pytest.raises(CommandTimeoutError) as caught:
        world.transport.run(["sleep", "30"], timeout=0.3)
    assert isinstance(caught.value, TimeoutError)
    assert caught.value.host == world.transport.host


def test_run_streams_lines(world):
    lines: list[str] = []
    world.transport.run(["printf", "one\ntwo\n"], on_output=lines.append)
    assert lines == ["one", "two"]


def test_run_stdin_bytes(world):
    result = world.transport.run(["cat"], stdin=b"data from stdin\n")
    assert result.stdout == "data from stdin\n"


# processes


def test_start_process_logs_and_exits(world):
    handle = world.transport.start_process(["echo", "started"])
    assert handle.wait(timeout=10) == 0
    assert "started" in handle.read_log()
    assert handle in world.transport.processes


def test_start_process_not_found_exits_127(world):
    handle = world.transport.start_process(["no-such-command-lazycluster"])
    assert handle.wait(timeout=10) == 127


def test_process_wait_timeout(world):
    handle = world.transport.start_process(["sleep", "30"])
    with pytest.raises(CommandTimeoutError):
        handle.wait(timeout=0.2)
    assert handle.is_alive
    handle.stop()


def test_process_stop_reports_sigterm(world):
    handle = world.transport.start_process(["sleep", "30"])
    assert handle.poll() is None
    assert handle.stop(grace=5) == 128 + 15
    assert not handle.is_alive


def test_process_stop_after_exit_does_nothing(world):
    handle = world.transport.start_process(["true"])
    handle.wait(timeout=10)
    assert handle.stop() == 0


def test_read_log_max_lines(world):
    handle = world.transport.start_process(["printf", "a\nb\nc\n"])
    handle.wait(timeout=10)
    assert handle.read_log(max_lines=2) == "b\nc\n"
    assert handle.read_log(max_lines=0) == ""


def test_start_process_env_and_log_path(world, tmp_path):
    log_dir = str(tmp_path) if isinstance(world.transport, LocalTransport) else "/var/contract"
    handle = world.transport.start_process(
        "echo $COLOR", env={"COLOR": "blue"}, log_path=f"{log_dir}/sub/out.log"
    )
    handle.wait(timeout=10)
    assert handle.log_path == f"{log_dir}/sub/out.log"
    assert handle.read_log() == "blue\n"


# files


def test_put_and_get_file_keep_mode(world, tmp_path):
    source = tmp_path / "script.sh"
    source.write_text("echo hi\n")
    source.chmod(0o750)
    remote = str(tmp_path / "remote" / "copy.sh")
    back = tmp_path / "back" / "copy.sh"

    world.transport.put(str(source), remote)
    world.transport.get(remote, str(back))

    assert back.read_text() == "echo hi\n"
    assert stat.S_IMODE(os.stat(back).st_mode) == 0o750


def test_put_folder_recursively(world, tmp_path):
    (tmp_path / "tree" / "inner").mkdir(parents=True)
    (tmp_path / "tree" / "inner" / "leaf.txt").write_text("leaf")
    remote = str(tmp_path / "remote-tree")

    world.transport.put(str(tmp_path / "tree"), remote)
    result = world.transport.run(["cat", f"{remote}/inner/leaf.txt"])

    assert result.stdout == "leaf"


def test_put_missing_source_raises(world, tmp_path):
    with pytest.raises(OSError):
        world.transport.put(str(tmp_path / "missing"), str(tmp_path / "target"))


# ports and tunnels


def test_ports_in_use_sees_held_port(world):
    port = world.free_port()
    other = world.free_port()
    world.hold_on_host(port)
    assert world.transport.ports_in_use([port, other]) == {port}


def test_ports_in_use_empty_list(world):
    assert world.transport.ports_in_use([]) == set()


@pytest.mark.parametrize("port", [0, -1, 65536])
def test_ports_in_use_rejects_out_of_range(world, port):
    with pytest.raises(ValueError):
        world.transport.ports_in_use([port])


@pytest.mark.parametrize("port", ["8000", 8000.0, True, None])
def test_ports_in_use_rejects_non_int(world, port):
    with pytest.raises(TypeError):
        world.transport.ports_in_use([port])


def test_local_tunnel_holds_port_until_closed(world):
    listen, target = world.free_port(), world.free_port()
    tunnel = world.transport.forward_local([(listen, target)])[0]

    assert tunnel.is_open
    assert listen in world.manager.ports_in_use([listen])
    assert tunnel in world.transport.tunnels

    tunnel.close()
    tunnel.close()
    assert not tunnel.is_open
    assert world.manager.ports_in_use([listen]) == set()
    assert tunnel not in world.transport.tunnels


def test_tunnel_listen_port_taken_raises(world):
    taken, free, target = world.free_port(), world.free_port(), world.free_port()
    world.hold_on_manager(taken)
    with pytest.raises(PortInUseError):
        world.transport.forward_local([(free, target), (taken, target)])
    assert world.manager.ports_in_use([free]) == set()


def test_close_stops_processes_and_tunnels(world):
    handle = world.transport.start_process(["sleep", "30"])
    listen = world.free_port()
    world.transport.forward_local([(listen, world.free_port())])

    world.transport.close()
    world.transport.close()

    assert not handle.is_alive
    assert (
        world.manager.ports_in_use([listen]) == set()
        if world.manager is not world.transport
        else True
    )


@pytest.mark.parametrize(
    ("pair", "error"),
    [((0, 5000), ValueError), ((5000, 70000), ValueError), (("5000", 5001), TypeError)],
)
def test_tunnel_rejects_invalid_port(world, pair, error):
    with pytest.raises(error):
        world.transport.forward_local([pair])
    assert world.transport.tunnels == []


def test_tunnel_duplicate_listen_port_in_batch_raises(world):
    listen = world.free_port()
    with pytest.raises(PortInUseError):
        world.transport.forward_local([(listen, world.free_port()), (listen, world.free_port())])
    assert world.manager.ports_in_use([listen]) == set()
