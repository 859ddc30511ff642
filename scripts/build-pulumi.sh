#!/usr/bin/env bash
# Build the real Pulumi CLI (and the YAML language host) from the Go module proxy.
# Usage: scripts/build-pulumi.sh cli 3.259.0 | scripts/build-pulumi.sh yaml 1.19.1
# Results are cached outside the repository, keyed by version:
#   ${PULUMID_CACHE:-~/.cache/pulumid}/cli/VERSION/pulumi
#   ${PULUMID_CACHE:-~/.cache/pulumid}/yaml/VERSION/pulumi-language-yaml
set -euo pipefail
kind=${1:?cli or yaml}
version=${2:?version}
cache=${PULUMID_CACHE:-$HOME/.cache/pulumid}
case "$kind" in
  cli)  out="$cache/cli/$version/pulumi"; pkg=github.com/pulumi/pulumi/pkg/v3/cmd/pulumi ;;
  yaml) out="$cache/yaml/$version/pulumi-language-yaml"; pkg=github.com/pulumi/pulumi-yaml/cmd/pulumi-language-yaml ;;
  *) echo "unknown kind $kind" >&2; exit 2 ;;
esac
if [ -x "$out" ]; then echo "$out"; exit 0; fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work"
# pkg/v3 carries replace directives, so `go install pkg@version` refuses it: a wrapper
# module that requires it and repeats the replace builds it.
cat > go.mod <<MOD
module pulumid.local/build

go 1.24

replace github.com/atotto/clipboard => github.com/tgummerer/clipboard v0.0.0-20241001131231-d02d263e614e
MOD
cat > tools.go <<GO
//go:build tools

package tools

import _ "$pkg"
GO
if [ "$kind" = cli ]; then
  go mod edit -require=github.com/pulumi/pulumi/pkg/v3@v$version -require=github.com/pulumi/pulumi/sdk/v3@v$version
  ldflags="-X github.com/pulumi/pulumi/sdk/v3/go/common/version.Version=v$version"
else
  go mod edit -require=github.com/pulumi/pulumi-yaml@v$version
  ldflags="-X github.com/pulumi/pulumi-yaml/pkg/version.Version=v$version"
fi
GOFLAGS=-mod=mod go mod tidy >&2
mkdir -p "$(dirname "$out")"
GOFLAGS=-mod=mod go build -ldflags "$ldflags" -o "$out.tmp" "$pkg"
mv "$out.tmp" "$out"
echo "$out"
