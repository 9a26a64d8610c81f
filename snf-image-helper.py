#!/usr/bin/python3
"""snf-image-helper: init (PID 1) of the helper VM, and the library of its tasks.

Pipeline: image source → O_DIRECT copy onto the Ganeti disk → floppy + helper
VM → **tasks run inside the helper against the disk** → SUCCESS.

As PID 1 (kernel `init=/usr/bin/snf-image-helper`) this program mounts what
the helper needs, refuses to touch anything unless `snf_image_activate_helper`
is on the kernel command line, reads the floppy (rules.json, unattend.xml,
sysprep.inf), decodes the image and instance properties, auto-detects OSFAMILY
and ROOT_PARTITION when they are missing, chooses the partition to grow,
exports the task environment of upstream snf-image 0.23.1 and runs the tasks
(`/usr/lib/snf-image-helper/tasks/`, C-locale name order) with upstream's
exclusion, cloud-init and overwrite rules.  It reports `TASK_START:`,
`TASK_END:`, `WARNING:`, `ERROR:`/`STDERR:` lines on the progress port
(ttyS2) and exactly one `SUCCESS` or `ERROR: <message>` line on the result
port (ttyS1), then powers the VM off: always, whatever happened, because PID 1
must never exit.  The work runs in a forked child; PID 1 only waits, reaps,
syncs and powers off.

Imported as the module `snf_image_helper`, it is the library the tasks use
(DESIGN.md §10): warn, die, run, prop, check_yes_no, partition_device,
target, base_distro, read_partition_table, mounted_under, umount_all.

Standard library only; runs on the helper's python3 (3.11 to 3.13).
"""

import gc
import json
import os
import re
import signal
import stat
import subprocess
import sys
import time

# ctypes, selectors, tempfile, tty and termios are imported where they are
# used: every task imports this module, and under TCG each import costs.

# --------------------------------------------------------------------------
# Constants
# --------------------------------------------------------------------------

LIB_DIR = os.path.dirname(os.path.realpath(__file__))
TASKS_DIR = os.path.join(LIB_DIR, "tasks")

CMDLINE_PATH = "/proc/cmdline"
CONSOLE_PORT = "/dev/ttyS0"
RESULT_PORT = "/dev/ttyS1"
PROGRESS_PORT = "/dev/ttyS2"
DEBUG_PORT = "/dev/ttyS3"

ACTIVATION_FLAG = "snf_image_activate_helper"
CHECK_FLAG = "snf_image_check_helper"
CHECK_MODULES_PARAMETER = "snf_image_check_modules"
DEBUG_FLAG = "snf_image_debug_helper"

PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

# Modules the helper needs before it can read the rules disk and the disks;
# the initrd already loaded virtio_blk for the root.  ext4 also mounts ext2.
# (A floppy given as rules_dev=/dev/fd0 also needs `floppy`.)
BOOT_MODULES = ("virtio_pci", "virtio_blk", "ext4")
# Loaded on demand before mounting a partition of that file system.
FS_MODULES = {
    "xfs": ("xfs",), "btrfs": ("btrfs",), "vfat": ("vfat", "nls_cp437", "nls_ascii", "nls_utf8"),
    "msdos": ("msdos",), "ntfs": ("fuse",), "ufs": ("ufs",), "ext2": ("ext4",),
    "ext3": ("ext4",), "ext4": ("ext4",),
}

OS_FAMILIES = ("linux", "windows", "windows-legacy", "freebsd", "openbsd", "netbsd")

YES_VALUES = ("yes", "true", "on", "1", "set")
NO_VALUES = ("no", "false", "off", "0", "unset")

PROPERTY_PREFIX = "SNF_IMAGE_PROPERTY_"
TASK_ATTRIBUTES = ("excludable", "fs_resize_excludable", "mounted_excludable",
                   "cloudinit_excludable", "overwritable", "cloudinit_only")
# `osfamily=linux`, `osfamily=windows,windows-legacy`: the task has nothing to
# do for any other OSFAMILY, so the runner does not start it there.
TASK_FAMILIES_PREFIX = "osfamily="
TASK_NAME_RE = re.compile(r"^[A-Za-z0-9_-]+$")        # what run-parts accepts
TASK_ATTRIBUTE_RE = re.compile(rb"^#\s*snf-image-task:(.*)$", re.MULTILINE)
# `#!/usr/bin/python3`, `#!/usr/bin/env python3.11`: a task the runner runs in
# a fork of itself instead of a new interpreter (no options on the line).
PYTHON_SHEBANG_RE = re.compile(rb"#![ \t]*(?:\S*/)?(?:env[ \t]+(?:\S*/)?)?python3(?:\.[0-9]+)?[ \t]*\r?\n")
# What the tasks import, imported once by the runner so that every forked
# task finds them loaded: under TCG each import costs tens of milliseconds.
# Not here: what one task alone needs (hashlib loads OpenSSL: 0.16 s under
# TCG) and what only an error needs (traceback: 0.07 s).
PRELOADED_MODULES = ("base64", "binascii", "collections", "contextlib", "errno", "fnmatch",
                     "ipaddress", "json", "random", "re", "shutil", "importlib.util", "stat",
                     "subprocess", "tempfile", "time", "uuid", "snf_image_helper",
                     "snf_image_tasklib")
OVERWRITE_DIR = "root/snf-image/helper"
OVERWRITE_RERUN = 101            # overwrite script asks for the original task

MBR_EXTENDED_TYPES = (0x05, 0x0F, 0x85)
MBR_FAMILY_BY_TYPE = {0xA5: "freebsd", 0xA6: "openbsd", 0xA9: "netbsd"}
MBR_CHECK_BY_TYPE = {0x07: "windows", 0x83: "linux"}
GPT_FREEBSD_UFS = "516E7CB6-6ECF-11D6-8FF8-00022D09712B"
GPT_MS_BASIC_DATA = "EBD0A0A2-B9E5-4433-87C0-68B6B72699C7"
GPT_MS_RESERVED = "E3C9E316-0B5C-4DB8-817D-F92DF00215AE"
ROOT_FS_RE = {
    "windows": re.compile(r"ntfs|ntfs-3g|vfat|msdos|fat|fuse|fuseblk"),
    "linux": re.compile(r"ext[234]|xfs|jfs|zfs|btrfs|reiserfs|reiser4"),
    "freebsd": re.compile(r"ufs|zfs"),
    "openbsd": re.compile(r"ufs"),
    "netbsd": re.compile(r"ufs"),
}

STDERR_TAIL_LINES = 10           # host protocol: STDERR:<n> with n <= 10
PROGRESS_LINE_MAX = 500          # host protocol: lines of at most 512 chars
RB_POWER_OFF = 0x4321FEDC
MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MNT_DETACH = 2

# exit status of the worker child, read by PID 1
WORKER_SUCCESS = 0               # SUCCESS written to the result port
WORKER_FAILED = 1                # ERROR: written to the result port


class HelperError(Exception):
    """An expected failure: its message becomes the `ERROR:` result line."""


# --------------------------------------------------------------------------
# Small utilities, also the task library (DESIGN.md §10)
# --------------------------------------------------------------------------

_monitor_fd = None               # the runner's open progress port, if any


def one_line(text, limit=PROGRESS_LINE_MAX):
    """Make `text` a single protocol-safe line."""
    text = " ".join(str(text).split("\n"))
    text = text.replace("\r", " ")
    return text if len(text) <= limit else text[:limit - 3] + "..."


def progress(line):
    """Send one line on the progress port (SNF_IMAGE_MONITOR); silent if there is none."""
    data = (one_line(line) + "\n").encode("utf-8", "replace")
    if _monitor_fd is not None:
        os.write(_monitor_fd, data)
        return
    path = os.environ.get("SNF_IMAGE_MONITOR")
    if not path:
        return
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_NOCTTY)
    except OSError as error:
        print(f"Warning: cannot open the progress port {path}: {error.strerror}",
              file=sys.stderr, flush=True)
        return
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def warn(msg):
    """`Warning: msg` on stderr and `WARNING:msg` on the progress port."""
    print(f"Warning: {msg}", file=sys.stderr, flush=True)
    progress(f"WARNING:{msg}")


def die(msg):
    """`ERROR: msg` on stderr and exit status 1 (raises SystemExit)."""
    print(f"ERROR: {one_line(msg, 2000)}", file=sys.stderr, flush=True)
    raise SystemExit(1)


def run(argv, *, input=None, capture=False, check=True, env=None):
    """subprocess.run with an argument list.

    stderr is captured and passed on to our own stderr (the console); with
    check, a failure dies with the program's last stderr line.  `capture`
    returns stdout in the result.  Text mode unless `input` is bytes.  The
    input (which may hold a secret) never appears in a message.
    """
    argv = [str(arg) for arg in argv]
    text = not isinstance(input, (bytes, bytearray))
    try:
        result = subprocess.run(
            argv, input=input, env=env,
            stdin=None if input is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE if capture else None,
            stderr=subprocess.PIPE,
            **({"encoding": "utf-8", "errors": "surrogateescape"} if text else {}))
    except FileNotFoundError:
        if check:
            die(f"Program not found: {argv[0]}")
        return subprocess.CompletedProcess(argv, 127, "" if text else b"", "" if text else b"")
    stderr_text = result.stderr if text else result.stderr.decode("utf-8", "replace")
    if stderr_text:
        sys.stderr.write(stderr_text if stderr_text.endswith("\n") else stderr_text + "\n")
        sys.stderr.flush()
    if check and result.returncode != 0:
        lines = [line.strip() for line in stderr_text.splitlines() if line.strip()]
        detail = f": {lines[-1]}" if lines else ""
        die(f"{os.path.basename(argv[0])} failed (exit code {result.returncode}){detail}")
    return result


def prop(name, environ=None):
    """Value of SNF_IMAGE_PROPERTY_<NAME> (name upper-cased), or None."""
    environ = os.environ if environ is None else environ
    return environ.get(property_variable(name))


def property_variable(name):
    """`osfamily` → `SNF_IMAGE_PROPERTY_OSFAMILY`; full names pass unchanged."""
    name = name.upper()
    return name if name.startswith(PROPERTY_PREFIX) else PROPERTY_PREFIX + name


def parse_yes_no(variable, value, warn=warn):
    """Upstream's check_yes_no on a value: unset → no; yes/true/on/1/set → yes;
    no/false/off/0/unset → no; empty → no with a warning; anything else → YES
    with a warning."""
    if value is None:
        return False
    lowered = value.lower()
    if lowered in YES_VALUES:
        return True
    if lowered in NO_VALUES:
        return False
    if lowered == "":
        warn(f"Variable `{variable}' defined but empty. Will treat this as a `NO'")
        return False
    warn(f"Invalid value `{value}' for variable `{variable}'. Will treat this as a `YES'")
    return True


def check_yes_no(name, environ=None):
    """Upstream's boolean rules for property `name`
    (`CLOUD_INIT` or `SNF_IMAGE_PROPERTY_CLOUD_INIT`)."""
    variable = property_variable(name)
    environ = os.environ if environ is None else environ
    return parse_yes_no(variable, environ.get(variable))


def partition_device(disk, number):
    """`/dev/vdb` + 3 → `/dev/vdb3`; `/dev/loop0` + 3 → `/dev/loop0p3`;
    `/dev/nvme0n1` + 3 → `/dev/nvme0n1p3`."""
    separator = "p" if disk[-1:].isdigit() else ""
    return f"{disk}{separator}{number}"


def target():
    """SNF_IMAGE_TARGET, the mount point of the image's root."""
    path = os.environ.get("SNF_IMAGE_TARGET")
    if not path:
        die("SNF_IMAGE_TARGET is not set")
    return path


def _read_text(path):
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            return handle.read()
    except OSError:
        return None


def base_distro(root):
    """Upstream's base-distribution detection, or None with a warning."""
    def exists(relative, kind=os.path.exists):
        return kind(os.path.join(root, relative))

    if exists("etc/coreos", os.path.isdir):
        return "coreos"
    for relative, distro in (("etc/debian_version", "debian"),
                             ("etc/redhat-release", "redhat"),
                             ("etc/slackware-version", "slackware"),
                             ("etc/SuSE-release", "suse"),
                             ("etc/gentoo-release", "gentoo"),
                             ("etc/arch-release", "arch"),
                             ("etc/freebsd-update.conf", "freebsd")):
        if exists(relative):
            return distro
    if exists("etc/release"):
        if "netbsd" in (_read_text(os.path.join(root, "etc/release")) or "").lower():
            return "netbsd"
        warn("Unknown distro: /etc/release exists but does not mention NetBSD")
    if exists("etc/motd"):
        motd = (_read_text(os.path.join(root, "etc/motd")) or "").splitlines()
        if motd and motd[0].lower().startswith("openbsd"):
            return "openbsd"
        warn("Unknown distro: the first line of /etc/motd does not start with OpenBSD")
    warn("Unknown base distro.")
    return None


def _partition_number(disk, node):
    """The partition number sfdisk's node name carries (`/dev/vdb3` → 3)."""
    match = re.search(r"(\d+)$", node[len(disk):] if node.startswith(disk) else node)
    if not match:
        raise HelperError(f"Cannot tell the partition number of {node}")
    return int(match.group(1))


def _probe_filesystem(disk, offset, size):
    """File system type at a byte range of `disk` (blkid low-level probe), or None.

    Probing the range of the whole disk works even where no partition device
    nodes exist (loop devices without udev)."""
    result = run(["blkid", "-p", "-O", str(offset), "-S", str(size), "-o", "export", disk],
                 capture=True, check=False)
    if result.returncode != 0:
        return None
    for line in result.stdout.splitlines():
        if line.startswith("TYPE="):
            return line[len("TYPE="):]
    return None


# The ordinary partition tables are read in Python (a tenth of a second less
# per read under TCG than an sfdisk run); anything unusual goes to sfdisk.
MBR_SIGNATURE = b"\x55\xaa"
MBR_GPT_PROTECTIVE = 0xEE
GPT_SIGNATURE = b"EFI PART"
BLKSSZGET = 0x1268
MAX_LOGICAL_PARTITIONS = 256


def _guid(raw):
    """A GPT GUID (mixed-endian bytes) as sfdisk prints it: upper case."""
    return (f"{int.from_bytes(raw[0:4], 'little'):08X}-{int.from_bytes(raw[4:6], 'little'):04X}-"
            f"{int.from_bytes(raw[6:8], 'little'):04X}-{raw[8:10].hex().upper()}-"
            f"{raw[10:16].hex().upper()}")


def _sector_size(fd):
    import fcntl
    import struct
    try:
        return struct.unpack("i", fcntl.ioctl(fd, BLKSSZGET, b"\0" * 4))[0]
    except OSError:                      # a regular file
        return 512


def _mbr_entries(sector):
    """(slot, type, bootable, start, size) of the four entries of an MBR or EBR;
    None when a boot flag is neither 0 nor 0x80 (not a partition table)."""
    entries = []
    for slot in range(4):
        entry = sector[446 + 16 * slot:446 + 16 * (slot + 1)]
        if entry[0] not in (0, 0x80):
            return None
        entries.append((slot, entry[4], entry[0] == 0x80, int.from_bytes(entry[8:12], "little"),
                        int.from_bytes(entry[12:16], "little")))
    return entries


def _read_mbr(fd, sector, sector_size, total_sectors):
    partitions = []
    extended = None
    for slot, type_, bootable, start, size in sector:
        if type_ == 0:
            continue
        if start == 0 or start + size > total_sectors:
            return None
        partitions.append({"number": slot + 1, "start": start, "size": size, "type": f"{type_:X}",
                           "bootable": bootable, "uuid": None, "name": None})
        if type_ in MBR_EXTENDED_TYPES:
            if extended is not None:
                return None
            extended = (start, size)
    if extended is not None:
        ebr_offset, number, seen = 0, 5, set()
        while True:
            if ebr_offset in seen or len(seen) > MAX_LOGICAL_PARTITIONS:
                return None
            seen.add(ebr_offset)
            ebr = os.pread(fd, sector_size, (extended[0] + ebr_offset) * sector_size)
            if ebr[510:512] != MBR_SIGNATURE:
                return None
            entries = _mbr_entries(ebr)
            if entries is None:
                return None
            _, type_, bootable, start, size = entries[0]
            if type_ == 0 or size == 0:
                return None              # an empty link: leave the odd chain to sfdisk
            absolute = extended[0] + ebr_offset + start
            if absolute + size > extended[0] + extended[1]:
                return None
            partitions.append({"number": number, "start": absolute, "size": size,
                               "type": f"{type_:X}", "bootable": bootable, "uuid": None,
                               "name": None})
            number += 1
            _, link_type, _, link_start, _ = entries[1]
            if link_type == 0:
                break
            if link_type not in MBR_EXTENDED_TYPES or link_start == 0:
                return None
            ebr_offset = link_start
    return "dos", partitions


def _read_gpt(fd, sector_size, total_sectors):
    import zlib
    header = os.pread(fd, sector_size, sector_size)
    if header[:8] != GPT_SIGNATURE:
        return None
    header_size = int.from_bytes(header[12:16], "little")
    if not 92 <= header_size <= sector_size:
        return None
    stored_crc = int.from_bytes(header[16:20], "little")
    if zlib.crc32(header[:16] + b"\0\0\0\0" + header[20:header_size]) != stored_crc:
        return None
    entries_lba = int.from_bytes(header[72:80], "little")
    count = int.from_bytes(header[80:84], "little")
    entry_size = int.from_bytes(header[84:88], "little")
    if entry_size < 128 or count > 4096 or entries_lba >= total_sectors:
        return None
    array = os.pread(fd, count * entry_size, entries_lba * sector_size)
    if len(array) != count * entry_size or \
            zlib.crc32(array) != int.from_bytes(header[88:92], "little"):
        return None
    partitions = []
    for index in range(count):
        entry = array[index * entry_size:(index + 1) * entry_size]
        if entry[:16] == b"\0" * 16:
            continue
        first, last = int.from_bytes(entry[32:40], "little"), int.from_bytes(entry[40:48], "little")
        if last < first or last >= total_sectors:
            return None
        partitions.append({"number": index + 1, "start": first, "size": last - first + 1,
                           "type": _guid(entry[:16]), "bootable": False,
                           "uuid": _guid(entry[16:32]),
                           "name": entry[56:128].decode("utf-16-le", "replace").split("\0")[0] or None})
    return "gpt", partitions


def _read_partition_table_directly(disk):
    """The MBR (with its logical partitions) or GPT of `disk` read in Python,
    as sfdisk --json would give it; None for anything unusual (no MBR
    signature, odd entries, a bad CRC, a broken EBR chain), left to sfdisk."""
    fd = os.open(disk, os.O_RDONLY | os.O_CLOEXEC)
    try:
        sector_size = _sector_size(fd)
        total_sectors = os.lseek(fd, 0, os.SEEK_END) // sector_size
        first = os.pread(fd, 512, 0)
        if len(first) < 512 or first[510:512] != MBR_SIGNATURE:
            return None
        entries = _mbr_entries(first)
        if entries is None:
            return None
        if any(type_ == MBR_GPT_PROTECTIVE for _, type_, _, _, _ in entries):
            found = _read_gpt(fd, sector_size, total_sectors)
        else:
            found = _read_mbr(fd, entries, sector_size, total_sectors)
    finally:
        os.close(fd)
    if found is None:
        return None
    label, partitions = found
    for partition in partitions:
        partition["node"] = partition_device(disk, partition["number"])
        partition["fstype"] = None
    return label, sector_size, partitions


def read_partition_table(disk, probe_filesystems=True):
    """Parsed `sfdisk --json DISK`, or None when the disk has no partition table.

    Returns {"label": "dos"|"gpt"|…, "device", "sector_size", "partitions":
    [{"number", "node", "start", "size", "type", "bootable", "uuid", "name",
    "fstype"}]} with partitions sorted by number; start and size in sectors,
    type upper-cased (MBR: hex id such as "83"; GPT: type GUID).  An MBR
    (with its logical partitions) or a GPT that reads cleanly is parsed here,
    to the same result; sfdisk reads every other disk."""
    try:
        direct = _read_partition_table_directly(disk)
    except OSError:
        direct = None                    # sfdisk says why
    if direct is None:
        table = sfdisk_partition_table(disk)
    else:
        label, sector_size, partitions = direct
        table = {"label": label, "device": disk, "sector_size": sector_size,
                 "partitions": partitions}
    if table is None:
        return None
    if probe_filesystems:
        sector_size = table["sector_size"]
        for partition in table["partitions"]:
            if partition["size"] > 0:
                partition["fstype"] = _probe_filesystem(
                    disk, partition["start"] * sector_size, partition["size"] * sector_size)
    table["partitions"].sort(key=lambda partition: partition["number"])
    return table


def sfdisk_partition_table(disk):
    """read_partition_table's result as `sfdisk --json` gives it (no fstype)."""
    result = subprocess.run(["sfdisk", "--json", disk], stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            encoding="utf-8", errors="replace")
    if result.returncode != 0:
        if "does not contain a recognized partition table" in result.stderr:
            return None
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        raise HelperError(f"Cannot read the partition table of {disk}: "
                          + (lines[-1] if lines else f"sfdisk exit code {result.returncode}"))
    try:
        table = json.loads(result.stdout)["partitiontable"]
    except (ValueError, KeyError, TypeError) as error:
        raise HelperError(f"Cannot parse the partition table of {disk}: {error}") from None
    partitions = [{
        "number": _partition_number(disk, entry["node"]),
        "node": entry["node"],
        "start": int(entry["start"]),
        "size": int(entry["size"]),
        "type": str(entry.get("type", "")).upper(),
        "bootable": bool(entry.get("bootable", False)),
        "uuid": entry.get("uuid"),
        "name": entry.get("name"),
        "fstype": None,
    } for entry in table.get("partitions", [])]
    return {"label": table.get("label"), "device": table.get("device", disk),
            "sector_size": int(table.get("sectorsize", 512)), "partitions": partitions}


def _unescape_mount_field(field):
    return re.sub(r"\\([0-7]{3})", lambda match: chr(int(match.group(1), 8)), field)


def mounted_under(path, mounts_file="/proc/self/mounts"):
    """Mount points at or below `path`, deepest first."""
    base = os.path.realpath(path).rstrip("/") or "/"
    found = []
    with open(mounts_file, encoding="utf-8", errors="surrogateescape") as handle:
        for line in handle:
            fields = line.split()
            if len(fields) < 2:
                continue
            mount_point = _unescape_mount_field(fields[1])
            if mount_point == base or mount_point.startswith(base.rstrip("/") + "/"):
                found.append(mount_point)
    # A path mounted twice appears twice: unmount it twice.
    found.sort(key=lambda mount_point: (mount_point.count("/"), mount_point), reverse=True)
    return found


def umount_all(path):
    """Unmount every mount at or below `path`, deepest first (lazily if busy),
    with umount(2): no umount(8) run per mount."""
    for mount_point in mounted_under(path):
        try:
            kernel_umount(mount_point)
        except OSError as error:
            warn(f"Unmounting {mount_point} failed ({error.strerror}); detaching it lazily")
            try:
                kernel_umount(mount_point, MNT_DETACH)
            except OSError:
                pass


# --------------------------------------------------------------------------
# Kernel command line, floppy rules, properties
# --------------------------------------------------------------------------

def parse_cmdline(text):
    """Kernel command line → (flags, parameters).  `key=value` keeps the text
    between the first and the second `=` as upstream did."""
    flags, parameters = set(), {}
    for token in text.split():
        if "=" in token:
            key, value = token.split("=", 2)[:2]
            parameters[key] = value
        else:
            flags.add(token)
    return flags, parameters


def parse_rules(text):
    """rules.json (DESIGN.md §5) → (env dict, list of disk serials, serial
    of the prepared-material mailbox disk or None)."""
    try:
        rules = json.loads(text)
    except (ValueError, RecursionError) as error:
        raise HelperError(f"rules.json on the floppy is not valid JSON: {error}") from None
    if not isinstance(rules, dict):
        raise HelperError("rules.json on the floppy is not a JSON object")
    if rules.get("format") != 1:
        raise HelperError(f"rules.json has format {rules.get('format')!r}; this helper reads format 1")
    env = rules.get("env", {})
    if not isinstance(env, dict):
        raise HelperError("rules.json: `env' is not an object")
    clean_env = {}
    for name, value in env.items():
        if not re.fullmatch(r"SNF_IMAGE_[A-Za-z0-9_]+", name, re.ASCII):
            raise HelperError(f"rules.json: `{one_line(name, 80)}' is not an SNF_IMAGE_ variable name")
        if not isinstance(value, str) or "\0" in value:
            raise HelperError(f"rules.json: the value of {name} is not a string")
        clean_env[name] = value
    disks = rules.get("disks", [])
    if not isinstance(disks, list) or not all(isinstance(disk, str) and disk for disk in disks):
        raise HelperError("rules.json: `disks' is not a list of disk serials")
    prepared = rules.get("prepared")
    if prepared is not None and not (isinstance(prepared, str) and prepared):
        raise HelperError("rules.json: `prepared' is not a disk serial")
    return clean_env, disks, prepared


def stringify_property(value):
    """A property value as the string tasks see.  Strings pass unchanged;
    other JSON values are written as compact JSON text (true, 2, {"a": 1}),
    where upstream's Python 2 wrote True, 2, {u'a': 1}."""
    if isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False)


def decode_properties(text, what, warn=warn):
    """A JSON object of properties → {SNF_IMAGE_PROPERTY_<KEY>: str value}.

    Names are upper-cased (properties are case-insensitive); keys that do not
    make a valid variable name, and values holding a NUL byte, are dropped
    with a warning.  Raw control characters inside strings are accepted
    (upstream parsed with strict=False)."""
    try:
        properties = json.loads(text, strict=False)
    except (ValueError, RecursionError):
        raise HelperError(f"Unable to decode {what}. Please check if the variable "
                          "is in valid json format.") from None
    if not isinstance(properties, dict):
        raise HelperError(f"Unable to decode {what}: it is not a JSON object.")
    decoded = {}
    for key, value in properties.items():
        if not re.fullmatch(r"[A-Za-z0-9_]+", key, re.ASCII):
            warn(f"Ignoring {what} key `{one_line(key, 80)}': not a valid variable name")
            continue
        string = stringify_property(value)
        if "\0" in string:
            warn(f"Ignoring {what} key `{key}': its value holds a NUL character")
            continue
        decoded[PROPERTY_PREFIX + key.upper()] = string
    return decoded


def apply_properties(env, warn=warn):
    """Decode SNF_IMAGE_PROPERTIES then SNF_IMAGE_INST_PROPERTIES into `env`
    (instance properties override image properties key by key)."""
    for variable, what in (("SNF_IMAGE_PROPERTIES", "image properties"),
                           ("SNF_IMAGE_INST_PROPERTIES", "instance properties")):
        if env.get(variable):
            env.update(decode_properties(env[variable], what, warn))
    return env


class Properties:
    """Boolean and string view of the SNF_IMAGE_PROPERTY_* of an environment;
    each boolean is evaluated (and warned about) once per run."""

    def __init__(self, env, warn=warn):
        self.env = env
        self.warn = warn
        self._booleans = {}

    def get(self, name):
        return self.env.get(property_variable(name))

    def yes(self, name):
        variable = property_variable(name)
        if variable not in self._booleans:
            self._booleans[variable] = parse_yes_no(variable, self.env.get(variable), self.warn)
        return self._booleans[variable]


# --------------------------------------------------------------------------
# Image inspection: OS family, root partition, partition to grow
# --------------------------------------------------------------------------

def partition_to_resize(table):
    """The number of the partition to grow, or None when there is none.

    The one owner of the rule: tasks.d/10FixPartitionTable calls this to
    pick the partition it grows, and SNF_IMAGE_RESIZE_PART (set from it)
    tells tasks 20/40/81 whose file system to resize.  The partition that
    ENDS LAST on the disk.  On MBR:
    the primary (extended included) that ends last; if that is the extended
    partition, its logical partition that ends last (or the empty extended
    partition itself).  Empty slots are ignored.  Upstream
    took the highest number, which is the same on ordinary layouts but the
    wrong partition on images not numbered in disk order (Debian's cloud
    images: root 1 after 14 and 15)."""
    if not table:
        return None
    partitions = [p for p in table["partitions"] if p["size"] > 0]
    if not partitions:
        return None

    def end(partition):
        return partition["start"] + partition["size"], partition["number"]

    if table["label"] != "dos":
        return max(partitions, key=end)["number"]
    primaries = [p for p in partitions if p["number"] <= 4]
    logicals = [p for p in partitions if p["number"] > 4]
    if not primaries:
        return max(partitions, key=end)["number"]
    last = max(primaries, key=end)
    if _mbr_type(last) in MBR_EXTENDED_TYPES and logicals:
        return max(logicals, key=end)["number"]
    return last["number"]


def _mbr_type(partition):
    try:
        return int(partition["type"], 16)
    except (TypeError, ValueError):
        return None


def detection_candidates(table):
    """Partitions worth examining, in table order: [(number, family, accept)],
    where accept means "take it without mounting" (BSD MBR slices)."""
    if table["label"] == "dos":
        candidates = []
        for partition in table["partitions"]:
            kind = _mbr_type(partition)
            if kind in MBR_FAMILY_BY_TYPE:
                candidates.append((partition["number"], MBR_FAMILY_BY_TYPE[kind], True))
            elif kind in MBR_CHECK_BY_TYPE:
                candidates.append((partition["number"], MBR_CHECK_BY_TYPE[kind], False))
        return candidates
    if table["label"] == "gpt":
        candidates = []
        for partition in table["partitions"]:
            if partition["type"] == GPT_MS_RESERVED:      # never holds a file system
                continue
            if partition["type"] == GPT_FREEBSD_UFS:
                family = "freebsd"
            elif partition["type"] == GPT_MS_BASIC_DATA:
                family = "windows"
            else:
                family = "linux"
            candidates.append((partition["number"], family, False))
        return candidates
    raise HelperError(f"Unsupported partition table type `{table['label']}'")


def find_case_insensitive(root, relative):
    """`root/relative` matched component by component ignoring case, or None."""
    current = root
    for component in relative.split("/"):
        try:
            names = os.listdir(current)
        except OSError:
            return None
        match = next((name for name in names if name.lower() == component.lower()), None)
        if match is None:
            return None
        current = os.path.join(current, match)
    return current


def windows_nt_major(root):
    """Major NT version from the software hive (hivexget), or None.  Windows 10
    and later keep CurrentVersion at 6.3 and add CurrentMajorVersionNumber."""
    hive = find_case_insensitive(root, "windows/system32/config/software")
    if hive is None:
        return None
    result = run(["hivexget", hive, "Microsoft\\Windows NT\\CurrentVersion"],
                 capture=True, check=False)
    if result.returncode != 0:
        return None
    match = re.search(r'^"CurrentMajorVersionNumber"=dword:([0-9a-fA-F]+)\s*$', result.stdout,
                      re.MULTILINE)
    if match and int(match.group(1), 16):
        return int(match.group(1), 16)
    match = re.search(r'^"CurrentVersion"="\s*(\d+)\.', result.stdout, re.MULTILINE)
    return int(match.group(1)) if match else None


def load_modules(*names):
    """modprobe what is missing; a failure is only a warning (the module may be built in)."""
    names = [name for name in names if not os.path.isdir(f"/sys/module/{name}")]
    if names:
        result = run(["modprobe", "-q", "-a", *names], check=False)
        if result.returncode != 0:
            print(f"Warning: modprobe {' '.join(names)} failed", file=sys.stderr, flush=True)


def check_modules(listed):
    """Check mode: modprobe the comma-separated modules, strictly (the
    builder's tests prove that the pruned module tree of the root works)."""
    modules = [name for name in listed.split(",") if name]
    if modules:
        result = run(["modprobe", "-a", *modules], capture=True, check=False)
        lines = (result.stderr or "").strip().splitlines() or ["failed"]
        if result.returncode != 0:
            raise HelperError(f"modprobe {' '.join(modules)}: {lines[-1]}")


def _ufs_mount_options():
    return [["-t", "ufs", "-o", "ufstype=ufs2,ro"], ["-t", "ufs", "-o", "ufstype=44bsd,ro"]]


def classify_root(root, family):
    """Is the mounted file system `root` the root of an OS of `family`?
    Returns the family (windows becomes windows-legacy before NT 6) or None."""
    if family == "windows":
        system_hive = find_case_insensitive(root, "windows/system32/config/system")
        if system_hive is None or not os.path.isfile(system_hive):
            return None
        major = windows_nt_major(root)
        if major is None:
            warn("Unable to read the Windows version from the SOFTWARE registry hive; "
                 "assuming Windows Vista or later")
        return "windows-legacy" if major is not None and major < 6 else "windows"
    return family if os.path.isfile(os.path.join(root, "etc/fstab")) else None


def examine_partition(device, family, fstype, scratch_dir):
    """Upstream's check_if_root: mount `device` read-only and decide whether it
    is the root of an OS of `family`.  Returns the family (windows may become
    windows-legacy) or None."""
    if not fstype:
        warn(f"Unable to determine the file system of {device}; ignoring it")
        return None
    if not ROOT_FS_RE[family].search(fstype):
        warn(f"Ignoring device {device} with file system {fstype} (not a {family} file system)")
        return None
    load_modules(*FS_MODULES.get(fstype, ()))
    if fstype == "ufs":
        attempts = _ufs_mount_options()
    elif fstype.startswith("ntfs"):
        attempts = [["-t", "lowntfs-3g", "-o", "ignore_case,windows_names,norecover,ro"],
                    ["-t", "ntfs-3g", "-o", "ro"], ["-o", "ro"]]
    else:
        attempts = [["-o", "ro"]]
    import tempfile
    mount_point = tempfile.mkdtemp(prefix="detect.", dir=scratch_dir)
    try:
        for options in attempts:
            if run(["mount", *options, device, mount_point], check=False).returncode == 0:
                break
        else:
            warn(f"Unable to mount {device} read-only; ignoring it")
            return None
        try:
            return classify_root(mount_point, family)
        finally:
            umount_all(mount_point)
    finally:
        os.rmdir(mount_point)


def detect_image_properties(disk, table, scratch_dir, examine=examine_partition,
                            partition_path=partition_device):
    """Upstream's detect_image_properties: (osfamily, root partition number)
    of the first partition that looks like an OS root, or (None, None)."""
    for number, family, accept in detection_candidates(table):
        if accept:
            return family, number
        partition = next(p for p in table["partitions"] if p["number"] == number)
        found = examine(partition_path(disk, number), family, partition["fstype"], scratch_dir)
        if found:
            return found, number
    return None, None


# --------------------------------------------------------------------------
# Ports
# --------------------------------------------------------------------------

def open_port(path):
    """Open a serial port (or, in tests, a file or FIFO) for writing, raw."""
    fd = os.open(path, os.O_WRONLY | os.O_NOCTTY | os.O_APPEND)
    if os.isatty(fd):
        import tty
        # Without raw mode, ONLCR would turn "SUCCESS\n" into "SUCCESS\r\n".
        tty.setraw(fd)
    return fd


def drain(fd):
    """Wait until what was written to a tty has left the UART."""
    try:
        if os.isatty(fd):
            import termios
            termios.tcdrain(fd)
    except OSError:
        pass


def timestamp():
    now = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now % 1 * 1e6):06d}Z"


class Console:
    """Timestamped lines on the console (our stdout = /dev/console = ttyS0)."""

    def __init__(self, stream=None):
        self.stream = stream if stream is not None else sys.stdout

    def line(self, text, source="helper"):
        self.stream.write(f"{timestamp()} [{source}] {text}\n")
        self.stream.flush()


# --------------------------------------------------------------------------
# Tasks: discovery, exclusion matrix, overwrite protocol, execution
# --------------------------------------------------------------------------

class TaskFailed(HelperError):
    """A task failed; its error is already on the progress port."""


class Task:
    """One executable of the tasks directory and its `# snf-image-task:` attributes."""

    def __init__(self, path, attributes, python=False):
        self.path = path
        self.file_name = os.path.basename(path)
        self.name = self.file_name[2:]        # the two-digit priority is not part of the name
        self.attributes = frozenset(attributes)
        self.python = python                  # run in a fork of the runner, not exec'd
        # the OS families it has work for (None: all)
        self.families = next((frozenset(word[len(TASK_FAMILIES_PREFIX):].split(","))
                              for word in self.attributes
                              if word.startswith(TASK_FAMILIES_PREFIX)), None)

    def __repr__(self):
        return f"Task({self.file_name!r}, {sorted(self.attributes)})"


def read_task_attributes(path, limit=65536):
    """Attributes of the first `# snf-image-task:` line in the head of a task file."""
    with open(path, "rb") as handle:
        head = handle.read(limit)
    match = TASK_ATTRIBUTE_RE.search(head)
    if not match:
        return set(), []
    words = match.group(1).decode("ascii", "replace").split()
    known = {word for word in words if word in TASK_ATTRIBUTES or _is_families_word(word)}
    return known, [word for word in words if word not in known]


def _is_families_word(word):
    families = word[len(TASK_FAMILIES_PREFIX):].split(",")
    return word.startswith(TASK_FAMILIES_PREFIX) and all(f in OS_FAMILIES for f in families)


def is_python_script(path):
    """True if the file's first line is a plain python3 shebang."""
    with open(path, "rb") as handle:
        return bool(PYTHON_SHEBANG_RE.match(handle.readline(256)))


def discover_tasks(tasks_dir, console=None):
    """Executable regular files with run-parts-valid names, in C-locale name order."""
    if not os.path.isdir(tasks_dir):
        raise HelperError(f"The tasks directory {tasks_dir} does not exist")
    tasks = []
    for file_name in sorted(os.listdir(tasks_dir), key=lambda name: name.encode("utf-8", "surrogateescape")):
        path = os.path.join(tasks_dir, file_name)
        if not TASK_NAME_RE.match(file_name) or not os.path.isfile(path) \
                or not os.access(path, os.X_OK):
            if console:
                console.line(f"not a task, skipped: {file_name}")
            continue
        attributes, unknown = read_task_attributes(path)
        if unknown and console:
            console.line(f"task {file_name}: unknown attributes ignored: {' '.join(unknown)}")
        tasks.append(Task(path, attributes, python=is_python_script(path)))
    return tasks


def exclusion_reason(task, properties):
    """Why the runner skips `task` (upstream's task_init_as checks, in order), or None."""
    excluded = f"Task {task.name} was excluded and will not run."
    if "excludable" in task.attributes and properties.yes(f"EXCLUDE_TASK_{task.name.upper()}"):
        return excluded
    if "fs_resize_excludable" in task.attributes and properties.yes("EXCLUDE_FILESYSTEMRESIZE_TASKS"):
        return excluded
    if "mounted_excludable" in task.attributes and properties.yes("EXCLUDE_MOUNTED_TASKS"):
        return excluded
    if "cloudinit_excludable" in task.attributes and properties.yes("CLOUD_INIT"):
        return f"Task {task.name} not running when cloud-init enabled."
    return None


def nothing_to_do(task, env, properties):
    """Why `task` has no work on this image by its own declaration (the
    osfamily= and cloudinit_only attributes), or None.  The runner then does
    not start it: the task would only have looked and exited."""
    family = (env.get(property_variable("OSFAMILY")) or "").strip()
    if task.families is not None and family not in task.families:
        return f"nothing to do for OSFAMILY {family or '(none)'}"
    if "cloudinit_only" in task.attributes and not properties.yes("CLOUD_INIT"):
        return "nothing to do: cloud-init is not enabled"
    return None


def find_overwrite_files(target_dir, task_name):
    """Regular files `overwrite_task_<name>` (any case, any depth, symlinks
    followed as `find -L` does) under <target>/root/snf-image/helper/."""
    base = os.path.join(target_dir, OVERWRITE_DIR)
    if not os.path.isdir(base):
        return []
    wanted = f"overwrite_task_{task_name}".lower()
    found, visited = [], set()
    for directory, subdirectories, files in os.walk(base, followlinks=True):
        real = os.path.realpath(directory)
        if real in visited:            # a symlink loop
            subdirectories[:] = []
            continue
        visited.add(real)
        for name in files:
            path = os.path.join(directory, name)
            if name.lower() == wanted and os.path.isfile(path):
                found.append(path)
        subdirectories.sort()
    return sorted(found)


def describe_status(returncode):
    if returncode < 0:
        try:
            return f"killed by signal {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exit code {returncode}"


class ProcessOutcome:
    def __init__(self, returncode, stderr_tail, error_line):
        self.returncode = returncode
        self.stderr_tail = stderr_tail
        self.error_line = error_line


def load_task_code(path):
    """The code object of the Python task at `path`: the one the builder
    compiled into __pycache__ beside it when that was compiled from exactly
    this source (its hash is checked), else compiled now.  Compiling a task
    costs 0.05-0.2 s under TCG; loading it, a millisecond."""
    import importlib.util
    import marshal
    with open(path, "rb") as handle:
        source = handle.read()
    try:
        with open(importlib.util.cache_from_source(path), "rb") as handle:
            cached = handle.read()
    except (OSError, ValueError, NotImplementedError):
        cached = b""
    hash_based = len(cached) >= 16 and int.from_bytes(cached[4:8], "little") & 1
    if hash_based and cached[:4] == importlib.util.MAGIC_NUMBER \
            and cached[8:16] == importlib.util.source_hash(source):
        try:
            return marshal.loads(cached[16:])
        except (EOFError, ValueError, TypeError):
            pass
    return compile(source, path, "exec", dont_inherit=True)


def _run_python_task(argv, env, stdout_fd, stderr_fd):
    """In the forked child: become what `python3 TASK ARGS` would be (stdin
    /dev/null, stdout and stderr the runner's pipes, cwd /, the task's
    environment, argv, its directory first on sys.path) and run the task as
    __main__.  Returns the exit status the interpreter would have had."""
    import atexit
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.dup2(stdout_fd, 1)
    os.dup2(stderr_fd, 2)
    os.closerange(3, os.sysconf("SC_OPEN_MAX"))   # as exec with close_fds would
    os.chdir("/")
    os.environ.clear()
    os.environ.update(env)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    sys.stdin = open(0, "r", encoding="utf-8", errors="surrogateescape", closefd=False)
    sys.stdout = open(1, "w", encoding="utf-8", errors="surrogateescape", closefd=False)
    sys.stderr = open(2, "w", encoding="utf-8", errors="backslashreplace", closefd=False,
                      buffering=1)
    global _monitor_fd
    _monitor_fd = None                   # the library of a task opens SNF_IMAGE_MONITOR itself
    library = sys.modules.get("snf_image_helper")
    if library is not None:
        library._monitor_fd = None
    sys.argv = list(argv)
    sys.path.insert(0, os.path.dirname(os.path.realpath(argv[0])))
    atexit._clear()                      # the runner's exit handlers are not the task's
    try:
        main_module = type(sys)("__main__")
        main_module.__file__ = argv[0]
        main_module.__cached__ = None
        sys.modules["__main__"] = main_module
        exec(load_task_code(argv[0]), main_module.__dict__)
        code = 0
    except SystemExit as exit_request:
        code = exit_request.code
        if code is None:
            code = 0
        elif not isinstance(code, int):
            print(code, file=sys.stderr)
            code = 1
    except BaseException:                # as the interpreter does: traceback, status 1
        import traceback
        traceback.print_exc()
        code = 1
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    return code


class ForkedTask:
    """A Python task run in a fork of the runner, with the part of
    subprocess.Popen's interface the relay uses (stdout, stderr, poll, wait)."""

    def __init__(self, argv, env):
        out_read, out_write = os.pipe()
        err_read, err_write = os.pipe()
        sys.stdout.flush()
        sys.stderr.flush()
        # The child's garbage collector then leaves the runner's objects alone:
        # touching them would copy their pages (slow under TCG).
        gc.freeze()
        try:
            self.pid = os.fork()
        except OSError:
            for fd in (out_read, out_write, err_read, err_write):
                os.close(fd)
            raise
        if self.pid == 0:
            code = 1
            try:
                code = _run_python_task(argv, env, out_write, err_write)
            finally:
                os._exit(code & 0xFF if isinstance(code, int) else 1)
        os.close(out_write)
        os.close(err_write)
        self.stdout = open(out_read, "rb", buffering=0)
        self.stderr = open(err_read, "rb", buffering=0)
        self.returncode = None

    def _reaped(self, options):
        pid, status = os.waitpid(self.pid, options)
        if pid:
            self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def poll(self):
        return self.returncode if self.returncode is not None else self._reaped(os.WNOHANG)

    def wait(self):
        return self.returncode if self.returncode is not None else self._reaped(0)


class TaskRunner:
    """Runs the tasks against the prepared environment (DESIGN.md §7)."""

    # After a task exits, how long to keep reading output held open by
    # processes it left behind.
    DRAIN_SECONDS = 1.0

    def __init__(self, tasks_dir, env, properties, console):
        self.tasks_dir = tasks_dir
        self.env = env
        self.properties = properties
        self.console = console

    def run_all(self):
        tasks = discover_tasks(self.tasks_dir, self.console)
        if any(task.python for task in tasks):
            self.preload()
        for task in tasks:
            self.run_task(task)

    def preload(self):
        """Import what the tasks import, once, so that each forked task finds it loaded."""
        import importlib
        saved_path = list(sys.path)
        sys.path[:0] = [self.env.get("SNF_IMAGE_HELPER_LIB", LIB_DIR), self.tasks_dir]
        try:
            for name in PRELOADED_MODULES:
                try:
                    importlib.import_module(name)
                except ModuleNotFoundError:
                    pass
                except Exception as error:     # the task will meet (and report) it itself
                    self.console.line(f"preloading {name} failed: {type(error).__name__}: {error}")
        finally:
            sys.path[:] = saved_path

    def task_env(self, task):
        env = dict(self.env)
        env["TASKNAME"] = task.file_name
        if self.properties.yes("CLOUD_INIT"):
            env["CLOUD_INIT_CONFNAME"] = f"98_snf-image-{task.file_name}.cfg"
        return env

    def run_task(self, task):
        progress(f"TASK_START:{task.name}")
        self.console.line(f"starting {task.file_name}")
        reason = exclusion_reason(task, self.properties)
        if reason:
            warn(reason)
        else:
            env = self.task_env(task)
            overwrite = self.overwrite_script(task, env)
            if overwrite is None:
                self.execute_task(task, env)
            else:
                outcome = self.execute(task, [overwrite, "pre-exec"], env, check=False)
                if outcome.returncode == OVERWRITE_RERUN:
                    warn(f"Overwrite script of task {task.name} asked for the original task to run")
                    self.execute_task(task, env)
                    self.execute(task, [overwrite, "post-exec"], env)
                elif outcome.returncode != 0:
                    self.fail(task, outcome)
        progress(f"TASK_END:{task.name}")
        self.console.line(f"finished {task.file_name}")

    def overwrite_script(self, task, env):
        """The image's replacement for `task` (the overwrite protocol), or None."""
        if "overwritable" not in task.attributes \
                or not self.properties.yes("ALLOW_MOUNTED_TASK_OVERWRITING"):
            return None
        target_dir = env.get("SNF_IMAGE_TARGET", "")
        if not target_dir or not os.path.isdir(target_dir):
            return None
        found = find_overwrite_files(target_dir, task.name)
        if not found:
            return None
        shown = ["/" + os.path.relpath(path, target_dir) for path in found]
        if len(found) > 1:
            warn(f"Ignoring the overwrite files of task {task.name}: more than one found "
                 f"({', '.join(shown)})")
            return None
        if not os.access(found[0], os.X_OK):
            warn(f"Ignoring the overwrite file {shown[0]} of task {task.name}: not executable")
            return None
        warn(f"Task {task.name} was overwritten by file: `{shown[0]}'")
        env["OVERWRITTEN_TASK"] = found[0]
        return found[0]

    def execute_task(self, task, env):
        """Run the task's own program, unless it declares nothing to do here."""
        idle = nothing_to_do(task, env, self.properties)
        if idle:
            self.console.line(idle, task.file_name)
            return
        self.execute(task, [task.path], env, in_process=task.python)

    def execute(self, task, argv, env, check=True, in_process=False):
        """Run one program of a task; relay its output; fail the task on error."""
        try:
            outcome = self.relay(argv, env, task.file_name, in_process)
        except OSError as error:
            outcome = ProcessOutcome(126, [], f"Cannot execute {argv[0]}: {error.strerror}")
        if check and outcome.returncode != 0:
            self.fail(task, outcome)
        return outcome

    def relay(self, argv, env, source, in_process=False):
        """Run `argv` (a Python task in a fork of this process, anything else
        as a program), copying its stdout and stderr to the console with
        timestamps; keep the stderr tail and the last `ERROR: ` line."""
        import selectors
        if in_process:
            process = ForkedTask(argv, env)
        else:
            process = subprocess.Popen(argv, env=env, cwd="/", stdin=subprocess.DEVNULL,
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        tail, error_line = [], None
        pending = {process.stdout: b"", process.stderr: b""}
        with selectors.DefaultSelector() as selector:
            for stream in pending:
                selector.register(stream, selectors.EVENT_READ)
            deadline = None
            while selector.get_map():
                if deadline is None and process.poll() is not None:
                    deadline = time.monotonic() + self.DRAIN_SECONDS
                timeout = 0.2 if deadline is None else max(0.0, deadline - time.monotonic())
                if deadline is not None and timeout == 0.0:
                    break
                for key, _ in selector.select(timeout):
                    stream = key.fileobj
                    data = os.read(stream.fileno(), 65536)
                    if not data:
                        selector.unregister(stream)
                        data = b"\n" if pending[stream] else b""
                    buffered = pending[stream] + data
                    *lines, pending[stream] = buffered.split(b"\n")
                    if len(pending[stream]) > 4096:
                        lines.append(pending[stream])
                        pending[stream] = b""
                    for raw in lines:
                        line = raw.decode("utf-8", "replace").rstrip("\r")
                        self.console.line(line, source)
                        if stream is process.stderr:
                            tail = (tail + [line])[-STDERR_TAIL_LINES:]
                            if line.startswith("ERROR: "):
                                error_line = line[len("ERROR: "):].strip()
        process.stdout.close()
        process.stderr.close()
        returncode = process.wait()
        return ProcessOutcome(returncode, tail, error_line)

    def fail(self, task, outcome):
        message = outcome.error_line or \
            f"Task {task.name} failed ({describe_status(outcome.returncode)})"
        tail = [line for line in outcome.stderr_tail if line.strip()]
        if outcome.error_line or not tail:
            progress(f"ERROR:{message}")
        else:
            progress(f"STDERR:{len(tail)}:{one_line(tail[0])}")
            for line in tail[1:]:
                progress(line)
        raise TaskFailed(message)


# --------------------------------------------------------------------------
# The deployment run (the worker child of PID 1)
# --------------------------------------------------------------------------

def resolve_disks(serials, sys_block="/sys/block", timeout=10.0):
    """virtio serials → /dev/vdX names, in the order of `serials`."""
    deadline = time.monotonic() + timeout
    while True:
        by_serial = {}
        for device in sorted(os.listdir(sys_block)):
            serial = _read_text(os.path.join(sys_block, device, "serial"))
            if serial and serial.strip():
                by_serial.setdefault(serial.strip(), f"/dev/{device}")
        missing = [serial for serial in serials if serial not in by_serial]
        if not missing:
            return [by_serial[serial] for serial in serials]
        if time.monotonic() >= deadline:
            raise HelperError(f"No disk with serial {', '.join(missing)} is attached to the helper")
        time.sleep(0.1)


def wait_for_block_device(path, timeout=10.0):
    deadline = time.monotonic() + timeout
    while True:
        try:
            if stat.S_ISBLK(os.stat(path).st_mode):
                return
        except OSError:
            pass
        if time.monotonic() >= deadline:
            raise HelperError(f"The rules device {path} is not a block device")
        time.sleep(0.1)


class Deployment:
    """What the worker child does: from the kernel command line to the result line."""

    def __init__(self, cmdline_path=CMDLINE_PATH, result_port=RESULT_PORT,
                 progress_port=PROGRESS_PORT, tasks_dir=TASKS_DIR, scratch_dir="/tmp",
                 console=None):
        self.cmdline_path = cmdline_path
        self.result_port = result_port
        self.progress_port = progress_port
        self.tasks_dir = tasks_dir
        self.scratch_dir = scratch_dir
        self.console = console or Console()
        self.result_fd = None
        self.cleanups = []

    # -- reporting ----------------------------------------------------------

    def write_result(self, line):
        if self.result_fd is None:
            self.result_fd = open_port(self.result_port)
        os.write(self.result_fd, (line + "\n").encode("utf-8", "replace"))
        drain(self.result_fd)

    def main(self):
        """Do everything; write exactly one result line; return WORKER_*."""
        try:
            try:
                self.prepare_and_run()
            except BaseException:
                self.cleanup(report=False)     # the first error is the one to report
                raise
            self.cleanup()
            os.sync()                          # what the tasks wrote is on the disks first
            self.console.line("all done: SUCCESS")
            self.write_result("SUCCESS")
            return WORKER_SUCCESS
        except HelperError as error:
            message = one_line(error)
            if not isinstance(error, TaskFailed):
                self.send_progress_error(message)
        except SystemExit as error:        # a library die() reached us: its message is on stderr
            message = f"Internal error of the helper: a step exited with status {error.code}"
            self.send_progress_error(message)
        except Exception as error:         # a bug: still report it as one line
            import traceback
            traceback.print_exc()
            message = one_line(f"Internal error of the helper: {type(error).__name__}: {error}")
            self.send_progress_error(message)
        self.console.line(f"ERROR: {message}")
        print(f"ERROR: {message}", file=sys.stderr, flush=True)
        try:
            self.write_result(f"ERROR: {message}")
        except OSError as error:
            self.console.line(f"cannot write to the result port: {error.strerror}")
            return WORKER_FAILED + 1
        return WORKER_FAILED

    def send_progress_error(self, message):
        if _monitor_fd is not None:
            try:
                progress(f"ERROR:{message}")
            except OSError:
                pass

    def cleanup(self, report=True):
        errors = []
        while self.cleanups:
            action = self.cleanups.pop()
            try:
                action()
            except Exception as error:          # keep cleaning up
                self.console.line(f"cleanup failed: {error}")
                errors.append(error)
        if errors and report:
            raise HelperError(f"Cleanup failed: {errors[0]}")

    # -- steps --------------------------------------------------------------

    def prepare_and_run(self):
        global _monitor_fd
        flags, parameters = parse_cmdline(_read_text(self.cmdline_path) or "")
        if CHECK_FLAG in flags:        # the builder's --check: prove we boot, touch nothing
            self.console.line("check mode: the helper booted; no disk is touched")
            self.result_fd = open_port(self.result_port)
            check_modules(parameters.get(CHECK_MODULES_PARAMETER, ""))
            return
        if ACTIVATION_FLAG not in flags:
            raise HelperError(f"Kernel command line activation flag {ACTIVATION_FLAG} is missing: "
                              "refusing to run")
        self.result_fd = open_port(self.result_port)
        _monitor_fd = open_port(self.progress_port)
        hypervisor = parameters.get("hypervisor", "")
        if hypervisor != "kvm":
            raise HelperError(f"Unknown or unsupported hypervisor `{hypervisor}' "
                              "(this helper supports hypervisor=kvm)")
        rules_serial, rules_dev = parameters.get("rules_serial"), parameters.get("rules_dev")
        if not rules_serial and not rules_dev:
            raise HelperError("rules_serial= is missing from the kernel command line")
        load_modules(*BOOT_MODULES, *(("floppy",) if not rules_serial and rules_dev.startswith("/dev/fd") else ()))
        if rules_serial:     # the rules disk: a small virtio disk found by its serial
            rules_dev = resolve_disks([rules_serial])[0]
        floppy_dir = self.read_floppy(rules_dev)
        env = self.build_environment(floppy_dir, hypervisor, rules_dev)
        properties = Properties(env)
        if properties.yes("EXCLUDE_ALL_TASKS"):
            warn("EXCLUDE_ALL_TASKS is set. All configuration tasks were prevented from running.")
            return
        self.inspect_disk(env, properties)
        runner = TaskRunner(self.tasks_dir, env, properties, self.console)
        runner.run_all()

    def read_floppy(self, rules_dev):
        import tempfile
        wait_for_block_device(rules_dev)
        floppy_dir = tempfile.mkdtemp(prefix="rules.", dir=self.scratch_dir)
        self.cleanups.append(lambda: os.rmdir(floppy_dir))
        try:     # the system call, not mount(8): one program less to start under TCG
            kernel_mount(rules_dev, floppy_dir, "ext2", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC)
        except OSError as error:
            raise HelperError(f"Cannot mount the rules device {rules_dev}: {error.strerror}") from None
        self.cleanups.append(lambda: kernel_umount(floppy_dir))
        for name in ("rules.json", "unattend.xml", "sysprep.inf"):
            if not os.path.isfile(os.path.join(floppy_dir, name)):
                raise HelperError(f"{name} is missing from the rules device {rules_dev}")
        self.floppy_dir = floppy_dir
        return floppy_dir

    def build_environment(self, floppy_dir, hypervisor, rules_dev):
        """Upstream's task environment (plus SNF_IMAGE_MONITOR and
        SNF_IMAGE_HELPER_LIB), with the properties decoded."""
        with open(os.path.join(floppy_dir, "rules.json"), encoding="utf-8") as handle:
            rules_env, serials, prepared_serial = parse_rules(handle.read())
        env = {"PATH": PATH, "HOME": "/root", "LC_ALL": "C", "LANG": "C",
               "PYTHONDONTWRITEBYTECODE": "1"}
        env.update(rules_env)
        disks = resolve_disks(serials)
        if prepared_serial:     # host keys, hashes made on the node, posted while we boot
            env["SNF_IMAGE_PREPARED"] = resolve_disks([prepared_serial])[0]
        for index, disk in enumerate(disks):
            env[f"SNF_IMAGE_DEV_{index}"] = disk
        env["SNF_IMAGE_DEV_COUNT"] = str(len(disks))
        if disks:
            env["SNF_IMAGE_DEV"] = disks[0]
        env["SNF_IMAGE_UNATTEND"] = os.path.join(floppy_dir, "unattend.xml")
        env["SNF_IMAGE_SYSPREPINF"] = os.path.join(floppy_dir, "sysprep.inf")
        env["HYPERVISOR"] = hypervisor
        env["RULES_DEV"] = rules_dev
        env["SNF_IMAGE_MONITOR"] = self.progress_port
        env["SNF_IMAGE_HELPER_LIB"] = LIB_DIR
        import tempfile
        target_dir = tempfile.mkdtemp(prefix="target.", dir=self.scratch_dir)
        self.cleanups.append(lambda: os.rmdir(target_dir))
        self.cleanups.append(lambda: umount_all(target_dir))
        env["SNF_IMAGE_TARGET"] = target_dir
        self.console.line(f"disks: {' '.join(disks) or 'none'}; target: {target_dir}")
        return apply_properties(env)

    def inspect_disk(self, env, properties):
        """Fill OSFAMILY/ROOT_PARTITION by detection, validate them, and choose
        SNF_IMAGE_RESIZE_PART."""
        disk = env.get("SNF_IMAGE_DEV")
        if not disk:
            raise HelperError("No disk to work on: rules.json lists no disks")
        family_variable = property_variable("OSFAMILY")
        root_variable = property_variable("ROOT_PARTITION")
        detect = not env.get(family_variable) or not env.get(root_variable)
        # the file system types (a blkid run each) only serve the detection
        table = read_partition_table(disk, probe_filesystems=detect)
        if table is None:
            raise HelperError(f"Device {disk} has no partition table")
        if not table["partitions"]:
            raise HelperError(f"Device {disk} does not contain any partition")
        if detect:
            warn("Needed image properties are missing. Autodetecting them...")
            family, root = detect_image_properties(disk, table, self.scratch_dir)
            if not env.get(family_variable) and family:
                env[family_variable] = family
                warn(f"Detected OSFAMILY: {family}")
            if not env.get(root_variable) and root:
                env[root_variable] = str(root)
                warn(f"Detected ROOT_PARTITION: {root}")
        for name in ("OSFAMILY", "ROOT_PARTITION"):
            if not env.get(property_variable(name)):
                raise HelperError(f"Required image property `{name}' is missing or empty.")
        if env[family_variable] not in OS_FAMILIES:
            raise HelperError(f"Invalid OSFAMILY value `{one_line(env[family_variable], 80)}'. "
                              f"Valid values are: {', '.join(OS_FAMILIES)}")
        env["SNF_IMAGE_RESIZE_PART"] = str(partition_to_resize(table))


# --------------------------------------------------------------------------
# PID 1
# --------------------------------------------------------------------------

def _libc():
    import ctypes
    return ctypes.CDLL(None, use_errno=True)


def kernel_mount(source, target, fstype, flags=0, data=""):
    """mount(2); raises OSError."""
    if _libc().mount(source.encode(), target.encode(), fstype.encode(), flags, data.encode()) != 0:
        import ctypes
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), target)


def kernel_umount(target, flags=0):
    """umount2(2); raises OSError."""
    if _libc().umount2(target.encode(), flags) != 0:
        import ctypes
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), target)


def mount_kernel_filesystems():
    """proc, sysfs, devtmpfs (unless the initrd moved them here), tmpfs on /tmp and /run."""
    for source, mount_point, fstype, flags, data in (
            ("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, ""),
            ("sysfs", "/sys", "sysfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, ""),
            ("devtmpfs", "/dev", "devtmpfs", MS_NOSUID, "mode=0755"),
            ("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777"),
            ("tmpfs", "/run", "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755")):
        if os.path.ismount(mount_point):
            continue
        try:
            kernel_mount(source, mount_point, fstype, flags, data)
        except OSError as error:
            print(f"Warning: cannot mount {fstype} on {mount_point}: {error.strerror}",
                  file=sys.stderr, flush=True)


def power_off():
    """Flush the ports and the disks, then power the VM off.  Never returns."""
    try:
        sys.stdout.flush()
        sys.stderr.flush()
        for port in (CONSOLE_PORT, RESULT_PORT, PROGRESS_PORT):
            try:
                fd = os.open(port, os.O_WRONLY | os.O_NOCTTY | os.O_NONBLOCK)
            except OSError:
                continue
            drain(fd)
            os.close(fd)
    except Exception:                  # nothing may keep PID 1 from the reboot call
        pass
    os.sync()
    if os.getpid() == 1:               # never power off the machine a test runs on
        _libc().reboot(RB_POWER_OFF)
        try:
            with open("/proc/sysrq-trigger", "w") as trigger:
                trigger.write("o")
        except OSError:
            pass
    while True:
        time.sleep(60)


def reap_until(pid):
    """Wait for child `pid`, reaping every orphan on the way (we are init)."""
    while True:
        try:
            reaped, status = os.waitpid(-1, 0)
        except ChildProcessError:
            return None
        except InterruptedError:
            continue
        if reaped == pid:
            return status


def debug_shell():
    """A root shell on the debug port; returns when it exits."""
    shell = next((argv for argv in (["/bin/sh"], ["/bin/busybox", "sh"])
                  if os.access(argv[0], os.X_OK)), None)
    if shell is None:
        print("No shell for debugging", file=sys.stderr, flush=True)
        return
    print(f"Debug shell on {DEBUG_PORT}; the helper powers off when it exits",
          file=sys.stderr, flush=True)
    pid = os.fork()
    if pid == 0:
        try:
            import fcntl
            import termios
            os.setsid()
            terminal = os.open(DEBUG_PORT, os.O_RDWR)
            try:
                fcntl.ioctl(terminal, termios.TIOCSCTTY, 0)     # job control, where it is a tty
            except OSError:
                pass
            # Output through its own O_APPEND description (a no-op on a tty): then a
            # plain file standing in for the port keeps the input it holds.
            output = os.open(DEBUG_PORT, os.O_WRONLY | os.O_APPEND)
            os.dup2(terminal, 0)
            os.dup2(output, 1)
            os.dup2(output, 2)
            os.execv(shell[0], shell + ["-i"])
        finally:
            os._exit(127)
    reap_until(pid)


def uptime():
    return (_read_text("/proc/uptime") or "?").split()[0]


def run_worker():
    """The worker child: the deployment, isolated from PID 1."""
    code = WORKER_FAILED + 1
    try:
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        console = Console()
        console.line(f"snf-image-helper started (uptime {uptime()} s)")
        code = Deployment(console=console).main()
        console.line(f"snf-image-helper finished (uptime {uptime()} s)")
    except BaseException:
        import traceback
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def init_main():
    """PID 1: set up, fork the worker, wait, maybe debug, power off.  Never returns."""
    status = None
    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)     # Ctrl-Alt-Del
        sys.dont_write_bytecode = True
        os.environ["PATH"] = PATH
        os.umask(0o022)
        mount_kernel_filesystems()
        worker = os.fork()
        if worker == 0:
            run_worker()
        status = reap_until(worker)
        exit_code = os.waitstatus_to_exitcode(status) if status is not None else None
        if exit_code not in (WORKER_SUCCESS, WORKER_FAILED):
            if exit_code is None:
                reason = "vanished"
            elif exit_code < 0:
                reason = "was " + describe_status(exit_code)
            else:
                reason = f"exited with code {exit_code}"
            message = f"ERROR: The helper process {reason} before reporting a result"
            print(message, file=sys.stderr, flush=True)
            try:
                fd = open_port(RESULT_PORT)
                os.write(fd, (message + "\n").encode())
                drain(fd)
                os.close(fd)
            except OSError:
                pass
        if exit_code != WORKER_SUCCESS:
            flags, _ = parse_cmdline(_read_text(CMDLINE_PATH) or "")
            if DEBUG_FLAG in flags and ACTIVATION_FLAG in flags:
                debug_shell()
    except BaseException as error:      # PID 1 must reach power_off whatever happens
        try:
            print(f"ERROR: helper init failed: {type(error).__name__}: {error}",
                  file=sys.stderr, flush=True)
        except BaseException:
            pass
    finally:
        power_off()


def main():
    if os.getpid() == 1:
        init_main()
    print("snf-image-helper: this program is the init (PID 1) of the snf-image helper VM "
          "and the library of its tasks; it does nothing when started otherwise",
          file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
