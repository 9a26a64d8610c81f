"""End-to-end tests of snf-image-update-helper.py: the real builder (multistrap
from the Debian mirror, cached under SNF_IMAGE_TEST_CACHE) builds the helper,
its artifacts are inspected without mounting, and `--check` boots it under
qemu (TCG here: KVM guests hang on this machine)."""

import json
import os
import struct
import subprocess
import signal
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, load_script, require_programs, require_root
from helpervm import SUITE, built_helper_dir

builder = load_script("snf-image-update-helper.py")

pytestmark = [pytest.mark.root, pytest.mark.slow]


def debugfs(image, command):
    return subprocess.run(["debugfs", "-R", command, str(image)], capture_output=True,
                          text=True, check=True).stdout


def test_release_layout_and_manifest(helper_vm_dir):
    current = helper_vm_dir / "current"
    assert current.is_symlink()
    release = current.resolve()
    assert release.parent == helper_vm_dir / "releases"
    for name in ("kernel", "initrd", "image"):
        assert (helper_vm_dir / name).resolve() == release / name
    manifest = json.loads((release / "manifest.json").read_text())
    assert manifest["build_id"] == release.name
    assert manifest["suite"] == SUITE
    assert manifest["snf_image_version"] == builder.SNF_IMAGE_VERSION
    assert len(manifest["inputs_hash"]) == 64
    for name, digest in manifest["files"].items():
        assert builder.sha256_file(release / name) == digest
    packages = manifest["packages"]
    for needed in ("python3", "util-linux", "e2fsprogs", "fdisk", "gdisk", "parted", "dosfstools",
                   "xfsprogs", "btrfs-progs", "ntfs-3g", "libhivex-bin", "kmod", "busybox-static"):
        assert needed in packages, needed
    assert "perl" not in packages and "usrmerge" not in packages
    assert f"linux-image-{manifest['kernel_version']}" in packages


def test_kernel_is_pvh_vmlinux(helper_vm_dir):
    release = (helper_vm_dir / "current").resolve()
    manifest = json.loads((release / "manifest.json").read_text())
    kernel = (release / "kernel").read_bytes()
    assert manifest["kernel_format"] == "vmlinux-pvh"
    assert kernel[:4] == b"\x7fELF" and builder.elf_has_pvh_note(kernel)
    assert (release / "vmlinuz").read_bytes()[0x202:0x206] == b"HdrS"


def test_initrd_unpacks_with_cpio(helper_vm_dir, tmp_path):
    require_programs("cpio")
    release = (helper_vm_dir / "current").resolve()
    raw = (release / "initrd").read_bytes()
    assert raw.startswith(b"070701")
    listing = subprocess.run(["cpio", "-t", "--quiet"], input=raw, capture_output=True,
                             check=True).stdout.decode().split()
    for name in ("init", "bin/busybox", "lib/modules/virtio_blk.ko", "lib/modules/ext4.ko",
                 "lib/modules/load-order", "dev/console"):
        assert name in listing, name
    assert "lib/modules/floppy.ko" not in listing        # the rules come on a virtio disk
    subprocess.run(["cpio", "-i", "-d", "--quiet", "bin/busybox", "lib/modules/*"], input=raw,
                   cwd=tmp_path, check=True)
    order = (tmp_path / "lib/modules/load-order").read_text().split()
    assert order.index("jbd2.ko") < order.index("ext4.ko")
    for module in order:
        data = (tmp_path / "lib/modules" / module).read_bytes()
        assert data[:4] == b"\x7fELF" and not data.endswith(builder.MODULE_SIGNATURE_MAGIC)
    busybox = subprocess.run(["file", str(tmp_path / "bin/busybox")], capture_output=True, text=True)
    assert "statically linked" in busybox.stdout


def test_root_image_is_ext4_without_journal_and_holds_the_helper(helper_vm_dir):
    require_programs("debugfs")
    release = (helper_vm_dir / "current").resolve()
    image = release / "image"
    with open(image, "rb") as stream:
        superblock = stream.read(2048)[1024:]
    assert struct.unpack_from("<H", superblock, 56)[0] == 0xEF53
    compat = struct.unpack_from("<I", superblock, 92)[0]
    assert not compat & 0x4, "has_journal must be off"
    listing = debugfs(image, "ls -l /usr/lib/snf-image-helper")
    assert "snf_image_helper.py" in listing and "tasks" in listing
    init = debugfs(image, "cat /usr/bin/snf-image-helper")     # imports the precompiled helper
    assert init.startswith("#!/usr/bin/python3 -S\n") and "import snf_image_helper\n" in init
    tasks = debugfs(image, "ls /usr/lib/snf-image-helper/tasks")
    for task in sorted(p.name for p in (REPO / "tasks.d").iterdir() if p.is_file()):
        assert task in tasks
    manifest = json.loads((release / "manifest.json").read_text())
    modules = debugfs(image, f"ls /usr/lib/modules/{manifest['kernel_version']}/kernel/fs")
    for fs in ("xfs", "btrfs", "ext4"):
        assert fs in modules
    dep = debugfs(image, f"cat /usr/lib/modules/{manifest['kernel_version']}/modules.dep")
    assert "kernel/fs/xfs/xfs.ko" in dep
    assert "perl" not in debugfs(image, "ls /usr/bin").split()
    assert "locale" not in debugfs(image, "ls /usr/share").split()


def test_other_task_set_reuses_the_root_stage(helper_vm_dir, tmp_path):
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "50RecordEnvironment").write_text("#!/bin/sh\nenv > /dev/null\n")
    (tasks / "50RecordEnvironment").chmod(0o755)
    other = built_helper_dir(tasks_dir=tasks)
    assert other != helper_vm_dir
    first = json.loads(((helper_vm_dir / "current").resolve() / "manifest.json").read_text())
    second = json.loads(((other / "current").resolve() / "manifest.json").read_text())
    assert first["root_stage"] == second["root_stage"]
    assert second["tasks"] == ["50RecordEnvironment"]
    assert "50RecordEnvironment" in debugfs((other / "current" / "image").resolve(),
                                            "ls -l /usr/lib/snf-image-helper/tasks")


@pytest.mark.qemu
def test_check_boots_the_helper_under_tcg(helper_vm_dir):
    require_programs("qemu-system-x86_64")
    proc = subprocess.run([sys.executable, str(REPO / "snf-image-update-helper.py"),
                           "--helper-dir", str(helper_vm_dir), "--check", "--accel", "auto"],
                          capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, SNF_IMAGE_CONFIG="/dev/null"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "accelerator tcg works" in proc.stdout or "accelerator kvm works" in proc.stdout
    assert "is complete and built for this snf-image" in proc.stdout


@pytest.mark.qemu
def test_rebuild_switches_current_and_keeps_previous(tmp_path, helper_vm_dir):
    """A forced second build into the same HELPER_DIR replaces `current`
    atomically, keeps the previous release, and the new release boots."""
    require_programs("qemu-system-x86_64")
    helper_dir = tmp_path / "hd"
    cache = Path(os.environ.get("SNF_IMAGE_TEST_CACHE", "/var/cache/snf-image-tests")) / "helper-root-cache"
    argv = [sys.executable, str(REPO / "snf-image-update-helper.py"), "--helper-dir", str(helper_dir),
            "--cache-dir", str(cache)]
    env = dict(os.environ, SNF_IMAGE_CONFIG="/dev/null")
    # the same inputs again: nothing to do; -f builds a new release anyway
    for extra, releases_after, up_to_date in (([], 1, False), ([], 1, True), (["-f"], 2, False)):
        proc = subprocess.run(argv + extra, capture_output=True, text=True, timeout=1800, env=env)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "root stage: cached" in proc.stdout
        assert len(list((helper_dir / "releases").iterdir())) == releases_after
        assert ("is up to date" in proc.stdout) == up_to_date
    releases = sorted(p.name for p in (helper_dir / "releases").iterdir())
    assert len(releases) == 2
    assert os.readlink(helper_dir / "current") == f"releases/{releases[-1]}"
    proc = subprocess.run(argv + ["--check", "--accel", "tcg"], capture_output=True, text=True,
                          timeout=1800, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert len(list((helper_dir / "releases").iterdir())) == 2


@pytest.mark.qemu
def test_export_import_of_a_real_release_boots(helper_vm_dir, tmp_path):
    """What an administrator does to move the helper to another node."""
    require_programs("qemu-system-x86_64")
    env = dict(os.environ, SNF_IMAGE_CONFIG="/dev/null")
    program = str(REPO / "snf-image-update-helper.py")
    archive = tmp_path / "helper.tar"
    proc = subprocess.run([sys.executable, program, "--helper-dir", str(helper_vm_dir),
                           "--export", str(archive)], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    node = tmp_path / "node2"
    proc = subprocess.run([sys.executable, program, "--helper-dir", str(node), "--import", str(archive),
                           "--check", "--accel", "tcg"], capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "accelerator tcg works" in proc.stdout
    assert (node / "current").resolve().name == (helper_vm_dir / "current").resolve().name


def test_root_image_has_the_programs_the_tasks_use(helper_vm_dir):
    require_programs("debugfs")
    image = (helper_vm_dir / "current").resolve() / "image"
    present = set(debugfs(image, "ls /usr/bin").split()) | set(debugfs(image, "ls /usr/sbin").split())
    needed = ("python3", "busybox", "sfdisk", "sgdisk", "partx", "blockdev", "blkid", "mount",
              "umount", "e2fsck", "tune2fs", "resize2fs", "xfs_growfs", "btrfs", "mkswap", "chroot",
              "ntfsresize", "ntfsinfo", "ntfsfix", "ntfs-3g", "hivexsh", "modprobe", "parted",
              "mkfs.vfat", "losetup", "findfs")
    assert [program for program in needed if program not in present] == []


def test_sigterm_during_multistrap_leaves_nothing_behind(tmp_path):
    """Killing the builder mid-build: one-line error, no work directory, no
    multistrap/apt/dpkg process left, nothing installed."""
    require_root()
    require_programs("multistrap")
    cache = tmp_path / "cache"
    helper_dir = tmp_path / "hd"
    temp = tmp_path / "tmp"
    temp.mkdir()
    proc = subprocess.Popen([sys.executable, str(REPO / "snf-image-update-helper.py"),
                             "--helper-dir", str(helper_dir), "--cache-dir", str(cache)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, SNF_IMAGE_CONFIG="/dev/null", TMPDIR=str(temp)))
    try:
        deadline = time.monotonic() + 120
        while not list(cache.glob(".rootfs-*/root/etc")) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert list(cache.glob(".rootfs-*")), "multistrap never started"
        time.sleep(2)
        proc.send_signal(signal.SIGTERM)
        _out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 1
    assert err.strip().splitlines() == ["Error: terminated by signal 15"]
    assert not list(cache.glob(".rootfs-*")) and not list(cache.glob("rootfs-*"))
    assert not (helper_dir / "current").exists()
    assert list(temp.iterdir()) == []
    leftovers = subprocess.run(["pgrep", "-f", str(cache)], capture_output=True, text=True).stdout
    assert leftovers.strip() == ""


def settings_for(helper_dir):
    args = builder.build_arg_parser().parse_args(["--helper-dir", str(helper_dir)])
    return builder.load_settings(args, environ={"SNF_IMAGE_CONFIG": "/dev/null"})


@pytest.mark.qemu
def test_module_tree_in_the_root_loads_filesystems_in_the_vm(helper_vm_dir):
    """modprobe inside the booted helper (its check mode, snf_image_check_modules=):
    the pruned, depmod'ed tree has what the tasks mount; a missing module fails."""
    require_programs("qemu-system-x86_64")
    settings = settings_for(helper_vm_dir)
    release = builder.current_release(helper_vm_dir)
    wanted = "xfs,btrfs,vfat,msdos,loop,fuse,isofs,squashfs,nls_utf8,nls_cp437"
    ok, _seconds, reason = builder.boot_once(settings, release, "tcg", 600,
                                             append_extra=(f"snf_image_check_modules={wanted}",))
    assert ok, reason
    ok, _seconds, reason = builder.boot_once(settings, release, "tcg", 600,
                                             append_extra=("snf_image_check_modules=no_such_module",))
    assert not ok and "no_such_module" in reason


@pytest.mark.qemu
def test_initrd_powers_off_when_the_root_disk_is_missing(helper_vm_dir, tmp_path):
    """No hang: without its root disk the initrd says why and powers off."""
    require_programs("qemu-system-x86_64")
    release = builder.current_release(helper_vm_dir)
    argv = builder.qemu_command(settings_for(helper_vm_dir), release, "tcg", tmp_path)
    drive = argv.index("-drive")
    del argv[drive:drive + 4]  # the root -drive and its -device
    assert "serial=snf-helper-root" not in " ".join(argv)
    proc = subprocess.run(argv, capture_output=True, timeout=300)
    console = (tmp_path / "console").read_text(errors="replace")
    assert "root disk snf-helper-root" in console and "did not appear" in console
    assert (tmp_path / "result").read_bytes() == b""
    assert proc.returncode == 0


def test_helper_library_is_precompiled_for_the_read_only_root(helper_vm_dir, tmp_path):
    """The root cannot store .pyc files at run time: the builder compiled
    snf_image_helper (imported by every Python task) with the root's python3,
    as unchecked hash-based .pyc files."""
    require_programs("debugfs")
    image = (helper_vm_dir / "current").resolve() / "image"
    listing = debugfs(image, "ls /usr/lib/snf-image-helper/__pycache__")
    names = [word for word in listing.split() if word.endswith(".pyc")]
    assert len(names) == 1 and names[0].startswith("snf_image_helper.cpython-3")
    dumped = tmp_path / "helper.pyc"
    subprocess.run(["debugfs", "-R", f"dump /usr/lib/snf-image-helper/__pycache__/{names[0]} {dumped}",
                    str(image)], capture_output=True, check=True)
    flags = struct.unpack_from("<I", dumped.read_bytes(), 4)[0]
    assert flags == 0b01, "hash-based, source not checked"


def test_standard_library_is_precompiled_for_the_read_only_root(helper_vm_dir, tmp_path):
    """multistrap does not compile Debian's Python: the builder does, so the
    helper does not compile json, re, enum, subprocess... from source at
    every boot (about 1 s under TCG)."""
    require_programs("debugfs")
    image = (helper_vm_dir / "current").resolve() / "image"
    libdir = "/usr/lib/" + next(word for word in debugfs(image, "ls /usr/lib").split()
                                if word.startswith("python3.") and word[8:].isdigit())
    tag = "cpython-" + libdir.removeprefix("/usr/lib/python").replace(".", "")

    def compiled(directory):
        return debugfs(image, f"ls {libdir}/{directory}/__pycache__").split()
    top = compiled(".")
    for module in ("enum", "subprocess", "tempfile", "shutil", "selectors", "threading", "functools",
                   "signal", "struct", "hashlib"):
        assert f"{module}.{tag}.pyc" in top, module
    for package in ("json", "re", "ctypes", "encodings", "collections"):
        assert f"__init__.{tag}.pyc" in compiled(package), package
    dumped = tmp_path / "enum.pyc"
    subprocess.run(["debugfs", "-R", f"dump {libdir}/__pycache__/enum.{tag}.pyc {dumped}", str(image)],
                   capture_output=True, check=True)
    assert struct.unpack_from("<I", dumped.read_bytes(), 4)[0] == 0b01, "hash-based, source not checked"
