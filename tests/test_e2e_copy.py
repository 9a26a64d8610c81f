"""End to end through the real `create` of the OS definition and the real
helper VM (TCG): the Debian test image deployed as qcow2 and as a sparse raw
file onto disks full of old random data. The sparse copy must leave no old
byte in the image's range; the helper must find the OS on the qcow2 copy."""

import os
import subprocess

import pytest

from conftest import e2e_site_root, require_helper_build, require_programs
from helpervm import built_helper_dir
from images import debian_image
from test_e2e_helper import RECORDING_TASKS, Deployment, same_bytes

pytestmark = [pytest.mark.slow, pytest.mark.qemu, pytest.mark.root]
MIB = 1024 * 1024


@pytest.fixture(scope="module")
def site():
    """The helper with the recording task, the Debian image as qcow2 and as a sparse raw copy."""
    require_helper_build()
    require_programs("qemu-img")
    helper_dir = built_helper_dir(tasks_dir=RECORDING_TASKS)
    with e2e_site_root("copy-e2e-") as root:
        image = debian_image("mbr")
        # names that say nothing: the format comes from the header
        subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(image),
                        str(root / "images" / "debian-qcow2.img")], check=True)
        sparse = root / "images" / "debian-sparse.img"
        subprocess.run(["cp", "--sparse=always", str(image), str(sparse)], check=True)
        assert os.stat(sparse).st_blocks * 512 < os.path.getsize(sparse) // 2
        yield {"root": root, "helper_dir": helper_dir, "image": image}


@pytest.fixture
def deployment(site, tmp_path):
    made = Deployment(site, tmp_path / "d")
    pattern = os.urandom(4 * MIB)
    with open(made.disk0, "r+b") as disk:          # old data over the whole image range and beyond
        for _ in range(os.path.getsize(site["image"]) // len(pattern) + 4):
            disk.write(pattern)
    yield made
    for disk in (made.disk0, made.disk1):
        disk.unlink(missing_ok=True)


def test_sparse_raw_over_old_data_through_create(site, deployment):
    code = deployment.create({"EXCLUDE_ALL_TASKS": "yes"}, layout="sparse")
    assert code == 0, deployment.output
    assert "zero ranges are skipped and zeroed by fallocate hole punching" in deployment.output
    assert same_bytes(deployment.disk0, site["image"])      # no old byte left in the range
    # the image's holes became holes of the disk file: not every byte was written
    assert os.stat(deployment.disk0).st_blocks * 512 < 2 * os.path.getsize(site["image"]) * 3 // 4


def test_qcow2_over_old_data_through_create(site, deployment):
    code = deployment.create({"CLOUD_INIT": "no"}, layout="qcow2")
    assert code == 0, deployment.output
    assert "qcow2 disk image (from its header)" in deployment.output
    assert "copied by its map" in deployment.output
    record = deployment.record()
    assert record is not None, deployment.output
    env = record["environment"]
    assert (env["SNF_IMAGE_PROPERTY_OSFAMILY"], env["SNF_IMAGE_PROPERTY_ROOT_PARTITION"]) == ("linux", "1")
    assert record["root"]["base_distro"] == "debian" and record["root"]["has_fstab"]
    # before the first partition the helper changes nothing: the copy is exact there
    with open(deployment.disk0, "rb") as disk, open(site["image"], "rb") as image:
        assert disk.read(MIB) == image.read(MIB)
