"""Copying files and folders over SFTP, keeping modes and creating parent folders."""

from __future__ import annotations

import errno
import os
import posixpath
import stat

import paramiko


def sftp_path(path: str) -> str:
    """Return `path` as SFTP understands it: `~/x` becomes `x`, relative to the home folder."""
    if path == "~":
        return "."
    if path.startswith("~/"):
        return path[2:] or "."
    return path


def make_remote_dirs(sftp: paramiko.SFTPClient, path: str) -> None:
    """Create folder `path` and its missing parents on the host."""
    if path in ("", ".", "/"):
        return
    try:
        if stat.S_ISDIR(sftp.stat(path).st_mode or 0):
            return
        raise NotADirectoryError(errno.ENOTDIR, "Not a folder on the host", path)
    except FileNotFoundError:
        pass
    make_remote_dirs(sftp, posixpath.dirname(path.rstrip("/")))
    sftp.mkdir(path)


def put_path(sftp: paramiko.SFTPClient, local_path: str, remote_path: str) -> None:
    """Copy a local file or folder to exactly `remote_path` on the host."""
    remote_path = sftp_path(remote_path)
    make_remote_dirs(sftp, posixpath.dirname(remote_path.rstrip("/")))
    if not os.path.isdir(local_path):
        _put_file(sftp, local_path, remote_path)
        return

    # Folder modes are set last, deepest first, so a read-only folder is filled before it closes.
    folder_modes: list[tuple[str, int]] = []
    for root, _, files in os.walk(local_path):
        relative = os.path.relpath(root, local_path)
        target = (
            remote_path if relative == "." else posixpath.join(remote_path, *relative.split(os.sep))
        )
        make_remote_dirs(sftp, target)
        folder_modes.append((target, stat.S_IMODE(os.stat(root).st_mode)))
        for name in files:
            _put_file(sftp, os.path.join(root, name), posixpath.join(target, name))
    for target, mode in reversed(folder_modes):
        sftp.chmod(target, mode)


def _put_file(sftp: paramiko.SFTPClient, local_path: str, remote_path: str) -> None:
    mode = stat.S_IMODE(os.stat(local_path).st_mode)
    sftp.put(local_path, remote_path)
    sftp.chmod(remote_path, mode)


def get_path(sftp: paramiko.SFTPClient, remote_path: str, local_path: str) -> None:
    """Copy a file or folder on the host to exactly `local_path` on the manager."""
    remote_path = sftp_path(remote_path)
    attributes = sftp.stat(remote_path)
    os.makedirs(os.path.dirname(os.path.abspath(local_path)), exist_ok=True)
    if not stat.S_ISDIR(attributes.st_mode or 0):
        _get_file(sftp, remote_path, local_path, attributes)
        return

    os.makedirs(local_path, exist_ok=True)
    for entry in sftp.listdir_attr(remote_path):
        source = posixpath.join(remote_path, entry.filename)
        target = os.path.join(local_path, entry.filename)
        if stat.S_ISDIR(entry.st_mode or 0):
            get_path(sftp, source, target)
        elif stat.S_ISREG(entry.st_mode or 0):
            _get_file(sftp, source, target, entry)
    os.chmod(local_path, stat.S_IMODE(attributes.st_mode or 0o755))


def _get_file(
    sftp: paramiko.SFTPClient,
    remote_path: str,
    local_path: str,
    attributes: paramiko.SFTPAttributes,
) -> None:
    if os.path.isdir(local_path):
        raise IsADirectoryError(errno.EISDIR, "Target of a file copy is a folder", local_path)
    sftp.get(remote_path, local_path)
    os.chmod(local_path, stat.S_IMODE(attributes.st_mode or 0o644))
