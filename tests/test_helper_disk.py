"""The helper's disk inspection on real small disk images made with sfdisk
and mkfs: partition tables as the helper reads them (in Python, checked against
sfdisk --json; blkid for file systems),
the partition to grow (MBR primary/extended/logical, GPT), and OS / root
partition auto-detection, which mounts candidate partitions read-only (root:
each partition is attached as a read-only loop device with --offset)."""

import contextlib
import subprocess

import pytest

from conftest import load_script, require_programs, require_root, write_tree

helper = load_script("snf-image-helper.py", "snf_image_helper")

LINUX_GUID = "0FC63DAF-8483-4772-8E79-3D69D8477DE4"
EFI_GUID = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"
MIB = 1024 * 1024


def make_filesystem(directory, kind, size_mib, files):
    """A file system image of `kind` holding `files` ({path: text}), made without mounting
    where the tool allows it (ext4 -d); vfat is filled through a loop mount (root)."""
    image = directory / f"fs-{kind}-{len(list(directory.iterdir()))}.img"
    content = directory / f"content-{image.stem}"
    content.mkdir()
    write_tree(content, files)
    if kind == "ext4":
        subprocess.run(["mkfs.ext4", "-q", "-F", "-d", str(content), str(image), f"{size_mib}M"], check=True)
    elif kind == "vfat":
        subprocess.run(["truncate", "-s", f"{size_mib}M", str(image)], check=True)
        subprocess.run(["mkfs.vfat", str(image)], check=True, stdout=subprocess.DEVNULL)
        if files:
            mount_point = directory / f"mnt-{image.stem}"
            mount_point.mkdir()
            subprocess.run(["mount", "-o", "loop", str(image), str(mount_point)], check=True)
            try:
                subprocess.run(["cp", "-r", f"{content}/.", str(mount_point)], check=True)
            finally:
                subprocess.run(["umount", str(mount_point)], check=True)
    else:
        raise ValueError(kind)
    return image


def make_disk(directory, label, partitions, size_mib=64, name="disk.img"):
    """A disk image: `partitions` = [(number, start_mib or None, size_mib, type, fs image or None)]."""
    disk = directory / name
    subprocess.run(["truncate", "-s", f"{size_mib}M", str(disk)], check=True)
    script = [f"label: {label}"]
    for number, start, size, kind, _ in partitions:
        start_text = f"start={start * 2048}, " if start is not None else ""
        script.append(f"{disk}{number} : {start_text}size={size}MiB, type={kind}")
    subprocess.run(["sfdisk", "-q", str(disk)], input="\n".join(script) + "\n", text=True, check=True)
    table = helper.read_partition_table(str(disk), probe_filesystems=False)
    starts = {p["number"]: p["start"] for p in table["partitions"]}
    for number, _, _, _, filesystem in partitions:
        if filesystem is not None:
            subprocess.run(["dd", f"if={filesystem}", f"of={disk}", "bs=1M", "conv=notrunc,sparse",
                            f"seek={starts[number] * 512}", "oflag=seek_bytes", "status=none"], check=True)
    return str(disk)


@pytest.fixture
def programs():
    require_programs("sfdisk", "blkid", "mkfs.ext4", "mkfs.vfat")


def test_mbr_with_extended_and_logicals(tmp_path, programs):
    ext4 = make_filesystem(tmp_path, "ext4", 8, {"hello": "x"})
    disk = make_disk(tmp_path, "dos", [(1, 1, 8, "83", ext4), (2, None, 30, "5", None),
                                       (5, None, 8, "83", ext4), (6, None, 8, "82", None)])
    table = helper.read_partition_table(disk)
    assert table["label"] == "dos" and table["sector_size"] == 512
    assert [(p["number"], p["type"], p["fstype"]) for p in table["partitions"]] == [
        (1, "83", "ext4"), (2, "5", None), (5, "83", "ext4"), (6, "82", None)]
    assert table["partitions"][0]["start"] == 2048 and table["partitions"][0]["size"] == 8 * 2048
    assert helper.partition_to_resize(table) == 6


def test_mbr_primary_after_extended_is_grown(tmp_path, programs):
    disk = make_disk(tmp_path, "dos", [(1, 1, 8, "83", None), (2, None, 20, "f", None),
                                       (3, 40, 8, "83", None), (5, None, 8, "83", None)])
    table = helper.read_partition_table(disk)
    assert [p["number"] for p in table["partitions"]] == [1, 2, 3, 5]
    assert helper.partition_to_resize(table) == 3


def test_gpt_numbers_not_in_disk_order_and_grown_disk(tmp_path, programs):
    ext4 = make_filesystem(tmp_path, "ext4", 8, {})
    disk = make_disk(tmp_path, "gpt", [(3, 1, 8, LINUX_GUID, ext4), (1, None, 8, helper.GPT_MS_BASIC_DATA, None)])
    # as after the copy onto a bigger Ganeti disk: the backup GPT is no longer at the end
    subprocess.run(["truncate", "-s", "100M", disk], check=True)
    table = helper.read_partition_table(disk)
    assert table["label"] == "gpt"
    assert [(p["number"], p["type"], p["fstype"]) for p in table["partitions"]] == [
        (1, helper.GPT_MS_BASIC_DATA, None), (3, LINUX_GUID, "ext4")]
    assert table["partitions"][1]["start"] == 2048
    assert helper.partition_to_resize(table) == 1        # it ends last (upstream took 3)


def test_no_table_and_empty_table(tmp_path, programs):
    blank = tmp_path / "blank.img"
    subprocess.run(["truncate", "-s", "8M", str(blank)], check=True)
    assert helper.read_partition_table(str(blank)) is None
    empty = make_disk(tmp_path, "dos", [], name="empty.img")
    table = helper.read_partition_table(empty)
    assert table["label"] == "dos" and table["partitions"] == []
    assert helper.partition_to_resize(table) is None


def test_unreadable_disk_is_one_line_error(tmp_path, programs):
    with pytest.raises(helper.HelperError) as caught:
        helper.read_partition_table(str(tmp_path / "missing.img"))
    assert "Cannot read the partition table" in str(caught.value) and "\n" not in str(caught.value)


# -- detection (mounts, root) -------------------------------------------------------

@contextlib.contextmanager
def partition_loops(disk):
    """partition_path for detect_image_properties: each partition as a read-only loop device."""
    table = helper.read_partition_table(disk, probe_filesystems=False)
    loops = []

    def partition_path(_disk, number):
        partition = next(p for p in table["partitions"] if p["number"] == number)
        loop = subprocess.run(
            ["losetup", "-f", "--show", "-r", "--offset", str(partition["start"] * 512),
             "--sizelimit", str(partition["size"] * 512), disk],
            check=True, capture_output=True, text=True).stdout.strip()
        loops.append(loop)
        return loop
    try:
        yield partition_path
    finally:
        for loop in loops:
            subprocess.run(["losetup", "-d", loop], check=False)


def detect(tmp_path, disk, monkeypatch):
    monkeypatch.delenv("SNF_IMAGE_MONITOR", raising=False)
    monkeypatch.setattr(helper, "load_modules", lambda *names: None)   # the host kernel has them
    scratch = tmp_path / "scratch"
    scratch.mkdir(exist_ok=True)
    with partition_loops(disk) as partition_path:
        result = helper.detect_image_properties(disk, helper.read_partition_table(disk), str(scratch),
                                                partition_path=partition_path)
    assert list(scratch.iterdir()) == []        # every mount point removed
    return result


@pytest.fixture
def rooted(programs):
    require_root()
    require_programs("losetup", "mount", "umount")


@pytest.mark.root
def test_detect_linux_root_skipping_boot_and_swap(tmp_path, rooted, monkeypatch, capsys):
    boot = make_filesystem(tmp_path, "ext4", 8, {"vmlinuz": "k"})
    root = make_filesystem(tmp_path, "ext4", 8, {"etc/fstab": "UUID=x / ext4 defaults 0 1\n"})
    disk = make_disk(tmp_path, "dos", [(1, 1, 8, "83", boot), (2, None, 8, "82", None),
                                       (3, None, 8, "83", root)])
    assert detect(tmp_path, disk, monkeypatch) == ("linux", 3)


@pytest.mark.root
def test_detect_linux_after_efi_partition_on_gpt(tmp_path, rooted, monkeypatch, capsys):
    efi = make_filesystem(tmp_path, "vfat", 8, {})
    root = make_filesystem(tmp_path, "ext4", 8, {"etc/fstab": "#\n"})
    disk = make_disk(tmp_path, "gpt", [(1, 1, 8, EFI_GUID, efi), (2, None, 8, LINUX_GUID, root)])
    assert detect(tmp_path, disk, monkeypatch) == ("linux", 2)
    assert "Ignoring device" in capsys.readouterr().err     # the EFI vfat is not a Linux root


def test_classify_windows_root(tmp_path):
    # The Windows branch after the mount (the host kernel here has neither
    # vfat nor NTFS; the helper mounts NTFS with lowntfs-3g ignore_case).
    assert helper.classify_root(str(tmp_path), "windows") is None
    (tmp_path / "WINDOWS" / "system32" / "CONFIG").mkdir(parents=True)
    assert helper.classify_root(str(tmp_path), "windows") is None      # no SYSTEM hive
    (tmp_path / "WINDOWS" / "system32" / "CONFIG" / "system").write_bytes(b"")
    assert helper.classify_root(str(tmp_path), "windows") == "windows"   # no SOFTWARE: NT version unknown
    assert helper.classify_root(str(tmp_path), "linux") is None
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "fstab").write_text("")
    assert helper.classify_root(str(tmp_path), "linux") == "linux"
    assert helper.classify_root(str(tmp_path), "freebsd") == "freebsd"


@pytest.mark.root
def test_detect_nothing(tmp_path, rooted, monkeypatch, capsys):
    data = make_filesystem(tmp_path, "ext4", 8, {"data": "x"})
    disk = make_disk(tmp_path, "dos", [(1, 1, 8, "83", None), (2, None, 8, "83", data),
                                       (3, None, 8, "7", data)])
    assert detect(tmp_path, disk, monkeypatch) == (None, None)
    err = capsys.readouterr().err
    assert "Unable to determine the file system of" in err      # unformatted partition 1
    assert "not a windows file system" in err                   # ext4 in an NTFS-typed slot


@pytest.mark.root
def test_detect_bsd_slice_without_mounting(tmp_path, rooted, monkeypatch):
    root = make_filesystem(tmp_path, "ext4", 8, {"etc/fstab": ""})
    disk = make_disk(tmp_path, "dos", [(1, 1, 8, "a6", None), (2, None, 8, "83", root)])
    assert detect(tmp_path, disk, monkeypatch) == ("openbsd", 1)


@pytest.mark.parametrize("layout", [
    "label: dos\nlabel-id: 0x12345678\n2048,40M,83,*\n,8M,c\n",
    "label: dos\n2048,16M,83\n,,5\n,8M,82\n,8M,83\n,,7\n",                # logicals, chained EBRs
    "label: dos\n,,f\n,8M,83\n",                                           # LBA extended first
    "label: gpt\nsize=16M, type=U, name=\"EFI system\"\nsize=8M, type=L, name=root\n,8M,S\n",
    "label: gpt\nfirst-lba: 2048\n\n\n,8M,L\n",                            # GPT numbering with holes
])
def test_partition_tables_read_in_python_as_sfdisk_reads_them(tmp_path, layout):
    require_programs("sfdisk")
    disk = tmp_path / "disk.img"
    subprocess.run(["truncate", "-s", "64M", str(disk)], check=True)
    if "\n\n\n" in layout:
        head, _, line = layout.partition("\n\n\n")
        subprocess.run(["sfdisk", "-q", str(disk)], input=head + "\n", text=True, check=True)
        subprocess.run(["sfdisk", "-q", "-N", "3", str(disk)], input=line, text=True, check=True)
    else:
        subprocess.run(["sfdisk", "-q", str(disk)], input=layout, text=True, check=True)
    subprocess.run(["truncate", "-s", "96M", str(disk)], check=True)    # a grown disk
    assert helper._read_partition_table_directly(str(disk)) is not None
    expected = helper.sfdisk_partition_table(str(disk))
    expected["partitions"].sort(key=lambda partition: partition["number"])
    assert helper.read_partition_table(str(disk), probe_filesystems=False) == expected


@pytest.mark.parametrize("damage", ["gpt header crc", "ebr loop", "boot flag"])
def test_unusual_partition_tables_are_left_to_sfdisk(tmp_path, damage):
    require_programs("sfdisk")
    disk = tmp_path / "disk.img"
    subprocess.run(["truncate", "-s", "64M", str(disk)], check=True)
    layout = "label: gpt\n,8M,L\n" if damage.startswith("gpt") else "label: dos\n2048,8M,83\n,,5\n,8M,83\n"
    subprocess.run(["sfdisk", "-q", str(disk)], input=layout, text=True, check=True)
    with open(disk, "r+b") as handle:
        if damage == "gpt header crc":
            handle.seek(512 + 16)
            handle.write(b"\0\0\0\0")
        elif damage == "ebr loop":          # the first EBR links to itself
            table = helper.sfdisk_partition_table(str(disk))
            extended = next(p for p in table["partitions"] if p["number"] == 2)
            handle.seek(extended["start"] * 512 + 446 + 16)
            handle.write(bytes([0, 0, 0, 0, 5, 0, 0, 0]) + (0).to_bytes(4, "little") + (2048).to_bytes(4, "little"))
        else:
            handle.seek(446)
            handle.write(b"\x12")
    assert helper._read_partition_table_directly(str(disk)) is None
