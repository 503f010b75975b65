"""lazycluster 0.2.4 on the same hosts, in its own virtualenv, made to run offline.

What 0.2.4 needs and what this module does about it (the page lists it too):
- `pip install` on every host (lazycluster itself for the host probe, cloudpickle
  for each function, "dask[complete]" for each worker) while the hosts have no
  index: wheels downloaded on the manager go to /opt/legacy-wheels in each
  container, and /etc/pip.conf points pip there with no index. Debian's
  externally-managed marker is lifted in the same file.
- `dask-scheduler` on the manager and `dask-worker` on the hosts, which
  distributed 2026.6 removed: two-line shims that run `python -m
  distributed.cli.dask_scheduler` / `dask_worker`.
- `python` (not python3) for its port check and WORKSPACE_VERSION in the
  host's environment for its host probe: a symlink and a line in
  /etc/environment.
- fabric reads ~/.ssh/config: the driver runs with HOME set to a folder whose
  .ssh contains copies of the generated config and known_hosts.
It changes the containers, so it runs after every other module.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from importlib.metadata import version
from pathlib import Path
from typing import Any

from bench.context import Context
from bench.report import Section
from bench.stats import Sample

log = logging.getLogger(__name__)

TITLE = "lazycluster 0.2.4"

LEGACY = "lazycluster==0.2.4"
CACHE = Path(__file__).resolve().parent.parent / ".nox" / "bench-legacy"
WHEELS_IN_HOST = "/opt/legacy-wheels"
INSTALL_TIMEOUT = 900
DRIVER_TIMEOUT = 420

PIP_CONF = f"[global]\nbreak-system-packages = true\nno-index = true\nfind-links = {WHEELS_IN_HOST}\n"
SHIM = "#!/bin/sh\nexec {python} -m distributed.cli.{module} \"$@\"\n"


def run(argv: list[str], timeout: float = INSTALL_TIMEOUT, **kwargs: Any) -> str:
    log.info("running %s", " ".join(argv))
    result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False, **kwargs)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed with exit code {result.returncode}:\n{(result.stdout + result.stderr)[-3000:]}")
    return result.stdout


def legacy_venv() -> Path:
    """Create (once) the virtualenv with 0.2.4 and the manager's distributed, plus the scheduler shim."""
    venv = CACHE / "venv"
    python = venv / "bin" / "python"
    if not (venv / "bin" / "dask-scheduler").exists():
        run([sys.executable, "-m", "venv", "--clear", str(venv)])
        run([str(python), "-m", "pip", "install", "-q", LEGACY, f"distributed=={version('distributed')}"])
        shim = venv / "bin" / "dask-scheduler"
        shim.write_text(SHIM.format(python=python, module="dask_scheduler"))
        shim.chmod(0o755)
    return python


def legacy_wheels(python: Path) -> Path:
    """Download (once) every wheel 0.2.4 pip-installs on a host; build the one sdist (stormssh)."""
    wheels = CACHE / "wheels"
    done = wheels / ".complete"
    if not done.exists():
        wheels.mkdir(parents=True, exist_ok=True)
        dask = f"dask[complete]=={version('dask')}"
        run([str(python), "-m", "pip", "download", "-q", "--only-binary", ":all:", "-d", str(wheels), dask, f"distributed=={version('distributed')}"])
        run([str(python), "-m", "pip", "wheel", "-q", "-w", str(wheels), LEGACY])
        for sdist in wheels.glob("*.tar.gz"):
            sdist.unlink()
        done.write_text("")
    return wheels


def prepare_host(host: Any, wheels: Path) -> None:
    """Copy the wheels into the container, add the shims and pre-install what 0.2.4 installs."""
    run(["docker", "cp", f"{wheels}/.", f"{host.container.id}:{WHEELS_IN_HOST}"])
    setup = (
        f"chmod -R a+rX {WHEELS_IN_HOST} && printf %s {_quote(PIP_CONF)} > /etc/pip.conf"
        f" && printf %s {_quote(SHIM.format(python='python3', module='dask_worker'))} > /usr/local/bin/dask-worker"
        " && chmod 755 /usr/local/bin/dask-worker && ln -sf /usr/bin/python3 /usr/local/bin/python"
        " && echo WORKSPACE_VERSION=unknown >> /etc/environment"
    )
    host.exec(["sh", "-c", setup]).check()
    # Done once here so that the timed start measures 0.2.4's pip calls when
    # everything is installed already, as on a second start.
    host.exec(["python3", "-m", "pip", "install", "-q", LEGACY, "dask[complete]"], user=host.user).check()


def _quote(text: str) -> str:
    import shlex

    return shlex.quote(text)


def fabric_home(context: Context) -> Path:
    home = context.workdir / "legacy-home"
    (home / ".ssh").mkdir(parents=True, exist_ok=True)
    shutil.copy(context.hosts.ssh_config_path, home / ".ssh" / "config")
    shutil.copy(context.hosts.known_hosts_path, home / ".ssh" / "known_hosts")
    return home


def drive(context: Context, python: Path, home: Path) -> dict[str, Any]:
    environment = {**os.environ, "HOME": str(home), "PATH": f"{python.parent}:{os.environ['PATH']}"}
    environment.pop("PYTHONPATH", None)
    driver = Path(__file__).resolve().parent / "legacy_driver.py"
    output = run([str(python), str(driver), *context.hosts.aliases], timeout=DRIVER_TIMEOUT, env=environment, cwd=str(home))
    return dict(json.loads(output.strip().splitlines()[-1]))


def measure(context: Context, section: Section) -> None:
    python = legacy_venv()
    wheels = legacy_wheels(python)
    with ThreadPoolExecutor(len(context.hosts)) as pool:
        list(pool.map(lambda host: prepare_host(host, wheels), context.hosts))
    home = fabric_home(context)

    results = [drive(context, python, home) for _ in range(context.runs(2, 1))]
    section.add("legacy-3x2", "Start-up 3 hosts × 2 workers: lazycluster 0.2.4, until registered", Sample(tuple(r["registered"] for r in results)))
    section.add("legacy-3x2-returned", "Start-up 3 hosts × 2 workers: lazycluster 0.2.4, until start() returns", Sample(tuple(r["start_returned"] for r in results)))
    checks = [seconds for r in results for seconds in r["port_checks"]]
    section.add("legacy-port", "0.2.4 `RuntimeGroup.has_free_port`, one port on 3 hosts", Sample(tuple(checks)))
    section.add("legacy-port-200", "0.2.4 port search, 200 candidates on 3 hosts (×200 from one port)", Sample(tuple(200 * c for c in checks)))

    section.ratio("Start-up 3 × 2: lazycluster / lazycluster 0.2.4", "ours-3x2", "legacy-3x2")
    section.ratio("Port search 200 × 3: get_free_port / 0.2.4", "ports-group", "legacy-port-200")
    section.note(
        "0.2.4 runs only after changes to the hosts and the manager, listed in bench/legacy.py. "
        "The hosts have no package index, so the wheels for its `pip install` calls are copied into "
        "each container and pip is pointed at them. Shims replace the `dask-scheduler` and "
        "`dask-worker` scripts that distributed 2026.6 removed. A `python` symlink serves its port "
        "check, and a WORKSPACE_VERSION variable its host probe. HOME points at a folder with the "
        "generated SSH config, which fabric reads. Its ports are given (scheduler 46999, workers 47000-47199) because its defaults were taken "
        "on the manager by other clusters and it checks worker ports on the hosts only."
    )
    section.note(
        "What 0.2.4 installs on the hosts is installed once before timing, so its start-up figure is "
        "that of a second start. Each worker still runs `pip install dask[complete]` (already "
        "satisfied), each port check opens a new SSH connection and starts Python on every host, and "
        "each tunnel is its own process. Its scheduler listens on every interface of the manager and "
        "its workers on every interface of their host. The workers advertise their container "
        "addresses, so the scheduler can reach them over the Docker bridge and not all of its "
        "traffic crosses SSH. Its start() returns "
        "before the workers are registered, so both points are shown. Few runs: each takes 20 to 40 s."
    )
