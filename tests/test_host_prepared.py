"""SSH host keys and password hashes made on the node (HostPreparation of
snf-image-host.py) and their use by 50DeleteSSHKeys and 50ChangePassword:
the real ssh-keygen and libxcrypt of the host make them, the real task
scripts run against image trees with the resulting mailbox, as in the
helper, where the tasks wait for what the host posts while the helper boots.
A prepared key or hash reaches the image only when it is what the
task would make itself (type, size, form, comment; method and parameters,
a distinct salt per user); anything else is made by the task, and unused
material never reaches the image.  Writing root-owned files needs root."""

import ctypes
import json
import os
import subprocess
import threading
import time

import pytest

from conftest import REPO, image_tree, load_script, require_programs, require_root

HOST = load_script("snf-image-host.py")
load_script("snf-image-helper.py", "snf_image_helper")    # what the task library imports
LIB = load_script("tasks.d/snf_image_tasklib.py", "snf_image_tasklib")
TASKS = REPO / "tasks.d"
SECRET = "Canary-Prepared-Pw-9"
SSHD_IMAGE = {"/etc/machine-id": "1" * 32 + "\n", "/usr/sbin/sshd": "",
              "/etc/ssh/sshd_config": "Port 22\n",
              "/etc/ssh/ssh_host_rsa_key": "old", "/etc/ssh/ssh_host_ecdsa_key": "old",
              "/etc/ssh/ssh_host_ed25519_key": "old",
              "/etc/passwd": "root:x:0:0:root:/root:/bin/sh\ndebian:x:1000:1000::/home/debian:/bin/sh\n",
              "/etc/shadow": "root:*:19000:0:99999:7:::\ndebian:*:19000:0:99999:7:::\n",
              "/etc/pam.d/common-password":
                  "password [success=1 default=ignore] pam_unix.so obscure yescrypt\n"}


def system_crypt(password, setting):
    library = ctypes.CDLL("libcrypt.so.1")
    library.crypt.restype = ctypes.c_char_p
    library.crypt.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
    return library.crypt(password.encode(), setting.encode()).decode()


def config(**overrides):
    values = {setting.name: setting.default for setting in HOST.SETTINGS}
    values = {name: (value.split() if HOST.SETTINGS_BY_NAME[name].is_program else value)
              for name, value in values.items()}
    values.update(overrides)
    return HOST.Config(values, {})


def prepare(workdir, properties=None, **params):
    """What a task finds in the mailbox: posted by `deliver` in the
    background while the reader waits for it, as in a deployment."""
    params = {"img_passwd": SECRET, "img_properties": json.dumps(properties or {}), **params}
    with HOST.HostPreparation(str(workdir), config(), params, "diskdump", "vm7.example.org") as preparation:
        assert (preparation.mailbox is not None) == preparation.announced
        if preparation.mailbox is None:
            assert preparation.collect() is None
            return None
        preparation.deliver()
        payload = LIB.read_mailbox(preparation.mailbox, wait=60)
        assert os.listdir(workdir) == ["prepared.img"], "ssh-keygen's directory is gone once the keys are read"
    assert os.listdir(workdir) == [], "the mailbox is gone with the helper"
    return json.loads(payload) if payload else None


@pytest.fixture
def run(lib_dir, tmp_path):
    progress = tmp_path / "progress"

    def run_task(task, target, material=None, properties=None):
        progress.write_text("")
        environ = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
                   "PYTHONDONTWRITEBYTECODE": "1", "SNF_IMAGE_HELPER_LIB": str(lib_dir),
                   "SNF_IMAGE_TARGET": str(target), "TASKNAME": task,
                   "SNF_IMAGE_MONITOR": str(progress), "SNF_IMAGE_PROPERTY_OSFAMILY": "linux",
                   "SNF_IMAGE_HOSTNAME": "vm7.example.org", "SNF_IMAGE_PASSWD": SECRET,
                   "SNF_IMAGE_PROPERTY_USERS": "root debian", **(properties or {})}
        if material is not None:
            path = tmp_path / "prepared.img"
            path.unlink(missing_ok=True)
            HOST.fill_mailbox(HOST.create_mailbox(str(path)), json.dumps(material).encode())
            environ["SNF_IMAGE_PREPARED"] = str(path)
        result = subprocess.run([str(TASKS / task)], env=environ, capture_output=True,
                                text=True, timeout=300)
        assert result.returncode == 0, result.stderr
        for secret in [SECRET, "PRIVATE KEY"] + [
                value for hashes in (material or {}).get("password_hashes", {}).values()
                for value in hashes.values()]:
            assert secret not in result.stderr + progress.read_text()
        return result
    return run_task


def shadow_hashes(root):
    return {line.split(":")[0]: line.split(":")[1] for line in (root / "etc/shadow").read_text().splitlines()}


def test_the_node_prepares_what_the_tasks_make(tmp_path):
    require_programs("ssh-keygen")
    (tmp_path / "work").mkdir()
    material = prepare(tmp_path / "work", {"USERS": "root debian"})
    keys = material["ssh_host_keys"]
    assert sorted(keys) == ["ecdsa", "ed25519", "rsa"]
    assert keys["rsa"]["private"].startswith("-----BEGIN RSA PRIVATE KEY-----")
    assert keys["ecdsa"]["private"].startswith("-----BEGIN EC PRIVATE KEY-----")
    assert all(key["public"].endswith(" root@vm7") for key in keys.values())
    hashes = material["password_hashes"]
    assert sorted(hashes) == ["sha512", "yescrypt"]
    for method, prefix in (("yescrypt", "$y$"), ("sha512", "$6$")):
        assert sorted(hashes[method]) == ["debian", "root"]
        root_hash, debian_hash = hashes[method]["root"], hashes[method]["debian"]
        assert root_hash.startswith(prefix) and root_hash != debian_hash, "a salt per user"
        assert system_crypt(SECRET, root_hash) == root_hash and system_crypt("x", root_hash) != root_hash
    again = prepare(tmp_path / "work", {"USERS": "root debian"})
    assert again["ssh_host_keys"]["ed25519"] != keys["ed25519"], "keys are unique per deployment"


@pytest.mark.parametrize("properties, params, keys, methods", [
    ({"PASSWD_HASHING_METHOD": "MD5"}, {}, 3, ["md5"]),
    ({"CLOUD_INIT": "yes"}, {}, 0, ["sha512", "yescrypt"]),          # cloud-init makes the keys
    ({"OSFAMILY": "windows"}, {}, None, None),
    ({"EXCLUDE_ALL_TASKS": "yes"}, {}, None, None),
    ({"EXCLUDE_TASK_CHANGEPASSWORD": "1"}, {}, 3, []),
    ({}, {"img_passwd_hash": "$6$abc$def"}, 3, []),                   # stored as given
    ({"USERS": " ".join(f"u{n}" for n in range(40))}, {}, 3, []),     # more users than are prepared for
])
def test_what_is_prepared(tmp_path, properties, params, keys, methods):
    require_programs("ssh-keygen")
    (tmp_path / "work").mkdir()
    material = prepare(tmp_path / "work", properties, **params)
    if keys is None:
        assert material is None
        return
    assert len(material["ssh_host_keys"]) == keys
    assert sorted(material["password_hashes"]) == methods


def test_a_node_without_ssh_keygen_or_libcrypt_prepares_nothing(tmp_path, monkeypatch):
    (tmp_path / "work").mkdir()
    monkeypatch.setattr(HOST, "LIBCRYPT", "libcrypt-absent.so.9")
    params = {"img_passwd": SECRET, "img_properties": "{}"}
    with HOST.HostPreparation(str(tmp_path / "work"), config(SSH_KEYGEN=["/nonexistent/ssh-keygen"]),
                              params, "diskdump", "vm7") as preparation:
        preparation.deliver()
        assert LIB.read_mailbox(preparation.mailbox, wait=30) is None, "the host posts that it has nothing"


def test_the_mailbox_round_trip(tmp_path):
    """The host's writer and the tasks' reader: a payload, "nothing", material
    too large for the mailbox (posted as nothing) and a payload of every size
    around the 4 KiB blocks the reader reads."""
    for size in (0, 1, 4095, 4096, 4097, HOST.MAILBOX_PAYLOAD_MAX):
        path = str(tmp_path / f"box-{size}")
        HOST.fill_mailbox(HOST.create_mailbox(path), os.urandom(size))
        assert os.stat(path).st_mode & 0o777 == 0o600
        assert len(LIB.read_mailbox(path, wait=0)) == size
    HOST.fill_mailbox(HOST.create_mailbox(str(tmp_path / "nothing")), None)
    assert LIB.read_mailbox(str(tmp_path / "nothing"), wait=0) is None
    HOST.fill_mailbox(HOST.create_mailbox(str(tmp_path / "big")), b"y" * (HOST.MAILBOX_PAYLOAD_MAX + 1))
    assert LIB.read_mailbox(str(tmp_path / "big"), wait=0) is None
    assert os.path.getsize(tmp_path / "big") == HOST.MAILBOX_SIZE


def test_the_reader_waits_for_the_host(tmp_path, capsys):
    """A task that asks before the host has posted waits (saying so once),
    and takes the payload the moment it is posted; an empty mailbox that
    stays empty is given up after the wait, as is an inconsistent one."""
    path = str(tmp_path / "box")
    HOST.create_mailbox(path)
    poster = threading.Timer(1.0, HOST.fill_mailbox, (path, b'{"format": 1}'))
    started = time.monotonic()
    poster.start()
    assert LIB.read_mailbox(path, wait=30) == b'{"format": 1}'
    assert 1.0 <= time.monotonic() - started < 5
    assert capsys.readouterr().err.count("waiting for the SSH host keys") == 1

    HOST.create_mailbox(str(tmp_path / "empty"))
    assert LIB.read_mailbox(str(tmp_path / "empty"), wait=0.3) is None
    assert "no answer from the node" in capsys.readouterr().err

    torn = str(tmp_path / "torn")
    HOST.fill_mailbox(HOST.create_mailbox(torn), b'{"format": 1, "ssh_host_keys": {}}')
    with open(torn, "r+b") as box:
        box.seek(HOST.MAILBOX_HEADER_SIZE + 3)
        box.write(b"X")
    started = time.monotonic()
    assert LIB.read_mailbox(torn, wait=30) is None
    assert time.monotonic() - started < 5
    assert "inconsistent" in capsys.readouterr().err


def test_tasks_use_the_prepared_keys_and_hashes(run, tmp_path):
    require_root()
    require_programs("ssh-keygen")
    (tmp_path / "work").mkdir()
    material = prepare(tmp_path / "work", {"USERS": "root debian"})
    root = image_tree(tmp_path / "image", SSHD_IMAGE)
    result = run("50DeleteSSHKeys", root, material)
    assert "prepared on the node" in result.stderr and "keys made:" not in result.stderr
    for kind, key in material["ssh_host_keys"].items():
        private = root / f"etc/ssh/ssh_host_{kind}_key"
        assert private.read_text() == key["private"]
        assert (root / f"etc/ssh/ssh_host_{kind}_key.pub").read_text() == key["public"] + "\n"
        assert (private.stat().st_mode & 0o777, private.stat().st_uid) == (0o600, 0)
    result = run("50ChangePassword", root, material)
    assert "Using the yescrypt hashes prepared on the node" in result.stderr
    assert shadow_hashes(root) == material["password_hashes"]["yescrypt"]


def test_unused_prepared_keys_stay_out_of_the_image(run, tmp_path):
    require_root()
    require_programs("ssh-keygen")
    (tmp_path / "work").mkdir()
    material = prepare(tmp_path / "work", {"USERS": "root debian"})
    files = dict(SSHD_IMAGE)
    del files["/etc/ssh/ssh_host_ecdsa_key"], files["/etc/ssh/ssh_host_rsa_key"]
    root = image_tree(tmp_path / "image", files)
    run("50DeleteSSHKeys", root, material)
    assert sorted(path.name for path in (root / "etc/ssh").glob("ssh_host_*")) == [
        "ssh_host_ed25519_key", "ssh_host_ed25519_key.pub"]
    everything = b"".join(path.read_bytes() for path in root.rglob("*") if path.is_file())
    for kind in ("rsa", "ecdsa"):
        assert material["ssh_host_keys"][kind]["private"].encode() not in everything
        assert material["ssh_host_keys"][kind]["public"].split()[1].encode() not in everything


def test_tasks_make_what_does_not_match(run, tmp_path):
    require_root()
    require_programs("ssh-keygen")
    (tmp_path / "work").mkdir()
    material = prepare(tmp_path / "work", {"USERS": "root debian"})
    keys = material["ssh_host_keys"]
    keys["ed25519"]["public"] = keys["ed25519"]["public"].rsplit(" ", 1)[0] + " root@elsewhere"
    small = tmp_path / "small"
    subprocess.run(["ssh-keygen", "-q", "-t", "rsa", "-b", "2048", "-m", "PEM", "-N", "", "-C", "root@vm7",
                    "-f", str(small)], check=True)
    keys["rsa"] = {"private": small.read_text(), "public": (tmp_path / "small.pub").read_text().strip()}
    hashes = material["password_hashes"]
    hashes["yescrypt"]["debian"] = hashes["yescrypt"]["root"]        # a shared salt
    root = image_tree(tmp_path / "image", SSHD_IMAGE)
    result = run("50DeleteSSHKeys", root, material)
    assert "prepared on the node: /etc/ssh/ssh_host_ecdsa_key" in result.stderr
    made_line = next(line for line in result.stderr.splitlines() if "keys made:" in line)
    assert sorted(made_line.split(": ")[1].split(", ")) == [
        "/etc/ssh/ssh_host_ed25519_key", "/etc/ssh/ssh_host_rsa_key"]
    ssh = root / "etc/ssh"
    assert (ssh / "ssh_host_ecdsa_key").read_text() == keys["ecdsa"]["private"]
    for kind in ("rsa", "ed25519"):
        assert (ssh / f"ssh_host_{kind}_key").read_text() != keys[kind]["private"]
        assert (ssh / f"ssh_host_{kind}_key.pub").read_text().split()[2] == "root@vm7"
    bits = subprocess.run(["ssh-keygen", "-lf", str(ssh / "ssh_host_rsa_key.pub")], check=True,
                          capture_output=True, text=True).stdout.split()[0]
    assert bits == "3072"
    result = run("50ChangePassword", root, material)
    assert "prepared on the node" not in result.stderr
    made = shadow_hashes(root)
    assert made["root"].startswith("$y$") and made["root"] != made["debian"]
    assert set(made.values()).isdisjoint(hashes["yescrypt"].values())
    assert all(system_crypt(SECRET, value) == value for value in made.values())
    # the image asks for SHA-512 with a rounds= parameter the task does not use: made here
    hashes["sha512"]["root"] = hashes["sha512"]["root"].replace("$6$", "$6$rounds=1000$", 1)
    result = run("50ChangePassword", root, material, {"SNF_IMAGE_PROPERTY_PASSWD_HASHING_METHOD": "sha512"})
    assert "prepared on the node" not in result.stderr
    assert set(shadow_hashes(root).values()).isdisjoint(hashes["sha512"].values())
    # and without any prepared material, as before
    result = run("50ChangePassword", root, None, {"SNF_IMAGE_PROPERTY_PASSWD_HASHING_METHOD": "sha512"})
    assert all(value.startswith("$6$") and system_crypt(SECRET, value) == value
               for value in shadow_hashes(root).values())


def test_ssh_keygen_sees_no_secret(tmp_path):
    """ssh-keygen's argument list and environment carry no password: the
    node's program, wrapped to record what it was given."""
    require_programs("ssh-keygen")
    (tmp_path / "work").mkdir()
    record = tmp_path / "record"
    wrapper = tmp_path / "ssh-keygen"
    wrapper.write_text(f'#!/bin/sh\n{{ printf "%s\\n" "$@"; env; }} >> {record}\nexec ssh-keygen "$@"\n')
    wrapper.chmod(0o755)
    params = {"img_passwd": SECRET, "img_properties": "{}"}
    with HOST.HostPreparation(str(tmp_path / "work"), config(SSH_KEYGEN=[str(wrapper)]), params,
                              "diskdump", "vm7.example.org") as preparation:
        material = json.loads(preparation.collect())
    assert sorted(material["ssh_host_keys"]) == ["ecdsa", "ed25519", "rsa"]
    text = record.read_text()
    assert text.count("-f\n") == 3 and SECRET not in text
    assert all(value not in text for value in material["password_hashes"]["yescrypt"].values())
    assert os.listdir(tmp_path / "work") == []
