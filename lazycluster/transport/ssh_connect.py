"""Opening paramiko connections from resolved SSH settings.

Handles host key checking (known_hosts, `StrictHostKeyChecking`), ProxyJump
chains, handshake retries and the mapping of paramiko and socket errors to
lazycluster's `TransportError` subclasses.
"""

from __future__ import annotations

import getpass
import ipaddress
import logging
import os
import random
import socket
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

import paramiko

from lazycluster.clock import Clock
from lazycluster.exceptions import (
    AuthenticationError,
    HostKeyError,
    HostUnreachableError,
    TransportError,
)
from lazycluster.transport.ssh_alive import AliveCheck
from lazycluster.transport.ssh_channel_guard import GuardedTransport
from lazycluster.transport.ssh_config import (
    GLOBAL_KNOWN_HOSTS,
    HOST_KEY_POLICIES,
    HostSettings,
    JumpHost,
    SSHConfigFile,
)

logger = logging.getLogger(__name__)

# Seconds for the TCP connect and each handshake step when the config sets no ConnectTimeout.
DEFAULT_CONNECT_TIMEOUT = 30.0

# Handshake attempts when sshd drops a connection before its banner, as it does
# for connections beyond its MaxStartups limit. The delay doubles per attempt.
HANDSHAKE_ATTEMPTS = 6
HANDSHAKE_FIRST_DELAY = 0.2

# Longest ProxyJump chain followed, so that a loop in the config ends.
MAX_JUMPS = 10

# Key of `connection_kwargs` that overrides StrictHostKeyChecking; not passed to paramiko.
HOST_KEY_POLICY_KWARG = "strict_host_key_checking"

# Seconds to wait for paramiko's transport thread to end after close().
THREAD_JOIN_TIMEOUT = 5.0

_known_hosts_lock = threading.Lock()


@dataclass
class Connection:
    """A connected paramiko client and the clients of its jump hosts, outermost last."""

    client: paramiko.SSHClient
    settings: HostSettings
    jump_clients: list[paramiko.SSHClient] = field(default_factory=list)

    def __post_init__(self) -> None:
        transport = self.client.get_transport()
        assert isinstance(transport, GuardedTransport), "the client was not connected by Connector"
        # Stored here because SSHClient.close() drops its reference. A closed
        # transport reports is_active() False.
        self.transport: GuardedTransport = transport

        # The keepalives also keep idle tunnels alive through NAT and firewall
        # timeouts, on the jump hosts' connections too, which carry this one.
        self._alive: AliveCheck | None = None
        if self.settings.server_alive_interval > 0:
            self._alive = AliveCheck(
                self.settings.alias,
                transport,
                self.settings.server_alive_interval,
                self.settings.server_alive_count_max,
            )

    def close(self) -> None:
        for client in [self.client, *self.jump_clients]:
            transport = client.get_transport()
            client.close()
            # paramiko's transport thread ends shortly after close(); waiting
            # for it means a closed connection leaves no thread behind.
            if transport is not None and transport is not threading.current_thread():
                transport.join(THREAD_JOIN_TIMEOUT)
        if self._alive is not None:
            self._alive.stop()


class Connector:
    """Opens connections to host aliases of one SSH config."""

    def __init__(
        self,
        config: SSHConfigFile,
        clock: Clock,
        gate: threading.BoundedSemaphore,
        host_key_policy: str | None = None,
        resolve_unknown_hosts: bool = True,
    ) -> None:
        self.config = config
        self.clock = clock
        self.gate = gate
        self.host_key_policy = host_key_policy
        self.resolve_unknown_hosts = resolve_unknown_hosts

    def settings_for(self, alias: str) -> HostSettings:
        """Return the effective settings of `alias`, with an explicit host key policy applied."""
        settings = self.config.resolve(alias)
        if self.host_key_policy is not None:
            settings = replace(settings, strict_host_key_checking=self.host_key_policy)
        return settings

    def open(self, alias: str, connection_kwargs: Mapping[str, object] | None = None) -> Connection:
        """Connect to `alias`, through its ProxyJump hops when it has any."""
        kwargs = dict(connection_kwargs or {})
        settings = self.settings_for(alias)
        policy = kwargs.pop(HOST_KEY_POLICY_KWARG, None)
        if policy is not None:
            settings = replace(settings, strict_host_key_checking=str(policy))
        _check_policy(settings)
        self._check_known(settings)

        jump_clients: list[paramiko.SSHClient] = []
        try:
            sock = self._open_jumps(settings, settings.proxy_jump, jump_clients, depth=0)
            client = self._handshake(settings, kwargs, sock)
        except BaseException:
            for jump_client in jump_clients:
                jump_client.close()
            raise
        return Connection(client, settings, jump_clients)

    def _check_known(self, settings: HostSettings) -> None:
        if settings.in_config or self.resolve_unknown_hosts:
            return
        if settings.hostname == "localhost" or _is_ip_address(settings.hostname):
            return
        raise HostUnreachableError(
            settings.alias,
            f"Host alias {settings.alias!r} is not in the SSH config {self.config.path!r}. "
            "Check the spelling, or add the host with `lazycluster add-runtime NAME USER@HOST`.",
        )

    def _open_jumps(
        self,
        target: HostSettings,
        hops: tuple[JumpHost, ...],
        jump_clients: list[paramiko.SSHClient],
        depth: int,
    ) -> paramiko.Channel | None:
        """Connect through `hops` and return a channel to `target`, or None without hops."""
        if not hops:
            return None
        if depth >= MAX_JUMPS:
            raise HostUnreachableError(
                target.alias,
                f"ProxyJump chain of host {target.alias!r} is longer than {MAX_JUMPS} hops. "
                "Check the SSH config for a ProxyJump loop.",
            )

        # The last hop connects to the target. It is reached through the hops
        # before it, or, for the first hop, through its own ProxyJump setting.
        *earlier, last = hops
        hop = self.settings_for(last.host)
        hop = replace(hop, user=last.user or hop.user, port=last.port or hop.port)
        _check_policy(hop)
        hop_sock = self._open_jumps(hop, tuple(earlier) or hop.proxy_jump, jump_clients, depth + 1)
        hop_client = self._handshake(hop, {}, hop_sock)
        jump_clients.insert(0, hop_client)
        logger.info("Connected to jump host %s for host %s", hop.alias, target.alias)

        transport = hop_client.get_transport()
        assert transport is not None
        try:
            return transport.open_channel(
                "direct-tcpip",
                (target.hostname, target.port),
                ("127.0.0.1", 0),
                timeout=target.connect_timeout or DEFAULT_CONNECT_TIMEOUT,
            )
        except (paramiko.SSHException, OSError) as error:
            raise HostUnreachableError(
                target.alias,
                f"Jump host {hop.alias!r} failed to connect to {target.hostname}:{target.port} "
                f"for host {target.alias!r}: {error}. Check HostName and Port of "
                f"{target.alias!r} as seen from {hop.alias!r}.",
                error,
            ) from error

    def _handshake(
        self, settings: HostSettings, kwargs: Mapping[str, object], sock: paramiko.Channel | None
    ) -> paramiko.SSHClient:
        """Connect one client, retrying while sshd drops connections before its banner."""
        delay = HANDSHAKE_FIRST_DELAY
        timeout = settings.connect_timeout or DEFAULT_CONNECT_TIMEOUT
        for attempt in range(1, HANDSHAKE_ATTEMPTS + 1):
            started = self.clock.monotonic()
            try:
                with self.gate:
                    return self._handshake_once(settings, kwargs, sock)
            except _HandshakeDropped as dropped:
                # sshd drops connections beyond MaxStartups at once; a handshake
                # that took most of the timeout hit a host that does not respond.
                timed_out = self.clock.monotonic() - started >= timeout / 2
                # A channel of a jump host cannot be reused after a failed handshake.
                if timed_out:
                    raise HostUnreachableError(
                        settings.alias,
                        f"Host {settings.alias!r} ({settings.hostname}:{settings.port}) did not "
                        f"complete the SSH handshake within {timeout:g} s: {dropped.__cause__}. "
                        "Check that the host is up and not overloaded, or raise ConnectTimeout.",
                        dropped.__cause__,
                    ) from dropped.__cause__
                if sock is not None or attempt == HANDSHAKE_ATTEMPTS:
                    raise HostUnreachableError(
                        settings.alias,
                        f"SSH handshake with host {settings.alias!r} "
                        f"({settings.hostname}:{settings.port}) failed {attempt} times: "
                        f"{dropped.__cause__}. Check that sshd runs there and allows enough "
                        "concurrent logins (MaxStartups).",
                        dropped.__cause__,
                    ) from dropped.__cause__
                logger.info(
                    "Handshake with host %s dropped (%s), retry %d in %.2f s",
                    settings.alias,
                    dropped.__cause__,
                    attempt,
                    delay,
                )
                self.clock.sleep(delay * random.uniform(0.5, 1.5))  # noqa: S311 - jitter only
                delay *= 2
        raise AssertionError("unreachable")

    def _handshake_once(
        self, settings: HostSettings, kwargs: Mapping[str, object], sock: paramiko.Channel | None
    ) -> paramiko.SSHClient:
        timeout = settings.connect_timeout or DEFAULT_CONNECT_TIMEOUT
        client = paramiko.SSHClient()
        _install_host_key_policy(client, settings)
        options: dict[str, object] = {
            "hostname": settings.hostname,
            "port": settings.port,
            "username": settings.user or getpass.getuser(),
            "key_filename": [path for path in settings.identity_files if os.path.isfile(path)]
            or None,
            "look_for_keys": not settings.identities_only,
            "allow_agent": True,
            "timeout": timeout,
            "banner_timeout": timeout,
            "auth_timeout": timeout,
            "sock": sock if sock is not None else _open_socket(settings, timeout),
            "transport_factory": _make_transport,
        }
        options.update(kwargs)

        try:
            client.connect(**options)  # type: ignore[arg-type]
        except BaseException as error:
            client.close()
            _raise_mapped(settings, error, options)
            raise

        return client


# AES-GCM first: it encrypts and authenticates in one pass, and carried about
# 1.5 times the tunnel throughput of aes128-ctr with HMAC in a local test of
# paramiko 5.1 against OpenSSH 9.2 (an estimate on a loaded 2-core machine).
_PREFERRED_CIPHERS = ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com")

# Bytes and packets after which paramiko requests new keys itself. OpenSSH's
# packet.c requests them after 2**32 blocks (64 GiB) with a 16-byte block
# cipher, 1 GiB with smaller blocks, or 2**31 packets, so sshd requests first.
REKEY_BYTES = 2**37
REKEY_PACKETS = 2**33


def _make_transport(sock: object, disabled_algorithms: object = None) -> paramiko.Transport:
    transport = GuardedTransport(sock, disabled_algorithms=disabled_algorithms)
    options = transport.get_security_options()
    available = list(options.ciphers)
    preferred = [name for name in _PREFERRED_CIPHERS if name in available]
    options.ciphers = tuple(preferred + [name for name in available if name not in preferred])

    # paramiko 5.1 requests new keys itself after 512 MiB. Its thread then
    # replies to a channel close only once the key exchange has ended, and only
    # that thread can end it. So a close that sshd sent just before our request
    # stalls the thread for 30 s, after which paramiko drops the connection.
    # When sshd requests new keys, it sends nothing but the exchange until it
    # ends, so paramiko's own limits are raised above sshd's as a fallback only.
    # NOTE: with a server that never requests new keys, the stall remains
    # possible once paramiko's fallback limit is reached.
    transport.packetizer.REKEY_BYTES = REKEY_BYTES
    transport.packetizer.REKEY_PACKETS = REKEY_PACKETS
    return transport


class _HandshakeDropped(Exception):
    """sshd closed the connection before the handshake finished; worth a retry."""


def _check_policy(settings: HostSettings) -> None:
    if settings.strict_host_key_checking not in HOST_KEY_POLICIES:
        raise ValueError(
            f"Invalid StrictHostKeyChecking value {settings.strict_host_key_checking!r} "
            f"for host {settings.alias!r}: expected one of {', '.join(HOST_KEY_POLICIES)}."
        )


def _is_ip_address(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _open_socket(settings: HostSettings, timeout: float) -> socket.socket:
    """Return a TCP socket connected to the host, trying each address of its name."""
    address = f"{settings.hostname}:{settings.port}"
    try:
        infos = socket.getaddrinfo(settings.hostname, settings.port, type=socket.SOCK_STREAM)
    except socket.gaierror as error:
        raise HostUnreachableError(
            settings.alias,
            f"Host name {settings.hostname!r} of host {settings.alias!r} could not be resolved: "
            f"{error}. Check the spelling, or set HostName for it in the SSH config.",
            error,
        ) from error

    last_error: OSError | None = None
    for family, kind, proto, _, sockaddr in infos:
        sock = socket.socket(family, kind, proto)
        sock.settimeout(timeout)
        try:
            sock.connect(sockaddr)
        except OSError as error:
            sock.close()
            last_error = error
            continue
        # Without TCP_NODELAY, small SSH packets wait for delayed ACKs (about
        # 40 ms on Linux), which would dominate the time of a short command.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock

    reason = "timed out" if isinstance(last_error, TimeoutError) else str(last_error)
    raise HostUnreachableError(
        settings.alias,
        f"Failed to connect to host {settings.alias!r} at {address}: {reason}. Check that "
        "the host is up, that sshd listens on that port, and HostName/Port in the SSH config.",
        last_error,
    ) from last_error


def _raise_mapped(
    settings: HostSettings, error: BaseException, options: Mapping[str, object]
) -> None:
    """Raise the lazycluster error for a failed `SSHClient.connect`, or return to re-raise it."""
    alias = settings.alias
    if isinstance(error, TransportError):
        return
    if isinstance(error, paramiko.BadHostKeyException):
        raise HostKeyError(
            alias,
            f"Host key of host {alias!r} ({settings.known_hosts_name}) differs from the one in "
            f"known_hosts: got {error.key.get_name()} {_fingerprint(error.key)}. If the host "
            f"was reinstalled, remove the old key with `ssh-keygen -R "
            f"'{settings.known_hosts_name}'` and connect again; otherwise do not connect.",
            error,
        ) from error
    if isinstance(error, paramiko.AuthenticationException):
        raise _authentication_error(settings, error, options) from error
    if isinstance(error, paramiko.SSHException) and "authentication" in str(error).lower():
        # paramiko raises a plain SSHException when it found no key to offer.
        raise _authentication_error(settings, error, options) from error
    # paramiko reports a connection closed before the key exchange as a banner
    # error, or as "No existing session" when start_client saw the transport die.
    message = str(error).lower()
    dropped = isinstance(error, (EOFError, ConnectionResetError)) or (
        isinstance(error, paramiko.SSHException)
        and ("banner" in message or "no existing session" in message)
    )
    if dropped:
        raise _HandshakeDropped() from error
    if isinstance(error, (OSError, paramiko.SSHException)):
        raise HostUnreachableError(
            alias,
            f"Connection to host {alias!r} ({settings.hostname}:{settings.port}) failed "
            f"during the SSH handshake: {error}.",
            error,
        ) from error


def _authentication_error(
    settings: HostSettings, error: Exception, options: Mapping[str, object]
) -> AuthenticationError:
    user = options.get("username")
    key_files = list(options.get("key_filename") or [])  # type: ignore[call-overload]
    locked = [path for path in key_files if _needs_passphrase(path)]
    if locked or isinstance(error, paramiko.PasswordRequiredException):
        paths = ", ".join(locked) or "the private key"
        return AuthenticationError(
            settings.alias,
            f"Authentication as {user!r} on host {settings.alias!r} failed: {paths} is "
            "protected by a passphrase and no SSH agent offered the key. Add it to the agent "
            f"with `ssh-add {locked[0] if locked else 'KEY'}`, or pass the passphrase in "
            "connection_kwargs={'passphrase': ...}.",
            error,
        )
    tried = ", ".join(key_files) or "the default keys in ~/.ssh"
    return AuthenticationError(
        settings.alias,
        f"Authentication as {user!r} on host {settings.alias!r} failed: the host accepted "
        f"none of the keys offered ({tried}, and the SSH agent's keys). Install your public "
        f"key there with `ssh-copy-id {settings.alias}`, or set User and IdentityFile for "
        "it in the SSH config.",
        error,
    )


def _needs_passphrase(path: str) -> bool:
    try:
        paramiko.PKey.from_path(path)
    except paramiko.PasswordRequiredException:
        return True
    except TypeError as error:
        # paramiko 5.1 passes on this error of `cryptography` for an encrypted OpenSSH key.
        return "password" in str(error).lower()
    except (OSError, paramiko.SSHException, ValueError):
        return False
    return False


def _fingerprint(key: paramiko.PKey) -> str:
    return key.fingerprint


def _install_host_key_policy(client: paramiko.SSHClient, settings: HostSettings) -> None:
    if settings.strict_host_key_checking == "no":
        client.set_missing_host_key_policy(_AcceptAnyKey())
        return

    for path in (*settings.known_hosts_files, *GLOBAL_KNOWN_HOSTS):
        if os.path.isfile(path):
            client.load_system_host_keys(path)
    if settings.strict_host_key_checking == "accept-new":
        client.set_missing_host_key_policy(_AcceptNewKey(settings))
    else:
        client.set_missing_host_key_policy(_RejectUnknownKey(settings))


class _AcceptAnyKey(paramiko.MissingHostKeyPolicy):
    """StrictHostKeyChecking no: connect without checking or storing the key."""

    def missing_host_key(
        self, client: paramiko.SSHClient, hostname: str, key: paramiko.PKey
    ) -> None:
        return


class _AcceptNewKey(paramiko.MissingHostKeyPolicy):
    """StrictHostKeyChecking accept-new: store an unknown key in the first known_hosts file."""

    def __init__(self, settings: HostSettings) -> None:
        self.settings = settings

    def missing_host_key(
        self, client: paramiko.SSHClient, hostname: str, key: paramiko.PKey
    ) -> None:
        path = self.settings.known_hosts_files[0]
        line = f"{hostname} {key.get_name()} {key.get_base64()}\n"
        with _known_hosts_lock:
            os.makedirs(os.path.dirname(path) or ".", mode=0o700, exist_ok=True)
            with open(path, "a", encoding="ascii") as known_hosts:
                known_hosts.write(line)
        logger.info(
            "Stored new host key of host %s (%s %s) in %s",
            self.settings.alias,
            key.get_name(),
            _fingerprint(key),
            path,
        )


class _RejectUnknownKey(paramiko.MissingHostKeyPolicy):
    """StrictHostKeyChecking yes (the default): reject a key that is not in known_hosts."""

    def __init__(self, settings: HostSettings) -> None:
        self.settings = settings

    def missing_host_key(
        self, client: paramiko.SSHClient, hostname: str, key: paramiko.PKey
    ) -> None:
        settings = self.settings
        port_option = f"-p {settings.port} " if settings.port != 22 else ""
        raise HostKeyError(
            settings.alias,
            f"Host key of host {settings.alias!r} ({hostname}, {key.get_name()} "
            f"{_fingerprint(key)}) is not in known_hosts "
            f"({', '.join(settings.known_hosts_files)}). To trust it, run `ssh {settings.alias}` "
            f"once and accept the key, or check the fingerprint and run `ssh-keyscan "
            f"{port_option}{settings.hostname} >> {settings.known_hosts_files[0]}`, or set "
            "`StrictHostKeyChecking accept-new` for this host in the SSH config.",
        )
