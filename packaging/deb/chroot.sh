#!/bin/bash
# Create (once) and cache a Debian root file system, outside the repository.
#
#   packaging/deb/chroot.sh build RELEASE   -> $LLMUX_BUILD_CACHE/RELEASE   (buildd + lintian)
#   packaging/deb/chroot.sh test  RELEASE   -> $LLMUX_TEST_CACHE/rootfs-RELEASE (minbase + systemd)
#
# Prints the path of the root. A root is complete only when its stamp file exists, so an
# interrupted debootstrap is started again from scratch rather than reused half-made.
# Needs root, debootstrap and network access to a Debian mirror.
set -euo pipefail

kind=${1:?usage: chroot.sh build|test RELEASE}
release=${2:?usage: chroot.sh build|test RELEASE}
mirror=${LLMUX_DEBIAN_MIRROR:-http://deb.debian.org/debian}
security=${LLMUX_DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security}
export PATH=/usr/sbin:/usr/bin:/sbin:/bin LC_ALL=C.UTF-8 DEBIAN_FRONTEND=noninteractive

case $kind in
  build)
    root=${LLMUX_BUILD_CACHE:-/var/cache/llmux-build}/$release
    variant=buildd
    # debhelper and the python venv tooling are the build dependencies; apt-get build-dep
    # installs whatever debian/control adds later. lintian runs in the same release.
    packages="ca-certificates debhelper python3 python3-venv lintian"
    ;;
  test)
    root=${LLMUX_TEST_CACHE:-/var/cache/llmux-test}/rootfs-$release
    variant=minbase
    # man-db: systemd-analyze verify checks the unit's Documentation=man: pages;
    # logrotate: the package recommends it, the proof rotates the model logs.
    packages="systemd systemd-sysv dbus man-db logrotate"
    ;;
  *) echo "chroot.sh: unknown kind '$kind' (build or test)" >&2; exit 2 ;;
esac

mkdir -p "$(dirname "$root")"
exec 9>"$root.lock"
flock 9   # one maker at a time; the others then find it complete
# The stamp holds what the root was made with: a change of the list rebuilds it.
stamp=$root/.llmux-complete
want="$variant $release $packages"
if [[ -e $stamp && $(cat "$stamp") == "$want" ]]; then
  echo "$root"
  exit 0
fi

command -v debootstrap >/dev/null || { echo "chroot.sh: debootstrap is not installed (apt-get install debootstrap)" >&2; exit 1; }
rm -rf "$root"
mkdir -p "$(dirname "$root")"
echo "chroot.sh: debootstrap $variant $release into $root (once; cached)" >&2
# Only the base here: debootstrap's resolver does not follow virtual packages
# (lintian -> perl-openssl-abi-3), so apt installs the rest below.
debootstrap --variant="$variant" "$release" "$root" "$mirror" >&2

cat >"$root/etc/apt/sources.list" <<SRC
deb $mirror $release main
deb $mirror $release-updates main
deb $security $release-security main
SRC
# Keep downloaded packages: the test installs its .deb's dependencies from this cache.
rm -f "$root/etc/apt/apt.conf.d/docker-clean"
echo 'APT::Install-Recommends "false";' >"$root/etc/apt/apt.conf.d/90llmux-norecommends"
chroot "$root" apt-get update -q >&2
# shellcheck disable=SC2086  # a list of package names, split on purpose
chroot "$root" apt-get install -y -q $packages >&2
chroot "$root" apt-get clean
if [[ $kind == test ]]; then
  # A container: no getty on a console that nobody reads, a fixed machine id.
  echo llmux-test >"$root/etc/hostname"
  systemd-machine-id-setup --root="$root" >/dev/null 2>&1 || true
  chroot "$root" systemctl mask console-getty.service getty@tty1.service \
    systemd-networkd-wait-online.service >/dev/null 2>&1 || true
fi
echo "$want" >"$stamp"
echo "$root"
