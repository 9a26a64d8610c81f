"""snf-image-host.py sparse copy: only the image's data is written, its zero
ranges (file holes and all-zero buffers) are zeroed by the disk's cheapest
means, and a reinstall over a disk full of old random bytes leaves none of
them in the image's range (loop devices and file disks, compared whole)."""

import gzip
import hashlib
import io
import mmap
import os
import subprocess

import pytest
from hypothesis import given, settings, strategies as st

from conftest import load_script
from host_testlib import last_line, loop_device

host = load_script("snf-image-host.py")
MIB = 1024 * 1024
KIB = 1024


def write_sparse_image(path, size):
    """Data runs, explicit zero runs and real holes, ending on an odd byte count."""
    layout = []
    with open(path, "wb") as handle:
        handle.truncate(size)
        for offset, length in ((0, 5000), (64 * KIB, 3 * 64 * KIB + 17), (2 * MIB + 4096, 700 * KIB),
                               (7 * MIB, MIB), (size - 3000, 3000)):
            handle.seek(offset)
            handle.write(os.urandom(length))
            layout.append((offset, length))
        handle.seek(4 * MIB)
        handle.write(bytes(2 * MIB))          # zeros stored as data: found by the scanner
    return layout


def random_file(path, size):
    with open(path, "wb") as handle:
        for _ in range(size // MIB):
            handle.write(os.urandom(MIB))


def same_range(path_a, path_b, length):
    def digest(path):
        sha = hashlib.sha256()
        with open(path, "rb") as handle:
            left = length
            while left:
                chunk = handle.read(min(left, 4 * MIB))
                assert chunk, f"{path} is shorter than {length}"
                sha.update(chunk)
                left -= len(chunk)
        return sha.hexdigest()
    return digest(path_a) == digest(path_b)


def zeroing_lines(result):
    return [line for line in result.stderr.decode().splitlines() if "zero ranges are skipped" in line]


@pytest.mark.root
@pytest.mark.parametrize("mode", [{}, {"COPY_WRITERS": 3}, {"COPY_OVERLAP": "no"},
                                  {"COPY_BUFFER_SIZE": "256K"}],
                         ids=["default", "3-writers", "serial", "small-buffers"])
def test_reinstall_over_random_loop_device_leaves_no_old_byte(tmp_path, site, mode):
    site.write_config(**mode)
    size = 16 * MIB + 777
    image = site.images / "sparse.img"
    write_sparse_image(image, size)
    backing = tmp_path / "backing"
    random_file(backing, 24 * MIB)
    old = backing.read_bytes()
    with loop_device(backing) as device:
        result = site.deploy("--disk", device, "--img-id", "sparse.img", "--img-format", "diskdump",
                             "--no-helper")
        assert result.returncode == 0, result.stderr.decode()
        assert same_range(device, image, size)
        with open(device, "rb") as handle:
            handle.seek(size)
            assert handle.read() == old[size:]      # past the image: untouched
    lines = zeroing_lines(result)
    assert len(lines) == 1 and "BLKZEROOUT" in lines[0]


@pytest.mark.parametrize("compressed", [False, True])
def test_reinstall_over_random_file_disk_punches_holes(tmp_path, site, compressed):
    size = 16 * MIB + 777
    image = tmp_path / "sparse.img"
    write_sparse_image(image, size)
    name = "sparse.img.gz" if compressed else "sparse.img"
    if compressed:       # a stream: the zeros are found in the buffers, not as holes
        (site.images / name).write_bytes(gzip.compress(image.read_bytes(), compresslevel=1))
    else:
        os.link(image, site.images / name)
    disk = tmp_path / "disk"
    random_file(disk, 20 * MIB)
    result = site.deploy("--disk", disk, "--img-id", name, "--img-format", "diskdump", "--no-helper")
    assert result.returncode == 0, result.stderr.decode()
    assert os.path.getsize(disk) == 20 * MIB
    assert same_range(disk, image, size)
    lines = zeroing_lines(result)
    assert len(lines) == 1 and "hole punching" in lines[0]
    # the zero ranges are holes now: far fewer blocks than the 20 MiB of random data
    assert os.stat(disk).st_blocks * 512 < 12 * MIB


@pytest.mark.root
def test_filesystem_dump_over_random_loop_device(tmp_path, site):
    """The synthesized MBR and the 1 MiB gap before the filesystem come first;
    the dump's zero ranges are zeroed at their shifted offsets."""
    size = 16 * MIB
    image = site.images / "fs.img"
    write_sparse_image(image, size)
    backing = tmp_path / "backing"
    random_file(backing, 20 * MIB)
    with loop_device(backing) as device:
        result = site.deploy("--disk", device, "--img-id", "fs.img", "--img-format", "extdump",
                             "--no-helper")
        assert result.returncode == 0, result.stderr.decode()
        with open(device, "rb") as handle:
            content = handle.read(MIB + size)
    assert content[512:MIB] == bytes(MIB - 512)
    assert content[MIB:] == image.read_bytes()


def test_sparse_copy_can_be_turned_off(tmp_path, site):
    site.write_config(SPARSE_COPY="no")
    size = 8 * MIB + 1
    image = site.images / "s.img"
    write_sparse_image(image, size)
    disk = tmp_path / "disk"
    random_file(disk, 10 * MIB)
    result = site.deploy("--disk", disk, "--img-id", "s.img", "--img-format", "diskdump", "--no-helper")
    assert result.returncode == 0, result.stderr.decode()
    assert zeroing_lines(result) == []
    assert same_range(disk, image, size)
    assert os.stat(disk).st_blocks * 512 >= 10 * MIB      # every byte was written


def test_sparse_image_checksum_covers_the_holes(tmp_path, site):
    size = 8 * MIB + 100
    image = site.images / "c.img"
    write_sparse_image(image, size)
    digest = hashlib.sha256(image.read_bytes()).hexdigest()
    (site.images / "c.img.sha256").write_text(f"{digest}  c.img\n")
    disk = tmp_path / "disk"
    random_file(disk, 10 * MIB)
    result = site.deploy("--disk", disk, "--img-id", "c.img", "--img-format", "diskdump", "--no-helper")
    assert result.returncode == 0, result.stderr.decode()
    assert same_range(disk, image, size)
    wrong = hashlib.sha256(image.read_bytes()[:-1] + b"\1").hexdigest()
    (site.images / "c.img.sha256").write_text(f"{wrong}  c.img\n")
    result = site.deploy("--disk", disk, "--img-id", "c.img", "--img-format", "diskdump", "--no-helper")
    assert result.returncode == 1 and "checksum mismatch" in last_line(result)


def test_image_larger_than_disk_with_holes_fails_plainly(tmp_path):
    """A hole past the disk's end is refused like data (no silent truncation)."""
    image = tmp_path / "big.img"
    with open(image, "wb") as handle:
        handle.write(os.urandom(4096))
        handle.truncate(8 * MIB)
    disk = tmp_path / "disk"
    random_file(disk, 2 * MIB)
    with open(image, "rb", buffering=0) as source, host.DiskWriter(str(disk)) as writer:
        reader = host.HoleSkippingFile(source, 8 * MIB)
        with pytest.raises(host.SnfError, match="does not fit"):
            host.copy_stream(reader, writer, MIB, sparse=True)


def test_hole_skipping_file_reports_extents(tmp_path):
    path = tmp_path / "f"
    with open(path, "wb") as handle:
        handle.truncate(10 * MIB + 5)
        handle.seek(MIB)
        handle.write(b"x" * 8192)
    with open(path, "rb", buffering=0) as handle:
        reader = host.HoleSkippingFile(handle, 10 * MIB + 5)
        assert reader.at_hole() and reader.skip_hole() == MIB
        assert not reader.at_hole()
        buffer = bytearray(MIB)
        assert reader.readinto(memoryview(buffer)) == 8192 and buffer[:8192] == b"x" * 8192
        hole = reader.skip_hole()
        assert hole == (10 * MIB + 5 - MIB - 8192) // 4096 * 4096
        tail = reader.readinto(memoryview(buffer))
        assert tail == 10 * MIB + 5 - MIB - 8192 - hole and buffer[:tail] == bytes(tail)
        assert reader.readinto(memoryview(buffer)) == 0


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(1, 5)), min_size=1, max_size=12),
       st.integers(0, 4095))
def test_zero_scanner_runs_cover_the_buffer(pattern, poke):
    """Runs of ZERO_CHUNK: data runs hold every non-zero byte, zero runs none."""
    chunk = host.ZERO_CHUNK
    size = sum(count for _, count in pattern) * chunk
    with mmap.mmap(-1, size) as buffer:
        position = 0
        for data, count in pattern:
            if data:    # one non-zero byte somewhere in each chunk, the rest zeros
                for index in range(count):
                    buffer[position + index * chunk + poke % chunk] = 1 + poke % 255
            position += count * chunk
        view = memoryview(buffer)
        runs = host.ZeroScanner().runs(view, size)
        view.release()
        assert runs[0][0] == 0 and runs[-1][1] == size
        for (_, end, kind), (start, _, next_kind) in zip(runs, runs[1:]):
            assert end == start and kind != next_kind
        for start, end, data in runs:
            assert (buffer[start:end] != bytes(end - start)) == data
            if data:
                assert all(buffer[s:s + chunk] != bytes(chunk) for s in range(start, end, chunk))


def test_zero_writes_and_read_back_sample(tmp_path):
    """The last-resort means and the read-back check, on a real file."""
    disk = tmp_path / "disk"
    random_file(disk, 4 * MIB)
    with host.DiskWriter(str(disk)) as writer:
        assert not writer._reads_zeros(MIB, 2 * MIB)
        writer._write_zeros(MIB, 2 * MIB + 4096)
        assert writer._reads_zeros(MIB, 2 * MIB + 4096)
    content = disk.read_bytes()
    assert content[MIB:3 * MIB + 4096] == bytes(2 * MIB + 4096)
    assert content[:MIB] != bytes(MIB) and content[3 * MIB + 4096:] != bytes(MIB - 4096)


def test_dense_copy_writes_whole_buffers(tmp_path):
    """Dense data is not split: one write per buffer, as without sparse copy."""
    data = os.urandom(4 * MIB)
    disk = tmp_path / "disk"
    disk.write_bytes(bytes(4 * MIB))
    writes = []

    class Recording(host.DiskWriter):
        def write_at(self, view, count, offset):
            writes.append((offset, count))
            super().write_at(view, count, offset)

    with Recording(str(disk)) as writer:
        host.copy_stream(io.BytesIO(data), writer, MIB, sparse=True)
    assert writes == [(n * MIB, MIB) for n in range(4)]
    assert disk.read_bytes() == data


@pytest.mark.root
def test_block_device_zeroing_is_blkzeroout(tmp_path):
    backing = tmp_path / "backing"
    random_file(backing, 4 * MIB)
    with loop_device(backing) as device:
        with host.DiskWriter(device) as writer:
            writer.zero_range(MIB, 2 * MIB)
            assert writer.zeroers[0][0] == "BLKZEROOUT"
        subprocess.run(["sync"], check=True)
        with open(device, "rb") as handle:
            content = handle.read()
    assert content[MIB:3 * MIB] == bytes(2 * MIB)
    assert content[:MIB] != bytes(MIB) and content[3 * MIB:] != bytes(MIB)


@pytest.mark.parametrize("size", [8 * MIB, 8 * MIB + 100])
def test_image_ending_in_a_hole(tmp_path, site, size):
    """The last hole reaches the end (aligned or not): the copy ends, the range is zeros."""
    image = site.images / "h.img"
    with open(image, "wb") as handle:
        handle.write(os.urandom(12345))
        handle.truncate(size)
    disk = tmp_path / "disk"
    random_file(disk, 10 * MIB)
    result = site.deploy("--disk", disk, "--img-id", "h.img", "--img-format", "diskdump", "--no-helper",
                         timeout=60)
    assert result.returncode == 0, result.stderr.decode()
    assert same_range(disk, image, size)
