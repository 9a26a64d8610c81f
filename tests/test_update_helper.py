"""Unit tests of snf-image-update-helper.py that need neither root nor qemu:
configuration parsing, APT sources, the cpio/initrd writer (checked with the
`cpio` program), vmlinux extraction and the PVH note, module ordering, the
manifest, export/import and the atomic switch of `current`."""

import bz2
import gzip
import importlib.machinery
import importlib.util
import io
import lzma
import os
import re
import struct
import subprocess
import sys
import tarfile
import threading
from pathlib import Path

import pytest

from conftest import REPO, load_script, require_programs
from helpervm import fake_release

builder = load_script("snf-image-update-helper.py")
HelperError = builder.HelperError


# ---------------------------------------------------------------------------
# configuration
# ---------------------------------------------------------------------------

def settings_from(argv, config_text, tmp_path):
    config = tmp_path / "snf-image.conf"
    config.write_text(config_text)
    args = builder.build_arg_parser().parse_args(argv)
    return builder.load_settings(args, environ={"SNF_IMAGE_CONFIG": str(config)})


def test_settings_from_config_file_and_command_line(tmp_path):
    config = 'HELPER_DEBIAN_SUITE="bookworm"\nHELPER_DEBIAN_MIRROR="http://m.example/debian/"\n' \
             f'HELPER_DIR="{tmp_path}/hd"\nMULTISTRAP="/opt/ms"\n'
    settings = settings_from([], config, tmp_path)
    assert settings.suite == "bookworm"
    assert settings.mirror == "http://m.example/debian"
    assert settings.helper_dir == tmp_path / "hd"
    assert settings.cache_dir == tmp_path / "hd" / "cache"
    assert settings.programs["MULTISTRAP"] == ["/opt/ms"]
    settings = settings_from(["--suite", "trixie", "--helper-dir", str(tmp_path / "other"),
                              "--cache-dir", str(tmp_path / "c"), "--tasks", str(tmp_path)],
                             config, tmp_path)
    assert settings.suite == "trixie"
    assert settings.helper_dir == tmp_path / "other"
    assert settings.cache_dir == tmp_path / "c"
    assert settings.tasks_dir == tmp_path


def test_settings_defaults(tmp_path):
    settings = settings_from([], "", tmp_path)
    assert settings.suite == "trixie"
    assert settings.mirror == ""
    assert settings.helper_dir == Path("/var/lib/snf-image/helper")
    assert settings.helper_program.name == "snf-image-helper.py"


@pytest.mark.parametrize("config", ['HELPER_DEBIAN_SUITE="tri xie;rm"', 'HELPER_MEMORY="lots"',
                                    'HELPER_DEBIAN_MIRROR="http://a/debian suite=x"',
                                    'HELPER_DEBIAN_MIRROR="mirror.example.org/debian"'])
def test_settings_reject_bad_values(tmp_path, config):
    with pytest.raises(builder.ConfigError) as error:
        settings_from([], config, tmp_path)
    assert error.value.exit_code == 2 and config.split("=")[0] in str(error.value)


@pytest.mark.parametrize("argv, key", [
    (["--mirror", "http://a/debian\nsuite=sid"], "HELPER_DEBIAN_MIRROR"),
    (["--memory", "-1"], "HELPER_MEMORY"), (["--memory", "0x10"], "HELPER_MEMORY"),
    (["--user", "root;id"], "HELPER_USER"), (["--suite", "Trixie"], "HELPER_DEBIAN_SUITE"),
])
def test_command_line_values_are_checked_like_the_file(tmp_path, argv, key):
    with pytest.raises(builder.ConfigError) as error:
        settings_from(argv, "", tmp_path)
    assert f"invalid configuration value {key}=" in str(error.value)


def test_program_settings_are_argument_lists(tmp_path):
    settings = settings_from([], 'MKFS_EXT4="/opt/mkfs.ext4 -q"\nQEMU=qemu-kvm\n', tmp_path)
    assert settings.programs["MKFS_EXT4"] == ["/opt/mkfs.ext4", "-q"]
    assert settings.programs["QEMU"] == ["qemu-kvm"]
    assert set(settings.programs) == {"MULTISTRAP", "MKFS_EXT4", "DEPMOD", "QEMU", "ZSTD", "CP", "CHROOT"}


def test_builder_finds_the_host_module_through_its_search_list(tmp_path):
    assert builder.HOST_PROGRAM_DIRS[0] == REPO
    assert builder.host_program_dirs({"SNF_IMAGE_HOST_DIRS": f"{tmp_path}:/x"}) == (tmp_path, Path("/x"))
    with pytest.raises(builder.ConfigError, match="cannot find snf-image-host.py") as error:
        builder.load_host_module({"SNF_IMAGE_HOST_DIRS": str(tmp_path)})
    assert error.value.exit_code == 2
    assert builder.load_host_module({}).SNF_IMAGE_VERSION == builder.SNF_IMAGE_VERSION
    result = subprocess.run([sys.executable, str(REPO / "snf-image-update-helper.py"), "--help"],
                            env={"PATH": "/usr/bin:/bin", "SNF_IMAGE_HOST_DIRS": str(tmp_path)},
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.startswith("Error: cannot find snf-image-host.py") and result.stderr.count("\n") == 1


def test_mirror_from_deb822_sources_skips_security(tmp_path):
    sources = tmp_path / "debian.sources"
    sources.write_text("""Types: deb
URIs: http://security.example/debian-security
Suites: bookworm-security
Components: main

Types: deb-src
URIs: http://src.example/debian
Suites: bookworm

Types: deb
# a comment
URIs: http://mirror.example/debian/
Suites: bookworm bookworm-updates
Components: main
""")
    assert builder.host_debian_mirror((str(sources),)) == "http://mirror.example/debian"


def test_mirror_from_one_line_sources(tmp_path):
    sources = tmp_path / "sources.list"
    sources.write_text("# x\ndeb-src http://a/debian bookworm main\n"
                       "deb [arch=amd64 signed-by=/k.gpg] http://b.example/debian bookworm main\n")
    assert builder.host_debian_mirror((str(sources),)) == "http://b.example/debian"


def test_no_mirror_is_an_error(tmp_path):
    with pytest.raises(HelperError, match="HELPER_DEBIAN_MIRROR"):
        builder.host_debian_mirror((str(tmp_path / "missing.sources"),))


def test_multistrap_config_names_suite_mirror_and_no_usrmerge():
    text = builder.multistrap_config("trixie", "http://m/debian", builder.HELPER_PACKAGES)
    assert "suite=trixie" in text and "source=http://m/debian" in text
    packages = text.split("packages=")[1].split("\n")[0].split()
    assert packages[0] == "usr-is-merged" and "usrmerge" not in packages
    for needed in ("python3", "util-linux", "e2fsprogs", "fdisk", "gdisk", "parted",
                   "dosfstools", "xfsprogs", "btrfs-progs", "ntfs-3g", "libhivex-bin",
                   "kmod", "busybox-static", "linux-image-amd64"):
        assert needed in packages


def test_root_cache_key_depends_on_suite_and_mirror():
    key = builder.root_cache_key("trixie", "http://a/debian")
    assert key == builder.root_cache_key("trixie", "http://a/debian")
    assert key != builder.root_cache_key("bookworm", "http://a/debian")
    assert key != builder.root_cache_key("trixie", "http://b/debian")


# ---------------------------------------------------------------------------
# initrd: cpio newc, checked by the cpio program
# ---------------------------------------------------------------------------

def cpio_listing(archive_bytes, tmp_path):
    path = tmp_path / "archive.cpio"
    path.write_bytes(archive_bytes)
    out = subprocess.run(["cpio", "-t", "-v", "--quiet", "-F", str(path)],
                         capture_output=True, text=True, check=True).stdout
    return out.splitlines()


def test_cpio_writer_is_read_by_cpio(tmp_path):
    require_programs("cpio")
    stream = io.BytesIO()
    with builder.CpioWriter(stream) as archive:
        archive.add_directory("dir")
        archive.add_file("dir/file", b"hello world\n", 0o640)
        archive.add_file("odd", b"x" * 5, 0o755)  # lengths that need padding
        archive.add_symlink("dir/link", "file")
        archive.add_char_device("console", 5, 1)
    listing = cpio_listing(stream.getvalue(), tmp_path)
    assert len(listing) == 5
    assert listing[0].startswith("drwxr-xr-x") and listing[0].endswith(" dir")
    assert listing[1].startswith("-rw-r-----") and listing[1].endswith(" dir/file")
    assert listing[2].startswith("-rwxr-xr-x") and listing[2].endswith(" odd")
    assert listing[3].startswith("lrwxrwxrwx") and listing[3].endswith("dir/link -> file")
    assert listing[4].startswith("crw-------") and re.search(r" 5,\s+1 ", listing[4])
    out = tmp_path / "out"
    out.mkdir()
    subprocess.run(["cpio", "-i", "-d", "--quiet", "--no-absolute-filenames", "-F",
                    str(tmp_path / "archive.cpio"), "dir/*", "odd"], cwd=out, check=True)
    assert (out / "dir/file").read_bytes() == b"hello world\n"
    assert (out / "odd").read_bytes() == b"xxxxx"
    assert os.readlink(out / "dir/link") == "file"


def test_initrd_contents(tmp_path):
    require_programs("cpio")
    initrd = tmp_path / "initrd"
    busybox = b"\x7fELF fake busybox"
    builder.write_initrd(initrd, busybox, [("jbd2.ko", b"JBD2"), ("ext4.ko", b"EXT4")])
    raw = initrd.read_bytes()
    assert raw.startswith(b"070701")        # uncompressed: the guest does not inflate it
    names = [line.split()[-1] if " -> " not in line else line.split()[-3]
             for line in cpio_listing(raw, tmp_path)]
    for expected in ("init", "bin/busybox", "bin/sh", "bin/switch_root", "dev/console",
                     "lib/modules/jbd2.ko", "lib/modules/ext4.ko", "lib/modules/load-order",
                     "newroot", "proc", "sys"):
        assert expected in names
    out = tmp_path / "out"
    out.mkdir()
    subprocess.run(["cpio", "-i", "-d", "--quiet", "-F", str(tmp_path / "archive.cpio"),
                    "init", "lib/*", "bin/busybox"], cwd=out, check=True)
    assert (out / "lib/modules/load-order").read_text() == "jbd2.ko\next4.ko\n"
    assert (out / "bin/busybox").read_bytes() == busybox
    init = (out / "init").read_text()
    assert init.startswith("#!/bin/sh\n")
    assert "switch_root /newroot" in init and builder.ROOT_SERIAL in init
    assert os.access(out / "init", os.X_OK)
    syntax = subprocess.run(["sh", "-n", str(out / "init")], capture_output=True)
    assert syntax.returncode == 0, syntax.stderr


def test_initrd_is_reproducible(tmp_path):
    builder.write_initrd(tmp_path / "a", b"bb", [("m.ko", b"m")])
    builder.write_initrd(tmp_path / "b", b"bb", [("m.ko", b"m")])
    assert (tmp_path / "a").read_bytes() == (tmp_path / "b").read_bytes()


# ---------------------------------------------------------------------------
# kernel: bzImage payload → vmlinux, PVH note
# ---------------------------------------------------------------------------

def make_elf(pvh=True, trailing=b""):
    """A small ELF64 with one PT_LOAD and a PT_NOTE (Xen PHYS32_ENTRY if pvh)."""
    load_data = b"\x90" * 200
    note_name = b"Xen\x00" if pvh else b"GNU\x00"
    note = struct.pack("<III", 4, 4, 18 if pvh else 3) + note_name + struct.pack("<I", 0x1000000)
    phoff, phnum = 64, 2
    load_offset = phoff + 56 * phnum
    note_offset = load_offset + len(load_data)
    header = b"\x7fELF" + bytes([2, 1, 1, 0]) + b"\0" * 8
    header += struct.pack("<HHIQQQIHHHHHH", 2, 0x3E, 1, 0x1000000, phoff, 0, 0, 64, 56, phnum, 64, 0, 0)
    phdrs = struct.pack("<IIQQQQQQ", 1, 5, load_offset, 0x1000000, 0x1000000,
                        len(load_data), len(load_data), 0x1000)
    phdrs += struct.pack("<IIQQQQQQ", 4, 4, note_offset, 0, 0, len(note), len(note), 4)
    return header + phdrs + load_data + note + trailing


def make_bzimage(payload_plain, compress):
    compressed = compress(payload_plain) + struct.pack("<I", len(payload_plain))
    setup_sects = 1
    setup = bytearray(512 * (setup_sects + 1))
    setup[0x1F1] = setup_sects
    setup[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", setup, 0x206, 0x20F)
    struct.pack_into("<II", setup, 0x248, 0x40, len(compressed))
    protected_mode = b"\xcc" * 0x40 + compressed + b"\0" * 100
    return bytes(setup) + protected_mode


COMPRESSORS = {
    "xz": lambda data: lzma.compress(data, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC32),
    "gzip": lambda data: gzip.compress(data, mtime=0),
    "bzip2": bz2.compress,
    "lzma": lambda data: lzma.compress(data, format=lzma.FORMAT_ALONE),
}


@pytest.mark.parametrize("method", sorted(COMPRESSORS))
def test_extract_vmlinux_from_bzimage(method):
    elf = make_elf()
    relocs = b"\x01\x02\x03\x04" * 16  # what the kernel build appends after the ELF
    vmlinux = builder.extract_vmlinux(make_bzimage(elf + relocs, COMPRESSORS[method]))
    assert vmlinux == elf
    assert builder.elf_has_pvh_note(vmlinux)


def test_extract_vmlinux_zstd_through_program():
    require_programs("zstd")
    elf = make_elf()
    zstd = lambda data: subprocess.run(["zstd", "-q", "-c"], input=data, capture_output=True,
                                       check=True).stdout
    assert builder.extract_vmlinux(make_bzimage(elf, zstd)) == elf


def test_pvh_note_absent():
    assert not builder.elf_has_pvh_note(make_elf(pvh=False))
    assert not builder.elf_has_pvh_note(b"MZ not an elf at all" * 4)


def test_extract_vmlinux_rejects_bad_input():
    with pytest.raises(HelperError, match="neither"):
        builder.extract_vmlinux(b"\0" * 4096)
    bad_size = bytearray(make_bzimage(make_elf(), COMPRESSORS["gzip"]))
    end = 1024 + 0x40 + struct.unpack_from("<I", bad_size, 0x24C)[0]
    bad_size[end - 4:end] = struct.pack("<I", 12345)
    with pytest.raises(HelperError, match="expected 12345"):
        builder.extract_vmlinux(bytes(bad_size))
    with pytest.raises(HelperError, match="compression"):
        builder.extract_vmlinux(make_bzimage(make_elf(), lambda data: b"LZ4?" + data))


def test_elf_input_is_returned_as_is():
    elf = make_elf()
    assert builder.extract_vmlinux(elf) == elf


# ---------------------------------------------------------------------------
# modules
# ---------------------------------------------------------------------------

MODULES_DEP = """kernel/fs/ext4/ext4.ko.xz: kernel/lib/crc16.ko.xz kernel/fs/mbcache.ko.xz kernel/fs/jbd2/jbd2.ko.xz
kernel/lib/crc16.ko.xz:
kernel/fs/mbcache.ko.xz:
kernel/fs/jbd2/jbd2.ko.xz:
kernel/drivers/block/virtio_blk.ko.xz:
kernel/drivers/block/floppy.ko.xz:
kernel/crypto/crc32c_generic.ko.xz:
"""


def test_module_load_order_puts_dependencies_first_and_skips_builtins():
    deps = builder.parse_modules_dep(MODULES_DEP)
    builtin = builder.parse_modules_builtin("kernel/drivers/virtio/virtio_pci.ko\n")
    order = builder.module_load_order(("virtio_pci", "virtio_blk", "ext4", "jbd2"), deps, builtin)
    names = [builder.module_name(p) for p in order]
    assert names == ["virtio_blk", "jbd2", "mbcache", "crc16", "ext4"]
    assert names.index("jbd2") < names.index("ext4")


def test_unknown_module_is_an_error():
    with pytest.raises(HelperError, match="no_such_module"):
        builder.module_load_order(("no_such_module",), builder.parse_modules_dep(MODULES_DEP), set())


def test_read_module_decompresses(tmp_path):
    (tmp_path / "a.ko.xz").write_bytes(lzma.compress(b"\x7fELFmodule"))
    (tmp_path / "b.ko.gz").write_bytes(gzip.compress(b"\x7fELFother"))
    (tmp_path / "c.ko").write_bytes(b"\x7fELFplain")
    assert builder.read_module(tmp_path / "a.ko.xz") == b"\x7fELFmodule"
    assert builder.read_module(tmp_path / "b.ko.gz") == b"\x7fELFother"
    assert builder.read_module(tmp_path / "c.ko") == b"\x7fELFplain"


def test_module_signature_is_stripped():
    import struct
    body = b"\x7fELF" + bytes(100)
    signature = b"S" * 37
    info = bytes(8) + struct.pack(">I", len(signature))
    signed = body + signature + info + builder.MODULE_SIGNATURE_MAGIC
    assert builder.without_signature(signed) == body
    assert builder.without_signature(body) == body
    with pytest.raises(HelperError, match="signature"):
        builder.without_signature(b"\x7fE" + struct.pack(">I", 1000) + builder.MODULE_SIGNATURE_MAGIC)


# ---------------------------------------------------------------------------
# releases: manifest, export/import, atomic switch
# ---------------------------------------------------------------------------

def helper_settings(tmp_path, helper_dir):
    args = builder.build_arg_parser().parse_args(["--helper-dir", str(helper_dir)])
    return builder.load_settings(args, environ={"SNF_IMAGE_CONFIG": "/dev/null"})


def test_export_import_round_trip(tmp_path):
    source_dir = tmp_path / "node1"
    release = fake_release(source_dir, "20260101T000000Z-0123abcd")
    builder.switch_current(source_dir, release)
    archive = tmp_path / "helper.tar.gz"
    builder.export_release(helper_settings(tmp_path, source_dir), archive)
    with tarfile.open(archive) as tar:
        assert sorted(tar.getnames()) == sorted(f"20260101T000000Z-0123abcd/{n}" for n in
                                                ("manifest.json", "kernel", "initrd", "image", "vmlinuz"))
    target_dir = tmp_path / "node2"
    builder.import_release(helper_settings(tmp_path, target_dir), archive)
    imported = (target_dir / "current").resolve()
    assert imported.name == release.name
    for name in ("kernel", "initrd", "image", "vmlinuz", "manifest.json"):
        assert (imported / name).read_bytes() == (release / name).read_bytes()
    for name in ("kernel", "initrd", "image"):
        assert (target_dir / name).resolve() == imported / name
    assert not [p for p in (target_dir / "releases").iterdir() if p.name.startswith(".")]


def tampered_archive(tmp_path, mutate):
    source_dir = tmp_path / "src"
    release = fake_release(source_dir, "20260101T000000Z-0123abcd")
    mutate(release)
    archive = tmp_path / "bad.tar"
    with tarfile.open(archive, "w") as tar:
        for path in sorted(release.iterdir()):
            tar.add(path, f"{release.name}/{path.name}")
    return archive


@pytest.mark.parametrize("mutate, message", [
    (lambda r: (r / "image").write_bytes(b"changed"), "image does not match"),
    (lambda r: (r / "kernel").unlink(), "lacks kernel"),
    (lambda r: (r / "extra").write_bytes(b"x"), "unexpected member"),
])
def test_import_rejects_tampered_release_and_changes_nothing(tmp_path, mutate, message):
    archive = tampered_archive(tmp_path, mutate)
    target_dir = tmp_path / "node"
    with pytest.raises(HelperError, match=message):
        builder.import_release(helper_settings(tmp_path, target_dir), archive)
    assert not (target_dir / "current").exists()
    assert list((target_dir / "releases").iterdir()) == []


def test_import_rejects_path_traversal(tmp_path):
    archive = tmp_path / "evil.tar"
    payload = tmp_path / "payload"
    payload.write_bytes(b"x")
    with tarfile.open(archive, "w") as tar:
        tar.add(payload, "../../etc/evil")
    with pytest.raises(HelperError, match="unexpected member"):
        builder.import_release(helper_settings(tmp_path, tmp_path / "node"), archive)
    assert not (tmp_path / "etc").exists()


def test_switch_keeps_previous_and_drops_older(tmp_path):
    helper_dir = tmp_path / "hd"
    first = fake_release(helper_dir, "20260101T000000Z-00000001")
    builder.switch_current(helper_dir, first)
    second = fake_release(helper_dir, "20260101T000001Z-00000002")
    builder.switch_current(helper_dir, second)
    assert first.exists()
    third = fake_release(helper_dir, "20260101T000002Z-00000003")
    builder.switch_current(helper_dir, third)
    assert not first.exists() and second.exists() and third.exists()
    assert os.readlink(helper_dir / "current") == "releases/20260101T000002Z-00000003"
    assert (helper_dir / "image").resolve() == third / "image"


def test_readers_never_see_a_missing_or_partial_current(tmp_path):
    helper_dir = tmp_path / "hd"
    releases = []
    for i in range(2):
        releases.append(fake_release(helper_dir, f"20260101T00000{i}Z-0000000{i}", bytes([i])))
        builder.switch_current(helper_dir, releases[-1])
    stop = threading.Event()
    failures = []

    def swapper():
        i = 0
        while not stop.is_set():
            i += 1
            builder.replace_symlink(f"releases/{releases[i % 2].name}", helper_dir / "current")

    thread = threading.Thread(target=swapper)
    thread.start()
    try:
        for _ in range(3000):
            resolved = os.path.realpath(helper_dir / "current")
            if not os.path.isfile(os.path.join(resolved, "manifest.json")):
                failures.append(resolved)
    finally:
        stop.set()
        thread.join()
    assert failures == []


def test_main_prints_one_line_error(tmp_path, capsys):
    code = builder.main(["--helper-dir", str(tmp_path / "hd"), "--import", str(tmp_path / "nope.tar")])
    assert code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("Error: ") and "nope.tar" in err[0]


def test_export_without_helper_is_an_error(tmp_path, capsys):
    code = builder.main(["--helper-dir", str(tmp_path / "hd"), "--export", str(tmp_path / "x.tar")])
    assert code == 1
    assert "no helper built" in capsys.readouterr().err
    assert not (tmp_path / "x.tar").exists()


@pytest.mark.parametrize("option", ["--tasks", "--helper-program"])
def test_build_with_missing_sources_fails_before_touching_anything(tmp_path, capsys, option):
    code = builder.main(["--helper-dir", str(tmp_path / "hd"), option, str(tmp_path / "missing")])
    assert code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not exist" in err[0]
    assert not (tmp_path / "hd").exists()


@pytest.mark.root
@pytest.mark.parametrize("fake_multistrap, message", [
    ("false", "false failed (exit code 1)"),
    ("true", "lacks python3 or busybox"),
])
def test_failed_root_stage_leaves_no_cache_and_no_release(tmp_path, capsys, monkeypatch,
                                                          fake_multistrap, message):
    from conftest import require_root
    require_root()
    config = tmp_path / "snf-image.conf"
    config.write_text(f'MULTISTRAP="{fake_multistrap}"\nHELPER_DEBIAN_MIRROR="http://mirror.invalid/debian"\n')
    args = ["--helper-dir", str(tmp_path / "hd"), "--cache-dir", str(tmp_path / "cache")]
    monkeypatch.setenv("SNF_IMAGE_CONFIG", str(config))
    code = builder.main(args)
    assert code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
    assert [p.name for p in (tmp_path / "cache").iterdir() if p.name.startswith((".rootfs", "rootfs"))] == []
    assert not (tmp_path / "hd" / "current").exists()


def test_installed_builder_takes_helper_and_tasks_from_datadir(tmp_path, monkeypatch):
    """Installed as $(SBINDIR)/snf-image-update-helper (no checkout around it),
    the builder installs $(DATADIR)/helper/{snf-image-helper.py,tasks.d} and
    reads the configuration through the OS definition's snf-image-host.py."""
    installed = tmp_path / "sbin" / "snf-image-update-helper"
    installed.parent.mkdir()
    installed.write_bytes((Path(builder.__file__)).read_bytes())
    os_dir = tmp_path / "os" / "snf-image"
    os_dir.mkdir(parents=True)
    (os_dir / "snf-image-host.py").write_bytes((REPO / "snf-image-host.py").read_bytes())
    monkeypatch.setenv("SNF_IMAGE_HOST_DIRS", f"{tmp_path / 'nothing'}:{os_dir}")
    loader = importlib.machinery.SourceFileLoader("installed_builder", str(installed))
    module = importlib.util.module_from_spec(importlib.util.spec_from_loader("installed_builder", loader))
    loader.exec_module(module)
    assert module.host_program.__file__ == str(os_dir / "snf-image-host.py")
    program, tasks = module.default_helper_sources()
    assert program == Path("/usr/local/share/snf-image/helper/snf-image-helper.py")
    assert tasks == Path("/usr/local/share/snf-image/helper/tasks.d")
    program, tasks = builder.default_helper_sources()
    assert program.parent == tasks.parent == Path(builder.__file__).resolve().parent


def test_upstream_multistrap_keys_are_opt_in_and_change_the_cache_key(tmp_path):
    settings = settings_from([], "", tmp_path)
    assert settings.multistrap_config is None and settings.apt_pref_dir is None
    prefs = tmp_path / "prefs"
    prefs.mkdir()
    (prefs / "pin.pref").write_text("Package: *\nPin: release n=trixie\nPin-Priority: 500\n")
    custom = tmp_path / "multistrap.conf"
    custom.write_text(builder.multistrap_config("trixie", "http://m/debian", builder.HELPER_PACKAGES))
    settings = settings_from([], f'MULTISTRAP_CONFIG="{custom}"\nMULTISTRAP_APTPREFDIR="{prefs}"\n', tmp_path)
    assert settings.multistrap_config == custom and settings.apt_pref_dir == prefs
    plain = builder.root_cache_key("trixie", "http://m/debian")
    with_prefs = builder.root_cache_key("trixie", "http://m/debian", None, prefs)
    with_both = builder.root_cache_key("trixie", "http://m/debian", custom, prefs)
    assert len({plain, with_prefs, with_both}) == 3
    (prefs / "pin.pref").write_text("Package: *\nPin: release n=bookworm\nPin-Priority: 500\n")
    assert builder.root_cache_key("trixie", "http://m/debian", None, prefs) != with_prefs


@pytest.mark.parametrize("key", ["MULTISTRAP_CONFIG", "MULTISTRAP_APTPREFDIR"])
def test_missing_upstream_multistrap_paths_are_errors(tmp_path, key):
    with pytest.raises(HelperError, match=key):
        settings_from([], f'{key}="{tmp_path}/missing"\n', tmp_path)


def test_import_of_another_snf_image_version_needs_force(tmp_path, capsys):
    source_dir = tmp_path / "node1"
    release = fake_release(source_dir, "20260101T000000Z-0123abcd", version="0.23.1")
    builder.switch_current(source_dir, release)
    archive = tmp_path / "helper.tar"
    builder.export_release(helper_settings(tmp_path, source_dir), archive)
    target = tmp_path / "node2"
    with pytest.raises(HelperError, match=r"built for snf-image 0\.23\.1.*-f installs it anyway"):
        builder.import_release(helper_settings(tmp_path, target), archive)
    assert not (target / "current").exists()
    builder.import_release(helper_settings(tmp_path, target), archive, force=True)
    assert "built for snf-image 0.23.1" in capsys.readouterr().err
    assert (target / "current").resolve().name == release.name
