#!/usr/bin/env bash
# Install the Debian packages named as arguments when a binary is missing, and the
# pinned npm tools of grafana/schema-check. Idempotent; uses sudo when not root.
set -euo pipefail
cd "$(dirname "$0")/.."

missing=0
for bin in prometheus promtool prometheus-alertmanager amtool docker-compose chromium; do
  command -v "$bin" >/dev/null 2>&1 || missing=1
done
if [ "$missing" = 1 ]; then
  sudo=""
  [ "$(id -u)" = 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "$@" >/dev/null
fi

if [ -f grafana/schema-check/package-lock.json ] && [ ! -d grafana/schema-check/node_modules ]; then
  npm ci --prefix grafana/schema-check --no-audit --no-fund --loglevel=error
fi
