"""Write the files an SSH client needs for the test hosts: key pair, known_hosts, config."""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

HOST_ADDRESS = "127.0.0.1"


@dataclass(frozen=True)
class HostEntry:
    """One `Host` block: an alias for a container's published SSH port and its host keys."""

    alias: str
    port: int
    user: str
    host_keys: Sequence[str]  # lines "TYPE BASE64 [COMMENT]" of the container's *.pub files
    # The published port on loopback by default. The benchmarks use the
    # container's own address and port 22, which skips Docker's port proxy.
    address: str = HOST_ADDRESS


def write_key_pair(private_path: Path) -> str:
    """Write a new ed25519 private key (mode 0600) and its .pub beside it; return the public line."""
    key = Ed25519PrivateKey.generate()
    private_bytes = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    public_line = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    ).decode() + " lazycluster-test-hosts"

    descriptor = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "wb") as file:
        file.write(private_bytes)
    private_path.with_name(private_path.name + ".pub").write_text(public_line + "\n")
    return public_line


def _check_config_path(path: Path) -> None:
    # ssh_config quoting differs between OpenSSH and paramiko, so refuse paths that need it.
    if any(character.isspace() or character in "\"'#" for character in str(path)):
        raise ValueError(
            f"Invalid path {str(path)!r} for an SSH config: it contains whitespace, a quote or '#'. "
            "Use a working directory without such characters."
        )


def known_hosts_lines(entries: Iterable[HostEntry]) -> list[str]:
    """Return known_hosts lines `[ADDRESS]:PORT TYPE KEY` for every host key of every entry.

    Port 22 is written as the bare address, as OpenSSH and paramiko look it up.
    """
    lines = []
    for entry in entries:
        name = entry.address if entry.port == 22 else f"[{entry.address}]:{entry.port}"
        for key_line in entry.host_keys:
            key_type, key_data = key_line.split()[:2]
            lines.append(f"{name} {key_type} {key_data}")
    return lines


def config_text(entries: Iterable[HostEntry], key_path: Path, known_hosts_path: Path) -> str:
    """Return an ssh_config with one `Host` block per entry, verifying host keys strictly."""
    _check_config_path(key_path)
    _check_config_path(known_hosts_path)
    blocks = []
    for entry in entries:
        blocks.append(
            f"Host {entry.alias}\n"
            f"    HostName {entry.address}\n"
            f"    Port {entry.port}\n"
            f"    User {entry.user}\n"
            f"    IdentityFile {key_path}\n"
            f"    IdentitiesOnly yes\n"
            f"    UserKnownHostsFile {known_hosts_path}\n"
            f"    StrictHostKeyChecking yes\n"
        )
    return "\n".join(blocks)
