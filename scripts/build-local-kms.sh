#!/usr/bin/env bash
# Build local-kms (github.com/nsmithuk/local-kms, a local AWS KMS emulator) that the tests use
# for KMS-backed secrets, and print the path of the binary (the only line on stdout). Cached by
# version:
#   ${PULUMID_CACHE:-~/.cache/pulumid}/local-kms/VERSION/local-kms
# Usage: scripts/build-local-kms.sh [VERSION]   (default: the pinned version below)
set -euo pipefail
version=${1:-v0.0.0-20260228092603-2a5e92d09ab6}
cache=${PULUMID_CACHE:-$HOME/.cache/pulumid}
dir="$cache/local-kms/$version"
out="$dir/local-kms"
if [ -x "$out" ]; then echo "$out"; exit 0; fi
echo "building $out (go install github.com/nsmithuk/local-kms@$version)" >&2
mkdir -p "$dir"
tmp=$(mktemp -d "$dir/.gobin.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
GOBIN="$tmp" GOFLAGS=-mod=mod go install -trimpath "github.com/nsmithuk/local-kms@$version" >&2
mv "$tmp/local-kms" "$out"
echo "$out"
