#!/usr/bin/env python3
"""Benchmark: total `create` time with all Linux tasks, against the helper-only cost.

Pipeline: image source → O_DIRECT copy → floppy + helper VM → **tasks** → SUCCESS.
Each run deploys the 1 GiB Debian test image (MBR, ext4; tools/build-test-image.py)
onto a fresh 3 GiB disk file through the real os-def/create with Ganeti's
environment and the real helper (built by the real builder, cached by
tools/helpervm.py), and times `create` from start to exit:

  full      every Linux task does real work: partition table and file system
            grown, swap partition, hostname, machine-id, password for two
            users, two SSH keys, two NICs (static IPv4 + SLAAC, DHCP), SSH host
            keys regenerated, three personality files, a custom task;
  baseline  the same deployment with EXCLUDE_ALL_TASKS=yes: copy + floppy +
            helper boot, i.e. the helper-only overhead.

Runs alternate between the two (in turn first) so that load from other
processes hits both alike; the medians (of 5 by default) are printed with
their ratio and difference (= the cost of the tasks themselves), and the
machine's load average. Goal: full ≤ 1.6 × baseline.

Usage: python3 tools/bench-create.py [--runs N] [--keep-logs DIR]
"""

import argparse
import base64
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import helpervm  # builds and caches the helper as the tests do
import demo      # image, OS directory and Ganeti environment of `make demo`

NICS = ({"mac": "aa:00:00:be:00:01", "ip": "192.0.2.10", "network_subnet": "192.0.2.0/24",
         "network_gateway": "192.0.2.1", "network_subnet6": "2001:db8:1::/64",
         "network_gateway6": "2001:db8:1::1", "network_tags": ""},
        {"mac": "aa:00:00:be:00:02", "ip": "10.0.3.15", "network_subnet": "10.0.3.0/24",
         "network_tags": "dhcp"})
GOAL_RATIO = 1.6
CUSTOM_TASK = "#!/bin/sh\necho benchmark > \"$SNF_IMAGE_TARGET/etc/snf-bench-custom-task\"\n"


def ssh_keys(work):
    keys = []
    for kind in ("ed25519", "rsa"):
        path = work / f"id_{kind}"
        subprocess.run(["ssh-keygen", "-q", "-t", kind, "-N", "", "-C", "bench@example.org",
                        "-f", str(path)], check=True)
        keys.append(path.with_suffix(".pub").read_text().strip())
    return "\n".join(keys) + "\n"


def full_osparams(auth_keys):
    personality = [{"path": f"/etc/snf-bench/file{i}", "owner": "root", "group": "root",
                    "mode": 0o644, "contents": base64.b64encode(b"x" * 4096).decode()}
                   for i in range(3)]
    properties = {"OSFAMILY": "linux", "ROOT_PARTITION": "1", "SWAP": "2:256",
                  "USERS": "root debian",
                  "CUSTOM_TASK": base64.b64encode(CUSTOM_TASK.encode()).decode()}
    return {"img_passwd": "bench-password", "img_properties": json.dumps(properties),
            "img_personality": json.dumps(personality), "auth_keys": auth_keys}


def baseline_osparams():
    return {"img_passwd": "bench-password",
            "img_properties": json.dumps({"OSFAMILY": "linux", "ROOT_PARTITION": "1",
                                          "EXCLUDE_ALL_TASKS": "yes"})}


def helper_vm_seconds(log_path):
    """The helper VM's run time as create logs it, or None."""
    found = re.findall(r"helper VM stopped after ([0-9.]+) s", log_path.read_text(errors="replace"))
    return float(found[-1]) if found else None


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="runs of each kind (default 5)")
    parser.add_argument("--keep-logs", type=Path, help="directory for the create logs")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if os.geteuid() != 0:
        print("bench-create: error: run as root", file=sys.stderr)
        return 1
    try:
        helper_dir = helpervm.built_helper_dir()
        image = demo.ensure_image("mbr")
    except (RuntimeError, demo.DemoError) as error:
        print(f"bench-create: error: {str(error).splitlines()[0]}", file=sys.stderr)
        return 1
    print(f"image  {image} ({image.stat().st_size // 2**20} MiB) onto "
          f"{demo.DISK_SIZE_MIB} MiB disks\nhelper {helper_dir}")
    times = {"full": [], "baseline": []}
    load_before = Path("/proc/loadavg").read_text().strip()
    helper_times = {"full": [], "baseline": []}
    with tempfile.TemporaryDirectory(prefix="snf-bench-create-") as workdir:
        work = Path(workdir)
        config = demo.write_config(work, image.parent, helper_dir, "tcg")
        os_dir = demo.install_os_dir(work / "os")
        auth_keys = ssh_keys(work)
        for run in range(args.runs):
            kinds = (("full", full_osparams(auth_keys)), ("baseline", baseline_osparams()))
            for kind, osparams in (kinds if run % 2 == 0 else kinds[::-1]):
                disk = demo.fresh_disk(work / "disk0.img")
                env = demo.ganeti_create_env(config, disk, image, osparams,
                                             instance="bench.example.org", nics=NICS)
                log_path = (args.keep_logs or work) / f"create-{kind}-{run}.log"
                log_path.parent.mkdir(parents=True, exist_ok=True)
                with open(log_path, "wb") as log:
                    status, seconds = demo.run_create(os_dir, env, output=log)
                if status != 0:
                    tail = log_path.read_text(errors="replace").strip().splitlines()[-1:]
                    print(f"bench-create: error: {kind} run {run + 1} failed (exit {status}): "
                          f"{' '.join(tail)}", file=sys.stderr)
                    return 1
                times[kind].append(seconds)
                helper_seconds = helper_vm_seconds(log_path)
                if helper_seconds is not None:
                    helper_times[kind].append(helper_seconds)
                print(f"run {run + 1}  {kind:<8} {seconds:6.1f} s"
                      + (f"  (helper VM {helper_seconds:.1f} s)" if helper_seconds else ""), flush=True)
                disk.unlink()
    full, baseline = statistics.median(times["full"]), statistics.median(times["baseline"])

    def helper_column(kind):
        values = helper_times[kind]
        return f"{statistics.median(values):6.1f} s" if len(values) == args.runs else "   n/a"
    print(f"\ncreate, 1 GiB Debian image onto {demo.DISK_SIZE_MIB // 1024} GiB, TCG, "
          f"median of {args.runs}:          create   of which helper VM")
    print(f"  all Linux tasks                             {full:6.1f} s   {helper_column('full')}")
    print(f"  copy + helper only (EXCLUDE_ALL_TASKS=yes)  {baseline:6.1f} s   "
          f"{helper_column('baseline')}")
    print(f"  ratio {full / baseline:.2f}, the tasks cost {full - baseline:.1f} s; "
          f"goal ≤ {GOAL_RATIO}: {'met' if full / baseline <= GOAL_RATIO else 'NOT met'}")
    print(f"  /proc/loadavg before: {load_before}; after: {Path('/proc/loadavg').read_text().strip()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
