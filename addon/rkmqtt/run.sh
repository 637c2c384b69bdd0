#!/bin/sh
# Entry point of the Home Assistant add-on: the same command as the Docker image, `rkmqtt run`.
#
# Options reach the service from /data/options.json (rkmqtt.addon.addon_layers); with no broker
# set, the broker and its credentials come from the Supervisor (SUPERVISOR_TOKEN). The Supervisor
# starts the container as root with the NPU device passed in; the device's group id is the
# host's, so here the service is started as the unprivileged rkmqtt user with exactly the groups
# of the devices present. If that user could not read the options, it runs as root instead
# (and says so) rather than silently ignoring the user's settings.
set -eu

OPTIONS=/data/options.json

if [ "$(id -u)" = 0 ] && command -v setpriv >/dev/null 2>&1 && id rkmqtt >/dev/null 2>&1; then
    groups="$(id -g rkmqtt)"
    for dev in /dev/rknpu /dev/dri/renderD* /dev/dri/card* /dev/dma_heap/*; do
        [ -e "$dev" ] || continue
        groups="$groups,$(stat -c %g "$dev")"
    done
    if [ -f "$OPTIONS" ]; then
        chgrp rkmqtt "$OPTIONS" && chmod g+r "$OPTIONS" || true
    fi
    drop="setpriv --reuid=rkmqtt --regid=rkmqtt --groups=$groups --inh-caps=-all --"
    if [ ! -f "$OPTIONS" ] || $drop test -r "$OPTIONS"; then
        # shellcheck disable=SC2086  # $drop is a command line to split
        exec $drop rkmqtt run "$@"
    fi
    echo "run.sh: the rkmqtt user cannot read $OPTIONS; running as root" >&2
fi
exec rkmqtt run "$@"
