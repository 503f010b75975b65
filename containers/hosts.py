"""Start SSH test hosts in Docker containers and write the SSH files to reach them.

`start_hosts(n, image=...)` starts n containers of the image from
`containers.build` in parallel with testcontainers and publishes each one's
port 22 on 127.0.0.1 only. It generates a throwaway ed25519 key pair and
writes known_hosts with each container's real host keys, plus an ssh_config
with one `Host` alias per container. It returns once a real paramiko login
works on every host.

The returned `HostGroup` removes its containers on `close()`. Containers are
also removed at interpreter exit, on SIGTERM/SIGHUP and when the start is
interrupted (Ctrl-C included), by the labels set in `containers.cleanup`.
"""

from __future__ import annotations

import itertools
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paramiko

from containers import cleanup
from containers.faults import HostFaults, PortBlocker
from containers.leftovers import Leftovers, find_leftovers, remove_leftovers
from containers.ssh_files import HostEntry, config_text, known_hosts_lines, write_key_pair

log = logging.getLogger(__name__)

NON_ROOT_USER = "lazy"
SSH_PORT = 22
READY_TIMEOUT = 60.0
LOGIN_TIMEOUT = 10.0
LOGIN_RETRY_INTERVAL = 0.2
# How long a failed or interrupted start waits for its threads before it
# removes the containers. A container created later is left to the atexit sweep.
ABORT_WAIT_TIMEOUT = 30.0
HOST_KEY_FILES = "/etc/ssh/ssh_host_*_key.pub"

# Aliases are unique within the process, so hosts of several groups never clash.
_alias_numbers = itertools.count()
_alias_lock = threading.Lock()


class HostStartError(RuntimeError):
    """A test host did not start or did not accept an SSH login in time."""


@dataclass(frozen=True)
class ExecResult:
    """Exit code and output of a command run in a container with docker exec."""

    alias: str
    argv: tuple[str, ...]
    exit_code: int
    stdout: str
    stderr: str

    @property
    def output(self) -> str:
        return self.stdout + self.stderr

    def check(self) -> ExecResult:
        """Return self, or raise RuntimeError naming the command when the exit code is not 0."""
        if self.exit_code != 0:
            raise RuntimeError(
                f"Command {list(self.argv)} on host {self.alias} failed with exit code "
                f"{self.exit_code}: {self.output.strip()[-2000:]}"
            )
        return self


@dataclass(eq=False)
class DockerHost(HostFaults):
    """One SSH test host: its alias in the group's ssh_config, published port and container."""

    alias: str
    port: int
    container: Any  # docker.models.containers.Container
    user: str
    _blockers: list[PortBlocker] = field(default_factory=list, repr=False)
    _paused: bool = field(default=False, repr=False)
    _slow_start_set: bool = field(default=False, repr=False)

    def exec(self, argv: Sequence[str], user: str = "root") -> ExecResult:
        """Run `argv` in the container with docker exec (no shell, no SSH) and return the result."""
        exit_code, (stdout, stderr) = self.container.exec_run(list(argv), user=user, demux=True)
        return ExecResult(
            alias=self.alias,
            argv=tuple(argv),
            exit_code=exit_code,
            stdout=(stdout or b"").decode(errors="replace"),
            stderr=(stderr or b"").decode(errors="replace"),
        )

    def leftovers(self, temp_pattern: str = "*") -> Leftovers:
        """Return the processes, listening ports and temp paths the harness did not start."""
        return find_leftovers(self, temp_pattern=temp_pattern)

    def remove_leftovers(self, temp_pattern: str = "*") -> Leftovers:
        """Kill leftover processes and delete leftover temp paths; return what was found."""
        return remove_leftovers(self, temp_pattern=temp_pattern)

    def host_keys(self) -> list[str]:
        """Return the lines of the container's host public key files."""
        result = self.exec(["sh", "-c", f"cat {HOST_KEY_FILES}"]).check()
        return [line for line in result.stdout.splitlines() if line.strip()]

    def logs(self, tail: int = 50) -> str:
        """Return the last `tail` lines of the container's output (sshd's log)."""
        return str(self.container.logs(tail=tail).decode(errors="replace"))


class HostGroup:
    """Hosts started together, with the SSH config, known_hosts and key that reach them."""

    def __init__(
        self,
        hosts: list[DockerHost],
        workdir: Path,
        user: str,
        group_id: str,
        owns_workdir: bool = False,
    ) -> None:
        self.hosts = hosts
        self.group_id = group_id
        self.workdir = workdir
        self.user = user
        self.key_path = workdir / "id_ed25519"
        self.known_hosts_path = workdir / "known_hosts"
        self.ssh_config_path = workdir / "ssh_config"
        # A temporary workdir holds the private key, so close() removes it.
        self._owns_workdir = owns_workdir
        self._closed = False

    @property
    def aliases(self) -> list[str]:
        return [host.alias for host in self.hosts]

    def __iter__(self) -> Iterator[DockerHost]:
        return iter(self.hosts)

    def __len__(self) -> int:
        return len(self.hosts)

    def __getitem__(self, index: int) -> DockerHost:
        return self.hosts[index]

    def host(self, alias: str) -> DockerHost:
        """Return the host with `alias`, or raise KeyError listing the known aliases."""
        for host in self.hosts:
            if host.alias == alias:
                return host
        raise KeyError(f"No test host with alias {alias!r}; this group has {self.aliases}.")

    def write_ssh_files(self) -> None:
        """(Re)write known_hosts and ssh_config from the hosts' current ports and host keys."""
        entries = [HostEntry(h.alias, h.port, h.user, h.host_keys()) for h in self.hosts]
        self.known_hosts_path.write_text("\n".join(known_hosts_lines(entries)) + "\n")
        self.ssh_config_path.write_text(config_text(entries, self.key_path, self.known_hosts_path))

    def connect(self, alias: str, timeout: float = LOGIN_TIMEOUT) -> paramiko.SSHClient:
        """Log in to `alias` with paramiko, using only the settings of the generated ssh_config."""
        config = paramiko.SSHConfig.from_path(str(self.ssh_config_path)).lookup(alias)
        client = paramiko.SSHClient()
        client.load_host_keys(config["userknownhostsfile"])
        client.set_missing_host_key_policy(paramiko.RejectPolicy())
        try:
            client.connect(
                config["hostname"],
                port=int(config["port"]),
                username=config["user"],
                key_filename=config["identityfile"],
                look_for_keys=False,
                allow_agent=False,
                timeout=timeout,
                banner_timeout=timeout,
                auth_timeout=timeout,
            )
        except BaseException:
            client.close()
            raise
        return client

    def close(self) -> None:
        """Remove every container of the group (idempotent)."""
        if self._closed:
            return
        self._closed = True
        for host in self.hosts:
            _remove_container(host.container)
        cleanup.remove_containers(group_id=self.group_id)
        if self._owns_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> HostGroup:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _configure_testcontainers() -> None:
    # Ryuk would need an image from a registry, so cleanup goes by label instead.
    # Without docker_host mode and TC_HOST, testcontainers 4.15 returns the
    # bridge gateway address as the host when it finds /.dockerenv on the manager.
    os.environ["TESTCONTAINERS_RYUK_DISABLED"] = "true"
    os.environ["TESTCONTAINERS_CONNECTION_MODE"] = "docker_host"
    os.environ["TC_HOST"] = "127.0.0.1"

    from testcontainers.core.config import ConnectionMode, testcontainers_config

    # The configuration object was filled in at import, maybe before the lines above.
    testcontainers_config.ryuk_disabled = True
    testcontainers_config.connection_mode_override = ConnectionMode.docker_host
    testcontainers_config.tc_host_override = "127.0.0.1"


def _remove_container(container: Any) -> None:
    import docker

    try:
        container.remove(force=True, v=True)
        log.info("removed test host container %s", container.name)
    except docker.errors.NotFound:
        pass


def _published_port(container: Any) -> int:
    container.reload()
    bindings = container.attrs["NetworkSettings"]["Ports"].get(f"{SSH_PORT}/tcp") or []
    for binding in bindings:
        if binding["HostIp"] == "127.0.0.1":
            return int(binding["HostPort"])
    raise HostStartError(f"container {container.name} publishes port {SSH_PORT} as {bindings}, expected 127.0.0.1 only")


def _start_container(image: str, alias: str, public_key: str, user: str, group_id: str) -> DockerHost:
    from testcontainers.core.container import DockerContainer

    name = f"lazycluster-test-{alias}-{cleanup.RUN_ID[:8]}"
    wrapper = DockerContainer(image).with_env("AUTHORIZED_KEY", public_key).with_name(name)
    # A (address, None) value publishes on that address with a free port;
    # with_bind_ports() cannot set an address.
    wrapper.ports[f"{SSH_PORT}/tcp"] = ("127.0.0.1", None)  # type: ignore[assignment]
    wrapper.with_kwargs(labels=cleanup.run_labels(group_id), hostname=alias)

    wrapper.start()
    container = wrapper.get_wrapped_container()
    port = _published_port(container)
    if wrapper.get_container_host_ip() != "127.0.0.1":
        raise HostStartError(f"testcontainers reports host {wrapper.get_container_host_ip()}, expected 127.0.0.1")
    log.info("host %s: container %s started, ssh on 127.0.0.1:%d", alias, container.short_id, port)
    return DockerHost(alias=alias, port=port, container=container, user=user)


def _wait_for_login(group: HostGroup, host: DockerHost, timeout: float, abort: threading.Event) -> None:
    deadline = time.monotonic() + timeout
    attempts = 0
    while not abort.is_set():
        attempts += 1
        try:
            client = group.connect(host.alias, timeout=min(LOGIN_TIMEOUT, timeout))
        except (paramiko.SSHException, OSError, EOFError) as error:
            if host.status() != "running":
                raise HostStartError(f"host {host.alias} exited during start:\n{host.logs()}") from error
            if time.monotonic() > deadline:
                raise HostStartError(
                    f"host {host.alias} (127.0.0.1:{host.port}) accepted no SSH login within "
                    f"{timeout:.0f} s ({attempts} attempts, last error: {error!r}). sshd log:\n{host.logs()}"
                ) from error
            log.debug("host %s: login attempt %d failed: %r", host.alias, attempts, error)
            abort.wait(LOGIN_RETRY_INTERVAL)
            continue

        try:
            _stdin, stdout, _stderr = client.exec_command("true", timeout=timeout)
            stdout.channel.recv_exit_status()
        finally:
            client.close()
        log.info("host %s: SSH login works after %d attempt(s)", host.alias, attempts)
        return


def _next_aliases(count: int, prefix: str) -> list[str]:
    with _alias_lock:
        return [f"{prefix}{next(_alias_numbers)}" for _ in range(count)]


def start_hosts(
    count: int,
    *,
    image: str,
    workdir: Path | None = None,
    user: str = NON_ROOT_USER,
    alias_prefix: str = "lchost",
    ready_timeout: float = READY_TIMEOUT,
) -> HostGroup:
    """Start `count` SSH hosts in parallel and return them once each accepts an SSH login.

    `user` is the login of every alias: the non-root user (default) or "root".
    The SSH files go to `workdir` (a new temporary directory when None). On any
    failure or interrupt, every container started so far is removed.
    """
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"Invalid host count {count!r}: expected an int of at least 1.")
    if user not in (NON_ROOT_USER, "root"):
        raise ValueError(f"Invalid user {user!r}: the image has {NON_ROOT_USER!r} and 'root'.")

    cleanup.install_exit_handlers()
    _configure_testcontainers()
    owns_workdir = workdir is None
    workdir = Path(workdir or tempfile.mkdtemp(prefix="lazycluster-hosts-"))
    workdir.mkdir(parents=True, exist_ok=True)
    public_key = write_key_pair(workdir / "id_ed25519")
    aliases = _next_aliases(count, alias_prefix)

    group_id = cleanup.new_group_id()
    abort = threading.Event()
    started = time.monotonic()
    hosts: list[DockerHost] = []
    pool = ThreadPoolExecutor(max_workers=count, thread_name_prefix="start-host")
    futures: list[Future[Any]] = []
    try:
        for alias in aliases:
            futures.append(pool.submit(_start_container, image, alias, public_key, user, group_id))
        # Collect every future before raising, so no started container goes unrecorded.
        errors = []
        for future in futures:
            try:
                hosts.append(future.result())
            except Exception as error:  # noqa: BLE001 - re-raised below after cleanup
                errors.append(error)
        if errors:
            raise HostStartError(f"{len(errors)} of {count} test hosts did not start: {errors[0]}") from errors[0]

        group = HostGroup(hosts, workdir, user, group_id, owns_workdir)
        group.write_ssh_files()
        list(pool.map(lambda host: _wait_for_login(group, host, ready_timeout, abort), hosts))
    except BaseException:
        log.warning("start of test hosts %s failed or was interrupted, removing their containers", aliases)
        # Wait (bounded) for the threads, so that a container being created
        # right now exists when the group is removed by its label.
        abort.set()
        pool.shutdown(wait=False, cancel_futures=True)
        wait(futures, timeout=ABORT_WAIT_TIMEOUT)
        for host in hosts:
            _remove_container(host.container)
        cleanup.remove_containers(group_id=group_id)
        if owns_workdir:
            shutil.rmtree(workdir, ignore_errors=True)
        raise
    pool.shutdown(wait=True)

    log.info("started %d test hosts %s in %.1f s", count, aliases, time.monotonic() - started)
    return group


def main() -> int:
    """Start hosts from the command line and keep them until Ctrl-C."""
    import argparse

    from containers.build import build_image

    parser = argparse.ArgumentParser(prog="python -m containers.hosts", description=main.__doc__)
    parser.add_argument("count", type=int, nargs="?", default=3, help="number of hosts to start (default 3)")
    parser.add_argument("--user", default=NON_ROOT_USER, choices=[NON_ROOT_USER, "root"], help="login user of every alias")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    group = start_hosts(args.count, image=build_image(), user=args.user)
    try:
        print(f"hosts {' '.join(group.aliases)} are up; try: ssh -F {group.ssh_config_path} {group.aliases[0]}")
        print(f"LAZYCLUSTER_SSH_CONFIG={group.ssh_config_path}")
        print("Press Ctrl-C to remove them.", flush=True)
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        group.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
