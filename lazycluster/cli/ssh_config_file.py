"""Add and remove `Host` entries in an OpenSSH client config file.

The file is edited as text, line by line, so that comments, blank lines,
`Include` lines, `Match` blocks and every other entry stay byte for byte as
they were. A change is written to a temporary file in the same directory and
moved over the old file with `os.replace`, so a reader sees either the old or
the new file, never half of one. The previous content is kept next to it as
`<name>.bak`. A symlinked config is edited at its target, so the link stays.

Values are checked before they reach the file: a name or value with a newline,
a control character or (where the keyword takes one word) whitespace would
change what the file means for other hosts.
"""

from __future__ import annotations

import fcntl
import ipaddress
import logging
import os
import re
import stat
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from lazycluster.exceptions import LazyclusterError

logger = logging.getLogger(__name__)

DEFAULT_FILE_MODE = 0o600
DEFAULT_DIR_MODE = 0o700
BACKUP_SUFFIX = ".bak"

# Client keywords of ssh_config(5), lower-cased. OpenSSH stops with "Bad
# configuration option" on any other keyword, which would break `ssh` for every
# host, so -o rejects them. ChannelTimeout, ObscureKeystrokeTiming and Tag came
# after OpenSSH 9.2; UseKeychain is Apple's addition.
SSH_CLIENT_KEYWORDS = frozenset(
    keyword.lower()
    for keyword in """
    AddKeysToAgent AddressFamily BatchMode BindAddress BindInterface CanonicalDomains
    CanonicalizeFallbackLocal CanonicalizeHostname CanonicalizeMaxDots
    CanonicalizePermittedCNAMEs CASignatureAlgorithms CertificateFile ChallengeResponseAuthentication
    ChannelTimeout CheckHostIP Ciphers ClearAllForwardings Compression ConnectionAttempts
    ConnectTimeout ControlMaster ControlPath ControlPersist DynamicForward
    EnableEscapeCommandline EnableSSHKeysign EscapeChar ExitOnForwardFailure FingerprintHash
    ForkAfterAuthentication ForwardAgent ForwardX11 ForwardX11Timeout ForwardX11Trusted
    GatewayPorts GlobalKnownHostsFile GSSAPIAuthentication GSSAPIDelegateCredentials
    HashKnownHosts HostbasedAcceptedAlgorithms HostbasedAuthentication HostbasedKeyTypes
    HostKeyAlgorithms HostKeyAlias HostName IdentitiesOnly IdentityAgent IdentityFile
    IgnoreUnknown IPQoS KbdInteractiveAuthentication KbdInteractiveDevices KexAlgorithms
    KnownHostsCommand LocalCommand LocalForward LogLevel LogVerbose MACs
    NoHostAuthenticationForLocalhost NumberOfPasswordPrompts ObscureKeystrokeTiming
    PasswordAuthentication PermitLocalCommand PermitRemoteOpen PKCS11Provider Port
    PreferredAuthentications ProxyCommand ProxyJump ProxyUseFdpass PubkeyAcceptedAlgorithms
    PubkeyAcceptedKeyTypes PubkeyAuthentication RekeyLimit RemoteCommand RemoteForward
    RequestTTY RequiredRSASize RevokedHostKeys SecurityKeyProvider SendEnv
    ServerAliveCountMax ServerAliveInterval SessionType SetEnv StdinNull StreamLocalBindMask
    StreamLocalBindUnlink StrictHostKeyChecking SyslogFacility Tag TCPKeepAlive Tunnel
    TunnelDevice UpdateHostKeys UseKeychain User UserKnownHostsFile VerifyHostKeyDNS
    VisualHostKey XAuthLocation
    """.split()
)

# A config line is "Keyword value", "Keyword=value" or "Keyword = value".
_KEYWORD_LINE = re.compile(r"^\s*([A-Za-z][A-Za-z0-9]*)(?:\s*=\s*|\s+)(\S.*?)\s*$")
_HOSTNAME = re.compile(r"^[A-Za-z0-9_](?:[A-Za-z0-9_.-]*[A-Za-z0-9_])?$")
_NAME_FORBIDDEN = set("*?!,#\"'\\=")


class SSHConfigError(LazyclusterError):
    """The SSH config file cannot be read or edited as requested."""

    def __init__(self, path: str, msg: str) -> None:
        self.path = path
        super().__init__(msg)


@dataclass(frozen=True)
class Target:
    """Where a runtime is: `[USER@]HOST[:PORT]` split into its parts."""

    hostname: str
    user: str | None = None
    port: int | None = None


@dataclass(frozen=True)
class HostEntry:
    """A new `Host` block: an alias and the options written under it."""

    name: str
    target: Target
    identity_file: str | None = None
    options: tuple[tuple[str, str], ...] = field(default_factory=tuple)

    def option_lines(self) -> list[tuple[str, str]]:
        """Return the (keyword, value) pairs of the block in the order they are written."""
        pairs = [("HostName", self.target.hostname)]
        if self.target.user is not None:
            pairs.append(("User", self.target.user))
        if self.target.port is not None:
            pairs.append(("Port", str(self.target.port)))
        if self.identity_file is not None:
            pairs.append(("IdentityFile", _quote_if_spaced(self.identity_file)))
        pairs.extend(self.options)
        return pairs

    def render(self, newline: str) -> str:
        lines = [f"Host {self.name}"] + [f"    {key} {value}" for key, value in self.option_lines()]
        return newline.join(lines) + newline


@dataclass(frozen=True)
class Block:
    """A `Host` or `Match` line and the lines up to the next one: `lines[start:end]`."""

    keyword: str
    patterns: tuple[str, ...]
    start: int
    end: int

    @property
    def has_wildcard(self) -> bool:
        return self.keyword == "match" or any(
            char in pattern for pattern in self.patterns for char in "*?!"
        )


# ---------------------------------------------------------------------------
# Checking values


def _reject_control_characters(what: str, value: str) -> None:
    if any(ord(char) < 32 or ord(char) == 127 for char in value):
        raise ValueError(f"Invalid {what} {value!r}: it contains a newline or control character.")


def _quote_if_spaced(value: str) -> str:
    return f'"{value}"' if any(char.isspace() for char in value) else value


def validate_runtime_name(name: str) -> str:
    """Return `name` if it can be a `Host` alias on its own, else raise ValueError."""
    _reject_control_characters("runtime name", name)
    if not name:
        raise ValueError("Invalid runtime name '': give a non-empty name such as 'worker1'.")
    if any(char.isspace() for char in name):
        raise ValueError(f"Invalid runtime name {name!r}: it must not contain whitespace.")
    if name.startswith("-"):
        raise ValueError(f"Invalid runtime name {name!r}: it must not start with '-'.")
    bad = sorted(_NAME_FORBIDDEN.intersection(name))
    if bad:
        raise ValueError(
            f"Invalid runtime name {name!r}: it must not contain {' '.join(bad)} "
            "(wildcards and quotes have a meaning in the SSH config)."
        )
    return name


def _validate_hostname(host: str, text: str) -> str:
    if host.startswith("[") and host.endswith("]"):
        literal = host[1:-1]
        try:
            ipaddress.IPv6Address(literal)
        except ValueError:
            raise ValueError(f"Invalid host {text!r}: {literal!r} is not an IPv6 address.") from None
        return literal

    if ":" in host:
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(
                f"Invalid host {text!r}: write an IPv6 address in brackets, e.g. '[::1]:2222'."
            ) from None
        return host

    if not _HOSTNAME.match(host):
        raise ValueError(
            f"Invalid host {text!r}: {host!r} is not a hostname or IP address "
            "(letters, digits, '-', '_' and '.' only)."
        )
    return host


def _split_port(text: str) -> tuple[str, int | None]:
    """Split `HOST[:PORT]`; a bare IPv6 address without brackets has no port."""
    if text.startswith("["):
        closing = text.find("]")
        if closing == -1:
            raise ValueError(f"Invalid host {text!r}: the '[' of the IPv6 address is not closed.")
        host, rest = text[: closing + 1], text[closing + 1 :]
        if not rest:
            return host, None
        if not rest.startswith(":"):
            raise ValueError(f"Invalid host {text!r}: expected ':PORT' after ']'.")
        return host, _parse_port(rest[1:], text)

    if text.count(":") == 1:
        host, port_text = text.split(":")
        return host, _parse_port(port_text, text)
    return text, None


def _parse_port(port_text: str, text: str) -> int:
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise ValueError(f"Invalid port {port_text!r} in {text!r}: expected a number from 1 to 65535.")
    return int(port_text)


def parse_target(text: str) -> Target:
    """Parse `[USER@]HOST[:PORT]`, where HOST may be `[IPv6]`; raise ValueError when invalid."""
    _reject_control_characters("host", text)
    if not text or any(char.isspace() for char in text):
        raise ValueError(f"Invalid host {text!r}: expected [USER@]HOST[:PORT] without spaces.")

    user, at, host_port = text.rpartition("@")
    if at and not user:
        raise ValueError(f"Invalid host {text!r}: the user name before '@' is empty.")
    if ":" in user:
        raise ValueError(
            f"Invalid user in {text!r}: ':' is not allowed. Passwords cannot be stored in "
            "the SSH config; use a key with --id-file."
        )
    if any(char in user for char in "\"'#"):
        raise ValueError(f"Invalid user {user!r}: quotes and '#' are not allowed.")

    host, port = _split_port(host_port)
    if not host:
        raise ValueError(f"Invalid host {text!r}: the host name is empty.")
    hostname = _validate_hostname(host, text)
    return Target(hostname=hostname, user=user or None, port=port)


def parse_option(text: str) -> tuple[str, str]:
    """Parse `KEY=VALUE` (or `KEY VALUE`, as `ssh -o` takes) into a checked pair."""
    _reject_control_characters("option", text)
    match = _KEYWORD_LINE.match(text)
    if match is None:
        raise ValueError(f"Invalid option {text!r}: expected KEY=VALUE, e.g. 'ForwardAgent=yes'.")

    key, value = match.group(1), match.group(2)
    if key.lower() not in SSH_CLIENT_KEYWORDS:
        raise ValueError(
            f"Invalid option {text!r}: {key!r} is not an ssh_config keyword; check its "
            "spelling against `man ssh_config`."
        )
    if '"' in value and not (value.startswith('"') and value.endswith('"') and value.count('"') == 2):
        raise ValueError(f"Invalid option {text!r}: quotes must enclose the whole value.")
    return key, value


def validate_identity_file(path: str) -> str:
    """Return `path` if it can be written as an `IdentityFile` value, else raise ValueError."""
    _reject_control_characters("identity file", path)
    if not path.strip():
        raise ValueError("Invalid identity file '': give the path of a private key.")
    if '"' in path:
        raise ValueError(f"Invalid identity file {path!r}: it must not contain '\"'.")
    return path


# ---------------------------------------------------------------------------
# Reading and parsing


def resolve_config_path(path: str | None) -> str:
    """Return the config path to edit: `path`, else $LAZYCLUSTER_SSH_CONFIG, else ~/.ssh/config."""
    chosen = path or os.environ.get("LAZYCLUSTER_SSH_CONFIG") or "~/.ssh/config"
    return os.path.abspath(os.path.expanduser(chosen))


def _read_lines(path: str) -> list[str]:
    try:
        with open(path, encoding="utf-8", newline="") as config_file:
            return config_file.read().splitlines(keepends=True)
    except FileNotFoundError:
        return []
    except UnicodeDecodeError as error:
        raise SSHConfigError(
            path, f"SSH config {path} is not valid UTF-8 ({error.reason}); fix or remove the bad bytes."
        ) from error


def _split_patterns(value: str) -> tuple[str, ...]:
    patterns = []
    for token in re.findall(r'"[^"]*"|\S+', value):
        if token.startswith("#"):
            break
        patterns.append(token.strip('"'))
    return tuple(patterns)


def parse_blocks(lines: list[str], path: str) -> list[Block]:
    """Split the lines into `Host`/`Match` blocks; raise SSHConfigError on a malformed line."""
    starts: list[tuple[int, str, tuple[str, ...]]] = []
    for index, line in enumerate(lines):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue

        match = _KEYWORD_LINE.match(line.rstrip("\r\n"))
        if match is None:
            raise SSHConfigError(
                path,
                f"SSH config {path} line {index + 1} is malformed: {stripped!r}. "
                "Expected 'Keyword value'; fix that line.",
            )

        keyword = match.group(1).lower()
        if keyword in ("host", "match"):
            starts.append((index, keyword, _split_patterns(match.group(2))))

    blocks = []
    for position, (start, keyword, patterns) in enumerate(starts):
        end = starts[position + 1][0] if position + 1 < len(starts) else len(lines)
        blocks.append(Block(keyword, patterns, start, end))
    return blocks


def configured_names(path: str) -> list[str]:
    """Return every alias named on a `Host` line of the file, wildcards left out."""
    lines = _read_lines(path)
    names: list[str] = []
    for block in parse_blocks(lines, path):
        if block.keyword == "host":
            names.extend(p for p in block.patterns if not set("*?!").intersection(p))
    return names


# ---------------------------------------------------------------------------
# Editing


def _newline_of(lines: list[str]) -> str:
    return "\r\n" if lines and lines[0].endswith("\r\n") else "\n"


def _leading_comment_start(lines: list[str], index: int, floor: int) -> int:
    """Return the first line of the comment run directly above `index` (not crossing `floor`)."""
    while index > floor and lines[index - 1].lstrip().startswith("#"):
        index -= 1
    return index


def _insert_position(lines: list[str], blocks: list[Block]) -> int:
    """Return where a new `Host` block goes.

    OpenSSH uses the first value it reads for most keywords, so a `Host *` or
    `Match` block above the new entry would override its User or Port. The
    entry therefore goes above the first such block (and the comments heading
    it), else at the end.
    """
    for position, block in enumerate(blocks):
        if block.has_wildcard:
            floor = blocks[position - 1].start + 1 if position else 0
            return _leading_comment_start(lines, block.start, floor)
    return len(lines)


def add_host_lines(lines: list[str], entry: HostEntry, path: str) -> list[str]:
    """Return `lines` with a block for `entry` inserted; reject a name that is already configured."""
    blocks = parse_blocks(lines, path)

    # NOTE: aliases defined in files pulled in by `Include` are not checked.
    for block in blocks:
        if block.keyword == "host" and entry.name in block.patterns:
            raise SSHConfigError(
                path,
                f"Runtime {entry.name!r} already exists in {path} (line {block.start + 1}). "
                f"Choose another name or remove it with `lazycluster delete-runtime {entry.name}`.",
            )

    newline = _newline_of(lines)
    new_lines = list(lines)
    if new_lines and not new_lines[-1].endswith(("\n", "\r")):
        new_lines[-1] += newline

    position = _insert_position(new_lines, blocks)
    block_text = entry.render(newline)
    if position > 0 and new_lines[position - 1].strip():
        block_text = newline + block_text
    if position < len(new_lines):
        block_text += newline
    new_lines[position:position] = block_text.splitlines(keepends=True)
    return new_lines


def _block_removal_range(lines: list[str], block: Block) -> tuple[int, int]:
    """Return the line range to delete for `block`.

    Comment lines at the end of a block head the next entry, so they stay;
    blank lines after the removed options go with them.
    """
    end = block.end
    if end < len(lines):
        end = _leading_comment_start(lines, end, block.start + 1)
    while end > block.start + 1 and not lines[end - 1].strip():
        end -= 1
    while end < block.end and not lines[end].strip():
        end += 1
    return block.start, end


def remove_host_lines(lines: list[str], name: str, path: str) -> list[str]:
    """Return `lines` without the `Host` entry `name`.

    A `Host` line that names several aliases keeps the others and its options.
    """
    for block in parse_blocks(lines, path):
        if block.keyword != "host" or name not in block.patterns:
            continue

        new_lines = list(lines)
        remaining = [pattern for pattern in block.patterns if pattern != name]
        if remaining:
            line = lines[block.start]
            ending = line[len(line.rstrip("\r\n")) :]
            indent = line[: len(line) - len(line.lstrip())]
            new_lines[block.start] = f"{indent}Host {' '.join(remaining)}{ending}"
            return new_lines

        start, end = _block_removal_range(lines, block)
        del new_lines[start:end]
        if start == len(new_lines):
            # The last entry went, so the blank lines that separated it go too.
            while new_lines and not new_lines[-1].strip():
                new_lines.pop()
        return new_lines

    raise SSHConfigError(
        path,
        f"Runtime {name!r} is not in {path}. Run `lazycluster list-runtimes` to see the configured names.",
    )


# ---------------------------------------------------------------------------
# Writing


@contextmanager
def _locked(path: str) -> Iterator[None]:
    """Hold an exclusive lock on the config file so two edits do not lose one another.

    Another process may replace the file while this one waits. The lock is then
    on the old file, so it is taken again on the new one.
    """
    while True:
        try:
            handle = open(path, "rb")
        except FileNotFoundError:
            yield
            return

        with handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                current = os.stat(path)
            except FileNotFoundError:
                current = None
            if current is not None and current.st_ino == os.fstat(handle.fileno()).st_ino:
                yield
                return


def _write_atomically(path: str, content: str, mode: int) -> None:
    directory = os.path.dirname(path) or "."
    descriptor, temp_path = tempfile.mkstemp(prefix=".lazycluster-", dir=directory)
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8", newline="") as temp_file:
            temp_file.write(content)
            temp_file.flush()
            os.fsync(temp_file.fileno())
        os.chmod(temp_path, mode)
        os.replace(temp_path, path)
    except BaseException:
        try:
            os.unlink(temp_path)
        except FileNotFoundError:
            pass
        raise


def _edit(path: str, change: str, edit_lines: Callable[[list[str], str], list[str]]) -> None:
    real_path = os.path.realpath(path)
    directory = os.path.dirname(real_path)
    if not os.path.isdir(directory):
        os.makedirs(directory, mode=DEFAULT_DIR_MODE, exist_ok=True)
        logger.info("Created directory %s for the SSH config", directory)

    with _locked(real_path):
        lines = _read_lines(real_path)
        new_lines = edit_lines(lines, path)
        exists = os.path.exists(real_path)
        mode = stat.S_IMODE(os.stat(real_path).st_mode) if exists else DEFAULT_FILE_MODE

        if exists:
            _write_atomically(real_path + BACKUP_SUFFIX, "".join(lines), mode)
        _write_atomically(real_path, "".join(new_lines), mode)
    logger.info("%s in SSH config %s (backup: %s%s)", change, real_path, real_path, BACKUP_SUFFIX)


def add_host_entry(path: str, entry: HostEntry) -> None:
    """Add a `Host` block for `entry` to the config at `path`, creating the file if missing."""
    _edit(path, f"Added runtime {entry.name!r}", lambda lines, p: add_host_lines(lines, entry, p))


def remove_host_entry(path: str, name: str) -> None:
    """Remove the `Host` entry `name` from the config at `path`."""
    if not os.path.exists(path):
        raise SSHConfigError(path, f"Runtime {name!r} is not configured: {path} does not exist.")
    _edit(path, f"Removed runtime {name!r}", lambda lines, p: remove_host_lines(lines, name, p))
