#!/usr/bin/env python3
"""Benchmark: the helper VM's overhead with no tasks, against a libguestfs appliance launch.

Pipeline: image source → O_DIRECT copy → rules disk + **helper VM** → tasks → SUCCESS.
This measures the fixed cost every `create` pays for the helper VM: the real
helper (built by the real builder, cached by tools/helpervm.py) with an
empty tasks directory and EXCLUDE_ALL_TASKS, launched by snf-image-host.py's
own launcher (make_floppy + run_helper_vm: exactly what `create` does after
the copy) under TCG, until it writes SUCCESS and powers off.

The baseline, in the same run, is `guestfish -a /dev/null run` (libguestfs'
appliance, direct backend, TCG forced), the usual way to touch a guest disk
without mounting it on the host. Rounds alternate between the two so that
load from other processes hits both alike; medians are compared.
Goal: helper ≤ 0.25 × guestfish.

`--launcher qemu` boots qemu directly with the host's helper_command (the
same command line) and reads the ports from files, to time qemu alone.

Usage: python3 tools/bench-helper.py [--runs N] [--accel tcg|kvm] [--launcher host|qemu]
"""

import argparse
import contextlib
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import helpervm  # builds and caches the helper as the tests do
from repository import load_script


GOAL_RATIO = 0.25
TIMEOUT_SECONDS = 600
GUESTFISH_ENV = {"LIBGUESTFS_BACKEND": "direct", "LIBGUESTFS_BACKEND_SETTINGS": "force_tcg"}


def make_floppy(work):
    """1440 KiB ext2 with the rules (no tasks wanted), made without mounting."""
    content = work / "floppy-content"
    content.mkdir()
    rules = {"format": 1,
             "env": {"SNF_IMAGE_TYPE": "diskdump", "SNF_IMAGE_HOSTNAME": "bench.example.org",
                     "SNF_IMAGE_PROPERTIES": json.dumps({"EXCLUDE_ALL_TASKS": "yes"}),
                     "SNF_IMAGE_NIC_COUNT": "0"},
             "disks": ["snf-disk0"]}
    (content / "rules.json").write_text(json.dumps(rules))
    (content / "unattend.xml").write_text("")
    (content / "sysprep.inf").write_text("")
    floppy = work / "floppy.img"
    subprocess.run(["mkfs.ext2", "-q", "-F", "-d", str(content), str(floppy), "1440"],
                   check=True, capture_output=True)
    return floppy


def timed(argv, env=None, timeout=TIMEOUT_SECONDS, what="command"):
    """Run argv; (wall seconds, CPU seconds of it and its children, exit status, stderr)."""
    with tempfile.TemporaryFile() as stderr:
        started = time.monotonic()
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=stderr, env=env)
        try:
            while True:
                pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
                if pid:
                    break
                if time.monotonic() - started > timeout:
                    raise SystemExit(f"Error: {what} did not finish within {timeout} s")
                time.sleep(0.005)
        finally:
            if not pid:
                proc.kill()
                proc.wait()
        elapsed = time.monotonic() - started
        proc.returncode = os.waitstatus_to_exitcode(status)
        stderr.seek(0)
        return elapsed, usage.ru_utime + usage.ru_stime, proc.returncode, stderr.read().decode(errors="replace")


def guestfish_launch():
    """`guestfish -a /dev/null run`: (wall, CPU seconds)."""
    elapsed, cpu, status, err = timed(["guestfish", "-a", "/dev/null", "run"],
                                      env=dict(os.environ, **GUESTFISH_ENV), what="guestfish")
    if status != 0:
        lines = err.strip().splitlines()
        raise SystemExit(f"Error: guestfish failed (exit {status}): {lines[0] if lines else ''}")
    return elapsed, cpu


class QemuLauncher:
    """Boots qemu directly with the host's helper command line, ports in files."""

    def __init__(self, work, accel):
        self.host = load_script("snf-image-host.py")
        self.work, self.accel = work, accel
        self.config = self.host.finalize_config({"HELPER_MEMORY": "256", "HELPER_USER": "root"})
        self.floppy = make_floppy(work)
        disk = work / "disk0.img"
        with open(disk, "wb") as stream:
            stream.truncate(64 << 20)
        self.disks = [self.host.Disk(0, path=str(disk))]

    def boot(self, release):
        with tempfile.TemporaryDirectory(prefix="bench-helper.") as tmp:
            ports = {name: str(Path(tmp) / name) for name in ("console", "result", "progress")}
            argv = self.host.helper_command(self.config, str(release), self.accel, self.disks,
                                            str(self.floppy), ports)
            elapsed, cpu, status, err = timed(argv, what="the helper")
            result = Path(ports["result"]).read_text(errors="replace").strip()
            if result.splitlines()[:1] != ["SUCCESS"]:
                console = Path(ports["console"]).read_text(errors="replace").strip().splitlines()[-5:]
                raise SystemExit(f"Error: helper result {result!r} (qemu exit {status}, "
                                 f"{err.strip()[-200:]}); console tail: {console}")
        return elapsed, cpu


@contextlib.contextmanager
def stderr_to(path):
    """The host relays the helper's console to stderr: keep it in a file."""
    saved = os.dup(2)
    try:
        with open(path, "ab") as target:
            os.dup2(target.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


class HostLauncher:
    """Boots the helper through snf-image-host.py's launcher, as `create` does."""

    def __init__(self, work, helper_dir, accel):
        self.host = load_script("snf-image-host.py")
        self.work = work
        config_file = work / "snf-image.conf"
        config_file.write_text(f'HELPER_DIR="{helper_dir}"\nHELPER_ACCEL="{accel}"\n'
                               'HELPER_SOFT_TIMEOUT="5m"\n')
        self.config = self.host.load_config({"SNF_IMAGE_CONFIG": str(config_file)})
        disk = work / "disk0.img"
        with open(disk, "wb") as stream:
            stream.truncate(64 << 20)
        self.disks = [self.host.Disk(0, path=str(disk))]
        self.log = work / "host-log"

    def boot(self, release):
        """(wall seconds of run_helper_vm including the floppy, qemu CPU seconds)."""
        run_dir = self.work / "run"
        run_dir.mkdir()
        rules = {"format": 1, "disks": ["snf-disk0"],
                 "env": {"SNF_IMAGE_TYPE": "diskdump", "SNF_IMAGE_HOSTNAME": "bench.example.org",
                         "SNF_IMAGE_PROPERTIES": json.dumps({"EXCLUDE_ALL_TASKS": "yes"}),
                         "SNF_IMAGE_NIC_COUNT": "0"}}
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        try:
            with stderr_to(self.log), self.host.Monitor([], "bench") as monitor:
                started = time.monotonic()
                floppy = self.host.make_floppy(str(run_dir), self.config, rules, {})
                self.host.run_helper_vm(self.config, monitor, str(release), self.disks, floppy, str(run_dir))
                elapsed = time.monotonic() - started
        except self.host.SnfError as err:
            raise SystemExit(f"Error: the host launcher failed: {err} (log {self.log})") from None
        finally:
            subprocess.run(["rm", "-rf", str(run_dir)], check=True)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        return elapsed, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--accel", default="tcg", choices=("tcg", "kvm"))
    parser.add_argument("--launcher", default="host", choices=("host", "qemu"),
                        help="snf-image-host.py's launcher (default) or qemu directly")
    args = parser.parse_args()
    if not shutil.which("guestfish"):
        raise SystemExit("Error: guestfish not found (Debian package libguestfs-tools; make deps)")

    with tempfile.TemporaryDirectory(prefix="bench-helper-tasks.") as empty_tasks:
        print("building (or reusing) the helper with an empty tasks directory ...", flush=True)
        helper_dir = helpervm.built_helper_dir(tasks_dir=empty_tasks)
    release = (helper_dir / "current").resolve()
    manifest = json.loads((release / "manifest.json").read_text())
    print(f"helper {release} (kernel {manifest['kernel_version']}, {manifest['kernel_format']}, "
          f"Debian {manifest['suite']})")
    print("warming up guestfish (its appliance is built once and cached) ...", flush=True)
    guestfish_launch()
    names = ("helper", "guestfish")
    times = {name: [] for name in names}
    cpu_times = {name: [] for name in names}
    load_before = Path("/proc/loadavg").read_text().strip()
    with tempfile.TemporaryDirectory(prefix="bench-helper.") as tmp:
        work = Path(tmp)
        launcher = (HostLauncher(work, helper_dir, args.accel) if args.launcher == "host"
                    else QemuLauncher(work, args.accel))
        for run in range(args.runs):
            for name in (names if run % 2 == 0 else names[::-1]):
                seconds, cpu = launcher.boot(release) if name == "helper" else guestfish_launch()
                times[name].append(seconds)
                cpu_times[name].append(cpu)
                print(f"run {run + 1}/{args.runs} {name:10s} {seconds:6.2f} s  (CPU {cpu:5.2f} s)",
                      flush=True)
    medians = {name: statistics.median(values) for name, values in times.items()}
    cpu_medians = {name: statistics.median(values) for name, values in cpu_times.items()}
    ratio = medians["helper"] / medians["guestfish"]
    measured = "floppy + qemu start → exit" if args.launcher == "host" else "qemu start → exit"
    print()
    print(f"helper overhead ({measured}), no tasks, {args.accel}, median of {args.runs} runs")
    print(f"  /proc/loadavg before: {load_before}; after: {Path('/proc/loadavg').read_text().strip()}"
          f" ({os.cpu_count()} CPUs)")
    for name, label in (("helper", "snf-image helper"), ("guestfish", "guestfish -a /dev/null run")):
        values = times[name]
        print(f"  {label:28s} median {medians[name]:6.2f} s  (min {min(values):.2f}, "
              f"max {max(values):.2f}; CPU median {cpu_medians[name]:.2f} s)")
    print(f"  ratio helper / guestfish: {ratio:.2f} (wall), "
          f"{cpu_medians['helper'] / cpu_medians['guestfish']:.2f} (CPU); "
          f"goal ≤ {GOAL_RATIO}: {'met' if ratio <= GOAL_RATIO else 'NOT met'}")
    return 0 if ratio <= GOAL_RATIO else 1


if __name__ == "__main__":
    sys.exit(main())
