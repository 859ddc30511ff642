#!/usr/bin/env bash
# Build the test resource provider plugin (tests/provider) and print the directory that
# holds `pulumi-resource-pulumidtest` (the only line on stdout). The binary is cached outside
# the repository, keyed by a hash of the module's sources:
#   ${PULUMID_CACHE:-~/.cache/pulumid}/provider/HASH/pulumi-resource-pulumidtest
set -euo pipefail
src=$(cd "$(dirname "${BASH_SOURCE[0]}")/../tests/provider" && pwd)
cache=${PULUMID_CACHE:-$HOME/.cache/pulumid}
hash=$(cd "$src" && cat go.mod go.sum $(LC_ALL=C ls *.go) | sha256sum | cut -c1-16)
dir="$cache/provider/$hash"
out="$dir/pulumi-resource-pulumidtest"
if [ ! -x "$out" ]; then
  echo "building $out" >&2
  mkdir -p "$dir"
  (cd "$src" && go build -trimpath -buildvcs=false -o "$out.tmp.$$" .) >&2
  mv "$out.tmp.$$" "$out"
fi
echo "$dir"
