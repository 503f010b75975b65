"""Commands on simulated hosts: built-ins, registered handlers, the tiny shell, snippets."""

from __future__ import annotations

import json

import pytest

import sim
from lazycluster import host_commands
from lazycluster.exceptions import CommandTimeoutError
from sim.host import TMP_DIR


@pytest.fixture
def network() -> sim.Network:
    return sim.Network(["h1", "h2"], seed=5)


def test_echo_true_false(network):
    transport = network.connect("h1")
    assert transport.run(["echo", "-n", "a", "b"]).stdout == "a b"
    assert transport.run(["true"]).exit_code == 0
    assert transport.run(["false"]).exit_code == 1


def test_sleep_advances_virtual_time(network):
    transport = network.connect("h1")
    transport.run(["sleep", "12.5"])
    assert network.clock.monotonic() == pytest.approx(12.5)


def test_sleep_invalid_interval_fails(network):
    result = network.connect("h1").run(["sleep", "soon"])
    assert result.exit_code == 1
    assert "invalid time interval" in result.stderr


def test_timeout_stops_at_deadline(network):
    transport = network.connect("h1")
    with pytest.raises(CommandTimeoutError, match="timed out after 2 s"):
        transport.run("sleep 10 && echo done", timeout=2)
    assert network.clock.monotonic() == pytest.approx(2.0)


def test_unknown_command_exits_127(network):
    result = network.connect("h1").run("frobnicate --all")
    assert result.exit_code == 127
    assert "frobnicate" in result.stderr


def test_registered_handler_gets_argv_env_and_stdin(network):
    seen = {}

    def handler(call: sim.Call) -> int:
        seen.update(
            argv=call.argv, color=call.env.get("COLOR"), stdin=call.stdin, host=call.host.name
        )
        call.write("handled")
        call.write_error("warning")
        return 4

    network.register_command("tool", handler)
    result = network.connect("h2").run(["tool", "x y"], env={"COLOR": "red"}, stdin=b"in")

    assert seen == {"argv": ["tool", "x y"], "color": "red", "stdin": b"in", "host": "h2"}
    assert (result.exit_code, result.stdout, result.stderr) == (4, "handled\n", "warning\n")


def test_handler_returning_none_means_success(network):
    network.register_command("quiet", lambda call: None)
    assert network.connect("h1").run(["quiet"]).exit_code == 0


def test_handler_registered_for_one_host_only(network):
    network.register_command("nvidia-smi", lambda call: call.write("GPU 0"), hosts=["h1"])
    assert network.connect("h1").run(["nvidia-smi"]).stdout == "GPU 0\n"
    assert network.connect("h2").run(["nvidia-smi"]).exit_code == 127


def test_handler_for_unknown_host_raises(network):
    with pytest.raises(KeyError, match="nope"):
        network.register_command("tool", lambda call: 0, hosts=["nope"])


def test_shell_and_or_semicolon(network):
    transport = network.connect("h1")
    assert transport.run("false && echo no || echo yes; echo end").stdout == "yes\nend\n"
    assert transport.run("true || echo skipped").stdout == ""


def test_shell_variables_assignment_and_cd(network):
    transport = network.connect("h1")
    transport.run(["mkdir", "-p", "/data/run"])
    result = transport.run("cd /data && NAME=sim printenv_missing; echo $HOME ${USER} $UNSET.")
    assert result.stdout == "/home/lazy lazy .\n"
    assert transport.run("cd /missing").exit_code == 2


def test_shell_pipe_is_not_supported(network):
    with pytest.raises(NotImplementedError, match="does not \\(yet\\) support"):
        network.connect("h1").run("echo a | cat")


def test_mkdir_rm_mktemp(network):
    transport = network.connect("h1")
    path = transport.run(host_commands.make_temp_dir()).stdout.strip()
    assert path.startswith(f"{TMP_DIR}/lazycluster-")
    assert network.host("h1").fs.is_dir(path)

    assert transport.run(host_commands.make_dir(f"{path}/a/b")).exit_code == 0
    assert transport.run(["mkdir", f"{path}/x/y"]).exit_code == 1
    assert transport.run(host_commands.remove_dir(path)).exit_code == 0
    assert not network.host("h1").fs.exists(path)
    assert transport.run(["rm", path]).exit_code == 1


def test_printf_repeats_format(network):
    assert (
        network.connect("h1").run(["printf", "%s=%d\n", "a", "1", "b", "2"]).stdout == "a=1\nb=2\n"
    )


def test_removed_executable_is_not_found(network):
    network.host("h1").executables.discard("python3")
    result = network.connect("h1").run(
        host_commands.python_command(host_commands.HOST_INFO_SNIPPET)
    )
    assert result.exit_code == 127


def test_host_info_snippet_reports_specs():
    network = sim.Network(
        {"gpu": {"cpu_cores": 32, "gpus": ["Tesla T4, 15360 MiB"], "python_version": "3.10.13"}}
    )
    result = network.connect("gpu").run(
        host_commands.python_command(host_commands.HOST_INFO_SNIPPET)
    )
    info = json.loads(result.stdout)
    assert info["cpu_cores"] == 32
    assert info["gpus"] == ["Tesla T4, 15360 MiB"]
    assert info["python_version_info"] == [3, 10, 13]
    assert info["home"] == "/home/lazy"
    assert info["distributed_version"] == network.host("gpu").distributed_version


def test_distributed_version_snippet(network):
    network.host("h2").distributed_version = None
    command = host_commands.python_command(host_commands.DISTRIBUTED_VERSION_SNIPPET)
    assert (
        network.connect("h1").run(command).stdout.strip() == network.host("h1").distributed_version
    )
    assert network.connect("h2").run(command).stdout == ""


def test_unknown_snippet_is_not_supported(network):
    with pytest.raises(NotImplementedError, match="python snippet"):
        network.connect("h1").run(["python3", "-c", "print(1)"])


def test_registered_snippet(network):
    network.register_snippet("print(1)", lambda call: call.write("1"))
    assert network.connect("h1").run(["python3", "-c", "print(1)"]).stdout == "1\n"


def test_missing_executables_script(network):
    network.host("h1").executables.add("docker")
    command = host_commands.find_missing_executables(["docker", "kubectl", "python3"])
    assert network.connect("h1").run(command).stdout.split() == ["kubectl"]


def test_background_command_exits_after_its_sleep(network):
    handle = network.connect("h1").start_process("sleep 5 && echo woke")
    assert handle.poll() is None
    network.clock.sleep(4.9)
    assert handle.poll() is None
    network.clock.sleep(0.2)
    assert handle.poll() == 0
    assert "woke" in handle.read_log()
