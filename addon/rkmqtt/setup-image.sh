#!/bin/sh
# The image's system set-up, run by both Dockerfiles (the top-level one and the add-on's; the
# Supervisor builds the add-on from this folder alone, so the script lives here): the runtime
# packages, the unprivileged rkmqtt user, and the folders it writes (the health file's, the journal's).
set -eu

# libgomp1: librkllmrt.so is linked against the GNU OpenMP runtime.
apt-get update
apt-get install -y --no-install-recommends libgomp1
rm -rf /var/lib/apt/lists/*

groupadd --system --gid 10001 rkmqtt
useradd --system --uid 10001 --gid rkmqtt --home-dir /var/lib/rkmqtt --create-home \
    --shell /usr/sbin/nologin rkmqtt
mkdir -p /run/rkmqtt /var/lib/rkmqtt/state
chown rkmqtt:rkmqtt /run/rkmqtt /var/lib/rkmqtt/state
