"""End to end through the helper VM: the real helper (snf-image-helper.py as
PID 1) built by the real builder with the recording task set
(tests/recording-tasks/), booted under TCG by the real `create` of the OS
definition with the environment Ganeti passes, against a real Debian image.

Cases: all tasks excluded (SUCCESS, the disk left as copied); the recording
task (the documented SNF_IMAGE_* variables arrive; properties detected; the
library works inside the helper); a helper that never answers (soft timeout);
a helper that powers off without a result (crash); a failing task (ERROR
path).  The recording task writes onto the second Ganeti disk, which the test
reads raw: nothing is mounted on the host."""

import hashlib
import json
import os
import subprocess
from pathlib import Path

import pytest

import ganeti_env
from conftest import REPO, e2e_site_root, link_or_copy, require_helper_build
from helpervm import built_helper_dir
from images import debian_image

pytestmark = [pytest.mark.slow, pytest.mark.qemu, pytest.mark.root]

RECORDING_TASKS = REPO / "tests" / "recording-tasks"
MAGIC = b"SNF-IMAGE-RECORD\n"
PASSWORD = "Pa55 w0rd'\"$x"
CREATE_TIMEOUT = 900                # generous: TCG on a shared 2-core machine


@pytest.fixture(scope="module")
def site():
    """A built helper, a Debian image in an IMAGE_DIR, a variants dir; removed afterwards."""
    require_helper_build()
    helper_dir = built_helper_dir(tasks_dir=RECORDING_TASKS)
    with e2e_site_root("runtime-e2e-") as root:
        for layout in ("mbr", "gpt"):
            link_or_copy(debian_image(layout), root / "images" / f"debian-{layout}.img")
        yield {"root": root, "helper_dir": helper_dir, "image": root / "images" / "debian-mbr.img"}


@pytest.fixture
def deployments(site, tmp_path):
    """Deployment factory; the (up to 2 GiB) disk files are removed afterwards."""
    made = []

    def make(soft_timeout="10m"):
        made.append(Deployment(site, tmp_path / f"d{len(made)}", soft_timeout))
        return made[-1]
    yield make
    for deployment in made:
        for disk in (deployment.disk0, deployment.disk1):
            disk.unlink(missing_ok=True)


class Deployment:
    def __init__(self, site, tmp_path, soft_timeout="10m"):
        tmp_path.mkdir()
        self.tmp = tmp_path
        self.config = tmp_path / "snf-image.conf"
        self.config.write_text(
            f'IMAGE_DIR="{site["root"]}/images"\n'
            f'VARIANTS_DIR="{site["root"]}/variants"\n'
            f'HELPER_DIR="{site["helper_dir"]}"\n'
            'HELPER_ACCEL="tcg"\n'
            f'HELPER_SOFT_TIMEOUT="{soft_timeout}"\n'
            'HELPER_HARD_TIMEOUT="10"\n')
        self.os_dir = ganeti_env.install_os_dir(tmp_path / "os")
        self.disk0 = tmp_path / "disk0.img"
        self.disk1 = tmp_path / "disk1.img"
        subprocess.run(["truncate", "-s", "2G", str(self.disk0)], check=True)
        subprocess.run(["truncate", "-s", "16M", str(self.disk1)], check=True)

    def create(self, properties=None, inst_properties=None, nics=None, layout="mbr"):
        osparams = {"img_id": f"debian-{layout}.img", "img_format": "diskdump", "img_passwd": PASSWORD}
        if properties is not None:
            osparams["img_properties"] = json.dumps(properties)
        if inst_properties is not None:
            osparams["inst_properties"] = json.dumps(inst_properties)
        env = ganeti_env.create_env(
            [self.disk0, self.disk1], instance="vm1.example.org",
            nics=nics if nics is not None else
            [{"mac": "aa:00:00:11:22:33", "ip": "192.0.2.10", "network_subnet": "192.0.2.0/24",
              "network_gateway": "192.0.2.1"},
             {"mac": "aa:00:00:44:55:66"}],
            osparams=osparams)
        env["SNF_IMAGE_CONFIG"] = str(self.config)
        self.result = subprocess.run([str(self.os_dir / "create")], env=env, cwd=self.os_dir,
                                     capture_output=True, text=True, timeout=CREATE_TIMEOUT)
        self.output = self.result.stdout + self.result.stderr
        lines = [line for line in self.result.stderr.splitlines() if line.strip()]
        self.last_line = lines[-1] if lines else ""
        assert PASSWORD not in self.output
        assert not leftover_processes(self.tmp), "qemu left running"
        return self.result.returncode

    def record(self):
        with open(self.disk1, "rb") as disk:
            data = disk.read(1 << 20)
        if not data.startswith(MAGIC):
            return None
        return json.loads(data[len(MAGIC):].split(b"\n", 1)[0])


def leftover_processes(marker):
    """Processes whose command line mentions `marker` (our temp dir)."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if str(marker).encode() in cmdline:
            found.append(int(pid))
    return found


def same_bytes(disk, image):
    size = os.path.getsize(image)
    digests = []
    for path in (disk, image):
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            remaining = size
            while remaining:
                chunk = handle.read(min(remaining, 8 << 20))
                digest.update(chunk)
                remaining -= len(chunk)
        digests.append(digest.digest())
    return digests[0] == digests[1]


def test_all_tasks_excluded(site, deployments):
    deployment = deployments()
    assert deployment.create({"EXCLUDE_ALL_TASKS": "yes"}) == 0, deployment.output
    assert "All configuration tasks were prevented from running" in deployment.output
    assert deployment.record() is None                    # no task ran
    assert same_bytes(deployment.disk0, site["image"])    # the disk is as copied


def test_recording_task_sees_the_documented_environment(deployments):
    deployment = deployments()
    code = deployment.create({"users": "debian", "Swap": "2:512", "CLOUD_INIT": "no"},
                             {"users": "root", "exclude_task_other": "yes"})
    assert code == 0, deployment.output
    record = deployment.record()
    assert record is not None, deployment.output
    env = record["environment"]
    expected = {
        "SNF_IMAGE_HOSTNAME": "vm1.example.org",
        "SNF_IMAGE_TYPE": "diskdump",
        "SNF_IMAGE_DEV": "/dev/vdb", "SNF_IMAGE_DEV_0": "/dev/vdb", "SNF_IMAGE_DEV_1": "/dev/vdc",
        "SNF_IMAGE_DEV_COUNT": "2",
        "SNF_IMAGE_NIC_COUNT": "2",
        "SNF_IMAGE_NIC_0_MAC": "aa:00:00:11:22:33", "SNF_IMAGE_NIC_0_IP": "192.0.2.10",
        "SNF_IMAGE_NIC_1_MAC": "aa:00:00:44:55:66",
        "SNF_IMAGE_PASSWD": "sha256:" + hashlib.sha256(PASSWORD.encode()).hexdigest(),
        # detected, since neither was given
        "SNF_IMAGE_PROPERTY_OSFAMILY": "linux", "SNF_IMAGE_PROPERTY_ROOT_PARTITION": "1",
        "SNF_IMAGE_RESIZE_PART": "1",
        # image properties, overridden key by key by instance properties, names upper-cased
        "SNF_IMAGE_PROPERTY_USERS": "root", "SNF_IMAGE_PROPERTY_SWAP": "2:512",
        "SNF_IMAGE_PROPERTY_CLOUD_INIT": "no", "SNF_IMAGE_PROPERTY_EXCLUDE_TASK_OTHER": "yes",
        "HYPERVISOR": "kvm", "RULES_DEV": "/dev/vdd",      # root vda, disks vdb vdc, rules
        "SNF_IMAGE_MONITOR": "/dev/ttyS2", "SNF_IMAGE_HELPER_LIB": "/usr/lib/snf-image-helper",
        "TASKNAME": "50RecordEnvironment",
    }
    assert {name: env.get(name) for name in expected} == expected
    assert env["SNF_IMAGE_TARGET"].startswith("/tmp/")
    assert env["SNF_IMAGE_UNATTEND"].endswith("/unattend.xml")
    assert env["SNF_IMAGE_SYSPREPINF"].endswith("/sysprep.inf")
    assert "CLOUD_INIT_CONFNAME" not in env
    assert record["unattend"].startswith("<?xml")
    assert record["uid"] == 0 and record["dev_is_block"] is True
    assert "snf_image_activate_helper" in record["pid1_cmdline"]
    table = record["table"]
    assert table["label"] == "dos"
    assert [(p["number"], p["fstype"]) for p in table["partitions"]] == [(1, "ext4")]
    assert record["root"] == {"base_distro": "debian", "has_fstab": True,
                              "mounted": [env["SNF_IMAGE_TARGET"]]}
    # the protocol reached the host: task-start/-end and the warnings, as JSON
    assert '"subtype":"task-start","task":"RecordEnvironment"' in deployment.output.replace(" ", "")
    assert "Detected OSFAMILY: linux" in deployment.output
    assert "environment recorded on /dev/vdc" in deployment.output


def test_detection_on_gpt_with_root_last(deployments):
    # GPT: 1 = /boot ext4 (no /etc/fstab), 2 = swap, 3 = root
    deployment = deployments()
    assert deployment.create(layout="gpt") == 0, deployment.output
    record = deployment.record()
    env = record["environment"]
    assert (env["SNF_IMAGE_PROPERTY_OSFAMILY"], env["SNF_IMAGE_PROPERTY_ROOT_PARTITION"],
            env["SNF_IMAGE_RESIZE_PART"]) == ("linux", "3", "3")
    assert record["table"]["label"] == "gpt"
    assert [(p["number"], p["fstype"]) for p in record["table"]["partitions"]] == \
        [(1, "ext4"), (2, "swap"), (3, "ext4")]
    assert record["root"]["base_distro"] == "debian"


def test_failing_task_reports_its_error(deployments):
    deployment = deployments()
    code = deployment.create({"OSFAMILY": "linux", "ROOT_PARTITION": "1",
                              "RECORD_FAIL": "the recording task failed on purpose"})
    assert code == 3, deployment.output
    assert "the recording task failed on purpose" in deployment.last_line
    assert deployment.record() is not None                # it ran up to its failure


def test_helper_that_never_answers_times_out(deployments):
    deployment = deployments(soft_timeout="30")
    code = deployment.create({"OSFAMILY": "linux", "ROOT_PARTITION": "1", "RECORD_SLEEP": "3600"})
    assert code == 3, deployment.output
    assert "did not finish within HELPER_SOFT_TIMEOUT" in deployment.last_line


def test_helper_dying_without_a_result_is_a_crash(deployments):
    deployment = deployments()
    code = deployment.create({"OSFAMILY": "linux", "ROOT_PARTITION": "1", "RECORD_POWEROFF": "yes"})
    assert code == 3, deployment.output
    assert "without reporting a result" in deployment.last_line
    assert "did not finish" not in deployment.last_line
    assert deployment.record() is not None
