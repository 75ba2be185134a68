#!/usr/bin/env bash
# Install the Debian packages named as arguments whose program is missing (apt-get,
# with sudo when not root), then the pinned npm tools of grafana/schema-check when
# Node.js is among them. Idempotent: upstream binaries already on PATH count too.
set -euo pipefail
cd "$(dirname "$0")/.."

present() {  # whether what the Debian package $1 provides is already here
  case "$1" in
    python3-venv) python3 -c 'import ensurepip, venv' >/dev/null 2>&1 ;;
    nodejs) command -v node >/dev/null 2>&1 ;;
    prometheus) command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1 ;;
    prometheus-alertmanager)
      { command -v prometheus-alertmanager || command -v alertmanager; } >/dev/null 2>&1 &&
        command -v amtool >/dev/null 2>&1 ;;
    fonts-dejavu-core) [ -d /usr/share/fonts/truetype/dejavu ] ;;
    *) command -v "$1" >/dev/null 2>&1 ;;
  esac
}

missing=()
for package in "$@"; do
  present "$package" || missing+=("$package")
done
if [ "${#missing[@]}" -gt 0 ]; then
  sudo=()
  if [ "$(id -u)" != 0 ]; then
    if ! command -v sudo >/dev/null 2>&1; then
      echo "system-deps: missing Debian packages ${missing[*]}; run as root or install sudo" >&2
      exit 1
    fi
    sudo=(sudo)
  fi
  echo "system-deps: apt-get install ${missing[*]}"
  "${sudo[@]}" apt-get update -qq
  "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive \
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if [[ " $* " == *" nodejs "* ]] && [ -f grafana/schema-check/package-lock.json ] &&
  [ ! -d grafana/schema-check/node_modules ]; then
  npm ci --prefix grafana/schema-check --no-audit --no-fund --loglevel=error
fi
