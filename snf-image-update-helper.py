#!/usr/bin/python3
"""snf-image-update-helper: build, export, import and check the helper VM.

Pipeline: image source → O_DIRECT copy → floppy + **helper VM** → tasks → SUCCESS.
`create` boots the helper VM that this program builds into HELPER_DIR:

  1. root stage (slow, cached in HELPER_DIR/cache/rootfs-<hash>): multistrap a
     small Debian (python3, disk tools, static busybox, a kernel; no Perl), take
     the kernel out, extract the uncompressed vmlinux for PVH direct boot, prune
     docs/man/locales and unneeded modules, depmod the module tree;
  2. release (seconds): hard-link copy of the cached root + snf-image-helper.py
     and tasks.d, a read-only ext4 image made with `mkfs.ext4 -d` (no mount), a
     small initrd written here (uncompressed cpio newc: static busybox, the modules
     that reach the root disk, an /init), the kernel and manifest.json;
  3. switch HELPER_DIR/current to the new release by rename (atomic), keeping
     the previous release for deployments still running from it.

`--export`/`--import` move a release between nodes as a tar verified against
its manifest (the export writes FILE.sha256 next to it); `-u URL` (or
HELPER_URL in /etc/default/snf-image-update-helper) fetches such an export
over http(s) or file:// and verifies its sha256, so that a site builds once
and every node fetches. `--check` reports a missing, broken or outdated
helper in one line, then boots it once and reports which accelerator works
and how long the boot took.
"""

import argparse
import bz2
import contextlib
import fcntl
import gzip
import hashlib
import io
import json
import lzma
import os
import re
import shutil
import signal
import stat
import struct
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.parse
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path

if sys.version_info < (3, 11):
    sys.exit("Error: snf-image-update-helper needs Python 3.11 or newer")

# ---------------------------------------------------------------------------
# Constants
# ---------------------------------------------------------------------------

# Bump when the root stage changes in a way the cache key does not see.
ROOT_RECIPE_VERSION = 7

# upstream's file of this program: HELPER_URL only (SNF_IMAGE_UPDATE_HELPER_CONFIG overrides)
UPDATE_HELPER_CONFIG_FILE = "/etc/default/snf-image-update-helper"
FETCH_TIMEOUT = 60
HOST_APT_SOURCES = ("/etc/apt/sources.list.d/debian.sources", "/etc/apt/sources.list")
DATADIR_HELPER = Path("/usr/local/share/snf-image/helper")

# What the tasks need inside the helper. linux-image-amd64 is taken out of the
# root again (kernel, modules) after multistrap. usr-is-merged first: otherwise
# apt picks usrmerge, which pulls in Perl.
HELPER_PACKAGES = (
    "usr-is-merged", "python3", "util-linux", "e2fsprogs", "fdisk", "gdisk",
    "parted", "dosfstools", "xfsprogs", "btrfs-progs", "ntfs-3g",
    "libhivex-bin", "kmod", "busybox-static", "linux-image-amd64",
    "openssh-client", "libcrypt1",  # new SSH host keys, yescrypt password hashes
)

# Modules the initrd loads (with their dependencies) to reach the root disk.
# Built-in ones are skipped. The helper loads the rest from its root.
INITRD_MODULES = ("virtio_pci", "virtio_blk", "ext4", "crc32c_generic")

# Parts of the kernel's module tree kept in the helper root ("modprobe xfs"
# and friends work); everything else (sound, GPU, network, media...) goes.
KEPT_MODULE_DIRS = (
    "kernel/fs", "kernel/lib", "kernel/crypto", "kernel/block", "kernel/arch",
    "kernel/mm", "kernel/drivers/block", "kernel/drivers/virtio",
    "kernel/drivers/scsi", "kernel/drivers/ata", "kernel/drivers/md",
    "kernel/drivers/cdrom", "kernel/drivers/nvme", "kernel/drivers/char",
)

# Removed from the root to keep it small (globs relative to the root).
PRUNED_PATHS = (
    "usr/share/doc/*", "usr/share/man", "usr/share/info", "usr/share/locale",
    "usr/share/i18n", "usr/share/lintian", "usr/share/linda",
    "usr/share/bash-completion", "usr/share/common-licenses", "usr/share/initramfs-tools",
    "var/cache/apt/*", "var/lib/apt/lists/*", "var/log/*", "var/cache/debconf/*-old",
    "var/lib/dpkg/*-old", "boot/*", "vmlinuz", "vmlinuz.old", "initrd.img", "initrd.img.old",
    "etc/initramfs-tools", "tmp/*",
    # Perl: perl-base is Essential, but nothing in the helper runs Perl.
    "usr/bin/perl", "usr/bin/perl5*", "usr/lib/x86_64-linux-gnu/perl-base",
    "usr/lib/x86_64-linux-gnu/perl", "usr/share/perl5", "usr/share/perl",
)

# Inside the helper root.
HELPER_LIB_DIR = "usr/lib/snf-image-helper"
HELPER_PROGRAM_NAME = "snf_image_helper.py"
HELPER_INIT = "/usr/bin/snf-image-helper"
CHECK_FLAG = "snf_image_check_helper"
ROOT_SERIAL = "snf-helper-root"

RELEASE_FILES = ("kernel", "initrd", "image")
OPTIONAL_RELEASE_FILES = ("vmlinuz",)
BUILD_ID_RE = re.compile(r"^[0-9]{8}T[0-9]{6}Z-[0-9a-f]{8}(-[0-9]+)?$")

# ---------------------------------------------------------------------------
# Output and errors
# ---------------------------------------------------------------------------


class HelperError(Exception):
    """An expected failure: printed as one line by main()."""

    exit_code = 1


class ConfigError(HelperError):
    """Bad configuration or command-line value: exit status 2, as the host's."""

    exit_code = 2


_start_time = time.monotonic()


def step(message):
    print(f"[{time.monotonic() - _start_time:6.1f}s] {message}", flush=True)


def warn(message):
    print(f"Warning: {message}", file=sys.stderr, flush=True)


def run(argv, *, env=None, capture=False, input=None):
    """Run a program from an argument list; raise HelperError (naming its
    last line of output) on failure. With `capture` stdout is returned."""
    try:
        proc = subprocess.run(argv, capture_output=True, env=env, input=input, check=False)
    except OSError as err:
        raise HelperError(f"cannot run {argv[0]}: {err.strerror}") from None
    if proc.returncode != 0:
        detail = last_line(proc.stderr) if proc.stderr.strip() else last_line(proc.stdout)
        raise HelperError(f"{Path(argv[0]).name} failed (exit code {proc.returncode}): {detail}")
    return proc.stdout if capture else None


def run_logged(argv, log_path, *, env=None, cwd=None, heartbeat=10.0):
    """Run a long program with its output in log_path, printing its latest
    log line every `heartbeat` seconds; raise HelperError on failure."""
    name = Path(argv[0]).name
    with open(log_path, "wb") as log, \
            running_process(argv, stdin=subprocess.DEVNULL, stdout=log,
                            stderr=subprocess.STDOUT, env=env, cwd=cwd, start_new_session=True) as proc:
        next_report = time.monotonic() + heartbeat
        while proc.poll() is None:
            time.sleep(0.2)
            if time.monotonic() >= next_report:
                step(f"{name}: {last_line_of_file(log_path)[:100]}")
                next_report += heartbeat
    if proc.returncode != 0:
        raise HelperError(f"{name} failed (exit code {proc.returncode}): "
                          f"{last_line_of_file(log_path)} (log: {log_path})")


def last_line(data):
    lines = [line.strip() for line in (data or b"").decode(errors="replace").splitlines()]
    lines = [line for line in lines if line]
    return lines[-1] if lines else "no output"


def last_line_of_file(path):
    try:
        return last_line(Path(path).read_bytes()[-4096:])
    except OSError:
        return "no output"


# ---------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------

# The configuration grammar of /etc/default/snf-image and its settings table
# (defaults, syntax, which program reads each key) belong to the host program,
# snf-image-host.py; the builder loads it as a module. It is looked for next
# to this program (a checkout), then in the OS directories Ganeti searches,
# where `make install` (OSDIR) and the Debian package put it.
# SNF_IMAGE_HOST_DIRS (colon-separated) replaces this list.
HOST_PROGRAM_NAME = "snf-image-host.py"
HOST_PROGRAM_DIRS = (
    Path(__file__).resolve().parent,
    Path("/srv/ganeti/os/snf-image"),
    Path("/usr/local/lib/ganeti/os/snf-image"),
    Path("/usr/lib/ganeti/os/snf-image"),
    Path("/usr/share/ganeti/os/snf-image"),
)

# Command-line options that override a configuration key: option, key, help.
CONFIG_OPTIONS = (
    ("--helper-dir", "HELPER_DIR", "where releases are installed"),
    ("--cache-dir", "HELPER_CACHE_DIR", "cache of the slow root stage (default HELPER_DIR/cache)"),
    ("--suite", "HELPER_DEBIAN_SUITE", "Debian suite of the helper root"),
    ("--mirror", "HELPER_DEBIAN_MIRROR", "Debian mirror (default: the host's own APT sources)"),
    ("--multistrap-config", "MULTISTRAP_CONFIG",
     "multistrap configuration to use instead of the built-in one (it must still "
     "install python3, busybox-static and linux-image-amd64)"),
    ("--apt-pref-dir", "MULTISTRAP_APTPREFDIR",
     "APT preference files (pinning) put into the root's preferences.d for multistrap"),
    ("--memory", "HELPER_MEMORY", "MiB of RAM for the --check boot"),
    ("--user", "HELPER_USER", "user qemu runs as during --check"),
)


def host_program_dirs(environ=os.environ):
    listed = environ.get("SNF_IMAGE_HOST_DIRS")
    if listed:
        return tuple(Path(entry) for entry in listed.split(":") if entry)
    return HOST_PROGRAM_DIRS


def load_host_module(environ=os.environ):
    """snf-image-host.py as a module: the owner of the configuration and the version."""
    import importlib.machinery
    import importlib.util
    directories = host_program_dirs(environ)
    path = next((d / HOST_PROGRAM_NAME for d in directories if (d / HOST_PROGRAM_NAME).is_file()), None)
    if path is None:
        raise ConfigError(f"cannot find {HOST_PROGRAM_NAME} (it owns the configuration) in "
                          f"{':'.join(map(str, directories))}; set SNF_IMAGE_HOST_DIRS")
    name = "snf_image_host"
    loader = importlib.machinery.SourceFileLoader(name, str(path))
    module = importlib.util.module_from_spec(importlib.util.spec_from_loader(name, loader))
    loader.exec_module(module)
    return module


try:
    host_program = load_host_module()
except ConfigError as _error:
    print(f"Error: {_error}", file=sys.stderr)
    sys.exit(_error.exit_code)

# The release's version, owned by the host program; the builder writes it
# into each helper's manifest.json and release.json.
SNF_IMAGE_VERSION = host_program.SNF_IMAGE_VERSION


def load_host_config(overrides, environ=os.environ):
    """The host program's Config for /etc/default/snf-image (or SNF_IMAGE_CONFIG)
    with `overrides` on top: parsed, checked and warned about exactly as the
    host does; a mistake is a ConfigError."""
    try:
        return host_program.load_config(environ, overrides=overrides)
    except host_program.SnfError as err:
        raise ConfigError(str(err)) from None


def parse_apt_sources(text, deb822=True):
    """(uri, suites) pairs of the 'deb' entries of an APT sources file."""
    entries = []
    if deb822:
        for stanza in re.split(r"\n\s*\n", text):
            fields = {}
            for line in stanza.splitlines():
                if line.startswith("#") or ":" not in line or line[:1].isspace():
                    continue
                name, value = line.split(":", 1)
                fields[name.strip().lower()] = value.split()
            if "deb" in fields.get("types", []) and fields.get("enabled", ["yes"])[0] != "no":
                for uri in fields.get("uris", []):
                    entries.append((uri, fields.get("suites", [])))
    else:
        for line in text.splitlines():
            words = re.sub(r"\[[^]]*\]", " ", line.split("#", 1)[0]).split()
            if len(words) >= 3 and words[0] == "deb":
                entries.append((words[1], [words[2]]))
    return entries


def host_debian_mirror(paths=HOST_APT_SOURCES):
    """The Debian mirror of the host's own APT sources (not the security one)."""
    for path in paths:
        try:
            text = Path(path).read_text()
        except OSError:
            continue
        for uri, suites in parse_apt_sources(text, deb822=path.endswith(".sources")):
            if any(suite.endswith("-security") or "/updates" in suite for suite in suites):
                continue
            if uri.startswith(("http://", "https://", "file:/", "ftp://")):
                return uri.rstrip("/")
    raise HelperError("no Debian mirror in the host's APT sources; set HELPER_DEBIAN_MIRROR")


@dataclass(frozen=True)
class Settings:
    helper_dir: Path
    cache_dir: Path
    suite: str
    mirror: str
    memory: int
    user: str
    programs: dict
    helper_program: Path
    tasks_dir: Path
    multistrap_config: Path | None = None
    apt_pref_dir: Path | None = None
    rebuild_root: bool = False
    accel: str = "auto"
    check_timeout: float = 300.0
    config: object = None       # the host program's Config these settings came from


def default_helper_sources():
    """snf-image-helper.py and tasks.d: next to this script in a checkout, else
    PREFIX/share/snf-image/helper for the PREFIX/sbin it was installed into
    (`make install SBINDIR=… DATADIR=…` with the same prefix), else DATADIR."""
    here = Path(__file__).resolve().parent
    for directory in (here, here.parent / "share" / "snf-image" / "helper"):
        if (directory / "snf-image-helper.py").exists():
            return directory / "snf-image-helper.py", directory / "tasks.d"
    return DATADIR_HELPER / "snf-image-helper.py", DATADIR_HELPER / "tasks.d"


def build_arg_parser():
    parser = argparse.ArgumentParser(
        prog="snf-image-update-helper",
        description="Build the snf-image helper VM (multistrap root, kernel, initrd, "
                    "read-only ext4 image) into HELPER_DIR and switch to it atomically. "
                    "Without an action option it builds, or fetches HELPER_URL when "
                    "one is configured.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="""\
configuration:
  KEY="value" lines of /etc/default/snf-image (SNF_IMAGE_CONFIG names another
  file), parsed, never executed, with the grammar and settings table of
  snf-image-host.py (found next to this program or in the Ganeti OS
  directories; SNF_IMAGE_HOST_DIRS overrides); command-line options win. Programs:
  MULTISTRAP, MKFS_EXT4, DEPMOD, QEMU, ZSTD, CP, CHROOT. MULTISTRAP_CONFIG and
  MULTISTRAP_APTPREFDIR (upstream's names) are used only when set.

HELPER_DIR after a build:
  current -> releases/<build-id>    switched by rename; the previous release is kept
  releases/<id>/kernel              vmlinux (PVH direct boot) or bzImage
  releases/<id>/initrd              busybox + the modules that reach the root disk
  releases/<id>/image               read-only ext4 root
  releases/<id>/manifest.json       versions, packages, sha256 of every file
  kernel, initrd, image             compatibility links to current/...
  cache/rootfs-<hash>/              multistrap + kernel, reused while the
                                    suite, mirror and package list stay the same

HELPER_URL:
  /etc/default/snf-image-update-helper (SNF_IMAGE_UPDATE_HELPER_CONFIG names
  another file) may set HELPER_URL="URL" as with the original snf-image; then
  the default action fetches that URL instead of building (--build still
  builds). The URL names a tar written by --export; URL.sha256 (written by
  --export next to it) must be served too and is always verified.

options of the original snf-image-update-helper:
  -y, -f, -u URL and -h work as there. -c (skip the checksum) is refused: a
  fetched helper is always verified. The original's helper archives (kernel,
  initrd, image, version) cannot be used: build here and move with --export.

examples:
  snf-image-update-helper -y                    build (seconds when cached)
  snf-image-update-helper --build --check       build, then boot it once
  snf-image-update-helper --export /srv/www/helper.tar.gz   once per site
  snf-image-update-helper -y -u http://repo.example.org/helper.tar.gz   on every node
  snf-image-update-helper --import helper.tar.gz --check    air-gapped node
  snf-image-update-helper --check               is this node's helper usable?
""",
    )
    actions = parser.add_argument_group("actions")
    actions.add_argument("--build", action="store_true",
                         help="build a release (the default when no other action is given "
                              "and no HELPER_URL is configured)")
    actions.add_argument("--export", metavar="FILE",
                         help="write the current release as a tar (.tar, .tar.gz, .tar.xz) "
                              "and its sha256 as FILE.sha256")
    actions.add_argument("--import", dest="import_file", metavar="FILE",
                         help="install a release exported by --export after verifying it "
                              "(and FILE.sha256 when present)")
    actions.add_argument("-u", "--url", metavar="URL",
                         help="fetch a release exported by --export from an http, https or "
                              "file URL, verify URL.sha256 and the manifest, install it "
                              "[HELPER_URL]")
    actions.add_argument("--check", action="store_true",
                         help="report a missing, broken or outdated helper in one line, then "
                              "boot the current release once (accelerator and boot time)")
    answers = parser.add_argument_group("as the original snf-image-update-helper")
    answers.add_argument("-y", "--yes", action="store_true",
                         help="do not ask before replacing the current helper (asked only on "
                              "a terminal)")
    answers.add_argument("-f", "--force", action="store_true",
                         help="build a new release even when the current one is up to date; "
                              "install a fetched or imported release built for another "
                              "snf-image version")
    answers.add_argument("-c", dest="skip_checksum", action="store_true",
                         help=argparse.SUPPRESS)
    options = parser.add_argument_group("configuration (override the configuration file)")
    for option, key, help_text in CONFIG_OPTIONS:
        options.add_argument(option, dest=key, metavar=key, help=f"{help_text} [{key}]")
    options.add_argument("--tasks", metavar="DIR", help="tasks directory to install (default tasks.d)")
    options.add_argument("--helper-program", metavar="FILE",
                         help="snf-image-helper.py to install (default: the one shipped)")
    options.add_argument("--rebuild-root", action="store_true",
                         help="ignore the cached root stage and run multistrap again")
    options.add_argument("--accel", choices=("auto", "kvm", "tcg"), default="auto",
                         help="accelerator for --check (auto tries kvm briefly, then tcg)")
    options.add_argument("--check-timeout", type=float, default=300.0, metavar="SECONDS",
                         help="give up a --check boot under tcg after this long")
    return parser


def load_settings(args, environ=os.environ):
    overrides = {key: getattr(args, key) for _option, key, _help in CONFIG_OPTIONS
                 if getattr(args, key, None) is not None}
    config = load_host_config(overrides, environ)
    helper_dir = Path(config.HELPER_DIR).absolute()
    cache_dir = Path(config.HELPER_CACHE_DIR).absolute() if config.HELPER_CACHE_DIR else helper_dir / "cache"
    optional_paths = {}
    for key in ("MULTISTRAP_CONFIG", "MULTISTRAP_APTPREFDIR"):
        optional_paths[key] = Path(getattr(config, key)).absolute() if getattr(config, key) else None
    if optional_paths["MULTISTRAP_CONFIG"] and not optional_paths["MULTISTRAP_CONFIG"].is_file():
        raise ConfigError(f"MULTISTRAP_CONFIG {config.MULTISTRAP_CONFIG} does not exist")
    if optional_paths["MULTISTRAP_APTPREFDIR"] and not optional_paths["MULTISTRAP_APTPREFDIR"].is_dir():
        raise ConfigError(f"MULTISTRAP_APTPREFDIR {config.MULTISTRAP_APTPREFDIR} is not a directory")
    program, tasks = default_helper_sources()
    return Settings(
        helper_dir=helper_dir,
        cache_dir=cache_dir,
        suite=config.HELPER_DEBIAN_SUITE,
        mirror=config.HELPER_DEBIAN_MIRROR,
        memory=config.HELPER_MEMORY,
        user=config.HELPER_USER,
        programs={setting.name: getattr(config, setting.name) for setting in host_program.SETTINGS
                  if setting.is_program and setting.read_by("builder")},
        helper_program=Path(args.helper_program).absolute() if args.helper_program else program,
        tasks_dir=Path(args.tasks).absolute() if args.tasks else tasks,
        multistrap_config=optional_paths["MULTISTRAP_CONFIG"],
        apt_pref_dir=optional_paths["MULTISTRAP_APTPREFDIR"],
        rebuild_root=args.rebuild_root,
        accel=args.accel,
        check_timeout=args.check_timeout,
        config=config,
    )


# ---------------------------------------------------------------------------
# Resources
# ---------------------------------------------------------------------------


@contextlib.contextmanager
def temporary_directory(parent, prefix):
    """A directory (mode 0755) removed on exit, whatever happens."""
    Path(parent).mkdir(parents=True, exist_ok=True)
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    try:
        path.chmod(0o755)
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


class StagingDirectory:
    """A work directory next to its destination: renamed to `final` when the
    block ends normally with `final` set (readers never see it half-written),
    removed otherwise."""

    def __init__(self, parent, prefix):
        self.parent, self.prefix = Path(parent), prefix
        self.path = self.final = None

    def __enter__(self):
        self.parent.mkdir(parents=True, exist_ok=True)
        self.path = Path(tempfile.mkdtemp(prefix=self.prefix, dir=self.parent))
        self.path.chmod(0o755)
        return self

    def __exit__(self, exc_type, _exc, _tb):
        if exc_type is None and self.final is not None:
            os.rename(self.path, self.final)
        else:
            shutil.rmtree(self.path, ignore_errors=True)


@contextlib.contextmanager
def exclusive_lock(path, what):
    """An flock held for the duration; waits for another builder, saying so."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            step(f"waiting for another builder to release {what} ({path})")
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


@contextlib.contextmanager
def running_process(argv, **popen_options):
    """A child process, killed and reaped on leaving the block; started with
    start_new_session=True its whole process group is killed (multistrap's
    apt and dpkg children too)."""
    try:
        proc = subprocess.Popen(argv, **popen_options)
    except OSError as err:
        raise HelperError(f"cannot run {argv[0]}: {err.strerror}") from None
    try:
        yield proc
    finally:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                if popen_options.get("start_new_session"):
                    os.killpg(proc.pid, signal.SIGKILL)
                else:
                    proc.kill()
        proc.wait()


# ---------------------------------------------------------------------------
# Hashing and small file helpers
# ---------------------------------------------------------------------------


def sha256_file(path):
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def hash_tree(digest, root):
    """Feed names, modes and contents of every file below root into digest."""
    root = Path(root)
    if not root.exists():
        digest.update(b"<absent>")
        return
    for path in sorted(root.rglob("*")):
        relative = path.relative_to(root).as_posix()
        info = path.lstat()
        digest.update(f"{relative}\0{stat.S_IMODE(info.st_mode) & 0o111:o}\0".encode())
        if path.is_symlink():
            digest.update(os.readlink(path).encode())
        elif path.is_file():
            digest.update(path.read_bytes())
        digest.update(b"\0")


def write_file_atomic(path, data, mode=0o644):
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as stream:
        stream.write(data)
        stream.flush()
        os.fsync(stream.fileno())
    os.chmod(tmp, mode)
    os.replace(tmp, path)


def link_or_copy(source, destination):
    try:
        os.link(source, destination)
    except OSError:
        shutil.copy2(source, destination)


def replace_symlink(target, link_path):
    """Point link_path at target; readers see either the old or the new link."""
    link_path = Path(link_path)
    tmp = link_path.with_name(f".{link_path.name}.tmp{os.getpid()}")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    os.symlink(target, tmp)
    os.replace(tmp, link_path)


# ---------------------------------------------------------------------------
# Kernel: vmlinux out of a bzImage, PVH note
# ---------------------------------------------------------------------------

PT_NOTE = 4
XEN_ELFNOTE_PHYS32_ENTRY = 18


def decompress_kernel_payload(payload, zstd_command=("zstd",)):
    """Decompress a bzImage payload (gzip, xz, lzma, bzip2 with the standard
    library; zstd through the zstd program)."""
    if payload.startswith(b"\x1f\x8b"):
        return zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(payload)
    if payload.startswith(b"\xfd7zXZ\x00"):
        return lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(payload)
    if payload.startswith(b"\x5d\x00\x00"):
        return lzma.LZMADecompressor(format=lzma.FORMAT_ALONE).decompress(payload)
    if payload.startswith(b"BZh"):
        return bz2.BZ2Decompressor().decompress(payload)
    if payload.startswith(b"\x28\xb5\x2f\xfd"):
        return run([*zstd_command, "-q", "-d", "-c"], input=payload, capture=True)
    raise HelperError(f"unsupported kernel compression (magic {payload[:4].hex()})")


def elf_extent(elf):
    """Bytes of an ELF64 file actually described by its headers (drops the
    relocation table the bzImage decompressor appends)."""
    e_phoff, e_shoff = struct.unpack_from("<QQ", elf, 0x20)
    e_phentsize, e_phnum, e_shentsize, e_shnum = struct.unpack_from("<HHHH", elf, 0x36)
    end = max(0x40, e_phoff + e_phentsize * e_phnum, e_shoff + e_shentsize * e_shnum)
    for index in range(e_phnum):
        _type, _flags, offset, _vaddr, _paddr, filesz = struct.unpack_from(
            "<IIQQQQ", elf, e_phoff + index * e_phentsize)
        end = max(end, offset + filesz)
    return end


def extract_vmlinux(bzimage, zstd_command=("zstd",)):
    """The uncompressed ELF kernel inside a bzImage (boot protocol >= 2.08)."""
    if bzimage[:4] == b"\x7fELF":
        return bzimage
    if len(bzimage) < 0x260 or bzimage[0x202:0x206] != b"HdrS":
        raise HelperError("kernel is neither an ELF vmlinux nor a bzImage")
    protocol = struct.unpack_from("<H", bzimage, 0x206)[0]
    if protocol < 0x208:
        raise HelperError(f"bzImage boot protocol {protocol:#x} has no payload fields")
    setup_sects = bzimage[0x1f1] or 4
    payload_offset, payload_length = struct.unpack_from("<II", bzimage, 0x248)
    start = (setup_sects + 1) * 512 + payload_offset
    payload = bzimage[start:start + payload_length]
    if len(payload) != payload_length or payload_length < 8:
        raise HelperError("bzImage payload lies outside the file")
    # The kernel build appends the uncompressed size (le32) to the payload.
    expected_size = struct.unpack("<I", payload[-4:])[0]
    vmlinux = decompress_kernel_payload(payload[:-4], zstd_command)
    if len(vmlinux) != expected_size:
        raise HelperError(f"decompressed kernel is {len(vmlinux)} bytes, expected {expected_size}")
    if vmlinux[:4] != b"\x7fELF" or vmlinux[4] != 2:
        raise HelperError("decompressed kernel is not an ELF64 file")
    return vmlinux[:elf_extent(vmlinux)]


def elf_has_pvh_note(elf):
    """True if the ELF has the Xen PHYS32_ENTRY note qemu needs for PVH boot."""
    if elf[:4] != b"\x7fELF" or elf[4] != 2 or elf[5] != 1:
        return False
    e_phoff = struct.unpack_from("<Q", elf, 0x20)[0]
    e_phentsize, e_phnum = struct.unpack_from("<HH", elf, 0x36)
    for index in range(e_phnum):
        p_type, _flags, offset, _vaddr, _paddr, filesz = struct.unpack_from(
            "<IIQQQQ", elf, e_phoff + index * e_phentsize)
        if p_type != PT_NOTE:
            continue
        position, end = offset, offset + filesz
        while position + 12 <= end:
            namesz, descsz, note_type = struct.unpack_from("<III", elf, position)
            name = elf[position + 12:position + 12 + namesz]
            if name == b"Xen\x00" and note_type == XEN_ELFNOTE_PHYS32_ENTRY:
                return True
            position += 12 + (namesz + 3) // 4 * 4 + (descsz + 3) // 4 * 4
    return False


# ---------------------------------------------------------------------------
# Modules
# ---------------------------------------------------------------------------


def module_name(path):
    name = Path(path).name
    for suffix in (".xz", ".zst", ".gz"):
        name = name.removesuffix(suffix)
    return name.removesuffix(".ko").replace("-", "_")


def parse_modules_dep(text):
    """{name: (relative path, [dependency paths])} from modules.dep."""
    table = {}
    for line in text.splitlines():
        if ":" not in line:
            continue
        path, deps = line.split(":", 1)
        table[module_name(path)] = (path.strip(), deps.split())
    return table


def parse_modules_builtin(text):
    return {module_name(line.strip()) for line in text.splitlines() if line.strip()}


def module_load_order(wanted, modules_dep, builtin):
    """Relative paths of the wanted modules and their dependencies,
    dependencies first; built-in modules are skipped."""
    by_path = {path: name for name, (path, _deps) in modules_dep.items()}
    order, seen = [], set()

    def visit(name):
        if name in seen:
            return
        seen.add(name)
        path, deps = modules_dep[name]
        for dep in reversed(deps):
            visit(by_path.get(dep, module_name(dep)))
        order.append(path)

    for name in wanted:
        name = name.replace("-", "_")
        if name in modules_dep:
            visit(name)
        elif name not in builtin:
            raise HelperError(f"kernel module {name} is neither a module nor built in")
    return order


def read_module(path, zstd_command=("zstd",)):
    """Module bytes, decompressed (busybox insmod gets plain .ko files)."""
    data = Path(path).read_bytes()
    if data.startswith(b"\xfd7zXZ\x00"):
        return lzma.decompress(data)
    if data.startswith(b"\x1f\x8b"):
        return gzip.decompress(data)
    if data.startswith(b"\x28\xb5\x2f\xfd"):
        return run([*zstd_command, "-q", "-d", "-c", str(path)], capture=True)
    return data


MODULE_SIGNATURE_MAGIC = b"~Module signature appended~\n"


def without_signature(module):
    """The module without its appended signature: the kernel then skips the
    check (hashing megabytes under TCG) and loads it, since the helper's
    kernel does not enforce signatures; the modules come from the same
    package as the kernel."""
    if not module.endswith(MODULE_SIGNATURE_MAGIC):
        return module
    # struct module_signature: 8 bytes, then the signature's length (be32)
    info_end = len(module) - len(MODULE_SIGNATURE_MAGIC)
    signature_length = struct.unpack(">I", module[info_end - 4:info_end])[0]
    end = info_end - 12 - signature_length
    if end <= 0:
        raise HelperError("malformed module signature")
    return module[:end]


def initrd_modules(root, zstd_command=("zstd",)):
    """(file name, bytes) of INITRD_MODULES and their dependencies in load
    order, from the root's (pruned, depmod'ed) module tree."""
    module_dirs = sorted((root / "lib/modules").glob("*"))
    if len(module_dirs) != 1:
        raise HelperError(f"expected one module tree in the helper root, found {len(module_dirs)}")
    module_dir = module_dirs[0]
    dep = parse_modules_dep((module_dir / "modules.dep").read_text())
    builtin = parse_modules_builtin((module_dir / "modules.builtin").read_text())
    return [(module_name(relative) + ".ko",
             without_signature(read_module(module_dir / relative, zstd_command)))
            for relative in module_load_order(INITRD_MODULES, dep, builtin)]


# ---------------------------------------------------------------------------
# Initrd: cpio newc written here
# ---------------------------------------------------------------------------


class CpioWriter:
    """Writes a cpio archive in the 'newc' format the kernel unpacks."""

    def __init__(self, stream):
        self.stream = stream
        self.next_inode = 1
        self.closed = False

    def _entry(self, name, mode, data=b"", rdev=(0, 0), nlink=1):
        name_bytes = name.encode() + b"\0"
        header = "070701" + "".join(f"{value:08x}" for value in (
            self.next_inode if name != "TRAILER!!!" else 0, mode, 0, 0, nlink, 0,
            len(data), 0, 0, rdev[0], rdev[1], len(name_bytes), 0))
        self.next_inode += 1
        self.stream.write(header.encode() + name_bytes)
        self.stream.write(b"\0" * (-(110 + len(name_bytes)) % 4))
        self.stream.write(data)
        self.stream.write(b"\0" * (-len(data) % 4))

    def __enter__(self):
        return self

    def __exit__(self, exc_type, _exc, _tb):
        if exc_type is None:
            self.close()

    def add_directory(self, name, mode=0o755):
        self._entry(name, stat.S_IFDIR | mode, nlink=2)

    def add_file(self, name, data, mode=0o644):
        self._entry(name, stat.S_IFREG | mode, data)

    def add_symlink(self, name, target):
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def add_char_device(self, name, major, minor, mode=0o600):
        self._entry(name, stat.S_IFCHR | mode, rdev=(major, minor))

    def close(self):
        if not self.closed:
            self._entry("TRAILER!!!", 0, nlink=1)
            self.closed = True


INIT_SCRIPT = r"""#!/bin/sh
# snf-image helper initrd: load the modules that reach the root disk, mount
# it read-only and hand over to init= (snf-image-helper) with /proc, /sys and
# /dev already mounted. On any failure: power off (the host sees no result).
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev

fail() {
    echo "snf-image initrd: ERROR: $*"
    poweroff -f
    sleep 10
}

root=/dev/vda
init=/sbin/init
fstype=ext4
for word in $(cat /proc/cmdline); do
    case "$word" in
        root=*) root="${word#root=}" ;;
        init=*) init="${word#init=}" ;;
        rootfstype=*) fstype="${word#rootfstype=}" ;;
        snf_image_initrd_debug) set -x ;;
    esac
done

while read -r module; do
    insmod "/lib/modules/$module" || echo "snf-image initrd: cannot load $module"
done < /lib/modules/load-order

# Prefer the disk whose virtio serial names it as the helper root.
device=
tries=0
while [ -z "$device" ]; do
    for serial in /sys/block/vd*/serial; do
        [ -e "$serial" ] || continue
        if [ "$(cat "$serial")" = "@ROOT_SERIAL@" ]; then
            device="/dev/$(basename "$(dirname "$serial")")"
        fi
    done
    if [ -z "$device" ] && [ "$tries" -ge 50 ] && [ -b "$root" ]; then
        device="$root"
    fi
    if [ -z "$device" ]; then
        tries=$((tries + 1))
        [ "$tries" -le 400 ] || fail "root disk @ROOT_SERIAL@ / $root did not appear"
        usleep 50000
    fi
done

mount -t "$fstype" -o ro "$device" /newroot || fail "cannot mount $device on /newroot"
[ -x "/newroot$init" ] || [ -L "/newroot$init" ] || fail "no init $init in the helper root"
for fs in dev proc sys; do
    mount --move "/$fs" "/newroot/$fs" || fail "cannot move /$fs"
done
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
exec switch_root /newroot "$init" "$@"
fail "switch_root failed"
"""

INIT_APPLETS = ("sh", "mount", "insmod", "poweroff", "sleep", "usleep", "cat",
                "basename", "dirname", "switch_root", "echo")


def write_initrd(path, busybox, modules):
    """Uncompressed cpio: /init, static busybox, decompressed modules (name,
    bytes) in load order. Not compressed: a few megabytes more on the node's
    disk, but the guest does not inflate it (about 0.3 s under TCG)."""
    raw = io.BytesIO()
    with CpioWriter(raw) as archive:
        for directory in ("bin", "dev", "proc", "sys", "newroot", "lib", "lib/modules"):
            archive.add_directory(directory)
        archive.add_char_device("dev/console", 5, 1)
        archive.add_char_device("dev/null", 1, 3, 0o666)
        archive.add_file("bin/busybox", busybox, 0o755)
        for applet in INIT_APPLETS:
            archive.add_symlink(f"bin/{applet}", "busybox")
        archive.add_file("init", INIT_SCRIPT.replace("@ROOT_SERIAL@", ROOT_SERIAL).encode(), 0o755)
        order = []
        for name, data in modules:
            archive.add_file(f"lib/modules/{name}", data)
            order.append(name)
        archive.add_file("lib/modules/load-order", "".join(f"{n}\n" for n in order).encode())
    write_file_atomic(path, raw.getvalue())


# ---------------------------------------------------------------------------
# Root stage (cached): multistrap, kernel, pruning
# ---------------------------------------------------------------------------


def multistrap_config(suite, mirror, packages):
    return (
        "[General]\n"
        "arch=amd64\n"
        "cleanup=true\n"
        "noauth=false\n"
        "unpack=true\n"
        "explicitsuite=false\n"
        "aptsources=Debian\n"
        "bootstrap=Debian\n"
        "\n"
        "[Debian]\n"
        f"packages={' '.join(packages)}\n"
        f"source={mirror}\n"
        "keyring=debian-archive-keyring\n"
        f"suite={suite}\n"
        "components=main\n"
    )


def root_cache_key(suite, mirror, multistrap_config=None, apt_pref_dir=None):
    recipe = {"recipe": ROOT_RECIPE_VERSION, "suite": suite, "mirror": mirror,
              "packages": HELPER_PACKAGES, "kept_modules": KEPT_MODULE_DIRS,
              "pruned": PRUNED_PATHS}
    digest = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode())
    if multistrap_config:
        digest.update(b"multistrap-config\0" + Path(multistrap_config).read_bytes())
    if apt_pref_dir:
        digest.update(b"apt-preferences\0")
        hash_tree(digest, apt_pref_dir)
    return digest.hexdigest()[:16]


def installed_packages(root):
    """{package: version} of the installed packages, from the dpkg status file."""
    packages = {}
    text = (Path(root) / "var/lib/dpkg/status").read_text(errors="replace")
    for stanza in text.split("\n\n"):
        fields = dict(re.findall(r"^([A-Za-z-]+): (.*)$", stanza, re.MULTILINE))
        if fields.get("Status", "").endswith(" installed") and "Package" in fields:
            packages[fields["Package"]] = fields.get("Version", "")
    return packages


def remove_path(path):
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)


def prune_root(root):
    for pattern in PRUNED_PATHS:
        for path in root.glob(pattern):
            remove_path(path)
    gconv = root / "usr/lib/x86_64-linux-gnu/gconv"
    if gconv.is_dir():
        for path in gconv.iterdir():
            # hivex reads the registry's compressed key names as Latin-1
            if not (path.name.startswith("gconv-modules") or
                    path.name.startswith(("UTF-", "UNICODE", "ISO8859-1."))):
                remove_path(path)
    zoneinfo = root / "usr/share/zoneinfo"
    if zoneinfo.is_dir():
        for path in zoneinfo.iterdir():
            if path.name not in ("UTC", "Etc", "zone.tab", "zone1970.tab", "tzdata.zi"):
                remove_path(path)


def prune_modules(module_dir):
    for path in sorted(module_dir.glob("kernel/**/*"), reverse=True):
        relative = path.relative_to(module_dir).as_posix()
        kept = any(relative == d or relative.startswith(d + "/") or d.startswith(relative + "/")
                   for d in KEPT_MODULE_DIRS)
        if not kept:
            remove_path(path)


def configure_root(root):
    (root / "etc/hostname").write_text("snf-image-helper\n")
    (root / "etc/fstab").write_text("# The helper root is mounted read-only by the initrd.\n")
    mtab = root / "etc/mtab"
    if mtab.is_symlink() or mtab.exists():
        mtab.unlink()
    mtab.symlink_to("../proc/self/mounts")
    for directory in ("proc", "sys", "dev", "tmp", "run", "mnt", "var/tmp"):
        (root / directory).mkdir(parents=True, exist_ok=True)


# Parts of the standard library the helper and its tasks never import.
UNCOMPILED_STDLIB_PARTS = r"/(test|idlelib|tkinter|turtledemo|lib2to3|ensurepip|pydoc_data)/"


def precompile_standard_library(settings, root):
    """Byte-compile the root's Python standard library, all of it (Debian's
    maintainer scripts compile only part of it, timestamp-based), as
    unchecked-hash .pyc files: the root never changes after this stage, and
    the helper's root is read-only at boot, so a module without a valid .pyc
    would be compiled from source at every boot (json, re, enum, subprocess,
    tempfile: about 1 s of the helper's start-up under TCG), and a
    timestamp-based one would depend on the file times surviving mkfs."""
    directories = [f"/{path.relative_to(root)}" for path in sorted(root.glob("usr/lib/python3*"))
                   if path.is_dir()]
    run([*settings.programs["CHROOT"], str(root), "python3", "-m", "compileall", "-q", "-f",
         "--invalidation-mode", "unchecked-hash", "-x", UNCOMPILED_STDLIB_PARTS, *directories])


def find_in_root(root, program):
    """Path of a program in the root: /usr/bin, or /bin where an older suite's
    packages undid the merged /usr (dpkg -x replaces the bin -> usr/bin link)."""
    for directory in ("usr/bin", "bin", "usr/sbin", "sbin"):
        path = root / directory / program
        if path.is_file():
            return path
    return None


def build_root_stage(settings, entry, mirror, log_path):
    """Run multistrap and prepare the cache entry directory `entry`."""
    root = entry / "root"
    # Merged /usr before unpacking: trixie packages ship /usr paths only and
    # dpkg in the chroot needs /bin/sh.
    for directory in ("bin", "sbin", "lib", "lib64"):
        (root / "usr" / directory).mkdir(parents=True, exist_ok=True)
        (root / directory).symlink_to(f"usr/{directory}")
    if settings.apt_pref_dir:
        preferences = root / "etc/apt/preferences.d"
        preferences.mkdir(parents=True)
        for path in sorted(settings.apt_pref_dir.iterdir()):
            if path.is_file():
                shutil.copyfile(path, preferences / path.name)
    if settings.multistrap_config:
        config = settings.multistrap_config
        step(f"multistrap: using {config} instead of the built-in configuration")
    else:
        config = entry / "multistrap.conf"
        config.write_text(multistrap_config(settings.suite, mirror, HELPER_PACKAGES))
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "USER": "root", "HOME": "/root",
           "LC_ALL": "C", "DEBIAN_FRONTEND": "noninteractive",
           "INITRD": "No"}  # the kernel postinst must not build an initramfs
    # multistrap and apt leave temporary files behind when killed: they go to
    # the root's own tmp (emptied by prune_root, removed with the staging
    # directory on failure). TMPDIR must be relative, resolved from the root:
    # multistrap opens "./" + the directory `mktemp -t` made for each
    # package's maintainer scripts, so an absolute TMPDIR makes it lose them
    # all, and no package gets configured.
    (root / "tmp").mkdir(exist_ok=True)
    (root / "tmp").chmod(0o1777)
    env["TMPDIR"] = "tmp"
    step(f"multistrap: Debian {settings.suite} from {mirror} (about 20-60 s; log {log_path})")
    run_logged([*settings.programs["MULTISTRAP"], "-d", str(root), "-f", str(config)], log_path,
               env=env, cwd=root)
    if find_in_root(root, "python3") is None or find_in_root(root, "busybox") is None:
        raise HelperError(f"multistrap finished but the root lacks python3 or busybox (log: {log_path})")
    packages = installed_packages(root)

    step("kernel: taking the kernel out of the root")
    kernels = sorted((root / "boot").glob("vmlinuz-*"))
    module_dirs = sorted((root / "lib/modules").glob("*"))
    if len(kernels) != 1 or len(module_dirs) != 1:
        raise HelperError(f"expected one kernel in the helper root, found {len(kernels)}")
    kernel_version = kernels[0].name.removeprefix("vmlinuz-")
    if module_dirs[0].name != kernel_version:
        raise HelperError(f"kernel {kernel_version} but modules for {module_dirs[0].name}")
    shutil.copy2(kernels[0], entry / "vmlinuz")
    for config_file in (root / "boot").glob("config-*"):
        shutil.copy2(config_file, entry / "kernel-config")
    bzimage = (entry / "vmlinuz").read_bytes()
    kernel_format = "bzImage"
    try:
        vmlinux = extract_vmlinux(bzimage, settings.programs["ZSTD"])
        if elf_has_pvh_note(vmlinux):
            write_file_atomic(entry / "vmlinux", vmlinux)
            kernel_format = "vmlinux-pvh"
        else:
            warn("the extracted vmlinux has no PVH note; the helper boots the bzImage")
    except HelperError as err:
        warn(f"cannot extract vmlinux ({err}); the helper boots the bzImage")

    step("modules: pruning the module tree, depmod")
    module_dir = module_dirs[0]
    if not (module_dir / "modules.dep").exists():  # the kernel's postinst did not get that far
        run([*settings.programs["DEPMOD"], "-b", str(root), kernel_version])
    prune_modules(module_dir)
    run([*settings.programs["DEPMOD"], "-b", str(root), kernel_version])

    step("root: removing docs, man pages, locales, Perl")
    prune_root(root)
    configure_root(root)
    step("python: byte-compiling the standard library")
    precompile_standard_library(settings, root)
    info = {"suite": settings.suite, "mirror": mirror, "kernel_version": kernel_version,
            "kernel_format": kernel_format, "packages": packages,
            "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    (entry / "info.json").write_text(json.dumps(info, indent=1, sort_keys=True) + "\n")


def prepared_root_stage(settings):
    """The cache entry of the root stage, built if missing (under the cache lock)."""
    mirror = settings.mirror or host_debian_mirror()
    key = root_cache_key(settings.suite, mirror, settings.multistrap_config, settings.apt_pref_dir)
    entry = settings.cache_dir / f"rootfs-{key}"
    if settings.rebuild_root and entry.exists():
        step(f"root stage: discarding cached {entry.name}")
        shutil.rmtree(entry)
    if (entry / "info.json").exists():
        step(f"root stage: cached ({entry})")
        return entry
    if os.geteuid() != 0:
        raise HelperError("building the helper root needs root (multistrap configures packages in a chroot)")
    with StagingDirectory(settings.cache_dir, f".rootfs-{key}.") as staging:
        build_root_stage(settings, staging.path, mirror, settings.cache_dir / f"multistrap-{key}.log")
        staging.final = entry
    for old in list(settings.cache_dir.glob("rootfs-*")) + list(settings.cache_dir.glob("multistrap-*.log")):
        if old not in (entry, settings.cache_dir / f"multistrap-{key}.log"):
            step(f"root stage: removing the old cache {old.name}")
            remove_path(old)
    return entry


# ---------------------------------------------------------------------------
# Release assembly
# ---------------------------------------------------------------------------

# init= of the helper: imports the helper program as a module, so that its
# precompiled .pyc is used (a script run directly is compiled at every boot:
# about half a second under TCG). -S: the helper and its tasks use the
# standard library only, so the site module's path set-up (about 0.15 s under
# TCG) is skipped.
HELPER_INIT_SOURCE = f"""#!/usr/bin/python3 -S
import sys
sys.path.insert(0, "/{HELPER_LIB_DIR}")
import {HELPER_PROGRAM_NAME.removesuffix(".py")}
sys.exit({HELPER_PROGRAM_NAME.removesuffix(".py")}.main())
"""


def install_helper_files(root, helper_program, tasks_dir):
    lib = root / HELPER_LIB_DIR
    if lib.exists():
        shutil.rmtree(lib)
    (lib / "tasks").mkdir(parents=True)
    shutil.copyfile(helper_program, lib / HELPER_PROGRAM_NAME)
    (lib / HELPER_PROGRAM_NAME).chmod(0o755)
    for task in sorted(tasks_dir.iterdir()):
        if task.is_file() and not task.name.startswith("."):
            shutil.copyfile(task, lib / "tasks" / task.name)
            (lib / "tasks" / task.name).chmod(0o755 if os.access(task, os.X_OK) else 0o644)
    init = root / HELPER_INIT.lstrip("/")
    if init.exists() or init.is_symlink():
        init.unlink()
    init.write_text(HELPER_INIT_SOURCE)
    init.chmod(0o755)


# Compiles the Python tasks themselves (files without a .py suffix, which
# compileall leaves alone) to tasks/__pycache__/<task>.<tag>.pyc, hash-based:
# the runner loads such a file only when its hash matches the task's source.
PRECOMPILE_TASKS_SOURCE = """
import os, py_compile, sys
directory = sys.argv[1]
for name in sorted(os.listdir(directory)):
    path = os.path.join(directory, name)
    if "." in name or not os.path.isfile(path):
        continue
    with open(path, "rb") as handle:
        first_line = handle.readline(256)
    if not first_line.startswith(b"#!") or b"python3" not in first_line:
        continue
    py_compile.compile(path, doraise=True,
                       invalidation_mode=py_compile.PycInvalidationMode.CHECKED_HASH)
"""


def precompile_helper_modules(settings, root):
    """Byte-compile the helper library (snf_image_helper.py, the tasks' .py
    modules) and the Python tasks with the root's own python3: the root is
    read-only, so without this every task importing the library compiles it
    again (0.1-0.2 s each under TCG), and every task compiles itself.
    unchecked-hash for the modules: the image never changes, so Python need
    not compare source timestamps."""
    run([*settings.programs["CHROOT"], str(root), "python3", "-m", "compileall", "-q",
         "--invalidation-mode", "unchecked-hash", f"/{HELPER_LIB_DIR}"])
    run([*settings.programs["CHROOT"], str(root), "python3", "-c", PRECOMPILE_TASKS_SOURCE,
         f"/{HELPER_LIB_DIR}/tasks"])


def tree_size(root):
    """(bytes rounded to 4 KiB blocks, number of inodes) below root."""
    total, count = 0, 0
    for directory, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            info = os.lstat(os.path.join(directory, name))
            total += (info.st_size + 4095) // 4096 * 4096 if not stat.S_ISDIR(info.st_mode) else 4096
            count += 1
    return total, count


def make_root_image(settings, root, image):
    used, inodes = tree_size(root)
    size_kib = (int(used * 1.08) + 24 * 1024 * 1024) // 1024
    run([*settings.programs["MKFS_EXT4"], "-q", "-F", "-t", "ext4", "-b", "4096", "-m", "0",
         "-N", str(inodes + 2048), "-L", "snf-helper-root",
         "-O", "^has_journal,^metadata_csum,^resize_inode",
         "-E", "root_owner=0:0", "-d", str(root), str(image), f"{size_kib}k"])
    image.chmod(0o644)


def inputs_hash(settings, root_key):
    digest = hashlib.sha256()
    digest.update(f"{SNF_IMAGE_VERSION}\0{root_key}\0".encode())
    digest.update(Path(__file__).read_bytes())
    if settings.helper_program.exists():
        digest.update(settings.helper_program.read_bytes())
    hash_tree(digest, settings.tasks_dir)
    return digest.hexdigest()


def new_build_id(releases, digest):
    base = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + digest[:8]
    build_id, counter = base, 1
    while (releases / build_id).exists():
        build_id, counter = f"{base}-{counter}", counter + 1
    return build_id


def assemble_release(settings, entry, releases):
    """Build a complete release directory from the cached root stage; return its path."""
    info = json.loads((entry / "info.json").read_text())
    digest = inputs_hash(settings, entry.name)
    build_id = new_build_id(releases, digest)
    with StagingDirectory(releases, f".build-{build_id}.") as staging:
        work = staging.path
        step("release: copying the cached root (hard links)")
        root = work / "root"
        copy_root(settings, entry / "root", root)
        install_helper_files(root, settings.helper_program, settings.tasks_dir)
        precompile_helper_modules(settings, root)
        (root / HELPER_LIB_DIR / "release.json").write_text(json.dumps(
            {"build_id": build_id, "snf_image_version": SNF_IMAGE_VERSION,
             "inputs_hash": digest}, indent=1) + "\n")
        step("release: root image (mkfs.ext4 -d, no journal)")
        make_root_image(settings, root, work / "image")
        shutil.rmtree(root)
        step("release: initrd (busybox + modules, uncompressed cpio newc)")
        write_initrd(work / "initrd", find_in_root(entry / "root", "busybox").read_bytes(),
                     initrd_modules(entry / "root", settings.programs["ZSTD"]))
        kernel_source = entry / ("vmlinux" if info["kernel_format"] == "vmlinux-pvh" else "vmlinuz")
        link_or_copy(kernel_source, work / "kernel")
        link_or_copy(entry / "vmlinuz", work / "vmlinuz")
        step("release: manifest (sha256 of every file)")
        files = {name: sha256_file(work / name) for name in RELEASE_FILES + OPTIONAL_RELEASE_FILES}
        manifest = {
            "format": 1,
            "build_id": build_id,
            "snf_image_version": SNF_IMAGE_VERSION,
            "suite": info["suite"],
            "mirror": info["mirror"],
            "kernel_version": info["kernel_version"],
            "kernel_format": info["kernel_format"],
            "build_time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "inputs_hash": digest,
            "root_stage": entry.name,
            "tasks": sorted(p.name for p in settings.tasks_dir.iterdir()
                            if p.is_file() and not p.name.startswith(".")),
            "packages": info["packages"],
            "files": files,
        }
        write_file_atomic(work / "manifest.json",
                          (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode())
        for name in files:
            (work / name).chmod(0o644)
        staging.final = releases / build_id
    return staging.final


def switch_current(helper_dir, release):
    """Point HELPER_DIR/current at release (atomic rename), refresh the
    compatibility links, keep the previous release, drop older ones."""
    current = helper_dir / "current"
    previous = None
    if current.is_symlink():
        previous = (helper_dir / os.readlink(current)).resolve()
    replace_symlink(f"releases/{release.name}", current)
    for name in RELEASE_FILES:
        replace_symlink(f"current/{name}", helper_dir / name)
    for old in (helper_dir / "releases").iterdir():
        if old.name.startswith(".") or old.resolve() in (release.resolve(), previous):
            continue
        step(f"removing old release {old.name}")
        shutil.rmtree(old, ignore_errors=True)


def check_helper_sources(settings):
    if not settings.helper_program.is_file():
        raise HelperError(f"helper program {settings.helper_program} does not exist")
    if not settings.tasks_dir.is_dir():
        raise HelperError(f"tasks directory {settings.tasks_dir} does not exist")


def copy_root(settings, source, destination):
    """Hard-link copy of the cached root (a plain copy across file systems)."""
    try:
        run([*settings.programs["CP"], "-al", str(source), str(destination)])
    except HelperError:
        shutil.rmtree(destination, ignore_errors=True)
        step("release: cache on another file system, copying the root")
        run([*settings.programs["CP"], "-a", str(source), str(destination)])


def remove_stale(directory, *patterns):
    """Work directories left by a builder that was killed. Only called under
    the lock their creator held, so none of them is in use."""
    for pattern in patterns:
        for path in Path(directory).glob(pattern):
            step(f"removing {path.name}, left by an interrupted run")
            remove_path(path)


def build(settings, force=False):
    check_helper_sources(settings)
    helper_dir = settings.helper_dir
    releases = helper_dir / "releases"
    releases.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(settings.cache_dir / "lock", "the root stage cache"):
        remove_stale(settings.cache_dir, ".rootfs-*")
        entry = prepared_root_stage(settings)
        with exclusive_lock(helper_dir / "lock", "HELPER_DIR"):
            remove_stale(releases, ".build-*", ".import.*")
            current = up_to_date_release(settings, entry)
            if current and not force:
                step(f"helper release {current.name} is up to date (built from the same "
                     "inputs); -f builds a new one")
                return current
            release = assemble_release(settings, entry, releases)
            switch_current(helper_dir, release)
    step(f"helper release {release.name} is current in {helper_dir}")
    return release


def up_to_date_release(settings, entry):
    """The current release when it was built from exactly these inputs and is intact."""
    try:
        release = current_release(settings.helper_dir)
        manifest = read_manifest(release)
        if manifest.get("inputs_hash") != inputs_hash(settings, entry.name):
            return None
        verify_release(release, manifest)
    except HelperError:
        return None
    return release


# ---------------------------------------------------------------------------
# Export / import / fetch, and the health of a node's helper
# ---------------------------------------------------------------------------


def current_release(helper_dir):
    current = helper_dir / "current"
    if not current.is_symlink():
        raise HelperError(f"no helper built in {helper_dir} (run snf-image-update-helper)")
    release = current.resolve()
    if not (release / "manifest.json").is_file():
        raise HelperError(f"{release} has no manifest.json")
    return release


def read_manifest(release):
    try:
        manifest = json.loads((release / "manifest.json").read_text())
    except (OSError, ValueError) as err:
        raise HelperError(f"unreadable manifest in {release}: {err}") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise HelperError(f"manifest in {release} has no file list")
    return manifest


def verify_release(release, manifest):
    build_id = manifest.get("build_id", "")
    if not BUILD_ID_RE.match(str(build_id)):
        raise HelperError(f"manifest has an invalid build id {build_id!r}")
    for name in RELEASE_FILES:
        if name not in manifest["files"]:
            raise HelperError(f"manifest lists no {name}")
    for name, expected in manifest["files"].items():
        if name not in RELEASE_FILES + OPTIONAL_RELEASE_FILES:
            raise HelperError(f"manifest lists an unexpected file {name!r}")
        path = release / name
        if not path.is_file():
            raise HelperError(f"release lacks {name}")
        if sha256_file(path) != expected:
            raise HelperError(f"{name} does not match the sha256 in the manifest")


def tar_mode(path, writing):
    name = str(path)
    compression = "gz" if name.endswith((".gz", ".tgz")) else "xz" if name.endswith(".xz") else ""
    return ("w" if writing else "r") + (f":{compression}" if compression else (":" if writing else ":*"))


def export_release(settings, target):
    release = current_release(settings.helper_dir)
    manifest = read_manifest(release)
    step(f"export: verifying release {release.name}")
    verify_release(release, manifest)
    target = Path(target)
    tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
    try:
        with tarfile.open(tmp, tar_mode(target, True), format=tarfile.PAX_FORMAT) as archive:
            for name in ["manifest.json"] + sorted(manifest["files"]):
                step(f"export: adding {name}")
                info = archive.gettarinfo(str(release / name), f"{release.name}/{name}")
                info.uid = info.gid = 0
                info.uname = info.gname = "root"
                with open(release / name, "rb") as stream:
                    archive.addfile(info, stream)
        checksum = sha256_file(tmp)
        os.replace(tmp, target)
        write_file_atomic(checksum_path(target), f"{checksum}  {target.name}\n".encode())
    except OSError as err:
        raise HelperError(f"cannot write {target}: {err.strerror or err}") from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    step(f"exported {release.name} to {target} (sha256 in {checksum_path(target).name})")


def checksum_path(archive):
    return Path(archive).with_name(Path(archive).name + ".sha256")


def parse_checksum(text, where):
    """The sha256 of a `sha256sum` line ("<hex>  <name>")."""
    words = text.split()
    if not words or not re.fullmatch(r"[0-9a-fA-F]{64}", words[0]):
        raise HelperError(f"{where} holds no sha256")
    return words[0].lower()


def import_release(settings, source, force=False, expected_sha256=None):
    """Install an archive written by --export; its FILE.sha256, when present
    (or the expected_sha256 given), must match."""
    source = Path(source)
    if not source.is_file():
        raise HelperError(f"{source} does not exist")
    if expected_sha256 is None and checksum_path(source).is_file():
        expected_sha256 = parse_checksum(checksum_path(source).read_text(), checksum_path(source))
    if expected_sha256 is not None:
        step(f"import: verifying the sha256 of {source.name}")
        if sha256_file(source) != expected_sha256:
            raise HelperError(f"{source} does not match its sha256 (a truncated or altered copy)")
    releases = settings.helper_dir / "releases"
    releases.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(settings.helper_dir / "lock", "HELPER_DIR"):
        remove_stale(releases, ".build-*", ".import.*")
        final = install_archive(source, releases, force)
        switch_current(settings.helper_dir, final)
    step(f"imported helper release {final.name}; it is current in {settings.helper_dir}")
    return final


def fetch_release(settings, url, force=False):
    """Download an export from URL (http, https, file) with URL.sha256 beside
    it, check the download against that sha256, then import it. http(s) goes
    through the host program's URL fetcher (timeouts, resumed downloads,
    credentials never shown)."""
    shown = host_program.redact_url(url)
    try:
        checksum_line = read_url(url + ".sha256", 4096)
    except HelperError as err:
        raise HelperError(f"{err} (-u and HELPER_URL take a helper written by "
                          "snf-image-update-helper --export, served with its .sha256 beside it)") from None
    expected = parse_checksum(checksum_line.decode("ascii", "replace"), f"{shown}.sha256")
    name = Path(urllib.parse.unquote(urllib.parse.urlsplit(url).path)).name or "helper.tar"
    with temporary_directory(settings.helper_dir / "releases", ".fetch.") as work:
        archive = work / name
        digest, buffer = hashlib.sha256(), memoryview(bytearray(1 << 20))
        started, size = time.monotonic(), 0
        step(f"fetch: downloading {shown}")
        with opened_url(url) as source, open(archive, "xb") as output:
            while count := source.readinto(buffer):
                digest.update(buffer[:count])
                output.write(buffer[:count])
                size += count
        step(f"fetch: {size / 1048576:.1f} MiB in {time.monotonic() - started:.1f} s")
        if digest.hexdigest() != expected:
            raise HelperError(f"{shown} does not match {shown}.sha256 (a truncated or altered download)")
        return import_release(settings, archive, force, expected_sha256=expected)


@contextlib.contextmanager
def opened_url(url):
    """A readable (readinto) for an http(s) or file URL; failures as HelperError."""
    scheme = urllib.parse.urlsplit(url).scheme.lower()
    if scheme not in ("http", "https", "file"):
        raise HelperError(f"helper URL {host_program.redact_url(url)!r} must be http://, "
                          "https:// or file://")
    try:
        if scheme == "file":
            path = urllib.request.url2pathname(urllib.parse.urlsplit(url).path)
            try:
                stream = open(path, "rb")
            except OSError as err:
                raise HelperError(f"cannot fetch {url}: {err.strerror}") from None
            with stream:
                yield stream
        else:
            with host_program.UrlFetch(url, "the helper", timeout=FETCH_TIMEOUT,
                                       stream=True) as fetch:
                yield fetch
    except host_program.SnfError as err:
        raise HelperError(str(err)) from None


def read_url(url, limit):
    data = bytearray()
    buffer = memoryview(bytearray(limit + 1))
    with opened_url(url) as source:
        while len(data) <= limit and (count := source.readinto(buffer)):
            data += buffer[:count]
    if len(data) > limit:
        raise HelperError(f"{host_program.redact_url(url)} is larger than {limit} bytes")
    return bytes(data)


def node_helper_problem(settings):
    """(release, manifest) of a complete, current helper built for this
    snf-image; else HelperError naming the node and what is wrong, by the
    very rule `create` and `verify` apply (the host program's)."""
    current = settings.helper_dir / "current"
    release = current.resolve() if current.is_symlink() else settings.helper_dir
    problem = host_program.helper_release_problem(str(release))
    if problem:
        raise HelperError(f"node {os.uname().nodename}: the helper in {settings.helper_dir} "
                          f"{problem}: run snf-image-update-helper -y (or -u URL)")
    return release, read_manifest(release)


def confirm_replacing(settings, what, yes):
    """On a terminal, ask before `what` replaces an existing helper, as the
    original did; scripts (no terminal) and -y go on without asking."""
    current = settings.helper_dir / "current"
    if yes or not current.is_symlink() or not sys.stdin.isatty():
        return
    try:
        manifest = read_manifest(current.resolve())
        described = (f"release {manifest.get('build_id')} (snf-image "
                     f"{manifest.get('snf_image_version')}, built {manifest.get('build_time')})")
    except HelperError:
        described = f"the helper in {current.resolve()}"
    print(f"{what} replaces the current helper in {settings.helper_dir}: {described}.\n"
          "The previous release is kept for deployments still running from it.")
    while True:
        try:
            answer = input("Do you want to continue [y/N]? ").strip()
        except EOFError:
            answer = "n"
        if answer in ("y", "Y"):
            return
        if answer in ("", "n", "N"):
            raise HelperError("Abort.")


def install_archive(source, releases, force=False):
    """Extract and verify an exported release into releases/<build id>."""
    with StagingDirectory(releases, ".import.") as staging:
        work = staging.path
        try:
            with tarfile.open(source, tar_mode(source, False)) as archive:
                top = None
                for member in archive:
                    parts = member.name.split("/")
                    if parts[-1] in ("version", "packages") and len(parts) <= 2:
                        raise HelperError(f"{source} is a helper of the original snf-image, "
                                          "which this snf-image cannot boot: build one with "
                                          "snf-image-update-helper and move it with --export")
                    if len(parts) != 2 or not member.isfile() or parts[1] not in \
                            ("manifest.json",) + RELEASE_FILES + OPTIONAL_RELEASE_FILES:
                        raise HelperError(f"unexpected member {member.name!r} in {source}")
                    if top not in (None, parts[0]):
                        raise HelperError(f"{source} holds more than one release")
                    top = parts[0]
                    step(f"import: extracting {parts[1]}")
                    with archive.extractfile(member) as stream, \
                            open(work / parts[1], "xb") as output:
                        shutil.copyfileobj(stream, output, 1 << 20)
                    (work / parts[1]).chmod(0o644)
        except (tarfile.TarError, EOFError, lzma.LZMAError, zlib.error, OSError) as err:
            raise HelperError(f"cannot read {source}: {err}") from None
        if top is None:
            raise HelperError(f"{source} is empty")
        manifest = read_manifest(work)
        if manifest.get("build_id") != top:
            raise HelperError(f"{source}: directory {top!r} does not match build id in the manifest")
        step("import: verifying sha256 of every file against the manifest")
        verify_release(work, manifest)
        if manifest.get("snf_image_version") != SNF_IMAGE_VERSION:
            message = (f"release {top} was built for snf-image "
                       f"{manifest.get('snf_image_version')}, this node runs {SNF_IMAGE_VERSION}")
            if not force:
                raise HelperError(f"{message}: -f installs it anyway")
            warn(message)
        extra = {p.name for p in work.iterdir()} - {"manifest.json"} - set(manifest["files"])
        if extra:
            raise HelperError(f"{source} has files not in its manifest: {', '.join(sorted(extra))}")
        final = releases / top
        if final.exists():
            verify_release(final, read_manifest(final))
            step(f"import: release {top} is already installed")
        else:
            staging.final = final
    return final


# ---------------------------------------------------------------------------
# Booting the helper (--check)
# ---------------------------------------------------------------------------


def kvm_usable():
    return os.access("/dev/kvm", os.R_OK | os.W_OK)


def qemu_command(settings, release, accel, work, kernel=None, append_extra=(), init=HELPER_INIT):
    """The host's helper command line without disks and rules (so without
    the activation flag); console and result go to files in `work`."""
    from types import SimpleNamespace
    config = SimpleNamespace(QEMU=list(settings.programs["QEMU"]), HELPER_MEMORY=settings.memory,
                             HELPER_DEBUG=False,
                             HELPER_USER=settings.user if os.geteuid() == 0 and settings.user else "root")
    return host_program.helper_command(
        config, str(release), accel, [], None,
        {"console": str(work / "console"), "result": str(work / "result")},
        kernel=kernel, init=init, extra_append=append_extra)


def boot_once(settings, release, accel, timeout, kernel=None, append_extra=()):
    """Boot the helper in its check mode (snf-image-helper of the same release
    reports SUCCESS without touching a disk; snf_image_check_modules=a,b on the
    command line makes it load those modules first): (succeeded, seconds, reason)."""
    extra, init = (CHECK_FLAG, *append_extra), HELPER_INIT
    with temporary_directory(tempfile.gettempdir(), "snf-image-check.") as work:
        argv = qemu_command(settings, release, accel, work, kernel, extra, init)
        started = time.monotonic()
        with running_process(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE) as proc:
            try:
                _out, err = proc.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                return False, time.monotonic() - started, f"no answer within {timeout:.0f} s"
        elapsed = time.monotonic() - started
        result = (work / "result").read_bytes().decode(errors="replace") if (work / "result").exists() else ""
        first = result.splitlines()[0].strip("\r") if result.strip() else ""
        if first == "SUCCESS":
            return True, elapsed, "SUCCESS"
        if proc.returncode != 0:
            return False, elapsed, f"qemu exit code {proc.returncode}: {last_line(err)}"
        console = (work / "console").read_bytes() if (work / "console").exists() else b""
        return False, elapsed, f"no SUCCESS (result {first!r}; console: {last_line(console)})"


def check(settings):
    release, manifest = node_helper_problem(settings)
    print(f"node {os.uname().nodename}: helper release {release.name} is complete and built "
          f"for this snf-image ({SNF_IMAGE_VERSION})", flush=True)
    step(f"check: booting release {release.name} ({manifest.get('kernel_format')}, {CHECK_FLAG})")
    candidates = []
    if settings.accel in ("auto", "kvm"):
        if kvm_usable():
            candidates.append(("kvm", 5.0 if settings.accel == "auto" else settings.check_timeout))
        elif settings.accel == "kvm":
            raise HelperError("/dev/kvm is not usable")
    if settings.accel in ("auto", "tcg"):
        candidates.append(("tcg", settings.check_timeout))
    for accel, timeout in candidates:
        ok, seconds, reason = boot_once(settings, release, accel, timeout)
        step(f"check: {accel}: {'boots' if ok else 'does not work'} after {seconds:.1f} s ({reason})")
        if ok:
            print(f"helper {release.name}: accelerator {accel} works, boot to SUCCESS took {seconds:.1f} s")
            return accel, seconds
    raise HelperError(f"helper {release.name} did not boot with any accelerator "
                      f"({', '.join(a for a, _ in candidates)})")


# ---------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------


def terminate(signum, _frame):
    raise HelperError(f"terminated by signal {signum}")


def configured_helper_url(environ=os.environ):
    """HELPER_URL of /etc/default/snf-image-update-helper (upstream's file), or
    None; read with the host program's grammar."""
    path = environ.get("SNF_IMAGE_UPDATE_HELPER_CONFIG", UPDATE_HELPER_CONFIG_FILE)
    try:
        values = host_program.read_config_file(path) or {}
    except host_program.SnfError as err:
        raise ConfigError(str(err)) from None
    for key in sorted(set(values) - {"HELPER_URL"}):
        warn(f"{path}: only HELPER_URL is read here; {key} belongs in "
             f"{host_program.DEFAULT_CONFIG_FILE}")
    return values.get("HELPER_URL") or None


def main(argv=None):
    args = build_arg_parser().parse_args(argv)
    if args.skip_checksum:
        print("Error: -c is not supported: a fetched helper is always checked against its "
              "sha256 (use -u URL with URL.sha256 served beside it)", file=sys.stderr)
        return 2
    previous_handler = signal.signal(signal.SIGTERM, terminate)
    try:
        settings = load_settings(args)
        chosen = [name for name, given in (("--import", args.import_file), ("--export", args.export),
                                           ("-u", args.url), ("--build", args.build)) if given]
        if len(chosen) > 1:
            raise HelperError(f"{' and '.join(chosen)} exclude each other")
        url = args.url
        if not chosen and not args.check:
            url = configured_helper_url()
        if args.import_file:
            confirm_replacing(settings, f"importing {args.import_file}", args.yes)
            import_release(settings, args.import_file, args.force)
        elif args.export:
            export_release(settings, args.export)
        elif url:
            confirm_replacing(settings, f"fetching {url}", args.yes)
            fetch_release(settings, url, args.force)
        elif args.build or not args.check:
            confirm_replacing(settings, "building a new helper", args.yes)
            build(settings, args.force)
        if args.check:
            check(settings)
    except HelperError as err:
        print(f"Error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("Error: interrupted", file=sys.stderr)
        return 1
    except OSError as err:  # e.g. a full disk; the message names the file
        print(f"Error: {err}", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGTERM, previous_handler)
    return 0


if __name__ == "__main__":
    sys.exit(main())
