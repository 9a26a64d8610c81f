#!/usr/bin/env python3
"""Benchmark: helper VM overhead, qemu start to qemu exit, with no tasks.

Pipeline: image source → O_DIRECT copy → floppy + **helper VM** → tasks → SUCCESS.
This measures the fixed cost every `create` pays for the helper VM: boot the
real helper (built by the real builder, cached by tests/helpervm.py, with an
empty tasks directory and EXCLUDE_ALL_TASKS) under TCG with the command line
of DESIGN.md §4 and a real floppy, until it writes SUCCESS and powers off.

In the same run it boots the same helper from the compressed bzImage instead
of the PVH vmlinux as the baseline and prints the ratio. Runs alternate
between the two so that load from other processes hits both alike.
Goal (issue 3): median ≤ 7 s under TCG on our 2-core machines.

Usage: python3 tools/bench-helper.py [--runs N] [--accel tcg|kvm]
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

import helpervm  # noqa: E402  (the test fixture module builds and caches the helper)

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


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--accel", default="tcg", choices=("tcg", "kvm"))
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-helper-tasks.") as empty_tasks:
        print("building (or reusing) the helper with an empty tasks directory ...", flush=True)
        helper_dir = helpervm.built_helper_dir(tasks_dir=empty_tasks)
    release = (helper_dir / "current").resolve()
    manifest = json.loads((release / "manifest.json").read_text())
    print(f"helper {release} (kernel {manifest['kernel_version']}, {manifest['kernel_format']}, "
          f"Debian {manifest['suite']})")
    variants = {"pvh-vmlinux": release / "kernel", "bzImage (baseline)": release / "vmlinuz"}
    times = {name: [] for name in variants}
    cpu_times = {name: [] for name in variants}
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="bench-helper.") as tmp:
        work = Path(tmp)
        floppy = make_floppy(work)
        disk = work / "disk0.img"
        with open(disk, "wb") as stream:
            stream.truncate(64 << 20)
        for run in range(args.runs):
            for name, kernel in variants.items():
                seconds, cpu = boot(release, kernel, floppy, disk, args.accel)
                times[name].append(seconds)
                cpu_times[name].append(cpu)
                print(f"run {run + 1}/{args.runs} {name:20s} {seconds:6.2f} s  (qemu CPU {cpu:5.2f} s)",
                      flush=True)
    medians = {name: statistics.median(values) for name, values in times.items()}
    pvh, baseline = medians["pvh-vmlinux"], medians["bzImage (baseline)"]
    print()
    print(f"helper overhead, qemu start → exit, no tasks, {args.accel}, {args.runs} runs "
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
