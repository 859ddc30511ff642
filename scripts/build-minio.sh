#!/usr/bin/env bash
# Build the MinIO server (S3-compatible object store) that the benchmarks use for the CLI's
# s3:// backend, and print the path of the binary (the only line on stdout). Cached by version:
#   ${PULUMID_CACHE:-~/.cache/pulumid}/minio/VERSION/minio
# Usage: scripts/build-minio.sh [VERSION]   (default: the pinned version below)
set -euo pipefail
version=${1:-v0.0.0-20260212201848-7aac2a2c5b7c}
cache=${PULUMID_CACHE:-$HOME/.cache/pulumid}
dir="$cache/minio/$version"
out="$dir/minio"
if [ -x "$out" ]; then echo "$out"; exit 0; fi
echo "building $out (go install github.com/minio/minio@$version)" >&2
mkdir -p "$dir"
tmp=$(mktemp -d "$dir/.gobin.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
GOBIN="$tmp" GOFLAGS=-mod=mod go install -trimpath "github.com/minio/minio@$version" >&2
mv "$tmp/minio" "$out"
echo "$out"
