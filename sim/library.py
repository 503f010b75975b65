"""Handlers for the commands the library itself runs (`lazycluster.host_commands`).

The snippets are matched by their exact text, so a snippet changed in
`host_commands` without a matching change here fails loudly with
NotImplementedError instead of being approximated.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import traceback
from collections.abc import Iterator
from typing import TYPE_CHECKING

import cloudpickle

from lazycluster import host_commands
from sim.commands import Call

if TYPE_CHECKING:
    from sim.network import Network


def install(network: Network) -> None:
    """Register handlers for the library's own snippets and scripts on `network`."""
    network.register_snippet(host_commands.HOST_INFO_SNIPPET, host_info)
    network.register_snippet(host_commands.DISTRIBUTED_VERSION_SNIPPET, distributed_version)
    network.register_snippet(host_commands.FUNCTION_RUNNER_SNIPPET, run_function)
    network.register_script(host_commands.MISSING_EXECUTABLES_SCRIPT, missing_executables)


def host_info(call: Call) -> int:
    host = call.host
    version_info = [int(part) for part in host.python_version.split(".")[:3]]
    call.write(
        json.dumps(
            {
                "python_version": host.python_version,
                "python_version_info": version_info,
                "os": host.os,
                "cpu_cores": host.cpu_cores,
                "memory": host.memory,
                "gpus": list(host.gpus),
                "home": host.home,
                "distributed_version": host.distributed_version,
            }
        )
    )
    return 0


def distributed_version(call: Call) -> int:
    if call.host.distributed_version:
        call.write(call.host.distributed_version)
    return 0


def missing_executables(call: Call) -> int:
    """`sh -c SCRIPT sh NAME...`: print each name that is not installed."""
    for name in call.argv[1:]:
        if call.network.find_command(call.host, name) is None:
            call.write(name)
    return 0


@contextlib.contextmanager
def host_environment(env: dict[str, str]) -> Iterator[None]:
    """Swap the process environment for the host's while a shipped function runs."""
    # NOTE: os.environ is process-wide. The simulator runs one call at a time,
    # so no other simulated code runs while the environment is swapped.
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(env)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def run_function(call: Call) -> int:
    """Run a cloudpickled (function, kwargs) from stdin in-process, like the real runner."""
    try:
        payload = call.stdin
        if len(call.argv) > 3:
            # `python3 -c SNIPPET PATH`: the payload is in a file the runner deletes after reading.
            path = call.resolve(call.argv[3])
            payload = call.host.fs.read(path)
            call.host.fs.remove(path)
        function, kwargs = cloudpickle.loads(payload)
    except Exception:
        call.write_error("Failed to load the function sent by the manager with cloudpickle.")
        call.write_error(traceback.format_exc())
        return host_commands.FUNCTION_RUNNER_SETUP_EXIT_CODE

    # What the function prints goes to stderr, as with the real runner.
    printed = io.StringIO()
    with host_environment(call.env), contextlib.redirect_stdout(printed):
        try:
            outcome = {"ok": True, "value": function(**kwargs)}
        except Exception as error:
            text = traceback.format_exc()
            printed.write(text)
            outcome = {
                "ok": False,
                "error": f"{type(error).__name__}: {error}",
                "traceback": text,
                "exception": _pickle_or_none(error),
            }
    if printed.getvalue():
        call.write_error(printed.getvalue())

    try:
        payload = cloudpickle.dumps(outcome)
    except Exception as error:
        text = traceback.format_exc()
        call.write_error(text)
        outcome = {
            "ok": False,
            "traceback": text,
            "exception": None,
            "error": f"The return value could not be pickled: {error}",
        }
        payload = cloudpickle.dumps(outcome)

    call.write(host_commands.FUNCTION_RESULT_MARKER + base64.b64encode(payload).decode("ascii"))
    return 0 if outcome["ok"] else host_commands.FUNCTION_RAISED_EXIT_CODE


def _pickle_or_none(error: BaseException) -> bytes | None:
    try:
        return cloudpickle.dumps(error)
    except Exception:
        return None
