#!/usr/bin/env bash
# Install Debian's HAProxy (for the three-node cluster tests and benchmark) if it is missing,
# and print the path of its binary (the only line on stdout), e.g.
#   /usr/sbin/haproxy
# The tests run their own haproxy in the foreground with a generated config on a free loopback
# port (tests/cluster/harness.py); nothing here depends on the distro's service, and a service
# the package starts while we install it is stopped again. Needs root only when installing.
# Usage: scripts/install-haproxy.sh
set -euo pipefail

find_bin() {
  local candidate
  for candidate in "$(command -v haproxy 2>/dev/null || true)" /usr/sbin/haproxy; do
    if [ -n "$candidate" ] && [ -x "$candidate" ]; then
      echo "$candidate"
      return
    fi
  done
}

bin=$(find_bin)
if [ -z "$bin" ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "HAProxy is not installed and this is not root: run as root, or" \
      "apt-get install -y haproxy" >&2
    exit 1
  fi
  echo "installing haproxy (apt-get)" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >&2
  apt-get install -y -qq haproxy >&2
  bin=$(find_bin)
  if [ -z "$bin" ]; then
    echo "apt-get install haproxy did not provide a haproxy binary" >&2
    exit 1
  fi
fi

# The package's service listens on the distro's config (systemd is not PID 1 here, so its
# postinst usually cannot start it, but an init script may have). The tests never use it.
if [ "$(id -u)" -eq 0 ]; then
  if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
    systemctl stop haproxy >&2 2>/dev/null || true
    systemctl disable haproxy >&2 2>/dev/null || true
  elif [ -x /etc/init.d/haproxy ]; then
    /etc/init.d/haproxy stop >&2 2>/dev/null || true
  fi
  # Whatever is left: only the daemon started from the distro's pidfile, never our children.
  if [ -s /run/haproxy.pid ]; then
    while read -r pid; do
      if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
        echo "stopping the distro's haproxy (pid $pid); the tests start their own" >&2
        kill "$pid" 2>/dev/null || true
      fi
    done </run/haproxy.pid
    rm -f /run/haproxy.pid
  fi
fi

if ! "$bin" -v >/dev/null 2>&1; then
  echo "$bin -v failed: reinstall with apt-get install -y haproxy" >&2
  exit 1
fi
echo "$bin"
