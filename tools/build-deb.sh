#!/bin/bash
# Builds snf-image_<version>_all.deb with dpkg-deb (no debhelper, no network):
# `make install` into a staging directory with Debian's paths (the same file
# list as any other installation), then the package's documentation, control
# file, conffiles, md5sums and maintainer scripts from packaging/deb/.
# Usage: tools/build-deb.sh VERSION OUTPUT_DIR MAINTAINER   (called by `make deb`)
set -euo pipefail
repo=$(cd "$(dirname "$(readlink -f "$0")")/.." && pwd)
version=$1 out_dir=$2 maintainer=$3
[[ "$version" =~ ^[0-9][0-9A-Za-z.+~-]*$ ]] || { echo "build-deb: bad version '$version'" >&2; exit 2; }
templates=$repo/packaging/deb
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
root=$stage/root
umask 022

make -s -C "$repo" install DESTDIR="$root" PYCOMPILE=no \
  OSDIR=/usr/share/ganeti/os/snf-image SBINDIR=/usr/sbin DATADIR=/usr/share/snf-image

# the date of the last commit keeps the package reproducible; outside git, now
date=$(git -C "$repo" log -1 --format=%aD 2>/dev/null || date -R)
fill() {
  sed -e "s/@VERSION@/$version/g" -e "s|@MAINTAINER@|$maintainer|g" -e "s/@DATE@/$date/g" \
      -e "s/@INSTALLED_SIZE@/${installed_size:-0}/g" "$1"
}

doc=$root/usr/share/doc/snf-image
install -d -m 755 "$doc"
install -m 644 "$templates/copyright" "$doc/copyright"
fill "$templates/changelog.in" | gzip -9n > "$doc/changelog.gz"
chmod 644 "$doc/changelog.gz"

install -d -m 755 "$root/DEBIAN"
(cd "$root" && find etc -type f | sort | sed 's|^|/|') > "$root/DEBIAN/conffiles"
(cd "$root" && find usr -type f | LC_ALL=C sort | xargs -d '\n' md5sum) > "$root/DEBIAN/md5sums"
installed_size=$(du -sk --exclude=DEBIAN "$root" | cut -f1)
fill "$templates/control.in" > "$root/DEBIAN/control"
fill "$templates/postinst.in" > "$root/DEBIAN/postinst"
cp "$templates/prerm" "$templates/postrm" "$root/DEBIAN/"
chmod 755 "$root/DEBIAN/postinst" "$root/DEBIAN/prerm" "$root/DEBIAN/postrm"
chmod 644 "$root/DEBIAN/control" "$root/DEBIAN/conffiles" "$root/DEBIAN/md5sums"

mkdir -p "$out_dir"
deb=$out_dir/snf-image_${version}_all.deb
SOURCE_DATE_EPOCH=$(git -C "$repo" log -1 --format=%ct 2>/dev/null || date +%s) \
  dpkg-deb --root-owner-group -Zxz --build "$root" "$deb" >/dev/null
echo "$deb"
