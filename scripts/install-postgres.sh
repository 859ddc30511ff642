#!/usr/bin/env bash
# Install Debian's PostgreSQL server (for the PostgreSQL metadata store's tests) if it is
# missing, and print its bin directory (the only line on stdout), e.g.
#   /usr/lib/postgresql/15/bin
# The tests start their own throwaway server (tests/postgres.py) as the `postgres` user on a
# free loopback port; nothing here depends on the distro's default cluster, and a cluster the
# package starts while we install it is stopped again. Needs root only when installing.
# Usage: scripts/install-postgres.sh
set -euo pipefail

find_bin() {
  local initdb
  # Highest major version first when several are installed.
  initdb=$(ls -d /usr/lib/postgresql/*/bin/initdb 2>/dev/null | sort -V | tail -n 1 || true)
  if [ -n "$initdb" ] && [ -x "$initdb" ]; then dirname "$initdb"; fi
}

bin=$(find_bin)
if [ -z "$bin" ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "PostgreSQL is not installed and this is not root: run as root, or" \
      "apt-get install -y postgresql" >&2
    exit 1
  fi
  echo "installing postgresql (apt-get)" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >&2
  apt-get install -y -qq postgresql >&2
  bin=$(find_bin)
  if [ -z "$bin" ]; then
    echo "apt-get install postgresql did not provide /usr/lib/postgresql/*/bin/initdb" >&2
    exit 1
  fi
  # The package may create and start a default cluster (systemd is not PID 1 here, so it
  # usually cannot); the tests never use it, so make sure it is not left running.
  if command -v pg_lsclusters >/dev/null 2>&1; then
    pg_lsclusters --no-header 2>/dev/null | while read -r ver name port status _; do
      if [ "$status" = online ]; then
        echo "stopping the default cluster $ver/$name (port $port); the tests start their own" >&2
        pg_ctlcluster "$ver" "$name" stop >&2 || true
      fi
    done || true
  fi
fi
for tool in initdb pg_ctl postgres createdb; do
  if [ ! -x "$bin/$tool" ]; then
    echo "$bin/$tool is missing: reinstall with apt-get install -y postgresql" >&2
    exit 1
  fi
done
if ! id -u postgres >/dev/null 2>&1 && [ "$(id -u)" -eq 0 ]; then
  echo "no 'postgres' user (the package creates it): the tests run the server as it" >&2
  exit 1
fi
echo "$bin"
