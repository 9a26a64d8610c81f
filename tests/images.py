"""Real Debian test images for snf-image's tests, built once and cached.

`debian_image(layout)` returns the path of a bootable Debian disk image built
by tools/build-test-image.py (mmdebstrap from the host's Debian mirror) into
SNF_IMAGE_TEST_CACHE/images/<name>-<hash of the recipe>.img. A file lock
makes concurrent test sessions wait for one build instead of racing; the
cache is reused as long as the recipe (layout, suite, mirror, package list,
the builder's own source) is unchanged. Callers must not modify the image
(copy it, or boot it with snapshot=True).
"""

import fcntl
import os
import subprocess
import sys
from pathlib import Path

from conftest import CACHE_DIR, REPO, load_script

BUILDER = REPO / "tools" / "build-test-image.py"
SUITE = os.environ.get("SNF_IMAGE_TEST_SUITE", "bookworm")
IMAGES_DIR = CACHE_DIR / "images"
LAYOUTS = ("mbr", "gpt", "mbr-cloudinit")


def builder():
    return load_script("tools/build-test-image.py", "build_test_image")


def image_path(layout):
    tool = builder()
    recipe = tool.recipe_for(layout, SUITE, tool.host_debian_mirror(SUITE), 1024)
    return IMAGES_DIR / f"debian-{SUITE}-{layout}-{tool.short_hash(recipe)}.img"


def debian_image(layout):
    """Path of the cached image for LAYOUT ('mbr', 'gpt', 'mbr-cloudinit'), built if missing."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown test image layout {layout!r}")
    path = image_path(layout)
    if path.exists():
        return path
    IMAGES_DIR.mkdir(parents=True, exist_ok=True)
    with open(IMAGES_DIR / f"{layout}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if path.exists():
            return path
        # A builder that changed leaves stale images of this layout behind.
        for stale in IMAGES_DIR.glob(f"debian-{SUITE}-{layout}-{'?' * 16}.img"):
            stale.unlink()
        subprocess.run([sys.executable, str(BUILDER), "--layout", layout, "--suite", SUITE,
                        "--output", str(path), "--cache-dir", str(IMAGES_DIR)], check=True)
    return path
