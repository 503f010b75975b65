"""Hypothesis strategies for simulated topologies, fault plans and networks.

`networks()` draws a seed, a topology and a fault plan, builds the `Network`
and records `network.describe()` with `hypothesis.note`, so a failing example
prints everything needed to replay it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from hypothesis import note
from hypothesis import strategies as st

from sim.faults import FAULT_KINDS, Fault, FaultPlan
from sim.host import GIB
from sim.network import Network

MAX_SEED = 2**32 - 1
PROGRAMS = ("scheduler", "worker")
# Operations of a transport that a drop_connection fault can hit.
OPERATIONS = (
    "run", "start_process", "put", "get", "ports_in_use", "forward_local", "forward_remote",
    "poll", "wait", "stop", "read_log",
)


def seeds() -> st.SearchStrategy[int]:
    return st.integers(min_value=0, max_value=MAX_SEED)


def host_specs() -> st.SearchStrategy[dict[str, Any]]:
    """Draw the hardware and Python of one host, as `SimHost` keyword arguments."""
    return st.fixed_dictionaries(
        {
            "cpu_cores": st.integers(min_value=1, max_value=64),
            "memory": st.integers(min_value=1, max_value=512).map(lambda gib: gib * GIB),
            "gpus": st.lists(
                st.sampled_from(["NVIDIA A100-SXM4-40GB, 40960 MiB", "Tesla T4, 15360 MiB"]),
                max_size=4,
            ),
            "python_version": st.sampled_from(["3.9.18", "3.10.13", "3.11.9", "3.12.4"]),
        }
    )


@st.composite
def topologies(draw: st.DrawFn, min_hosts: int = 1, max_hosts: int = 6) -> dict[str, dict[str, Any]]:
    """Draw host names h1..hN mapped to host specs."""
    count = draw(st.integers(min_value=min_hosts, max_value=max_hosts))
    return {f"h{index}": draw(host_specs()) for index in range(1, count + 1)}


@st.composite
def faults(
    draw: st.DrawFn,
    hosts: Sequence[str],
    kinds: Sequence[str] = FAULT_KINDS,
    ports: Sequence[int] = (8786, 60000, 60001, 60002),
    max_time: float = 10.0,
) -> Fault:
    """Draw one fault on one of `hosts`, starting between 0 and `max_time` seconds."""
    kind = draw(st.sampled_from(list(kinds)))
    at = draw(st.floats(min_value=0.0, max_value=max_time, allow_nan=False).map(lambda t: round(t, 3)))
    fields: dict[str, Any] = {"kind": kind, "host": draw(st.sampled_from(list(hosts))), "at": at}
    if kind in ("unreachable", "auth_failure", "foreign_port"):
        duration = draw(st.none() | st.floats(min_value=0.1, max_value=max_time).map(lambda t: round(t, 3)))
        fields["until"] = None if duration is None else at + duration
    if kind in ("foreign_port", "port_race"):
        fields["port"] = draw(st.sampled_from(list(ports)))
    if kind == "drop_connection":
        fields["operation"] = draw(st.none() | st.sampled_from(OPERATIONS))
    if kind in ("slow_start", "crash"):
        fields["program"] = draw(st.sampled_from(PROGRAMS))
    if kind == "slow_start":
        fields["delay"] = draw(st.floats(min_value=0.0, max_value=3 * max_time).map(lambda t: round(t, 3)))
    if kind == "crash":
        fields["after"] = draw(st.floats(min_value=0.0, max_value=max_time).map(lambda t: round(t, 3)))
        fields["exit_code"] = draw(st.sampled_from([1, 2, 137]))
    return Fault(**fields)


@st.composite
def fault_plans(
    draw: st.DrawFn,
    hosts: Sequence[str],
    max_faults: int = 3,
    kinds: Sequence[str] = FAULT_KINDS,
    ports: Sequence[int] = (8786, 60000, 60001, 60002),
    max_time: float = 10.0,
) -> FaultPlan:
    """Draw up to `max_faults` faults on `hosts`, ordered by start time."""
    drawn = draw(st.lists(faults(hosts, kinds, ports, max_time), max_size=max_faults))
    return FaultPlan(tuple(sorted(drawn, key=lambda fault: fault.at)))


@st.composite
def networks(
    draw: st.DrawFn,
    min_hosts: int = 1,
    max_hosts: int = 6,
    max_faults: int = 0,
    kinds: Sequence[str] = FAULT_KINDS,
    fault_hosts_include_manager: bool = False,
) -> Network:
    """Draw a seeded network with a drawn topology and, when `max_faults` > 0, a fault plan."""
    seed = draw(seeds())
    topology = draw(topologies(min_hosts, max_hosts))
    targets = list(topology) + (["localhost"] if fault_hosts_include_manager else [])
    plan = draw(fault_plans(targets, max_faults, kinds)) if max_faults else FaultPlan()
    network = Network(topology, seed=seed, faults=plan)
    note(f"Replay with: Network({topology!r}, seed={seed!r}, faults={plan!r})")
    return network
