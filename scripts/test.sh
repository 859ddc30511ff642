#!/usr/bin/env bash
# Set up from nothing and run every test: a virtualenv with the package and its test
# dependencies, the real Pulumi CLI (3.259.0 and 3.210.0) and YAML host built from the Go
# module proxy, and the test resource provider; builds are cached under ~/.cache/pulumid.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${PULUMID_VENV:-.venv}
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
"$venv/bin/pip" install -q --upgrade pip
"$venv/bin/pip" install -q -e '.[test]'

echo "== building the Pulumi CLI, YAML host, test provider, MinIO and local-kms (cached); PostgreSQL, HAProxy, oidc-provider, pebble, packaging tools"
# The installs wait on the network and the disk, the Go builds on the CPU: on a new machine
# they overlap (minutes saved). The installs run one after another (apt-get takes a lock).
installs_log=$(mktemp)
(
  scripts/install-postgres.sh
  scripts/install-haproxy.sh
  scripts/install-oidc-provider.sh
  scripts/install-pebble.sh
  scripts/install-packaging-tools.sh
) >/dev/null 2>"$installs_log" &
installs=$!
versions=${PULUMID_E2E_CLI_VERSIONS:-3.259.0,3.210.0}
for v in ${versions//,/ }; do scripts/build-pulumi.sh cli "$v" >/dev/null; done
scripts/build-pulumi.sh yaml 1.19.1 >/dev/null
scripts/build-provider.sh >/dev/null
scripts/build-minio.sh >/dev/null
scripts/build-local-kms.sh >/dev/null
status=0
wait "$installs" || status=$?
cat "$installs_log" >&2
rm -f "$installs_log"
if [ "$status" -ne 0 ]; then
  echo "installing PostgreSQL, HAProxy, oidc-provider, pebble or the packaging tools failed" >&2
  exit "$status"
fi

echo "== lint and types"
"$venv/bin/ruff" check pulumid twisted tests benchmarks
"$venv/bin/mypy" pulumid tests benchmarks

echo "== tests"
start=$(date +%s)
"$venv/bin/pytest" -q --durations=30 "$@"
echo "test suite wall time: $(( $(date +%s) - start ))s"
