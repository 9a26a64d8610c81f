"""Windows-like test disks with real NTFS and real registry hives, built once
and cached.

No Windows image can be had for the tests, so these are made here: disk
images with an MBR or a GPT, a "System Reserved" NTFS partition (boot files
that must come through a deployment byte for byte) and the system NTFS
partition (mkntfs, filled through ntfs-3g) holding a Windows tree whose
SYSTEM, SOFTWARE and SAM hives are written by tests/regf.py.  The images are
cached in SNF_IMAGE_TEST_CACHE/images/windows-<name>-<hash>.img, keyed by the
source of this module and of regf.py; a file lock keeps concurrent sessions
from building the same one twice.

Layouts (`windows_image(name)`):
  mbr        NT 6.1 amd64, generalized: 1 System Reserved (bootable), 2 system
  gpt        NT 6.3 amd64, generalized, its own C:\\Unattend.xml: 1 System Reserved
             (basic data), 2 Microsoft reserved (no file system), 3 system
  complete   as mbr, but ImageState IMAGE_STATE_COMPLETE (never sysprepped)
  legacy     NT 5.1 x86 (XP): one system partition, sysprep\\ and mini-setup flags
"""

import contextlib
import fcntl
import hashlib
import subprocess
import tempfile
import time
from pathlib import Path

import regf
from conftest import CACHE_DIR
from test_e2e_helper import leftover_processes

HERE = Path(__file__).resolve().parent
IMAGES_DIR = CACHE_DIR / "images"
MIB = 1 << 20
SECTOR = 512
MS_BASIC_DATA = "EBD0A0A2-B9E5-4433-87C0-68B6B72699C7"
MS_RESERVED = "E3C9E316-0B5C-4DB8-817D-F92DF00215AE"
LAYOUTS = ("mbr", "gpt", "complete", "legacy")

# Values the tests check after a deployment.
CONTROL_SET = 2                         # Select\Current: ControlSet002 is the live one
IMAGE_RDP = {"mbr": 0, "gpt": None, "complete": 0, "legacy": 1}   # fDenyTSConnections (None: absent)
SAM_USERS = ("Administrator", "Guest", "DefaultAccount", "john")
SETUP_COMPLETE = b"@echo off\r\nrem the image's own setup-complete step\r\n"
README = b"the image's own readme\r\n"
IMAGE_UNATTEND = b"""<?xml version="1.0" encoding="utf-8"?>
<unattend xmlns="urn:schemas-microsoft-com:unattend">
  <settings pass="oobeSystem">
    <component name="Microsoft-Windows-Shell-Setup" processorArchitecture="amd64" publicKeyToken="31bf3856ad364e35" language="neutral" versionScope="nonSxS">
      <RegisteredOwner>the image's own answer file</RegisteredOwner>
    </component>
  </settings>
</unattend>
"""


def _boot_files(seed):
    """Contents of the System Reserved partition (deterministic bytes)."""
    blob = hashlib.sha256(seed.encode()).digest() * 4096
    return {"bootmgr": blob[:300_000], "Boot/BCD": blob[1000:33768],
            "Boot/en-US/bootmgr.exe.mui": blob[7:80_007]}


def system_hive(layout):
    arch = "x86" if layout == "legacy" else "AMD64"
    rdp = IMAGE_RDP[layout]
    terminal_values = [regf.string("ProductVersion", "5.1"), regf.dword("fSingleSessionPerUser", 1),
                       regf.binary("Blob", bytes(range(1, 40))),
                       regf.Value("MultiSz", regf.REG_MULTI_SZ, "a\0b c\0\0".encode("utf-16-le"))]
    if rdp is not None:
        terminal_values.insert(1, regf.dword("fDenyTSConnections", rdp))

    def control_set(live):
        return regf.Key(f"ControlSet00{1 if not live else CONTROL_SET}", subkeys=[
            regf.Key("Control", subkeys=[
                regf.Key("Session Manager", subkeys=[regf.Key("Environment", values=[
                    regf.string("PROCESSOR_ARCHITECTURE", arch if live else "IA64"),
                    regf.string("windir", "%SystemRoot%", regf.REG_EXPAND_SZ)])]),
                regf.Key("Terminal Server", values=terminal_values if live else
                         [regf.dword("fDenyTSConnections", 7)]),
            ])])
    setup = [regf.dword("SystemSetupInProgress", 1), regf.dword("MiniSetupInProgress", 1)] \
        if layout == "legacy" else [regf.dword("SystemSetupInProgress", 0)]
    return regf.build_hive(regf.Key("ROOT", subkeys=[
        regf.Key("Select", values=[regf.dword("Current", CONTROL_SET), regf.dword("Default", CONTROL_SET),
                                   regf.dword("LastKnownGood", 1)]),
        control_set(False), control_set(True),
        regf.Key("Setup", values=setup)]), "SYSTEM")


def software_hive(layout):
    version = {"mbr": "6.1", "complete": "6.1", "gpt": "6.3", "legacy": "5.1"}[layout]
    state = "IMAGE_STATE_COMPLETE" if layout == "complete" else \
        "IMAGE_STATE_GENERALIZE_RESEAL_TO_OOBE"
    current = [regf.string("CurrentVersion", version), regf.string("ProductName", f"Test NT {version}")]
    windows = [regf.Key("CurrentVersion", subkeys=[regf.Key("Setup", subkeys=[
        regf.Key("State", values=[regf.string("ImageState", state)])])])]
    return regf.build_hive(regf.Key("ROOT", subkeys=[regf.Key("Microsoft", subkeys=[
        regf.Key("Windows NT", subkeys=[regf.Key("CurrentVersion", values=current)]),
        regf.Key("Windows", subkeys=windows)])]), "SOFTWARE")


def sam_hive():
    names = [regf.Key(name, values=[regf.Value("", 0x1F4 + i, b"")])
             for i, name in enumerate(SAM_USERS)]
    return regf.build_hive(regf.Key("ROOT", subkeys=[regf.Key("SAM", subkeys=[
        regf.Key("Domains", subkeys=[regf.Key("Account", subkeys=[
            regf.Key("Users", subkeys=[regf.Key("Names", subkeys=names)])])])])]), "SAM")


def system_files(layout):
    windows = "WINDOWS" if layout == "legacy" else "Windows"
    config = f"{windows}/system32/config" if layout == "legacy" else f"{windows}/System32/config"
    names = ("system", "software", "SAM") if layout == "legacy" else ("SYSTEM", "SOFTWARE", "SAM")
    files = {f"{config}/{names[0]}": system_hive(layout),
             f"{config}/{names[1]}": software_hive(layout),
             f"{config}/{names[2]}": sam_hive(),
             f"{windows}/explorer.exe": b"MZ" + bytes(4094),
             "Program Files/": None}
    if layout == "legacy":
        files.update({"sysprep/sysprep.exe": b"MZ" + bytes(100), "sysprep/i386/": None,
                      "Documents and Settings/All Users/Desktop/readme.txt": README})
    else:
        files.update({f"{windows}/Setup/Scripts/SetupComplete.cmd": SETUP_COMPLETE,
                      "Users/Public/Desktop/readme.txt": README})
    if layout == "gpt":
        files["Unattend.xml"] = IMAGE_UNATTEND
    return files


def partitions(layout):
    """[(name, size MiB, MBR type or GPT GUID, label or None (no file system), files)]."""
    system = ("system", 40, "7" if layout != "gpt" else MS_BASIC_DATA, "", system_files(layout))
    if layout == "legacy":
        return [system]
    reserved = ("reserved", 8, "7" if layout != "gpt" else MS_BASIC_DATA, "System Reserved",
                _boot_files(layout))
    if layout == "gpt":
        return [reserved, ("msr", 4, MS_RESERVED, None, {}), system]
    return [reserved, system]


def wait_for_fuse(mount_point):
    """ntfs-3g writes its last data when its process exits after the unmount."""
    deadline = time.monotonic() + 30
    while leftover_processes(mount_point) and time.monotonic() < deadline:
        time.sleep(0.2)


def make_ntfs(path, size_mib, label, files, start_sector):
    subprocess.run(["truncate", "-s", f"{size_mib}M", str(path)], check=True)
    subprocess.run(["mkntfs", "-F", "-Q", "-q", "-L", label, "-p", str(start_sector),
                    "-H", "255", "-S", "63", str(path)], check=True, capture_output=True)
    with tempfile.TemporaryDirectory(prefix="ntfs-") as mount_point:
        subprocess.run(["ntfs-3g", str(path), mount_point], check=True)
        try:
            for relative, data in files.items():
                target = Path(mount_point, relative)
                if data is None:
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(data)
        finally:
            subprocess.run(["umount", mount_point], check=True)
            wait_for_fuse(mount_point)


def build_image(layout, path):
    parts = partitions(layout)
    start = 2048
    script = ["label: gpt" if layout == "gpt" else "label: dos", "unit: sectors"]
    placed = []
    for name, size, kind, label, files in parts:
        sectors = size * MIB // SECTOR
        bootable = ", bootable" if layout != "gpt" and name in ("reserved", "system") and \
            (name == "reserved" or len(parts) == 1) else ""
        script.append(f"start={start}, size={sectors}, type={kind}{bootable}"
                      + (f', name="{name}"' if layout == "gpt" else ""))
        placed.append((start, sectors, label, files))
        start += sectors
    total = (start + 2048) * SECTOR
    work = Path(str(path) + ".parts")
    work.mkdir(exist_ok=True)
    try:
        subprocess.run(["truncate", "-s", str(total), str(path)], check=True)
        subprocess.run(["sfdisk", "--no-reread", "--no-tell-kernel", "-q", str(path)],
                       input="\n".join(script) + "\n", text=True, check=True, capture_output=True)
        for number, (first, sectors, label, files) in enumerate(placed, 1):
            if label is None:
                continue
            part = work / f"p{number}.ntfs"
            make_ntfs(part, sectors * SECTOR // MIB, label, files, first)
            subprocess.run(["dd", f"if={part}", f"of={path}", "bs=1M", f"seek={first * SECTOR}",
                            "oflag=seek_bytes", "conv=notrunc,sparse", "status=none"], check=True)
            part.unlink()
    finally:
        for leftover in work.iterdir():
            leftover.unlink()
        work.rmdir()


def recipe_hash():
    digest = hashlib.sha256()
    for source in (HERE / "windows_disks.py", HERE / "regf.py"):
        digest.update(source.read_bytes())
    return digest.hexdigest()[:16]


def windows_image(layout):
    """Path of the cached test disk image of `layout`, built on first use."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown Windows test layout {layout!r}")
    IMAGES_DIR.mkdir(parents=True, exist_ok=True)
    path = IMAGES_DIR / f"windows-{layout}-{recipe_hash()}.img"
    with open(IMAGES_DIR / f"windows-{layout}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not path.exists():
            partial = path.with_suffix(".partial")
            partial.unlink(missing_ok=True)
            build_image(layout, partial)
            partial.rename(path)
    return path


# --------------------------------------------------------------------------
# Looking into a deployed disk (read-only)
# --------------------------------------------------------------------------

def partition_table(disk):
    import json
    result = subprocess.run(["sfdisk", "--json", str(disk)], capture_output=True, text=True,
                            check=True)
    return json.loads(result.stdout)["partitiontable"]


def ntfs_volume_bytes(disk, start_sector):
    """The size of the NTFS at `start_sector`, from its boot sector."""
    with open(disk, "rb") as handle:
        handle.seek(start_sector * SECTOR)
        boot = handle.read(SECTOR)
    assert boot[3:11] == b"NTFS    ", "no NTFS boot sector there"
    bytes_per_sector = int.from_bytes(boot[11:13], "little")
    return int.from_bytes(boot[40:48], "little") * bytes_per_sector


def partition_digest(disk, start_sector, sectors):
    digest = hashlib.sha256()
    with open(disk, "rb") as handle:
        handle.seek(start_sector * SECTOR)
        remaining = sectors * SECTOR
        while remaining:
            chunk = handle.read(min(remaining, 4 * MIB))
            digest.update(chunk)
            remaining -= len(chunk)
    return digest.hexdigest()


@contextlib.contextmanager
def mounted_ntfs(disk, start_sector, sectors):
    """The NTFS at `start_sector` of a disk file, mounted read-only with ntfs-3g."""
    loop = subprocess.run(["losetup", "--find", "--show", "--read-only",
                           "--offset", str(start_sector * SECTOR),
                           "--sizelimit", str(sectors * SECTOR), str(disk)],
                          capture_output=True, text=True, check=True).stdout.strip()
    try:
        with tempfile.TemporaryDirectory(prefix="ntfs-check-") as mount_point:
            subprocess.run(["ntfs-3g", "-o", "ro", loop, mount_point], check=True)
            try:
                yield Path(mount_point)
            finally:
                subprocess.run(["umount", mount_point], check=True)
                wait_for_fuse(mount_point)
    finally:
        subprocess.run(["losetup", "-d", loop], check=True)


if __name__ == "__main__":
    import sys
    for name in sys.argv[1:] or LAYOUTS:
        print(windows_image(name))
