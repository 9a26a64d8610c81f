"""End to end: deploy real Debian images through `create`, boot the result.

Each scenario copies a cached Debian test image (tests/images.py) through the
real OS definition (os-def/create -> snf-image-host.py, with the environment
Ganeti passes, tests/ganeti_env.py) onto a larger disk file, with the real
helper VM built by the real builder (tools/helpervm.py) running the
repository's tasks.d, and with a full customization: hostname, password, two
SSH keys, USERS, a static IPv4 NIC with IPv6 by SLAAC, a DHCP NIC, SWAP,
personality files with owners and modes, and a custom task. The deployed disk
is then booted under qemu TCG (tools/guest.py) and every assertion is made on
the guest's OWN report: what the booted system sees, not what a task wrote.

The cloud-init scenario deploys an image with cloud-init installed and
CLOUD_INIT=yes: the same requests are then fulfilled by cloud-init at first
boot from the NoCloud seed the tasks wrote.

Today's Debian (13) images add what current distributions do at first boot
and the network stacks they ship: an XFS root with systemd-networkd only and
an image machine-id (sshd-keygen.service with ConditionFirstBoot=yes does not
run: the helper makes the keys), the genericcloud layout booted by UEFI
firmware with netplan and an `uninitialized` machine-id (a first boot:
sshd-keygen.service makes the keys, systemd-firstboot must not prompt), and
NetworkManager with the image's own DHCP profile and an empty machine-id.
Each is booted once; every assertion is made on that one report.
"""

import base64
import ctypes
import ctypes.util
import hashlib
import ipaddress
import json
import re
import secrets
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

import ganeti_env
import guest
import images
from conftest import require_helper_build, require_programs, require_root
from helpervm import built_helper_dir
from images import IMAGES_DIR, debian_image

pytestmark = [pytest.mark.root, pytest.mark.qemu, pytest.mark.slow]

MIB = 1024 * 1024
GIB = 1024 * MIB
DISK_SIZE = 3 * GIB
SWAP_MIB = 256
CREATE_TIMEOUT = 1200

STATIC_NIC = {"mac": "aa:00:00:5e:10:01", "ip": "192.0.2.10",
              "network_subnet": "192.0.2.0/24", "network_gateway": "192.0.2.1",
              "network_subnet6": "2001:db8:1::/64", "network_gateway6": "2001:db8:1::1",
              "network_name": "static-net", "network_tags": ""}
DHCP_NIC = {"mac": "aa:00:00:5e:10:02", "ip": "10.0.3.15",
            "network_subnet": "10.0.3.0/24", "network_gateway": "10.0.3.2",
            "network_name": "dhcp-net", "network_tags": "dhcp"}
# The same two networks, as qemu user-mode networks for the deployed guest:
# the first announces the IPv6 prefix (SLAAC), the second serves DHCPv4.
GUEST_NICS = (guest.Nic(STATIC_NIC["mac"], net="192.0.2.0/24", ipv6_prefix="2001:db8:1::"),
              guest.Nic(DHCP_NIC["mac"], net="10.0.3.0/24", ipv6_prefix="2001:db8:3::"))

CUSTOM_TASK = """#!/bin/sh
# Runs inside the helper VM with the deployed image mounted at $SNF_IMAGE_TARGET.
set -e
test -d "$SNF_IMAGE_TARGET/etc"
printf 'custom task ran for %s\\n' "$SNF_IMAGE_HOSTNAME" > "$SNF_IMAGE_TARGET/etc/snf-test-custom-task"
"""


@dataclass
class Scenario:
    layout: str
    instance: str
    properties: dict
    swap_partition: int       # the swap partition SWAP asks for (0: cloud-init makes a swap file)
    root_partition: int
    network: str = "ifupdown"  # the image's network stack
    machine_id: str = "id"     # what the image's /etc/machine-id holds (id, empty, uninitialized)
    firmware: str = "bios"
    root_fstype: str = "ext4"
    first_boot_keygen: bool = False  # the image's own first-boot unit makes the SSH host keys
    node_keygen: bool = True   # the node has ssh-keygen (else the helper makes the host keys)
    # seconds the node's ssh-keygen takes before it starts: longer than the
    # helper's boot, so that the tasks wait for the mailbox in the guest
    node_keygen_delay: int = 0


SCENARIOS = {
    # Image properties given, as a Synnefo image registry would; a new primary
    # swap partition 2 after the grown root.
    "mbr": Scenario("mbr", "vm1.example.org",
                    {"OSFAMILY": "linux", "ROOT_PARTITION": "1", "SWAP": f"2:{SWAP_MIB}"},
                    swap_partition=2, root_partition=1),
    # Numbered like Debian's official cloud images: root is partition 1 but the
    # last on the disk, after 14 (BIOS boot) and 15 (ESP, vfat /boot/efi in
    # fstab); autodetection; the new swap partition 2 comes after the root.
    # The node's ssh-keygen is slow: the tasks wait for its keys in the mailbox.
    "gpt-cloud": Scenario("gpt-cloud", "vm4.example.org", {"SWAP": f"2:{SWAP_MIB}"},
                          swap_partition=2, root_partition=1, node_keygen_delay=25),
    # cloud-init does the growing, and turns SWAP into a swap file.
    "mbr-cloudinit": Scenario("mbr-cloudinit", "vm3.example.org",
                              {"OSFAMILY": "linux", "ROOT_PARTITION": "1", "CLOUD_INIT": "yes",
                               "SWAP": f"2:{SWAP_MIB}"},
                              swap_partition=0, root_partition=1, network="cloud-init"),
    # Debian 13: XFS root on GPT (grown while mounted), systemd-networkd only,
    # predictable names; the image's machine-id is an id, so the next boot is
    # no first boot and its sshd-keygen.service (ConditionFirstBoot=yes) skips.
    # No OSFAMILY / ROOT_PARTITION: the helper detects them (root is partition 3,
    # the last one); the image's own swap partition 2 stays, a new one 4 is added.
    # (The same layout on Debian 12, ext4, is booted pristine by test_images.)
    "gpt-xfs": Scenario("gpt-xfs", "vm5.example.org", {"SWAP": f"4:{SWAP_MIB}"},
                        swap_partition=4, root_partition=3, network="networkd",
                        root_fstype="xfs"),
    # Debian 13 genericcloud numbering booted by UEFI firmware, netplan; the
    # image is prepared for a first boot (`uninitialized`).
    "gpt-cloud-uefi": Scenario("gpt-cloud-uefi", "vm6.example.org", {"SWAP": f"2:{SWAP_MIB}"},
                               swap_partition=2, root_partition=1, network="netplan",
                               machine_id="uninitialized", firmware="uefi",
                               first_boot_keygen=True),
    # Debian 13 with NetworkManager and its own DHCP profile for any NIC; an
    # empty machine-id (no first boot, systemd makes the id). The node has no
    # ssh-keygen: the helper makes the host keys itself.
    "mbr-nm": Scenario("mbr-nm", "vm7.example.org",
                       {"OSFAMILY": "linux", "ROOT_PARTITION": "1", "SWAP": f"2:{SWAP_MIB}"},
                       swap_partition=2, root_partition=1, network="nm", machine_id="empty",
                       node_keygen=False),
}
PASSWORD_PROBE = "/root/.snf-test-password-probe"   # read (and removed) by the guest's report


def personality(password):
    """Files to inject: (path, content, owner, group, mode) and their JSON; the
    JSON also carries the password for the guest to check with its own crypt."""
    files = [
        ("/etc/snf-test/motd-extra", b"Deployed by snf-image\n", "root", "root", 0o644),
        ("/home/debian/notes/todo.txt", b"secret notes of debian\n", "debian", "debian", 0o600),
        ("/root/snf-defaults", b"no owner, group or mode given\n", None, None, None),
    ]
    entries = []
    for path, content, owner, group, mode in files:
        entry = {"path": path, "contents": base64.b64encode(content).decode()}
        if owner:
            entry.update(owner=owner, group=group, mode=mode)
        entries.append(entry)
    entries.append({"path": PASSWORD_PROBE, "owner": "root", "group": "root", "mode": 0o600,
                    "contents": base64.b64encode(password.encode() + b"\n").decode()})
    return files, json.dumps(entries)


def ssh_public_keys(directory):
    keys = []
    for index, kind in enumerate(("ed25519", "rsa")):
        path = Path(directory) / f"key{index}"
        subprocess.run(["ssh-keygen", "-q", "-t", kind, "-N", "", "-C", f"tester{index}@example.org",
                        "-f", str(path)], check=True)
        keys.append(path.with_suffix(".pub").read_text().strip())
    return keys


def system_crypt(password, setting):
    """crypt(3) of the system's libcrypt (libxcrypt, as in the Debian guest)."""
    library = ctypes.CDLL(ctypes.util.find_library("crypt") or "libcrypt.so.1")
    library.crypt.restype = ctypes.c_char_p
    library.crypt.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
    result = library.crypt(password.encode(), setting.encode())
    return result.decode() if result else None


def fingerprint(public_key_line):
    blob = base64.b64decode(public_key_line.split()[1])
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


def partition_table(path):
    return json.loads(subprocess.run(["sfdisk", "--json", str(path)], check=True,
                                     capture_output=True, text=True).stdout)["partitiontable"]


def files_in_image(image, partition_number, paths):
    """Read files from a partition of an image: ext4 through debugfs (no
    mount), XFS mounted read-only without log recovery (the image is ours)."""
    part = next(p for p in partition_table(image)["partitions"]
                if p["node"].rsplit("img", 1)[1] == str(partition_number))
    device = subprocess.run(["losetup", "--find", "--show", "--read-only",
                             "--offset", str(part["start"] * 512), "--sizelimit", str(part["size"] * 512),
                             str(image)], check=True, capture_output=True, text=True).stdout.strip()
    try:
        fstype = subprocess.run(["blkid", "-p", "-o", "value", "-s", "TYPE", device],
                                capture_output=True, text=True).stdout.strip()
        if fstype != "xfs":
            return {path: subprocess.run(["debugfs", "-R", f"cat {path}", device], check=True,
                                         capture_output=True, text=True).stdout for path in paths}
        with tempfile.TemporaryDirectory(prefix="snf-e2e-ro-") as mount_point:
            subprocess.run(["mount", "-t", "xfs", "-o", "ro,norecovery", device, mount_point],
                           check=True)
            try:
                files = {}
                for path in paths:
                    try:
                        files[path] = (Path(mount_point) / path.lstrip("/")).read_text()
                    except FileNotFoundError:
                        files[path] = ""
                return files
            finally:
                subprocess.run(["umount", mount_point], check=False)
    finally:
        subprocess.run(["losetup", "-d", device], check=False)


@dataclass
class Deployment:
    scenario: Scenario
    password: str
    keys: list
    files: list
    create: subprocess.CompletedProcess
    disk: Path
    pristine: dict
    report: guest.Report = None


def deploy_and_boot(scenario, workdir):
    """Run the real `create` on a fresh 3 GiB disk file, then boot it."""
    image = debian_image(scenario.layout)
    helper_dir = built_helper_dir()
    workdir.mkdir(parents=True, exist_ok=True)
    pristine_paths = ["/etc/machine-id", "/etc/ssh/ssh_host_ed25519_key.pub",
                      "/etc/ssh/ssh_host_rsa_key.pub", "/etc/ssh/ssh_host_ecdsa_key.pub"]
    pristine = files_in_image(image, scenario.root_partition, pristine_paths)

    variants = workdir / "variants"
    variants.mkdir()
    (variants / "default.conf").write_text("")
    keygen = "ssh-keygen" if scenario.node_keygen else "/nonexistent/ssh-keygen"
    if scenario.node_keygen_delay:
        slow_keygen = workdir / "slow-ssh-keygen"
        slow_keygen.write_text(f'#!/bin/sh\nsleep {scenario.node_keygen_delay}\nexec ssh-keygen "$@"\n')
        slow_keygen.chmod(0o755)
        keygen = str(slow_keygen)
    config = workdir / "snf-image.conf"
    config.write_text(f'IMAGE_DIR="{IMAGES_DIR}"\nVARIANTS_DIR="{variants}"\n'
                      f'HELPER_DIR="{helper_dir}"\nHELPER_ACCEL="tcg"\n'
                      'HELPER_SOFT_TIMEOUT="15m"\nHELPER_HARD_TIMEOUT="30"\n'
                      f'SSH_KEYGEN="{keygen}"\n')
    os_dir = ganeti_env.install_os_dir(workdir / "os")
    disk = workdir / "disk0.img"
    with open(disk, "wb") as handle:
        handle.truncate(DISK_SIZE)

    password = "Pw-" + secrets.token_urlsafe(12)
    keys = ssh_public_keys(workdir)
    files, personality_json = personality(password)
    properties = dict(scenario.properties, USERS="root debian",
                      CUSTOM_TASK=base64.b64encode(CUSTOM_TASK.encode()).decode())
    osparams = {"img_id": image.name, "img_format": "diskdump", "img_passwd": password,
                "img_properties": json.dumps(properties), "img_personality": personality_json,
                "auth_keys": "\n".join(keys) + "\n"}
    env = ganeti_env.create_env([disk], nics=[STATIC_NIC, DHCP_NIC], osparams=osparams,
                                instance=scenario.instance)
    env["DISK_0_SIZE"] = str(DISK_SIZE // MIB)
    env["SNF_IMAGE_CONFIG"] = str(config)
    image_mtime = image.stat().st_mtime_ns
    create = subprocess.run([str(os_dir / "create")], env=env, cwd=os_dir, capture_output=True,
                            text=True, timeout=CREATE_TIMEOUT)
    (workdir / "create.log").write_text(create.stdout + create.stderr)
    assert image.stat().st_mtime_ns == image_mtime, "create must not modify the source image"
    deployment = Deployment(scenario, password, keys, files, create, disk, pristine)
    assert create.returncode == 0, (f"create failed (exit {create.returncode}); log tail:\n"
                                    + "\n".join((create.stdout + create.stderr).splitlines()[-40:]))
    deployment.report = guest.boot(disk, GUEST_NICS, keep_dir=workdir / "guest",
                                   firmware=scenario.firmware)
    return deployment


@pytest.fixture(scope="module", params=list(SCENARIOS))
def deployment(request, tmp_path_factory):
    require_root()
    require_programs("qemu-system-x86_64", "mmdebstrap", "ssh-keygen", "debugfs", "sfdisk",
                     "mkfs.xfs", "mcopy")
    require_helper_build()
    scenario = SCENARIOS[request.param]
    return deploy_and_boot(scenario, tmp_path_factory.mktemp(f"e2e-{scenario.layout}"))


def cloud_init(deployment):
    return deployment.scenario.properties.get("CLOUD_INIT") == "yes"


# ----------------------------------------------------------------- create itself

def test_create_logs_no_secrets(deployment):
    log = deployment.create.stdout + deployment.create.stderr
    assert deployment.password not in log
    for key in deployment.keys:
        assert key.split()[1] not in log
    # nor the host keys and password hashes made on the node
    assert "PRIVATE KEY" not in log
    hashes = {line.split(":")[1] for line in deployment.report.text("shadow").splitlines()
              if line.count(":") >= 2}
    assert not [value for value in hashes if value.startswith("$") and value in log]


def test_no_failed_units(deployment):
    report = deployment.report
    assert report.text("failed_units").strip() == "", report.text("journal_warnings")[-3000:]
    assert report.text("system_state").strip() == "running"
    if cloud_init(deployment):
        result = json.loads(report.text("cloud_init_result"))["v1"]
        assert result["errors"] == [], result
        assert "status: done" in report.text("cloud_init_status")


# ----------------------------------------------------------------- disk and file systems

def test_root_filesystem_fills_the_disk(deployment):
    table = partition_table(deployment.disk)
    parts = {int(p["node"].rsplit("img", 1)[1]): p for p in table["partitions"]}
    root = parts[deployment.scenario.root_partition]
    root_end = (root["start"] + root["size"]) * 512
    swap_bytes = SWAP_MIB * MIB if deployment.scenario.swap_partition else 0
    # The grown partition ends where the disk (less 1 MiB and the new swap) ends.
    assert root_end >= DISK_SIZE - swap_bytes - 4 * MIB, table
    size = int(deployment.report.text("df_root").splitlines()[1].split()[2])
    assert size >= 0.95 * root["size"] * 512
    if deployment.scenario.layout.startswith("gpt"):
        assert table["label"] == "gpt"
        # The backup GPT header was moved to the end of the larger disk.
        assert table["lastlba"] >= DISK_SIZE // 512 - 34


def test_ext4_root_grown_online_and_consistent(deployment):
    """An ext4 root is grown online by FilesystemResizeMounted (no e2fsck and
    no resize2fs in the helper) to the size resize2fs gives it, and passes
    e2fsck after the guest has run on it."""
    log = deployment.create.stdout + deployment.create.stderr
    grown = re.findall(r"\[40FilesystemResizeMounted\] ext4 on \S+ grown online from (\d+) "
                       r"to (\d+) blocks", log)
    if deployment.scenario.root_fstype != "ext4" or cloud_init(deployment):
        assert not grown, log
        return
    announced = re.findall(r"\[20FilesystemResizeUnmounted\] ext4 on \S+ is left to "
                           r"FilesystemResizeMounted to grow online from (\d+) to (\d+) blocks", log)
    assert len(grown) == 1 and announced == grown, log
    assert "Resizing the filesystem on" not in log and "[81FilesystemResizeAfterUmount]" not in log
    part = next(p for p in partition_table(deployment.disk)["partitions"]
                if p["node"].rsplit("img", 1)[1] == str(deployment.scenario.root_partition))
    device = subprocess.run(["losetup", "--find", "--show", "--read-only",
                             "--offset", str(part["start"] * 512),
                             "--sizelimit", str(part["size"] * 512), str(deployment.disk)],
                            check=True, capture_output=True, text=True).stdout.strip()
    try:
        header = subprocess.run(["dumpe2fs", "-h", device], check=True, capture_output=True,
                                text=True).stdout
        fields = {key.strip(): value.strip() for key, _, value in
                  (line.partition(":") for line in header.splitlines())}
        blocks, block_size, per_group = (int(fields[key]) for key in
                                         ("Block count", "Block size", "Blocks per group"))
        assert blocks == int(grown[0][1]) > int(grown[0][0])
        # the whole partition but a last group too small to keep
        assert 0 <= part["size"] * 512 - blocks * block_size < per_group * block_size
        subprocess.run(["e2fsck", "-f", "-n", device], check=True, capture_output=True)
    finally:
        subprocess.run(["losetup", "-d", device], check=False)


def test_swap(deployment):
    report = deployment.report
    swaps = [line.split() for line in report.text("swaps").splitlines()]
    if deployment.scenario.swap_partition:
        device = f"/dev/vda{deployment.scenario.swap_partition}"
        entry = next((s for s in swaps if s[0] == device), None)
        assert entry is not None, swaps
        assert entry[1] == "partition" and int(entry[2]) >= (SWAP_MIB - 1) * MIB
        part = next(p for p in partition_table(deployment.disk)["partitions"]
                    if p["node"].rsplit("img", 1)[1] == str(deployment.scenario.swap_partition))
        assert part["size"] * 512 == SWAP_MIB * MIB
        assert part["type"] == ("0657FD6D-A4AB-43C4-84E5-0933C84B4F4F"
                                if deployment.scenario.layout.startswith("gpt") else "82"), part
        uuid_line = [line for line in report.text("fstab").splitlines() if "swap" in line.split()[2:3]]
        assert any(line.split()[0].strip('"').startswith("UUID=") for line in uuid_line)
    else:
        # cloud-init: a swap file instead of the partition.
        assert any(s[1] == "file" for s in swaps), swaps
    if deployment.scenario.layout == "gpt-xfs":
        assert any(s[0] == "/dev/vda2" for s in swaps), "the image's own swap partition stays in use"


# ----------------------------------------------------------------- identity

def test_hostname(deployment):
    fqdn = deployment.scenario.instance
    report = deployment.report
    assert report.text("hostname").strip() in (fqdn, fqdn.split(".")[0])
    assert report.text("etc_hostname").strip() in (fqdn, fqdn.split(".")[0])
    hosts = [line.split() for line in report.text("etc_hosts").splitlines()]
    assert any(fqdn in line[1:] for line in hosts if line), report.text("etc_hosts")
    assert not any("snf-test-image" in line for line in hosts)


def test_machine_id_is_new(deployment):
    machine_id = deployment.report.text("machine_id").strip()
    assert len(machine_id) == 32 and int(machine_id, 16) >= 0
    assert machine_id != deployment.pristine["/etc/machine-id"].strip()


def test_ssh_host_keys_are_new(deployment):
    report = deployment.report
    now = {line.split()[1] for line in report.keys_with_prefix("ssh_host_key:").values()}
    assert now, "the guest has no SSH host keys"
    before = {fingerprint(text) for text in deployment.pristine.values() if text.startswith("ssh-")
              or text.startswith("ecdsa-")}
    assert before and not (now & before), "the image's SSH host keys were not replaced"
    scenario, log = deployment.scenario, deployment.create.stdout + deployment.create.stderr
    if cloud_init(deployment) or scenario.first_boot_keygen:     # the image makes them
        assert "New SSH host keys" not in log
        if cloud_init(deployment):
            assert "prepared on the node: SSH host keys (none)" in log
    elif scenario.node_keygen:      # made on the node while the image was copied
        assert "New SSH host keys prepared on the node: /etc/ssh/ssh_host_" in log
        assert "New SSH host keys made:" not in log
        if scenario.node_keygen_delay:  # posted into the mailbox while the tasks waited for it
            assert log.count("waiting for the SSH host keys and password hashes being made") >= 1
            assert "no answer from the node" not in log and "inconsistent" not in log
    else:                           # the fallback: the helper's own ssh-keygen
        assert "prepared on the node: SSH host keys (none)" in log
        assert "New SSH host keys made: /etc/ssh/ssh_host_" in log
        assert "New SSH host keys prepared on the node" not in log


# ----------------------------------------------------------------- users

def test_password_of_every_user(deployment):
    shadow = {line.split(":")[0]: line.split(":")[1]
              for line in deployment.report.text("shadow").splitlines() if line}
    for user in ("root", "debian"):
        hashed = shadow[user]
        assert hashed.startswith("$"), f"{user}: not a crypt hash"
        assert system_crypt(deployment.password, hashed) == hashed, f"{user}: password does not verify"
        assert system_crypt(deployment.password + "x", hashed) != hashed


def test_authorized_keys(deployment):
    report = deployment.report
    users = {"root": ("root", "root"), "debian": ("debian", "debian")}
    for user, (owner, group) in users.items():
        text = report.text(f"authorized_keys:{user}")
        for key in deployment.keys:
            assert key.split()[1] in text, f"key missing for {user}"
        assert report.text(f"authorized_keys_stat:{user}").split() == [owner, group, "600"]
        assert report.text(f"ssh_dir_stat:{user}").split() == [owner, group, "700"]


# ----------------------------------------------------------------- network

def addresses(report, mac):
    for link in report.json("ip_addr"):
        if link.get("address", "").lower() == mac:
            return link["ifname"], link.get("addr_info", [])
    raise AssertionError(f"no interface with MAC {mac}")


def test_static_ipv4_and_slaac(deployment):
    report = deployment.report
    ifname, addrs = addresses(report, STATIC_NIC["mac"])
    static = [a for a in addrs if a["family"] == "inet"]
    assert [(a["local"], a["prefixlen"]) for a in static] == [("192.0.2.10", 24)], addrs
    assert static[0].get("valid_life_time", 4294967295) == 4294967295, "static means no lease"
    prefix = ipaddress.ip_network(STATIC_NIC["network_subnet6"])
    slaac = [a for a in addrs if a["family"] == "inet6" and a.get("scope") == "global"
             and ipaddress.ip_address(a["local"]) in prefix]
    assert slaac and slaac[0]["prefixlen"] == 64, addrs
    routes = report.json("ip_route")
    assert any(r.get("dst") == "default" and r.get("gateway") == STATIC_NIC["network_gateway"]
               and r.get("dev") == ifname for r in routes), routes


def test_dhcp_nic(deployment):
    ifname, addrs = addresses(deployment.report, DHCP_NIC["mac"])
    leased = [a for a in addrs if a["family"] == "inet"]
    assert [(a["local"], a["prefixlen"]) for a in leased] == [("10.0.3.15", 24)], addrs
    assert leased[0].get("valid_life_time", 4294967295) < 4294967295, "a DHCP lease expires"


# ----------------------------------------------------------------- files

def test_personality_files(deployment):
    changed = deployment.report.changed_files()
    for path, content, owner, group, mode in deployment.files:
        assert path in changed, f"{path} was not injected"
        entry = changed[path]
        expected = (owner or "root", group or "root", 0o440 if mode is None else mode)
        assert (entry["owner"], entry["group"], entry["mode"]) == expected, (path, entry)
        assert entry["sha256"] == hashlib.sha256(content).hexdigest()
    # A missing parent directory belongs to the file's owner (as upstream), or
    # debian could not reach its own file.
    notes = changed["/home/debian/notes"]
    assert (notes["type"], notes["owner"], notes["group"]) == ("d", "debian", "debian"), notes


def test_custom_task_ran(deployment):
    changed = deployment.report.changed_files()
    expected = f"custom task ran for {deployment.scenario.instance}\n".encode()
    assert changed["/etc/snf-test-custom-task"]["sha256"] == hashlib.sha256(expected).hexdigest()


# ----------------------------------------------------------------- first boot, sshd

def pristine_fingerprints(deployment):
    return {fingerprint(text) for text in deployment.pristine.values()
            if text.startswith(("ssh-", "ecdsa-"))}


def unit_states(report):
    """{unit: {property: value}} from `systemctl show` of the first-boot units."""
    units = {}
    for block in report.text("first_boot_units").split("\n\n"):
        values = dict(line.split("=", 1) for line in block.splitlines() if "=" in line)
        if "Id" in values:
            units[values["Id"]] = values
    return units


def test_sshd_serves_the_new_host_keys(deployment):
    report = deployment.report
    assert report.text("sshd_active").strip() == "active", report.text("journal_warnings")[-3000:]
    served = {line.split()[1] for line in report.text("sshd_served_keys").splitlines() if line.strip()}
    on_disk = {line.split()[1] for line in report.keys_with_prefix("ssh_host_key:").values()}
    assert served and served <= on_disk, (served, on_disk)
    assert not served & pristine_fingerprints(deployment)


def test_one_new_machine_id_and_first_boot_units(deployment):
    scenario, report = deployment.scenario, deployment.report
    machine_id = report.text("machine_id").strip()
    assert report.text("dbus_machine_id").strip() == machine_id, "D-Bus and systemd disagree"
    units = unit_states(report)
    first_boot = scenario.machine_id == "uninitialized"
    for unit in ("systemd-firstboot.service", "sshd-keygen.service"):
        if units.get(unit, {}).get("ActiveState") is None or not today(scenario):
            continue
        assert units[unit]["ConditionResult"] == ("yes" if first_boot else "no"), units[unit]
        if first_boot:
            assert (units[unit]["ActiveState"], units[unit]["Result"]) == ("active", "success")
    log = deployment.create.stdout + deployment.create.stderr
    if scenario.first_boot_keygen:
        assert "sshd-keygen.service makes new host keys at its first boot" in log
        # The wizard runs (first boot) but without its console prompts.
        assert "systemd-firstboot.service will run without prompting" in log
    elif not cloud_init(deployment):        # made now: by the helper or on the node
        assert "New SSH host keys made" in log or "New SSH host keys prepared on the node" in log
    if today(scenario) and not first_boot:
        assert "sshd-keygen.service will not run at the next boot (not a first boot)" in log


def today(scenario):
    return images.LAYOUTS[scenario.layout] == images.TODAY_SUITE


def test_password_verified_by_the_guest_and_hashed_as_the_image_expects(deployment):
    report = deployment.report
    for user in ("root", "debian"):
        assert report.rc(f"password_verified:{user}") == 0, f"{user}: the guest's crypt refuses it"
    if cloud_init(deployment):
        return
    shadow = {line.split(":")[0]: line.split(":")[1]
              for line in report.text("shadow").splitlines() if line}
    # Debian 11 and later hash with yescrypt (pam_unix ... yescrypt), here with
    # the hashes made on the node while the image was copied, a salt per user
    assert shadow["root"].startswith("$y$") and shadow["debian"].startswith("$y$"), shadow
    assert shadow["root"] != shadow["debian"]
    log = deployment.create.stdout + deployment.create.stderr
    assert "Using the yescrypt hashes prepared on the node" in log


# ----------------------------------------------------------------- network stacks as shipped

def test_network_stack_of_the_image(deployment):
    scenario, report = deployment.scenario, deployment.report
    static_if, _ = addresses(report, STATIC_NIC["mac"])
    dhcp_if, _ = addresses(report, DHCP_NIC["mac"])
    if scenario.network == "nm":
        connections = [line.split(":") for line in report.text("nmcli_connections").splitlines()]
        names = {fields[0] for fields in connections}
        assert "Wired connection 1" not in names, "the image's own profile must be out of use"
        active = {fields[2]: fields[0] for fields in connections if fields[3] == "yes"}
        assert active.get(static_if) == "snf-image eth0" and active.get(dhcp_if) == "snf-image eth1", \
            connections
        devices = {fields[0]: fields for fields in
                   (line.split(":") for line in report.text("nmcli_devices").splitlines())}
        assert devices[static_if][2] == "connected", devices
        changed = deployment.report.changed_files()
        assert "/etc/NetworkManager/snf-image-disabled/Wired connection 1.nmconnection" in changed
        assert "file:/etc/NetworkManager/system-connections/Wired connection 1.nmconnection" \
            not in report
    elif scenario.network == "netplan":
        assert "file:/etc/netplan/50-snf-image.yaml" in report
        assert "file:/etc/netplan/50-image.yaml" not in report, "the image's netplan file stays active"
        assert (static_if, dhcp_if) == ("eth0", "eth1")
    elif scenario.network == "networkd":
        # Predictable names stay: networkd matches the NICs by MAC address.
        assert static_if.startswith("en") and dhcp_if.startswith("en"), (static_if, dhcp_if)
        assert "file:/etc/systemd/network/10-snf-image-eth0.network" in report


def test_root_filesystem_type_and_firmware(deployment):
    scenario, report = deployment.scenario, deployment.report
    assert report.text("df_root").splitlines()[1].split()[1] == scenario.root_fstype
    assert (report.rc("uefi") == 0) == (scenario.firmware == "uefi")
