"""snf-image-host.py: disk images in qemu's formats under img_format diskdump
(detected from the header; a qcow2 written by the copier through real
qemu-img's map of it, the other formats by real qemu-img convert), images that
would make qemu read other files refused before qemu-img opens them, corrupt
and truncated images, and zstd/xz/gzip streams decompressed by their programs."""

import gzip
import hashlib
import os
import shutil
import struct
import subprocess

import pytest
from hypothesis import given, settings, strategies as st

from conftest import load_script, require_programs
from host_testlib import last_line, loop_device

MIB = 1024 * 1024
host = load_script("snf-image-host.py")


@pytest.fixture(autouse=True)
def _tools():
    require_programs("qemu-img")


def raw_with_data(path, size):
    with open(path, "wb") as handle:
        handle.truncate(size)
        for offset in (0, 3 * MIB + 4096, size - 70000):
            handle.seek(offset)
            handle.write(os.urandom(70000))


def qemu_img(*args):
    subprocess.run(["qemu-img", *map(str, args)], check=True, capture_output=True)


def random_file(path, size):
    with open(path, "wb") as handle:
        for _ in range(size // MIB):
            handle.write(os.urandom(MIB))


def recording_qemu_img(site, tmp_path):
    """QEMU_IMG pointing at a wrapper that logs each call, then runs the real qemu-img."""
    log = tmp_path / "qemu-img.calls"
    wrapper = tmp_path / "qemu-img-recording"
    wrapper.write_text(f'#!/bin/sh\necho "$1" >> {log}\nexec {shutil.which("qemu-img")} "$@"\n')
    wrapper.chmod(0o755)
    site.write_config(QEMU_IMG=wrapper)
    return log


def deploy(site, disk, name):
    return site.deploy("--disk", disk, "--img-id", name, "--img-format", "diskdump", "--no-helper")


@pytest.mark.root
def test_qcow2_over_random_loop_device(tmp_path, site):
    size = 12 * MIB
    raw = tmp_path / "raw"
    raw_with_data(raw, size)
    qemu_img("convert", "-f", "raw", "-O", "qcow2", raw, site.images / "disk.img")   # name says nothing
    backing = tmp_path / "backing"
    random_file(backing, 16 * MIB)
    old = backing.read_bytes()
    calls = recording_qemu_img(site, tmp_path)
    with loop_device(backing) as device:
        result = deploy(site, device, "disk.img")
        assert result.returncode == 0, result.stderr.decode()
        with open(device, "rb") as handle:
            content = handle.read()
    assert content[:size] == raw.read_bytes()
    assert content[size:] == old[size:]
    log = result.stderr.decode()
    assert "qcow2 disk image (from its header)" in log
    assert "(100.0%)" in log and "image-copy-progress" in log
    assert calls.read_text().split() == ["info", "check", "map"]     # written by the copier, by its map


def qemu_io(image, *commands):
    argv = ["qemu-io", "-f", "qcow2"]
    for command in commands:
        argv += ["-c", command]
    subprocess.run([*argv, str(image)], check=True, capture_output=True)


@pytest.mark.parametrize("cluster_size", [512, 65536, 2 * MIB])
@pytest.mark.parametrize("sparse_copy", ["yes", "no"])
def test_qcow2_layouts_read_back_exactly_by_their_map(tmp_path, site, cluster_size, sparse_copy):
    """Data at unaligned guest offsets, written back to front (clusters out of
    order in the file), zero clusters over data, discarded ranges, a data
    tail that ends off the alignment: the disk reads back what qemu reads."""
    require_programs("qemu-io")
    size = 9 * MIB + 3 * 4096
    image = site.images / "layout.img"
    qemu_img("create", "-f", "qcow2", "-o", f"cluster_size={cluster_size}", image, size)
    qemu_io(image, f"write -P 0x33 {size - 5 * 512} {5 * 512}", "write -P 0x11 6000000 300000",
            "write -P 0x22 512 5000", "write -P 0x44 2M 1M", "write -z 2200000 100000",
            "discard 2600000 200000", "write -P 0x55 4100 100")
    reference = tmp_path / "reference.raw"
    qemu_img("convert", "-f", "qcow2", "-O", "raw", image, reference)
    site.write_config(SPARSE_COPY=sparse_copy)
    disk = tmp_path / "disk"
    random_file(disk, size + MIB)
    old = disk.read_bytes()
    result = deploy(site, disk, "layout.img")
    assert result.returncode == 0, result.stderr.decode()
    assert "copied by its map" in result.stderr.decode()
    content = disk.read_bytes()
    assert content[:size] == reference.read_bytes()
    assert content[size:] == old[size:]


def test_qcow2_map_that_does_not_cover_the_image_is_not_used():
    """Data with no place in the file (compressed), other layers, gaps,
    overlaps or a short cover: the map is not used (qemu-img convert is)."""
    data = '{"start": 0, "length": 4096, "depth": 0, "zero": false, "data": true, "offset": 65536}'
    zero = '{"start": 4096, "length": 8192, "depth": 0, "zero": true, "data": false}'
    assert host.qemu_image_extents(f"[{data}, {zero}]", 12288) == [(0, 4096, 65536), (4096, 8192, None)]
    assert host.qemu_image_extents(f"[{data}, {zero}]", 16384) is None
    assert host.qemu_image_extents(f"[{zero}]", 12288) is None
    compressed = data.replace(', "offset": 65536', '')
    assert host.qemu_image_extents(f"[{compressed}]", 4096) is None
    lower_layer = data.replace('"depth": 0', '"depth": 1')
    assert host.qemu_image_extents(f"[{lower_layer}]", 4096) is None
    assert host.qemu_image_extents(f"[{data}, {data}]", 8192) is None
    # neighbours in the file and runs of zeros merge
    second = '{"start": 4096, "length": 4096, "depth": 0, "zero": false, "data": true, "offset": 69632}'
    assert host.qemu_image_extents(f"[{data}, {second}]", 8192) == [(0, 8192, 65536)]


@settings(max_examples=80, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(1, 40)), min_size=1, max_size=10),
       st.sampled_from([1000, MIB]))
def test_mapped_image_file_reads_its_map(tmp_path_factory, layout, buffer_size):
    """Read through fill_buffer and skip_hole as the copier does: the bytes
    read plus the holes skipped are the guest view, holes start and end
    aligned, and every byte skipped is a zero of the map."""
    piece = 700        # not a divisor of the alignment: runs start and end anywhere
    extents, expected, file_bytes, position = [], bytearray(), bytearray(), 0
    for is_data, count in layout:
        length = count * piece
        if is_data:
            chunk = os.urandom(length)
            extents.append((position, length, len(file_bytes) + 4096))
            file_bytes += chunk
            expected += chunk
        else:
            extents.append((position, length, None))
            expected += bytes(length)
        position += length
    path = tmp_path_factory.mktemp("mapped") / "file"
    path.write_bytes(bytes(4096) + bytes(file_bytes))
    merged = []
    for extent in extents:      # as qemu_image_extents hands them over
        last = merged[-1] if merged else None
        if last and last[2] is None and extent[2] is None or \
                last and last[2] is not None and extent[2] == last[2] + last[1]:
            merged[-1] = (last[0], last[1] + extent[1], last[2])
        else:
            merged.append(extent)
    with open(path, "rb", buffering=0) as handle:
        reader = host.MappedImageFile(handle.fileno(), merged, position, "image t")
        seen, offset = bytearray(), 0
        buffer = memoryview(bytearray(buffer_size))
        while True:
            hole = host.skip_hole(reader)
            if hole:
                assert offset % 4096 == 0 and hole % 4096 == 0
                assert expected[offset:offset + hole] == bytes(hole)
                seen += bytes(hole)
                offset += hole
                continue
            count = host.fill_buffer(reader, buffer, stop_at_holes=True)
            if not count:
                break
            seen += buffer[:count]
            offset += count
    assert bytes(seen) == bytes(expected)


def test_mapped_image_file_past_the_file_end_is_an_error(tmp_path):
    path = tmp_path / "short"
    path.write_bytes(os.urandom(8192))
    with open(path, "rb", buffering=0) as handle:
        reader = host.MappedImageFile(handle.fileno(), [(0, 16384, 4096)], 16384, "image short")
        with pytest.raises(host.SnfError, match="past the end of the file"):
            host.fill_buffer(reader, memoryview(bytearray(16384)))


@pytest.mark.parametrize("fmt, options", [("qcow2", "compat=0.10"), ("vmdk", "subformat=streamOptimized"),
                                          ("vmdk", ""), ("vdi", ""), ("vhdx", ""), ("qed", ""),
                                          ("vpc", "force_size=on")])
def test_other_formats_onto_file_disk(tmp_path, site, fmt, options):
    size = 8 * MIB
    raw = tmp_path / "raw"
    raw_with_data(raw, size)
    extra = ["-o", options] if options else []
    qemu_img("convert", "-f", "raw", "-O", fmt, *extra, raw, site.images / f"image.{fmt}.raw")
    disk = tmp_path / "disk"
    random_file(disk, 10 * MIB)
    result = deploy(site, disk, f"image.{fmt}.raw")
    assert result.returncode == 0, result.stderr.decode()
    assert f"{fmt} disk image (from its header)" in result.stderr.decode()
    assert ("copied by its map" if fmt == "qcow2" else "written with qemu-img convert") in result.stderr.decode()
    content = disk.read_bytes()
    assert len(content) == 10 * MIB and content[:size] == raw.read_bytes()


def test_raw_image_named_qcow2_is_copied_raw(tmp_path, site):
    data = os.urandom(2 * MIB)
    (site.images / "x.qcow2").write_bytes(data)
    disk = tmp_path / "disk"
    random_file(disk, 3 * MIB)
    result = deploy(site, disk, "x.qcow2")
    assert result.returncode == 0, result.stderr.decode()
    assert "qemu-img" not in result.stderr.decode()
    assert disk.read_bytes()[:len(data)] == data


def refused_without_qemu_img(tmp_path, site, name, reason):
    calls = recording_qemu_img(site, tmp_path)
    disk = tmp_path / "disk"
    random_file(disk, 20 * MIB)
    before = hashlib.sha256(disk.read_bytes()).digest()
    result = deploy(site, disk, name)
    assert result.returncode == 2, result.stderr.decode()
    assert "refused" in last_line(result) and reason in last_line(result)
    assert not calls.exists(), "qemu-img was run on a refused image"
    assert hashlib.sha256(disk.read_bytes()).digest() == before


def test_qcow2_with_backing_file_refused(tmp_path, site):
    base = tmp_path / "base.raw"
    base.write_bytes(b"secret host data" * 65536)
    qemu_img("create", "-f", "qcow2", "-b", base, "-F", "raw", site.images / "overlay.img", "1M")
    refused_without_qemu_img(tmp_path, site, "overlay.img", "backing file")


@pytest.mark.parametrize("raw_flag", [False, True])
def test_qcow2_with_external_data_file_refused(tmp_path, site, raw_flag):
    options = f"data_file={tmp_path / 'data.raw'}" + (",data_file_raw=on" if raw_flag else "")
    qemu_img("create", "-f", "qcow2", "-o", options, site.images / "ext.img", "4M")
    refused_without_qemu_img(tmp_path, site, "ext.img", "external data file")


def test_qcow2_data_file_extension_alone_refused(tmp_path, site):
    """A header whose feature bit was cleared by hand still names the data file."""
    image = site.images / "ext.img"
    qemu_img("create", "-f", "qcow2", "-o", f"data_file={tmp_path / 'data.raw'}", image, "4M")
    header = bytearray(image.read_bytes())
    incompatible = struct.unpack(">Q", header[72:80])[0]
    header[72:80] = struct.pack(">Q", incompatible & ~4)
    image.write_bytes(bytes(header))
    refused_without_qemu_img(tmp_path, site, "ext.img", "names an external data file")


def test_qed_with_backing_file_refused(tmp_path, site):
    base = tmp_path / "base.raw"
    base.write_bytes(bytes(MIB))
    qemu_img("create", "-f", "qed", "-b", base, "-F", "raw", site.images / "overlay.img", "1M")
    refused_without_qemu_img(tmp_path, site, "overlay.img", "backing file")


def test_vmdk_with_parent_refused(tmp_path, site):
    base = tmp_path / "base.vmdk"
    qemu_img("create", "-f", "vmdk", base, "1M")
    qemu_img("create", "-f", "vmdk", "-b", base, "-F", "vmdk", site.images / "child.img")
    refused_without_qemu_img(tmp_path, site, "child.img", "parent")


def test_vmdk_descriptor_with_extent_files_refused(tmp_path, site):
    qemu_img("create", "-f", "vmdk", "-o", "subformat=twoGbMaxExtentSparse", site.images / "split.vmdk", "4M")
    refused_without_qemu_img(tmp_path, site, "split.vmdk", "other files")


def test_truncated_qcow2_is_a_clear_error(tmp_path, site):
    raw = tmp_path / "raw"
    raw_with_data(raw, 8 * MIB)
    image = site.images / "t.img"
    qemu_img("convert", "-f", "raw", "-O", "qcow2", raw, image)
    os.truncate(image, os.path.getsize(image) - 100000)
    disk = tmp_path / "disk"
    random_file(disk, 10 * MIB)
    before = disk.read_bytes()
    result = deploy(site, disk, "t.img")
    assert result.returncode == 1
    assert "corrupt qcow2 image" in last_line(result) and "truncated" in last_line(result)
    assert disk.read_bytes() == before


def test_garbage_after_qcow2_magic_is_a_clear_error(tmp_path, site):
    (site.images / "g.img").write_bytes(b"QFI\xfb" + os.urandom(MIB))
    disk = tmp_path / "disk"
    random_file(disk, 2 * MIB)
    result = deploy(site, disk, "g.img")
    assert result.returncode in (1, 2)
    assert "qcow2" in last_line(result) and "Traceback" not in result.stderr.decode()


@pytest.mark.parametrize("broken", ["missing", "not-executable"])
def test_qemu_img_that_cannot_run_is_named_not_blamed_on_the_image(tmp_path, site, broken):
    raw = tmp_path / "raw"
    raw_with_data(raw, 4 * MIB)
    qemu_img("convert", "-f", "raw", "-O", "qcow2", raw, site.images / "q.img")
    program = tmp_path / "qemu-img-here"
    if broken == "not-executable":
        program.write_text("#!/bin/sh\nexit 0\n")
    site.write_config(QEMU_IMG=program)
    disk = tmp_path / "disk"
    random_file(disk, 8 * MIB)
    before = disk.read_bytes()
    result = deploy(site, disk, "q.img")
    assert result.returncode == 1
    line = last_line(result)
    assert str(program) in line and "corrupt" not in line
    assert ("not found" if broken == "missing" else "Permission denied") in line
    assert "Traceback" not in result.stderr.decode()
    assert disk.read_bytes() == before


def test_qcow2_larger_than_disk_refused_before_writing(tmp_path, site):
    qemu_img("create", "-f", "qcow2", site.images / "big.img", "64M")
    disk = tmp_path / "disk"
    random_file(disk, 8 * MIB)
    before = disk.read_bytes()
    result = deploy(site, disk, "big.img")
    assert result.returncode == 1 and "larger than disk" in last_line(result)
    assert disk.read_bytes() == before


def test_qcow2_checksum_file_checked(tmp_path, site):
    raw = tmp_path / "raw"
    raw_with_data(raw, 4 * MIB)
    image = site.images / "c.img"
    qemu_img("convert", "-f", "raw", "-O", "qcow2", raw, image)
    disk = tmp_path / "disk"
    random_file(disk, 5 * MIB)
    (site.images / "c.img.md5sum").write_text("0" * 32 + "  c.img\n")
    before = disk.read_bytes()
    result = deploy(site, disk, "c.img")
    assert result.returncode == 1 and "checksum mismatch" in last_line(result)
    assert disk.read_bytes() == before
    (site.images / "c.img.md5sum").write_text(hashlib.md5(image.read_bytes()).hexdigest() + "  c.img\n")
    result = deploy(site, disk, "c.img")
    assert result.returncode == 0, result.stderr.decode()
    assert disk.read_bytes()[:4 * MIB] == raw.read_bytes()


def test_compressed_qcow2_refused_plainly(tmp_path, site):
    raw = tmp_path / "raw"
    raw_with_data(raw, 4 * MIB)
    qemu_img("convert", "-f", "raw", "-O", "qcow2", raw, tmp_path / "q")
    (site.images / "q.img.gz").write_bytes(gzip.compress((tmp_path / "q").read_bytes()))
    disk = tmp_path / "disk"
    random_file(disk, 5 * MIB)
    result = deploy(site, disk, "q.img.gz")
    assert result.returncode == 1 and "needs random access" in last_line(result)


def test_qcow2_as_filesystem_dump_refused(tmp_path, site):
    qemu_img("create", "-f", "qcow2", site.images / "fs.img", "1M")
    disk = tmp_path / "disk"
    random_file(disk, 4 * MIB)
    result = site.deploy("--disk", disk, "--img-id", "fs.img", "--img-format", "extdump", "--no-helper")
    assert result.returncode == 2 and "use img_format diskdump" in last_line(result)


@pytest.mark.parametrize("program, argv", [("zstd", ["zstd", "-q", "-c"]), ("xz", ["xz", "-c", "-T2"]),
                                           ("bzip2", ["bzip2", "-c"]), ("gzip", ["gzip", "-c"])])
def test_compressed_streams_through_their_programs(tmp_path, site, program, argv):
    require_programs(program)
    raw = tmp_path / "raw"
    raw_with_data(raw, 6 * MIB + 333)
    compressed = subprocess.run([*argv, str(raw)], check=True, capture_output=True).stdout
    (site.images / "c.img").write_bytes(compressed)
    disk = tmp_path / "disk"
    random_file(disk, 8 * MIB)
    result = deploy(site, disk, "c.img")
    assert result.returncode == 0, result.stderr.decode()
    assert f"{program}-compressed image, decompressing with {program}" in result.stderr.decode()
    assert disk.read_bytes()[:raw.stat().st_size] == raw.read_bytes()
    # cut short: a clear error naming the data, nothing hangs
    (site.images / "c.img").write_bytes(compressed[:len(compressed) * 2 // 3])
    result = deploy(site, disk, "c.img")
    assert result.returncode == 1 and f"corrupt {program} data" in last_line(result)


def test_truncated_download_reported_before_the_decompressor(tmp_path, site, http_server):
    """The source's own error (stream shorter than announced) wins over the
    decompressor's complaint about the cut stream."""
    raw = tmp_path / "raw"
    raw_with_data(raw, 4 * MIB)
    compressed = subprocess.run(["xz", "-c", str(raw)], check=True, capture_output=True).stdout
    url = http_server.serve("/cut.img", compressed, kind="cut")
    disk = tmp_path / "disk"
    random_file(disk, 5 * MIB)
    result = site.deploy("--disk", disk, "--img-id", url, "--img-format", "diskdump", "--no-helper")
    line = last_line(result)
    assert result.returncode == 1 and "corrupt xz data" not in line
    assert "download cut (connection closed after" in line


def test_downloaded_qcow2_refused_before_writing(tmp_path, site, http_server):
    """qcow2 needs random access: a download is refused with one line, the disk untouched."""
    raw = tmp_path / "raw"
    raw_with_data(raw, 4 * MIB)
    qemu_img("convert", "-f", "raw", "-O", "qcow2", raw, tmp_path / "q")
    url = http_server.serve("/disk.img", (tmp_path / "q").read_bytes())
    disk = tmp_path / "disk"
    random_file(disk, 5 * MIB)
    before = disk.read_bytes()
    result = site.deploy("--disk", disk, "--img-id", url, "--img-format", "diskdump", "--no-helper")
    assert result.returncode == 1 and "needs random access" in last_line(result)
    assert "IMAGE_DIR" in last_line(result)
    assert disk.read_bytes() == before
