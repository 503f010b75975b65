"""The `lazycluster` command line against the Docker SSH hosts, run as a subprocess.

`lazycluster dask` runs in its own process with the hosts' SSH config in
$LAZYCLUSTER_SSH_CONFIG; the tests stop it with SIGINT or SIGTERM by PID, as
Ctrl-C or `kill` would, and then check the hosts and the manager for leftovers.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import psutil
import pytest

from lazycluster.host_commands import TEMP_DIR_PREFIX

# Ports of these tests: below the ephemeral range and apart from the ports of
# the other integration tests, so leftovers of one test do not hide in another.
SCHEDULER_PORT = 29600
WORKER_PORTS = "29610-29649"

# The temporary directories the library creates on hosts.
TEMP_PATTERN = TEMP_DIR_PREFIX + "*"

# Seconds a `lazycluster dask` run may take to print its scheduler line, and to exit after a signal.
START_TIMEOUT = 120.0
STOP_TIMEOUT = 60.0


class CliProcess:
    """A running `lazycluster` subprocess whose stdout and stderr lines are read as they come."""

    def __init__(self, args: list[str], env: dict[str, str], ignore_sigint: bool = False) -> None:
        # A shell starts background jobs with SIGINT ignored; `ignore_sigint` starts the process so.
        self.process = subprocess.Popen(
            [sys.executable, "-m", "lazycluster.cli", *args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
            preexec_fn=(lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) if ignore_sigint else None,
        )
        self.lines: queue.Queue[tuple[str, str]] = queue.Queue()
        self.stdout: list[str] = []
        self.stderr: list[str] = []
        self._readers = [
            threading.Thread(target=self._read, args=(self.process.stdout, "stdout"), daemon=True),
            threading.Thread(target=self._read, args=(self.process.stderr, "stderr"), daemon=True),
        ]
        for reader in self._readers:
            reader.start()

    def _read(self, stream: IO[str], name: str) -> None:
        for line in stream:
            self.lines.put((name, line.rstrip("\n")))

    def wait_for_line(self, stream: str, text: str, timeout: float) -> str:
        """Return the first line of `stream` containing `text`; fail after `timeout` seconds or on exit."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                name, line = self.lines.get(timeout=0.2)
            except queue.Empty:
                if self.process.poll() is not None and all(not r.is_alive() for r in self._readers):
                    break
                continue
            (self.stdout if name == "stdout" else self.stderr).append(line)
            if name == stream and text in line:
                return line
        pytest.fail(
            f"no {stream} line with {text!r} within {timeout} s (exit code {self.process.poll()}).\n"
            f"stdout: {self.stdout}\nstderr: {self.stderr}"
        )

    def stop(self, signum: int, timeout: float) -> int:
        """Send `signum` to the process by PID and return its exit code."""
        self.process.send_signal(signum)
        return self.wait(timeout)

    def wait(self, timeout: float) -> int:
        exit_code = self.process.wait(timeout=timeout)
        for reader in self._readers:
            reader.join(timeout=5)
        while not self.lines.empty():
            name, line = self.lines.get_nowait()
            (self.stdout if name == "stdout" else self.stderr).append(line)
        return exit_code

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=30)


def cli_env(config: Path | str) -> dict[str, str]:
    env = dict(os.environ)
    env["LAZYCLUSTER_SSH_CONFIG"] = str(config)
    return env


def run_cli(*args: str, config: Path | str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "lazycluster.cli", *args],
        capture_output=True, text=True, env=cli_env(config), timeout=180, check=False,
    )


def scheduler_processes(port: int) -> list[psutil.Process]:
    """Return the Dask scheduler processes on this machine that use `port`."""
    found = []
    for process in psutil.process_iter(["cmdline"]):
        cmdline = process.info["cmdline"] or []
        if "distributed.cli.dask_scheduler" in cmdline and str(port) in cmdline:
            found.append(process)
    return found


def assert_nothing_left(ssh_hosts: Any, port: int = SCHEDULER_PORT) -> None:
    for host in ssh_hosts:
        leftovers = host.leftovers(temp_pattern=TEMP_PATTERN)
        assert leftovers.is_clean, str(leftovers)
    assert scheduler_processes(port) == []


@pytest.fixture
def dask_run(ssh_hosts: Any) -> Iterator[list[CliProcess]]:
    """Collect `lazycluster dask` processes; kill any still running and check the hosts after."""
    runs: list[CliProcess] = []
    yield runs
    for run in runs:
        run.kill()
    assert_nothing_left(ssh_hosts)


def start_dask(
    ssh_hosts: Any, runs: list[CliProcess], *extra: str, config: Path | None = None, ignore_sigint: bool = False
) -> CliProcess:
    run = CliProcess(
        ["dask", "--port", str(SCHEDULER_PORT), "--ports", WORKER_PORTS, *extra],
        env=cli_env(config or ssh_hosts.ssh_config_path),
        ignore_sigint=ignore_sigint,
    )
    runs.append(run)
    return run


# ---------------------------------------------------------------------------
# list-runtimes


def test_list_runtimes_all_active(ssh_hosts: Any) -> None:
    result = run_cli("list-runtimes", config=ssh_hosts.ssh_config_path)

    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == f"Active runtimes ({len(ssh_hosts.aliases)}):"
    assert sorted(lines[1:]) == [f"  {alias}" for alias in sorted(ssh_hosts.aliases)]
    assert "Inactive" not in result.stdout
    assert_nothing_left(ssh_hosts)


def test_list_runtimes_long_table(ssh_hosts: Any) -> None:
    result = run_cli("list-runtimes", "-l", config=ssh_hosts.ssh_config_path)

    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[1].split() == ["HOST", "OS", "CPU", "CORES", "MEMORY", "PYTHON", "GPUS"]
    rows = {line.split()[0]: line.split() for line in lines[2:]}
    assert sorted(rows) == sorted(ssh_hosts.aliases)
    for row in rows.values():
        assert row[1].startswith("Linux")
        assert int(row[2]) >= 1
        assert row[4] == "GiB"
        assert row[5].startswith("3.")
        assert row[6] == "-"


def test_list_runtimes_json_info(ssh_hosts: Any) -> None:
    result = run_cli("list-runtimes", "--json", config=ssh_hosts.ssh_config_path)

    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    assert document["ssh_config"] == str(ssh_hosts.ssh_config_path)
    assert sorted(entry["host"] for entry in document["active"]) == sorted(ssh_hosts.aliases)
    assert document["inactive"] == []
    for entry in document["active"]:
        assert entry["cpu_cores"] >= 1
        assert entry["memory"] > 64 * 1024**2
        assert entry["gpus"] == []


def test_list_runtimes_unknown_host_inactive(ssh_hosts: Any, tmp_path: Path) -> None:
    # A Host entry whose port has no sshd: the real hosts stay active beside it.
    config = tmp_path / "config"
    config.write_text(
        ssh_hosts.ssh_config_path.read_text()
        + "\nHost nosuchruntime\n    HostName 127.0.0.1\n    Port 1\n"
    )

    result = run_cli("list-runtimes", config=config)

    assert result.returncode == 0, result.stderr
    assert f"Active runtimes ({len(ssh_hosts.aliases)}):" in result.stdout
    assert "Inactive hosts (1):" in result.stdout
    inactive = [line for line in result.stdout.splitlines() if line.startswith("  nosuchruntime:")]
    assert len(inactive) == 1
    assert "refused" in inactive[0]


def test_list_runtimes_malformed_config(ssh_hosts: Any, tmp_path: Path) -> None:
    config = tmp_path / "config"
    text = ssh_hosts.ssh_config_path.read_text()
    config.write_text(text + "Host\n")
    line_number = text.count("\n") + 1

    result = run_cli("list-runtimes", config=config)

    assert result.returncode == 1
    assert f"line {line_number} is malformed" in result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout == ""


def test_added_runtime_is_listed(ssh_hosts: Any, tmp_path: Path) -> None:
    # add-runtime writes an entry that the library can use: a copy of the first
    # host's entry under a new name, built from its HostName and Port.
    if shutil.which("ssh") is None:
        pytest.skip("the OpenSSH client is not installed")
    config = tmp_path / "config"
    config.write_text(ssh_hosts.ssh_config_path.read_text())
    first = ssh_hosts[0]
    lookup = subprocess.run(["ssh", "-G", "-F", str(config), first.alias],
                            capture_output=True, text=True, check=True).stdout
    settings = dict(line.split(" ", 1) for line in lookup.splitlines())

    added = run_cli(
        "add-runtime", "copy1", f"{settings['user']}@{settings['hostname']}:{settings['port']}",
        "--id-file", settings["identityfile"],
        "-o", f"UserKnownHostsFile={settings['userknownhostsfile']}",
        "-o", "HostKeyAlias=" + (settings.get("hostkeyalias") or f"[{settings['hostname']}]:{settings['port']}"),
        config=config,
    )
    assert added.returncode == 0, added.stderr

    result = run_cli("list-runtimes", "--json", config=config)
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    assert "copy1" in [entry["host"] for entry in document["active"]], document

    removed = run_cli("delete-runtime", "copy1", config=config)
    assert removed.returncode == 0, removed.stderr
    assert config.read_text() == ssh_hosts.ssh_config_path.read_text()


# ---------------------------------------------------------------------------
# dask


def test_dask_unknown_host_rejected(ssh_hosts: Any) -> None:
    result = run_cli("dask", "--hosts", f"{ssh_hosts.aliases[0]},nosuchruntime",
                     config=ssh_hosts.ssh_config_path)

    assert result.returncode == 2
    assert "nosuchruntime is not in the SSH config" in result.stderr
    assert "Traceback" not in result.stderr


def test_dask_runs_until_sigint(ssh_hosts: Any, dask_run: list[CliProcess]) -> None:
    from distributed import Client

    worker_count = len(ssh_hosts.aliases) + 1
    run = start_dask(ssh_hosts, dask_run, "--workers", str(worker_count))

    line = run.wait_for_line("stdout", "Scheduler:", START_TIMEOUT)
    address = line.split()[-1]
    assert address == f"tcp://127.0.0.1:{SCHEDULER_PORT}"
    dashboard = run.wait_for_line("stdout", "Dashboard:", 10)
    assert dashboard.split()[-1].startswith("http://127.0.0.1:")

    with Client(address, timeout=30) as client:
        assert len(client.scheduler_info(n_workers=-1)["workers"]) == worker_count
        assert client.submit(sum, [1, 2, 3]).result(timeout=30) == 6

    assert run.stop(signal.SIGINT, STOP_TIMEOUT) == 0
    assert "Cluster stopped." in run.stderr[-1]
    assert "Traceback" not in "\n".join(run.stderr)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_dask_stop_signal_after_start(ssh_hosts: Any, dask_run: list[CliProcess], signum: int) -> None:
    run = start_dask(ssh_hosts, dask_run, "--hosts", ",".join(ssh_hosts.aliases[:2]))

    run.wait_for_line("stdout", "Scheduler:", START_TIMEOUT)
    assert scheduler_processes(SCHEDULER_PORT) != []

    assert run.stop(signum, STOP_TIMEOUT) == 0
    assert "Cluster stopped." in run.stderr[-1]
    assert "Traceback" not in "\n".join(run.stderr)


@pytest.mark.parametrize(
    "progress_line",
    ["Connecting to the hosts", "Starting the scheduler", "worker(s) on"],
)
def test_dask_sigint_during_start(ssh_hosts: Any, dask_run: list[CliProcess], progress_line: str) -> None:
    run = start_dask(ssh_hosts, dask_run, "--workers", "6")

    run.wait_for_line("stderr", progress_line, START_TIMEOUT)
    exit_code = run.stop(signal.SIGINT, STOP_TIMEOUT)

    assert exit_code == 130, run.stderr
    assert "Scheduler:" not in "\n".join(run.stdout)
    assert "Traceback" not in "\n".join(run.stderr)


def test_dask_sigint_when_started_ignored(ssh_hosts: Any, dask_run: list[CliProcess]) -> None:
    run = start_dask(ssh_hosts, dask_run, ignore_sigint=True)

    run.wait_for_line("stdout", "Scheduler:", START_TIMEOUT)

    assert run.stop(signal.SIGINT, STOP_TIMEOUT) == 0
    assert "Cluster stopped." in run.stderr[-1]


def test_dask_inactive_host_fails(ssh_hosts: Any, dask_run: list[CliProcess], tmp_path: Path) -> None:
    config = tmp_path / "config"
    config.write_text(
        ssh_hosts.ssh_config_path.read_text() + "\nHost deadruntime\n    HostName 127.0.0.1\n    Port 1\n"
    )
    run = start_dask(ssh_hosts, dask_run, "--hosts", f"{ssh_hosts.aliases[0]},deadruntime", config=config)

    exit_code = run.wait(START_TIMEOUT)

    assert exit_code == 1
    assert any("Host deadruntime is inactive" in line for line in run.stderr)
    assert "deadruntime given in --hosts is inactive" in run.stderr[-1]
    assert "Traceback" not in "\n".join(run.stderr)
    assert run.stdout == []


def test_dask_scheduler_death_fails(ssh_hosts: Any, dask_run: list[CliProcess]) -> None:
    run = start_dask(ssh_hosts, dask_run)
    run.wait_for_line("stdout", "Scheduler:", START_TIMEOUT)
    schedulers = scheduler_processes(SCHEDULER_PORT)
    assert len(schedulers) == 1

    # The scheduler is a process this test started, through the CLI.
    schedulers[0].kill()
    exit_code = run.wait(STOP_TIMEOUT)

    assert exit_code == 1
    assert any("scheduler exited" in line for line in run.stderr), run.stderr
    assert "Traceback" not in "\n".join(run.stderr)


# ---------------------------------------------------------------------------
# why a host is inactive


def inactive_reason(config: Path, alias: str, *extra: str) -> str:
    result = run_cli("list-runtimes", "--json", *extra, config=config)
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    reasons = {entry["host"]: entry["reason"] for entry in document["inactive"]}
    assert alias in reasons, document
    return reasons[alias]


def test_list_runtimes_paused_host_bounded(make_ssh_hosts: Any, tmp_path: Path) -> None:
    # A paused host accepts TCP but never answers the SSH handshake; ConnectTimeout
    # in the SSH config bounds the login, --timeout bounds the check after it.
    hosts = make_ssh_hosts(1)
    config = tmp_path / "config"
    config.write_text("ConnectTimeout 3\n" + hosts.ssh_config_path.read_text())
    hosts[0].pause()
    try:
        started = time.monotonic()
        reason = inactive_reason(config, hosts[0].alias, "--timeout", "3")
        elapsed = time.monotonic() - started
    finally:
        hosts[0].unpause()

    assert "SSH handshake" in reason
    # 3 s for the login plus the interpreter start of the CLI.
    assert elapsed < 15, elapsed


def test_list_runtimes_wrong_key_rejected(make_ssh_hosts: Any, tmp_path: Path) -> None:
    if shutil.which("ssh-keygen") is None:
        pytest.skip("ssh-keygen is not installed")
    hosts = make_ssh_hosts(1)
    other_key = tmp_path / "other_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other_key)], check=True)
    config = tmp_path / "config"
    config.write_text(hosts.ssh_config_path.read_text().replace(str(hosts.key_path), str(other_key)))
    assert str(other_key) in config.read_text()

    reason = inactive_reason(config, hosts[0].alias)

    assert "uthentication" in reason


def test_list_runtimes_host_without_python(make_ssh_hosts: Any) -> None:
    hosts = make_ssh_hosts(1)
    host = hosts[0]
    # /bin links to /usr/bin in the image, so `which -a` lists one file twice.
    hide = 'for p in $(which -a python3); do if [ -e "$p" ]; then mv "$p" "$p.hidden"; fi; done'
    host.exec(["sh", "-c", hide]).check()
    assert host.exec(["sh", "-c", "command -v python3"], user=host.user).exit_code != 0

    reason = inactive_reason(hosts.ssh_config_path, host.alias)

    assert "python3 was not found" in reason


def test_dask_scheduler_port_in_use(ssh_hosts: Any, dask_run: list[CliProcess]) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as blocker:
        # Connections of an earlier scheduler on this port may still be in TIME_WAIT.
        blocker.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        blocker.bind(("127.0.0.1", SCHEDULER_PORT))
        blocker.listen()
        run = start_dask(ssh_hosts, dask_run)
        exit_code = run.wait(START_TIMEOUT)

    assert exit_code == 1
    assert f"Port {SCHEDULER_PORT} is already in use" in run.stderr[-1]
    assert "Traceback" not in "\n".join(run.stderr)
    assert run.stdout == []
