#!/usr/bin/env bash
# Make a Docker engine respond to `docker info`, and make mmdebstrap available.
#
# On a Debian machine where this runs as root, missing packages (docker.io,
# mmdebstrap) are installed with apt-get and, when no engine responds, dockerd
# is started in the background. Anywhere else the script prints what to install
# and exits non-zero. An engine that already responds is left alone.
set -euo pipefail

# dockerd lives in /usr/sbin, which some non-login shells leave off PATH.
export PATH="$PATH:/usr/sbin:/sbin"

WAIT_SECONDS="${DOCKER_UP_WAIT_SECONDS:-60}"
DOCKERD_LOG="${DOCKERD_LOG:-/var/log/lazycluster-dockerd.log}"

log() { printf 'docker-up: %s\n' "$*" >&2; }

is_root() { [ "$(id -u)" = 0 ]; }

is_debian() { [ -r /etc/debian_version ] && command -v apt-get >/dev/null; }

missing_packages() {
    local missing=()
    command -v docker >/dev/null || missing+=(docker.io)
    command -v dockerd >/dev/null || missing+=(docker.io)
    command -v mmdebstrap >/dev/null || missing+=(mmdebstrap)
    printf '%s\n' "${missing[@]}" | sort -u | grep -v '^$' || true
}

install_packages() {
    local packages
    packages="$(missing_packages)"
    [ -z "$packages" ] && return 0

    if ! is_root || ! is_debian; then
        log "missing: $(echo $packages). Install them (on Debian: sudo apt-get install -y $(echo $packages)) and rerun."
        exit 1
    fi

    log "installing $(echo $packages) with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    # With recommends, as in the set-up verified on Debian 12 (they include
    # cgroupfs-mount, which dockerd may need where nothing mounts cgroups).
    # shellcheck disable=SC2086  # one word per package
    apt-get install -y -q $packages
}

engine_responds() { docker info >/dev/null 2>&1; }

start_dockerd() {
    if ! is_root; then
        log "no Docker engine responds and you are not root. Start dockerd (sudo dockerd &) or add yourself to the docker group, then rerun."
        exit 1
    fi

    log "starting dockerd in the background, log in $DOCKERD_LOG"
    # setsid + nohup: the engine must outlive this script and its terminal.
    setsid nohup dockerd >"$DOCKERD_LOG" 2>&1 </dev/null &
    log "dockerd pid $!"
}

wait_for_engine() {
    local deadline=$((SECONDS + WAIT_SECONDS))
    while ! engine_responds; do
        if [ "$SECONDS" -ge "$deadline" ]; then
            log "dockerd did not respond within ${WAIT_SECONDS}s; last lines of $DOCKERD_LOG:"
            tail -n 20 "$DOCKERD_LOG" >&2 || true
            exit 1
        fi
        sleep 1
    done
}

install_packages

if engine_responds; then
    log "Docker engine responds"
    exit 0
fi

start_dockerd
wait_for_engine
log "Docker engine responds after $SECONDS s"
