"""snf-image-host.py copier: awkward sizes compared byte for byte, 1 GiB + 1
(sparse source, compared by hash), O_DIRECT really used on a loop device
(flags read from /proc/self/fdinfo), pipes delivering short reads, the final
short block, too-large images refused before writing, ENOSPC, and the MBR
synthesized for filesystem dumps."""

import gzip
import hashlib
import io
import os
import struct
import subprocess
import threading
from pathlib import Path

import pytest

from conftest import load_script, require_programs
from host_testlib import last_line, loop_device

host = load_script("snf-image-host.py")
MIB = 1024 * 1024
O_DIRECT = 0o40000


def fdinfo_flags(fd):
    for line in Path(f"/proc/self/fdinfo/{fd}").read_text().splitlines():
        if line.startswith("flags:"):
            return int(line.split()[1], 8)
    raise AssertionError("no flags in fdinfo")


COPY_MODES = [{"overlap": True}, {"overlap": False}, {"overlap": True, "writers": 4}]


@pytest.mark.parametrize("size", [0, 1, 511, 4095, 4096, 4097, 4 * MIB + 1])
@pytest.mark.parametrize("mode", COPY_MODES, ids=["overlap", "serial", "4-writers"])
def test_copy_awkward_sizes_byte_for_byte(tmp_path, size, mode):
    data = os.urandom(size)
    disk = tmp_path / "disk"
    disk.write_bytes(b"\xaa" * (8 * MIB))
    with host.DiskWriter(str(disk)) as writer:
        copied = host.copy_stream(io.BytesIO(data), writer, MIB, **mode)
        writer.sync()
    assert copied == size
    content = disk.read_bytes()
    assert len(content) == 8 * MIB
    assert content[:size] == data and content[size:] == b"\xaa" * (8 * MIB - size)


class TricklePipe:
    """A pipe fed by a thread in odd-sized chunks: reads come back short."""

    def __init__(self, data, chunk=1000):
        self.read_fd, write_fd = os.pipe()
        self.reader = io.FileIO(self.read_fd, "rb")

        def feed():
            with os.fdopen(write_fd, "wb", buffering=0) as out:
                for start in range(0, len(data), chunk):
                    out.write(data[start:start + chunk])

        self.thread = threading.Thread(target=feed, daemon=True)
        self.thread.start()


@pytest.mark.parametrize("mode", COPY_MODES, ids=["overlap", "serial", "4-writers"])
def test_copy_from_pipe_fills_whole_buffers(tmp_path, mode):
    data = os.urandom(3 * 65536 + 777)
    disk = tmp_path / "disk"
    disk.write_bytes(bytes(MIB))
    pipe = TricklePipe(data, chunk=333)
    writes = []

    class Recording(host.DiskWriter):
        def write(self, view, count):
            writes.append(count)
            super().write(view, count)

        def write_at(self, view, count, offset):
            writes.append(count)
            super().write_at(view, count, offset)

    with Recording(str(disk)) as writer:
        host.copy_stream(pipe.reader, writer, 65536, **mode)
        writer.sync()
    assert writes == [65536, 65536, 65536, 777]
    assert disk.read_bytes()[: len(data)] == data


def test_copy_one_gib_plus_one(tmp_path, site):
    """Through the real deploy path: sparse 1 GiB + 1 source, compared by hash."""
    size = 1024 * MIB + 1
    image = site.images / "big.img"
    with open(image, "wb") as handle:
        handle.truncate(size)
        for offset in (0, 333 * MIB + 5, size - 4097):
            handle.seek(offset)
            handle.write(os.urandom(4097))
    disk = tmp_path / "disk"
    with open(disk, "wb") as handle:
        handle.truncate(size + 3 * MIB)
    result = site.deploy("--disk", disk, "--img-id", "big.img", "--img-format", "diskdump", "--no-helper")
    assert result.returncode == 0, result.stderr.decode()
    assert os.path.getsize(disk) == size + 3 * MIB

    def digest(path, length):
        sha = hashlib.sha256()
        with open(path, "rb") as handle:
            left = length
            while left:
                chunk = handle.read(min(left, 8 * MIB))
                sha.update(chunk)
                left -= len(chunk)
        return sha.hexdigest()

    assert digest(disk, size) == digest(image, size)
    with open(disk, "rb") as handle:
        handle.seek(size)
        assert handle.read(3 * MIB) == bytes(3 * MIB)


@pytest.mark.root
def test_o_direct_really_used_on_loop_device(tmp_path):
    backing = tmp_path / "backing"
    backing.write_bytes(bytes(4 * MIB))
    data = os.urandom(2 * MIB + 4097)
    with loop_device(backing) as device:
        with host.DiskWriter(device) as writer:
            assert writer.is_block and writer.size == 4 * MIB and writer.alignment >= 512
            assert fdinfo_flags(writer.fd) & O_DIRECT, "disk not opened with O_DIRECT"
            seen = []
            original = writer._pwrite_all

            def spy(view, start, end, offset):
                if end > start:
                    seen.append((end - start, bool(fdinfo_flags(writer.fd) & O_DIRECT)))
                original(view, start, end, offset)

            writer._pwrite_all = spy
            host.copy_stream(io.BytesIO(data), writer, MIB, overlap=True)
            writer.sync()
        # full buffers go out with O_DIRECT; the short tail (4097 % 512 = 1 byte) without
        assert seen[0] == (MIB, True) and seen[1] == (MIB, True)
        tail = len(data) % writer.alignment
        assert seen[-1] == (tail, False)
        with open(device, "rb") as handle:
            assert handle.read(len(data)) == data


@pytest.mark.root
@pytest.mark.parametrize("writers", [1, 3])
def test_deploy_onto_loop_device_byte_for_byte(tmp_path, site, writers):
    site.write_config(COPY_WRITERS=writers, COPY_BUFFER_SIZE="256K")
    data = os.urandom(5 * MIB + 511)
    (site.images / "l.img").write_bytes(data)
    backing = tmp_path / "backing"
    backing.write_bytes(b"\x55" * (8 * MIB))
    with loop_device(backing) as device:
        result = site.deploy("--disk", device, "--img-id", "l.img", "--img-format", "diskdump", "--no-helper")
        assert result.returncode == 0, result.stderr.decode()
        with open(device, "rb") as handle:
            content = handle.read()
    assert content[: len(data)] == data and content[len(data):] == b"\x55" * (8 * MIB - len(data))


def test_parallel_writers_too_large_for_disk(tmp_path):
    disk = tmp_path / "disk"
    disk.write_bytes(bytes(MIB))
    with host.DiskWriter(str(disk)) as writer, pytest.raises(host.SnfError, match="does not fit"):
        host.copy_stream(io.BytesIO(os.urandom(3 * MIB)), writer, 256 * 1024, writers=3)
    assert os.path.getsize(disk) == MIB


def test_image_larger_than_disk_refused_before_writing(tmp_path, site):
    (site.images / "big.img").write_bytes(os.urandom(3 * MIB))
    disk = tmp_path / "disk"
    disk.write_bytes(b"\x11" * (2 * MIB))
    result = site.deploy("--disk", disk, "--img-id", "big.img", "--img-format", "diskdump", "--no-helper")
    assert result.returncode == 1
    line = last_line(result)
    assert "larger than disk" in line and "did not complete" in line
    assert disk.read_bytes() == b"\x11" * (2 * MIB)


def test_compressed_image_larger_than_disk_fails_plainly(tmp_path, site):
    (site.images / "big.img.gz").write_bytes(gzip.compress(os.urandom(3 * MIB)))
    disk = tmp_path / "disk"
    disk.write_bytes(bytes(2 * MIB))
    result = site.deploy("--disk", disk, "--img-id", "big.img.gz", "--img-format", "diskdump", "--no-helper")
    assert result.returncode == 1 and "does not fit" in last_line(result)
    assert os.path.getsize(disk) == 2 * MIB


@pytest.mark.root
def test_enospc_is_a_clear_error(tmp_path, site):
    require_programs("mkfs.ext2", "mount", "umount")
    fs_image = tmp_path / "fs.img"
    with open(fs_image, "wb") as handle:
        handle.truncate(6 * MIB)
    subprocess.run(["mkfs.ext2", "-q", "-F", str(fs_image)], check=True)
    mount_point = tmp_path / "mnt"
    mount_point.mkdir()
    with loop_device(fs_image) as device:
        subprocess.run(["mount", device, str(mount_point)], check=True)
        try:
            disk = mount_point / "disk"
            with open(disk, "wb") as handle:
                handle.truncate(64 * MIB)    # sparse: larger than the filesystem
            (site.images / "i.img").write_bytes(os.urandom(20 * MIB))
            result = site.deploy("--disk", disk, "--img-id", "i.img", "--img-format", "diskdump",
                                 "--no-helper")
            assert result.returncode == 1
            assert "is full" in last_line(result) and "did not complete" in last_line(result)
            assert os.path.getsize(disk) == 64 * MIB
        finally:
            subprocess.run(["umount", str(mount_point)], check=False)


@pytest.mark.parametrize("fmt, ptype", [("extdump", 0x83), ("ntfsdump", 0x07)])
@pytest.mark.parametrize("compressed", [False, True])
def test_filesystem_dump_gets_mbr(tmp_path, site, fmt, ptype, compressed):
    boot_code = host.find_mbr_boot_code("")
    data = os.urandom(3 * MIB + 512)
    name = "fs.img"
    (site.images / name).write_bytes(gzip.compress(data) if compressed else data)
    disk = tmp_path / "disk"
    disk.write_bytes(b"\x77" * (8 * MIB))
    result = site.deploy("--disk", disk, "--img-id", name, "--img-format", fmt, "--no-helper")
    assert result.returncode == 0, result.stderr.decode()
    content = disk.read_bytes()
    sector = content[:512]
    assert sector[:440] == boot_code and len(boot_code) == 440
    assert struct.unpack("<I", sector[440:444])[0] != 0
    assert sector[510:512] == b"\x55\xaa"
    entry = sector[446:462]
    assert entry[0] == 0x80 and entry[4] == ptype
    start, count = struct.unpack("<II", entry[8:16])
    assert start == 2048 and count == len(data) // 512
    assert sector[462:510] == bytes(48)                 # one partition only
    assert content[512:MIB] == bytes(MIB - 512)
    assert content[MIB:MIB + len(data)] == data


def test_mbr_chs_and_random_signature():
    code = bytes(440)
    first = host.build_mbr(code, "extdump", 10 * MIB)
    second = host.build_mbr(code, "extdump", 10 * MIB)
    assert first[440:444] != second[440:444]
    assert first[446 + 1:446 + 4] == bytes((32, 33, 0))   # LBA 2048 = C0/H32/S33
    huge = host.build_mbr(code, "ntfsdump", 100 * 1024 * MIB)
    assert huge[446 + 5:446 + 8] == bytes((254, 255, 255))


def _mapping_flags(address):
    """VmFlags of the mapping of this process that contains address."""
    current = None
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and not head.endswith(":"):
            start, end = (int(part, 16) for part in head.split("-"))
            current = start <= address < end
        elif head == "VmFlags:" and current:
            return line.split()[1:]
    raise AssertionError(f"no mapping contains {address:#x}")


@pytest.mark.parametrize("size", [4096, MIB, 4 * MIB, 6 * MIB])
def test_copy_buffer_is_aligned_private_and_asks_for_huge_pages(size):
    """O_DIRECT needs page alignment; the buffer asks for transparent huge pages
    (VM_HUGEPAGE, 'hg' in VmFlags) when the kernel has THP, and is not shared."""
    import ctypes
    buffer = host.copy_buffer(size)
    try:
        assert len(buffer) == size
        anchor = ctypes.c_char.from_buffer(buffer)
        address = ctypes.addressof(anchor)
        del anchor
        assert address % 4096 == 0
        flags = _mapping_flags(address)
        assert "sh" not in flags
        if Path("/sys/kernel/mm/transparent_hugepage/enabled").exists():
            assert "hg" in flags
        buffer[:] = b"\xa5" * size      # writable, and whole
        assert buffer[size - 1] == 0xA5
    finally:
        buffer.close()


def test_no_helper_deploy_needs_no_work_directory(tmp_path, site):
    """The work directory holds the helper's floppy: `deploy --no-helper` creates
    none (an unusable TEMP_DIR does not matter), and the data still lands."""
    data = os.urandom(MIB + 4096)
    (site.images / "w.img").write_bytes(data)
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    site.write_config(TEMP_DIR=blocker / "run")
    disk = tmp_path / "disk"
    disk.write_bytes(bytes(2 * MIB))
    result = site.deploy("--disk", disk, "--img-id", "w.img", "--img-format", "diskdump", "--no-helper")
    assert result.returncode == 0, last_line(result)
    assert disk.read_bytes()[:len(data)] == data
    assert blocker.read_text() == ""
