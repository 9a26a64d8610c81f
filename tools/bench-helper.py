#!/usr/bin/env python3
"""Benchmark: helper VM overhead, qemu start to qemu exit, with no tasks.

Pipeline: image source → O_DIRECT copy → floppy + **helper VM** → tasks → SUCCESS.
This measures the fixed cost every `create` pays for the helper VM: boot the
real helper (built by the real builder, cached by tools/helpervm.py, with an
empty tasks directory and EXCLUDE_ALL_TASKS) under TCG with the command line
of DESIGN.md §4 and a real floppy, until it writes SUCCESS and powers off.

The helper is launched by the host program's own launcher
(snf-image-host.py: make_floppy + run_helper_vm, i.e. exactly what `create`
does after the copy); `--launcher qemu` runs qemu directly with the command
line of DESIGN.md §4 instead.

In the same run it boots the same helper from the compressed bzImage instead
of the PVH vmlinux as the baseline and prints the ratio. Runs alternate
between the two so that load from other processes hits both alike.
Goal: median ≤ 7 s under TCG on our 2-core machines.

Usage: python3 tools/bench-helper.py [--runs N] [--accel tcg|kvm] [--launcher host|qemu]
"""

import argparse
import contextlib
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import helpervm  # builds and caches the helper as the tests do
from repository import load_script


GOAL_SECONDS = 7.0
TIMEOUT_SECONDS = 180


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


def qemu_argv(release, kernel, work, floppy, disk, accel):
    append = ("console=ttyS0 panic=-1 quiet ro root=/dev/vda rootfstype=ext4 "
              "init=/usr/bin/snf-image-helper hypervisor=kvm snf_image_activate_helper "
              "rules_dev=/dev/fd0")
    return ["qemu-system-x86_64", "-accel", accel, "-machine", "pc", "-cpu", "max", "-smp", "1",
            "-m", "256", "-nodefaults", "-nographic", "-no-reboot", "-vga", "none",
            "-monitor", "none", "-parallel", "none",
            "-kernel", str(kernel), "-initrd", str(release / "initrd"), "-append", append,
            "-drive", f"file={release / 'image'},format=raw,if=none,id=helperroot,readonly=on",
            "-device", "virtio-blk-pci,drive=helperroot,serial=snf-helper-root",
            "-drive", f"file={disk},format=raw,if=none,id=disk0,cache=none,aio=threads",
            "-device", "virtio-blk-pci,drive=disk0,serial=snf-disk0",
            "-drive", f"file={floppy},if=floppy,format=raw,readonly=on",
            "-serial", f"file:{work / 'console'}", "-serial", f"file:{work / 'result'}",
            "-serial", f"file:{work / 'progress'}", "-serial", "null"]


def boot(release, kernel, floppy, disk, accel):
    """(wall seconds from qemu start to exit, qemu CPU seconds); raises if the
    helper did not say SUCCESS. CPU time is what other load cannot inflate."""
    with tempfile.TemporaryDirectory(prefix="bench-helper.") as tmp:
        work = Path(tmp)
        argv = qemu_argv(release, kernel, work, floppy, disk, accel)
        with open(work / "stderr", "wb") as stderr:
            started = time.monotonic()
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                    stderr=stderr)
            try:
                while True:
                    pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
                    if pid:
                        break
                    if time.monotonic() - started > TIMEOUT_SECONDS:
                        raise SystemExit(f"Error: helper did not finish within {TIMEOUT_SECONDS} s "
                                         f"({kernel.name})")
                    time.sleep(0.005)
            finally:
                if proc.returncode is None and not pid:
                    proc.kill()
                    proc.wait()
            elapsed = time.monotonic() - started
            proc.returncode = os.waitstatus_to_exitcode(status)
        result = (work / "result").read_text(errors="replace").strip()
        if result.splitlines()[:1] != ["SUCCESS"]:
            console = (work / "console").read_text(errors="replace").strip().splitlines()[-5:]
            err = (work / "stderr").read_text(errors="replace").strip()[-200:]
            raise SystemExit(f"Error: helper result {result!r} (qemu exit {proc.returncode}, "
                             f"{err}); console tail: {console}")
        return elapsed, usage.ru_utime + usage.ru_stime


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


def baseline_release(release, work):
    """The same release with the bzImage as kernel (a directory of links)."""
    baseline = work / "baseline-release"
    baseline.mkdir()
    for name in ("initrd", "image", "manifest.json"):
        (baseline / name).symlink_to(release / name)
    (baseline / "kernel").symlink_to(release / "vmlinuz")
    return baseline


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--accel", default="tcg", choices=("tcg", "kvm"))
    parser.add_argument("--launcher", default="host", choices=("host", "qemu"),
                        help="snf-image-host.py's launcher (default) or qemu directly")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-helper-tasks.") as empty_tasks:
        print("building (or reusing) the helper with an empty tasks directory ...", flush=True)
        helper_dir = helpervm.built_helper_dir(tasks_dir=empty_tasks)
    release = (helper_dir / "current").resolve()
    manifest = json.loads((release / "manifest.json").read_text())
    print(f"helper {release} (kernel {manifest['kernel_version']}, {manifest['kernel_format']}, "
          f"Debian {manifest['suite']})")
    print(f"launcher: {'snf-image-host.py (make_floppy + run_helper_vm)' if args.launcher == 'host' else 'qemu directly'}")
    times = {name: [] for name in ("pvh-vmlinux", "bzImage (baseline)")}
    cpu_times = {name: [] for name in times}
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="bench-helper.") as tmp:
        work = Path(tmp)
        variants = {"pvh-vmlinux": (release, release / "kernel"),
                    "bzImage (baseline)": (baseline_release(release, work), release / "vmlinuz")}
        if args.launcher == "host":
            launcher = HostLauncher(work, helper_dir, args.accel)
            boot_variant = lambda variant_release, _kernel: launcher.boot(variant_release)  # noqa: E731
        else:
            floppy = make_floppy(work)
            disk = work / "disk0.img"
            with open(disk, "wb") as stream:
                stream.truncate(64 << 20)
            boot_variant = lambda _release, kernel: boot(release, kernel, floppy, disk, args.accel)  # noqa: E731
        for run in range(args.runs):
            for name, (variant_release, kernel) in variants.items():
                seconds, cpu = boot_variant(variant_release, kernel)
                times[name].append(seconds)
                cpu_times[name].append(cpu)
                print(f"run {run + 1}/{args.runs} {name:20s} {seconds:6.2f} s  (qemu CPU {cpu:5.2f} s)",
                      flush=True)
    medians = {name: statistics.median(values) for name, values in times.items()}
    pvh, baseline = medians["pvh-vmlinux"], medians["bzImage (baseline)"]
    print()
    measured = "floppy + qemu start → exit" if args.launcher == "host" else "qemu start → exit"
    print(f"helper overhead ({measured}), no tasks, {args.accel}, {args.runs} runs "
          f"(load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after, "
          f"{os.cpu_count()} CPUs):")
    for name, values in times.items():
        print(f"  {name:20s} median {medians[name]:6.2f} s  (min {min(values):.2f}, max {max(values):.2f}; "
              f"qemu CPU median {statistics.median(cpu_times[name]):.2f} s)")
    print(f"  ratio bzImage / PVH vmlinux: {baseline / pvh:.2f}x wall, "
          f"{statistics.median(cpu_times['bzImage (baseline)']) / statistics.median(cpu_times['pvh-vmlinux']):.2f}x CPU")
    print(f"  goal ≤ {GOAL_SECONDS:.0f} s: {'met' if pvh <= GOAL_SECONDS else 'NOT met'} "
          f"(median {pvh:.2f} s)")
    return 0 if pvh <= GOAL_SECONDS else 1


if __name__ == "__main__":
    sys.exit(main())
