"""A simulated machine: its file system, port table, processes and hardware."""

from __future__ import annotations

import functools
import posixpath
import random
from dataclasses import dataclass, field
from importlib import metadata
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sim.process import SimProcess

GIB = 1024**3

# The temporary directory of every simulated host; a path in the simulated file system only.
TMP_DIR = "/tmp"  # noqa: S108

# Executables of every simulated host; a test may add or remove names in `SimHost.executables`.
DEFAULT_EXECUTABLES = frozenset(
    {"sh", "bash", "python3", "echo", "true", "false", "sleep", "mkdir", "rm", "mktemp", "cat", "which"}
)


@functools.cache
def installed_version(package: str, fallback: str) -> str:
    """Return the manager's installed version of `package`, so hosts match it by default."""
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return fallback


@dataclass(frozen=True)
class ForeignHolder:
    """A process outside the library that listens on a port, e.g. another user's server."""

    label: str = "foreign process"

    def __repr__(self) -> str:
        return f"<{self.label}>"


class SimFile:
    """Content and permission bits of one file; content grows in place so logs append cheaply."""

    __slots__ = ("data", "mode")

    def __init__(self, data: bytes, mode: int) -> None:
        self.data = bytearray(data)
        self.mode = mode


class SimFileSystem:
    """A small in-memory POSIX file system: files with content and mode, and directories."""

    def __init__(self, home: str) -> None:
        self.home = home
        self.files: dict[str, SimFile] = {}
        self.directories: set[str] = {"/"}
        for path in (TMP_DIR, home):
            self.make_directory(path, parents=True)

    def resolve(self, path: str, cwd: str | None = None) -> str:
        """Return `path` as a normalized absolute path, relative to `cwd` or the home directory."""
        if path == "~" or path.startswith("~/"):
            path = self.home + path[1:]
        if not path.startswith("/"):
            path = posixpath.join(cwd or self.home, path)
        return posixpath.normpath(path).replace("//", "/")

    def exists(self, path: str) -> bool:
        return path in self.files or path in self.directories

    def is_dir(self, path: str) -> bool:
        return path in self.directories

    def make_directory(self, path: str, parents: bool = False) -> None:
        """Create a directory; raise FileExistsError/FileNotFoundError/NotADirectoryError like mkdir."""
        if path in self.directories:
            if parents:
                return
            raise FileExistsError(path)
        if path in self.files:
            raise FileExistsError(path)
        parent = posixpath.dirname(path)
        if parent not in self.directories:
            if not parents:
                raise FileNotFoundError(parent)
            if parent in self.files:
                raise NotADirectoryError(parent)
            self.make_directory(parent, parents=True)
        self.directories.add(path)

    def write(self, path: str, data: bytes, mode: int = 0o644, append: bool = False) -> None:
        """Write a file whose parent directory exists (FileNotFoundError otherwise)."""
        if posixpath.dirname(path) not in self.directories:
            raise FileNotFoundError(posixpath.dirname(path))
        if path in self.directories:
            raise IsADirectoryError(path)
        existing = self.files.get(path)
        if append and existing is not None:
            existing.data += data
            return
        self.files[path] = SimFile(data, mode)

    def read(self, path: str) -> bytes:
        if path in self.directories:
            raise IsADirectoryError(path)
        if path not in self.files:
            raise FileNotFoundError(path)
        return bytes(self.files[path].data)

    def mode(self, path: str) -> int:
        """Return the permission bits of a file (FileNotFoundError when it is missing)."""
        if path not in self.files:
            raise FileNotFoundError(path)
        return self.files[path].mode

    def remove(self, path: str, recursive: bool = False) -> None:
        """Remove a file, or a directory with everything under it when `recursive`."""
        if path in self.files:
            del self.files[path]
            return
        if path not in self.directories:
            raise FileNotFoundError(path)
        children = self.under(path)
        if children and not recursive:
            raise OSError(f"Directory not empty: {path}")
        for child in children:
            self.files.pop(child, None)
            self.directories.discard(child)
        if path != "/":
            self.directories.discard(path)

    def under(self, path: str) -> list[str]:
        """Return every file and directory below `path` (not `path` itself), sorted."""
        prefix = path.rstrip("/") + "/"
        found = [p for p in self.files if p.startswith(prefix)]
        found += [p for p in self.directories if p.startswith(prefix)]
        return sorted(found)

    def make_temp_directory(self, rng: random.Random, parent: str = TMP_DIR, prefix: str = "tmp.") -> str:
        """Create a new directory with a random name like mktemp -d; return its path."""
        alphabet = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
        while True:
            name = prefix + "".join(rng.choice(alphabet) for _ in range(10))
            path = posixpath.join(parent, name)
            if not self.exists(path):
                self.make_directory(path)
                return path


@dataclass
class SimHost:
    """One simulated machine. Tests may change any field before or during a run."""

    name: str
    python_version: str = "3.11.9"
    cpu_cores: int = 4
    memory: int = 8 * GIB
    gpus: list[str] = field(default_factory=list)
    os: str = "Linux"
    executables: set[str] = field(default_factory=lambda: set(DEFAULT_EXECUTABLES))
    distributed_version: str | None = field(
        default_factory=lambda: installed_version("distributed", "2026.8.0")
    )
    env: dict[str, str] = field(default_factory=dict)
    user: str = "lazy"

    def __post_init__(self) -> None:
        home = f"/home/{self.user}"
        self.fs = SimFileSystem(home)
        base_env = {"HOME": home, "USER": self.user, "PATH": "/usr/local/bin:/usr/bin:/bin"}
        self.env = {**base_env, **self.env}

        # Port number -> holder: a SimProcess, a SimTunnel or a ForeignHolder.
        self.ports: dict[int, object] = {}
        self.processes: dict[int, SimProcess] = {}

        # Switched by faults; see sim.faults.
        self.unreachable = False
        self.auth_fails = False
        self.boot_count = 0

    @property
    def home(self) -> str:
        return self.fs.home

    def bind(self, port: int, holder: object) -> bool:
        """Give `port` to `holder`, or return False when the port belongs to another holder."""
        current = self.ports.get(port)
        if current is not None and current is not holder:
            return False
        self.ports[port] = holder
        return True

    def release(self, port: int, holder: object) -> None:
        """Free `port` if it still belongs to `holder`."""
        if self.ports.get(port) is holder:
            del self.ports[port]

    def __repr__(self) -> str:
        return f"<SimHost {self.name!r} ports={len(self.ports)} processes={len(self.processes)}>"
