"""create end to end from the host's point of view: the real os-def/create
with Ganeti's environment, the real helper (built by the real builder, cached)
booted under TCG; the progress monitor receives the whole JSON sequence; no
secret in the log, the monitor stream or qemu's argv; nothing left behind
(temp files, floppy, qemu). Also the standalone `deploy` with the helper."""

import json
import os
import subprocess
import threading
import time

import pytest

import ganeti_env
from host_testlib import Site

pytestmark = [pytest.mark.slow, pytest.mark.qemu, pytest.mark.root]

MIB = 1024 * 1024
SECRET = "Hunter2-Very-S3cret"


def temp_entries(site):
    return os.listdir(site.settings["TEMP_DIR"])


def qemu_argvs_while(process):
    """Collect the argv of the qemu children of `process` until it exits."""
    seen = []
    while process.poll() is None:
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            try:
                parent = int(open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[1])
                argv = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")
            except (OSError, IndexError, ValueError):
                continue
            if parent != process.pid:
                continue
            if argv and b"qemu-system" in argv[0] and b"snf_image_activate_helper" in b" ".join(argv):
                seen.append(b" ".join(argv))
        time.sleep(0.2)
    return seen


def test_create_through_os_def_with_monitor(tmp_path, helper_vm_dir):  # noqa: F811
    (tmp_path / "run").mkdir()
    site = Site(tmp_path / "site", HELPER_DIR=helper_vm_dir, HELPER_SOFT_TIMEOUT="10m",
                TEMP_DIR=tmp_path / "run")
    monitor_out = tmp_path / "monitor.jsonl"
    monitor = tmp_path / "monitor"
    monitor.write_text(f"#!/bin/sh\ncat > {monitor_out}\n")
    monitor.chmod(0o755)
    site.write_config(PROGRESS_MONITOR=monitor)
    filesystem = os.urandom(2 * MIB)
    (site.images / "fs.img").write_bytes(filesystem)
    disks = [tmp_path / "disk0", tmp_path / "disk1"]
    disks[0].write_bytes(bytes(16 * MIB))
    disks[1].write_bytes(b"\x42" * (4 * MIB))
    os_dir = ganeti_env.install_os_dir(tmp_path / "os")
    env = ganeti_env.create_env(disks, nics=[{"ip": "10.0.0.5"}], osparams={
        "img_id": "local://fs.img", "img_format": "extdump", "img_passwd": SECRET,
        "img_properties": json.dumps({"EXCLUDE_ALL_TASKS": "yes"})})
    env["SNF_IMAGE_CONFIG"] = str(site.config)
    process = subprocess.Popen([str(os_dir / "create")], env=env, cwd=os_dir, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT)
    output = []
    reader = threading.Thread(target=lambda: output.append(process.stdout.read()), daemon=True)
    reader.start()
    argvs = qemu_argvs_while(process)
    process.wait(timeout=900)
    reader.join(timeout=60)
    log = output[0].decode()
    assert process.returncode == 0, log[-3000:]
    assert argvs and all(SECRET.encode() not in argv for argv in argvs)
    assert all(b"-runas" in argv for argv in argvs)
    assert SECRET not in log
    messages = [json.loads(line) for line in monitor_out.read_text().splitlines()]
    assert SECRET not in monitor_out.read_text()
    types = [m["type"] for m in messages]
    assert types[0] == "image-info" and "image-copy-progress" in types and "image-helper" in types
    assert messages[-1] == {**messages[-1], "type": "image-info",
                            "messages": ["Image customization finished successfully."]}
    content = disks[0].read_bytes()
    assert content[510:512] == b"\x55\xaa" and content[446 + 4] == 0x83
    assert content[MIB:MIB + len(filesystem)] == filesystem
    assert disks[1].read_bytes() == b"\x42" * (4 * MIB)
    assert temp_entries(site) == []


def test_deploy_standalone_with_helper_and_timeout(tmp_path, helper_vm_dir):  # noqa: F811
    (tmp_path / "run").mkdir()
    site = Site(tmp_path / "site", HELPER_DIR=helper_vm_dir, HELPER_SOFT_TIMEOUT="10m",
                TEMP_DIR=tmp_path / "run")
    (site.images / "d.img").write_bytes(os.urandom(MIB))
    disk = tmp_path / "disk"
    disk.write_bytes(bytes(8 * MIB))
    secret_file = tmp_path / "pw"
    secret_file.write_text(SECRET + "\n")
    args = ["--disk", disk, "--img-id", "d.img", "--img-format", "diskdump", "--hostname", "vm1.example.org",
            "--nic", "mac=aa:00:00:00:00:01,ip=10.0.0.9", "--passwd-file", secret_file,
            "--img-properties", json.dumps({"EXCLUDE_ALL_TASKS": "yes"})]
    result = site.deploy(*args, timeout=900)
    assert result.returncode == 0, result.stderr.decode()[-3000:]
    assert SECRET.encode() not in result.stderr
    # the same with a helper that cannot finish in time: exit 3, plain last line, no qemu left
    site.write_config(HELPER_SOFT_TIMEOUT="1", HELPER_HARD_TIMEOUT="2")
    result = site.deploy(*args, timeout=900)
    assert result.returncode == 3
    last = result.stderr.decode().strip().splitlines()[-1]
    assert "did not complete" in last and "HELPER_SOFT_TIMEOUT" in last
    assert temp_entries(site) == []
    leftovers = subprocess.run(["pgrep", "-f", str(disk)], capture_output=True, text=True).stdout
    assert leftovers.strip() == ""
