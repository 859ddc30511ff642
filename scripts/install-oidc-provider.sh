#!/usr/bin/env bash
# Install the npm package oidc-provider (a certified OpenID Connect provider that the tests run
# on loopback, see tests/oidc/) into a cache outside the repo, keyed by the lockfile's hash, and
# print the directory that holds its node_modules (the only line on stdout), e.g.
#   ${PULUMID_CACHE:-~/.cache/pulumid}/oidc-provider/HASH
# `npm ci` installs exactly tests/oidc/package-lock.json; a finished install is marked by a
# stamp file so a rerun is quiet, and an interrupted one is redone from scratch.
# Usage: scripts/install-oidc-provider.sh
set -euo pipefail
src="$(cd "$(dirname "$0")/.." && pwd)/tests/oidc"
cache=${PULUMID_CACHE:-$HOME/.cache/pulumid}
hash=$(sha256sum "$src/package-lock.json" | cut -c1-16)
dir="$cache/oidc-provider/$hash"
if [ -f "$dir/.installed" ] && [ -d "$dir/node_modules/oidc-provider" ]; then
  echo "$dir"
  exit 0
fi
if ! command -v npm >/dev/null 2>&1; then
  echo "npm is not installed: the OIDC provider for the tests needs Node.js (>= 20) and npm" >&2
  exit 1
fi
echo "installing oidc-provider into $dir (npm ci)" >&2
mkdir -p "$cache/oidc-provider"
# Build in a temporary sibling and rename it into place, so concurrent runs never see half an
# install under the final name.
tmp=$(mktemp -d "$cache/oidc-provider/.install.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
cp "$src/package.json" "$src/package-lock.json" "$tmp/"
npm ci --prefix "$tmp" --ignore-scripts --no-audit --no-fund --loglevel=error >&2
touch "$tmp/.installed"
# A leftover without the stamp is a broken install from an older run: replace it. If another
# run finished first, its install is as good as ours.
if [ -e "$dir" ] && [ ! -f "$dir/.installed" ]; then rm -rf "$dir"; fi
if ! mv -T "$tmp" "$dir" 2>/dev/null && [ ! -f "$dir/.installed" ]; then
  echo "could not move the install into $dir" >&2
  exit 1
fi
echo "$dir"
