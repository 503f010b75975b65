"""Sessions for tests, lint, type checks, the Docker integration tests, the demo and benchmarks.

`nox` alone runs the default sessions (tests, lint, typecheck), which need no
Docker. `nox -s integration` and `nox -s demo` bring up a Docker engine with
containers/docker-up.sh (installing it as root on Debian), build the SSH host
image and then run against three SSH hosts in containers.

Sessions use the Python that runs nox (3.11 expected) and reuse their
virtualenvs between runs, so only the first run pays for installs.
"""

from __future__ import annotations

import shutil

import nox

nox.options.sessions = ["tests", "lint", "typecheck"]
nox.options.reuse_venv = "yes"
nox.options.error_on_missing_interpreters = True

SOURCE_DIRS = ["lazycluster", "sim", "containers", "tests", "noxfile.py"]

# Pinned, so that CI results on unchanged code do not depend on checker releases.
RUFF = "ruff==0.17.6"
MYPY = "mypy==2.4.1"

# A hung test fails with a traceback after this many seconds instead of
# stalling CI; the Docker tests include cluster starts with timeouts of their own.
PYTEST_TIMEOUT = "pytest-timeout==2.4.0"
UNIT_TEST_TIMEOUT = "300"
DOCKER_TEST_TIMEOUT = "300"

# pytest exits with 5 when it collected no tests; an empty selection in the
# default sessions is not a failure.
PYTEST_OK = [0]
PYTEST_OK_OR_NO_TESTS = [0, 5]


def install_project(session: nox.Session) -> None:
    session.install("-e", ".[test]", PYTEST_TIMEOUT)


def docker_up_and_build(session: nox.Session) -> None:
    session.run("bash", "containers/docker-up.sh", external=True)
    session.run("python", "-m", "containers.build")


@nox.session
def tests(session: nox.Session) -> None:
    """Unit, property and simulator tests (no Docker)."""
    install_project(session)
    session.run(
        "pytest", "-m", "not docker", f"--timeout={UNIT_TEST_TIMEOUT}", *session.posargs,
        success_codes=PYTEST_OK_OR_NO_TESTS,
    )


@nox.session
def integration(session: nox.Session) -> None:
    """Tests against real sshd hosts in Docker containers on this machine."""
    install_project(session)
    docker_up_and_build(session)
    session.run(
        "pytest", "-m", "docker", f"--timeout={DOCKER_TEST_TIMEOUT}", *session.posargs,
        success_codes=PYTEST_OK,
    )


@nox.session
def lint(session: nox.Session) -> None:
    """ruff over every Python directory."""
    session.install(RUFF)
    session.run("ruff", "check", *SOURCE_DIRS)


@nox.session
def typecheck(session: nox.Session) -> None:
    """mypy over the library, the simulator and the container harness."""
    install_project(session)
    session.install(MYPY)
    session.run("mypy", "-p", "lazycluster", "-p", "sim", "-p", "containers")


@nox.session
def demo(session: nox.Session) -> None:
    """The main job: a Dask cluster over 3 SSH hosts in Docker on this machine."""
    install_project(session)
    docker_up_and_build(session)
    session.run("python", "-m", "containers.demo", *session.posargs)


@nox.session
def bench(session: nox.Session) -> None:
    """Benchmarks on 3 SSH hosts in Docker and on the simulator; writes docs/benchmarks.md."""
    install_project(session)
    # asyncssh only for Dask's SSHCluster, the alternative measured beside ours.
    session.install("asyncssh")
    if shutil.which("ssh") is None:
        # OpenSSH's client is the baseline of the command and tunnel figures.
        session.run("apt-get", "install", "-y", "openssh-client", external=True)
    docker_up_and_build(session)
    session.run("python", "-m", "bench.run", *session.posargs)
