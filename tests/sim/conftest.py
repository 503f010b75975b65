"""Shared setup of the simulator tests."""

from __future__ import annotations

import pytest

from lazycluster.environment import Environment


@pytest.fixture(autouse=True)
def execution_logs_in_tmp(tmp_path, monkeypatch):
    """Keep the execution logs that tasks write on the manager out of the work tree."""
    monkeypatch.setattr(Environment, "main_directory", str(tmp_path / "lazycluster"))
