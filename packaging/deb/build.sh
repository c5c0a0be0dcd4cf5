#!/bin/bash
# Build the llmux .deb for one Debian release in a cached chroot of that release.
#
#   packaging/deb/build.sh bookworm|trixie
#
# Output: packaging/deb/out/RELEASE/ (the .deb, the source package, lintian.txt).
# The bundled venv is tied to the release's python (3.11 on bookworm, 3.13 on trixie),
# so each release is built in its own chroot (packaging/deb/chroot.sh, cached under
# $LLMUX_BUILD_CACHE, default /var/cache/llmux-build). Wheels are downloaded once per
# release and per constraints.txt into the chroot; the package build itself is offline.
# Needs root. Fails when lintian reports an error or a warning that is not overridden.
set -euo pipefail

release=${1:?usage: build.sh bookworm|trixie}
case $release in
  bookworm) suffix=deb12 ;;
  trixie) suffix=deb13 ;;
  *) echo "build.sh: unsupported release '$release' (bookworm or trixie)" >&2; exit 2 ;;
esac

export PATH=/usr/sbin:/usr/bin:/sbin:/bin LC_ALL=C.UTF-8
[[ $EUID -eq 0 ]] || { echo "build.sh: needs root (debootstrap, systemd-nspawn)" >&2; exit 1; }
for tool in debootstrap systemd-nspawn git; do
  command -v "$tool" >/dev/null || {
    echo "build.sh: $tool is missing (apt-get install debootstrap systemd-container git)" >&2
    exit 1
  }
done
here=$(cd "$(dirname "$0")" && pwd)
top=$(cd "$here/../.." && pwd)
out=$here/out/$release

version=$(sed -n 's/^version = "\(.*\)"$/\1/p' "$top/pyproject.toml" | head -n1)
debversion=$(sed -n '1s/^llmux (\(.*\)) .*/\1/p' "$here/debian/changelog")
if [[ ${debversion%-*} != "$version" ]]; then
  echo "build.sh: debian/changelog says $debversion but pyproject.toml says $version" >&2
  exit 1
fi
[[ -f $top/constraints.txt ]] || { echo "build.sh: no constraints.txt at the top (make constraints)" >&2; exit 1; }

root=$("$here/chroot.sh" build "$release")
exec 9>"$root.lock"
flock 9

nspawn() {
  systemd-nspawn --quiet --register=no --keep-unit --as-pid2 -D "$root" \
    --setenv=PATH=/usr/sbin:/usr/bin:/sbin:/bin --setenv=LC_ALL=C.UTF-8 \
    --setenv=DEBIAN_FRONTEND=noninteractive "$@"
}

# 1. The upstream tree: what git tracks (as in the work tree), plus files not yet
# committed under the shipped code (llmuxd/, llmuxctl/, etc/), so a work tree builds
# as it is; other untracked files (scratch, local builds) stay out.
stage=$root/build
rm -rf "$stage"
src=$stage/llmux-$version
mkdir -p "$src"
(cd "$top" && { git ls-files -z --cached
                git ls-files -z --others --exclude-standard -- llmuxd llmuxctl etc; } \
  | while IFS= read -r -d '' f; do [[ -f $f ]] && printf '%s\0' "$f"; done \
  | tar --null -T - -cf -) | tar -xf - -C "$src"
tar -C "$stage" --sort=name --mtime="@$(git -C "$top" log -1 --format=%ct 2>/dev/null || echo 0)" \
  --owner=0 --group=0 --numeric-owner -czf "$stage/llmux_$version.orig.tar.gz" "llmux-$version"
cp -a "$here/debian" "$src/debian"
# A version per release (0.2.0-1~deb12 < 0.2.0-1~deb13 < 0.2.0-1), so an upgrade from
# bookworm to trixie replaces the venv built for the old python.
sed -i "1s/^llmux ($debversion) [a-z-]*;/llmux ($debversion~$suffix) $release;/" "$src/debian/changelog"

# 2. Wheels for this release's python, once per constraints.
wheels=/var/cache/llmux-wheels
key=$(cat "$top/constraints.txt" "$here/build-constraints.txt" | sha256sum | cut -c1-16)
if [[ ! -e $root$wheels/.complete-$key ]]; then
  rm -rf "${root:?}$wheels"
  # pip must trust what the host trusts (a site may intercept TLS with its own CA).
  ca=${SSL_CERT_FILE:-/etc/ssl/certs/ca-certificates.crt}
  nspawn --chdir="/build/llmux-$version" --bind-ro="$ca:/run/llmux-host-ca.crt" \
    --setenv=PIP_CERT=/run/llmux-host-ca.crt sh -ec "
    python3 -m venv /tmp/dl
    /tmp/dl/bin/pip download --quiet --disable-pip-version-check --only-binary=:all: \
      -d $wheels -r constraints.txt -r packaging/deb/build-constraints.txt
    touch $wheels/.complete-$key"
fi

# 3. Build dependencies from debian/control, the source and binary packages, lintian.
nspawn --chdir="/build/llmux-$version" sh -ec "
  apt-get build-dep -y -q ./ >/dev/null
  LLMUX_WHEELHOUSE=$wheels dpkg-buildpackage -us -uc
  cd /build
  lintian --info --display-info --fail-on error,warning llmux_*.changes > lintian.txt 2>&1 \
    || { cat lintian.txt; exit 1; }
  cat lintian.txt"

rm -rf "$out"
mkdir -p "$out"
cp "$stage"/llmux_* "$stage/lintian.txt" "$out/"
ls -l "$out"
