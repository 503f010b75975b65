"""Round trips on warm SSH connections: a command, a function, a port search.

Baselines: OpenSSH's `ssh -F CONFIG HOST true`, which opens a new connection
each time, and a port check that opens one SSH connection per port and starts
Python there, as lazycluster 0.2 did.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from bench.context import Context
from bench.report import Section, at_most
from bench.stats import Sample, repeat

log = logging.getLogger(__name__)

TITLE = "Commands, functions and port search"

PORT_CANDIDATES = list(range(41000, 41200))
# The one-connection-per-port baseline runs on this many ports and is scaled to 200.
NAIVE_PORTS = 5

PORT_CHECK_SNIPPET = (
    "import socket,sys\n"
    "s=socket.socket()\n"
    "try:\n s.bind(('127.0.0.1',int(sys.argv[1])))\nexcept OSError:\n sys.exit(1)\n"
)


def square(value: int) -> int:
    return value * value


def measure_run_true(context: Context, section: Section, transport: Any) -> None:
    alias = context.hosts.aliases[0]
    section.add("run-true", "`run(\"true\")` on a warm SSHTransport", repeat(lambda: transport.run("true").check(), context.runs(50, 10), warmup=3))

    # The same exec request on the same connection without the library: what
    # sshd and paramiko cost by themselves.
    connection = transport._connection.transport  # noqa: SLF001 - a private look for the baseline
    section.add("raw-true", "paramiko `exec_command(\"true\")` on the same connection", repeat(lambda: raw_exec(connection), context.runs(50, 10), warmup=3))

    argv = ["ssh", "-F", context.ssh_config, "-o", "BatchMode=yes", alias, "true"]
    section.add(
        "ssh-true",
        "OpenSSH `ssh -F CONFIG HOST true` (new connection)",
        repeat(lambda: subprocess.run(argv, check=True, capture_output=True, timeout=30), context.runs(10, 3)),
    )
    section.ratio("`run(\"true\")` warm / `ssh host true`", "run-true", "ssh-true", at_most(1 / 40))
    section.ratio("`run(\"true\")` / raw paramiko exec on the same connection", "run-true", "raw-true")


def raw_exec(connection: Any) -> None:
    channel = connection.open_session()
    try:
        channel.exec_command("true")
        if channel.recv_exit_status() != 0:
            raise AssertionError("true failed")
    finally:
        channel.close()


def measure_run_function(context: Context, section: Section, runtime: Any) -> None:
    from lazycluster.task import RuntimeTask

    def round_trip() -> None:
        task = RuntimeTask("square").run_function(square, value=7)
        runtime.execute_task(task, execute_async=False)
        values = list(task.function_returns)
        if values != [49]:
            raise AssertionError(f"run_function returned {values}, expected [49]")

    section.add("run-function", "`run_function` round trip (RuntimeTask, synchronous)", repeat(round_trip, context.runs(10, 3)))


def naive_check(context: Context, alias: str, port: int) -> bool:
    """One new SSH connection and one Python start on the host for one port."""
    client = context.hosts.connect(alias)
    try:
        _stdin, stdout, _stderr = client.exec_command(f"python3 -c \"$(cat)\" {port}")
        _stdin.write(PORT_CHECK_SNIPPET)
        _stdin.channel.shutdown_write()
        return stdout.channel.recv_exit_status() == 0
    finally:
        client.close()


def measure_ports(context: Context, section: Section, group: Any) -> None:
    from lazycluster.cluster.ports import find_busy_ports, manager_transport, remote_transports

    runs = context.runs(20, 5)
    section.add("ports-group", "`RuntimeGroup.get_free_port`, 200 candidates, 3 hosts", repeat(lambda: group.get_free_port(PORT_CANDIDATES), runs))
    transports = [manager_transport(), *remote_transports(group)]
    section.add("ports-cluster", "Cluster port choice (`find_busy_ports`), 200 candidates, 3 hosts + manager", repeat(lambda: find_busy_ports(transports, PORT_CANDIDATES), runs))

    aliases = context.hosts.aliases
    with ThreadPoolExecutor(len(aliases)) as pool:

        def one_port_everywhere(port: int) -> None:
            list(pool.map(lambda alias: naive_check(context, alias, port), aliases))

        one_port_everywhere(PORT_CANDIDATES[0])
        seconds = []
        for port in PORT_CANDIDATES[:NAIVE_PORTS]:
            started = time.perf_counter()
            one_port_everywhere(port)
            seconds.append((time.perf_counter() - started) * len(PORT_CANDIDATES))
    section.add("ports-naive", f"One SSH connection + Python per port, 3 hosts in parallel (×200 from {NAIVE_PORTS} ports)", Sample(tuple(seconds)))
    section.ratio("Port search 200 × 3: get_free_port / one connection per port", "ports-group", "ports-naive")


def measure(context: Context, section: Section) -> None:
    import cloudpickle

    from lazycluster.group import RuntimeGroup
    from lazycluster.transport import use_backend
    from lazycluster.transport.ssh import SSHBackend

    # The hosts cannot import this module, so the function travels by value.
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    backend = SSHBackend(ssh_config_path=context.ssh_config)
    with use_backend(backend):
        group = RuntimeGroup(hosts=context.hosts.aliases)
        try:
            runtime = group.runtimes[0]
            measure_run_true(context, section, runtime.transport)
            measure_run_function(context, section, runtime)
            measure_ports(context, section, group)
        finally:
            group.cleanup()

    section.note(
        "`run(\"true\")` reuses the Runtime's open paramiko connection: one exec channel per call. "
        "`ssh host true` pays a TCP connect, key exchange and public-key login each time (no "
        "ControlMaster). Both talk to 127.0.0.1 ports published by Docker, so the network adds "
        "almost nothing; on a real network `run` costs about one more round-trip time and `ssh` several."
    )
    section.note(
        "The `run_function` round trip pickles the function with cloudpickle, starts `python3` on "
        "the host to run it and reads the pickled return value back; Python's start-up on the host "
        "(with cloudpickle imported) is most of it."
    )
    section.note(
        "The port searches read the kernel's socket tables once per host, all hosts in parallel, so "
        "they cost one round trip whatever the number of candidates. The baseline opens a new SSH "
        f"connection and starts Python for every port and host; it was timed on {NAIVE_PORTS} ports "
        "and multiplied by 200, because the real 600 connections would take minutes."
    )
