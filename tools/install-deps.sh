#!/bin/bash
# Installs what snf-image's tests, demo and benchmarks need on a Debian 12 machine
# (Debian packages through the host's APT sources, pytest/hypothesis/pyflakes through pip).
# Idempotent and quick when everything is already there.
set -euo pipefail
PACKAGES=(qemu-system-x86 qemu-utils multistrap mmdebstrap debootstrap e2fsprogs
  fdisk gdisk parted dosfstools syslinux-common extlinux busybox-static socat
  cpio xz-utils bzip2 gzip debian-archive-keyring ganeti fping iputils-arping
  iproute2 openssh-server procps xfsprogs btrfs-progs kmod util-linux file zstd)
PACKAGES+=(libguestfs-tools linux-image-amd64)  # bench-helper's baseline: guestfish, whose appliance needs a kernel in /boot
PACKAGES+=(ovmf mtools)  # UEFI boots of the genericcloud test image (OVMF), its ESP written by mtools
PACKAGES+=(ntfs-3g libhivex-bin)  # Windows tests: NTFS test disks (mkntfs, ntfs-3g) and registry hives (hivexget, hivexsh)
PACKAGES+=(gpg gpgv)  # signed image tests: a test key signs, gpgv verifies
missing=()
for p in "${PACKAGES[@]}"; do
  status=$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null || true)
  [[ "$status" == *"ok installed"* ]] || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "install-deps: installing ${missing[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  apt-get install -y -q --no-install-recommends "${missing[@]}"
fi
PYTHON=${PYTHON:-python3}
if ! "$PYTHON" -c 'import pytest, hypothesis, pyflakes' 2>/dev/null; then
  echo "install-deps: installing pytest, hypothesis and pyflakes for $PYTHON" >&2
  "$PYTHON" -m pip install -q pytest hypothesis pyflakes
fi
