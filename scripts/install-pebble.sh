#!/usr/bin/env bash
# Install Debian's pebble (a small ACME CA for tests) if it is missing, and print the path of
# its binary. The tests start their own pebble on loopback with a generated certificate.
# Usage: scripts/install-pebble.sh
set -euo pipefail

bin=$(command -v pebble 2>/dev/null || true)
if [ -z "$bin" ] && [ -x /usr/bin/pebble ]; then
  bin=/usr/bin/pebble
fi
if [ -z "$bin" ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "pebble is not installed and this is not root: apt-get install -y pebble" >&2
    exit 1
  fi
  echo "installing pebble (apt-get)" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >&2
  apt-get install -y -qq pebble >&2
  bin=$(command -v pebble)
fi
echo "$bin"
