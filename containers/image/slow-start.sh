#!/bin/bash
# Start a program late on purpose, for timeout tests.
#
# Installed on PATH under the name of each wrapped program (python3, dask); the
# real program is /usr/local/libexec/slow-start-real/<name>. Each line of the
# rules file is "DELAY_SECONDS GLOB"; the first GLOB that matches the command
# line "<name> <args...>" makes the wrapper sleep DELAY_SECONDS first. Without
# the rules file the wrapper only adds the cost of one bash start.
name="${0##*/}"
real="/usr/local/libexec/slow-start-real/$name"
rules=/etc/lazycluster-test/slow-start

if [ -r "$rules" ]; then
    command_line="$name $*"
    while read -r delay pattern; do
        case "$delay" in "" | "#"*) continue ;; esac
        # shellcheck disable=SC2053  # the pattern is a glob on purpose
        if [[ "$command_line" == $pattern ]]; then
            sleep "$delay"
            break
        fi
    done <"$rules"
fi

exec "$real" "$@"
