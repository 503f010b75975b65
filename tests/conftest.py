"""Root conftest: loads the Docker SSH host fixtures (`ssh_hosts`, `ssh_backend`, `make_ssh_hosts`).

The fixtures module imports Docker and testcontainers only inside the fixtures,
so `pytest -m "not docker"` runs on machines without a Docker engine.
"""

pytest_plugins = ["containers.fixtures"]
