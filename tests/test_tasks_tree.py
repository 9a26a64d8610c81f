"""The real task scripts of tasks.d/ run against image trees in a directory
(SNF_IMAGE_TARGET pointing at it, as after MountImage): the cloud-init path,
each network stack, the distribution-specific hostname files, machine-id,
personality escapes through the real script, Windows without hives, the custom
task.  Tasks that only edit files need no disk; ownership needs root."""

import base64
import json
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from conftest import REPO, image_tree, require_root

TASKS = REPO / "tasks.d"
PASSWORD = "tree-Passw0rd"


@pytest.fixture
def run(lib_dir, tmp_path):
    progress = tmp_path / "progress"
    progress.write_text("")

    def run_task(task, target, env=None, check=True):
        environ = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
                   "PYTHONDONTWRITEBYTECODE": "1", "SNF_IMAGE_HELPER_LIB": str(lib_dir),
                   "SNF_IMAGE_TARGET": str(target), "TASKNAME": task,
                   "SNF_IMAGE_MONITOR": str(progress), "SNF_IMAGE_PROPERTY_OSFAMILY": "linux",
                   "SNF_IMAGE_HOSTNAME": "vm9.example.org"}
        environ.update(env or {})
        result = subprocess.run([str(TASKS / task)], env=environ, capture_output=True,
                                text=True, timeout=120)
        result.progress = progress.read_text()
        progress.write_text("")
        if check:
            assert result.returncode == 0, result.stderr
        return result
    return run_task


BASE = {"/etc/passwd": "root:x:0:0::/root:/bin/sh\ndebian:x:1000:1000::/home/debian:/bin/sh\n",
        "/etc/group": "root:x:0:\ndebian:x:1000:\n",
        "/etc/shadow": "root:*:1:0:99999:7:::\ndebian:*:1:0:99999:7:::\n",
        "/etc/debian_version": "12\n", "/etc/hostname": "old\n",
        "/etc/hosts": "127.0.0.1 localhost\n"}


# --------------------------------------------------------------------------
# cloud-init
# --------------------------------------------------------------------------

def test_cloud_init_path(run, tmp_path):
    require_root()
    root = image_tree(tmp_path / "root", dict(BASE, **{"/etc/cloud/cloud.cfg.d": None,
                                                 "/usr/lib/python3/dist-packages/cloudinit/"
                                                 "version.py": '__VERSION__ = "22.4.2"\n',
                                                 "/etc/network/interfaces": "",
                                                 "/usr/sbin/ifup": "",
                                                 "/etc/ssh/ssh_host_rsa_key": "old"}))
    user_data = b"#cloud-config\nruncmd: [true]\n"
    env = {"SNF_IMAGE_PROPERTY_CLOUD_INIT": "yes",
           "SNF_IMAGE_CLOUD_USERDATA": base64.b64encode(user_data).decode(),
           "SNF_IMAGE_PASSWD": PASSWORD, "SNF_IMAGE_AUTH_KEYS": "ssh-ed25519 AAAAK1 a\n",
           "SNF_IMAGE_PROPERTY_USERS": "root debian", "SNF_IMAGE_PROPERTY_SWAP": "2:128",
           "SNF_IMAGE_NIC_COUNT": "1", "SNF_IMAGE_NIC_0_MAC": "aa:00:00:00:00:01",
           "SNF_IMAGE_DEFAULT_NIC_CONFIG": "dhcp",
           "SNF_IMAGE_PERSONALITY": json.dumps([{"path": "/etc/x", "owner": "debian",
                                                  "contents": base64.b64encode(b"x").decode()}])}
    outputs = [run(task, root, env) for task in (
        "35InitializeDatasource", "50AddSwap", "50AssignHostname", "50ChangePassword",
        "50ConfigureNetwork", "50DeleteSSHKeys", "60EnforcePersonality")]
    cfg = root / "etc/cloud/cloud.cfg.d"
    seed = root / "var/lib/cloud/seed/nocloud-net"
    assert (cfg / "98_snf-image-35InitializeDatasource.cfg").read_text() == \
        "datasource_list: [ NoCloud ]\n"
    assert (seed / "user-data").read_bytes() == user_data
    assert stat.S_IMODE((seed / "user-data").stat().st_mode) == 0o600
    assert (seed / "meta-data").read_text() == (
        "instance-id: vm9.example.org\nlocal-hostname: vm9.example.org\n"
        "public-keys:\n  - ssh-ed25519 AAAAK1 a\n")
    password_cfg = cfg / "98_snf-image-50ChangePassword.cfg"
    assert stat.S_IMODE(password_cfg.stat().st_mode) == 0o600
    text = password_cfg.read_text()
    assert "ssh_pwauth: True\nchpasswd:\n  expire: false\n  users:\n" in text
    assert '    - name: "debian"\n      password: "$6$' in text and "type: hash" in text
    assert PASSWORD not in text
    per_once = root / "var/lib/cloud/scripts/per-once"
    assert (per_once / "rm_98_snf-image-50ChangePassword.cfg.sh").read_text() == \
        "#!/bin/sh\nrm -f /etc/cloud/cloud.cfg.d/98_snf-image-50ChangePassword.cfg\n"
    assert (per_once / "clear_user_data.sh").stat().st_mode & 0o111
    assert "maxsize: 134217728" in (cfg / "98_snf-image-50AddSwap.cfg").read_text()
    assert (cfg / "98_snf-image-50DeleteSSHKeys.cfg").read_text() == "ssh_deletekeys: true\n"
    assert (root / "etc/ssh/ssh_host_rsa_key").exists(), "cloud-init deletes the keys itself"
    assert (cfg / "98_snf-image-50ConfigureNetwork.cfg").read_text() == \
        "network: {config: disabled}\n"
    assert "iface eth0 inet dhcp" in (root / "etc/network/interfaces").read_text()
    inject = list(per_once.glob("inject_files-*.sh"))
    assert len(inject) == 1 and "install -m 440 -o 'debian'" in inject[0].read_text()
    assert (root / "etc/hostname").read_text() == "vm9.example.org\n"
    assert not (root / "etc/x").exists()
    for output in outputs:
        assert PASSWORD not in output.stderr + output.progress


def test_cloud_init_without_cloud_init_installed_fails(run, tmp_path):
    root = image_tree(tmp_path / "root", BASE)
    result = run("35InitializeDatasource", root, {"SNF_IMAGE_PROPERTY_CLOUD_INIT": "yes"},
                 check=False)
    assert result.returncode == 1
    assert result.stderr.splitlines()[-1].startswith(
        "ERROR: Unable to find directory to host the cloud-init configuration")
    assert run("35InitializeDatasource", root).returncode == 0
    assert not (root / "var").exists()


# --------------------------------------------------------------------------
# Network stacks, chosen by content
# --------------------------------------------------------------------------

NICS = {"SNF_IMAGE_NIC_COUNT": "2", "SNF_IMAGE_DHCP_TAGS": "dhcp",
        "SNF_IMAGE_NIC_0_MAC": "aa:00:00:00:00:01", "SNF_IMAGE_NIC_0_IP": "192.0.2.10",
        "SNF_IMAGE_NIC_0_NETWORK_SUBNET": "192.0.2.0/24",
        "SNF_IMAGE_NIC_0_NETWORK_GATEWAY": "192.0.2.1",
        "SNF_IMAGE_NIC_0_NETWORK_GATEWAY6": "2001:db8::1",
        "SNF_IMAGE_NIC_1_MAC": "aa:00:00:00:00:02", "SNF_IMAGE_NIC_1_IP": "10.0.3.15",
        "SNF_IMAGE_NIC_1_NETWORK_SUBNET": "10.0.3.0/24", "SNF_IMAGE_NIC_1_NETWORK_TAGS": "dhcp"}


def test_networkd_image(run, tmp_path):
    root = image_tree(tmp_path / "root", dict(BASE, **{
        "/etc/systemd/network/50-dhcp.network": "[Match]\nName=en*\n[Network]\nDHCP=yes\n",
        "/etc/systemd/system/multi-user.target.wants/systemd-networkd.service":
            ("link", "/lib/systemd/system/systemd-networkd.service")}))
    run("50ConfigureNetwork", root, NICS)
    network = root / "etc/systemd/network"
    static = (network / "10-snf-image-eth0.network").read_text()
    assert "MACAddress=aa:00:00:00:00:01" in static and "Address=192.0.2.10/24" in static
    assert "DHCP=ipv4" in (network / "10-snf-image-eth1.network").read_text()
    assert (network / "50-dhcp.network").exists()


def test_networkmanager_image(run, tmp_path):
    require_root()
    root = image_tree(tmp_path / "root", dict(BASE, **{"/usr/sbin/NetworkManager": "",
                                                 "/etc/NetworkManager": None}))
    run("50ConfigureNetwork", root, NICS)
    path = root / "etc/NetworkManager/system-connections/snf-image-eth0.nmconnection"
    assert "address1=192.0.2.10/24,192.0.2.1" in path.read_text()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and path.stat().st_uid == 0


def test_ifcfg_image(run, tmp_path):
    root = image_tree(tmp_path / "root", {"/etc/redhat-release": "Rocky 8\n",
                                    "/etc/sysconfig/network-scripts/ifcfg-eth0": "DEVICE=eth0\n",
                                    "/etc/sysconfig/network": "HOSTNAME=x\nNETWORKING=no\n"})
    run("50ConfigureNetwork", root, NICS)
    scripts = root / "etc/sysconfig/network-scripts"
    assert "IPADDR=192.0.2.10" in (scripts / "ifcfg-eth0").read_text()
    assert (scripts / "ifcfg-eth0.snf-image-disabled").read_text() == "DEVICE=eth0\n"
    assert (root / "etc/sysconfig/network").read_text() == "HOSTNAME=x\nNETWORKING=yes\n"


def test_unknown_network_stack_warns_or_uses_cloud_init(run, tmp_path):
    root = image_tree(tmp_path / "root", BASE)
    result = run("50ConfigureNetwork", root, NICS)
    assert "WARNING:Don't know how to configure the network" in result.progress
    assert sorted(p.name for p in (root / "etc").iterdir()) == sorted(
        Path(p).name for p in BASE)
    (root / "etc/cloud/cloud.cfg.d").mkdir(parents=True)
    result = run("50ConfigureNetwork", root, dict(NICS, SNF_IMAGE_PROPERTY_CLOUD_INIT="yes"))
    assert "Letting cloud-init do that" in result.progress
    config = (root / "var/lib/cloud/seed/nocloud-net/network-config").read_text()
    assert 'macaddress: "aa:00:00:00:00:02"' in config and "dhcp4: true" in config


# --------------------------------------------------------------------------
# Hostname, machine-id
# --------------------------------------------------------------------------

def test_hostname_per_distribution(run, tmp_path):
    redhat = image_tree(tmp_path / "rh", {"/etc/redhat-release": "CentOS 6\n",
                                    "/etc/sysconfig/network": "NETWORKING=yes\nHOSTNAME=old\n"})
    run("50AssignHostname", redhat)
    assert (redhat / "etc/sysconfig/network").read_text() == \
        "NETWORKING=yes\nHOSTNAME=vm9.example.org\n"
    suse = image_tree(tmp_path / "suse", {"/etc/SuSE-release": "SUSE 11\n"})
    run("50AssignHostname", suse)
    assert (suse / "etc/HOSTNAME").read_text() == "vm9.example.org\n"
    gentoo = image_tree(tmp_path / "gentoo", {"/etc/gentoo-release": "x\n",
                                        "/etc/conf.d/hostname": 'hostname="old"\n'})
    run("50AssignHostname", gentoo)
    assert (gentoo / "etc/conf.d/hostname").read_text() == 'hostname="vm9.example.org"\n'
    unknown = image_tree(tmp_path / "unknown", {"/etc/os-release": "ID=mystery\n"})
    result = run("50AssignHostname", unknown, check=False)
    assert result.returncode == 1
    assert result.stderr.splitlines()[-1] == \
        "ERROR: Don't know how to assign hostname. Unknown linux distribution."
    result = run("50AssignHostname", unknown, {"SNF_IMAGE_HOSTNAME": "bad name"}, check=False)
    assert "Invalid hostname" in result.stderr


def test_machine_id(run, tmp_path):
    root = image_tree(tmp_path / "root", {"/etc/machine-id": "uninitialized\n",
                                    "/var/lib/dbus/machine-id": "0" * 32 + "\n"})
    run("50ChangeMachineId", root)
    assert (root / "etc/machine-id").read_text() == "uninitialized\n"
    assert not (root / "var/lib/dbus/machine-id").exists()
    (root / "etc/machine-id").write_text("1" * 32 + "\n")
    (root / "var/lib/dbus/machine-id").symlink_to("/etc/machine-id")
    run("50ChangeMachineId", root)
    new = (root / "etc/machine-id").read_text().strip()
    assert len(new) == 32 and new != "1" * 32
    assert (root / "var/lib/dbus/machine-id").is_symlink()
    result = run("50ChangeMachineId", image_tree(tmp_path / "none", {"/etc/hosts": ""}))
    assert "WARNING:No /etc/machine-id in the image" in result.progress


# --------------------------------------------------------------------------
# Personality through the real script, Windows, custom task
# --------------------------------------------------------------------------

def test_personality_escape_through_symlinked_parent(run, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    root = image_tree(tmp_path / "root", dict(BASE, **{"/var/www": ("link", "../../outside"),
                                                 "/srv": ("link", str(outside))}))
    for path in ("/var/www/index.html", "/../outside/x", "/etc/../../outside/y"):
        files = [{"path": path, "contents": base64.b64encode(b"pwned").decode()}]
        result = run("60EnforcePersonality", root, {"SNF_IMAGE_PERSONALITY": json.dumps(files)},
                     check=False)
        assert result.returncode == 1 and "outside the image" in result.stderr.splitlines()[-1]
    files = [{"path": "/srv/inside", "contents": base64.b64encode(b"ok").decode(), "mode": 420}]
    run("60EnforcePersonality", root, {"SNF_IMAGE_PERSONALITY": json.dumps(files)})
    assert os.listdir(outside) == []
    # /srv -> <host path>/outside is read as an absolute path inside the image
    inside = root / str(outside).lstrip("/") / "inside"
    assert inside.read_text() == "ok"


def test_windows_tasks_skip_linux_and_need_hives(run, tmp_path):
    root = image_tree(tmp_path / "root", BASE)
    for task in ("35InstallUnattend", "50DisableRemoteDesktopConnections"):
        assert run(task, root).stderr == ""
        result = run(task, root, {"SNF_IMAGE_PROPERTY_OSFAMILY": "windows"}, check=False)
        assert result.returncode == 1
        assert result.stderr.splitlines()[-1] == \
            "ERROR: The SYSTEM registry hive is missing or is not a hive file"


def test_custom_task(run, tmp_path):
    root = image_tree(tmp_path / "root", BASE)
    script = b"#!/bin/sh\necho \"$SNF_IMAGE_HOSTNAME\" > \"$SNF_IMAGE_TARGET/ran\"\nexit 0\n"
    run("70RunCustomTask", root, {"SNF_IMAGE_PROPERTY_CUSTOM_TASK":
                                  base64.b64encode(script).decode()})
    assert (root / "ran").read_text() == "vm9.example.org\n"
    failing = base64.b64encode(b"#!/bin/sh\nexit 3\n").decode()
    result = run("70RunCustomTask", root, {"SNF_IMAGE_PROPERTY_CUSTOM_TASK": failing},
                 check=False)
    assert result.stderr.splitlines()[-1] == "ERROR: Custom task failed (exit code 3)"
    result = run("70RunCustomTask", root, {"SNF_IMAGE_PROPERTY_CUSTOM_TASK": "%%%"},
                 check=False)
    assert result.stderr.splitlines()[-1] == "ERROR: CUSTOM_TASK property is not valid base64"


def test_cloud_init_personality_script_runs_in_the_guest(run, tmp_path):
    """The first-boot script, run in a chroot of the tree with busybox as its shell."""
    require_root()
    root = image_tree(tmp_path / "root", dict(BASE, **{"/home/debian": None, "/bin": None}))
    os.chown(root / "home/debian", 1000, 1000)
    busybox = shutil.which("busybox")
    if busybox is None:
        pytest.skip("needs busybox")
    shutil.copy(busybox, root / "bin/busybox")
    for applet in ("sh", "mkdir", "chown", "chgrp", "rm"):
        (root / "bin" / applet).symlink_to("busybox")
    # Debian's static busybox has no `install`: the host's, with its libraries
    install = shutil.which("install")
    libraries = [token for line in subprocess.run(["ldd", install], capture_output=True,
                                                  text=True, check=True).stdout.splitlines()
                 for token in line.split() if token.startswith("/")]
    for path in libraries:
        destination = root / path.lstrip("/")
        destination.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(os.path.realpath(path), destination)
    shutil.copy(install, root / "bin/install")
    files = [{"path": "/home/debian/notes/deep/todo.txt", "owner": "debian", "group": "debian",
              "mode": 384, "contents": base64.b64encode(b"todo\n").decode()},
             {"path": "/etc/snf/motd", "contents": base64.b64encode(b"motd\n").decode()}]
    run("60EnforcePersonality", root, {"SNF_IMAGE_PROPERTY_CLOUD_INIT": "yes",
                                       "SNF_IMAGE_PERSONALITY": json.dumps(files)})
    assert not (root / "home/debian/notes").exists()
    per_once = root / "var/lib/cloud/scripts/per-once"
    (script,) = per_once.glob("inject_files-*.sh")
    subprocess.run([shutil.which("chroot"), str(root), "/bin/sh", "/" + str(script.relative_to(root))],
                   check=True, env={"PATH": "/bin"})
    todo = root / "home/debian/notes/deep/todo.txt"
    assert todo.read_text() == "todo\n"
    assert (todo.stat().st_uid, todo.stat().st_gid, stat.S_IMODE(todo.stat().st_mode)) == \
        (1000, 1000, 0o600)
    for directory in ("home/debian/notes", "home/debian/notes/deep"):
        info = (root / directory).stat()
        assert (info.st_uid, info.st_gid, stat.S_IMODE(info.st_mode)) == (1000, 1000, 0o750)
    motd = (root / "etc/snf/motd").stat()
    assert (motd.st_uid, stat.S_IMODE(motd.st_mode)) == (0, 0o440)
    assert stat.S_IMODE((root / "etc/snf").stat().st_mode) == 0o750
    assert list(per_once.iterdir()) == [], "the script removes its data and itself"
