#!/usr/bin/env python3
"""Build a small, real, bootable Debian disk image for snf-image's tests.

snf-image deploys OS images (image source -> O_DIRECT copy -> helper VM ->
tasks -> SUCCESS). To prove the tasks right, the tests deploy a real Debian
image and then BOOT the result; this tool makes such an image:

  Debian (default suite bookworm, the mirror of the host's own APT sources)
  -> mmdebstrap rootfs tarball (cached, keyed by suite, mirror and packages)
  -> raw disk image with one of the layouts below, extlinux in the MBR.

Layouts:
  mbr            MBR, one ext4 root (bootable flag), extlinux, ifupdown + DHCP
  gpt            GPT: /boot (ext4, legacy-BIOS-bootable), swap, root LAST;
                 fstab by UUID, systemd-networkd
  gpt-cloud      GPT numbered like Debian's official cloud images: 14 BIOS boot,
                 15 EFI system (vfat, /boot/efi), root is partition 1 but comes
                 LAST on the disk; extlinux on the root; ifupdown
  mbr-cloudinit  as mbr, with cloud-init installed (NoCloud seed expected)

Today's images (meant for --suite trixie; one rootfs with every network
stack, each image purges the stacks it does not use):
  gpt-xfs        as gpt with an XFS root, systemd-networkd only; machine-id
                 holds an id (an image that was not cleaned)
  gpt-cloud-uefi as gpt-cloud, netplan (networkd renderer), systemd-boot on
                 the ESP for UEFI firmware (extlinux stays for BIOS);
                 machine-id `uninitialized` (prepared for a first boot)
  mbr-nm         as mbr, NetworkManager with its own DHCP keyfile for any
                 ethernet NIC; machine-id empty (as Debian's cloud images)

Every image carries `snf-test-report.service`: on its first boot, once the
boot has finished (after network-online.target), it writes the guest's own
state as JSON lines between `==SNF-REPORT-BEGIN==` and `==SNF-REPORT-END==`
to the second serial port (ttyS1; the console if there is none) and powers
the guest off. Later boots of the same disk stay up (login on ttyS0, sshd).
Each JSON line is {"key": ..., "rc": exit status, "b64": base64 of the output}.

Run as root (loop devices, mounts, chroot). The output is written atomically.
"""

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

# Bump when the rootfs tarball recipe changes in a way the package list does not show.
ROOTFS_VERSION = "1"
DEFAULT_SUITE = "bookworm"
APT_SOURCES = Path("/etc/apt/sources.list.d/debian.sources")
LEGACY_APT_SOURCES = Path("/etc/apt/sources.list")
SYSLINUX_MBR_DIR = Path("/usr/lib/syslinux/mbr")
MIB = 1024 * 1024
SECTOR = 512

PROGRAMS = {name: os.environ.get(name.upper().replace("-", "_"), name) for name in (
    "mmdebstrap", "sfdisk", "sgdisk", "mkfs.ext4", "mkswap", "losetup", "mount",
    "umount", "extlinux", "chroot", "tar", "e2fsck", "sync", "mkfs.vfat", "mkfs.xfs",
    "xfs_repair", "mmd", "mcopy")}

BASE_PACKAGES = [
    "systemd-sysv", "udev", "dbus", "linux-image-cloud-amd64", "initramfs-tools",
    "openssh-server", "iproute2", "ifupdown", "isc-dhcp-client", "netbase", "kmod",
    "e2fsprogs", "procps",
]
# Debian 13 and later: no ifupdown (not a network stack of today's images);
# one rootfs holds every stack the layouts use, each image purges the others.
TODAY_PACKAGES = [
    "systemd-sysv", "udev", "dbus", "linux-image-cloud-amd64", "initramfs-tools",
    "openssh-server", "iproute2", "netbase", "kmod", "e2fsprogs", "procps",
    "xfsprogs", "btrfs-progs", "netplan.io", "network-manager", "systemd-boot-efi",
]
SUITE_PACKAGES = {"bookworm": BASE_PACKAGES}
# Packages of each network stack, purged from images that use another one.
STACK_PACKAGES = {
    "ifupdown": ["ifupdown", "isc-dhcp-client", "isc-dhcp-common"],
    "netplan": ["netplan.io"],
    "nm": ["network-manager"],
    "networkd": [],
}

LAYOUTS = {
    "mbr": {"table": "dos", "network": "ifupdown", "cloud_init": False},
    "gpt": {"table": "gpt", "network": "networkd", "cloud_init": False},
    "gpt-cloud": {"table": "gpt-cloud", "network": "ifupdown", "cloud_init": False},
    "mbr-cloudinit": {"table": "dos", "network": "ifupdown", "cloud_init": True},
    # Today's images: XFS root on GPT, systemd-networkd only, predictable names.
    "gpt-xfs": {"table": "gpt", "network": "networkd", "cloud_init": False, "rootfs": "xfs",
                "machine_id": "id"},
    # Debian's genericcloud numbering, booted by UEFI firmware (systemd-boot
    # on the ESP), netplan with the networkd renderer.
    "gpt-cloud-uefi": {"table": "gpt-cloud", "network": "netplan", "cloud_init": False,
                       "firmware": "uefi", "machine_id": "uninitialized"},
    # MBR, NetworkManager with its own keyfile for the NIC.
    "mbr-nm": {"table": "dos", "network": "nm", "cloud_init": False, "machine_id": "empty"},
}

# /etc/machine-id as the image ships it (machine-id(5)): an id, empty (not a
# first boot, systemd makes an id), `uninitialized` (a first boot).
MACHINE_IDS = {"id": lambda: uuid.uuid4().hex + "\n", "empty": lambda: "",
               "uninitialized": lambda: "uninitialized\n"}
SYSTEMD_BOOT_EFI = "usr/lib/systemd/boot/efi/systemd-bootx64.efi"
KERNEL_OPTIONS = "console=tty0 console=ttyS0,115200n8"
# A TCG guest on a busy machine can take minutes to coldplug its disks:
# systemd's default 90 s wait for the devices in fstab (/boot, /boot/efi, the
# swap a deployment adds) is too short.
SLOW_DEVICES_CONF = "[Manager]\nDefaultDeviceTimeoutSec=600\n"

# GPT layout sizes (MiB); the root partition takes the rest, and comes last.
GPT_BOOT_MIB = 192
GPT_SWAP_MIB = 64
CLOUD_BIOS_BOOT_MIB = 3
CLOUD_ESP_MIB = 124

IMAGE_HOSTNAME = "snf-test-image"
IMAGE_USER = "debian"
REPORT_BEGIN = "==SNF-REPORT-BEGIN=="
REPORT_END = "==SNF-REPORT-END=="
STAMP_PATH = "etc/snf-test-image/built"

REPORT_SCRIPT = r"""#!/bin/sh
# snf-test-report: print this guest's state for snf-image's end-to-end tests,
# as JSON lines {"key","rc","b64"} between markers, then power off.
PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export LC_ALL=C
STAMP=/etc/snf-test-image/built
PROBE=/root/.snf-test-password-probe
TMP=$(mktemp)

# Wait for the boot to finish (this unit is Type=simple, so it is not part of
# the job queue it waits for); cloud-init's stages are part of the boot.
timeout 400 systemctl is-system-running --wait >/dev/null 2>&1

OUT=/dev/console
if stty -F /dev/ttyS1 raw -echo 2>/dev/null && printf '\n' > /dev/ttyS1 2>/dev/null; then
    OUT=/dev/ttyS1
fi

settle_network() {
    # Give DHCP leases and router advertisements on the links that are up a
    # moment to arrive (boot may finish first), and DAD time to end.
    for family in 4 6; do
        tries=0
        while [ "$tries" -lt 30 ]; do
            missing=0
            for dev in $(ip -o link show up | awk -F': ' '{print $2}' | cut -d@ -f1); do
                [ "$dev" = lo ] && continue
                ip -o "-$family" addr show dev "$dev" scope global | grep -q . || missing=1
            done
            ip -o addr | grep -q tentative && missing=1
            [ "$missing" -eq 0 ] && break
            tries=$((tries + 1))
            sleep 1
        done
    done
}

item() {
    key=$1; shift
    "$@" > "$TMP" 2>&1
    rc=$?
    printf '{"key":"%s","rc":%d,"b64":"%s"}\n' "$key" "$rc" "$(base64 -w0 < "$TMP")"
}

changed_files() {
    # Everything created or changed (ctime) after the image was built, on the
    # root filesystem: what the deployment (and the boot) changed.
    find / -xdev \( -path /proc -o -path /sys -o -path /dev -o -path /run \
        -o -path /tmp -o -path /var/tmp -o -path /var/log -o -path /var/cache \
        -o -path /var/lib/systemd -o -path /var/lib/dhcp \) -prune \
        -o -cnewer "$STAMP" \( -type f -o -type d -o -type l \) \
        -printf '%y\t%u\t%g\t%m\t%s\t%p\n' |
    while IFS="$(printf '\t')" read -r type user group mode size path; do
        sum=-
        [ "$type" = f ] && sum=$(sha256sum < "$path" | cut -d' ' -f1)
        printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$type" "$user" "$group" "$mode" "$size" "$sum" "$path"
    done
}

report() {
    item os_release cat /etc/os-release
    item uname uname -r
    item cmdline cat /proc/cmdline
    item uefi test -d /sys/firmware/efi
    item uptime cat /proc/uptime
    item system_state systemctl is-system-running
    item failed_units systemctl --failed --plain --no-legend --no-pager
    item hostname hostname
    item etc_hostname cat /etc/hostname
    item etc_hosts cat /etc/hosts
    item passwd cat /etc/passwd
    item shadow cat /etc/shadow
    getent passwd | while IFS=: read -r name _ uid _ _ home _; do
        [ "$uid" -eq 0 ] || [ "$uid" -ge 1000 -a "$uid" -lt 60000 ] || continue
        item "ssh_dir_stat:$name" stat -c '%U %G %a' "$home/.ssh"
        item "authorized_keys_stat:$name" stat -c '%U %G %a' "$home/.ssh/authorized_keys"
        item "authorized_keys:$name" cat "$home/.ssh/authorized_keys"
    done
    for f in /etc/network/interfaces /etc/network/interfaces.d/* \
             /etc/systemd/network/* /etc/netplan/* \
             /etc/NetworkManager/system-connections/* \
             /etc/sysconfig/network /etc/sysconfig/network-scripts/ifcfg-*; do
        [ -f "$f" ] && item "file:$f" cat "$f"
    done
    item ip_addr ip -j addr
    item ip_route ip -j route
    item ip_route6 ip -j -6 route
    item resolv_conf cat /etc/resolv.conf
    for f in /etc/ssh/ssh_host_*_key.pub; do
        [ -f "$f" ] && item "ssh_host_key:$f" ssh-keygen -lf "$f"
    done
    item machine_id cat /etc/machine-id
    item sshd_active sh -c 'systemctl is-active ssh.service 2>/dev/null || systemctl is-active sshd.service'
    item sshd_served_keys sh -c 'for try in 1 2 3; do
        keys=$(ssh-keyscan -T 30 127.0.0.1 2>/dev/null) && [ -n "$keys" ] && break; sleep 5; done
        printf "%s\n" "$keys" | ssh-keygen -lf -'
    item first_boot_units systemctl show --no-pager -p Id -p ConditionResult -p ActiveState \
        -p Result systemd-firstboot.service sshd-keygen.service systemd-machine-id-commit.service
    item journal_first_boot sh -c 'journalctl -b --no-pager -o cat | grep -iE "first boot|firstboot|initializing machine id" | head -n 20'
    if [ -f "$PROBE" ]; then
        # The password given to the deployment, checked by this guest's own
        # crypt(3) (Perl's crypt calls it) against /etc/shadow.
        for user in root debian; do
            item "password_verified:$user" perl -e '
                open(my $probe, "<", $ARGV[1]) or exit 2; my $pw = <$probe>; chomp $pw;
                open(my $shadow, "<", "/etc/shadow") or exit 2;
                while (<$shadow>) { my @f = split /:/; next unless $f[0] eq $ARGV[0];
                    exit 3 if crypt($pw . "x", $f[1]) eq $f[1];
                    exit(crypt($pw, $f[1]) eq $f[1] ? 0 : 1); }
                exit 4' "$user" "$PROBE"
        done
        rm -f "$PROBE"
    fi
    if command -v nmcli >/dev/null; then
        item nmcli_connections nmcli -t -f NAME,TYPE,DEVICE,ACTIVE,FILENAME connection show
        item nmcli_devices nmcli -t -f DEVICE,TYPE,STATE,CONNECTION device status
    fi
    if command -v networkctl >/dev/null; then
        item networkctl networkctl --no-pager --no-legend list
    fi
    item dbus_machine_id cat /var/lib/dbus/machine-id
    item df_root df -B1 --output=source,fstype,size,used,avail,target /
    mountpoint -q /boot && item df_boot df -B1 --output=source,fstype,size,used,avail,target /boot
    item lsblk lsblk -J -b -o NAME,SIZE,TYPE,FSTYPE,UUID,PARTUUID,MOUNTPOINT
    item fstab cat /etc/fstab
    item swaps swapon --show --bytes --raw --noheadings
    item changed_files changed_files
    if command -v cloud-init >/dev/null; then
        item cloud_init_status cloud-init status --long
        item cloud_init_result cat /run/cloud-init/result.json
    fi
    item journal_warnings sh -c 'journalctl -b -p warning --no-pager -o short-monotonic | tail -n 300'
}

settle_network
{
    echo "==SNF-REPORT-BEGIN=="
    report
    echo "==SNF-REPORT-END=="
} > "$OUT" 2>/dev/null
rm -f "$TMP"
# Report and power off on the first boot only: booted again, the VM stays up.
mkdir -p /var/lib/snf-test-report && touch /var/lib/snf-test-report/reported
sync
systemctl --no-block poweroff
"""

REPORT_UNIT = """[Unit]
Description=snf-image test report on the serial port, then power off
Wants=network-online.target
# Not After=cloud-final.service: on Debian that is ordered after
# multi-user.target, which wants this unit (an ordering cycle). The script
# waits for the whole boot, cloud-init's stages included.
After=network-online.target
ConditionPathExists=!/var/lib/snf-test-report/reported

[Service]
Type=simple
ExecStart=/usr/local/sbin/snf-test-report
StandardOutput=journal+console

[Install]
WantedBy=multi-user.target
"""


class BuildError(Exception):
    """An expected failure; main() prints it as one line."""


def log(message):
    print(f"build-test-image: {message}", file=sys.stderr, flush=True)


def run(argv, **kwargs):
    argv = [PROGRAMS.get(argv[0], argv[0]), *argv[1:]]
    try:
        return subprocess.run(argv, check=True, **kwargs)
    except FileNotFoundError as error:
        raise BuildError(f"program not found: {argv[0]}") from error
    except subprocess.CalledProcessError as error:
        raise BuildError(f"{' '.join(map(str, argv[:3]))} ... failed with exit status "
                         f"{error.returncode}") from error


def output_of(argv):
    return run(argv, stdout=subprocess.PIPE, text=True).stdout


# --------------------------------------------------------------- settings

def host_debian_mirror(suite):
    """The URI of the host's own APT sources for Debian (never hard-coded)."""
    uris = []
    if APT_SOURCES.exists():
        for stanza in re.split(r"\n\s*\n", APT_SOURCES.read_text()):
            fields = dict(re.findall(r"^([A-Za-z-]+):\s*(.*)$", stanza, re.M))
            for uri in fields.get("URIs", "").split():
                if "security" not in uri:
                    uris.append(uri)
    if not uris and LEGACY_APT_SOURCES.exists():
        for line in LEGACY_APT_SOURCES.read_text().splitlines():
            words = line.split()
            if len(words) >= 3 and words[0] == "deb" and "security" not in words[1]:
                uris.append(words[1] if not words[1].startswith("[") else words[2])
    if not uris:
        raise BuildError(f"no Debian mirror found in {APT_SOURCES} for suite {suite}")
    return uris[0]


def recipe_for(layout, suite, mirror, size_mib):
    if layout not in LAYOUTS:
        raise BuildError(f"unknown layout {layout!r} (known: {', '.join(LAYOUTS)})")
    packages = list(SUITE_PACKAGES.get(suite, TODAY_PACKAGES))
    if LAYOUTS[layout]["cloud_init"]:
        # cloud-guest-utils (growpart) is only a Recommends of cloud-init, but
        # without it cloud-init cannot grow the root partition.
        packages += ["cloud-init", "cloud-guest-utils"]
    return {"tool_source": short_hash(Path(__file__).read_text()), "layout": layout, "suite": suite,
            "mirror": mirror, "size_mib": size_mib, "packages": sorted(packages),
            "report_script": REPORT_SCRIPT, "report_unit": REPORT_UNIT,
            **LAYOUTS[layout]}


def short_hash(data):
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


# --------------------------------------------------------------- resources

@contextlib.contextmanager
def loop_device(image, offset, size):
    device = output_of(["losetup", "--find", "--show", "--offset", str(offset),
                        "--sizelimit", str(size), str(image)]).strip()
    try:
        yield device
    finally:
        subprocess.run([PROGRAMS["losetup"], "-d", device], check=False)


@contextlib.contextmanager
def mount_point():
    """An empty directory to mount on; removed with rmdir only, so that a
    file system still mounted there is never deleted recursively."""
    path = Path(tempfile.mkdtemp(prefix="snf-test-image-"))
    try:
        yield path
    finally:
        with contextlib.suppress(OSError):
            path.rmdir()


@contextlib.contextmanager
def mounted(device, mountpoint):
    run(["mount", device, str(mountpoint)])
    try:
        yield Path(mountpoint)
    finally:
        subprocess.run([PROGRAMS["sync"]], check=False)
        for _ in range(5):
            if subprocess.run([PROGRAMS["umount"], str(mountpoint)]).returncode == 0:
                break
            time.sleep(1)
        else:
            log(f"warning: could not unmount {mountpoint}")


@contextlib.contextmanager
def chroot_mounts(root):
    """/proc, /sys and /dev inside the image root for chroot commands."""
    done = []
    try:
        for fstype, source, target in (("proc", "proc", "proc"), ("sysfs", "sys", "sys")):
            run(["mount", "-t", fstype, source, str(root / target)])
            done.append(root / target)
        run(["mount", "--bind", "/dev", str(root / "dev")])
        done.append(root / "dev")
        yield root
    finally:
        for path in reversed(done):
            subprocess.run([PROGRAMS["umount"], "-l", str(path)], check=False)


# --------------------------------------------------------------- rootfs

def build_rootfs_tarball(recipe, cache_dir):
    """The mmdebstrap tarball, cached by suite, mirror and package list."""
    key = short_hash({k: recipe[k] for k in ("suite", "mirror", "packages")}
                     | {"rootfs_version": ROOTFS_VERSION})
    tarball = cache_dir / f"rootfs-{recipe['suite']}-{key}.tar"
    if tarball.exists():
        log(f"using cached rootfs {tarball}")
        return tarball
    debs = cache_dir / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    log(f"mmdebstrap {recipe['suite']} from {recipe['mirror']}: {' '.join(recipe['packages'])}")
    with tempfile.TemporaryDirectory(dir=cache_dir) as scratch:
        overlay = Path(scratch) / "overlay"
        (overlay / "etc/initramfs-tools/conf.d").mkdir(parents=True)
        (overlay / "var/cache/apt/archives").mkdir(parents=True)
        # The swap partition must not be waited for as a resume device.
        (overlay / "etc/initramfs-tools/conf.d/resume").write_text("RESUME=none\n")
        partial = Path(scratch) / "rootfs.tar"
        run(["mmdebstrap", "--variant=minbase", "--mode=root", "--format=tar",
             "--include=" + ",".join(recipe["packages"]),
             "--aptopt=Acquire::Languages \"none\"",
             "--dpkgopt=path-exclude=/usr/share/doc/*",
             "--dpkgopt=path-include=/usr/share/doc/*/copyright",
             "--dpkgopt=path-exclude=/usr/share/man/*",
             "--dpkgopt=path-exclude=/usr/share/info/*",
             "--dpkgopt=path-exclude=/usr/share/locale/*",
             "--skip=essential/unlink",
             f"--setup-hook=sync-in {overlay} /",
             f"--setup-hook=sync-in {debs} /var/cache/apt/archives/",
             f"--customize-hook=sync-out /var/cache/apt/archives {debs}",
             recipe["suite"], str(partial), recipe["mirror"]])
        os.replace(partial, tarball)
    return tarball


# --------------------------------------------------------------- partitions

def write_partition_table(image, table):
    """Partition the image; returns the syslinux MBR boot code to install."""
    if table == "dos":
        run(["sfdisk", "--quiet", str(image)],
            input="label: dos\nstart=2048, type=83, bootable\n", text=True)
        return SYSLINUX_MBR_DIR / "mbr.bin"
    # Separate sgdisk invocations: `-q` together with `--clear` wrote no table.
    run(["sgdisk", "--clear", str(image)], stdout=subprocess.DEVNULL)
    if table == "gpt-cloud":
        run(["sgdisk", f"--new=14:2048:+{CLOUD_BIOS_BOOT_MIB}M", "--typecode=14:EF02",
             str(image)], stdout=subprocess.DEVNULL)
        run(["sgdisk", f"--new=15:0:+{CLOUD_ESP_MIB}M", "--typecode=15:EF00", str(image)],
            stdout=subprocess.DEVNULL)
        run(["sgdisk", "--new=1:0:0", "--typecode=1:8300", "--attributes=1:set:2", str(image)],
            stdout=subprocess.DEVNULL)
        return SYSLINUX_MBR_DIR / "gptmbr.bin"
    run(["sgdisk", f"--new=1:2048:+{GPT_BOOT_MIB}M", "--typecode=1:8300",
         "--change-name=1:boot", "--attributes=1:set:2", str(image)], stdout=subprocess.DEVNULL)
    run(["sgdisk", f"--new=2:0:+{GPT_SWAP_MIB}M", "--typecode=2:8200",
         "--change-name=2:swap", str(image)], stdout=subprocess.DEVNULL)
    run(["sgdisk", "--new=3:0:0", "--typecode=3:8300", "--change-name=3:root", str(image)],
        stdout=subprocess.DEVNULL)
    return SYSLINUX_MBR_DIR / "gptmbr.bin"


def partitions(image):
    """{partition number: (offset, size)} in bytes."""
    table = json.loads(output_of(["sfdisk", "--json", str(image)]))["partitiontable"]
    return {int(re.search(r"(\d+)$", p["node"]).group(1)): (p["start"] * SECTOR, p["size"] * SECTOR)
            for p in table["partitions"]}


def install_boot_code(image, boot_code):
    code = boot_code.read_bytes()[:440]
    with open(image, "r+b") as disk:
        disk.write(code)


# --------------------------------------------------------------- customizing

def write(root, relative, text, mode=0o644):
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(mode)


def customize(root, recipe, uuids):
    separate_boot = recipe["table"] == "gpt"
    if recipe.get("rootfs") == "xfs":
        fstab = [f"UUID={uuids['root']}\t/\txfs\tdefaults\t0\t0"]
    else:
        fstab = [f"UUID={uuids['root']}\t/\text4\terrors=remount-ro\t0\t1"]
    if separate_boot:
        fstab.append(f"UUID={uuids['boot']}\t/boot\text4\tdefaults\t0\t2")
        fstab.append(f"UUID={uuids['swap']}\tnone\tswap\tsw\t0\t0")
    if recipe["table"] == "gpt-cloud":
        (root / "boot/efi").mkdir(parents=True, exist_ok=True)
        fstab.append(f"UUID={uuids['esp']}\t/boot/efi\tvfat\tdefaults\t0\t0")
    write(root, "etc/fstab", "# /etc/fstab: static file system information.\n"
          + "\n".join(fstab) + "\n")
    write(root, "etc/hostname", IMAGE_HOSTNAME + "\n")
    write(root, "etc/hosts", f"127.0.0.1\tlocalhost\n127.0.1.1\t{IMAGE_HOSTNAME}\n\n"
          "::1\tlocalhost ip6-localhost ip6-loopback\nff02::1\tip6-allnodes\n"
          "ff02::2\tip6-allrouters\n")
    # By default a fixed machine-id, as in an image that was not cleaned:
    # ChangeMachineId must replace it.
    write(root, "etc/machine-id", MACHINE_IDS[recipe.get("machine_id", "id")](), 0o444)
    dbus_machine_id = root / "var/lib/dbus/machine-id"
    if not dbus_machine_id.exists() and not dbus_machine_id.is_symlink():
        dbus_machine_id.parent.mkdir(parents=True, exist_ok=True)
        dbus_machine_id.symlink_to("/etc/machine-id")
    write(root, "etc/resolv.conf", "")
    write(root, "etc/systemd/system.conf.d/50-snf-test-slow-tcg.conf", SLOW_DEVICES_CONF)
    # No `locales` package: C.UTF-8 is the locale glibc always has.
    write(root, "etc/default/locale", "LANG=C.UTF-8\n")
    if recipe["cloud_init"]:
        # Otherwise cloud-init's locale module runs locale-gen/update-locale for
        # en_US.UTF-8, which fails without `locales` and fails cloud-config.service.
        write(root, "etc/cloud/cloud.cfg.d/01-snf-test-image.cfg", "locale: C.UTF-8\n")

    with chroot_mounts(root):
        run(["chroot", str(root), "useradd", "--create-home", "--uid", "1000",
             "--shell", "/bin/bash", "--comment", "Debian", IMAGE_USER])
        unused = [package for stack, packages in STACK_PACKAGES.items()
                  if stack != recipe["network"] for package in packages
                  if (root / f"var/lib/dpkg/info/{package}.list").exists()
                  or (root / f"var/lib/dpkg/info/{package}:amd64.list").exists()]
        if unused:
            run(["chroot", str(root), "dpkg", "--purge", *unused], stdout=subprocess.DEVNULL)
            # ifupdown's postinst wrote /etc/network/interfaces; purging keeps it.
            if "ifupdown" in unused:
                shutil.rmtree(root / "etc/network", ignore_errors=True)
        # No timers that go to the network or eat CPU during the short test boots.
        for unit in ("apt-daily.timer", "apt-daily-upgrade.timer"):
            (root / "etc/systemd/system" / unit).unlink(missing_ok=True)
            (root / "etc/systemd/system" / unit).symlink_to("/dev/null")

    if recipe["network"] == "ifupdown":
        write(root, "etc/network/interfaces",
              "# The loopback network interface\nauto lo\niface lo inet loopback\n\n"
              "source /etc/network/interfaces.d/*\n\n"
              "# The primary network interface\nallow-hotplug ens3\niface ens3 inet dhcp\n")
    elif recipe["network"] == "nm":
        # A profile of the image for any ethernet NIC, as an installer leaves it.
        write(root, "etc/NetworkManager/system-connections/Wired connection 1.nmconnection",
              f"[connection]\nid=Wired connection 1\nuuid={uuid.uuid4()}\ntype=ethernet\n"
              "autoconnect-priority=-999\n\n[ethernet]\n\n[ipv4]\nmethod=auto\n\n"
              "[ipv6]\naddr-gen-mode=default\nmethod=auto\n", 0o600)
    else:
        if recipe["network"] == "netplan":
            write(root, "etc/netplan/50-image.yaml",
                  "network:\n  version: 2\n  renderer: networkd\n  ethernets:\n"
                  "    all-en:\n      match:\n        name: \"en*\"\n      dhcp4: true\n", 0o600)
        else:
            write(root, "etc/systemd/network/50-dhcp.network",
                  "[Match]\nName=en*\n\n[Network]\nDHCP=yes\n")
        wants = root / "etc/systemd/system/multi-user.target.wants"
        wants.mkdir(parents=True, exist_ok=True)
        (wants / "systemd-networkd.service").unlink(missing_ok=True)
        (wants / "systemd-networkd.service").symlink_to(
            "/lib/systemd/system/systemd-networkd.service")
        online = root / "etc/systemd/system/network-online.target.wants"
        online.mkdir(parents=True, exist_ok=True)
        (online / "systemd-networkd-wait-online.service").unlink(missing_ok=True)
        (online / "systemd-networkd-wait-online.service").symlink_to(
            "/lib/systemd/system/systemd-networkd-wait-online.service")

    write(root, "usr/local/sbin/snf-test-report", REPORT_SCRIPT, 0o755)
    write(root, "etc/systemd/system/snf-test-report.service", REPORT_UNIT)
    wants = root / "etc/systemd/system/multi-user.target.wants"
    wants.mkdir(parents=True, exist_ok=True)
    (wants / "snf-test-report.service").symlink_to("/etc/systemd/system/snf-test-report.service")

    boot = root / "boot"
    kernels = sorted(boot.glob("vmlinuz-*"))
    if len(kernels) != 1:
        raise BuildError(f"expected one kernel in /boot, found {len(kernels)}")
    version = kernels[0].name.removeprefix("vmlinuz-")
    if not (boot / f"initrd.img-{version}").exists():
        raise BuildError(f"no initrd for kernel {version}")
    prefix = "/" if separate_boot else "/boot/"
    write(root, "boot/extlinux/extlinux.conf",
          "DEFAULT debian\nTIMEOUT 1\nPROMPT 0\nSERIAL 0 115200\n\n"
          f"LABEL debian\n  LINUX {prefix}vmlinuz-{version}\n"
          f"  INITRD {prefix}initrd.img-{version}\n"
          f"  APPEND root=UUID={uuids['root']} ro {KERNEL_OPTIONS}\n")
    run(["extlinux", "--install", str(boot / "extlinux")], stdout=subprocess.DEVNULL)
    # Written last: the guest's report lists what changed after this moment.
    time.sleep(1.1)
    write(root, STAMP_PATH, json.dumps({"layout": recipe["layout"], "suite": recipe["suite"],
                                        "kernel": version}) + "\n")


def install_systemd_boot(image, esp_offset, root, uuids):
    """systemd-boot as the removable-media loader of the (unmounted) ESP,
    with the kernel and initrd beside it: what UEFI firmware boots."""
    version = json.loads((root / STAMP_PATH).read_text())["kernel"]
    esp = f"{image}@@{esp_offset}"
    environ = dict(os.environ, MTOOLS_SKIP_CHECK="1")
    run(["mmd", "-i", esp, "::/EFI", "::/EFI/BOOT", "::/loader", "::/loader/entries"], env=environ)
    with tempfile.TemporaryDirectory() as scratch:
        loader = Path(scratch) / "loader.conf"
        loader.write_text("timeout 0\ndefault debian.conf\n")
        entry = Path(scratch) / "debian.conf"
        entry.write_text(f"title Debian\nlinux /vmlinuz\ninitrd /initrd.img\n"
                         f"options root=UUID={uuids['root']} ro {KERNEL_OPTIONS}\n")
        for source, target in ((root / SYSTEMD_BOOT_EFI, "::/EFI/BOOT/BOOTX64.EFI"),
                               (loader, "::/loader/loader.conf"),
                               (entry, "::/loader/entries/debian.conf"),
                               (root / f"boot/vmlinuz-{version}", "::/vmlinuz"),
                               (root / f"boot/initrd.img-{version}", "::/initrd.img")):
            run(["mcopy", "-i", esp, str(source), target], env=environ)


# --------------------------------------------------------------- image

def build_image(recipe, output, cache_dir):
    tarball = build_rootfs_tarball(recipe, cache_dir)
    partial = output.with_name(output.name + ".partial")
    partial.unlink(missing_ok=True)
    with open(partial, "wb") as disk:
        disk.truncate(recipe["size_mib"] * MIB)
    try:
        boot_code = write_partition_table(partial, recipe["table"])
        install_boot_code(partial, boot_code)
        parts = partitions(partial)
        uuids = {name: str(uuid.uuid4()) for name in ("root", "boot", "swap")}
        uuids["esp"] = f"{uuid.uuid4().hex[:4]}-{uuid.uuid4().hex[:4]}".upper()
        boot_part = swap_part = None
        if recipe["table"] == "gpt":
            boot_part, swap_part, root_part = parts[1], parts[2], parts[3]
        else:
            root_part = parts[1]
        if recipe["table"] == "gpt-cloud":
            # The host kernel may lack vfat: the ESP is made, never mounted.
            with loop_device(partial, *parts[15]) as esp_dev:
                run(["mkfs.vfat", "-F", "32", "-n", "EFI", "-i", uuids["esp"].replace("-", ""),
                     esp_dev], stdout=subprocess.DEVNULL)
        with mount_point() as mnt, contextlib.ExitStack() as stack:
            root_dev = stack.enter_context(loop_device(partial, *root_part))
            if recipe.get("rootfs") == "xfs":
                run(["mkfs.xfs", "-q", "-L", "root", "-m", f"uuid={uuids['root']}", root_dev])
            else:
                run(["mkfs.ext4", "-q", "-L", "root", "-U", uuids["root"], root_dev])
            root = stack.enter_context(mounted(root_dev, mnt))
            if boot_part:
                boot_dev = stack.enter_context(loop_device(partial, *boot_part))
                run(["mkfs.ext4", "-q", "-L", "boot", "-U", uuids["boot"], boot_dev])
                (root / "boot").mkdir()
                stack.enter_context(mounted(boot_dev, root / "boot"))
                swap_dev = stack.enter_context(loop_device(partial, *swap_part))
                run(["mkswap", "-U", uuids["swap"], "-L", "swap", swap_dev],
                    stdout=subprocess.DEVNULL)
            log(f"extracting {tarball.name}")
            run(["tar", "--extract", "--numeric-owner", "--xattrs", "--xattrs-include=*",
                 "--acls", "--file", str(tarball), "--directory", str(root)])
            customize(root, recipe, uuids)
            if recipe.get("firmware") == "uefi":
                install_systemd_boot(partial, parts[15][0], root, uuids)
        for part in [root_part] + ([boot_part] if boot_part else []):
            with loop_device(partial, *part) as device:
                if part is root_part and recipe.get("rootfs") == "xfs":
                    run(["xfs_repair", "-n", device], stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL)
                else:
                    run(["e2fsck", "-fn", device], stdout=subprocess.DEVNULL)
        os.replace(partial, output)
    finally:
        partial.unlink(missing_ok=True)
    log(f"built {output} ({recipe['layout']}, {recipe['suite']})")


def cached_image(layout, cache_dir, suite=DEFAULT_SUITE, mirror=None, size_mib=1024):
    """CACHE_DIR/debian-<suite>-<layout>-<recipe hash>.img, built if missing.

    A file lock per layout makes concurrent callers wait for one build; images
    of the same layout with another recipe hash are removed."""
    recipe = recipe_for(layout, suite, mirror or host_debian_mirror(suite), size_mib)
    cache_dir = Path(cache_dir)
    path = cache_dir / f"debian-{suite}-{layout}-{short_hash(recipe)}.img"
    if path.exists():
        return path
    if os.geteuid() != 0:
        raise BuildError("must run as root (loop devices, mounts, chroot)")
    cache_dir.mkdir(parents=True, exist_ok=True)
    with open(cache_dir / f"{layout}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if path.exists():
            return path
        for stale in cache_dir.glob(f"debian-{suite}-{layout}-{'?' * 16}.img"):
            stale.unlink()
        build_image(recipe, path, cache_dir)
    return path


# --------------------------------------------------------------- main

def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layout", choices=sorted(LAYOUTS), required=True)
    parser.add_argument("--output", type=Path,
                        help="the image file to write (default: build into the cache if "
                             "missing and print its path)")
    parser.add_argument("--suite", default=DEFAULT_SUITE)
    parser.add_argument("--mirror", help="Debian mirror URI (default: the host's APT sources)")
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--cache-dir", type=Path, default=Path("/var/cache/snf-image-tests/images"),
                        help="where rootfs tarballs and downloaded packages are kept")
    parser.add_argument("--print-recipe-hash", action="store_true",
                        help="print the hash that identifies this image's recipe and exit")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    try:
        mirror = args.mirror or host_debian_mirror(args.suite)
        recipe = recipe_for(args.layout, args.suite, mirror, args.size_mib)
        if args.print_recipe_hash:
            print(short_hash(recipe))
            return 0
        if args.output is None:
            print(cached_image(args.layout, args.cache_dir, args.suite, mirror, args.size_mib))
            return 0
        if os.geteuid() != 0:
            raise BuildError("must run as root (loop devices, mounts, chroot)")
        args.cache_dir.mkdir(parents=True, exist_ok=True)
        build_image(recipe, args.output.resolve(), args.cache_dir)
    except BuildError as error:
        print(f"build-test-image: error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
