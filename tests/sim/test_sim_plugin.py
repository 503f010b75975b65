"""The pytest plugin, and the guide's downstream example run from outside the repository."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parents[2]
EXAMPLE = REPOSITORY / "docs" / "examples" / "test_downstream_example.py"


def run_pytest(directory: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Run pytest in `directory`, a folder outside the repository, like a downstream project."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("PYTEST_")}
    env.pop("PYTHONPATH", None)
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args],
        cwd=directory,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_downstream_example_passes_outside_repository(tmp_path):
    shutil.copy(EXAMPLE, tmp_path)
    completed = run_pytest(tmp_path, EXAMPLE.name)
    assert completed.returncode == 0, completed.stdout + completed.stderr
    assert "4 passed" in completed.stdout


def test_failure_report_shows_replay_and_trace(tmp_path):
    (tmp_path / "test_fails.py").write_text(
        textwrap.dedent(
            """
            def test_fails(sim_network):
                sim_network.faults.at(2).unreachable("h2")
                sim_network.clock.sleep(3)
                assert False, "on purpose"
            """
        )
    )
    completed = run_pytest(tmp_path, "test_fails.py")
    assert completed.returncode == 1
    assert "lazycluster simulator" in completed.stdout
    assert "Replay with: Network(hosts=['h1', 'h2', 'h3'], seed=0" in completed.stdout
    assert "fault.unreachable" in completed.stdout


def test_marker_and_seed_option(tmp_path):
    (tmp_path / "test_options.py").write_text(
        textwrap.dedent(
            """
            import pytest
            from lazycluster.transport import get_backend

            def test_option_seed(sim_network):
                assert sim_network.seed == 99
                assert get_backend() is sim_network

            @pytest.mark.sim(hosts=["a", "b"], seed=5)
            def test_marker(sim_network):
                assert sim_network.configured_hosts() == ["a", "b"]
                assert sim_network.seed == 5
            """
        )
    )
    completed = run_pytest(tmp_path, "--sim-seed", "99", "test_options.py")
    assert completed.returncode == 0, completed.stdout + completed.stderr
    assert "2 passed" in completed.stdout


def test_backend_is_restored_after_test(tmp_path):
    (tmp_path / "test_restore.py").write_text(
        textwrap.dedent(
            """
            from lazycluster.transport import set_backend
            import sim

            OUTER = sim.Network(1)

            def test_first(sim_network):
                pass

            def test_second():
                previous = set_backend(None)
                assert previous is not OUTER
            """
        )
    )
    completed = run_pytest(tmp_path, "test_restore.py")
    assert completed.returncode == 0, completed.stdout + completed.stderr


def test_plugin_module_imports_without_sim_loaded():
    completed = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, sim.pytest_plugin; print('lazycluster' in sys.modules)",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPOSITORY,
    )
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.strip() == "False"


def test_guide_shows_the_example_that_runs():
    guide = (REPOSITORY / "docs" / "simulator.md").read_text()
    block = guide.split("```python\n")[-1].split("```")[0]
    example_lines = set(EXAMPLE.read_text().splitlines())
    missing = [line for line in block.splitlines() if line.strip() and line not in example_lines]
    assert missing == [], "lines of the guide's example that the tested file lacks"


def test_failing_hypothesis_example_prints_replay_line(tmp_path):
    (tmp_path / "test_property.py").write_text(
        textwrap.dedent(
            """
            from hypothesis import given, settings
            from sim.strategies import networks

            @settings(max_examples=5, database=None)
            @given(network=networks(min_hosts=2, max_hosts=3, max_faults=1))
            def test_always_fails(network):
                assert len(network.configured_hosts()) > 5
            """
        )
    )
    completed = run_pytest(tmp_path, "test_property.py")
    assert completed.returncode == 1
    assert "Replay with: Network({'h1':" in completed.stdout
    assert "seed=" in completed.stdout
    assert "faults=FaultPlan(" in completed.stdout
