"""Marks every test under tests/integration with `docker`, so `-m "not docker"` skips them."""

from pathlib import Path

import pytest

INTEGRATION_DIR = Path(__file__).parent


# tryfirst: the marker must be in place before pytest's own `-m` deselection runs.
@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if INTEGRATION_DIR in item.path.parents:
            item.add_marker(pytest.mark.docker)
