"""Faults at the copy and the helper stage, through the real OS definition's
`create` (os-def/create with Ganeti's environment) and the real helper VM
(built by the real builder with the fault task set tests/fault-tasks/):
SIGTERM, SIGINT, SIGHUP and SIGKILL at each stage, a second SIGTERM during the
clean-up, leftovers of a run killed with its guard removed by the next run, a
hung helper (soft timeout), a hostile helper flooding every serial port, qemu
refusing to start, two deployments on one disk (one refused) and four at once
on four disks. Each case: a distinct one-line error last, a non-zero exit, no
file left in TEMP_DIR, no qemu, no guard, and the canary secret in no log,
progress message, argument list, child environment or leftover file."""

import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

import ganeti_env
from conftest import REPO, require_helper_build
from helpervm import built_helper_dir
from host_testlib import HttpServer, Site

pytestmark = [pytest.mark.slow, pytest.mark.qemu, pytest.mark.root]

MIB = 1024 * 1024
SECRET = "Canary-Fault-S3cret"
FAULT_TASKS = REPO / "tests" / "fault-tasks"


@pytest.fixture(scope="module")
def fault_helper():
    require_helper_build()
    return built_helper_dir(tasks_dir=FAULT_TASKS)


def processes_mentioning(text):
    """(pid, argv) of every process whose argument list holds `text`."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if text.encode() in argv and int(pid) != os.getpid():
            found.append((int(pid), argv))
    return found


class Run:
    """One `create` of the OS definition, started in the background."""

    def __init__(self, tmp_path, helper_dir, name="r", fault=None, image=None, disk=None, **settings):
        self.root = tmp_path / name
        self.root.mkdir()
        (self.root / "run").mkdir()
        self.site = Site(self.root / "site", HELPER_DIR=helper_dir, TEMP_DIR=self.root / "run",
                         HELPER_SOFT_TIMEOUT="10m", **settings)
        self.monitor_out = self.root / "monitor.out"
        monitor = self.root / "monitor"
        monitor.write_text(f"#!/bin/sh\nenv > {self.monitor_out}.env\ncat > {self.monitor_out}\n")
        monitor.chmod(0o755)
        self.site.write_config(PROGRESS_MONITOR=monitor)
        (self.site.images / "i.img").write_bytes(os.urandom(MIB))
        image_format = "diskdump"
        if fault:           # the helper runs tasks only on a disk with a partition table
            filesystem = self.site.images / "fs.img"
            filesystem.write_bytes(bytes(4 * MIB))
            subprocess.run(["mkfs.ext4", "-q", "-F", str(filesystem)], check=True)
            image, image_format = "fs.img", "extdump"
        self.disk = disk or self.root / "disk"
        if disk is None:
            self.disk.write_bytes(bytes(8 * MIB))
        properties = {"FAULT": fault} if fault else {"EXCLUDE_ALL_TASKS": "yes"}
        self.env = ganeti_env.create_env([self.disk], instance=f"{name}.example.org", osparams={
            "img_id": image or "i.img", "img_format": image_format, "img_passwd": SECRET,
            "img_properties": json.dumps(properties)})
        self.env["SNF_IMAGE_CONFIG"] = str(self.site.config)
        self.os_dir = ganeti_env.install_os_dir(self.root / "os")
        self.process = None

    def start(self):
        self.log = open(self.root / "log", "wb")
        self.process = subprocess.Popen([str(self.os_dir / "create")], env=self.env, cwd=self.os_dir,
                                        stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        return self

    def qemu(self, timeout=120):
        """The helper VM's pid, once it runs (its environment and argv checked on the way)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for pid, argv in processes_mentioning(str(self.disk)):
                if b"qemu-system" in argv.split(b"\0")[0]:
                    environ = Path(f"/proc/{pid}/environ").read_bytes()
                    assert SECRET.encode() not in argv + environ and b"OSP_" not in environ
                    return pid
            assert self.process.poll() is None, self.text()
            time.sleep(0.05)
        raise AssertionError("qemu did not start")

    def wait(self, timeout=900):
        self.process.wait(timeout=timeout)
        self.log.close()
        return self.process.returncode

    def text(self):
        return (self.root / "log").read_text(errors="replace")

    def last_line(self):
        lines = [line for line in self.text().splitlines() if line.strip()]
        return lines[-1] if lines else ""

    def check_clean(self):
        """Nothing left: no qemu, no guard, no work directory; no secret anywhere we can see."""
        deadline = time.monotonic() + 30
        while processes_mentioning(str(self.root)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert processes_mentioning(str(self.root)) == [], "a process of the deployment is left"
        assert os.listdir(self.root / "run") == [], "the work directory (floppy) is left"
        assert SECRET not in self.text()
        # nor the SSH host keys and password hashes made on the node for the helper
        for path in self.root.rglob("*"):
            if path.is_file() and path != self.disk:
                data = path.read_bytes()
                assert SECRET.encode() not in data, f"secret in {path}"
                if self.site.images not in path.parents:       # (random images could hold anything)
                    assert b"PRIVATE KEY" not in data and b"$y$j9T$" not in data, f"prepared secret in {path}"
        if self.process.returncode not in (0, -signal.SIGKILL):     # SIGKILL leaves no last word
            assert self.last_line().startswith("ERROR: ")
        assert sum(line.startswith("ERROR") for line in self.text().splitlines()) <= 1


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGKILL])
def test_signal_at_the_helper_stage(tmp_path, fault_helper, signum):
    run = Run(tmp_path, fault_helper, fault="hang").start()
    run.qemu()
    run.process.send_signal(signum)
    code = run.wait(120)
    assert code != 0
    if signum != signal.SIGKILL:
        assert f"interrupted by signal {signal.Signals(signum).name}" in run.last_line()
    run.check_clean()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP, signal.SIGKILL])
def test_signal_at_the_copy_stage(tmp_path, fault_helper, signum):
    server = HttpServer()
    stall = threading.Event()
    try:
        server.routes["/slow.img"] = ("stall", None)
        handler = server.server.RequestHandlerClass

        def do_get(self):
            if self.path != "/slow.img":        # no checksum or signature beside it
                self.send_error(404, "Not Found")
                return
            self.send_response(200)
            self.send_header("Content-Length", str(4 * MIB))
            self.end_headers()
            self.wfile.write(os.urandom(MIB))
            self.wfile.flush()
            stall.wait(120)
        handler.do_GET = do_get
        run = Run(tmp_path, fault_helper, image=server.url("/slow.img")).start()
        deadline = time.monotonic() + 60
        while b"Starting image copy" not in (run.root / "log").read_bytes():
            assert time.monotonic() < deadline and run.process.poll() is None, run.text()
            time.sleep(0.05)
        assert os.listdir(run.root / "run") != [], "the floppy is made before the copy"
        time.sleep(0.5)
        run.process.send_signal(signum)
        assert run.wait(120) != 0
        run.check_clean()
    finally:
        stall.set()
        server.close()


def test_second_sigterm_during_cleanup(tmp_path, fault_helper):
    run = Run(tmp_path, fault_helper, fault="hang").start()
    run.qemu()
    run.process.send_signal(signal.SIGTERM)
    time.sleep(0.05)
    run.process.send_signal(signal.SIGTERM)
    time.sleep(0.05)
    run.process.send_signal(signal.SIGTERM)
    assert run.wait(120) == 1
    assert "interrupted by signal SIGTERM" in run.last_line()
    run.check_clean()


def test_leftovers_of_a_killed_run_are_reaped_by_the_next(tmp_path, fault_helper):
    run = Run(tmp_path, fault_helper, fault="hang").start()
    qemu = run.qemu()
    guards = [pid for pid, argv in processes_mentioning("guard-workdir") if str(run.root).encode() in argv]
    assert len(guards) == 1
    os.kill(guards[0], signal.SIGKILL)          # the guard first, then the deployer: nobody cleans up
    os.kill(run.process.pid, signal.SIGKILL)
    run.wait(60)
    time.sleep(1)
    assert os.path.exists(f"/proc/{qemu}") and os.listdir(run.root / "run") != []
    # the next deployment with this TEMP_DIR (here one that fails early) reaps them
    later = Run(tmp_path, fault_helper, name="later", image="absent.img")
    later.site.write_config(TEMP_DIR=run.root / "run")
    later.start()
    assert later.wait(120) == 1 and "does not exist" in later.last_line()
    assert "removing the leftovers of an interrupted deployment" in later.text()
    deadline = time.monotonic() + 10
    while os.path.exists(f"/proc/{qemu}") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not os.path.exists(f"/proc/{qemu}")
    run.check_clean()


def test_hung_helper_hits_the_soft_timeout(tmp_path, fault_helper):
    run = Run(tmp_path, fault_helper, fault="hang")
    run.site.write_config(HELPER_SOFT_TIMEOUT="30", HELPER_HARD_TIMEOUT="3")
    run.start()
    assert run.wait() == 3
    assert "HELPER_SOFT_TIMEOUT (30 s)" in run.last_line()
    run.check_clean()


def test_hostile_helper_floods_every_port(tmp_path, fault_helper):
    run = Run(tmp_path, fault_helper, fault="flood").start()
    assert run.wait() == 3
    text = run.text()
    assert "unexpected result" in run.last_line() or "without reporting a result" in run.last_line()
    assert len(text) < 3 * MIB, "the console flood must not reach the log unbounded"
    assert "output beyond 1 MiB is not logged" in text
    assert not any(line.startswith(("ERROR: forged", "SUCCESS")) for line in text.splitlines())
    run.check_clean()
    messages = run.monitor_out.read_text().splitlines()
    assert all(json.loads(line) for line in messages) and len(messages) < 6000
    assert "OSP_" not in (tmp_path / "r" / "monitor.out.env").read_text()


def test_qemu_refusing_to_start(tmp_path, fault_helper):
    run = Run(tmp_path, fault_helper, HELPER_MEMORY="999999999")
    run.start()
    assert run.wait(300) == 3
    assert "helper VM crashed (qemu exit status 1)" in run.last_line()
    run.check_clean()


def test_same_disk_twice_and_four_disks_at_once(tmp_path, fault_helper):
    first = Run(tmp_path, fault_helper, name="first", fault="hang").start()
    first.qemu()
    before = first.disk.read_bytes()
    second = Run(tmp_path, fault_helper, name="second", disk=first.disk).start()
    assert second.wait(120) == 1
    assert "is in use by another snf-image deployment" in second.last_line()
    assert first.disk.read_bytes() == before
    first.process.send_signal(signal.SIGTERM)
    first.wait(120)
    first.check_clean()
    second.check_clean()
    runs = [Run(tmp_path, fault_helper, name=f"p{n}") for n in range(4)]
    for run in runs:
        run.start()
    for run in runs:
        assert run.wait() == 0, run.text()[-2000:]
        run.check_clean()
        assert run.disk.read_bytes()[:MIB] == (run.site.images / "i.img").read_bytes()


def test_helper_vm_killed_from_outside(tmp_path, fault_helper):
    run = Run(tmp_path, fault_helper, fault="hang").start()
    os.kill(run.qemu(), signal.SIGKILL)
    assert run.wait(120) == 3
    assert "helper VM crashed (qemu exit status -9)" in run.last_line()
    run.check_clean()
