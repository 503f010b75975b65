"""RuntimeTask on named local hosts: steps, logs, functions, errors and async execution."""

from __future__ import annotations

import copy
import os
import sys
import threading

import cloudpickle
import pytest

from lazycluster import Runtime, RuntimeTask, TaskExecutionError
from tests.unit.runtime_fixtures import backend  # noqa: F401 - pytest fixture

# The hosts cannot import this test module, so its functions travel by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])


@pytest.fixture
def runtime(backend):  # noqa: F811
    with Runtime("node-1") as runtime:
        yield runtime


def double(value):
    return value * 2


def fail_with_key_error():
    raise KeyError("missing-key")


# --- building steps -----------------------------------------------------------------


def test_name_generated_when_missing():
    first, second = RuntimeTask(), RuntimeTask()
    assert first.name
    assert first.name != second.name


def test_name_empty_rejected():
    with pytest.raises(ValueError, match="task name"):
        RuntimeTask("  ")


def test_builders_chain():
    task = RuntimeTask("chain")
    assert task.run_command("true").run_function(double, value=1) is task


@pytest.mark.parametrize("command", ["", "   ", "\n"])
def test_run_command_empty_rejected(command):
    with pytest.raises(ValueError, match="command"):
        RuntimeTask().run_command(command)


def test_run_command_non_string_rejected():
    with pytest.raises(TypeError, match="command"):
        RuntimeTask().run_command(["ls", "-l"])


def test_send_file_missing_local_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no-such-file"):
        RuntimeTask().send_file(str(tmp_path / "no-such-file"))


@pytest.mark.parametrize("path", ["", " "])
def test_file_steps_empty_path_rejected(path):
    with pytest.raises(ValueError):
        RuntimeTask().send_file(path)
    with pytest.raises(ValueError):
        RuntimeTask().get_file(path)


def test_run_function_not_callable():
    with pytest.raises(TypeError, match="callable"):
        RuntimeTask().run_function(42)


def test_run_function_unpicklable_rejected():
    lock = threading.Lock()
    with pytest.raises(TypeError, match="cloudpickle"):
        RuntimeTask().run_function(lambda: lock.locked())


def test_env_variables_invalid():
    task = RuntimeTask()
    with pytest.raises(ValueError, match="name"):
        task.env_variables = {"1BAD": "x"}
    with pytest.raises(ValueError, match="name"):
        task.env_variables = {"A B": "x"}
    with pytest.raises(TypeError, match="string"):
        task.env_variables = {"GOOD": 3}


# --- execution ----------------------------------------------------------------------


def test_command_runs_in_working_dir(runtime):
    task = RuntimeTask("pwd").run_command('pwd; echo "dir=$WORKING_DIR"')
    runtime.execute_task(task, execute_async=False)
    assert task.execution_log == [
        f'$ pwd; echo "dir=$WORKING_DIR"\n{runtime.working_dir}\ndir={runtime.working_dir}'
    ]


def test_log_one_entry_per_step(runtime):
    task = RuntimeTask("steps").run_command("echo one").run_command("echo two")
    runtime.execute_task(task, execute_async=False)
    assert len(task.execution_log) == 2
    assert "one" in task.execution_log[0]
    assert "two" in task.execution_log[1]


def test_log_file_under_main_directory(runtime, tmp_path):
    task = RuntimeTask("logged").run_command("echo written-to-file")
    runtime.execute_task(task, execute_async=False)
    path = task.execution_log_file_path
    assert path.startswith(str(tmp_path / "main" / "execution_log" / "node-1" / "logged_"))
    with open(path, encoding="utf-8") as log_file:
        assert "written-to-file" in log_file.read()


def test_debug_prints_output(runtime, capsys):
    runtime.execute_task(RuntimeTask().run_command("echo shown"), execute_async=False, debug=True)
    assert "node-1: shown" in capsys.readouterr().out


def test_no_debug_prints_nothing(runtime, capsys):
    runtime.execute_task(RuntimeTask().run_command("echo hidden"), execute_async=False)
    assert "hidden" not in capsys.readouterr().out


def test_failing_command_stops_task(runtime):
    task = RuntimeTask("fails").run_command("echo before; exit 3").run_command("echo after")
    with pytest.raises(TaskExecutionError) as caught:
        runtime.execute_task(task, execute_async=False)
    error = caught.value
    assert error.task_step_index == 0
    assert error.host == "node-1"
    assert "Exit code 3" in error.output
    assert "before" in error.output
    assert error.execution_log_file_path == task.execution_log_file_path
    assert len(task.execution_log) == 1


def test_function_return_values(runtime):
    task = RuntimeTask().run_function(double, value=21).run_function(double, value="ab")
    runtime.execute_task(task, execute_async=False)
    assert list(task.function_returns) == [42, "abab"]


def test_function_output_in_log(runtime):
    def shout():
        print("printed by function")
        os.system("echo printed by child process")
        return "value"

    task = RuntimeTask().run_function(shout)
    runtime.execute_task(task, execute_async=False)
    assert "printed by function" in task.execution_log[0]
    assert "printed by child process" in task.execution_log[0]
    assert list(task.function_returns) == ["value"]


def test_function_sees_working_dir(runtime):
    task = RuntimeTask().run_function(lambda: (os.getcwd(), os.environ["WORKING_DIR"]))
    runtime.execute_task(task, execute_async=False)
    assert list(task.function_returns) == [(runtime.working_dir, runtime.working_dir)]


def test_function_raising(runtime):
    task = RuntimeTask("raises").run_command("true").run_function(fail_with_key_error)
    with pytest.raises(TaskExecutionError) as caught:
        runtime.execute_task(task, execute_async=False)
    error = caught.value
    assert error.task_step_index == 1
    assert "Traceback" in error.output
    assert "fail_with_key_error" in error.output
    assert "missing-key" in error.output
    assert isinstance(error.__cause__, KeyError)


def test_unpicklable_return_value(runtime):
    task = RuntimeTask().run_function(threading.Lock)
    with pytest.raises(TaskExecutionError, match="could not be pickled"):
        runtime.execute_task(task, execute_async=False)


def test_env_values_kept_verbatim(runtime):
    tricky = "it's \"quoted\" $HOME `date`; echo x\nsecond line \\ end"
    runtime.add_env_variables({"TRICKY": tricky})
    task = RuntimeTask()
    task.env_variables = {"OWN": "a'b"}
    task.run_function(lambda: (os.environ["TRICKY"], os.environ["OWN"]))
    task.run_command('printf "%s" "$TRICKY"')
    runtime.execute_task(task, execute_async=False)
    assert list(task.function_returns) == [(tricky, "a'b")]
    assert task.execution_log[1].endswith(tricky)


def test_send_and_get_file(runtime, tmp_path):
    source = tmp_path / "data.txt"
    source.write_text("payload\n")
    target = tmp_path / "back" / "copy.txt"
    task = (
        RuntimeTask()
        .send_file(str(source))
        .run_command("cat data.txt > copy.txt")
        .get_file("copy.txt", str(target))
    )
    runtime.execute_task(task, execute_async=False)
    assert os.path.exists(os.path.join(runtime.working_dir, "data.txt"))
    assert target.read_text() == "payload\n"


def test_get_missing_remote_file(runtime, tmp_path):
    task = RuntimeTask().get_file("absent.txt", str(tmp_path / "x"))
    with pytest.raises(TaskExecutionError, match="absent.txt"):
        runtime.execute_task(task, execute_async=False)


def test_deepcopy_has_own_state(runtime):
    task = RuntimeTask("original").run_function(double, value=2)
    runtime.execute_task(task, execute_async=False)
    clone = copy.deepcopy(task)
    assert clone.name == "original"
    assert clone.execution_log == []
    runtime.execute_task(clone, execute_async=False)
    assert list(clone.function_returns) == [4]
    assert len(task.execution_log) == 1


def test_async_returns_and_join_waits(runtime, tmp_path):
    marker = tmp_path / "marker"
    task = RuntimeTask().run_command(f"sleep 0.3; touch {marker}")
    runtime.execute_task(task, execute_async=True)
    assert task.process is not None
    assert not marker.exists()
    task.join()
    assert marker.exists()
    assert not task.is_running


def test_async_failure_raised_on_join(runtime):
    task = RuntimeTask().run_command("exit 1")
    runtime.execute_task(task)
    with pytest.raises(TaskExecutionError):
        task.join()


def test_async_function_returns_waits(runtime):
    task = RuntimeTask().run_command("sleep 0.2").run_function(double, value=5)
    runtime.execute_task(task)
    assert list(task.function_returns) == [10]


def test_running_task_not_restartable(runtime):
    task = RuntimeTask().run_command("sleep 0.5")
    runtime.execute_task(task)
    with pytest.raises(ValueError, match="already running"):
        runtime.execute_task(task)
    task.join()


def test_execute_with_transport(backend):  # noqa: F811
    transport = backend.connect("node-2")
    task = RuntimeTask().run_command("echo direct")
    task.execute(transport)
    assert "direct" in task.execution_log[0]
    assert task.host == "node-2"


def test_execute_with_bad_connection():
    with pytest.raises(TypeError, match="connection"):
        RuntimeTask().run_command("true").execute("node-1")


def test_async_task_stopped_by_cleanup(backend):  # noqa: F811
    runtime = Runtime("node-1")
    task = runtime.execute_task(RuntimeTask().run_command("sleep 600"), omit_on_join=True)
    transport = backend.transports_of("node-1")[0]
    assert transport.clock.wait_until(lambda: len(transport.processes) == 1, 10)
    process = transport.processes[0]
    runtime.cleanup()
    assert process.poll() is not None
    with pytest.raises(TaskExecutionError):
        task.join()


def test_async_function_payload_removed(runtime):
    task = runtime.execute_task(RuntimeTask().run_function(double, value=4))
    assert list(task.function_returns) == [8]
    assert [name for name in os.listdir(runtime.working_dir) if name.endswith(".pickle")] == []


def test_async_debug_prints_while_running(runtime, capsys, tmp_path):
    release = tmp_path / "release"
    command = f"echo early; while [ ! -e {release} ]; do sleep 0.05; done; echo late"
    task = runtime.execute_task(RuntimeTask().run_command(command), debug=True)
    assert runtime.transport.clock.wait_until(lambda: "node-1: early" in capsys.readouterr().out, 10)
    release.touch()
    task.join()
    assert task.execution_log[0].splitlines()[1:] == ["early", "late"]
