#!/bin/sh
# Install AUTHORIZED_KEY for root and the non-root user, then run sshd in the
# foreground with its log on stderr (docker logs).
set -eu

install_key() {
    home="$1"
    owner="$2"
    mkdir -p "$home/.ssh"
    printf '%s\n' "$AUTHORIZED_KEY" >"$home/.ssh/authorized_keys"
    chmod 0700 "$home/.ssh"
    chmod 0600 "$home/.ssh/authorized_keys"
    chown -R "$owner:$owner" "$home/.ssh"
}

if [ -z "${AUTHORIZED_KEY:-}" ]; then
    echo "entrypoint: AUTHORIZED_KEY is empty; start the container with -e AUTHORIZED_KEY='ssh-ed25519 ...'" >&2
    exit 2
fi

install_key /root root
for home in /home/*; do
    [ -d "$home" ] && install_key "$home" "$(basename "$home")"
done
unset AUTHORIZED_KEY

mkdir -p /run/sshd
exec /usr/sbin/sshd -D -e
