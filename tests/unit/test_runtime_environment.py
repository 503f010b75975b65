"""Environment: the log directory and the log level of third-party libraries."""

from __future__ import annotations

import logging
import os

import pytest

from lazycluster import Environment


@pytest.fixture(autouse=True)
def restore_environment(monkeypatch):
    monkeypatch.setattr(Environment, "main_directory", Environment.main_directory)
    level = logging.getLogger("paramiko").level
    yield
    Environment.set_third_party_log_level(level or logging.ERROR)


def test_paramiko_starts_at_error():
    assert Environment.third_party_log_level == logging.ERROR
    assert logging.getLogger("paramiko").level == logging.ERROR


def test_set_main_directory_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Environment.set_main_directory("logs")
    assert Environment.main_directory == str(tmp_path / "logs")
    assert Environment.execution_log_dir("host-1") == str(tmp_path / "logs" / "execution_log" / "host-1")


def test_set_main_directory_expands_home(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    Environment.set_main_directory("~/lazy")
    assert Environment.main_directory == os.path.join(str(tmp_path), "lazy")


def test_set_main_directory_invalid():
    with pytest.raises(ValueError):
        Environment.set_main_directory("  ")
    with pytest.raises(TypeError):
        Environment.set_main_directory(42)


def test_set_third_party_log_level():
    Environment.set_third_party_log_level("warning")
    assert logging.getLogger("paramiko").level == logging.WARNING
    Environment.set_third_party_log_level(logging.DEBUG)
    assert logging.getLogger("paramiko").level == logging.DEBUG


def test_set_third_party_log_level_invalid():
    with pytest.raises(ValueError, match="LOUD"):
        Environment.set_third_party_log_level("LOUD")
    with pytest.raises(TypeError):
        Environment.set_third_party_log_level(1.5)
