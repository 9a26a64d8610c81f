#!/usr/bin/env python3
"""Copy benchmark (`make bench-copy`, part of `make bench`): snf-image-host.py's
copier against dd and qemu-img on the same loop device, in the same run.

Cases, each printed as median seconds per tool and the ratio of medians
(throughput of ours / baseline, higher is better), with the goals:
  sparse  a raw image of --sparse-mib (4 GiB) holding --data-mib (800 MiB) of
          random data in 4 MiB extents, the rest holes, onto a loop device whose
          old content is random (refilled before every run, so nobody can skip
          zeroing): against `dd bs=4M oflag=direct` (goal >= 3) and
          `qemu-img convert -n -t none` (goal >= 1);
  qcow2   the same image as qcow2 (ours: its map from qemu-img, the data by the
          copier), against `qemu-img convert -n -t none` of
          that qcow2 (goal >= 0.9);
  dense   a random image of --dense-mib (2 GiB): against dd bs=4M oflag=direct
          (goal >= 1.0, no regression);
  xz      pipelining: an xz-compressed image of --xz-mib (random data): ours
          against the shell pipeline `xz -dc -T0 | dd bs=4M oflag=direct`, and
          against the time of decompressing alone plus writing alone (what a
          serial copier would take) and the larger of the two (perfect overlap).
Every timed run starts from the same state, whatever ran before it: the
target's old random data written anew and the source read into the page
cache. (A tool that zeroes ranges leaves them unwritten or unallocated in the
loop device's file: the next tool to write there pays for allocating them,
the one after it overwrites blocks just written, twice as fast.)
The loop device passes direct I/O on to its file (losetup --direct-io=on), as
the disks of a Ganeti node (LVM, DRBD, files) take O_DIRECT writes. Buffered
(--buffered-loop), it copies every tool's direct writes into the page cache
and the final flush writes them all out: most of the time of a dense copy,
the same whatever the tool, and varying with the host disk's other load.
Tools run interleaved, round by round, in rotated order (the machine is shared):
medians over --rounds. Ours is started the way Ganeti starts it: the host
program installed with its bytecode next to a `deploy` wrapper made from
os-def/create, run as `deploy --no-helper` (process start-up included).
The sparse result is compared byte for byte with the image once.
Needs root (loop device). Uses about sparse + data + dense + 2 x xz MiB of
--dir, removed at the end.
"""

import argparse
import mmap
import os
import shutil
import signal
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
EXTENT = 4 * MIB
PATTERN = 64 * MIB      # the target's old data: this much random data, repeated


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


def write_random(handle, length):
    while length:
        chunk = os.urandom(min(length, 16 * MIB))
        handle.write(chunk)
        length -= len(chunk)


def make_sparse_image(path, size, data):
    """`data` bytes of random 4 MiB extents spread evenly over `size`, holes between."""
    extents = data // EXTENT
    stride = size // extents // EXTENT * EXTENT
    with open(path, "wb") as handle:
        handle.truncate(size)
        for index in range(extents):
            handle.seek(index * stride)
            write_random(handle, EXTENT)


def make_dense_image(path, size):
    with open(path, "wb") as handle:
        write_random(handle, size)


def run(argv, env=None, stdin=None):
    result = subprocess.run(argv, env=env, stdin=stdin, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    if result.returncode != 0:
        sys.exit(f"bench-copy: {' '.join(map(str, argv))} failed: {result.stderr.decode()[-500:]}")


def timed(argv, env=None):
    started = time.monotonic()
    run(argv, env)
    return time.monotonic() - started


def timed_shell(command):
    started = time.monotonic()
    subprocess.run(["sh", "-c", command], check=True, stdout=subprocess.DEVNULL)
    return time.monotonic() - started


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sparse-mib", type=int, default=4096)
    parser.add_argument("--data-mib", type=int, default=800)
    parser.add_argument("--dense-mib", type=int, default=2048)
    parser.add_argument("--xz-mib", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=5,
                        help="interleaved rounds (the machine is shared: more rounds, steadier medians)")
    parser.add_argument("--dir", default="/var/tmp", help="where the images and the loop device's file live")
    parser.add_argument("--buffered-loop", action="store_true",
                        help="the loop device writes its file through the page cache (no --direct-io)")
    options = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench-copy: needs root (loop device)")
    signal.signal(signal.SIGTERM, signal.default_int_handler)   # like Ctrl-C: report the rounds done, clean up
    for program in ("qemu-img", "dd", "losetup", "xz", "cmp"):
        if shutil.which(program) is None:
            sys.exit(f"bench-copy: needs {program}")
    sparse_size, dense_size = options.sparse_mib * MIB, options.dense_mib * MIB
    work = Path(tempfile.mkdtemp(prefix="snf-bench-copy-", dir=options.dir))
    loop = None
    try:
        images = work / "images"
        images.mkdir()
        print(f"bench-copy: load {Path('/proc/loadavg').read_text().strip()}; preparing images in {work}",
              flush=True)
        sparse = images / "sparse.img"
        make_sparse_image(sparse, sparse_size, options.data_mib * MIB)
        qcow2 = images / "sparse.qcow2"
        run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(sparse), str(qcow2)])
        dense = images / "dense.img"
        make_dense_image(dense, dense_size)
        xz_raw = work / "xz.raw"
        make_dense_image(xz_raw, options.xz_mib * MIB)
        xz_image = images / "packed.img.xz"
        with open(xz_image, "wb") as out:
            subprocess.run(["xz", "-0", "-T0", "-c", str(xz_raw)], stdout=out, check=True)
        xz_raw.unlink()
        pattern = work / "old-data"
        with open(pattern, "wb") as handle:
            write_random(handle, PATTERN)
        backing = work / "target.loop"
        with open(backing, "wb") as handle:
            handle.truncate(max(sparse_size, dense_size) + 64 * MIB)
        direct_io = "off" if options.buffered_loop else "on"
        loop = subprocess.run(["losetup", "--show", f"--direct-io={direct_io}", "-f", str(backing)],
                              capture_output=True, text=True, check=True).stdout.strip()
        if Path(f"/sys/block/{Path(loop).name}/loop/dio").read_text().strip() != ("0" if options.buffered_loop
                                                                                   else "1"):
            sys.exit(f"bench-copy: {loop} did not take --direct-io={direct_io}")
        deploy = install_os_dir(work / "os")
        variants = work / "variants"
        variants.mkdir()
        (variants / "default.conf").write_text("")
        conf = work / "snf-image.conf"
        conf.write_text(f'IMAGE_DIR="{images}"\nVARIANTS_DIR="{variants}"\nPROGRESS_INTERVAL="600"\n')
        environment = production_environment(SNF_IMAGE_CONFIG=str(conf))

        def refill(span):
            """Old random data over the first `span` bytes (the 64 MiB pattern repeated),
            written direct: no page cache of it is left for the next tool to drop."""
            fd = os.open(loop, os.O_WRONLY | os.O_DIRECT)
            try:
                with open(pattern, "rb") as source, mmap.mmap(-1, PATTERN) as block:
                    source.readinto(block)
                    with memoryview(block) as view:
                        for offset in range(0, span, PATTERN):
                            os.pwrite(fd, view[:span - offset], offset)
                os.fsync(fd)
            finally:
                os.close(fd)
            run(["sync"])       # nothing left for the host to write back during the timed run

        def ours(name):
            return [str(deploy), "--disk", loop, "--img-id", name, "--img-format", "diskdump", "--no-helper"]

        def dd(image):
            return ["dd", f"if={image}", f"of={loop}", "bs=4M", "oflag=direct", "conv=notrunc,fsync", "status=none"]

        def qemu_img(image, fmt):
            return ["qemu-img", "convert", "-n", "-f", fmt, "-O", "raw", "-t", "none", str(image), loop]

        def warm(image):
            """Every tool reads its source from the page cache."""
            run(["cat", str(image)], stdin=subprocess.DEVNULL)

        cases = {   # case: (source, bytes written onto the target, {tool: argv})
            "sparse": (sparse, sparse_size,
                       {"ours": ours("sparse.img"), "dd": dd(sparse), "qemu-img": qemu_img(sparse, "raw")}),
            "qcow2": (qcow2, sparse_size, {"ours": ours("sparse.qcow2"), "qemu-img": qemu_img(qcow2, "qcow2")}),
            "dense": (dense, dense_size, {"ours": ours("dense.img"), "dd": dd(dense)}),
        }
        # correctness once, and a warm-up of every path
        refill(sparse_size)
        warm(sparse)
        timed(ours("sparse.img"), environment)
        run(["cmp", "-n", str(sparse_size), str(sparse), loop])
        print("bench-copy: the sparse copy over old random data reads back as the image", flush=True)
        warm(qcow2)
        timed(ours("sparse.qcow2"), environment)
        run(["cmp", "-n", str(sparse_size), str(sparse), loop])

        times = {(case, tool): [] for case, (_, _, tools) in cases.items() for tool in tools}
        xz_times = {"ours (xz image)": [], "xz -dc | dd": [], "decompress only": [], "write only": []}
        xz_write_image = work / "xz-plain.img"
        xz_size = options.xz_mib * MIB
        subprocess.run(["sh", "-c", f"xz -dc {xz_image} > {xz_write_image}"], check=True)
        os.link(xz_write_image, images / "xz-plain.img")
        try:
            for round_number in range(options.rounds):
                runs = [(case, tool) for case, (_, _, tools) in cases.items() for tool in tools]
                shift = round_number % len(runs)
                for case, tool in runs[shift:] + runs[:shift]:
                    source, span, tools = cases[case]
                    refill(span)
                    warm(source)
                    times[(case, tool)].append(timed(tools[tool], environment if tool == "ours" else None))
                refill(xz_size)
                warm(xz_image)
                xz_times["ours (xz image)"].append(timed(ours("packed.img.xz"), environment))
                refill(xz_size)
                warm(xz_image)
                xz_times["xz -dc | dd"].append(timed_shell(
                    f"xz -dc -T0 {xz_image} | dd of={loop} bs=4M iflag=fullblock oflag=direct conv=notrunc,fsync "
                    "status=none"))
                xz_times["decompress only"].append(timed_shell(f"xz -dc -T0 {xz_image} > /dev/null"))
                refill(xz_size)
                warm(xz_write_image)
                xz_times["write only"].append(timed(ours("xz-plain.img"), environment))
                print(f"bench-copy: round {round_number + 1}/{options.rounds} done", flush=True)

        except KeyboardInterrupt:
            done = min(len(values) for values in (*times.values(), *xz_times.values()))
            if not done:
                raise
            for values in (*times.values(), *xz_times.values()):
                del values[done:]
            print(f"bench-copy: interrupted: medians of the {done} complete rounds")
        print()
        print(f"{'case':<8} {'tool':<18} {'median s':>9}   runs (s)")
        medians = {}
        for (case, tool), values in times.items():
            medians[(case, tool)] = statistics.median(values)
            print(f"{case:<8} {tool:<18} {medians[(case, tool)]:>9.2f}   " + " ".join(f"{v:.2f}" for v in values))
        for name, values in xz_times.items():
            print(f"{'xz':<8} {name:<18} {statistics.median(values):>9.2f}   " + " ".join(f"{v:.2f}" for v in values))
        print()

        def ratio(case, baseline):
            return medians[(case, baseline)] / medians[(case, "ours")]

        print(f"bench-copy: sparse {options.sparse_mib} MiB image holding {options.data_mib} MiB, over old "
              f"random data: ours / dd = {ratio('sparse', 'dd'):.2f} (goal >= 3), "
              f"ours / qemu-img = {ratio('sparse', 'qemu-img'):.2f} (goal >= 1)")
        print(f"bench-copy: the same as qcow2: ours / qemu-img = {ratio('qcow2', 'qemu-img'):.2f} (goal >= 0.9)")
        print(f"bench-copy: dense {options.dense_mib} MiB image: ours / dd = {ratio('dense', 'dd'):.2f} "
              "(goal >= 1.0)")
        decompress = statistics.median(xz_times["decompress only"])
        write = statistics.median(xz_times["write only"])
        packed = statistics.median(xz_times["ours (xz image)"])
        pipeline = statistics.median(xz_times["xz -dc | dd"])
        print(f"bench-copy: xz image of {options.xz_mib} MiB: xz -dc | dd / ours = {pipeline / packed:.2f}")
        print(f"bench-copy: xz image of {options.xz_mib} MiB: ours {packed:.2f} s against decompress + write "
              f"{decompress + write:.2f} s (serial; ratio {(decompress + write) / packed:.2f}) and "
              f"max(decompress, write) {max(decompress, write):.2f} s (perfect overlap; ratio "
              f"{max(decompress, write) / packed:.2f})")
        print(f"bench-copy: load at the end {Path('/proc/loadavg').read_text().strip()}")
        return 0
    finally:
        if loop:
            subprocess.run(["losetup", "-d", loop], check=False)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
