#!/bin/sh
# Before files go: stop the service when the package is removed (deb: "remove", rpm: 0).
set -e
case "$1" in
    remove|0)
        if [ -d /run/systemd/system ]; then
            systemctl stop pulumid.service >/dev/null 2>&1 || true
        fi
        ;;
esac
exit 0
