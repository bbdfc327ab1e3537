#!/bin/sh
# Install the Debian/Ubuntu packages the project needs, if any is missing.
# Usage: scripts/install-deps.sh [extra packages...]
set -eu
PACKAGES="debootstrap debian-archive-keyring gcc make libc6-dev python3 python3-venv python3-dev curl tar nftables iptables $*"
missing=""
for p in $PACKAGES; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing="$missing $p"
done
[ -z "$missing" ] && exit 0
if [ "$(id -u)" != 0 ]; then
    echo "install-deps: missing packages:$missing; run as root (OpenLambda needs root anyway)" >&2
    exit 1
fi
echo "install-deps: installing$missing"
export DEBIAN_FRONTEND=noninteractive
apt-get update -q
apt-get install -y -q --no-install-recommends $missing
