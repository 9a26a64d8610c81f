"""Boot a disk image under qemu TCG and collect the guest's own report.

The end-to-end tests deploy an image through snf-image's `create` and then
boot the result here, as a Ganeti kvm instance would (virtio disk, virtio
NICs with the instance's MACs; SeaBIOS, or OVMF's UEFI firmware with
firmware="uefi"). The test images (tools/build-test-image.py)
run `snf-test-report` once the boot is finished: it writes JSON lines between
REPORT_BEGIN and REPORT_END to the second serial port and powers off.

No traffic leaves this machine: each NIC is a qemu user-mode network with
restrict=on (its DHCP server and IPv6 router advertisements are internal to
qemu). qemu is always killed, on every path.
"""

import base64
import contextlib
import json
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

QEMU = os.environ.get("QEMU", "qemu-system-x86_64")
REPORT_BEGIN = "==SNF-REPORT-BEGIN=="
REPORT_END = "==SNF-REPORT-END=="
DEFAULT_TIMEOUT = 900        # TCG Debian boot: ~25 s idle, minutes on a busy 2-core box
POWEROFF_GRACE = 60          # after the report: time for the guest to power off
# UEFI firmware of Debian's ovmf package: code (read-only) and a template of
# the variable store (copied per boot).
OVMF_CODE = Path(os.environ.get("OVMF_CODE", "/usr/share/OVMF/OVMF_CODE_4M.fd"))
OVMF_VARS = Path(os.environ.get("OVMF_VARS", "/usr/share/OVMF/OVMF_VARS_4M.fd"))


class GuestError(Exception):
    """The guest did not boot or did not report."""


@dataclass(frozen=True)
class Nic:
    """A virtio NIC on its own qemu user-mode network (restrict=on)."""
    mac: str
    net: str = "10.0.2.0/24"              # the user-mode network's IPv4 subnet (DHCP pool)
    ipv6_prefix: str = "2001:db8:ff::"    # announced by router advertisements (global scope)
    ipv6_prefixlen: int = 64

    @property
    def host_address(self):
        """The user-mode network's gateway: .2 of the subnet (qemu's default)."""
        base = self.net.split("/")[0].rsplit(".", 1)[0]
        return f"{base}.2"


@dataclass
class Report:
    """The guest's report: key -> (exit status, output bytes)."""
    items: dict = field(default_factory=dict)
    console: str = ""

    def __contains__(self, key):
        return key in self.items

    def rc(self, key):
        return self.items[key][0]

    def raw(self, key):
        return self.items[key][1]

    def text(self, key):
        return self.items[key][1].decode("utf-8", "replace")

    def json(self, key):
        return json.loads(self.items[key][1])

    def keys_with_prefix(self, prefix):
        return {key[len(prefix):]: self.text(key) for key in self.items if key.startswith(prefix)}

    def changed_files(self):
        """path -> {type, owner, group, mode (int), size, sha256} of files changed after the build."""
        files = {}
        for line in self.text("changed_files").splitlines():
            kind, owner, group, mode, size, digest, path = line.split("\t", 6)
            files[path] = {"type": kind, "owner": owner, "group": group, "mode": int(mode, 8),
                           "size": int(size), "sha256": None if digest == "-" else digest}
        return files

    def addresses(self, mac):
        """(ifname, [(family, address, prefixlen, scope), ...]) of the interface with this MAC."""
        for link in self.json("ip_addr"):
            if link.get("address", "").lower() == mac.lower():
                return link["ifname"], [(a["family"], a["local"], a["prefixlen"], a.get("scope"))
                                        for a in link.get("addr_info", [])]
        raise KeyError(f"no interface with MAC {mac} in the guest")


def parse_report(serial_output, console=""):
    """The Report in the serial output (the last complete one)."""
    text = serial_output.replace("\r", "")
    start = text.rfind(REPORT_BEGIN)
    end = text.find(REPORT_END, start + 1) if start >= 0 else -1
    if start < 0 or end < 0:
        raise GuestError("the guest wrote no complete report"
                         + (f"; console ends with: {console_tail(console)}" if console else ""))
    report = Report(console=console)
    for line in text[start + len(REPORT_BEGIN):end].splitlines():
        line = line.strip()
        if not line:
            continue
        entry = json.loads(line)
        report.items[entry["key"]] = (entry["rc"], base64.b64decode(entry["b64"]))
    return report


def console_tail(console, lines=25):
    return " | ".join(console.replace("\r", "").splitlines()[-lines:])


def qemu_command(disk, nics, report_path, console_path, *, snapshot, memory, uefi_vars=None):
    drive = f"file={disk},format=raw,if=none,id=disk0,cache=unsafe"
    if snapshot:
        drive += ",snapshot=on"
    argv = [QEMU, "-accel", "tcg", "-machine", "pc", "-cpu", "max", "-smp", "1",
            "-m", str(memory), "-nodefaults", "-nographic", "-no-reboot", "-vga", "none",
            "-monitor", "none", "-parallel", "none"]
    if uefi_vars is not None:
        argv += ["-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={OVMF_CODE}",
                 "-drive", f"if=pflash,format=raw,unit=1,file={uefi_vars}"]
    argv += ["-drive", drive, "-device", "virtio-blk-pci,drive=disk0,addr=0x5",
            "-serial", f"file:{console_path}", "-serial", f"file:{report_path}"]
    for index, nic in enumerate(nics):
        argv += ["-netdev", f"user,id=net{index},restrict=on,net={nic.net},"
                            f"ipv6-prefix={nic.ipv6_prefix},ipv6-prefixlen={nic.ipv6_prefixlen}",
                 "-device", f"virtio-net-pci,netdev=net{index},mac={nic.mac},addr={3 + index:#x}"]
    return argv


@contextlib.contextmanager
def running(argv, log_path):
    with open(log_path, "wb") as log:
        process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
    try:
        yield process
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()


def boot(disk, nics=(), *, snapshot=False, timeout=DEFAULT_TIMEOUT, memory=512, keep_dir=None,
         firmware="bios"):
    """Boot DISK until the guest has reported and powered off; return its Report.

    snapshot=True leaves DISK unchanged (writes go to a temporary overlay).
    firmware="uefi": OVMF with a fresh variable store instead of SeaBIOS.
    keep_dir: copy console.log, report.log and qemu.log there (for debugging).
    """
    with tempfile.TemporaryDirectory(prefix="snf-guest-") as workdir:
        work = Path(workdir)
        console_path, report_path, qemu_log = work / "console.log", work / "report.log", work / "qemu.log"
        uefi_vars = None
        if firmware == "uefi":
            uefi_vars = work / "OVMF_VARS.fd"
            shutil.copyfile(OVMF_VARS, uefi_vars)
        elif firmware != "bios":
            raise ValueError(f"unknown firmware {firmware!r}")
        argv = qemu_command(disk, nics, report_path, console_path, snapshot=snapshot, memory=memory,
                            uefi_vars=uefi_vars)
        try:
            with running(argv, qemu_log) as process:
                deadline = time.monotonic() + timeout
                reported_at = None
                while process.poll() is None and time.monotonic() < deadline:
                    time.sleep(1)
                    if reported_at is None and REPORT_END in read(report_path):
                        reported_at = time.monotonic()
                        deadline = min(deadline, reported_at + POWEROFF_GRACE)
                timed_out = process.poll() is None
            console = read(console_path)
            serial = read(report_path)
            if REPORT_END not in serial:
                why = (f"timed out after {timeout} s" if timed_out
                       else f"qemu exited with status {process.returncode}: "
                            f"{read(qemu_log).strip()[-300:]}")
                raise GuestError(f"guest {disk} did not report ({why}); "
                                 f"console ends with: {console_tail(console)}")
            return parse_report(serial, console)
        finally:
            if keep_dir is not None:
                Path(keep_dir).mkdir(parents=True, exist_ok=True)
                for path in (console_path, report_path, qemu_log):
                    if path.exists():
                        shutil.copy(path, Path(keep_dir) / path.name)


def read(path):
    try:
        return Path(path).read_text(errors="replace")
    except FileNotFoundError:
        return ""
