"""Resolution of SSH host aliases through the user's OpenSSH client config.

paramiko's `SSHConfig` applies `Host` and `Match` blocks with first-value-wins
semantics but ignores `Include`, so this module expands `Include` lines first.
As in OpenSSH, relative paths are taken from ~/.ssh and globs are expanded in
sorted order. An `Include` inside a `Host` or `Match` block applies only
within that block.
"""

from __future__ import annotations

import glob
import os
import re
import shlex
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import paramiko

DEFAULT_CONFIG_PATH = "~/.ssh/config"
CONFIG_PATH_ENV_VAR = "LAZYCLUSTER_SSH_CONFIG"
DEFAULT_SSH_PORT = 22
DEFAULT_KNOWN_HOSTS = ("~/.ssh/known_hosts", "~/.ssh/known_hosts2")
GLOBAL_KNOWN_HOSTS = ("/etc/ssh/ssh_known_hosts", "/etc/ssh/ssh_known_hosts2")
HOST_KEY_POLICIES = ("yes", "no", "accept-new")

# Nesting limit of Include files, as in OpenSSH (READCONF_MAX_DEPTH).
MAX_INCLUDE_DEPTH = 16

_KEYWORD = re.compile(r"^\s*(\w+)(?:\s*=\s*|\s+)(.*?)\s*$")


@dataclass(frozen=True)
class JumpHost:
    """One hop of a ProxyJump chain: `[user@]host[:port]`."""

    host: str
    user: str | None = None
    port: int | None = None


# Seconds between keepalives that want a reply, and how many may go without a
# reply before the connection counts as dead. OpenSSH sends none by default,
# but lazycluster keeps tunnels open for hours, so it checks unless the config
# sets ServerAliveInterval 0.
DEFAULT_SERVER_ALIVE_INTERVAL = 15
DEFAULT_SERVER_ALIVE_COUNT_MAX = 3


@dataclass(frozen=True)
class HostSettings:
    """Effective connection settings of one host alias."""

    alias: str
    hostname: str
    port: int = DEFAULT_SSH_PORT
    user: str | None = None
    identity_files: tuple[str, ...] = ()
    identities_only: bool = False
    connect_timeout: float | None = None
    # ServerAliveInterval and ServerAliveCountMax.
    server_alive_interval: int = DEFAULT_SERVER_ALIVE_INTERVAL
    server_alive_count_max: int = DEFAULT_SERVER_ALIVE_COUNT_MAX
    strict_host_key_checking: str = "yes"
    known_hosts_files: tuple[str, ...] = field(default=DEFAULT_KNOWN_HOSTS)
    proxy_jump: tuple[JumpHost, ...] = ()
    in_config: bool = False

    @property
    def known_hosts_name(self) -> str:
        """Name of this host in known_hosts files: `host`, or `[host]:port` off port 22."""
        if self.port == DEFAULT_SSH_PORT:
            return self.hostname
        return f"[{self.hostname}]:{self.port}"


def default_config_path() -> str:
    """Return the config path from LAZYCLUSTER_SSH_CONFIG, else ~/.ssh/config."""
    return os.environ.get(CONFIG_PATH_ENV_VAR) or DEFAULT_CONFIG_PATH


class SSHConfigFile:
    """An OpenSSH client config with its `Include` files expanded."""

    def __init__(self, path: str | None = None) -> None:
        self.path = os.path.expanduser(path or default_config_path())
        self.text = expand_includes(self.path) if os.path.isfile(self.path) else ""
        self._config = paramiko.SSHConfig.from_text(self.text)

    def host_aliases(self) -> list[str]:
        """Return the `Host` names without wildcard or negated patterns, in file order."""
        aliases: list[str] = []
        for line in self.text.splitlines():
            keyword, value = _split_line(line)
            if keyword != "host":
                continue
            for pattern in shlex.split(value):
                if any(char in pattern for char in "*?!") or pattern in aliases:
                    continue
                aliases.append(pattern)
        return aliases

    def resolve(self, alias: str) -> HostSettings:
        """Return the effective settings of `alias`; a name absent from the config is a hostname."""
        options = self._config.lookup(alias)
        in_config = alias in self.host_aliases() or options.get("hostname", alias) != alias
        port = int(options.get("port", DEFAULT_SSH_PORT))

        policy = options.get("stricthostkeychecking", "yes").lower()
        if policy == "ask":
            # The library cannot show a prompt, so "ask" rejects unknown keys like "yes".
            policy = "yes"
        if policy == "off":
            policy = "no"

        known_hosts = (
            tuple(shlex.split(options["userknownhostsfile"]))
            if ("userknownhostsfile" in options)
            else DEFAULT_KNOWN_HOSTS
        )

        timeout = options.get("connecttimeout")
        alive_interval = _whole_number(
            alias, options, "ServerAliveInterval", DEFAULT_SERVER_ALIVE_INTERVAL, minimum=0
        )
        alive_count = _whole_number(
            alias, options, "ServerAliveCountMax", DEFAULT_SERVER_ALIVE_COUNT_MAX, minimum=1
        )
        return HostSettings(
            alias=alias,
            hostname=options.get("hostname", alias),
            port=port,
            user=options.get("user"),
            identity_files=tuple(
                os.path.expanduser(path) for path in options.get("identityfile", [])
            ),
            identities_only=options.get("identitiesonly", "no").lower() == "yes",
            connect_timeout=float(timeout) if timeout else None,
            server_alive_interval=alive_interval,
            server_alive_count_max=alive_count,
            strict_host_key_checking=policy,
            known_hosts_files=tuple(os.path.expanduser(path) for path in known_hosts),
            proxy_jump=parse_proxy_jump(options.get("proxyjump", "")),
            in_config=in_config,
        )


def _whole_number(
    alias: str, options: Mapping[str, Any], keyword: str, default: int, minimum: int
) -> int:
    """Return the config's whole-number `keyword` for `alias`, or `default` when unset."""
    text = options.get(keyword.lower())
    if text is None:
        return default
    try:
        value: int | None = int(text)
    except ValueError:
        value = None
    if value is None or value < minimum:
        raise ValueError(
            f"Invalid {keyword} {text!r} for host {alias!r} in the SSH config: expected a "
            f"whole number of at least {minimum}. Fix the value or remove the line."
        )
    return value


def parse_proxy_jump(value: str) -> tuple[JumpHost, ...]:
    """Parse a ProxyJump value (`none`, or comma-separated `[user@]host[:port]` hops)."""
    value = value.strip()
    if not value or value.lower() == "none":
        return ()
    hops = []
    for spec in value.split(","):
        spec = spec.strip()
        if spec.startswith("ssh://"):
            spec = spec[len("ssh://") :]
        user, _, host_port = spec.rpartition("@")
        host, port = _split_host_port(host_port)
        hops.append(JumpHost(host=host, user=user or None, port=port))
    return tuple(hops)


def _split_host_port(text: str) -> tuple[str, int | None]:
    # An IPv6 literal needs brackets when it carries a port: [::1]:2222.
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        return host, int(rest[1:]) if rest.startswith(":") else None
    if text.count(":") == 1:
        host, _, port = text.partition(":")
        return host, int(port)
    return text, None


def _split_line(line: str) -> tuple[str, str]:
    stripped = line.strip()
    if not stripped or stripped.startswith("#"):
        return "", ""
    match = _KEYWORD.match(stripped)
    if match is None:
        return "", ""
    return match.group(1).lower(), match.group(2)


def expand_includes(path: str, depth: int = 0) -> str:
    """Return the text of the config at `path` with every `Include` line replaced by its files."""
    if depth > MAX_INCLUDE_DEPTH:
        raise ValueError(
            f"Invalid SSH config {path!r}: Include files nest more than {MAX_INCLUDE_DEPTH} deep. "
            "Check for an Include loop."
        )
    with open(path, encoding="utf-8") as config:
        lines = config.read().splitlines()

    expanded: list[str] = []
    block_header: str | None = None
    for line in lines:
        keyword, value = _split_line(line)
        if keyword in ("host", "match"):
            block_header = line.strip()
        if keyword != "include":
            expanded.append(line)
            continue

        for pattern in shlex.split(value):
            for included in _include_paths(pattern):
                expanded.append(expand_includes(included, depth + 1))

                # Lines after the Include belong to the block that contains it
                # again, even when the included file opened other blocks.
                expanded.append(block_header or "Host *")
    return "\n".join(expanded) + "\n"


def _include_paths(pattern: str) -> list[str]:
    pattern = os.path.expanduser(pattern)
    if not os.path.isabs(pattern):
        pattern = os.path.join(os.path.expanduser("~/.ssh"), pattern)
    return [path for path in sorted(glob.glob(pattern)) if os.path.isfile(path)]
