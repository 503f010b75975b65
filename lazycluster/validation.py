"""Checks of caller input, run before anything reaches a host.

Each check raises `TypeError` for a value of the wrong type and `ValueError`
for a value of the right type that cannot work, naming the value and the fix.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

from lazycluster.transport import validate_port

# A working directory is exported as $WORKING_DIR, and user commands commonly
# use it unquoted (`cd $WORKING_DIR`), so it is limited to characters that no
# shell treats specially.
_SAFE_PATH = re.compile(r"[A-Za-z0-9_./+,:=@%~-]+")

# POSIX names of environment variables.
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def check_non_empty_str(value: object, name: str) -> str:
    """Return `value` if it is a string with a non-blank character, else raise."""
    if not isinstance(value, str):
        raise TypeError(f"Invalid {name} {value!r}: expected a string.")
    if not value.strip():
        raise ValueError(f"Invalid {name} {value!r}: it must not be empty.")
    return value


def check_host(host: object) -> str:
    """Return `host` if it is usable as an SSH config alias or hostname."""
    check_non_empty_str(host, "host")
    assert isinstance(host, str)
    if host != host.strip() or any(character.isspace() for character in host):
        raise ValueError(f"Invalid host {host!r}: remove the whitespace.")
    if host.startswith("-"):
        raise ValueError(f"Invalid host {host!r}: a host name must not start with '-'.")
    return host


def check_working_dir(path: object) -> str:
    """Return `path` if it is a directory path safe to export as WORKING_DIR."""
    check_non_empty_str(path, "working_dir")
    assert isinstance(path, str)
    if not _SAFE_PATH.fullmatch(path):
        raise ValueError(
            f"Invalid working_dir {path!r}: use only letters, digits and the characters "
            "_ . / + , : = @ % ~ -, because the path is exported as $WORKING_DIR and shell "
            "commands commonly use that variable unquoted."
        )
    if path.startswith("-"):
        raise ValueError(f"Invalid working_dir {path!r}: it must not start with '-'.")
    if "~" in path and not (path == "~" or path.startswith("~/")) or path.count("~") > 1:
        raise ValueError(
            f"Invalid working_dir {path!r}: '~' is only allowed as the first character, "
            "followed by '/'."
        )
    return path


def check_env_variables(env_variables: object) -> dict[str, str]:
    """Return a copy of `env_variables` after checking names and values.

    Values may contain quotes, spaces and newlines: the transport quotes them.
    """
    if not isinstance(env_variables, Mapping):
        raise TypeError(f"Invalid env_variables {env_variables!r}: expected a dict of str to str.")

    checked: dict[str, str] = {}
    for key, value in env_variables.items():
        if not isinstance(key, str) or not _ENV_NAME.fullmatch(key):
            raise ValueError(
                f"Invalid environment variable name {key!r}: use letters, digits and '_', "
                "not starting with a digit."
            )
        if not isinstance(value, str):
            raise TypeError(
                f"Invalid value {value!r} of environment variable {key!r}: expected a string."
            )
        if "\0" in value:
            raise ValueError(
                f"Invalid value of environment variable {key!r}: it contains a NUL character."
            )
        checked[key] = value
    return checked


def check_ports(ports: object, name: str = "ports") -> list[int]:
    """Return `ports` as a list of valid port numbers; a single int becomes a list of one."""
    if isinstance(ports, int) and not isinstance(ports, bool):
        return [validate_port(ports, name)]
    if isinstance(ports, (str, bytes)) or not isinstance(ports, Iterable):
        raise TypeError(f"Invalid {name} {ports!r}: expected an int or a list of ints.")
    return [validate_port(port, name) for port in ports]


def check_host_list(hosts: object, name: str) -> list[str]:
    """Return `hosts` as a list of host names; a single string becomes a list of one."""
    if hosts is None:
        return []
    if isinstance(hosts, str):
        return [check_host(hosts)]
    if not isinstance(hosts, Iterable):
        raise TypeError(f"Invalid {name} {hosts!r}: expected a host name or a list of them.")
    return [check_host(host) for host in hosts]
