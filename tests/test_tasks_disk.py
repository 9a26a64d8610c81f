"""The real task scripts of tasks.d/ run as root on the host against small
real disk images on loop devices, the way the runner runs them inside the
helper VM (same environment variables, the real library), and the results
are checked on the disks: partition tables, grown file systems, mounts,
fstab, shadow hashes verified with the system's crypt(3), authorized_keys
modes, network files, host keys made by the helper's own ssh-keygen,
injected files, and refusal of an unclean file system.  ext2/3/4 growth:
online where the kernel may (where the container withholds the capability
the ioctl needs, the safety net's offline growth is what is checked),
offline where it may not, the safety net, the exclusions, and the target
size against resize2fs itself.  The booted end-to-end proof (with the
online growth in the helper VM) is tests/test_e2e_linux.py."""

import base64
import contextlib
import ctypes
import json
import os
import stat
import subprocess

import pytest

from conftest import REPO, load_script, require_programs, require_root

pytestmark = pytest.mark.root

TASKS = REPO / "tasks.d"
load_script("snf-image-helper.py", "snf_image_helper")       # what the task library imports
LIB = load_script("tasks.d/snf_image_tasklib.py", "snf_image_tasklib")
MIB = 1024 * 1024
TEST_PASSWORD = "test-Passw0rd!"
KEYS = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIKeyOne one@test\nssh-rsa AAAAB3KeyTwo two@test\n"
ROOT_UUID = "5d8a3c1e-0000-4000-8000-000000000001"
BOOT_UUID = "5d8a3c1e-0000-4000-8000-000000000002"


def sh(*argv, **kwargs):
    kwargs.setdefault("check", True)
    return subprocess.run([str(a) for a in argv], capture_output=True, text=True, **kwargs)


@pytest.fixture
def machine(lib_dir, tmp_path):
    require_root()
    require_programs("losetup", "sfdisk", "sgdisk", "partx", "mkfs.ext4", "resize2fs",
                     "mkswap", "blkid", "mount", "chroot")
    with contextlib.ExitStack() as stack:
        yield Machine(lib_dir, tmp_path, stack)


class Machine:
    """A disk image on a loop device, a target directory, and the task runner."""

    def __init__(self, lib_dir, tmp_path, stack):
        self.lib_dir = lib_dir
        self.tmp = tmp_path
        self.stack = stack
        self.target = tmp_path / "target"
        self.target.mkdir()
        self.devices = []
        stack.callback(self.cleanup)

    def cleanup(self):
        for base in (self.target, self.tmp / "check"):
            if base.exists():
                sh("umount", "-R", base, check=False)
        for device in reversed(self.devices):
            sh("losetup", "-d", device, check=False)

    def attach(self, image):
        device = sh("losetup", "-f", "--show", "-P", image).stdout.strip()
        self.devices.append(device)
        sh("partx", "-u", device, check=False)
        sh("partx", "-a", device, check=False)
        return device

    def part(self, device, number):
        return f"{device}p{number}"

    def run(self, task, env, check=True):
        environ = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
                   "PYTHONDONTWRITEBYTECODE": "1", "SNF_IMAGE_HELPER_LIB": str(self.lib_dir),
                   "SNF_IMAGE_TARGET": str(self.target), "TASKNAME": task}
        environ.update(env)
        result = subprocess.run([str(TASKS / task)], env=environ, capture_output=True,
                                text=True, timeout=600)
        if check and result.returncode != 0:
            raise AssertionError(f"{task} failed: {result.stderr}")
        return result

    @contextlib.contextmanager
    def mounted(self, device, number):
        check = self.tmp / "check"
        check.mkdir(exist_ok=True)
        sh("mount", self.part(device, number), check)
        try:
            yield check
        finally:
            sh("umount", check)


def system_crypt(password, setting):
    library = ctypes.CDLL("libcrypt.so.1")
    library.crypt.restype = ctypes.c_char_p
    library.crypt.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
    return library.crypt(password.encode(), setting.encode()).decode()


def table(device):
    return json.loads(sh("sfdisk", "--json", device).stdout)["partitiontable"]


def block_count_bytes(partition):
    out = sh("dumpe2fs", "-h", partition).stdout
    fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    return int(fields["Block count"]) * int(fields["Block size"])


def debian_tree(root, interfaces=True):
    """The files a Debian-like image has that the tasks look at."""
    files = {
        "etc/debian_version": "12.0\n",
        "etc/hostname": "template\n",
        "etc/hosts": "127.0.0.1\tlocalhost\n127.0.1.1\ttemplate\n::1\tlocalhost\n",
        "etc/passwd": "root:x:0:0:root:/root:/bin/bash\n"
                      "user:x:1000:1000:User:/home/user:/bin/bash\n",
        "etc/group": "root:x:0:\nuser:x:1000:\n",
        "etc/shadow": "root:*:19000:0:99999:7:::\nuser:!:19000:0:99999:7:::\n"
                      "userx:!:19000:0:99999:7:::\n",
        "etc/machine-id": "0123456789abcdef0123456789abcdef\n",
        "etc/ssh/sshd_config": "Include /etc/ssh/sshd_config.d/*.conf\n"
                               "HostKey /etc/ssh/custom_ed25519_key\n",
        "etc/ssh/sshd_config.d/keys.conf": "AuthorizedKeysFile .ssh/authorized_keys\n",
        "etc/ssh/ssh_host_rsa_key": "old", "etc/ssh/ssh_host_rsa_key.pub": "old",
        "etc/ssh/custom_ed25519_key": "-----BEGIN OPENSSH PRIVATE KEY-----\n",
        "usr/sbin/ifup": "#!/bin/sh\n",
        "home/user/.keep": "",
    }
    if interfaces:
        files["etc/network/interfaces"] = "source /etc/network/interfaces.d/*\n"
    for path, text in files.items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_text(text)
    os.chmod(root / "etc/shadow", 0o640)
    os.chown(root / "home/user", 1000, 1000)
    (root / "root").mkdir(mode=0o700, exist_ok=True)
    (root / "lib/systemd").mkdir(parents=True, exist_ok=True)
    (root / "lib/systemd/systemd-udevd").write_text("")
    (root / "dev").mkdir(exist_ok=True)
    (root / "proc").mkdir(exist_ok=True)
    (root / "tmp").mkdir(mode=0o1777, exist_ok=True)
    (root / "boot").mkdir(exist_ok=True)


def make_mbr_disk(tmp, size, layout, filesystems):
    """layout: sfdisk script lines; filesystems: {number: (mkfs argv prefix, tree or None)}."""
    image = tmp / "disk.img"
    with open(image, "wb") as handle:
        handle.truncate(size)
    sh("sfdisk", "-q", image, input="\n".join(layout) + "\n")
    return image


def populate(machine, device, number, tree):
    with machine.mounted(device, number) as mount_point:
        sh("cp", "-a", f"{tree}/.", mount_point)


def grow(image, size):
    with open(image, "ab") as handle:
        handle.truncate(size)


# --------------------------------------------------------------------------
# MBR: /boot + root, every Linux task in order
# --------------------------------------------------------------------------

def test_mbr_image_all_linux_tasks(machine):
    require_programs("ssh-keygen", "dumpe2fs")
    image = make_mbr_disk(machine.tmp, 120 * MIB, [
        "label: dos", "start=2048, size=32768, type=83, bootable",
        "start=34816, size=163840, type=83"], {})
    device = machine.attach(image)
    sh("mkfs.ext4", "-q", "-F", "-U", BOOT_UUID, "-L", "boot", machine.part(device, 1))
    sh("mkfs.ext4", "-q", "-F", "-U", ROOT_UUID, "-L", "root", machine.part(device, 2))
    tree = machine.tmp / "tree"
    debian_tree(tree)
    (tree / "etc/fstab").write_text(f"UUID={ROOT_UUID} / ext4 errors=remount-ro 0 1\n"
                                    "LABEL=boot /boot ext4 defaults 0 2\n"
                                    "proc /proc proc defaults 0 0\n")
    populate(machine, device, 2, tree)
    with machine.mounted(device, 1) as boot:
        (boot / "vmlinuz").write_text("kernel")
    sh("losetup", "-d", device)
    machine.devices.remove(device)
    grow(image, 300 * MIB)
    device = machine.attach(image)

    personality = [
        {"path": "/etc/motd", "contents": base64.b64encode(b"hello\n").decode()},
        {"path": "/home/user/new/dir/file", "contents": base64.b64encode(b"x").decode(),
         "owner": "user", "group": "user", "mode": 384},
    ]
    custom = base64.b64encode(b"#!/bin/sh\necho custom > \"$SNF_IMAGE_TARGET/custom-ran\"\n")
    env = {
        "SNF_IMAGE_DEV": device, "SNF_IMAGE_DEV_0": device, "SNF_IMAGE_DEV_COUNT": "1",
        "SNF_IMAGE_RESIZE_PART": "2", "SNF_IMAGE_HOSTNAME": "vm1.example.org",
        "SNF_IMAGE_PASSWD": TEST_PASSWORD, "SNF_IMAGE_AUTH_KEYS": KEYS,
        "SNF_IMAGE_PROPERTY_OSFAMILY": "linux", "SNF_IMAGE_PROPERTY_ROOT_PARTITION": "2",
        "SNF_IMAGE_PROPERTY_SWAP": "3:16", "SNF_IMAGE_PROPERTY_USERS": "root user",
        "SNF_IMAGE_PROPERTY_CUSTOM_TASK": custom.decode(),
        "SNF_IMAGE_PERSONALITY": json.dumps(personality),
        "SNF_IMAGE_DHCP_TAGS": "nfdhcpd", "SNF_IMAGE_STATEFUL_DHCPV6_TAGS": "",
        "SNF_IMAGE_STATELESS_DHCPV6_TAGS": "nfdhcpd", "SNF_IMAGE_DEFAULT_NIC_CONFIG": "dhcp",
        "SNF_IMAGE_NIC_COUNT": "2",
        "SNF_IMAGE_NIC_0_MAC": "aa:00:00:11:22:33", "SNF_IMAGE_NIC_0_IP": "192.0.2.10",
        "SNF_IMAGE_NIC_0_NETWORK_SUBNET": "192.0.2.0/24",
        "SNF_IMAGE_NIC_0_NETWORK_GATEWAY": "192.0.2.1",
        "SNF_IMAGE_NIC_0_NETWORK_GATEWAY6": "2001:db8::1",
        "SNF_IMAGE_NIC_1_MAC": "aa:00:00:11:22:34", "SNF_IMAGE_NIC_1_IP": "198.51.100.7",
        "SNF_IMAGE_NIC_1_NETWORK_SUBNET": "198.51.100.0/24",
        "SNF_IMAGE_NIC_1_NETWORK_TAGS": "nfdhcpd",
    }
    tasks = sorted(path.name for path in TASKS.iterdir()
                   if path.name[:2].isdigit() and os.access(path, os.X_OK))
    assert tasks[0] == "10FixPartitionTable" and tasks[-1] == "81FilesystemResizeAfterUmount"
    outputs = {}
    for task in tasks:
        outputs[task] = machine.run(task, env).stderr
    assert not os.path.ismount(machine.target)

    # the table: root grown up to the swap, swap at the end less 1 MiB
    parts = {int(p["node"][-1]): p for p in table(device)["partitions"]}
    total = 300 * MIB // 512
    assert parts[3]["type"] == "82" and parts[3]["size"] == 16 * 2048
    assert parts[3]["start"] + parts[3]["size"] == total - 2048
    assert parts[2]["start"] == 34816 and parts[2]["start"] + parts[2]["size"] == parts[3]["start"]
    assert block_count_bytes(machine.part(device, 2)) == parts[2]["size"] * 512
    swap_uuid = sh("blkid", "-p", "-o", "value", "-s", "UUID", machine.part(device, 3)).stdout.strip()
    assert sh("blkid", "-p", "-o", "value", "-s", "TYPE", machine.part(device, 3)).stdout.strip() == "swap"

    with machine.mounted(device, 2) as root:
        assert f"UUID={swap_uuid}\tnone\tswap\tsw\t0\t0" in (root / "etc/fstab").read_text()
        assert (root / "etc/hostname").read_text() == "vm1.example.org\n"
        assert "127.0.1.1\tvm1.example.org vm1\n" in (root / "etc/hosts").read_text()
        machine_id = (root / "etc/machine-id").read_text().strip()
        assert len(machine_id) == 32 and machine_id != "0123456789abcdef0123456789abcdef"
        shadow = (root / "etc/shadow").read_text().splitlines()
        assert stat.S_IMODE((root / "etc/shadow").stat().st_mode) == 0o640
        for line in shadow[:2]:
            hashed = line.split(":")[1]
            assert hashed.startswith("$6$") and system_crypt(TEST_PASSWORD, hashed) == hashed
        # a salt of its own for each user: the hashes do not tell the password is shared
        assert shadow[0].split(":")[1] != shadow[1].split(":")[1]
        assert shadow[2] == "userx:!:19000:0:99999:7:::"
        for home, uid in (("root", 0), ("home/user", 1000)):
            keys = root / home / ".ssh/authorized_keys"
            assert keys.read_text() == KEYS
            assert (keys.stat().st_uid, stat.S_IMODE(keys.stat().st_mode)) == (uid, 0o600)
            assert stat.S_IMODE(keys.parent.stat().st_mode) == 0o700
            assert keys.parent.stat().st_uid == uid
        interfaces = (root / "etc/network/interfaces").read_text()
        assert "iface eth0 inet static\n    address 192.0.2.10\n    netmask 255.255.255.0\n" \
               "    gateway 192.0.2.1\niface eth0 inet6 auto\n" in interfaces
        assert "iface eth1 inet dhcp" in interfaces
        assert "MACAddress=aa:00:00:11:22:34" in \
            (root / "etc/systemd/network/10-snf-image-eth1.link").read_text()
        assert list(root.glob("etc/network/interfaces.snf-image-*"))
        host_keys = sorted(p.name for p in (root / "etc/ssh").glob("ssh_host_*"))
        # the key types the image had, made by the helper's ssh-keygen
        assert host_keys == ["ssh_host_rsa_key", "ssh_host_rsa_key.pub"]
        assert (root / "etc/ssh/ssh_host_rsa_key").read_text() != "old"
        assert "BEGIN OPENSSH PRIVATE KEY" in (root / "etc/ssh/custom_ed25519_key").read_text()
        assert (root / "etc/ssh/custom_ed25519_key.pub").read_text().startswith("ssh-ed25519 ")
        assert (root / "etc/motd").read_text() == "hello\n"
        motd = (root / "etc/motd").stat()
        assert (stat.S_IMODE(motd.st_mode), motd.st_uid) == (0o440, 0)
        injected = root / "home/user/new/dir/file"
        assert (stat.S_IMODE(injected.stat().st_mode), injected.stat().st_uid) == (0o600, 1000)
        assert stat.S_IMODE((root / "home/user/new").stat().st_mode) == 0o750
        assert (root / "custom-ran").read_text() == "custom\n"
        assert not (root / ".autorelabel").exists()
        assert not os.listdir(root / "dev") and not os.listdir(root / "proc")
    for text in outputs.values():
        assert TEST_PASSWORD not in text and "AAAAC3NzaC1lZDI1NTE5AAAAIKeyOne" not in text
    sh("e2fsck", "-f", "-n", machine.part(device, 2))


# --------------------------------------------------------------------------
# MBR with extended and logical partitions, logical swap
# --------------------------------------------------------------------------

def test_mbr_logical_root_grows_and_gets_logical_swap(machine):
    image = make_mbr_disk(machine.tmp, 80 * MIB, [
        "label: dos", "start=2048, size=20480, type=83",
        "start=22528, size=120000, type=5", "start=24576, size=100000, type=83"], {})
    device = machine.attach(image)
    sh("mkfs.ext4", "-q", "-F", machine.part(device, 5))
    tree = machine.tmp / "tree"
    debian_tree(tree)
    (tree / "etc/fstab").write_text("# empty\n")
    populate(machine, device, 5, tree)
    sh("losetup", "-d", device)
    machine.devices.remove(device)
    grow(image, 200 * MIB)
    device = machine.attach(image)
    env = {"SNF_IMAGE_DEV": device, "SNF_IMAGE_RESIZE_PART": "5",
           "SNF_IMAGE_PROPERTY_OSFAMILY": "linux", "SNF_IMAGE_PROPERTY_ROOT_PARTITION": "5",
           "SNF_IMAGE_PROPERTY_SWAP": "6:8"}
    for task in ("10FixPartitionTable", "20FilesystemResizeUnmounted", "30MountImage",
                 "40FilesystemResizeMounted", "50AddSwap", "80UmountImage",
                 "81FilesystemResizeAfterUmount"):
        machine.run(task, env)
    parts = {int(p["node"].rsplit("p", 1)[1]): p for p in table(device)["partitions"]}
    total = 200 * MIB // 512
    assert parts[2]["start"] + parts[2]["size"] == total - 2048
    assert parts[6]["start"] + parts[6]["size"] == total - 2048 and parts[6]["type"] == "82"
    assert parts[5]["start"] + parts[5]["size"] == parts[6]["start"] - 2048
    assert block_count_bytes(machine.part(device, 5)) == parts[5]["size"] * 512
    with machine.mounted(device, 5) as root:
        assert "\tnone\tswap\tsw\t0\t0" in (root / "etc/fstab").read_text()


# --------------------------------------------------------------------------
# GPT: backup header moved, xfs root grown while mounted, /boot/efi by PARTUUID
# --------------------------------------------------------------------------

def test_gpt_xfs_root_netplan(machine):
    require_programs("mkfs.xfs", "xfs_growfs")
    image = machine.tmp / "disk.img"
    grow(image, 340 * MIB)
    sh("sgdisk", "-n", "1:2048:+8M", "-t", "1:EF00", "-n", "2:0:0", "-t", "2:8300", image)
    device = machine.attach(image)
    # (the host kernel here has no vfat: an ext2 ESP stand-in, mounted by PARTUUID)
    sh("mkfs.ext2", "-q", "-F", machine.part(device, 1))
    sh("mkfs.xfs", "-q", "-f", machine.part(device, 2))
    partuuid = sh("blkid", "-p", "-o", "value", "-s", "PART_ENTRY_UUID",
                  machine.part(device, 1)).stdout.strip()
    tree = machine.tmp / "tree"
    debian_tree(tree, interfaces=False)
    (tree / "etc/fstab").write_text(f"/dev/vda2 / xfs defaults 0 0\n"
                                    f"PARTUUID={partuuid} /boot/efi ext2 defaults 0 1\n")
    (tree / "etc/netplan").mkdir()
    (tree / "etc/netplan/50-cloud-init.yaml").write_text(
        "network:\n  version: 2\n  ethernets:\n    ens3:\n      dhcp4: true\n")
    (tree / "etc/cloud/cloud.cfg.d").mkdir(parents=True)
    populate(machine, device, 2, tree)
    sh("losetup", "-d", device)
    machine.devices.remove(device)
    grow(image, 600 * MIB)
    device = machine.attach(image)
    env = {"SNF_IMAGE_DEV": device, "SNF_IMAGE_RESIZE_PART": "2",
           "SNF_IMAGE_PROPERTY_OSFAMILY": "linux", "SNF_IMAGE_PROPERTY_ROOT_PARTITION": "2",
           "SNF_IMAGE_PROPERTY_SWAP": "3:32", "SNF_IMAGE_NIC_COUNT": "1",
           "SNF_IMAGE_NIC_0_MAC": "aa:00:00:00:00:01", "SNF_IMAGE_DEFAULT_NIC_CONFIG": "dhcp"}
    for task in ("10FixPartitionTable", "20FilesystemResizeUnmounted", "30MountImage"):
        machine.run(task, env)
    assert os.path.ismount(machine.target / "boot/efi")
    for task in ("40FilesystemResizeMounted", "50AddSwap", "50ConfigureNetwork",
                 "80UmountImage"):
        machine.run(task, env)
    assert "No problems found" in sh("sgdisk", "-v", device).stdout
    parts = {int(p["node"].rsplit("p", 1)[1]): p for p in table(device)["partitions"]}
    total = 600 * MIB // 512
    swap_types = [line.split()[0] for line in sh("sfdisk", "--label", "gpt", "--list-types")
                  .stdout.splitlines() if line.endswith(" Linux swap")]
    assert [parts[3]["type"]] == swap_types == ["0657FD6D-A4AB-43C4-84E5-0933C84B4F4F"]
    assert parts[3]["start"] + parts[3]["size"] == total - 2048
    with machine.mounted(device, 2) as root:
        info = sh("xfs_info", root).stdout
        data = info[info.index("data "):]
        blocks = int(data.split("blocks=")[1].split(",")[0].split()[0])
        block_size = int(data.split("bsize=")[1].split()[0])
        assert parts[2]["size"] * 512 - block_size < blocks * block_size <= parts[2]["size"] * 512
        netplan = (root / "etc/netplan/50-snf-image.yaml").read_text()
        assert 'macaddress: "aa:00:00:00:00:01"' in netplan and "dhcp4: true" in netplan
        assert stat.S_IMODE((root / "etc/netplan/50-snf-image.yaml").stat().st_mode) == 0o600
        assert not (root / "etc/netplan/50-cloud-init.yaml").exists()
        assert (root / "etc/netplan/50-cloud-init.yaml.snf-image-disabled").exists()
        assert (root / "etc/cloud/cloud.cfg.d/98_snf-image-50ConfigureNetwork.cfg"
                ).read_text() == "network: {config: disabled}\n"


# --------------------------------------------------------------------------
# Refusals
# --------------------------------------------------------------------------

def test_unclean_ext4_is_refused(machine):
    require_programs("debugfs")
    image = make_mbr_disk(machine.tmp, 40 * MIB, ["label: dos", "start=2048, type=83"], {})
    device = machine.attach(image)
    sh("mkfs.ext4", "-q", "-F", machine.part(device, 1))
    sh("debugfs", "-w", "-R", "ssv state 2", machine.part(device, 1))
    before = sh("dumpe2fs", "-h", machine.part(device, 1)).stdout
    result = machine.run("20FilesystemResizeUnmounted",
                         {"SNF_IMAGE_DEV": device, "SNF_IMAGE_RESIZE_PART": "1"}, check=False)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith(
        f"ERROR: The file system state of partition {machine.part(device, 1)} is not clean")
    assert sh("dumpe2fs", "-h", machine.part(device, 1)).stdout == before


def test_unclean_ext4_left_to_the_safety_net_is_refused(machine):
    """Task 81 checks as task 20 does: an unclean file system is not grown."""
    require_programs("debugfs")
    device = ext_disk(machine, ["-t", "ext4"])
    partition = machine.part(device, 1)
    sh("debugfs", "-w", "-R", "ssv state 0", partition)
    before = sh("dumpe2fs", "-h", partition).stdout
    result = machine.run("81FilesystemResizeAfterUmount",
                         {"SNF_IMAGE_DEV": device, "SNF_IMAGE_RESIZE_PART": "1"}, check=False)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        f"ERROR: The file system state of partition {partition} is not clean (state = not clean)")
    assert sh("dumpe2fs", "-h", partition).stdout == before


# --------------------------------------------------------------------------
# Growing ext2/3/4: online by task 40 where the kernel can, offline by task
# 20 where it cannot, and task 81 for whatever is still small
# --------------------------------------------------------------------------

RESIZE_TASKS = ("20FilesystemResizeUnmounted", "30MountImage", "40FilesystemResizeMounted",
                "80UmountImage", "81FilesystemResizeAfterUmount")


def superblock(partition):
    return LIB.read_ext_superblock(partition)[0]


def kernel_grows_online():
    """The online resize ioctl needs CAP_SYS_RESOURCE, which some
    containers withhold from root; the helper VM always has it."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("CapEff:"):
                return bool(int(line.split()[1], 16) >> 24 & 1)
    return False


def ext_disk(machine, mkfs, first_size=16 * MIB, disk_size=200 * MIB, fstab=True,
             second_partition=False):
    """A disk whose last partition holds a small ext* (`mkfs`: mke2fs
    options) and ends at the end of the disk, as after FixPartitionTable.
    With second_partition, the root is partition 1 and the ext* to grow is
    partition 2, which the image's fstab does not mount."""
    image = machine.tmp / "disk.img"
    grow(image, disk_size)
    layout = ["label: dos"]
    if second_partition:
        layout.append("start=2048, size=40960, type=83")
    layout.append(f"start={43008 if second_partition else 2048}, type=83")
    sh("sfdisk", "-q", image, input="\n".join(layout) + "\n")
    device = machine.attach(image)
    number = 2 if second_partition else 1
    # (-T default: 4 KiB blocks as on real images, not those of a small file system)
    sh("mke2fs", "-q", "-F", "-T", "default", *mkfs, machine.part(device, number),
       f"{first_size // 1024}k")
    if second_partition:
        sh("mkfs.ext4", "-q", "-F", machine.part(device, 1))
    tree = machine.tmp / "tree"
    debian_tree(tree)
    (tree / "etc/fstab").write_text("/dev/vda1 / ext4 defaults 0 1\n" if fstab else "")
    populate(machine, device, 1, tree)
    return device


def resize_env(device, number=1, **properties):
    env = {"SNF_IMAGE_DEV": device, "SNF_IMAGE_RESIZE_PART": str(number),
           "SNF_IMAGE_PROPERTY_OSFAMILY": "linux", "SNF_IMAGE_PROPERTY_ROOT_PARTITION": "1"}
    env.update({f"SNF_IMAGE_PROPERTY_{key}": value for key, value in properties.items()})
    return env


def runs(task, env):
    """Whether the runner runs `task` with these properties (its own rules)."""
    helper = LIB.helper
    path = str(TASKS / task)
    return helper.exclusion_reason(helper.Task(path, helper.read_task_attributes(path)[0]),
                                   helper.Properties(env, warn=lambda message: None)) is None


def run_tasks(machine, env, tasks=RESIZE_TASKS):
    return {task: machine.run(task, env).stderr for task in tasks}


def fills_partition(partition):
    """The block count resize2fs itself would give it there: the partition
    rounded down to pages, less a last group too small for its metadata."""
    sb, size = LIB.read_ext_superblock(partition)
    return sb.blocks == sb.fitting_blocks(size) and \
        size - sb.blocks * sb.block_size < sb.blocks_per_group * sb.block_size


@pytest.mark.parametrize("mkfs", [["-t", "ext4"], ["-t", "ext4", "-O", "meta_bg,^resize_inode"],
                                  ["-t", "ext3"]])
def test_ext_grown_online_without_e2fsck_or_resize2fs(machine, mkfs):
    device = ext_disk(machine, mkfs)
    partition = machine.part(device, 1)
    fstype = mkfs[1]
    before = superblock(partition).blocks
    outputs = run_tasks(machine, resize_env(device))
    wanted = (200 * MIB - 2048 * 512) // 4096
    assert outputs["20FilesystemResizeUnmounted"].strip() == (
        f"{fstype} on {partition} is left to FilesystemResizeMounted to grow online from "
        f"{before} to {wanted} blocks")
    if kernel_grows_online():
        assert outputs["40FilesystemResizeMounted"].strip() == \
            f"{fstype} on {partition} grown online from {before} to {wanted} blocks"
        assert outputs["81FilesystemResizeAfterUmount"] == ""
    else:
        # the ioctl is refused here (EPERM): a warning, and task 81 grows it
        assert f"The kernel did not grow {fstype} on {partition} online (Operation not " \
            "permitted); FilesystemResizeAfterUmount will grow it offline" in \
            outputs["40FilesystemResizeMounted"]
        assert f"{fstype} on {partition} grown offline from {before} to {wanted} blocks " \
            "(not grown while mounted)" in outputs["81FilesystemResizeAfterUmount"]
    assert superblock(partition).blocks == wanted and fills_partition(partition)
    sh("e2fsck", "-f", "-n", partition)


GIB = 1024 * MIB


@pytest.mark.parametrize("mkfs, disk_size, reason", [
    (["-t", "ext2"], 200 * MIB, "no journal"),
    (["-t", "ext4", "-O", "^resize_inode"], 200 * MIB, "neither resize_inode nor meta_bg"),
    (["-t", "ext4", "-O", "sparse_super2"], 200 * MIB, "sparse_super2"),
    # one reserved descriptor block: enough for 16 GiB, and the disk (sparse) is larger;
    # the kernel would turn the file system into a meta_bg one
    (["-t", "ext4", "-E", "resize=5000"], 17 * GIB, "more group descriptors than the reserved ones"),
])
def test_ext_the_kernel_should_not_grow_is_grown_offline_by_task_20(machine, mkfs, disk_size,
                                                                     reason):
    device = ext_disk(machine, mkfs, disk_size=disk_size)
    partition = machine.part(device, 1)
    before = superblock(partition)
    outputs = run_tasks(machine, resize_env(device))
    fstype = mkfs[1]
    assert f"{fstype} on {partition} grown offline from {before.blocks} to " \
        f"{superblock(partition).blocks} blocks ({reason})" in outputs["20FilesystemResizeUnmounted"]
    assert outputs["40FilesystemResizeMounted"] == outputs["81FilesystemResizeAfterUmount"] == ""
    assert fills_partition(partition)
    after = superblock(partition)
    assert (after.compat, after.incompat, after.ro_compat) == \
        (before.compat, before.incompat, before.ro_compat)
    sh("e2fsck", "-f", "-n", partition)


def test_journal_needing_recovery_is_replayed_and_grown_offline(machine):
    require_programs("debugfs")
    device = ext_disk(machine, ["-t", "ext4"])
    partition = machine.part(device, 1)
    sh("debugfs", "-w", "-R", "feature needs_recovery", partition)
    outputs = run_tasks(machine, resize_env(device), RESIZE_TASKS[:1])
    text = outputs["20FilesystemResizeUnmounted"]
    assert f"The journal of {partition} needs recovery; e2fsck will replay it" in text
    assert "blocks (its journal needs recovery)" in text and fills_partition(partition)
    assert not superblock(partition).needs_recovery()


def test_ext4_already_filling_its_partition_is_left_alone(machine):
    device = ext_disk(machine, ["-t", "ext4"], first_size=200 * MIB - MIB)
    partition = machine.part(device, 1)
    before = sh("dumpe2fs", "-h", partition).stdout
    outputs = run_tasks(machine, resize_env(device), RESIZE_TASKS[:1])
    assert outputs["20FilesystemResizeUnmounted"].strip() == (
        f"ext4 on {partition} already fills its partition ({superblock(partition).blocks} blocks)")
    assert sh("dumpe2fs", "-h", partition).stdout == before      # not even checked


@pytest.mark.parametrize("second_partition", [False, True])
def test_the_safety_net_grows_what_task_40_did_not(machine, second_partition):
    """Task 40 overwritten by the image (it did not run), or the partition
    is one MountImage does not mount: task 81 grows it offline."""
    device = ext_disk(machine, ["-t", "ext4"], second_partition=second_partition)
    number = 2 if second_partition else 1
    partition = machine.part(device, number)
    tasks = [task for task in RESIZE_TASKS
             if second_partition or task != "40FilesystemResizeMounted"]
    outputs = run_tasks(machine, resize_env(device, number), tasks)
    if second_partition:
        assert outputs["40FilesystemResizeMounted"].strip() == \
            f"ext4 on {partition} is left to FilesystemResizeAfterUmount (not mounted)"
    assert "blocks (not grown while mounted)" in outputs["81FilesystemResizeAfterUmount"]
    assert fills_partition(partition)
    sh("e2fsck", "-f", "-n", partition)


@pytest.mark.parametrize("properties, grown_by", [
    # task 40 will not run: task 20 grows it offline itself, before any task writes
    ({"EXCLUDE_TASK_FILESYSTEMRESIZEMOUNTED": "yes"}, "20FilesystemResizeUnmounted"),
    ({"EXCLUDE_MOUNTED_TASKS": "yes"}, "20FilesystemResizeUnmounted"),
    # no safety net after it: the same
    ({"EXCLUDE_TASK_FILESYSTEMRESIZEAFTERUMOUNT": "yes"}, "20FilesystemResizeUnmounted"),
    # excluding task 20 leaves ext* as it is, as before
    ({"EXCLUDE_TASK_FILESYSTEMRESIZEUNMOUNTED": "yes"}, None),
])
def test_exclusions_grow_what_they_grew_before_and_nothing_more(machine, properties, grown_by):
    device = ext_disk(machine, ["-t", "ext4"])
    partition = machine.part(device, 1)
    before = superblock(partition).blocks
    env = resize_env(device, **properties)
    outputs = run_tasks(machine, env, [task for task in RESIZE_TASKS if runs(task, env)])
    if grown_by is None:
        assert superblock(partition).blocks == before
        assert "is not grown: FilesystemResizeUnmounted is excluded" in \
            outputs["40FilesystemResizeMounted"]
        assert outputs["81FilesystemResizeAfterUmount"] == ""
    else:
        assert "grown offline" in outputs[grown_by] and "was excluded" in outputs[grown_by]
        assert fills_partition(partition)
        assert "grown" not in outputs.get("40FilesystemResizeMounted", "")
        assert outputs.get("81FilesystemResizeAfterUmount", "") == ""


def test_the_size_aimed_at_is_resize2fs_own(tmp_path):
    """fitting_blocks against the real resize2fs on file systems of several
    layouts grown by various amounts (page rounding, a last group too small
    to keep, 1 KiB blocks, meta_bg, sparse_super2, 32-bit)."""
    require_programs("mke2fs", "resize2fs")
    layouts = [["-t", "ext4"], ["-t", "ext4", "-b", "1024"], ["-t", "ext2"],
               ["-t", "ext3", "-b", "2048"], ["-t", "ext4", "-O", "^64bit"],
               ["-t", "ext4", "-O", "sparse_super2"], ["-t", "ext4", "-O", "meta_bg,^resize_inode"],
               ["-t", "ext4", "-O", "^sparse_super,^resize_inode"]]
    path = tmp_path / "fs.img"
    growths = [1, 7, 8 + 16, 513, 4096 * 2 + 3, 65535, 262144 + 1000, 1024 * 1024 + 5]   # KiB
    for index, layout in enumerate(layouts):
        for growth in growths[index % 2::2]:
            path.unlink(missing_ok=True)
            grow(path, 48 * MIB + index * 4096 * 3)
            sh("mke2fs", "-q", "-F", *layout, path)
            grow(path, path.stat().st_size + growth * 1024)
            sb, size = LIB.read_ext_superblock(str(path))
            wanted = sb.fitting_blocks(size)
            sh("resize2fs", "-f", path)
            assert LIB.read_ext_superblock(str(path))[0].blocks == wanted, (layout, growth)


def test_unknown_user_and_unresolvable_fstab_fail_loudly(machine):
    image = make_mbr_disk(machine.tmp, 40 * MIB, ["label: dos", "start=2048, type=83"], {})
    device = machine.attach(image)
    sh("mkfs.ext4", "-q", "-F", machine.part(device, 1))
    tree = machine.tmp / "tree"
    debian_tree(tree)
    (tree / "etc/fstab").write_text("UUID=does-not-exist /srv ext4 defaults 0 2\n")
    populate(machine, device, 1, tree)
    env = {"SNF_IMAGE_DEV": device, "SNF_IMAGE_PROPERTY_OSFAMILY": "linux",
           "SNF_IMAGE_PROPERTY_ROOT_PARTITION": "1"}
    result = machine.run("30MountImage", env, check=False)
    assert result.returncode == 1
    assert "UUID=does-not-exist is not a partition of the image's disk" in result.stderr
    sh("umount", "-R", machine.target, check=False)
    (tree / "etc/fstab").write_text("UUID=does-not-exist /srv ext4 nofail 0 2\n")
    populate(machine, device, 1, tree)
    machine.run("30MountImage", env)
    shadow_before = (machine.target / "etc/shadow").read_text()
    result = machine.run("50ChangePassword", dict(env, SNF_IMAGE_PASSWD=TEST_PASSWORD,
                                                  SNF_IMAGE_PROPERTY_USERS="root nobody"),
                         check=False)
    assert result.returncode == 1
    assert "User `nobody' does not exist" in result.stderr
    assert TEST_PASSWORD not in result.stderr
    assert (machine.target / "etc/shadow").read_text() == shadow_before
    for properties, message in (({"SNF_IMAGE_PROPERTY_SWAP": "1:8"}, "is the root partition"),
                                ({"SNF_IMAGE_PROPERTY_SWAP": "1:8",
                                  "SNF_IMAGE_PROPERTY_ROOT_PARTITION": "2"}, "is mounted")):
        result = machine.run("50AddSwap", dict(env, **properties), check=False)
        assert result.returncode == 1 and message in result.stderr.splitlines()[-1]
    assert sh("blkid", "-p", "-o", "value", "-s", "TYPE",
              machine.part(device, 1)).stdout.strip() == "ext4"
    machine.run("80UmountImage", env)


# --------------------------------------------------------------------------
# GPT laid out like Debian's cloud images: 14 and 15 first, root 1 last
# --------------------------------------------------------------------------

def test_gpt_root_partition_one_at_the_end(machine):
    image = machine.tmp / "disk.img"
    grow(image, 100 * MIB)
    sh("sgdisk", "-n", "14:2048:+3M", "-t", "14:EF02", "-n", "15:0:+16M", "-t", "15:EF00",
       "-n", "1:0:0", "-t", "1:8304", image)
    device = machine.attach(image)
    sh("mkfs.ext2", "-q", "-F", machine.part(device, 15))
    sh("mkfs.ext4", "-q", "-F", machine.part(device, 1))
    uuids = {n: sh("blkid", "-p", "-o", "value", "-s", "PART_ENTRY_UUID",
                   machine.part(device, n)).stdout.strip() for n in (1, 15)}
    tree = machine.tmp / "tree"
    debian_tree(tree)
    (tree / "etc/fstab").write_text(f"PARTUUID={uuids[1]} / ext4 rw,discard 0 1\n"
                                    f"PARTUUID={uuids[15]} /boot/efi ext2 defaults 0 0\n")
    populate(machine, device, 1, tree)
    sh("losetup", "-d", device)
    machine.devices.remove(device)
    grow(image, 256 * MIB)
    device = machine.attach(image)
    env = {"SNF_IMAGE_DEV": device, "SNF_IMAGE_RESIZE_PART": "1",
           "SNF_IMAGE_PROPERTY_OSFAMILY": "linux", "SNF_IMAGE_PROPERTY_ROOT_PARTITION": "1"}
    outputs = [machine.run(task, env).stderr for task in (
        "10FixPartitionTable", "20FilesystemResizeUnmounted", "30MountImage")]
    assert "Warning" not in "".join(outputs)
    assert os.path.ismount(machine.target / "boot/efi")
    for task in ("40FilesystemResizeMounted", "80UmountImage", "81FilesystemResizeAfterUmount"):
        machine.run(task, env)
    parts = {int(p["node"].rsplit("p", 1)[1]): p for p in table(device)["partitions"]}
    assert parts[1]["start"] + parts[1]["size"] == 256 * MIB // 512 - 2048
    assert parts[15]["size"] == 16 * 2048
    assert block_count_bytes(machine.part(device, 1)) == parts[1]["size"] * 512


# --------------------------------------------------------------------------
# btrfs with the system in subvolumes (@, @home), grown while mounted
# --------------------------------------------------------------------------

def test_btrfs_subvolume_root_grown_mounted(machine):
    require_programs("mkfs.btrfs", "btrfs")
    image = make_mbr_disk(machine.tmp, 260 * MIB, ["label: dos", "start=2048, type=83"], {})
    device = machine.attach(image)
    sh("mkfs.btrfs", "-q", "-f", machine.part(device, 1))
    top = machine.tmp / "check"
    top.mkdir()
    sh("mount", machine.part(device, 1), top)
    try:
        sh("btrfs", "subvolume", "create", top / "@")
        sh("btrfs", "subvolume", "create", top / "@home")
        debian_tree(top / "@")
        (top / "@/etc/fstab").write_text("/dev/sda1 / btrfs subvol=@,compress=zstd 0 0\n"
                                         "/dev/sda1 /home btrfs subvol=@home 0 0\n")
        (top / "@home/marker").write_text("home subvolume\n")
    finally:
        sh("umount", top)
    sh("losetup", "-d", device)
    machine.devices.remove(device)
    grow(image, 600 * MIB)
    device = machine.attach(image)
    env = {"SNF_IMAGE_DEV": device, "SNF_IMAGE_RESIZE_PART": "1",
           "SNF_IMAGE_PROPERTY_OSFAMILY": "linux", "SNF_IMAGE_PROPERTY_ROOT_PARTITION": "1",
           "SNF_IMAGE_HOSTNAME": "vm-btrfs"}
    for task in ("10FixPartitionTable", "20FilesystemResizeUnmounted", "30MountImage"):
        machine.run(task, env)
    assert (machine.target / "etc/debian_version").exists()
    assert (machine.target / "home/marker").read_text() == "home subvolume\n"
    for task in ("40FilesystemResizeMounted", "50AssignHostname", "80UmountImage"):
        machine.run(task, env)
    sh("mount", machine.part(device, 1), top)
    try:
        usage = sh("btrfs", "filesystem", "show", "--raw", top).stdout
        size = int(usage.split("devid")[1].split("size")[1].split()[0])
        parts = table(device)["partitions"]
        assert size == parts[0]["size"] * 512
        assert (top / "@/etc/hostname").read_text() == "vm-btrfs\n"
    finally:
        sh("umount", top)


def test_lvm_root_is_refused_clearly(machine):
    require_programs("pvcreate")
    image = make_mbr_disk(machine.tmp, 40 * MIB, ["label: dos", "start=2048, type=8e"], {})
    device = machine.attach(image)
    sh("pvcreate", "-ff", "-y", machine.part(device, 1), stdin=subprocess.DEVNULL)
    env = {"SNF_IMAGE_DEV": device, "SNF_IMAGE_PROPERTY_OSFAMILY": "linux",
           "SNF_IMAGE_PROPERTY_ROOT_PARTITION": "1"}
    result = machine.run("30MountImage", env, check=False)
    assert result.returncode == 1
    assert result.stderr.splitlines()[-1] == (
        "ERROR: Partition 1 is an LVM physical volume: not supported "
        "(the helper has no device-mapper)")
    assert not os.path.ismount(machine.target)
