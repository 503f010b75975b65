"""`lazycluster list-runtimes`: which hosts of the SSH config work as runtimes, and why not."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from typing import Any

from lazycluster.cli.hosts import progress, use_ssh_config
from lazycluster.exceptions import NoRuntimesDetectedError

INFO_COLUMNS = ("HOST", "OS", "CPU CORES", "MEMORY", "PYTHON", "GPUS")


def _format_memory(size_in_bytes: int) -> str:
    return f"{size_in_bytes / 1024**3:.1f} GiB"


def _table(rows: Sequence[Sequence[str]]) -> list[str]:
    """Return `rows` as text lines with left-aligned columns two spaces apart."""
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    return ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in rows]


def _runtime_record(runtime: Any) -> dict[str, Any]:
    return {"host": runtime.host, **runtime.info}


def _info_row(record: dict[str, Any]) -> list[str]:
    return [
        record["host"],
        str(record["os"]),
        str(record["cpu_cores"]),
        _format_memory(int(record["memory"])),
        str(record["python_version"]),
        "; ".join(record["gpus"]) or "-",
    ]


def probe_hosts(probe_timeout: float | None) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """Connect to every host of the SSH config in parallel.

    Returns the info of each working runtime and the reason for each host that
    does not work. The connections are closed before returning.
    """
    from lazycluster.manager import DEFAULT_PROBE_TIMEOUT, RuntimeManager

    try:
        manager = RuntimeManager(probe_timeout=probe_timeout or DEFAULT_PROBE_TIMEOUT)
    except NoRuntimesDetectedError as error:
        # The manager raises when no host works; the listing still shows why.
        reasons = getattr(error, "inactive_host_reasons", None)
        if reasons is None:
            raise
        return [], dict(reasons)

    try:
        active = [_runtime_record(runtime) for runtime in manager.runtimes]
    finally:
        manager.cleanup()
    return active, dict(manager.inactive_host_reasons)


def _short_reason(host: str, reason: str) -> str:
    """Drop the parts of an InvalidRuntimeError message that every inactive host shares."""
    prefix = f"Host {host!r} is not a valid runtime: "
    suffix = f" Check that `ssh {host}` logs in without a password prompt and that python3 is installed there."
    if reason.startswith(prefix):
        reason = reason[len(prefix) :]
    if reason.endswith(suffix):
        reason = reason[: -len(suffix)]
    return reason.rstrip(".") + "."


def _print_text(active: list[dict[str, Any]], inactive: dict[str, str], long: bool) -> None:
    print(f"Active runtimes ({len(active)}):")
    if long and active:
        for line in _table([list(INFO_COLUMNS)] + [_info_row(record) for record in active]):
            print(f"  {line}")
    else:
        for record in active:
            print(f"  {record['host']}")
    if not active and not inactive:
        print("  (the SSH config has no Host entry; add one with `lazycluster add-runtime NAME USER@HOST`)")

    if inactive:
        print(f"Inactive hosts ({len(inactive)}):")
        for host, reason in sorted(inactive.items()):
            print(f"  {host}: {_short_reason(host, reason)}")
        print("Check that `ssh HOST` logs in without a password prompt and that python3 is installed there.")


def list_runtimes(args: argparse.Namespace) -> int:
    """Print the active and inactive hosts of the SSH config."""
    path = use_ssh_config(args.ssh_config)
    if not args.json:
        progress(f"Connecting to the hosts of {path}...")

    active, inactive = probe_hosts(args.timeout)
    if args.json:
        document = {
            "ssh_config": path,
            "active": active,
            "inactive": [{"host": host, "reason": reason} for host, reason in sorted(inactive.items())],
        }
        print(json.dumps(document, indent=2))
    else:
        _print_text(active, inactive, args.long)
    return 0
