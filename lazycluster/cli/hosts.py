"""Helpers shared by the commands that connect to hosts: config path, host names, progress."""

from __future__ import annotations

import os
import sys

from lazycluster.cli import ssh_config_file
from lazycluster.exceptions import LazyclusterError
from lazycluster.transport import get_backend

SSH_CONFIG_ENV_VAR = "LAZYCLUSTER_SSH_CONFIG"


def progress(message: str) -> None:
    """Print one progress line on stderr, where it does not mix with the command's output."""
    print(f"lazycluster: {message}", file=sys.stderr, flush=True)


def use_ssh_config(path_option: str | None) -> str:
    """Point the SSH backend at the config to use and return its path.

    The backend reads $LAZYCLUSTER_SSH_CONFIG when it is created, so setting
    the variable before the first connection makes `--ssh-config` apply to the
    library as well. Raises LazyclusterError when the file does not exist and
    SSHConfigError when a line is malformed, with the line number.
    """
    path = ssh_config_file.resolve_config_path(path_option)
    if not os.path.isfile(path):
        raise LazyclusterError(
            f"SSH config {path} does not exist. Add a host with "
            "`lazycluster add-runtime NAME USER@HOST` or pass --ssh-config PATH."
        )

    # Checked here so that a malformed file fails with its line number before
    # any connection, whatever the SSH backend's own parser reports.
    ssh_config_file.configured_names(path)
    os.environ[SSH_CONFIG_ENV_VAR] = path
    return path


def check_hosts_configured(hosts: list[str] | None, path: str) -> None:
    """Raise ValueError when a requested host is not a `Host` alias of the SSH config."""
    if not hosts:
        return

    configured = get_backend().configured_hosts()
    missing = [host for host in hosts if host not in configured]
    if missing:
        known = ", ".join(configured) or "none"
        raise ValueError(
            f"Host {', '.join(missing)} is not in the SSH config {path} (configured: {known}). "
            f"Add it with `lazycluster add-runtime {missing[0]} USER@HOST`."
        )
