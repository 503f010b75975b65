"""Entry point of `nox -s bench`: start the Docker hosts once, measure, print, write the page.

    python -m bench.run [--quick] [--only NAME ...] [--no-write]

NAME is a module of this package: startup, commands, tunnels, simulator, legacy.
A module that fails is reported on the page with its error, and the others
still run.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

from bench.context import Context
from bench.page import machine_facts, render_page
from bench.report import Report, Section

log = logging.getLogger("bench.run")

MODULES = ("startup", "commands", "tunnels", "simulator", "legacy")
NEEDS_HOSTS = {"startup", "commands", "tunnels", "legacy"}
HOST_COUNT = 3
PAGE = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"


def parse_arguments(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 runs per figure, for trying the bench out")
    parser.add_argument("--only", nargs="+", choices=MODULES, default=list(MODULES), help="modules to run")
    parser.add_argument("--no-write", action="store_true", help=f"print the table but leave {PAGE.name} alone")
    return parser.parse_args(argv)


def run_module(name: str, context: Context, report: Report) -> None:
    module = importlib.import_module(f"bench.{name}")
    section = Section(module.TITLE)
    report.sections.append(section)
    started = time.monotonic()
    print(f"== {section.title} ...", flush=True)
    try:
        module.measure(context, section)
    except Exception as error:  # noqa: BLE001 - one failed module must not lose the others
        log.error("bench module %s failed:\n%s", name, traceback.format_exc())
        section.error = f"{type(error).__name__}: {str(error).strip()[:500]}"
    print(f"   done in {time.monotonic() - started:.0f} s", flush=True)


def _load(values: tuple[float, float, float]) -> str:
    return "/".join(f"{value:.1f}" for value in values)


def main(argv: list[str] | None = None) -> int:
    arguments = parse_arguments(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("bench").setLevel(logging.INFO)

    started = time.monotonic()
    load_at_start = os.getloadavg()
    report = Report()
    workdir = Path(tempfile.mkdtemp(prefix="lazycluster-bench-"))
    hosts = None
    if NEEDS_HOSTS & set(arguments.only):
        from containers.build import build_image
        from containers.hosts import start_hosts

        hosts = start_hosts(HOST_COUNT, image=build_image(), workdir=workdir / "hosts")
    try:
        context = Context(hosts=hosts, quick=arguments.quick, workdir=workdir)
        for name in MODULES:
            if name in arguments.only:
                run_module(name, context, report)
    finally:
        if hosts is not None:
            hosts.close()

    total = time.monotonic() - started
    load = f"- Load average (1, 5, 15 min) at start {_load(load_at_start)}, at end {_load(os.getloadavg())}"
    page = render_page(report, [*machine_facts(), load], total, quick=arguments.quick, only=arguments.only)
    print(page)
    if not arguments.no_write:
        PAGE.write_text(page)
        print(f"wrote {PAGE}")
    return 1 if report.errors() else 0


if __name__ == "__main__":
    raise SystemExit(main())
