#!/bin/sh
# After files went. Purge (deb) removes the configuration; the data in /var/lib/pulumid (the
# database, the token, the master key) stays unless PULUMID_PURGE_DATA=yes says otherwise.
set -e
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload >/dev/null 2>&1 || true
fi
if [ "$1" = "purge" ]; then
    rm -rf /etc/pulumid
    if [ "${PULUMID_PURGE_DATA:-no}" = "yes" ]; then
        rm -rf /var/lib/pulumid
        echo "pulumid: removed /var/lib/pulumid (PULUMID_PURGE_DATA=yes)"
    elif [ -d /var/lib/pulumid ]; then
        echo "pulumid: kept /var/lib/pulumid (the database and keys); remove it by hand, or purge with PULUMID_PURGE_DATA=yes"
    fi
fi
exit 0
