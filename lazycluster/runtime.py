"""Runtime: one host reached through the transport seam, usually over SSH.

A Runtime checks at construction that SSH works and that python3 3.8 or
newer runs on the host. It keeps a working directory there, runs `RuntimeTask`s and opens
tunnels (see `RuntimePortsMixin`). `cleanup()` undoes everything it started.
"""

from __future__ import annotations

import atexit
import itertools
import json
import logging
import posixpath
import weakref
from collections.abc import Mapping, Sequence
from typing import Any

from lazycluster import host_commands
from lazycluster.exceptions import (
    CommandTimeoutError,
    InvalidRuntimeError,
    LazyclusterError,
    PathCreationError,
    TransportError,
)
from lazycluster.runtime_ports import LOCALHOST
from lazycluster.runtime_tasks import RuntimeTasksMixin
from lazycluster.task import RuntimeTask
from lazycluster.transport import Transport, Tunnel, get_backend
from lazycluster.validation import (
    check_env_variables,
    check_host,
    check_non_empty_str,
    check_working_dir,
)

logger = logging.getLogger(__name__)

# Seconds the construction check may take: login plus one python3 start.
DEFAULT_PROBE_TIMEOUT = 60.0

# Runtimes not yet cleaned up; the exit handler below cleans them.
_live_runtimes: weakref.WeakSet[Runtime] = weakref.WeakSet()


_exit_handler_registered = False


def _cleanup_live_runtimes() -> None:
    for runtime in list(_live_runtimes):
        try:
            runtime.cleanup()
        except Exception:
            logger.warning("Cleanup at exit failed for host %s", runtime.host, exc_info=True)


def _track_live_runtime(runtime: Runtime) -> None:
    """Remember `runtime` for the exit handler, registering that handler once.

    The handler is registered after the first transport connected, because
    exit handlers run in reverse order: paramiko registers its own on import
    and closes every connection there, so ours must come later to run first.
    """
    global _exit_handler_registered
    if not _exit_handler_registered:
        atexit.register(_cleanup_live_runtimes)
        _exit_handler_registered = True
    _live_runtimes.add(runtime)


class Runtime(RuntimeTasksMixin):
    """One host where tasks run, files go and ports are exposed.

    Without `working_dir`, a temporary directory is created on the host at first
    use and removed by `cleanup()`. A given `working_dir` is created if missing
    and kept; a relative one is relative to the login user's home directory.
    Without `transport`, the active backend connects to `host`. The Runtime
    closes its transport at cleanup, unless it is the backend's shared
    transport of the manager's own machine.
    """

    WORKING_DIR_ENV_VAR_NAME = "WORKING_DIR"
    LOCALHOST = LOCALHOST

    def __init__(
        self,
        host: str,
        working_dir: str | None = None,
        connection_kwargs: Mapping[str, Any] | None = None,
        transport: Transport | None = None,
        *,
        probe_timeout: float = DEFAULT_PROBE_TIMEOUT,
    ) -> None:
        self._host = check_host(host)
        if working_dir is not None:
            check_working_dir(working_dir)
        if connection_kwargs is not None and not isinstance(connection_kwargs, Mapping):
            raise TypeError(f"Invalid connection_kwargs {connection_kwargs!r}: expected a dict.")
        if transport is not None and not isinstance(transport, Transport):
            raise TypeError(f"Invalid transport {transport!r}: expected a Transport.")

        self._connection_kwargs = dict(connection_kwargs or {})
        self._env_variables: dict[str, str] = {}
        self._processes: dict[str, RuntimeTask | Tunnel | None] = {}
        self._tasks: list[RuntimeTask] = []
        self._temp_dirs: list[str] = []
        self._working_dir: str | None = None
        self._key_counter = itertools.count()
        self._closed = False

        self._transport = transport if transport is not None else self._connect()
        self._owns_transport = self._transport is not _shared_local_transport()
        try:
            self._info = self._probe(probe_timeout)
            if working_dir is not None:
                self.working_dir = working_dir
        except BaseException:
            self._close_transport()
            raise

        _track_live_runtime(self)
        logger.info("Runtime %s ready (python %s)", self._host, self._info["python_version"])

    # --- connection ------------------------------------------------------------

    def _connect(self) -> Transport:
        try:
            return get_backend().connect(self._host, self._connection_kwargs)
        except (TransportError, OSError) as error:
            reason = f"connection failed: {str(error).rstrip('.')}"
            raise InvalidRuntimeError(self._host, reason, error) from error

    def _probe(self, timeout: float) -> dict[str, Any]:
        """Check in one round trip that python3 >= 3.8 runs on the host, and read the host info."""
        command = host_commands.python_command(host_commands.HOST_INFO_SNIPPET)
        try:
            result = self._transport.run(command, timeout=timeout)
        except CommandTimeoutError as error:
            raise InvalidRuntimeError(self._host, f"the check timed out after {timeout:g} s", error) from error
        except (TransportError, OSError) as error:
            reason = f"connection failed: {str(error).rstrip('.')}"
            raise InvalidRuntimeError(self._host, reason, error) from error

        if result.exit_code == 127:
            raise InvalidRuntimeError(self._host, "python3 was not found on the PATH")
        if result.exit_code != 0:
            tail = (result.stderr or result.stdout).strip().splitlines()[-3:]
            raise InvalidRuntimeError(
                self._host, f"python3 failed with exit code {result.exit_code}: {' '.join(tail)}"
            )
        try:
            info = json.loads(result.stdout.strip().splitlines()[-1])
        except (ValueError, IndexError) as error:
            raise InvalidRuntimeError(self._host, f"unreadable host info {result.stdout!r}") from error

        version = tuple(info.get("python_version_info", ()))
        if version < host_commands.MIN_PYTHON_VERSION:
            minimum = ".".join(map(str, host_commands.MIN_PYTHON_VERSION))
            raise InvalidRuntimeError(
                self._host, f"python3 is version {info.get('python_version')}, need {minimum} or newer"
            )
        return dict(info)

    @property
    def transport(self) -> Transport:
        """The transport to the host; after `cleanup()` a new connection is opened on use."""
        if self._closed:
            if self._owns_transport:
                logger.info("Reconnecting to host %s after cleanup", self._host)
                self._transport = self._connect()
            self._closed = False
            _track_live_runtime(self)
        return self._transport

    def _run(self, command: Sequence[str], timeout: float | None = None) -> Any:
        return self.transport.run(command, timeout=timeout)

    # --- identity and info -----------------------------------------------------

    @property
    def host(self) -> str:
        """Host alias or name of this runtime."""
        return self._host

    @property
    def class_name(self) -> str:
        return type(self).__name__

    @property
    def info(self) -> dict[str, Any]:
        """Host facts read at construction: os, cpu_cores, memory (bytes), python_version, gpus."""
        return {key: self._info[key] for key in ("os", "cpu_cores", "memory", "python_version", "gpus")}

    @property
    def os(self) -> str:
        return str(self._info["os"])

    @property
    def cpu_cores(self) -> int:
        return int(self._info["cpu_cores"])

    @property
    def memory(self) -> int:
        """Physical memory of the host in bytes."""
        return int(self._info["memory"])

    @property
    def memory_in_mb(self) -> int:
        return self.memory // (1024 * 1024)

    @property
    def python_version(self) -> str:
        return str(self._info["python_version"])

    @property
    def distributed_version(self) -> str | None:
        """The version of `distributed` for the host's python3 when the runtime connected, or None."""
        version = self._info.get("distributed_version")
        return str(version) if version else None

    @property
    def gpus(self) -> list[str]:
        """One "name, memory" entry per GPU that nvidia-smi lists; empty without one."""
        return list(self._info["gpus"])

    @property
    def gpu_count(self) -> int:
        return len(self._info["gpus"])

    def print_info(self) -> None:
        """Print the host facts to stdout."""
        print(f"{self._host}: {json.dumps(self.info, indent=2)}")

    def __repr__(self) -> str:
        return f"<Runtime {self._host!r} working_dir={self._working_dir!r}>"

    def __enter__(self) -> Runtime:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.cleanup()

    # --- working directory and environment --------------------------------------

    @property
    def working_dir(self) -> str:
        """Absolute working directory on the host; a temporary one is created at first use."""
        if self._working_dir is None:
            self._working_dir = self.create_tempdir()
        return self._working_dir

    @working_dir.setter
    def working_dir(self, working_dir: str) -> None:
        path = self._absolute_path(check_working_dir(working_dir))
        self.create_dir(path)
        self._working_dir = path

    def _absolute_path(self, path: str) -> str:
        home = str(self._info["home"])
        if path == "~":
            return home
        if path.startswith("~/"):
            path = path[2:]
        return posixpath.normpath(posixpath.join(home, path))

    @property
    def env_variables(self) -> dict[str, str]:
        """Environment variables of every task, including WORKING_DIR."""
        return {**self._env_variables, self.WORKING_DIR_ENV_VAR_NAME: self.working_dir}

    @env_variables.setter
    def env_variables(self, env_variables: Mapping[str, str]) -> None:
        self._env_variables = self._check_user_env(env_variables)

    def add_env_variables(self, env_variables: Mapping[str, str]) -> None:
        """Add or update environment variables of every task."""
        self._env_variables.update(self._check_user_env(env_variables))

    def _check_user_env(self, env_variables: Mapping[str, str]) -> dict[str, str]:
        checked = check_env_variables(env_variables)
        if self.WORKING_DIR_ENV_VAR_NAME in checked:
            raise ValueError(
                f"Invalid environment variable {self.WORKING_DIR_ENV_VAR_NAME!r}: it is set "
                "from the working directory, so set Runtime.working_dir instead."
            )
        return checked

    def create_tempdir(self) -> str:
        """Create a temporary directory on the host, removed at cleanup, and return its path."""
        result = self._run(host_commands.make_temp_dir())
        path = result.stdout.strip()
        if result.exit_code != 0 or not path:
            raise PathCreationError(
                "<temporary directory>", self._host, reason=(result.stderr or result.stdout).strip()
            )
        self._temp_dirs.append(path)
        logger.info("Created temporary directory %s on host %s", path, self._host)
        return path

    def create_dir(self, path: str) -> None:
        """Create `path` and its parents on the host; an existing directory is fine."""
        check_non_empty_str(path, "path")
        result = self._run(host_commands.make_dir(path))
        if result.exit_code != 0:
            raise PathCreationError(path, self._host, reason=(result.stderr or result.stdout).strip())

    def delete_dir(self, path: str) -> bool:
        """Remove `path` and its content on the host; return whether that succeeded."""
        check_non_empty_str(path, "path")
        normalized = posixpath.normpath(path)
        if normalized in ("/", ".", "~", str(self._info["home"])):
            raise ValueError(
                f"Invalid path {path!r} for delete_dir on host {self._host!r}: it is the root, "
                "current or home directory. Pass a subdirectory."
            )
        result = self._run(host_commands.remove_dir(path))
        if result.exit_code != 0:
            logger.warning("Failed to delete %s on host %s: %s", path, self._host, result.stderr.strip())
        return result.exit_code == 0

    def echo(self, msg: str) -> str:
        """Print `msg` on the host and return the output without the trailing newline."""
        if not isinstance(msg, str):
            raise TypeError(f"Invalid message {msg!r}: expected a string.")
        result = self._run(host_commands.echo(msg)).check()
        return str(result.stdout)[:-1] if result.stdout.endswith("\n") else str(result.stdout)

    # --- cleanup -----------------------------------------------------------------

    def cleanup(self) -> None:
        """Stop every tunnel and task this Runtime started and remove its temporary directories.

        Closing the connection also stops a task that is still running. Calling it twice is harmless.
        """
        if self._closed:
            return
        logger.info("Cleaning up runtime %s", self._host)
        _live_runtimes.discard(self)

        # Stopped one by one because a shared transport (the manager's) is not
        # closed below, and closing is what stops everything else.
        for key in list(self._processes):
            value = self._processes.pop(key)
            if isinstance(value, Tunnel):
                value.close()
            elif isinstance(value, RuntimeTask) and value.is_running:
                value.stop()

        if self._temp_dirs:
            temp_dirs, self._temp_dirs = self._temp_dirs, []
            if self._working_dir in temp_dirs:
                self._working_dir = None
            self._remove_temp_dirs(temp_dirs)

        self._close_transport()
        self._closed = True

    def _remove_temp_dirs(self, paths: list[str]) -> None:
        try:
            for path in paths:
                result = self._transport.run(host_commands.remove_dir(path), timeout=DEFAULT_PROBE_TIMEOUT)
                if result.exit_code != 0:
                    logger.warning("Failed to remove %s on host %s: %s", path, self._host, result.stderr)
        except (LazyclusterError, OSError) as error:
            logger.warning("Failed to remove temporary directories on host %s: %s", self._host, error)

    def _close_transport(self) -> None:
        if not self._owns_transport:
            return
        try:
            self._transport.close()
        except (LazyclusterError, OSError) as error:
            logger.warning("Closing the connection to host %s failed: %s", self._host, error)


def _shared_local_transport() -> Transport | None:
    try:
        return get_backend().local()
    except (LazyclusterError, OSError, NotImplementedError):
        return None
