#!/usr/bin/env bash
# Run the README's commands as a newcomer would, on a clean Debian 12 (bookworm):
# debootstrap a minimal chroot with only make, python3 and sudo, clone this
# checkout's HEAD into a new user's home, and run `make demo` (DEMO_ARGS, default
# a short run) and then `make test-fast` (or the targets given) as that user.
#
#   sudo scripts/fresh-debian.sh DIR [TARGET...]     # DIR: a folder outside the checkout
#
# Needs root (debootstrap, chroot, mounts) and Debian's mirror. DIR is reused when it
# already holds the bootstrapped system; the clone is made anew every run. Set
# PIP_FIND_LINKS or PIP_EXTRA_INDEX_URL to hand the chroot's pip a CPU torch build,
# and PIP_CERT to a CA bundle when a TLS proxy stands between this machine and PyPI
# or npm (it is copied in and given to pip and Node.js).
set -euo pipefail

dir=${1:?usage: scripts/fresh-debian.sh DIR [TARGET...]}
shift
targets=("$@")
[ "${#targets[@]}" -gt 0 ] || targets=(demo test-fast)
mirror=${MIRROR:-http://deb.debian.org/debian}
demo_args=${DEMO_ARGS:---updates 3 --web.listen-address 127.0.0.1:0}
repo=$(cd "$(dirname "$0")/.." && pwd)
user=newcomer

[ "$(id -u)" = 0 ] || { echo "fresh-debian: needs root" >&2; exit 1; }
mkdir -p "$dir"
dir=$(cd "$dir" && pwd)
case "$dir/" in "$repo"/*) echo "fresh-debian: DIR must be outside the checkout" >&2; exit 1 ;; esac
command -v debootstrap >/dev/null || apt-get install -y -qq --no-install-recommends debootstrap >/dev/null

root=$dir/root
if [ ! -x "$root/usr/bin/python3" ]; then
  debootstrap --variant=minbase --include=make,python3,sudo bookworm "$root" "$mirror"
fi

mounts=()
cleanup() {
  for ((i = ${#mounts[@]} - 1; i >= 0; i--)); do umount -l "${mounts[i]}" 2>/dev/null || true; done
}
trap cleanup EXIT
bind() {  # bind-mount $1 at the same path inside the chroot, private ($2: extra mount options)
  mkdir -p "$root$1"
  mount --bind "$1" "$root$1"
  mounts+=("$root$1")
  mount --make-private "$root$1"
  [ -z "${2:-}" ] || mount -o "remount,bind,$2" "$root$1"
}
mount -t proc proc "$root/proc" && mounts+=("$root/proc")
mount -t sysfs sys "$root/sys" && mounts+=("$root/sys")
bind /dev
mount -t tmpfs shm "$root/dev/shm" && mounts+=("$root/dev/shm")
cp /etc/resolv.conf "$root/etc/resolv.conf"
grep -q "$(hostname)" "$root/etc/hosts" 2>/dev/null || echo "127.0.1.1 $(hostname)" >>"$root/etc/hosts"
pip_env=()
if [ -n "${PIP_CERT:-}" ]; then
  cp "$PIP_CERT" "$root/etc/ssl/host-ca.pem"
  pip_env+=(PIP_CERT=/etc/ssl/host-ca.pem NODE_EXTRA_CA_CERTS=/etc/ssl/host-ca.pem)
fi
for var in PIP_FIND_LINKS PIP_EXTRA_INDEX_URL; do
  value=${!var:-}
  [ -n "$value" ] || continue
  pip_env+=("$var=$value")
  [ ! -d "$value" ] || bind "$value" ro
done

if ! chroot "$root" id "$user" >/dev/null 2>&1; then
  chroot "$root" useradd --create-home --shell /bin/bash "$user"
  echo "$user ALL=(ALL) NOPASSWD: ALL" >"$root/etc/sudoers.d/$user"
  chmod 0440 "$root/etc/sudoers.d/$user"
fi
home=$root/home/$user
rm -rf "$home/tele-exporter"
git clone -q "$repo" "$home/tele-exporter"
chroot "$root" chown -R "$user:$user" "/home/$user/tele-exporter"

echo "fresh-debian: $(chroot "$root" cat /etc/debian_version), $(chroot "$root" python3 --version), HEAD $(git -C "$repo" rev-parse --short HEAD)"
status=0
for target in "${targets[@]}"; do
  start=$(date +%s)
  chroot "$root" runuser -u "$user" -- env -i HOME="/home/$user" USER="$user" LANG=C.UTF-8 \
    PATH=/usr/local/bin:/usr/bin:/bin "${pip_env[@]}" \
    make -C "/home/$user/tele-exporter" "$target" DEMO_ARGS="$demo_args" || status=$?
  echo "fresh-debian: make $target exited $status after $(($(date +%s) - start)) s"
  [ "$status" = 0 ] || break
done
exit "$status"
