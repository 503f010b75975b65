"""Pin the Python packages of the SSH host image to the manager's versions.

The image must run the same dask, distributed and cloudpickle as the manager,
because distributed warns about version mismatches between client, scheduler
and workers, and pickled tasks may not load across versions. The pins are the full
dependency closure of those packages as installed in the running environment
(read with importlib.metadata), with markers evaluated for the image's Python.
"""

from __future__ import annotations

import importlib.metadata
import platform
from collections import deque

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

# numpy is pinned too, so that dask.array works on the hosts.
ROOT_PACKAGES = ("distributed", "dask", "cloudpickle", "numpy")

# Debian bookworm, the base of the image, ships Python 3.11.
IMAGE_PYTHON_VERSION = "3.11"
IMAGE_PYTHON_FULL_VERSION = "3.11.2"


def image_marker_environment() -> dict[str, str]:
    """Return the PEP 508 marker environment of the image's Python on this machine's arch."""
    environment = {key: str(value) for key, value in default_environment().items()}
    environment.update(
        python_version=IMAGE_PYTHON_VERSION,
        python_full_version=IMAGE_PYTHON_FULL_VERSION,
        implementation_name="cpython",
        platform_python_implementation="CPython",
        sys_platform="linux",
        os_name="posix",
        platform_system="Linux",
        platform_machine=platform.machine(),
    )
    return environment


def _installed_version(name: str, needed_by: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        raise LookupError(
            f"Package {name!r} (needed by {needed_by}) is not installed in this environment "
            f"(Python at {platform.python_version()}); install the project's test extras "
            "with `pip install -e .[test]` and retry."
        ) from None


def _requirements_of(name: str, extras: frozenset[str], environment: dict[str, str]) -> list[Requirement]:
    requirements = []
    for line in importlib.metadata.requires(name) or []:
        requirement = Requirement(line)
        marker = requirement.marker
        if marker is None or any(
            marker.evaluate({**environment, "extra": extra}) for extra in {"", *extras}
        ):
            requirements.append(requirement)
    return requirements


def pinned_requirements(roots: tuple[str, ...] = ROOT_PACKAGES) -> dict[str, str]:
    """Return {canonical name: installed version} for `roots` and everything they require."""
    environment = image_marker_environment()
    pins: dict[str, str] = {}
    seen: set[tuple[str, frozenset[str]]] = set()
    queue: deque[tuple[str, frozenset[str], str]] = deque(
        (root, frozenset(), "the image") for root in roots
    )

    while queue:
        name, extras, needed_by = queue.popleft()
        key = (canonicalize_name(name), extras)
        if key in seen:
            continue
        seen.add(key)

        pins[key[0]] = _installed_version(name, needed_by)
        for requirement in _requirements_of(name, extras, environment):
            queue.append((requirement.name, frozenset(requirement.extras), name))

    return dict(sorted(pins.items()))


def requirements_text(pins: dict[str, str]) -> str:
    """Render pins as a requirements file, one `name==version` per line."""
    return "".join(f"{name}=={version}\n" for name, version in pins.items())


if __name__ == "__main__":
    print(requirements_text(pinned_requirements()), end="")
