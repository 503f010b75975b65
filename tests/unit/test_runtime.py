"""Runtime on named local hosts: construction checks, working dirs, env, info, files, filters."""

from __future__ import annotations

import json
import os
import sys

import cloudpickle
import pytest

from lazycluster import (
    InvalidRuntimeError,
    PathCreationError,
    Runtime,
    RuntimeTask,
)
from lazycluster.runtime import _live_runtimes
from tests.unit.runtime_fixtures import backend  # noqa: F401 - pytest fixture

cloudpickle.register_pickle_by_value(sys.modules[__name__])


@pytest.fixture
def runtime(backend):  # noqa: F811
    with Runtime("node-1") as runtime:
        yield runtime


def write_fake_python(directory, script: str) -> None:
    path = directory / "python3"
    path.write_text("#!/bin/sh\n" + script)
    path.chmod(0o755)


# --- construction --------------------------------------------------------------------


@pytest.mark.parametrize("host", ["", "  ", "two words", "-oProxyCommand=x"])
def test_host_invalid_value(backend, host):  # noqa: F811
    with pytest.raises(ValueError, match="host"):
        Runtime(host)
    assert backend.connected == []


def test_host_invalid_type(backend):  # noqa: F811
    with pytest.raises(TypeError, match="host"):
        Runtime(42)


def test_unreachable_host(backend):  # noqa: F811
    backend.unreachable.add("node-1")
    with pytest.raises(InvalidRuntimeError) as caught:
        Runtime("node-1")
    assert caught.value.host == "node-1"
    assert "unreachable" in str(caught.value)


def test_python_missing(backend, tmp_path, monkeypatch):  # noqa: F811
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    with pytest.raises(InvalidRuntimeError, match="python3 was not found"):
        Runtime("node-1")
    assert backend.transports_of("node-1")[0].closed


def test_python_too_old(backend, tmp_path, monkeypatch):  # noqa: F811
    old_bin = tmp_path / "old-bin"
    old_bin.mkdir()
    info = {"python_version": "3.6.15", "python_version_info": [3, 6, 15]}
    write_fake_python(old_bin, f"echo '{json.dumps(info)}'\n")
    monkeypatch.setenv("PATH", f"{old_bin}{os.pathsep}{os.environ['PATH']}")
    with pytest.raises(InvalidRuntimeError, match="3.6.15, need 3.8"):
        Runtime("node-1")


def test_construction_one_round_trip(backend):  # noqa: F811
    runtime = Runtime("node-1")
    assert len(backend.transports_of("node-1")[0].commands) == 1
    assert runtime.cpu_cores >= 1
    runtime.cleanup()


@pytest.mark.parametrize(
    "working_dir", ["/data/with space", "/data/it's", '/data/"q"', "/data/$HOME", "/data/a;rm -rf x", "-x", ""]
)
def test_working_dir_rejected(backend, working_dir):  # noqa: F811
    with pytest.raises(ValueError, match="working_dir"):
        Runtime("node-1", working_dir=working_dir)
    assert backend.connected == []


def test_connection_kwargs_type(backend):  # noqa: F811
    with pytest.raises(TypeError, match="connection_kwargs"):
        Runtime("node-1", connection_kwargs=["port", 22])


# --- working directory -----------------------------------------------------------------


def test_temp_working_dir_removed(backend):  # noqa: F811
    runtime = Runtime("node-1")
    working_dir = runtime.working_dir
    assert os.path.basename(working_dir).startswith("lazycluster-")
    assert os.path.isdir(working_dir)
    runtime.cleanup()
    assert not os.path.exists(working_dir)


def test_temp_working_dir_lazy(backend):  # noqa: F811
    runtime = Runtime("node-1")
    runtime.cleanup()
    commands = backend.transports_of("node-1")[0].commands
    assert not any("mktemp" in command for command in commands)


def test_given_working_dir_created_and_kept(backend, tmp_path):  # noqa: F811
    path = tmp_path / "new" / "dir"
    runtime = Runtime("node-1", working_dir=str(path))
    assert path.is_dir()
    assert runtime.working_dir == str(path)
    runtime.cleanup()
    assert path.is_dir()


def test_relative_working_dir_in_home(backend, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setenv("HOME", str(tmp_path))
    with Runtime("node-1", working_dir="~/jobs/one") as runtime:
        assert runtime.working_dir == str(tmp_path / "jobs" / "one")
    with Runtime("node-1", working_dir="jobs/two") as runtime:
        assert runtime.working_dir == str(tmp_path / "jobs" / "two")
    assert (tmp_path / "jobs" / "two").is_dir()


def test_working_dir_not_creatable(backend, tmp_path):  # noqa: F811
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(PathCreationError) as caught:
        Runtime("node-1", working_dir=str(blocker / "sub"))
    assert caught.value.host == "node-1"
    assert _live_runtimes_of("node-1") == []


def test_working_dir_setter(runtime, tmp_path):
    runtime.working_dir = str(tmp_path / "other")
    assert (tmp_path / "other").is_dir()
    assert runtime.env_variables["WORKING_DIR"] == str(tmp_path / "other")
    with pytest.raises(ValueError, match="working_dir"):
        runtime.working_dir = "/data/bad dir"


def test_create_and_delete_dir(runtime, tmp_path):
    target = tmp_path / "a b" / "c"
    runtime.create_dir(str(target))
    assert target.is_dir()
    assert runtime.delete_dir(str(tmp_path / "a b"))
    assert not (tmp_path / "a b").exists()


@pytest.mark.parametrize("path", ["/", "/.", "."])
def test_delete_dir_rejects_root(runtime, path):
    with pytest.raises(ValueError, match="Pass a subdirectory"):
        runtime.delete_dir(path)


def test_create_tempdir_removed_at_cleanup(backend):  # noqa: F811
    runtime = Runtime("node-1")
    path = runtime.create_tempdir()
    assert os.path.isdir(path)
    runtime.cleanup()
    assert not os.path.exists(path)


# --- environment and info ----------------------------------------------------------------


def test_env_variables_include_working_dir(runtime):
    runtime.env_variables = {"A": "1"}
    runtime.add_env_variables({"B": "2"})
    assert runtime.env_variables == {"A": "1", "B": "2", "WORKING_DIR": runtime.working_dir}


def test_env_working_dir_reserved(runtime):
    with pytest.raises(ValueError, match="WORKING_DIR"):
        runtime.add_env_variables({"WORKING_DIR": "/data"})


def test_env_invalid_name_rejected(runtime):
    with pytest.raises(ValueError, match="name"):
        runtime.env_variables = {"X;rm": "1"}
    with pytest.raises(TypeError):
        runtime.env_variables = ["A=1"]


def test_info_values(runtime):
    info = runtime.info
    assert set(info) == {"os", "cpu_cores", "memory", "python_version", "gpus"}
    assert runtime.cpu_cores == (len(os.sched_getaffinity(0)))
    assert runtime.memory_in_mb == runtime.memory // (1024 * 1024)
    assert runtime.memory > 0
    assert runtime.python_version == ".".join(map(str, sys.version_info[:3]))
    assert runtime.gpu_count == len(runtime.gpus)
    assert runtime.class_name == "Runtime"


def test_echo_verbatim(runtime):
    for message in ["hello", "-n", "a\\nb", "it's $HOME"]:
        assert runtime.echo(message) == message


# --- tasks through the runtime -------------------------------------------------------------


def test_execute_function(runtime):
    task = runtime.execute_function(lambda a, b: a + b, a=2, b=3)
    assert list(task.function_returns) == [5]


def test_send_and_get_file(runtime, tmp_path):
    source = tmp_path / "in.txt"
    source.write_text("content")
    runtime.send_file(str(source), "sub/in.txt")
    assert os.path.isfile(os.path.join(runtime.working_dir, "sub", "in.txt"))
    runtime.get_file("sub/in.txt", str(tmp_path / "out.txt"))
    assert (tmp_path / "out.txt").read_text() == "content"


def test_send_file_missing(runtime, tmp_path):
    with pytest.raises(FileNotFoundError):
        runtime.send_file(str(tmp_path / "absent"))


def test_execute_task_type(runtime):
    with pytest.raises(TypeError, match="RuntimeTask"):
        runtime.execute_task("echo hi")


def test_join_and_function_returns(runtime):
    runtime.execute_task(RuntimeTask().run_function(lambda: 1))
    runtime.execute_task(RuntimeTask().run_function(lambda: 2))
    runtime.join()
    assert list(runtime.function_returns) == [1, 2]
    assert runtime.alive_task_process_count == 0
    assert len(runtime.task_processes) == 2


def test_join_raises_failure(runtime):
    runtime.execute_task(RuntimeTask().run_command("exit 4"))
    with pytest.raises(Exception, match="Exit code 4"):
        runtime.join()


def test_join_skips_omitted(runtime, tmp_path):
    task = runtime.execute_task(RuntimeTask().run_command("sleep 2"), omit_on_join=True)
    runtime.join()
    assert task.is_running
    task.join()


def test_execution_log_by_name(runtime):
    runtime.execute_task(RuntimeTask("named").run_command("echo logged"), execute_async=False)
    assert "logged" in runtime.execution_log("named")[0]
    with pytest.raises(ValueError, match="unknown"):
        runtime.execution_log("unknown")


def test_clear_tasks(runtime):
    task = runtime.execute_task(RuntimeTask("cleared").run_command("true"), execute_async=False)
    assert task in runtime.get_processes().values()
    runtime.clear_tasks()
    assert runtime.get_processes() == {}
    assert list(runtime.function_returns) == []


# --- filters ---------------------------------------------------------------------------------


def test_check_filter(runtime):
    assert runtime.check_filter()
    assert runtime.check_filter(min_cpu_cores=1, min_memory=1)
    assert not runtime.check_filter(min_cpu_cores=100_000)
    assert not runtime.check_filter(min_memory=10**9)
    assert runtime.check_filter(gpu_required=True) == (runtime.gpu_count > 0)


def test_check_filter_executables(runtime):
    assert runtime.check_filter(installed_executables="sh")
    assert runtime.check_filter(installed_executables=["sh", "python3"])
    assert not runtime.check_filter(installed_executables=["sh", "no-such-tool-4711"])
    with pytest.raises(ValueError):
        runtime.check_filter(installed_executables=["two words"])


def test_check_filter_commands(runtime):
    assert runtime.check_filter(filter_commands="echo true")
    assert runtime.check_filter(filter_commands=['test -d "$WORKING_DIR" && echo true'])
    assert not runtime.check_filter(filter_commands=["echo true", "echo false"])
    assert not runtime.check_filter(filter_commands="exit 1")


# --- cleanup -----------------------------------------------------------------------------------


def test_cleanup_idempotent(backend):  # noqa: F811
    runtime = Runtime("node-1")
    runtime.working_dir  # noqa: B018 - creates the temporary directory
    runtime.cleanup()
    runtime.cleanup()
    transport = backend.transports_of("node-1")[0]
    assert transport.closed
    assert sum(command.startswith("rm ") for command in transport.commands) == 1
    assert runtime not in _live_runtimes


def test_usable_after_cleanup(backend):  # noqa: F811
    runtime = Runtime("node-1")
    runtime.cleanup()
    assert runtime.echo("again") == "again"
    assert len(backend.transports_of("node-1")) == 2
    runtime.cleanup()


def test_context_manager_cleans_up(backend):  # noqa: F811
    with Runtime("node-1") as runtime:
        working_dir = runtime.working_dir
    assert not os.path.exists(working_dir)


def _live_runtimes_of(host: str) -> list[Runtime]:
    return [runtime for runtime in _live_runtimes if runtime.host == host]


EXIT_SCRIPT = """
import json
from lazycluster import Runtime, RuntimeTask
from lazycluster.transport.local import LocalTransport

runtime = Runtime("localhost", transport=LocalTransport())
for index in range(3):
    runtime.execute_task(RuntimeTask().run_command("sleep 600"), omit_on_join=True)
transport = runtime.transport
transport.clock.wait_until(lambda: len(transport.processes) == 3, 10)
print(json.dumps({"pids": [process.pid for process in transport.processes],
                  "working_dir": runtime.working_dir}))
"""


def _process_running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as stat:
            return stat.read().rpartition(")")[2].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False


def test_cleanup_at_interpreter_exit(backend, tmp_path):  # noqa: F811
    import subprocess

    completed = subprocess.run(
        [sys.executable, "-c", EXIT_SCRIPT], capture_output=True, text=True, timeout=120, cwd=tmp_path
    )
    assert completed.returncode == 0, completed.stderr
    started = json.loads(completed.stdout.strip().splitlines()[-1])
    assert len(started["pids"]) == 3
    assert not [pid for pid in started["pids"] if _process_running(pid)]
    assert not os.path.exists(started["working_dir"])
    assert "Traceback" not in completed.stderr


def test_cleanup_on_shared_manager_transport(backend):  # noqa: F811
    runtime = Runtime("localhost", transport=backend.manager)
    task = runtime.execute_task(RuntimeTask().run_command("sleep 600"), omit_on_join=True)
    assert backend.manager.clock.wait_until(lambda: task._current_process is not None, 10)
    process = task._current_process
    runtime.cleanup()
    assert process.poll() is not None
    assert not any(process.is_alive for process in backend.manager.processes)
    assert runtime.transport is backend.manager
    assert backend.manager.run(["true"]).ok
