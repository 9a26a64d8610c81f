"""snf-image-helper.py as a real PID 1, on the host, in fresh PID and mount
namespaces (unshare).  There, reboot(RB_POWER_OFF) from PID 1 only ends the
namespace (its parent sees SIGINT), so the whole init path runs for real:
kernel file systems, the activation flag, the floppy (a real ext2 image on a
loop device), disks found by serial, properties, auto-detection with real
mounts, the task runner, the result port, the never-exit guard and the debug
shell.  Inside the namespace /dev is a private tmpfs holding only the nodes
the test creates; the serial ports are files bound over /dev/ttyS*;
/proc/cmdline is a bound file; /sys/block is a private tmpfs that carries the
virtio serials; modprobe is /bin/true (the host kernel is not to be touched)."""

import json
import os
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

import pytest

from conftest import REPO, load_script, require_programs, require_root

helper = load_script("snf-image-helper.py", "snf_image_helper")

ACTIVE = "console=ttyS0 panic=-1 quiet ro hypervisor=kvm snf_image_activate_helper rules_dev=/dev/fd0"
LINUX_GUID = "0FC63DAF-8483-4772-8E79-3D69D8477DE4"
PYTHON = "/usr/bin/python3"          # what production (and the helper) runs

RECORD_TASK = f"""#!{PYTHON}
# snf-image-task: excludable mounted_excludable
import json, os, sys
sys.path.insert(0, os.environ["SNF_IMAGE_HELPER_LIB"])
import snf_image_helper as helper
helper.warn("recording")
record = dict(os.environ)
record["pid"] = os.getpid()
record["table"] = helper.read_partition_table(os.environ["SNF_IMAGE_DEV"])
with open(os.path.join("@OUT@", "record.json"), "w") as out:
    json.dump(record, out)
"""


class Namespace:
    """A work dir outside /tmp (the helper mounts a tmpfs on /tmp), loop devices, and a run."""

    def __init__(self, work):
        self.work = work
        self.lib = work / "lib"
        self.tasks = self.lib / "tasks"
        self.tasks.mkdir(parents=True)
        shutil.copy(REPO / "snf-image-helper.py", self.lib / "snf-image-helper.py")
        (self.lib / "snf_image_helper.py").symlink_to("snf-image-helper.py")
        self.out = work / "out"
        self.out.mkdir()
        self.out.chmod(0o777)
        self.loops = []
        self.disks = []          # (serial, loop device)
        self.partition_nodes = []  # (node name in the namespace, loop device)

    def loop(self, image, *options):
        device = subprocess.run(["losetup", "-f", "--show", *options, str(image)],
                                check=True, capture_output=True, text=True).stdout.strip()
        self.loops.append(device)
        return device

    def floppy(self, rules, files=("unattend.xml", "sysprep.inf")):
        content = self.work / "floppy"
        content.mkdir()
        (content / "rules.json").write_text(rules if isinstance(rules, str) else json.dumps(rules))
        for name in files:
            (content / name).write_text(f"<{name}/>")
        image = self.work / "floppy.img"
        subprocess.run(["truncate", "-s", "1440K", str(image)], check=True)
        subprocess.run(["mkfs.ext2", "-q", "-F", "-d", str(content), str(image)], check=True)
        self.floppy_device = self.loop(image, "-r")

    def disk(self, serial, image):
        """Attach `image`; its partitions become /dev/<loop>p<n> in the namespace, each a
        loop device over the partition's bytes (loop partition scanning is off here)."""
        device = self.loop(image)
        self.disks.append((serial, device))
        table = helper.read_partition_table(str(image), probe_filesystems=False)
        for partition in (table or {}).get("partitions", []):
            self.partition_nodes.append((helper.partition_device(device, partition["number"]), self.loop(
                image, "--offset", str(partition["start"] * 512), "--sizelimit", str(partition["size"] * 512))))

    def task(self, name, text, mode=0o755):
        """A task; @OUT@ in its text names a directory the test reads afterwards."""
        path = self.tasks / name
        path.write_text(text.replace("@OUT@", str(self.out)))
        path.chmod(mode)

    def script(self, cmdline):
        (self.work / "cmdline").write_text(cmdline + "\n")
        lines = ["set -e",
                 f"mount --bind {self.work}/cmdline /proc/cmdline",
                 "mount -t tmpfs -o mode=0755 tmpfs /dev",
                 "mknod -m 666 /dev/null c 1 3",
                 "mknod -m 666 /dev/urandom c 1 9"]
        for port in range(4):
            (self.work / f"ttyS{port}").write_text(getattr(self, f"port{port}", ""))
            lines += [f": > /dev/ttyS{port}", f"mount --bind {self.work}/ttyS{port} /dev/ttyS{port}"]
        if getattr(self, "floppy_device", None):
            lines.append(f"mknod /dev/fd0 b {device_numbers(self.floppy_device)}")
        block_nodes = []
        for serial, device in self.disks:
            name = os.path.basename(device)
            block_nodes.append(f"mknod {device} b {device_numbers(device)}")
        for node, device in self.partition_nodes:
            block_nodes.append(f"mknod {node} b {device_numbers(device)}")
        lines += block_nodes
        lines.append("mount -t tmpfs tmpfs /sys/block")
        for serial, device in self.disks:
            name = os.path.basename(device)
            lines += [f"mkdir /sys/block/{name}", f"echo {serial} > /sys/block/{name}/serial"]
        lines += ["mount --bind /bin/true \"$(readlink -f /usr/sbin/modprobe)\"",
                  f"exec {PYTHON} {self.lib}/snf-image-helper.py"]
        return "\n".join(lines) + "\n"

    def boot(self, cmdline=ACTIVE, timeout=120):
        result = subprocess.run(
            ["unshare", "--pid", "--fork", "--mount", "--mount-proc", "--propagation", "private",
             "sh", "-c", self.script(cmdline)],
            capture_output=True, text=True, timeout=timeout)
        self.returncode = result.returncode
        self.console = result.stdout + result.stderr
        self.result = (self.work / "ttyS1").read_text()
        self.progress = (self.work / "ttyS2").read_text().splitlines()
        return self

    def powered_off(self):
        # PID 1 called reboot(RB_POWER_OFF): the namespace's init died of SIGINT
        return self.returncode == -signal.SIGINT

    def close(self):
        for device in reversed(self.loops):
            subprocess.run(["losetup", "-d", device], check=False)


def device_numbers(device):
    numbers = os.stat(device).st_rdev
    return f"{os.major(numbers)} {os.minor(numbers)}"


@pytest.fixture
def ns():
    require_root()
    require_programs("unshare", "losetup", "mkfs.ext2", "mkfs.ext4", "sfdisk", "mknod")
    work = Path(tempfile.mkdtemp(prefix="snf-helper-init-", dir="/var/tmp"))
    namespace = Namespace(work)
    try:
        yield namespace
    finally:
        namespace.close()
        shutil.rmtree(work, ignore_errors=True)


def linux_disk(directory, fstab=True):
    """A 64 MiB MBR disk: 1 = ext4 /boot, 2 = ext4 root (with /etc/fstab if asked)."""
    content = directory / "rootfs"
    (content / "etc").mkdir(parents=True)
    if fstab:
        (content / "etc/fstab").write_text("UUID=x / ext4 defaults 0 1\n")
    (content / "etc/debian_version").write_text("12.0\n")
    boot_content = directory / "bootfs"
    boot_content.mkdir()
    disk = directory / "disk.img"
    subprocess.run(["truncate", "-s", "64M", str(disk)], check=True)
    subprocess.run(["sfdisk", "-q", str(disk)], check=True, text=True,
                   input="label: dos\nstart=2048, size=16MiB, type=83\nsize=24MiB, type=83\n")
    for start_mib, size_mib, tree in ((1, 16, boot_content), (17, 24, content)):
        fs = directory / f"fs{start_mib}.img"
        subprocess.run(["mkfs.ext4", "-q", "-F", "-d", str(tree), str(fs), f"{size_mib}M"], check=True)
        subprocess.run(["dd", f"if={fs}", f"of={disk}", "bs=1M", f"seek={start_mib}", "conv=notrunc",
                        "status=none"], check=True)
    return disk


def rules(env=None, disks=("snf-disk0",)):
    base = {"SNF_IMAGE_HOSTNAME": "vm1.example.org", "SNF_IMAGE_TYPE": "diskdump",
            "SNF_IMAGE_PASSWD": "top secret", "SNF_IMAGE_NIC_COUNT": "1",
            "SNF_IMAGE_NIC_0_MAC": "aa:00:00:11:22:33"}
    base.update(env or {})
    return {"format": 1, "env": base, "disks": list(disks)}


@pytest.mark.root
def test_check_mode_powers_off_with_success(ns):
    ns.boot("console=ttyS0 quiet snf_image_check_helper")
    assert ns.powered_off(), ns.console
    assert ns.result == "SUCCESS\n"
    assert ns.progress == []


@pytest.mark.root
def test_missing_activation_flag_refuses_and_powers_off(ns):
    ns.floppy(rules(disks=()))
    ns.boot("console=ttyS0 hypervisor=kvm rules_dev=/dev/fd0")
    assert ns.powered_off(), ns.console
    assert ns.result.startswith("ERROR: Kernel command line activation flag snf_image_activate_helper is missing")


@pytest.mark.root
def test_exclude_all_tasks_succeeds_without_disks_or_tasks_running(ns):
    ns.floppy(rules({"SNF_IMAGE_PROPERTIES": '{"exclude_all_tasks": "yes"}'}, disks=()))
    ns.task("50Record", RECORD_TASK)
    ns.boot()
    assert ns.powered_off(), ns.console
    assert ns.result == "SUCCESS\n"
    assert ns.progress == ["WARNING:EXCLUDE_ALL_TASKS is set. All configuration tasks were prevented from running."]
    assert not (ns.out / "record.json").exists()


@pytest.mark.root
def test_missing_floppy_file_is_an_error(ns):
    ns.floppy(rules(disks=()), files=("unattend.xml",))
    ns.boot()
    assert ns.powered_off(), ns.console
    assert ns.result == "ERROR: sysprep.inf is missing from the rules device /dev/fd0\n"
    assert ns.progress == ["ERROR:sysprep.inf is missing from the rules device /dev/fd0"]


@pytest.mark.root
def test_full_run_detects_and_exports_the_environment(ns):
    ns.disk("snf-disk0", linux_disk(ns.work))
    second = ns.work / "second.img"
    subprocess.run(["truncate", "-s", "8M", str(second)], check=True)
    ns.disk("snf-disk1", second)
    ns.floppy(rules({"SNF_IMAGE_PROPERTIES": json.dumps({"Swap": "2:512", "osfamily": "", "users": "a b"}),
                     "SNF_IMAGE_INST_PROPERTIES": json.dumps({"USERS": "root", "cloud_init": False,
                                                              "Exclude_Task_Excluded": "yes"})},
                    disks=("snf-disk0", "snf-disk1")))
    ns.task("50Record", RECORD_TASK)
    ns.task("60Excluded", "#!/bin/sh\n# snf-image-task: excludable\ntouch \"@OUT@/excluded-ran\"\n")
    ns.boot()
    assert ns.powered_off(), ns.console
    assert ns.result == "SUCCESS\n", ns.console
    record = json.loads((ns.out / "record.json").read_text())
    disk0, disk1 = (device for _, device in ns.disks)
    expected = {
        "SNF_IMAGE_DEV": disk0, "SNF_IMAGE_DEV_0": disk0, "SNF_IMAGE_DEV_1": disk1,
        "SNF_IMAGE_DEV_COUNT": "2", "SNF_IMAGE_HOSTNAME": "vm1.example.org",
        "SNF_IMAGE_PASSWD": "top secret", "SNF_IMAGE_NIC_0_MAC": "aa:00:00:11:22:33",
        "SNF_IMAGE_PROPERTY_OSFAMILY": "linux", "SNF_IMAGE_PROPERTY_ROOT_PARTITION": "2",
        "SNF_IMAGE_RESIZE_PART": "2", "SNF_IMAGE_PROPERTY_SWAP": "2:512",
        "SNF_IMAGE_PROPERTY_USERS": "root", "SNF_IMAGE_PROPERTY_CLOUD_INIT": "false",
        "HYPERVISOR": "kvm", "RULES_DEV": "/dev/fd0", "SNF_IMAGE_MONITOR": "/dev/ttyS2",
        "SNF_IMAGE_HELPER_LIB": str(ns.lib), "TASKNAME": "50Record", "LC_ALL": "C",
    }
    assert {key: record.get(key) for key in expected} == expected
    assert record["SNF_IMAGE_TARGET"].startswith("/tmp/target.")
    assert record["SNF_IMAGE_UNATTEND"].startswith("/tmp/rules.") and \
        record["SNF_IMAGE_UNATTEND"].endswith("/unattend.xml")
    assert "CLOUD_INIT_CONFNAME" not in record
    assert [p["number"] for p in record["table"]["partitions"]] == [1, 2]
    assert [p["fstype"] for p in record["table"]["partitions"]] == ["ext4", "ext4"]
    assert ns.progress[:3] == ["WARNING:Needed image properties are missing. Autodetecting them...",
                               "WARNING:Detected OSFAMILY: linux", "WARNING:Detected ROOT_PARTITION: 2"]
    assert ns.progress[3:] == ["TASK_START:Record", "WARNING:recording", "TASK_END:Record",
                               "TASK_START:Excluded", "WARNING:Task Excluded was excluded and will not run.",
                               "TASK_END:Excluded"]
    assert not (ns.out / "excluded-ran").exists()
    assert "top secret" not in ns.console
    assert "Z [50Record] Warning: recording" in ns.console


@pytest.mark.root
def test_task_failure_reported_and_target_unmounted(ns):
    ns.disk("snf-disk0", linux_disk(ns.work))
    ns.floppy(rules({"SNF_IMAGE_PROPERTIES": json.dumps({"OSFAMILY": "linux", "ROOT_PARTITION": "2"})}))
    ns.task("30Mount", "#!/bin/sh\nset -e\nmount \"${SNF_IMAGE_DEV}p2\" \"$SNF_IMAGE_TARGET\"\n"
                       "grep -q \"$SNF_IMAGE_TARGET\" /proc/self/mounts && echo mounted-ok\n")
    ns.task("50Fail", "#!/bin/sh\necho 'ERROR: the disk is on fire' >&2\nexit 1\n")
    ns.task("60Never", "#!/bin/sh\ntouch \"@OUT@/never\"\n")
    ns.boot()
    assert ns.powered_off(), ns.console
    assert ns.result == "ERROR: the disk is on fire\n"
    assert ns.progress[-2:] == ["TASK_START:Fail", "ERROR:the disk is on fire"]
    assert not (ns.out / "never").exists()
    assert "mounted-ok" in ns.console
    # the target directory could be removed, so nothing was left mounted on it
    assert "cleanup failed" not in ns.console


@pytest.mark.root
@pytest.mark.parametrize("properties, message", [
    ({"OSFAMILY": "Linux", "ROOT_PARTITION": "2"}, "ERROR: Invalid OSFAMILY value `Linux'."),
    ({"OSFAMILY": "linux"}, "ERROR: Required image property `ROOT_PARTITION' is missing or empty."),
])
def test_invalid_or_undetectable_properties(ns, properties, message):
    ns.disk("snf-disk0", linux_disk(ns.work, fstab=False))
    ns.floppy(rules({"SNF_IMAGE_PROPERTIES": json.dumps(properties)}))
    ns.boot()
    assert ns.powered_off(), ns.console
    assert ns.result.startswith(message)


@pytest.mark.root
def test_disk_without_partitions_is_a_clear_error(ns):
    blank = ns.work / "blank.img"
    subprocess.run(["truncate", "-s", "8M", str(blank)], check=True)
    ns.disk("snf-disk0", blank)
    ns.floppy(rules({"SNF_IMAGE_PROPERTIES": '{"OSFAMILY": "linux", "ROOT_PARTITION": "1"}'}))
    ns.boot()
    assert ns.powered_off(), ns.console
    assert ns.result == f"ERROR: Device {ns.disks[0][1]} has no partition table\n"


@pytest.mark.root
def test_unknown_serial_is_an_error(ns):
    ns.floppy(rules(disks=("snf-disk7",)))
    ns.boot()
    assert ns.powered_off(), ns.console
    assert ns.result == "ERROR: No disk with serial snf-disk7 is attached to the helper\n"


@pytest.mark.root
def test_worker_killed_still_powers_off_with_an_error(ns):
    ns.floppy(rules({"SNF_IMAGE_PROPERTIES": '{"OSFAMILY": "linux", "ROOT_PARTITION": "1"}'}))
    ns.disk("snf-disk0", linux_disk(ns.work))
    ns.task("50KillWorker", "#!/bin/sh\nkill -9 $PPID\nsleep 1\n")
    ns.boot()
    assert ns.powered_off(), ns.console
    assert ns.result == "ERROR: The helper process was killed by signal SIGKILL before reporting a result\n"


@pytest.mark.root
def test_debug_shell_runs_on_failure_then_powers_off(ns):
    ns.floppy(rules(disks=()), files=("unattend.xml",))
    ns.port3 = "echo debug-$((6*7))\nexit\n"
    ns.boot(ACTIVE + " snf_image_debug_helper")
    assert ns.powered_off(), ns.console
    assert ns.result.startswith("ERROR: sysprep.inf is missing")
    assert "debug-42" in (ns.work / "ttyS3").read_text()


@pytest.mark.root
def test_unreadable_rules_device_is_an_error(ns):
    blank = ns.work / "blank-floppy.img"
    subprocess.run(["truncate", "-s", "1440K", str(blank)], check=True)
    ns.floppy_device = ns.loop(blank, "-r")
    ns.boot()
    assert ns.powered_off(), ns.console
    assert ns.result.startswith("ERROR: Cannot mount the rules device /dev/fd0: ")
