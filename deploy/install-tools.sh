#!/bin/sh
# Installs the one static-check tool that is not on PyPI: promtool, from Debian's `prometheus` package.
# Only the binary is extracted into BIN (default: .venv/bin, first on PATH under make), so no
# Prometheus server is installed or started. Idempotent: does nothing when promtool is already there.
#   deploy/install-tools.sh [BIN]
set -eu
bin_dir=${1:-"$(cd "$(dirname "$0")/.." && pwd)/.venv/bin"}
if [ -x "$bin_dir/promtool" ] || command -v promtool >/dev/null 2>&1; then
    exit 0
fi
mkdir -p "$bin_dir"
bin_dir=$(cd "$bin_dir" && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# apt hands downloads to its unprivileged _apt user: let it write here.
chmod 0777 "$work"
cd "$work"
# A fresh machine may have no package lists yet.
apt-get download prometheus >/dev/null 2>&1 || { apt-get update -qq && apt-get download -q prometheus; }
dpkg-deb -x prometheus_*.deb extracted
install -m 0755 extracted/usr/bin/promtool "$bin_dir/promtool"
"$bin_dir/promtool" --version 2>&1 | head -n 1
