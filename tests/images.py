"""Real Debian test images for snf-image's tests, built once and cached.

`debian_image(layout)` returns the path of a bootable Debian disk image built
by tools/build-test-image.py (mmdebstrap from the host's Debian mirror) into
SNF_IMAGE_TEST_CACHE/images/debian-<suite>-<layout>-<hash of the recipe>.img.
The builder holds a file lock per layout, so concurrent test sessions wait for
one build instead of racing, and reuses the cache as long as the recipe
(layout, suite, mirror, package list, the builder's own source) is unchanged.
Callers must not modify the image (copy it, or boot it with snapshot=True).

Layouts of Debian 12 (SNF_IMAGE_TEST_SUITE, default bookworm): 'mbr' (MBR,
one ext4 root, extlinux, ifupdown), 'gpt' (GPT, /boot, swap, root last,
systemd-networkd), 'gpt-cloud' (numbered like Debian's official cloud images:
14 BIOS boot, 15 ESP at /boot/efi, root = partition 1 but last on the disk),
'mbr-cloudinit' (mbr with cloud-init).

Layouts of today's Debian (SNF_IMAGE_TEST_TODAY_SUITE, default trixie):
'gpt-xfs' (gpt with an XFS root, systemd-networkd only, machine-id holding an
id), 'gpt-cloud-uefi' (gpt-cloud booted by UEFI firmware through
systemd-boot, netplan, machine-id `uninitialized`), 'mbr-nm' (MBR,
NetworkManager with the image's own DHCP profile, empty machine-id).
"""

import os

from conftest import CACHE_DIR, load_script

SUITE = os.environ.get("SNF_IMAGE_TEST_SUITE", "bookworm")
TODAY_SUITE = os.environ.get("SNF_IMAGE_TEST_TODAY_SUITE", "trixie")
IMAGES_DIR = CACHE_DIR / "images"
LAYOUTS = {"mbr": SUITE, "gpt": SUITE, "gpt-cloud": SUITE, "mbr-cloudinit": SUITE,
           "gpt-xfs": TODAY_SUITE, "gpt-cloud-uefi": TODAY_SUITE, "mbr-nm": TODAY_SUITE}


def builder():
    return load_script("tools/build-test-image.py", "build_test_image")


def debian_image(layout):
    """Path of the cached image for LAYOUT, built on first use."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown test image layout {layout!r}")
    return builder().cached_image(layout, IMAGES_DIR, LAYOUTS[layout])
