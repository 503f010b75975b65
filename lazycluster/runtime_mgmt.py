"""Import path of lazycluster 0.2 (`from lazycluster.runtime_mgmt import RuntimeGroup`), kept working."""

from lazycluster.group import RuntimeGroup
from lazycluster.manager import RuntimeManager
from lazycluster.runtime import Runtime
from lazycluster.task import RuntimeTask

__all__ = ["Runtime", "RuntimeGroup", "RuntimeManager", "RuntimeTask"]
