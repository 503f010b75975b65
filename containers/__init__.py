"""SSH test hosts in Docker containers, their image, and the pytest fixtures that start them.

Importing this package needs neither Docker nor testcontainers: the modules that
talk to the Docker engine are imported only when hosts are built or started.
"""
