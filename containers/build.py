"""Build the SSH host image without a registry: mmdebstrap base, then a Dockerfile on top.

`build_image()` returns the tag of an image whose name carries a hash of every
build input (base package list, files in containers/image/, the pinned Python
packages, the CPU architecture). When that tag exists already the build is a
no-op that costs one Docker API call plus reading the package metadata.

Run `python -m containers.build` to build from the command line; it prints the tag.
"""

from __future__ import annotations

import hashlib
import logging
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from containers.pins import IMAGE_PYTHON_VERSION, pinned_requirements, requirements_text

log = logging.getLogger(__name__)

IMAGE_DIR = Path(__file__).parent / "image"
IMAGE_REPOSITORY = "lazycluster-sshhost"
BASE_REPOSITORY = "lazycluster-sshhost-base"
IMAGE_LABEL = "lazycluster.test-image"

DEBIAN_SUITE = "bookworm"
# procps (ps) and iproute2 (ss) are used by fault injection and leftover checks;
# tini reaps orphaned processes as PID 1.
BASE_PACKAGES = (
    "openssh-server",
    "python3",
    "python3-pip",
    "procps",
    "iproute2",
    "tini",
)
# bookworm has glibc 2.36, so wheels tagged manylinux_2_17 up to 2_36 run on it.
# pip does not widen an explicit --platform to older glibc tags by itself.
GLIBC_MINOR_RANGE = range(36, 16, -1)

MMDEBSTRAP_TIMEOUT = 900
BUILD_TIMEOUT = 900


class ImageBuildError(RuntimeError):
    """A step of the image build failed; the message contains the step and its output."""


def _docker_client():  # type: ignore[no-untyped-def]
    import docker

    try:
        client = docker.from_env()
        client.ping()
    except docker.errors.DockerException as error:
        raise ImageBuildError(
            f"No Docker engine responds ({error}). Run `bash containers/docker-up.sh` "
            "(as root on Debian it installs and starts one) and retry."
        ) from error
    return client


def _short_hash(*parts: bytes) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(len(part).to_bytes(8, "big"))
        digest.update(part)
    return digest.hexdigest()[:16]


def base_tag() -> str:
    """Return the tag of the base image for this machine's architecture."""
    # NOTE: Debian package updates do not change this tag; remove the base
    # image (docker rmi) to rebuild it with the current packages.
    inputs = [DEBIAN_SUITE, platform.machine(), *BASE_PACKAGES]
    return f"{BASE_REPOSITORY}:{_short_hash(*(item.encode() for item in inputs))}"


def image_tag(requirements: str) -> str:
    """Return the image tag for the given requirements file text and the files in IMAGE_DIR."""
    parts = [base_tag().encode(), requirements.encode()]
    for path in sorted(IMAGE_DIR.iterdir()):
        parts += [path.name.encode(), path.read_bytes()]
    return f"{IMAGE_REPOSITORY}:{_short_hash(*parts)}"


def _image_exists(client, tag: str) -> bool:  # type: ignore[no-untyped-def]
    import docker

    try:
        client.images.get(tag)
    except docker.errors.ImageNotFound:
        return False
    return True


def _run(argv: list[str], step: str, timeout: float) -> None:
    log.info("%s: running %s", step, " ".join(argv))
    try:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    except FileNotFoundError as error:
        raise ImageBuildError(
            f"{step}: {argv[0]} is not installed. Run `bash containers/docker-up.sh` "
            "(as root on Debian it installs docker.io and mmdebstrap) and retry."
        ) from error
    except subprocess.TimeoutExpired as error:
        raise ImageBuildError(f"{step}: {argv[0]} timed out after {timeout:.0f} s") from error

    if result.returncode != 0:
        output = (result.stdout + result.stderr)[-4000:]
        raise ImageBuildError(f"{step}: {argv[0]} failed with exit code {result.returncode}:\n{output}")


def build_base(client) -> str:  # type: ignore[no-untyped-def]
    """Make the base image with mmdebstrap and docker import unless it exists; return its tag."""
    tag = base_tag()
    if _image_exists(client, tag):
        return tag

    with tempfile.TemporaryDirectory(prefix="lazycluster-base-") as workdir:
        tarball = Path(workdir) / "rootfs.tar"
        # No mirror on the command line: mmdebstrap then uses this machine's
        # apt sources (/etc/apt/sources.list and sources.list.d).
        _run(
            [
                "mmdebstrap",
                "--variant=apt",
                "--include=" + ",".join(BASE_PACKAGES),
                DEBIAN_SUITE,
                str(tarball),
            ],
            step="base root filesystem",
            timeout=MMDEBSTRAP_TIMEOUT,
        )
        repository, _, version = tag.partition(":")
        client.api.import_image_from_file(str(tarball), repository=repository, tag=version)

    if not _image_exists(client, tag):
        raise ImageBuildError(f"docker import of the base root filesystem did not create {tag}")
    log.info("built base image %s", tag)
    return tag


def download_wheels(requirements_file: Path, destination: Path) -> None:
    """Download the pinned wheels for the image's Python and this machine's arch into `destination`."""
    machine = platform.machine()
    platforms: list[str] = []
    for minor in GLIBC_MINOR_RANGE:
        platforms += ["--platform", f"manylinux_2_{minor}_{machine}"]
    platforms += ["--platform", f"manylinux2014_{machine}"]

    abi = "cp" + IMAGE_PYTHON_VERSION.replace(".", "")
    _run(
        [
            sys.executable, "-m", "pip", "download",
            "--quiet",
            "--only-binary=:all:",
            "--no-deps",
            "--python-version", IMAGE_PYTHON_VERSION,
            "--implementation", "cp",
            "--abi", abi,
            *platforms,
            "--dest", str(destination),
            "--requirement", str(requirements_file),
        ],
        step="wheel download",
        timeout=BUILD_TIMEOUT,
    )


def _docker_build(client, context: Path, tag: str, base: str) -> None:  # type: ignore[no-untyped-def]
    import docker

    log.info("building image %s", tag)
    try:
        # network_mode none: everything the build needs is in the context.
        client.images.build(
            path=str(context),
            tag=tag,
            buildargs={"BASE_IMAGE": base},
            labels={IMAGE_LABEL: "1"},
            network_mode="none",
            rm=True,
            forcerm=True,
            timeout=BUILD_TIMEOUT,
        )
    except docker.errors.BuildError as error:
        lines = [str(entry.get("stream") or entry.get("error") or "") for entry in error.build_log]
        raise ImageBuildError(f"docker build of {tag} failed: {error}\n{''.join(lines)[-4000:]}") from error


def build_image() -> str:
    """Build the SSH host image unless an image with the same input hash exists; return its tag."""
    started = time.monotonic()
    requirements = requirements_text(pinned_requirements())
    tag = image_tag(requirements)
    client = _docker_client()
    if _image_exists(client, tag):
        log.info("image %s exists, build skipped (%.1f s)", tag, time.monotonic() - started)
        return tag

    base = build_base(client)
    with tempfile.TemporaryDirectory(prefix="lazycluster-image-") as workdir:
        context = Path(workdir)
        for path in IMAGE_DIR.iterdir():
            shutil.copy2(path, context / path.name)
        (context / "requirements.txt").write_text(requirements)
        download_wheels(context / "requirements.txt", context / "wheels")
        _docker_build(client, context, tag, base)

    log.info("built image %s in %.1f s", tag, time.monotonic() - started)
    return tag


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        tag = build_image()
    except (ImageBuildError, LookupError) as error:
        print(f"image build failed: {error}", file=sys.stderr)
        return 1
    print(tag)
    return 0


if __name__ == "__main__":
    sys.exit(main())
