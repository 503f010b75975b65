"""The `lazycluster` command line run as a subprocess: help, versions, usage errors,
and list-runtimes / dask against SSH configs whose hosts are closed loopback ports.

Nothing listens on the loopback ports used here, so every connection is refused
at once and no Docker host is needed.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

import lazycluster

COMMANDS = ["list-runtimes", "add-runtime", "delete-runtime", "dask"]


def run_cli(*args: str, home: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run `python -m lazycluster.cli ARGS` with HOME pointed at a temporary directory."""
    full_env = {key: value for key, value in os.environ.items() if key != "LAZYCLUSTER_SSH_CONFIG"}
    full_env["HOME"] = str(home)
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "lazycluster.cli", *args],
        capture_output=True, text=True, env=full_env, timeout=120, check=False,
    )


def closed_loopback_port() -> int:
    """Return a loopback port that nothing listens on (bound, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture
def dead_hosts_config(tmp_path: Path) -> Path:
    """A config with two hosts on closed loopback ports and one wildcard block."""
    path = tmp_path / "config"
    path.write_text(
        f"Host dead1\n    HostName 127.0.0.1\n    Port {closed_loopback_port()}\n\n"
        f"Host dead2\n    HostName 127.0.0.1\n    Port {closed_loopback_port()}\n\n"
        "Host *\n    StrictHostKeyChecking yes\n"
    )
    return path


# ---------------------------------------------------------------------------
# help, version, usage


def test_version_prints_package_version(tmp_path: Path) -> None:
    result = run_cli("--version", home=tmp_path)

    assert result.returncode == 0
    assert result.stdout.strip() == f"lazycluster {lazycluster.__version__}"


@pytest.mark.parametrize("command", COMMANDS)
def test_help_of_every_command(tmp_path: Path, command: str) -> None:
    result = run_cli(command, "--help", home=tmp_path)

    assert result.returncode == 0
    assert f"usage: lazycluster {command}" in result.stdout
    assert "--ssh-config" in result.stdout
    assert "--debug" in result.stdout


def test_help_lists_commands(tmp_path: Path) -> None:
    result = run_cli("--help", home=tmp_path)

    assert result.returncode == 0
    for command in COMMANDS:
        assert command in result.stdout
    assert "Exit codes" in result.stdout


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        pytest.param([], "required: COMMAND", id="no-command"),
        pytest.param(["start-everything"], "invalid choice", id="unknown-command"),
        pytest.param(["list-runtimes", "--bogus"], "unrecognized arguments", id="unknown-option"),
        pytest.param(["list-runtimes", "--timeout", "0"], "above 0", id="list-timeout-zero"),
        pytest.param(["list-runtimes", "--timeout", "soon"], "expected seconds", id="list-timeout-text"),
        pytest.param(["add-runtime", "only-name"], "required", id="add-missing-host"),
        pytest.param(["delete-runtime"], "required", id="delete-missing-name"),
        pytest.param(["dask", "--workers", "0"], "at least 1", id="workers-zero"),
        pytest.param(["dask", "--workers", "two"], "whole number", id="workers-text"),
        pytest.param(["dask", "--port", "0"], "1 to 65535", id="port-zero"),
        pytest.param(["dask", "--port", "65536"], "1 to 65535", id="port-high"),
        pytest.param(["dask", "--ports", "60010"], "FIRST-LAST", id="ports-single"),
        pytest.param(["dask", "--ports", "60010-60000"], "above the last", id="ports-reversed"),
        pytest.param(["dask", "--ports", "1-70000"], "1 to 65535", id="ports-high"),
        pytest.param(["dask", "--hosts", "a,,b"], "separated by commas", id="hosts-empty-name"),
        pytest.param(["dask", "--hosts", "a,a"], "named twice", id="hosts-duplicate"),
        pytest.param(["dask", "--hosts", "a b"], "whitespace", id="hosts-space"),
        pytest.param(["dask", "--timeout", "-1"], "above 0", id="dask-timeout-negative"),
        pytest.param(["dask", "--timeout", "inf"], "finite", id="dask-timeout-inf"),
    ],
)
def test_usage_error_exits_2(tmp_path: Path, arguments: list[str], message: str) -> None:
    result = run_cli(*arguments, home=tmp_path)

    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert "usage: lazycluster" in result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout == ""


# ---------------------------------------------------------------------------
# list-runtimes


def test_list_dead_hosts_are_inactive(dead_hosts_config: Path) -> None:
    result = run_cli("list-runtimes", "--ssh-config", str(dead_hosts_config), home=dead_hosts_config.parent)

    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "Active runtimes (0):"
    assert "Inactive hosts (2):" in lines
    dead_lines = [line for line in lines if line.startswith(("  dead1:", "  dead2:"))]
    assert len(dead_lines) == 2
    assert all("Connection refused" in line for line in dead_lines)
    assert "*" not in result.stdout


def test_list_json_document(dead_hosts_config: Path) -> None:
    result = run_cli("list-runtimes", "--json", "--ssh-config", str(dead_hosts_config),
                     home=dead_hosts_config.parent)

    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    assert document["ssh_config"] == str(dead_hosts_config)
    assert document["active"] == []
    assert [entry["host"] for entry in document["inactive"]] == ["dead1", "dead2"]
    assert all("refused" in entry["reason"] for entry in document["inactive"])


def test_list_reads_env_config(dead_hosts_config: Path) -> None:
    result = run_cli("list-runtimes", "-l", home=dead_hosts_config.parent,
                     env={"LAZYCLUSTER_SSH_CONFIG": str(dead_hosts_config)})

    assert result.returncode == 0, result.stderr
    assert "Inactive hosts (2):" in result.stdout


def test_list_empty_config(tmp_path: Path) -> None:
    path = tmp_path / "config"
    path.write_text("# nothing yet\nHost *\n    User me\n")

    result = run_cli("list-runtimes", "--ssh-config", str(path), home=tmp_path)

    assert result.returncode == 0, result.stderr
    assert "Active runtimes (0):" in result.stdout
    assert "no Host entry" in result.stdout


def test_list_missing_config(tmp_path: Path) -> None:
    result = run_cli("list-runtimes", home=tmp_path)

    assert result.returncode == 1
    assert f"{tmp_path}/.ssh/config does not exist" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("content", "message"),
    [
        pytest.param(b"Host a\n    HostName 127.0.0.1\nHost\n", b"line 3 is malformed", id="host-empty"),
        pytest.param(b"Host a\n  =x\n", b"line 2 is malformed", id="no-keyword"),
        pytest.param(b"Host a\n  HostName caf\xe9\n", b"not valid UTF-8", id="not-utf8"),
    ],
)
def test_list_malformed_config(tmp_path: Path, content: bytes, message: bytes) -> None:
    path = tmp_path / "config"
    path.write_bytes(content)

    result = subprocess.run(
        [sys.executable, "-m", "lazycluster.cli", "list-runtimes", "--ssh-config", str(path)],
        capture_output=True, timeout=60, check=False,
    )

    assert result.returncode == 1
    assert message in result.stderr
    assert len(result.stderr.decode().strip().splitlines()) <= 2
    assert b"Traceback" not in result.stderr


def test_list_debug_shows_traceback(tmp_path: Path) -> None:
    path = tmp_path / "config"
    path.write_text("Host\n")

    result = run_cli("list-runtimes", "--debug", "--ssh-config", str(path), home=tmp_path)

    assert result.returncode == 1
    assert "Traceback" in result.stderr


# ---------------------------------------------------------------------------
# dask without a working host


def test_dask_unknown_host_is_usage_error(dead_hosts_config: Path) -> None:
    result = run_cli("dask", "--hosts", "dead1,nosuchhost", "--ssh-config", str(dead_hosts_config),
                     home=dead_hosts_config.parent)

    assert result.returncode == 2
    assert "nosuchhost is not in the SSH config" in result.stderr
    assert "dead1, dead2" in result.stderr
    assert "Traceback" not in result.stderr


def test_dask_without_active_hosts_fails(dead_hosts_config: Path) -> None:
    result = run_cli("dask", "--ssh-config", str(dead_hosts_config), home=dead_hosts_config.parent)

    assert result.returncode == 1
    assert "No usable runtime" in result.stderr
    assert "Traceback" not in result.stderr
    assert "Scheduler:" not in result.stdout


def test_dask_missing_config(tmp_path: Path) -> None:
    result = run_cli("dask", "--ssh-config", str(tmp_path / "absent"), home=tmp_path)

    assert result.returncode == 1
    assert "does not exist" in result.stderr
