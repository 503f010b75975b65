"""SSH config resolution and the parsers of host output used by the SSH transport."""

from __future__ import annotations

from pathlib import Path

import pytest

from lazycluster.transport.shell import LineSplitter, build_script, quote_path, validate_env
from lazycluster.transport.ssh import parse_socket_table
from lazycluster.transport.ssh_config import (
    JumpHost,
    SSHConfigFile,
    default_config_path,
    expand_includes,
    parse_proxy_jump,
)
from lazycluster.transport.ssh_process import parse_proc_stats


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / ".ssh").mkdir()
    return tmp_path


def test_default_config_path_from_env(monkeypatch):
    monkeypatch.delenv("LAZYCLUSTER_SSH_CONFIG", raising=False)
    assert default_config_path() == "~/.ssh/config"
    monkeypatch.setenv("LAZYCLUSTER_SSH_CONFIG", "/etc/other_config")
    assert default_config_path() == "/etc/other_config"


def test_missing_config_resolves_names_as_hosts(tmp_path):
    config = SSHConfigFile(str(tmp_path / "missing"))
    settings = config.resolve("example-host")
    assert settings.hostname == "example-host"
    assert settings.port == 22
    assert settings.strict_host_key_checking == "yes"
    assert not settings.in_config
    assert config.host_aliases() == []


def test_first_value_wins_and_host_star_defaults(home):
    config_path = home / ".ssh" / "config"
    config_path.write_text(
        "Host worker1\n"
        "    HostName 10.0.0.5\n"
        "    Port 2222\n"
        "Host worker*\n"
        "    Port 3333\n"
        "    User data\n"
        "Host *\n"
        "    User nobody\n"
        "    IdentityFile ~/.ssh/id_test\n"
        "    ConnectTimeout 7\n"
        "    StrictHostKeyChecking accept-new\n"
        "    UserKnownHostsFile ~/.ssh/kh1 ~/.ssh/kh2\n"
    )
    settings = SSHConfigFile(str(config_path)).resolve("worker1")
    assert settings.hostname == "10.0.0.5"
    assert settings.port == 2222
    assert settings.user == "data"
    assert settings.identity_files == (str(home / ".ssh" / "id_test"),)
    assert settings.connect_timeout == 7.0
    assert settings.strict_host_key_checking == "accept-new"
    assert settings.known_hosts_files == (str(home / ".ssh" / "kh1"), str(home / ".ssh" / "kh2"))
    assert settings.known_hosts_name == "[10.0.0.5]:2222"
    assert settings.in_config


def test_host_aliases_skip_patterns(tmp_path):
    config_path = tmp_path / "config"
    config_path.write_text(
        "Host alpha beta\n  Port 1\nHost *.example.com\nHost !gamma delta?\nHost alpha\nHost epsilon\n"
    )
    assert SSHConfigFile(str(config_path)).host_aliases() == ["alpha", "beta", "epsilon"]


def test_include_relative_glob_and_block_scope(home):
    ssh_dir = home / ".ssh"
    (ssh_dir / "conf.d").mkdir()
    (ssh_dir / "conf.d" / "b.conf").write_text("Host second\n    HostName 10.0.0.2\n")
    (ssh_dir / "conf.d" / "a.conf").write_text("Host first\n    HostName 10.0.0.1\n")
    (ssh_dir / "conf.d" / "ignored.txt").write_text("Host never\n")
    config_path = ssh_dir / "config"
    config_path.write_text(
        "Host outer\n    Include conf.d/*.conf\n    User after-include\nHost *\n    Port 2200\n"
    )
    config = SSHConfigFile(str(config_path))
    assert config.host_aliases() == ["outer", "first", "second"]

    # The User line after the Include belongs to `Host outer` again, not to `second`.
    assert config.resolve("outer").user == "after-include"
    assert config.resolve("second").user is None
    assert config.resolve("second").hostname == "10.0.0.2"
    assert config.resolve("first").port == 2200


def test_include_absolute_path_and_nesting(tmp_path):
    (tmp_path / "inner").write_text("Host deep\n    Port 2022\n")
    (tmp_path / "middle").write_text(f"Include {tmp_path / 'inner'}\n")
    config_path = tmp_path / "config"
    config_path.write_text(f"Include {tmp_path / 'middle'}\n")
    assert SSHConfigFile(str(config_path)).resolve("deep").port == 2022


def test_include_loop_raises(tmp_path):
    config_path = tmp_path / "config"
    config_path.write_text(f"Include {config_path}\n")
    with pytest.raises(ValueError, match="Include loop"):
        expand_includes(str(config_path))


def test_match_blocks_apply(tmp_path):
    config_path = tmp_path / "config"
    config_path.write_text("Match host gpu*\n    User trainer\nHost gpu1\n    HostName 10.1.1.1\n")
    assert SSHConfigFile(str(config_path)).resolve("gpu1").user == "trainer"


def test_strict_host_key_checking_values(tmp_path):
    config_path = tmp_path / "config"
    config_path.write_text(
        "Host a\n  StrictHostKeyChecking ask\nHost b\n  StrictHostKeyChecking off\n"
        "Host c\n  StrictHostKeyChecking no\n"
    )
    config = SSHConfigFile(str(config_path))
    assert config.resolve("a").strict_host_key_checking == "yes"
    assert config.resolve("b").strict_host_key_checking == "no"
    assert config.resolve("c").strict_host_key_checking == "no"


def test_server_alive_defaults_and_values(tmp_path):
    config_path = tmp_path / "config"
    config_path.write_text(
        "Host quick\n  ServerAliveInterval 2\n  ServerAliveCountMax 5\n"
        "Host off\n  ServerAliveInterval 0\n"
    )
    config = SSHConfigFile(str(config_path))
    assert (config.resolve("plain").server_alive_interval, config.resolve("plain").server_alive_count_max) == (15, 3)
    assert (config.resolve("quick").server_alive_interval, config.resolve("quick").server_alive_count_max) == (2, 5)
    assert config.resolve("off").server_alive_interval == 0


@pytest.mark.parametrize(
    "line",
    ["ServerAliveInterval -1", "ServerAliveInterval soon", "ServerAliveCountMax 0"],
)
def test_server_alive_invalid_values_raise(tmp_path, line):
    config_path = tmp_path / "config"
    config_path.write_text(f"Host h\n  {line}\n")
    keyword, value = line.split()
    with pytest.raises(ValueError, match=f"Invalid {keyword} '{value}' for host 'h'"):
        SSHConfigFile(str(config_path)).resolve("h")


def test_ipv6_hostname_known_hosts_name(tmp_path):
    config_path = tmp_path / "config"
    config_path.write_text(
        "Host v6\n  HostName ::1\n  Port 2201\nHost v6default\n  HostName fe80::1\n"
    )
    config = SSHConfigFile(str(config_path))
    assert config.resolve("v6").known_hosts_name == "[::1]:2201"
    assert config.resolve("v6default").known_hosts_name == "fe80::1"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("", ()),
        ("none", ()),
        ("bastion", (JumpHost("bastion"),)),
        ("ops@bastion:2200,inner", (JumpHost("bastion", "ops", 2200), JumpHost("inner"))),
        ("[::1]:2222", (JumpHost("::1", None, 2222),)),
        ("ssh://me@gate", (JumpHost("gate", "me"),)),
        ("fe80::2", (JumpHost("fe80::2"),)),
    ],
)
def test_parse_proxy_jump(value, expected):
    assert parse_proxy_jump(value) == expected


def test_proxy_jump_from_config(tmp_path):
    config_path = tmp_path / "config"
    config_path.write_text("Host target\n  ProxyJump a,b@c:2\n")
    assert SSHConfigFile(str(config_path)).resolve("target").proxy_jump == (
        JumpHost("a"),
        JumpHost("c", "b", 2),
    )


def test_parse_socket_table_ipv4_and_ipv6():
    table = (
        "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid\n"
        "   0: 00000000:0016 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0\n"
        "   1: 0100007F:1F90 0100007F:C350 01 00000000:00000000 00:00000000 00000000  1000\n"
        "   2: 0100007F:1F91 0100007F:C351 06 00000000:00000000 00:00000000 00000000     0\n"
        "  sl  local_address                         remote_address                        st\n"
        "   0: 00000000000000000000000001000000:2382 00000000000000000000000000000000:0000 0A\n"
    )
    # 0x0016 = 22 listening, 0x1F90 = 8080 established, 0x1F91 = 8081 in TIME_WAIT, 0x2382 = 9090 on IPv6.
    assert parse_socket_table(table) == {22, 8080, 9090}


def test_parse_proc_stats_odd_command_names():
    text = "12 (python3) S 1 12 12 0\n13 (a b) c) Z 12 12 12\n14 (sleep) R 12 99 99\ngarbage\n"
    stats = parse_proc_stats(text)
    assert [(stat.pid, stat.state, stat.pgrp) for stat in stats] == [
        (12, "S", 12),
        (13, "Z", 12),
        (14, "R", 99),
    ]


def test_build_script_quotes_env_and_cwd():
    script = build_script(["echo", "a b"], {"X": "it's $HOME"}, "/dir with space")
    assert script.splitlines() == [
        "export X='it'\"'\"'s $HOME'",
        "cd -- '/dir with space' || exit",
        "echo 'a b'",
    ]


@pytest.mark.parametrize("name", ["", "9A", "A-B", "A B", "A=B", "$(x)", 5])
def test_validate_env_rejects_names(name):
    with pytest.raises(ValueError, match="environment variable name"):
        validate_env({name: "x"})


def test_line_splitter_handles_split_utf8_and_last_line():
    lines: list[str] = []
    splitter = LineSplitter(lines.append)
    data = "grüße\nzweite".encode()
    for index in range(len(data)):
        splitter.feed(data[index : index + 1])
    splitter.flush()
    assert lines == ["grüße", "zweite"]


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("~", '"$HOME"'),
        ("~/a b", "\"$HOME\"/'a b'"),
        ("/x/~y", "'/x/~y'"),
        ("~user/x", "'~user/x'"),
    ],
)
def test_quote_path_keeps_home(path, expected):
    assert quote_path(path) == expected
