"""tasks.d/10FixPartitionTable writes the ordinary partition tables in Python
instead of running sgdisk -e and sfdisk -N: this proves both ways give the
same table.  Each layout is built with sfdisk/sgdisk on a sparse file, grown,
and put on two loop devices (512-byte or 4096-byte sectors); the same plan
is applied by sgdisk/sfdisk on one and by the task's Python writer on the
other, then the results are compared: `sfdisk --json`, the raw MBR, GPT
headers and entry arrays byte for byte (the random GUID of a new partition
and the CRCs covering it aside), and both verifiers (`sfdisk --verify`,
`sgdisk -v`) must be clean.  Unusual tables (logical partitions, a hybrid
MBR) must be left untouched by the Python writer.  The partition tables of
the cached real Debian and Windows test images are grown both ways too."""

import json
import os

import pytest

from conftest import CACHE_DIR, load_script, require, require_programs, require_root
from test_tasks_disk import sh

pytestmark = pytest.mark.root

HELPER = load_script("snf-image-helper.py", "snf_image_helper")
FIX = load_script("tasks.d/10FixPartitionTable", "task_fixpartitiontable")
MIB = 1024 * 1024
GIB = 1024 * MIB


@pytest.fixture
def loops():
    require_root()
    require_programs("losetup", "sfdisk", "sgdisk")
    devices = []

    def attach(image, sector_size=512):
        device = sh("losetup", "-f", "--show", "--sector-size", sector_size, image).stdout.strip()
        devices.append(device)
        return device

    yield attach
    for device in reversed(devices):
        sh("losetup", "-d", device, check=False)


def empty_image(path, size):
    with open(path, "wb") as handle:
        handle.truncate(size)
    return path


def sfdisk_image(path, size, script):
    sh("sfdisk", "-q", empty_image(path, size), input=script)


def sgdisk_image(path, size, *arguments):
    sh("sgdisk", *arguments, empty_image(path, size))


def grow(path, size):
    with open(path, "r+b") as handle:
        handle.truncate(size)


def read_device(device, offset, length):
    fd = os.open(device, os.O_RDONLY)
    try:
        return os.pread(fd, length, offset)
    finally:
        os.close(fd)


def poke(path, offset, data):
    with open(path, "r+b") as handle:
        handle.seek(offset)
        handle.write(data)


def the_old_way(device):
    """What the task did before it wrote tables itself: sgdisk -e on GPT,
    then one sfdisk -N per change."""
    label, partitions, sector_size = FIX.read_table(device)
    if label == "gpt":
        sh("sgdisk", "-e", device)
        label, partitions, sector_size = FIX.read_table(device)
    return label, partitions, sector_size


def plan(device, label, partitions, sector_size, swap):
    total = FIX.device_size(device) // sector_size
    return FIX.Planner(label, partitions, total, sector_size).plan(swap)


def comparable_json(device, new_numbers):
    table = json.loads(sh("sfdisk", "--json", device).stdout)["partitiontable"]
    table.pop("device")
    for partition in table["partitions"]:
        number = HELPER._partition_number(device, partition.pop("node"))
        partition["number"] = number
        if number in new_numbers:
            assert partition.pop("uuid", "x")          # a new GPT partition has a GUID
    return table


def verify_clean(device, label):
    result = sh("sfdisk", "--verify", device, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    if label == "gpt":
        assert "No problems found" in sh("sgdisk", "-v", device).stdout


def gpt_structures(device, sector_size, new_numbers):
    """The GPT of `device` as comparable bytes: headers without their CRCs,
    entry arrays without the GUIDs of new partitions."""
    header = read_device(device, sector_size, sector_size)
    entries_lba = int.from_bytes(header[72:80], "little")
    count = int.from_bytes(header[80:84], "little")
    backup_lba = int.from_bytes(header[32:40], "little")
    backup = read_device(device, backup_lba * sector_size, sector_size)
    backup_entries_lba = int.from_bytes(backup[72:80], "little")

    def masked_header(sector):
        return sector[:16] + sector[20:88]

    def masked_entries(lba):
        array = bytearray(read_device(device, lba * sector_size, count * 128))
        for number in new_numbers:
            assert any(array[(number - 1) * 128 + 16:(number - 1) * 128 + 32])
            array[(number - 1) * 128 + 16:(number - 1) * 128 + 32] = bytes(16)
        return bytes(array)

    assert backup_lba == FIX.device_size(device) // sector_size - 1
    return (masked_header(header), masked_entries(entries_lba), masked_header(backup),
            masked_entries(backup_entries_lba), backup_entries_lba)


def check_both_ways(attach, image, tmp_path, swap=None, sector_size=512, boot_flag_kept=False):
    """Apply the plan the old way and the new way on copies of `image`, and
    compare the results; returns the changes."""
    reference_image, python_image = tmp_path / "reference.img", tmp_path / "python.img"
    for copy in (reference_image, python_image):
        sh("cp", "--sparse=always", image, copy)
    reference, python = attach(reference_image, sector_size), attach(python_image, sector_size)

    label, partitions, sector_size_read = FIX.read_table(python)
    assert sector_size_read == sector_size
    changes = plan(python, label, partitions, sector_size, swap)
    assert FIX.write_directly(python, label, changes, sector_size)

    label, partitions, _ = the_old_way(reference)
    old_changes = plan(reference, label, partitions, sector_size, swap)
    assert old_changes == changes
    for change in changes:
        FIX.apply_change(reference, change)

    new_numbers = {change.number for change in changes if change.type}
    assert comparable_json(python, new_numbers) == comparable_json(reference, new_numbers)
    verify_clean(python, label)
    if label == "dos":
        assert read_device(python, 0, 512) == read_device(reference, 0, 512)
    else:
        python_mbr, reference_mbr = read_device(python, 0, 512), read_device(reference, 0, 512)
        if boot_flag_kept:                # sfdisk clears the protective entry's boot flag
            assert python_mbr[446] == 0x80 and reference_mbr[446] == 0
            python_mbr = python_mbr[:446] + python_mbr[447:]
            reference_mbr = reference_mbr[:446] + reference_mbr[447:]
        assert python_mbr == reference_mbr
        assert gpt_structures(python, sector_size, new_numbers) == \
            gpt_structures(reference, sector_size, new_numbers)
    return changes


def check_left_to_sfdisk(attach, image, swap=None, sector_size=512):
    device = attach(image, sector_size)
    before = read_device(device, 0, MIB)
    label, partitions, _ = FIX.read_table(device)
    changes = plan(device, label, partitions, sector_size, swap)
    assert changes
    assert not FIX.write_directly(device, label, changes, sector_size)
    assert read_device(device, 0, MIB) == before


# --------------------------------------------------------------------------
# MBR
# --------------------------------------------------------------------------

@pytest.mark.parametrize("swap", [None, (2, 64)])
def test_mbr_one_partition(loops, tmp_path, swap):
    image = tmp_path / "disk.img"
    sfdisk_image(image, 64 * MIB, "label: dos\nstart=2048, type=83, bootable\n")
    grow(image, 3 * GIB)
    changes = check_both_ways(loops, image, tmp_path, swap)
    assert [c.number for c in changes] == ([1, 2] if swap else [1])


@pytest.mark.parametrize("swap", [None, (3, 256)])
def test_mbr_boot_and_root(loops, tmp_path, swap):
    image = tmp_path / "disk.img"
    sfdisk_image(image, 200 * MIB, "label: dos\nlabel-id: 0x12345678\n"
                 "start=2048, size=65536, type=83, bootable\nstart=67584, type=83\n")
    poke(image, 0, b"\xeb\x63\x90" + b"boot code" * 40)      # boot code must survive
    grow(image, 5 * GIB)
    changes = check_both_ways(loops, image, tmp_path, swap)
    assert changes[0].number == 2


def test_mbr_beyond_1024_cylinders_and_odd_chs(loops, tmp_path):
    """CHS fields past cylinder 1023 and a table written with another
    geometry (16 heads, 63 sectors, as qemu gives virtio disks): both
    recomputed the way sfdisk does."""
    image = tmp_path / "disk.img"
    sfdisk_image(image, 64 * MIB, "label: dos\nstart=2048, size=32768, type=7\n"
                 "start=34816, type=83\n")
    for slot in range(2):
        poke(image, 446 + 16 * slot + 5, b"\x0f\xff")     # end head 15, end sector 63
    grow(image, 20 * GIB)
    check_both_ways(loops, image, tmp_path, (3, 512))


def test_mbr_4k_sectors(loops, tmp_path):
    image = empty_image(tmp_path / "disk.img", 64 * MIB)
    probe = loops(image, 4096)
    sh("sfdisk", "-q", probe, input="label: dos\nstart=256, type=83\n")
    sh("losetup", "-d", probe)
    grow(image, 2 * GIB)
    check_both_ways(loops, image, tmp_path, (2, 64), sector_size=4096)


def test_mbr_logical_partitions_are_left_to_sfdisk(loops, tmp_path):
    image = tmp_path / "disk.img"
    sfdisk_image(image, 100 * MIB, "label: dos\nstart=2048, size=20480, type=83\n"
                 "start=22528, type=5\nstart=24576, type=83\n")
    grow(image, GIB)
    check_left_to_sfdisk(loops, image)


def test_mbr_new_logical_swap_is_left_to_sfdisk(loops, tmp_path):
    image = tmp_path / "disk.img"
    sfdisk_image(image, 100 * MIB, "label: dos\nstart=2048, type=83\n")
    grow(image, GIB)
    check_left_to_sfdisk(loops, image, swap=(5, 64))


# --------------------------------------------------------------------------
# GPT
# --------------------------------------------------------------------------

@pytest.mark.parametrize("swap", [None, (2, 128)])
def test_gpt_debian_cloud_numbering(loops, tmp_path, swap):
    """Root is partition 1 but last on the disk, after 14 (BIOS boot) and 15
    (ESP); the disk grew, so the backup GPT sits in the middle."""
    image = tmp_path / "disk.img"
    sgdisk_image(image, 100 * MIB, "-n", "14:2048:+3M", "-t", "14:EF02", "-n", "15:0:+16M",
                 "-t", "15:EF00", "-c", "15:EFI System", "-n", "1:0:0", "-t", "1:8300")
    grow(image, 3 * GIB)
    changes = check_both_ways(loops, image, tmp_path, swap)
    assert changes[0].number == 1


def test_gpt_names_attributes_and_new_swap(loops, tmp_path):
    image = tmp_path / "disk.img"
    sgdisk_image(image, 64 * MIB, "-n", "1:2048:+1M", "-t", "1:EF02", "-c", "1:bios",
                 "-A", "1:set:0", "-n", "2:0:+8M", "-t", "2:EF00", "-c", "2:ESP",
                 "-A", "2:set:2", "-n", "3:0:0", "-t", "3:8300", "-c", "3:racine ünicode",
                 "-A", "3:set:60", "-A", "3:set:63")
    grow(image, 2 * GIB)
    check_both_ways(loops, image, tmp_path, (4, 100))


def test_gpt_short_table_and_first_lba_2048(loops, tmp_path):
    """8 entries and the first usable sector at 2048: sgdisk places the
    backup array right after the last usable sector, symmetric to it."""
    image = tmp_path / "disk.img"
    sfdisk_image(image, 50 * MIB, "label: gpt\nfirst-lba: 2048\ntable-length: 8\n"
                 "start=2048, size=20480, name=boot\nstart=22528, size=40000\n")
    grow(image, GIB)
    check_both_ways(loops, image, tmp_path, (3, 16))


def test_gpt_not_grown(loops, tmp_path):
    image = tmp_path / "disk.img"
    sgdisk_image(image, 200 * MIB, "-n", "1:2048:+50M", "-n", "2:0:+100M")
    check_both_ways(loops, image, tmp_path, (3, 16))


def test_gpt_protective_boot_flag_is_kept(loops, tmp_path):
    image = tmp_path / "disk.img"
    sgdisk_image(image, 64 * MIB, "-n", "1:2048:0")
    poke(image, 446, b"\x80")
    grow(image, GIB)
    check_both_ways(loops, image, tmp_path, boot_flag_kept=True)


def test_gpt_4k_sectors(loops, tmp_path):
    image = empty_image(tmp_path / "disk.img", 64 * MIB)
    probe = loops(image, 4096)
    sh("sgdisk", "-n", "1:256:+4M", "-t", "1:EF00", "-n", "2:0:0", probe)
    sh("losetup", "-d", probe)
    grow(image, 2 * GIB)
    check_both_ways(loops, image, tmp_path, (3, 32), sector_size=4096)


def test_gpt_hybrid_mbr_is_left_to_sgdisk(loops, tmp_path):
    image = tmp_path / "disk.img"
    sgdisk_image(image, 64 * MIB, "-n", "1:2048:+8M", "-t", "1:0700", "-n", "2:0:0")
    sh("sgdisk", "-h", "1", image)
    grow(image, GIB)
    check_left_to_sfdisk(loops, image)


@pytest.mark.parametrize("offset", [56, 100])
def test_gpt_damaged_or_odd_primary_is_left_to_sgdisk(loops, tmp_path, offset):
    """A primary header with a bad CRC (the disk GUID changed), or with bytes
    after its 92 that no tool writes."""
    image = tmp_path / "disk.img"
    sgdisk_image(image, 64 * MIB, "-n", "1:2048:+16M")
    poke(image, 512 + offset, b"\x01")
    check_left_to_sfdisk(loops, image)


# --------------------------------------------------------------------------
# What the Python writer refuses (sfdisk then decides, and says why)
# --------------------------------------------------------------------------

def mbr_sector(*entries):
    """Sector 0 with primary entries (number, start, size, type)."""
    sector = bytearray(512)
    sector[510:512] = b"\x55\xaa"
    for number, start, size, type_ in entries:
        offset = 446 + 16 * (number - 1)
        sector[offset:offset + 16] = FIX.mbr_entry(0, start, size, type_, FIX.CHS_GEOMETRY)
    return bytes(sector)


def test_mbr_writer_refuses_overlaps_and_what_it_does_not_know():
    sector = mbr_sector((1, 2048, 4096, 0x83), (2, 8192, 4096, 0x83))
    C = FIX.Change
    assert FIX.mbr_with_changes(sector, [C(1, 2048, 8192, None)], 100000) is None   # over 2
    assert FIX.mbr_with_changes(sector, [C(2, 8192, 100000, None)], 100000) is None  # past the end
    assert FIX.mbr_with_changes(sector, [C(2, 4096, 100, None)], 100000) is None    # other start
    assert FIX.mbr_with_changes(sector, [C(2, 12288, 100, "82")], 100000) is None   # slot in use
    assert FIX.mbr_with_changes(sector, [C(3, 12288, 100, "5")], 100000) is None    # extended
    assert FIX.mbr_with_changes(sector, [C(5, 12288, 100, "82")], 100000) is None   # logical
    assert FIX.mbr_with_changes(sector, [C(3, 10000, 100, "82")], 100000) is None   # inside 2
    grown = FIX.mbr_with_changes(sector, [C(2, 8192, 80000, None), C(3, 90000, 100, "82")], 100000)
    assert grown == mbr_sector((1, 2048, 4096, 0x83), (2, 8192, 80000, 0x83), (3, 90000, 100, 0x82))
    extended = mbr_sector((1, 2048, 4096, 0x83), (2, 8192, 4096, 0x05))
    assert FIX.mbr_with_changes(extended, [C(1, 2048, 5000, None)], 100000) is None
    odd_flag = bytearray(sector)
    odd_flag[446] = 0x01
    assert FIX.mbr_with_changes(bytes(odd_flag), [C(2, 8192, 5000, None)], 100000) is None


def test_gpt_writer_refuses_what_does_not_fit(tmp_path):
    image = tmp_path / "disk.img"
    sgdisk_image(image, 64 * MIB, "-n", "1:2048:+8M", "-n", "2:0:+8M")
    data = image.read_bytes()
    total = len(data) // 512

    def layout():
        return FIX.parse_gpt(data[:512], data[512:1024],
                             lambda lba, count: data[lba * 512:(lba + count) * 512], total, 512)

    C = FIX.Change
    start2 = 2048 + 16384
    assert layout() is not None
    assert FIX.gpt_with_changes(data[:512], layout(), [C(1, 2048, 20000, None)], total, 512) is None
    assert FIX.gpt_with_changes(data[:512], layout(), [C(2, start2, total, None)], total, 512) is None
    assert FIX.gpt_with_changes(data[:512], layout(), [C(3, 30000, 10, FIX.GPT_SWAP_TYPE)],
                                total, 512) is None      # inside partition 2
    assert FIX.gpt_with_changes(data[:512], layout(), [C(2, start2, 20000, FIX.GPT_SWAP_TYPE)],
                                total, 512) is None      # entry in use
    assert FIX.gpt_with_changes(data[:512], layout(), [C(129, 60000, 10, FIX.GPT_SWAP_TYPE)],
                                total, 512) is None      # no such entry
    writes = FIX.gpt_with_changes(data[:512], layout(), [C(2, start2, 40000, None)], total, 512)
    assert [lba for lba, _ in writes] == [total - 33, 1, 0]


# --------------------------------------------------------------------------
# The cached real test images (only their partition table areas are copied)
# --------------------------------------------------------------------------

REAL_IMAGE_PREFIXES = ("debian-bookworm-mbr-", "debian-bookworm-gpt-", "debian-bookworm-gpt-cloud-",
                       "debian-trixie-gpt-cloud-uefi-", "debian-trixie-gpt-xfs-",
                       "debian-trixie-mbr-nm-", "windows-mbr-", "windows-gpt-",
                       "windows-legacy-", "windows-complete-")


def cached_real_images():
    directory = CACHE_DIR / "images"
    found = {}
    if directory.is_dir():
        for path in sorted(directory.glob("*.img")):
            for prefix in REAL_IMAGE_PREFIXES:
                rest = path.name[len(prefix):]
                if path.name.startswith(prefix) and "-" not in rest:
                    found.setdefault(prefix, path)
    return found


def test_real_images_grown_both_ways(loops, tmp_path):
    images = cached_real_images()
    require(images, "no cached test images (built by the end-to-end tests)")
    checked = []
    for prefix, source in images.items():
        size = source.stat().st_size
        work = tmp_path / prefix
        work.mkdir()
        image = work / "table-area.img"
        with open(source, "rb") as reader, open(image, "wb") as writer:
            writer.truncate(size)
            for offset in (0, max(0, size - MIB)):      # the tables, at both ends
                reader.seek(offset)
                writer.seek(offset)
                writer.write(reader.read(MIB))
        grow(image, size + 2 * GIB)
        changes = check_both_ways(loops, image, work)
        assert changes and changes[0].type is None
        table = json.loads(sh("sfdisk", "--json", image).stdout)["partitiontable"]
        numbers = {HELPER._partition_number(str(image), p["node"]) for p in table["partitions"]}
        free = [n for n in range(2, 5 if table["label"] == "dos" else 129) if n not in numbers]
        if free:
            swap_work = work / "swap"
            swap_work.mkdir()
            check_both_ways(loops, image, swap_work, (free[0], 64))
        checked.append(prefix)
    print("checked:", " ".join(checked))
    assert checked
