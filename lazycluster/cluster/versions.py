"""Checking that every host runs the manager's version of `distributed`.

The rule is equality of the version strings. Dask does not promise that
scheduler and workers of different `distributed` releases understand each
other's messages, and its own `Client` warns about any difference. Nothing is
installed on a host: a mismatch fails the start with the fix in the message.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from lazycluster.exceptions import VersionMismatchError
from lazycluster.host_commands import DISTRIBUTED_VERSION_SNIPPET, python_command
from lazycluster.transport import Transport

logger = logging.getLogger(__name__)

PACKAGE = "distributed"

# Seconds for the version probe on one host; it only reads package metadata.
PROBE_TIMEOUT = 60.0


def manager_distributed_version() -> str:
    """Return the version of `distributed` installed for the manager's interpreter."""
    try:
        return version(PACKAGE)
    except PackageNotFoundError as error:
        raise ImportError(
            "The manager has no 'distributed' package. Install it with "
            "`python -m pip install distributed`."
        ) from error


def host_distributed_version(transport: Transport) -> str | None:
    """Return the host's `distributed` version, or None when python3 there has none."""
    result = transport.run(python_command(DISTRIBUTED_VERSION_SNIPPET), timeout=PROBE_TIMEOUT)
    if not result.ok:
        logger.warning(
            "Version probe failed on host %s with exit code %d: %s",
            transport.host,
            result.exit_code,
            result.stderr.strip()[-500:],
        )
        return None
    return result.stdout.strip() or None


def check_distributed_versions(runtimes: Sequence[Any]) -> None:
    """Raise VersionMismatchError for the first remote runtime whose `distributed` differs.

    Each runtime read its host's version when it connected. Hosts without a
    version get a probe of their own, all in parallel, which confirms a
    missing package before the start fails on it. Runtimes on the manager's
    own machine run the manager's interpreter and need no check.
    """
    expected = manager_distributed_version()
    remote = [runtime for runtime in runtimes if not runtime.transport.is_local]
    if not remote:
        return

    # NOTE: an upgrade on a host after its runtime connected is not seen here.
    # Dask itself still warns about the mismatch when the worker registers.
    unknown = [
        runtime for runtime in remote if getattr(runtime, "distributed_version", None) is None
    ]
    probed = remote[0].transport.clock.map(
        lambda runtime: host_distributed_version(runtime.transport), unknown
    )
    probed_by_host = {runtime.host: found for runtime, found in zip(unknown, probed, strict=True)}
    mismatches: list[tuple[Any, str | None]] = []
    for runtime in remote:
        if runtime.host in probed_by_host:
            host_version = probed_by_host[runtime.host]
        else:
            host_version = runtime.distributed_version
        if host_version != expected:
            mismatches.append((runtime, host_version))
    if mismatches:
        (first, host_version), *others = mismatches
        raise VersionMismatchError(
            first.host,
            PACKAGE,
            host_version,
            expected,
            [(runtime.host, version) for runtime, version in others],
            login=first.transport.login_command(),
        )
    logger.info("Hosts %s have distributed %s", ", ".join(r.host for r in remote), expected)
