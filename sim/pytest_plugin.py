"""pytest plugin of the lazycluster simulator, loaded through the `pytest11` entry point.

Fixtures:

- `sim_network`: a `sim.Network` with hosts h1, h2, h3 (seed 0), installed as
  the lazycluster backend for the test and restored afterwards. Change it with
  the marker `@pytest.mark.sim(hosts=5, seed=42)` or the option `--sim-seed`.
- `sim_group`: a `RuntimeGroup` of every host of `sim_network`, cleaned up
  after the test.

When a test that used `sim_network` fails, the report gets a section with the
seed, hosts and faults needed to replay it and the end of the trace.

This module imports `sim` and `lazycluster` only inside fixtures, so loading
the plugin costs nothing in projects that never use the simulator.
"""

from __future__ import annotations

from collections.abc import Generator, Iterator
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from sim.network import Network

TRACE_LINES_IN_REPORT = 40


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--sim-seed",
        type=int,
        default=None,
        help="seed of the `sim_network` fixture when the test's sim marker sets none (default 0)",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "sim(hosts=3, seed=0, **network_options): options of the sim_network fixture"
    )


@pytest.fixture
def sim_network(request: pytest.FixtureRequest) -> Iterator[Network]:
    from lazycluster.transport import set_backend
    from sim.network import Network

    options: dict[str, Any] = {}
    marker = request.node.get_closest_marker("sim")
    if marker is not None:
        options.update(marker.kwargs)
    hosts = options.pop("hosts", 3)
    if "seed" not in options:
        option_seed = request.config.getoption("--sim-seed", default=None)
        options["seed"] = 0 if option_seed is None else option_seed

    network = Network(hosts, **options)
    request.node._sim_network = network
    previous = set_backend(network)
    try:
        yield network
    finally:
        set_backend(previous)
        network.resume_gc()


@pytest.fixture
def sim_group(sim_network: Network) -> Iterator[Any]:
    from lazycluster import RuntimeGroup

    group = RuntimeGroup(hosts=sim_network.configured_hosts())
    try:
        yield group
    finally:
        group.cleanup()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    network = getattr(item, "_sim_network", None)
    if network is not None and report.failed:
        report.sections.append(
            (
                "lazycluster simulator",
                f"Replay with: {network.describe()}\n"
                f"Last {TRACE_LINES_IN_REPORT} trace events:\n"
                f"{network.format_trace(last=TRACE_LINES_IN_REPORT)}",
            )
        )
    return report
