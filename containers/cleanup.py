"""Find and remove the SSH host containers this harness started.

Every container gets two labels: `HOST_LABEL` (any run of the harness) and
`RUN_LABEL` with this process's `RUN_ID`. Removal goes by these labels, so a
container created a moment before an interrupt is found even when its id never
reached the caller. `install_exit_handlers()` removes this run's containers at
interpreter exit and makes SIGTERM and SIGHUP raise KeyboardInterrupt, as
SIGINT does, so that finally blocks, fixture teardown and atexit all run.

`python -m containers.cleanup` removes the containers of every run, for the
leftovers of a run that was killed with SIGKILL.
"""

from __future__ import annotations

import atexit
import logging
import os
import signal
import threading
import uuid
from typing import Any

log = logging.getLogger(__name__)

HOST_LABEL = "lazycluster.test-host"
RUN_LABEL = "lazycluster.test-run"
GROUP_LABEL = "lazycluster.test-group"
# A parent process may choose the id (LAZYCLUSTER_TEST_RUN_ID) to find the
# containers of a child run it interrupts.
RUN_ID = os.environ.get("LAZYCLUSTER_TEST_RUN_ID") or uuid.uuid4().hex

_handlers_installed = False
_lock = threading.Lock()


def new_group_id() -> str:
    """Return a new id for the containers of one `start_hosts` call."""
    return uuid.uuid4().hex


def run_labels(group_id: str) -> dict[str, str]:
    """Return the labels that mark a container as started by this run, in group `group_id`."""
    return {HOST_LABEL: "1", RUN_LABEL: RUN_ID, GROUP_LABEL: group_id}


def _remove(container: Any) -> None:
    import docker

    try:
        container.remove(force=True, v=True)
        log.info("removed container %s (%s)", container.name, container.short_id)
    except docker.errors.NotFound:
        pass
    except docker.errors.APIError as error:
        # 409 "removal already in progress" is fine; anything else is logged and the sweep goes on.
        log.warning("could not remove container %s: %s", container.short_id, error)


def remove_containers(run_id: str | None = RUN_ID, group_id: str | None = None) -> int:
    """Remove test host containers and return how many were found.

    With `group_id`, only that group's; else this run's, or every run's when
    `run_id` is None.
    """
    import docker

    if group_id is not None:
        label = f"{GROUP_LABEL}={group_id}"
    elif run_id is not None:
        label = f"{RUN_LABEL}={run_id}"
    else:
        label = HOST_LABEL
    try:
        client = docker.from_env()
        containers = client.containers.list(all=True, filters={"label": label})
    except docker.errors.DockerException as error:
        log.warning("could not list containers labelled %s: %s", label, error)
        return 0

    for container in containers:
        _remove(container)
    return len(containers)


def _interrupt_on_signal(signum: int, frame: object) -> None:
    log.warning("received signal %d, removing the test hosts before exit", signum)
    # KeyboardInterrupt, not SystemExit: pytest records a SystemExit raised in
    # a test as that test's failure and goes on, but stops on KeyboardInterrupt.
    raise KeyboardInterrupt(f"signal {signum}")


def install_exit_handlers() -> None:
    """Remove this run's containers at exit and on SIGTERM/SIGHUP (idempotent)."""
    global _handlers_installed
    with _lock:
        if _handlers_installed:
            return
        _handlers_installed = True

    atexit.register(remove_containers)

    # Signal handlers can only be set from the main thread; a handler that
    # someone else installed is left in place.
    if threading.current_thread() is not threading.main_thread():
        return
    for signum in (signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(signum) is signal.SIG_DFL:
            signal.signal(signum, _interrupt_on_signal)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    count = remove_containers(run_id=None)
    print(f"removed {count} container(s) labelled {HOST_LABEL}")
