#!/bin/sh
# Before files land: the system user the service runs as (kept on removal, as Debian does).
set -e
if ! getent group pulumid >/dev/null; then
    groupadd --system pulumid
fi
if ! getent passwd pulumid >/dev/null; then
    useradd --system --gid pulumid --home-dir /var/lib/pulumid --no-create-home \
        --shell /usr/sbin/nologin --comment "pulumid state backend" pulumid
fi
exit 0
