"""docs/benchmarks.md: the tables of one run, the machine, how to reproduce it and the limits."""

from __future__ import annotations

import platform
import subprocess
import sys
from importlib.metadata import version

from bench.report import Report

REPRODUCE = "nox -s bench"


def _command_output(argv: list[str]) -> str:
    try:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired) as error:
        return f"({argv[0]} failed: {error})"
    # `ssh -V` prints its version on stderr.
    # Leading spaces are kept: they align the header of `free -h`.
    return (result.stdout or result.stderr).strip("\n").rstrip()


def machine_facts() -> list[str]:
    """Lines about the machine: cores, memory, Python, Docker, package versions."""
    packages = ", ".join(f"{name} {version(name)}" for name in ("distributed", "paramiko", "asyncssh"))
    return [
        f"- CPU cores (`nproc`): {_command_output(['nproc'])}",
        "- Memory (`free -h`):",
        "",
        "```",
        _command_output(["free", "-h"]),
        "```",
        "",
        f"- Python (`python --version`): {sys.version.split()[0]} on {platform.platform()}",
        f"- Docker server: {_command_output(['docker', 'version', '--format', '{{.Server.Version}}'])}",
        f"- Packages: {packages}; OpenSSH client: {_command_output(['ssh', '-V'])}",
    ]


def render_page(report: Report, machine: list[str], total_seconds: float, *, quick: bool, only: list[str]) -> str:
    lines = [
        "# Benchmarks",
        "",
        "Figures measured side by side in one run of `" + REPRODUCE + "` on three SSH hosts in Docker "
        "containers on this machine, and on the simulator. Each figure is the median of repeated runs "
        "with the fastest and slowest run; each ratio divides two medians of the same run. Speed goals "
        "live only here, never as timed assertions in tests.",
        "",
        "Both clusters of the start-up and map figures log in to each container at its own address "
        "on port 22, as on real hosts. Through the published loopback ports, Docker's userland proxy "
        "would copy every byte of our tunnels, but not the traffic that SSHCluster sends to the "
        "containers directly. The other figures use the published ports.",
        "",
    ]
    if quick or len(only) < 5:
        lines += [f"NOTE: a partial run (quick={quick}, modules {', '.join(only)}); rerun `{REPRODUCE}` for the full page.", ""]
    lines += ["## Ratios", "", *report.ratio_table(), "", "## Absolute goals", "", *report.goal_table(), "", "## Figures", "", *report.figure_table(), ""]
    errors = report.errors()
    if errors:
        lines += ["## Modules that failed in this run", "", *errors, ""]
    lines += [
        "## Machine",
        "",
        *machine,
        f"- Whole run: {total_seconds / 60:.1f} min",
        "",
        "## Reproduce",
        "",
        "```",
        REPRODUCE + "            # the full run, writes this page",
        REPRODUCE + " -- --quick # 2 runs per figure, to try it out",
        REPRODUCE + " -- --only tunnels --no-write",
        "```",
        "",
        "The session installs the project and asyncssh, starts the Docker engine if needed, builds the "
        "SSH host image offline and runs `python -m bench.run`.",
        "",
        "## What limits each figure",
        "",
    ]
    for section in report.sections:
        if section.notes:
            lines += [f"### {section.title}", ""]
            for note in section.notes:
                lines += [note, ""]
    return "\n".join(lines).rstrip() + "\n"
