"""snf-image-host.py: disk images in qemu's formats under img_format diskdump
(detected from the header, written by real qemu-img convert), images that
would make qemu read other files refused before qemu-img opens them, corrupt
and truncated images, and zstd/xz/gzip streams decompressed by their programs."""

import gzip
import hashlib
import os
import shutil
import struct
import subprocess

import pytest

from conftest import require_programs
from host_testlib import last_line, loop_device

MIB = 1024 * 1024


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
    assert calls.read_text().split() == ["info", "check", "convert"]


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
