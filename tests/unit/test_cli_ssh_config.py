"""`lazycluster add-runtime` / `delete-runtime` run as a subprocess on throwaway SSH configs.

Where the OpenSSH client is installed, `ssh -G` reads the edited file back, so
the tests check what ssh itself makes of the result, not only its text.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

SAMPLE_CONFIG = """\
Include ~/.ssh/conf.d/*
# Lab machines
Host gpu1 gpu1.lab
    HostName 10.0.0.5
    User alice

Host build
    HostName build.example.org
    # keep the old port until March
    Port 2200

# Defaults for every host
Host *
    User nobody
    ServerAliveInterval 30
"""


def run_cli(*args: str, home: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run `python -m lazycluster.cli ARGS` with HOME pointed at a temporary directory."""
    full_env = {key: value for key, value in os.environ.items() if key != "LAZYCLUSTER_SSH_CONFIG"}
    full_env["HOME"] = str(home)
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "lazycluster.cli", *args],
        capture_output=True, text=True, env=full_env, timeout=60, check=False,
    )


def ssh_effective(config: Path, name: str) -> dict[str, str]:
    """Return the settings `ssh -G` derives for `name` from `config` (first value of each key)."""
    if shutil.which("ssh") is None:
        pytest.skip("the OpenSSH client is not installed")
    result = subprocess.run(
        ["ssh", "-G", "-F", str(config), name], capture_output=True, text=True, timeout=30, check=True
    )
    settings: dict[str, str] = {}
    for line in result.stdout.splitlines():
        key, _, value = line.partition(" ")
        settings.setdefault(key, value)
    return settings


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "ssh" / "config"
    path.parent.mkdir()
    path.write_text(SAMPLE_CONFIG)
    path.chmod(0o600)
    return path


def add(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return run_cli("add-runtime", "--ssh-config", str(config), *args, home=config.parent)


def delete(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return run_cli("delete-runtime", "--ssh-config", str(config), *args, home=config.parent)


# ---------------------------------------------------------------------------
# add-runtime


def test_add_keeps_every_existing_line(config: Path) -> None:
    result = add(config, "node1", "bob@node1.example.org:2222")

    assert result.returncode == 0, result.stderr
    assert "node1" in result.stdout
    new_lines = config.read_text().splitlines()
    old_lines = SAMPLE_CONFIG.splitlines()
    remaining = iter(new_lines)
    assert all(line in remaining for line in old_lines), "old lines lost or reordered"
    assert "Host node1" in new_lines


def test_add_writes_usable_entry(config: Path) -> None:
    result = add(config, "node1", "bob@node1.example.org:2222", "--id-file", "~/.ssh/id_node1",
                 "-o", "ForwardAgent=yes")
    assert result.returncode == 0, result.stderr

    settings = ssh_effective(config, "node1")
    assert settings["hostname"] == "node1.example.org"
    assert settings["user"] == "bob"
    assert settings["port"] == "2222"
    assert settings["identityfile"].endswith("/.ssh/id_node1")
    assert settings["forwardagent"] == "yes"


def test_add_goes_above_host_star(config: Path) -> None:
    # OpenSSH keeps the first value it reads, so an entry below `Host *` would get `User nobody`.
    result = add(config, "node1", "bob@node1")
    assert result.returncode == 0, result.stderr

    text = config.read_text()
    assert text.index("Host node1") < text.index("# Defaults for every host")
    assert ssh_effective(config, "node1")["user"] == "bob"
    assert ssh_effective(config, "build")["user"] == "nobody"


def test_add_without_user_inherits_defaults(config: Path) -> None:
    result = add(config, "node1", "node1.example.org")
    assert result.returncode == 0, result.stderr

    settings = ssh_effective(config, "node1")
    assert settings["user"] == "nobody"
    assert settings["port"] == "22"


def test_add_ipv6_in_brackets(config: Path) -> None:
    result = add(config, "v6", "[::1]:2222")
    assert result.returncode == 0, result.stderr

    settings = ssh_effective(config, "v6")
    assert settings["hostname"] == "::1"
    assert settings["port"] == "2222"


def test_add_bare_ipv6_has_no_port(config: Path) -> None:
    result = add(config, "v6", "root@fe80::1")
    assert result.returncode == 0, result.stderr

    settings = ssh_effective(config, "v6")
    assert settings["hostname"] == "fe80::1"
    assert settings["port"] == "22"


def test_add_accepts_old_id_file_spelling(config: Path) -> None:
    result = add(config, "node1", "node1", "--id_file", "/keys/id with space")
    assert result.returncode == 0, result.stderr

    assert '    IdentityFile "/keys/id with space"' in config.read_text()
    assert ssh_effective(config, "node1")["identityfile"] == "/keys/id with space"
    assert "does not exist" in result.stderr


def test_add_option_with_spaces(config: Path) -> None:
    result = add(config, "inner", "inner", "-o", "ProxyCommand=ssh -W %h:%p gpu1")
    assert result.returncode == 0, result.stderr
    assert ssh_effective(config, "inner")["proxycommand"] == "ssh -W %h:%p gpu1"


def test_add_creates_missing_file_private(tmp_path: Path) -> None:
    path = tmp_path / "new-dir" / "config"

    result = add(path, "node1", "node1")

    assert result.returncode == 0, result.stderr
    assert path.read_text() == "Host node1\n    HostName node1\n"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert not (tmp_path / "new-dir" / "config.bak").exists()


def test_add_keeps_mode_and_backup(config: Path) -> None:
    config.chmod(0o640)

    result = add(config, "node1", "node1")

    assert result.returncode == 0, result.stderr
    assert stat.S_IMODE(config.stat().st_mode) == 0o640
    backup = config.with_name("config.bak")
    assert backup.read_text() == SAMPLE_CONFIG
    assert stat.S_IMODE(backup.stat().st_mode) == 0o640
    assert sorted(p.name for p in config.parent.iterdir()) == ["config", "config.bak"]


def test_add_edits_symlink_target(config: Path, tmp_path: Path) -> None:
    link = tmp_path / "link-config"
    link.symlink_to(config)

    result = add(link, "node1", "node1")

    assert result.returncode == 0, result.stderr
    assert link.is_symlink()
    assert "Host node1" in config.read_text()


def test_add_keeps_crlf_line_endings(tmp_path: Path) -> None:
    path = tmp_path / "config"
    path.write_bytes(b"Host a\r\n    HostName a.example.org\r\n")

    result = add(path, "node1", "node1")

    assert result.returncode == 0, result.stderr
    data = path.read_bytes()
    assert b"\r\nHost node1\r\n    HostName node1\r\n" in data
    assert data.count(b"\n") == data.count(b"\r\n")


def test_add_file_without_final_newline(tmp_path: Path) -> None:
    path = tmp_path / "config"
    path.write_text("Host a\n    HostName a.example.org")

    result = add(path, "node1", "node1")

    assert result.returncode == 0, result.stderr
    assert path.read_text() == "Host a\n    HostName a.example.org\n\nHost node1\n    HostName node1\n"


@pytest.mark.parametrize("name", ["build", "gpu1.lab"])
def test_add_duplicate_rejected(config: Path, name: str) -> None:
    result = add(config, name, "other.example.org")

    assert result.returncode == 1
    assert f"'{name}' already exists" in result.stderr
    assert "Traceback" not in result.stderr
    assert config.read_text() == SAMPLE_CONFIG
    assert not config.with_name("config.bak").exists()


def test_add_uses_env_config_path(config: Path) -> None:
    result = run_cli("add-runtime", "node1", "node1", home=config.parent,
                     env={"LAZYCLUSTER_SSH_CONFIG": str(config)})

    assert result.returncode == 0, result.stderr
    assert "Host node1" in config.read_text()


def test_add_defaults_to_home_ssh_config(tmp_path: Path) -> None:
    result = run_cli("add-runtime", "node1", "node1", home=tmp_path)

    assert result.returncode == 0, result.stderr
    assert (tmp_path / ".ssh" / "config").read_text() == "Host node1\n    HostName node1\n"


def test_add_common_options_before_command(config: Path) -> None:
    result = run_cli("-v", "--ssh-config", str(config), "add-runtime", "node1", "node1",
                     home=config.parent)

    assert result.returncode == 0, result.stderr
    assert "Host node1" in config.read_text()
    assert "INFO" in result.stderr


BAD_ARGUMENTS = [
    pytest.param(["bad name", "h"], "whitespace", id="name-space"),
    pytest.param(["web*", "h"], "must not contain", id="name-wildcard"),
    pytest.param(["!web", "h"], "must not contain", id="name-negation"),
    pytest.param(["a\nHost *", "h"], "newline", id="name-newline"),
    pytest.param(["--", "-x", "h"], "must not start with '-'", id="name-dash"),
    pytest.param(["", "h"], "non-empty", id="name-empty"),
    pytest.param(["n", "host\n    User root"], "newline", id="host-newline"),
    pytest.param(["n", "two words"], "without spaces", id="host-space"),
    pytest.param(["n", "host:0"], "1 to 65535", id="port-zero"),
    pytest.param(["n", "host:70000"], "1 to 65535", id="port-high"),
    pytest.param(["n", "host:ssh"], "1 to 65535", id="port-name"),
    pytest.param(["n", "@host"], "user name before '@' is empty", id="user-empty"),
    pytest.param(["n", "bob:secret@host"], "Passwords", id="user-password"),
    pytest.param(["n", "[::1"], "not closed", id="ipv6-unclosed"),
    pytest.param(["n", "[nothost]:22"], "not an IPv6 address", id="ipv6-invalid"),
    pytest.param(["n", "fe80::1:x:y"], "brackets", id="ipv6-bare-invalid"),
    pytest.param(["n", "ho$t"], "not a hostname", id="host-chars"),
    pytest.param(["n", "h", "-o", "Bogus=1"], "not an ssh_config keyword", id="option-unknown"),
    pytest.param(["n", "h", "-o", "Host=evil"], "not an ssh_config keyword", id="option-host"),
    pytest.param(["n", "h", "-o", "User=a\nHost *"], "newline", id="option-newline"),
    pytest.param(["n", "h", "-o", "User"], "KEY=VALUE", id="option-no-value"),
    pytest.param(["n", "h", "-o", "HostName=other"], "conflicts", id="option-hostname"),
    pytest.param(["n", "bob@h", "-o", "user=eve"], "conflicts", id="option-user"),
    pytest.param(["n", "h", "--id-file", "k", "-o", "IdentityFile=j"], "conflicts", id="option-idfile"),
    pytest.param(["n", "h", "--id-file", "a\nb"], "newline", id="idfile-newline"),
    pytest.param(["n", "h", "--id-file", 'a"b'], "must not contain", id="idfile-quote"),
]


@pytest.mark.parametrize(("arguments", "message"), BAD_ARGUMENTS)
def test_add_bad_value_is_usage_error(config: Path, arguments: list[str], message: str) -> None:
    result = add(config, *arguments)

    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert config.read_text() == SAMPLE_CONFIG


def test_add_option_user_allowed_without_user_in_target(config: Path) -> None:
    result = add(config, "n", "h", "-o", "User=eve")

    assert result.returncode == 0, result.stderr
    assert ssh_effective(config, "n")["user"] == "eve"


# ---------------------------------------------------------------------------
# delete-runtime


def test_delete_removes_only_that_entry(config: Path) -> None:
    result = delete(config, "build")

    assert result.returncode == 0, result.stderr
    assert config.read_text() == SAMPLE_CONFIG.replace(
        "Host build\n    HostName build.example.org\n    # keep the old port until March\n"
        "    Port 2200\n\n",
        "",
    )
    assert config.with_name("config.bak").read_text() == SAMPLE_CONFIG
    assert stat.S_IMODE(config.stat().st_mode) == 0o600


def test_delete_one_alias_of_several(config: Path) -> None:
    result = delete(config, "gpu1.lab")

    assert result.returncode == 0, result.stderr
    assert config.read_text() == SAMPLE_CONFIG.replace("Host gpu1 gpu1.lab\n", "Host gpu1\n")


def test_delete_last_entry(tmp_path: Path) -> None:
    path = tmp_path / "config"
    path.write_text("# mine\nHost a\n    HostName a\n\nHost b\n    HostName b\n")

    result = delete(path, "b")

    assert result.returncode == 0, result.stderr
    assert path.read_text() == "# mine\nHost a\n    HostName a\n"


def test_add_then_delete_restores_file_end(tmp_path: Path) -> None:
    path = tmp_path / "config"
    original = "Host a\n    HostName a.example.org\n"
    path.write_text(original)

    assert add(path, "node1", "node1").returncode == 0
    result = delete(path, "node1")

    assert result.returncode == 0, result.stderr
    assert path.read_text() == original


def test_add_then_delete_restores_file(config: Path) -> None:
    assert add(config, "node1", "bob@node1:2222", "-o", "ForwardAgent=yes").returncode == 0
    result = delete(config, "node1")

    assert result.returncode == 0, result.stderr
    assert config.read_text() == SAMPLE_CONFIG


@pytest.mark.parametrize("name", ["missing", "*", "gpu"])
def test_delete_missing_name_rejected(config: Path, name: str) -> None:
    result = delete(config, name) if name != "*" else delete(config, "--", name)

    expected_code = 2 if name == "*" else 1
    assert result.returncode == expected_code, result.stderr
    assert "Traceback" not in result.stderr
    assert config.read_text() == SAMPLE_CONFIG
    if expected_code == 1:
        assert f"'{name}' is not in" in result.stderr
        assert "list-runtimes" in result.stderr


def test_delete_from_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "absent"

    result = delete(path, "node1")

    assert result.returncode == 1
    assert "does not exist" in result.stderr
    assert not path.exists()


# ---------------------------------------------------------------------------
# malformed files


MALFORMED = [
    pytest.param("Host a\n    HostName a\nHost\n", 3, id="host-without-pattern"),
    pytest.param("Host a\n    =broken\n", 2, id="no-keyword"),
    pytest.param("Host a\n    HostName\n", 2, id="keyword-without-value"),
]


@pytest.mark.parametrize(("text", "line_number"), MALFORMED)
@pytest.mark.parametrize("command", ["add", "delete"])
def test_malformed_file_not_edited(tmp_path: Path, text: str, line_number: int, command: str) -> None:
    path = tmp_path / "config"
    path.write_text(text)

    result = add(path, "node1", "node1") if command == "add" else delete(path, "a")

    assert result.returncode == 1
    assert f"line {line_number} is malformed" in result.stderr
    assert "Traceback" not in result.stderr
    assert path.read_text() == text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config"]


def test_non_utf8_file_not_edited(tmp_path: Path) -> None:
    path = tmp_path / "config"
    path.write_bytes(b"Host a\n    HostName caf\xe9\n")

    result = add(path, "node1", "node1")

    assert result.returncode == 1
    assert "not valid UTF-8" in result.stderr
    assert path.read_bytes() == b"Host a\n    HostName caf\xe9\n"


def test_unwritable_directory_is_failure(config: Path) -> None:
    if os.geteuid() == 0:
        pytest.skip("root may write to read-only directories")
    config.parent.chmod(0o500)
    try:
        result = add(config, "node1", "node1")
    finally:
        config.parent.chmod(0o700)

    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert config.read_text() == SAMPLE_CONFIG


def test_parent_path_is_file_is_failure(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")

    result = add(blocker / "config", "node1", "node1")

    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert "not-a-directory" in result.stderr
    assert blocker.read_text() == ""


def test_concurrent_adds_keep_every_entry(config: Path) -> None:
    # Each process takes the file lock, so no edit overwrites another one.
    names = [f"node{index}" for index in range(8)]
    full_env = {key: value for key, value in os.environ.items() if key != "LAZYCLUSTER_SSH_CONFIG"}
    processes = [
        subprocess.Popen(
            [sys.executable, "-m", "lazycluster.cli", "add-runtime", "--ssh-config", str(config), name, name],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=full_env,
        )
        for name in names
    ]
    outputs = [process.communicate(timeout=120) for process in processes]

    assert [process.returncode for process in processes] == [0] * len(names), outputs
    text = config.read_text()
    for name in names:
        assert f"Host {name}\n" in text
    assert "Host build\n" in text
    assert sorted(p.name for p in config.parent.iterdir()) == ["config", "config.bak"]


def test_debug_shows_traceback(config: Path) -> None:
    result = run_cli("add-runtime", "--debug", "--ssh-config", str(config), "build", "h",
                     home=config.parent)

    assert result.returncode == 1
    assert "Traceback" in result.stderr
    assert "SSHConfigError" in result.stderr
