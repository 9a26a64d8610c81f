#!/usr/bin/env python3
"""Copy benchmark (`make bench-copy`): snf-image-host.py's O_DIRECT copier
against GNU dd on the same targets, in the same run.

A 2 GiB image (random data) is written onto a loop device and onto a regular
file, by `snf-image-host.py deploy --no-helper` (the real create copy path,
process start included) and by `dd bs=1M oflag=direct` and
`dd bs=4M oflag=direct` (both with conv=notrunc,fsync, since ours fsyncs too),
interleaved round by round. Prints MiB/s medians per tool and target and the
median throughput ratio ours / better dd (goal ≥ 1.0). Also measures ours
without read/write overlap (COPY_OVERLAP=no) and with 4 writes in flight
(COPY_WRITERS=4), to show what each buys.
Ours is started the way Ganeti starts it: snf-image-host.py is installed in
an OS directory of the work dir with its bytecode precompiled (as `make
install` does), next to a `deploy` wrapper made from os-def/create by
changing only the verb, so the same loader (the module, not a script, with
its __pycache__) runs; PYTHONDONTWRITEBYTECODE is removed from its
environment, as production has no such variable.
Needs root (loop device). Usage: bench-copy.py [--size-mib N] [--rounds N] [--dir DIR]
"""

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# The os-def wrappers run /usr/bin/python3: measure with the production interpreter.
PYTHON = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable
HOST = REPO / "snf-image-host.py"
CREATE_WRAPPER = REPO / "os-def" / "create"
MIB = 1024 * 1024


def install_os_dir(os_dir):
    """snf-image-host.py + its bytecode + a `deploy` wrapper made from os-def/create."""
    os_dir.mkdir()
    shutil.copy2(HOST, os_dir / HOST.name)
    wrapper = CREATE_WRAPPER.read_text()
    verb = ' create "$@"\n'
    if wrapper.count(verb) != 1 or not wrapper.endswith(verb):
        sys.exit(f"bench-copy: {CREATE_WRAPPER} does not end with{verb.rstrip()}: cannot derive the deploy wrapper")
    deploy = os_dir / "deploy"
    deploy.write_text(wrapper[:-len(verb)] + ' deploy "$@"\n')
    deploy.chmod(0o755)
    subprocess.run([PYTHON, "-m", "py_compile", str(os_dir / HOST.name)], check=True,
                   env=production_environment())
    if not list((os_dir / "__pycache__").glob(HOST.stem + ".*.pyc")):
        sys.exit(f"bench-copy: no bytecode was written for {HOST.name} in {os_dir}")
    return deploy


def production_environment(**extra):
    environment = {key: value for key, value in os.environ.items() if key != "PYTHONDONTWRITEBYTECODE"}
    environment.update(extra)
    return environment


def make_image(path, size):
    with open(path, "wb") as handle:
        left = size
        while left:
            chunk = os.urandom(min(left, 16 * MIB))
            handle.write(chunk)
            left -= len(chunk)


def timed(argv, env=None):
    started = time.monotonic()
    result = subprocess.run(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    elapsed = time.monotonic() - started
    if result.returncode != 0:
        sys.exit(f"bench-copy: {' '.join(map(str, argv))} failed: {result.stderr.decode()[-500:]}")
    return elapsed


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size-mib", type=int, default=2048)
    parser.add_argument("--rounds", type=int, default=11,
                        help="interleaved rounds (the machine is shared: more rounds, steadier medians)")
    parser.add_argument("--dir", default="/var/tmp", help="where the image and targets live")
    options = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench-copy: needs root (loop device)")
    size = options.size_mib * MIB
    work = Path(tempfile.mkdtemp(prefix="snf-bench-copy-", dir=options.dir))
    loop = None
    try:
        images = work / "images"
        images.mkdir()
        image = images / "bench.img"
        print(f"bench-copy: writing a {options.size_mib} MiB random image in {work}", flush=True)
        make_image(image, size)
        file_target = work / "target.file"
        loop_backing = work / "target.loop"
        for target in (file_target, loop_backing):
            with open(target, "wb") as handle:
                handle.truncate(size + 64 * MIB)
        loop = subprocess.run(["losetup", "--show", "-f", str(loop_backing)], capture_output=True,
                              text=True, check=True).stdout.strip()
        deploy = install_os_dir(work / "os")
        variants = work / "variants"
        variants.mkdir()
        (variants / "default.conf").write_text("")
        configs = {}
        for name, extra in (("default", ""), ("serial", 'COPY_OVERLAP="no"\n'),
                            ("writers", 'COPY_WRITERS="4"\n')):
            conf = work / f"conf-{name}"
            conf.write_text(f'IMAGE_DIR="{images}"\nVARIANTS_DIR="{variants}"\nPROGRESS_INTERVAL="600"\n'
                            + extra)
            configs[name] = production_environment(SNF_IMAGE_CONFIG=str(conf))
        subprocess.run(["cat", str(image)], stdout=subprocess.DEVNULL, check=True)   # warm page cache
        # Warm-up: allocate the (sparse) backing files once, so no tool pays for it in round 1.
        for target in (loop, file_target):
            timed(["dd", f"if={image}", f"of={target}", "bs=4M", "oflag=direct", "conv=notrunc,fsync",
                   "status=none"])

        def ours(target, overlap="default"):
            return [str(deploy), "--disk", str(target), "--img-id", "bench.img",
                    "--img-format", "diskdump", "--no-helper"], configs[overlap]

        def dd(target, block):
            return [shutil.which("dd") or "dd", f"if={image}", f"of={target}", f"bs={block}",
                    "oflag=direct", "conv=notrunc,fsync", "status=none"], None

        tools = {
            "ours": lambda t: ours(t),
            "ours (no overlap)": lambda t: ours(t, "serial"),
            "ours (4 writers)": lambda t: ours(t, "writers"),
            "dd bs=1M oflag=direct": lambda t: dd(t, "1M"),
            "dd bs=4M oflag=direct": lambda t: dd(t, "4M"),
        }
        targets = {"loop device": loop, "file": file_target}
        timed(*ours(file_target))     # ours once too: its bytecode is then read from a warm cache
        rates = {(t, name): [] for t in targets for name in tools}
        for round_number in range(options.rounds):
            for target_name, target in targets.items():
                order = list(tools)
                order = order[round_number % len(order):] + order[:round_number % len(order)]
                for name in order:
                    argv, env = tools[name](target)
                    elapsed = timed(argv, env)
                    rates[(target_name, name)].append(size / MIB / elapsed)
            print(f"bench-copy: round {round_number + 1}/{options.rounds} done", flush=True)
        print()
        print(f"{'target':<12} {'tool':<24} {'median MiB/s':>12}   runs")
        ratios = []
        for target_name in targets:
            medians = {}
            for name in tools:
                values = rates[(target_name, name)]
                medians[name] = statistics.median(values)
                print(f"{target_name:<12} {name:<24} {medians[name]:>12.0f}   "
                      + " ".join(f"{v:.0f}" for v in values))
            best_dd = max(medians["dd bs=1M oflag=direct"], medians["dd bs=4M oflag=direct"])
            ratio = medians["ours"] / best_dd
            ratios.append(ratio)
            # the same ratio per round (neighbours in time), robust against a busy machine
            paired = statistics.median(
                ours / max(dd1, dd4) for ours, dd1, dd4 in zip(rates[(target_name, "ours")],
                                                               rates[(target_name, "dd bs=1M oflag=direct")],
                                                               rates[(target_name, "dd bs=4M oflag=direct")]))
            overlap_gain = medians["ours"] / medians["ours (no overlap)"]
            writers_gain = medians["ours (4 writers)"] / medians["ours"]
            print(f"{target_name:<12} ratio ours / better dd = {ratio:.2f} (median of per-round ratios "
                  f"{paired:.2f}); overlap vs none: {overlap_gain:.2f}x; 4 writers vs 1: {writers_gain:.2f}x")
        print()
        print("bench-copy: median throughput ratio ours / better dd: "
              + ", ".join(f"{name} {r:.2f}" for name, r in zip(targets, ratios))
              + "  (goal >= 1.0)")
        return 0
    finally:
        if loop:
            subprocess.run(["losetup", "-d", loop], check=False)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
