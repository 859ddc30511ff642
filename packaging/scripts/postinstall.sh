#!/bin/sh
# After files land (install and upgrade; deb: "configure", rpm: 1 or 2): the state directory,
# and on first install a token and a master key, never overwriting existing ones.
set -e
STATE=/var/lib/pulumid
install -d -m 0700 -o pulumid -g pulumid "$STATE"
chmod 0700 "$STATE"
umask 077
generate() {
    # $1: file, $2: Python expression for its content
    if [ ! -e "$STATE/$1" ]; then
        /opt/pulumid/venv/bin/python -c "import secrets; print($2)" >"$STATE/$1.new"
        chown pulumid:pulumid "$STATE/$1.new"
        chmod 0600 "$STATE/$1.new"
        mv "$STATE/$1.new" "$STATE/$1"
        echo "pulumid: generated $STATE/$1 (mode 0600); back it up"
    fi
}
generate token '"pul-" + secrets.token_hex(20)'
generate master-key 'secrets.token_hex(32)'
echo "pulumid: log in with: pulumi login http://127.0.0.1:8080 (the token is in $STATE/token)"
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload >/dev/null 2>&1 || true
    # An upgrade restarts a running service (its schema migrates at start, after a copy).
    systemctl try-restart pulumid.service >/dev/null 2>&1 || true
fi
exit 0
