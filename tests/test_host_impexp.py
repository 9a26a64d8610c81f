"""export / import / rename through the real os-def scripts with the
environment Ganeti 3 passes (once per disk, EXP_SIZE_FD on fd 11), compared
byte for byte; failure paths leave a clear last line."""

import os
import subprocess
import time

import pytest

from conftest import require_programs, require_root
import ganeti_env
from host_testlib import Site

MIB = 1024 * 1024
O_DIRECT = 0o40000


@pytest.fixture
def os_dir(tmp_path):
    return ganeti_env.install_os_dir(tmp_path / "os")


@pytest.fixture
def conf(tmp_path):
    return Site(tmp_path / "site").config


def run_script(os_dir, name, env, conf, **kwargs):
    env = dict(env, SNF_IMAGE_CONFIG=str(conf))
    return subprocess.run([str(os_dir / name)], env=env, cwd=os_dir, timeout=300, **kwargs)


def export_disk(os_dir, conf, disks, index, out_path):
    """Run export with a size pipe as EXP_SIZE_FD (Ganeti uses fd 11; any inherited fd works)."""
    size_read, size_write = os.pipe()
    try:
        with open(out_path, "wb") as out:
            result = run_script(os_dir, "export", ganeti_env.export_env(disks, index, size_fd=size_write),
                                conf, stdout=out, stderr=subprocess.PIPE, pass_fds=(size_write,))
    finally:
        os.close(size_write)
    announced = os.read(size_read, 100).decode()
    os.close(size_read)
    return result, announced


def test_export_import_round_trip_two_disks(tmp_path, os_dir, conf):
    sizes = [6 * MIB + 4096, 3 * MIB + 1]
    source = []
    for index, size in enumerate(sizes):
        path = tmp_path / f"src.disk{index}"
        path.write_bytes(os.urandom(size))
        source.append(path)
    target = []
    for index, size in enumerate(sizes):
        path = tmp_path / f"dst.disk{index}"
        path.write_bytes(b"\x99" * size)
        target.append(path)
    for index, size in enumerate(sizes):
        stream = tmp_path / f"stream{index}"
        result, announced = export_disk(os_dir, conf, source, index, stream)
        assert result.returncode == 0, result.stderr.decode()
        assert announced == f"{size}\n"
        assert stream.read_bytes() == source[index].read_bytes()
        with open(stream, "rb") as stdin:
            result = run_script(os_dir, "import", ganeti_env.import_env(target, index), conf,
                                stdin=stdin, capture_output=True)
        assert result.returncode == 0, result.stderr.decode()
        assert target[index].read_bytes() == source[index].read_bytes()
        assert os.path.getsize(target[index]) == size


@pytest.mark.root
def test_export_import_loop_devices(tmp_path, os_dir, conf):
    require_root()
    require_programs("losetup")
    src_file, dst_file = tmp_path / "src", tmp_path / "dst"
    src_file.write_bytes(os.urandom(4 * MIB))
    dst_file.write_bytes(bytes(4 * MIB))
    devices = []
    try:
        for backing in (src_file, dst_file):
            devices.append(subprocess.run(["losetup", "--show", "-f", str(backing)], capture_output=True,
                                          text=True, check=True).stdout.strip())
        stream = tmp_path / "stream"
        result, announced = export_disk(os_dir, conf, [devices[0]], 0, stream)
        assert result.returncode == 0 and announced == f"{4 * MIB}\n"
        with open(stream, "rb") as stdin:
            result = run_script(os_dir, "import", ganeti_env.import_env([devices[1]], 0), conf,
                                stdin=stdin, capture_output=True)
        assert result.returncode == 0, result.stderr.decode()
    finally:
        for device in devices:
            subprocess.run(["losetup", "-d", device], check=False)
    assert dst_file.read_bytes() == src_file.read_bytes()


def disk_fd_flags(pid, path, timeout=120):
    """open(2) flags of the fd that process pid holds on path for its data (from
    /proc/PID/fdinfo); the fd of the disk lock (O_NONBLOCK, read-only) is passed over."""
    deadline = time.monotonic() + timeout      # generous: the machine may be busy
    while time.monotonic() < deadline:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            fds = []
        for fd in fds:
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") == str(path):
                    text = open(f"/proc/{pid}/fdinfo/{fd}").read()
                    flags = int(text.split("flags:")[1].split()[0], 8)
                    if not flags & os.O_NONBLOCK:
                        return flags
            except OSError:
                continue
        time.sleep(0.05)
    return None


def test_export_uses_o_direct(tmp_path, os_dir, conf):
    """Export blocks on a full stdout pipe while we look at its disk fd's flags."""
    disk = tmp_path / "disk"
    data = os.urandom(16 * MIB)
    disk.write_bytes(data)
    process = subprocess.Popen([str(os_dir / "export")], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               env=dict(ganeti_env.export_env([disk], 0), SNF_IMAGE_CONFIG=str(conf)),
                               cwd=os_dir)
    try:
        flags = disk_fd_flags(process.pid, disk)
        out, _ = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    assert flags is not None and flags & O_DIRECT
    assert process.returncode == 0 and out == data


def test_import_uses_o_direct(tmp_path, os_dir, conf):
    """While import runs (stdin kept open), its disk fd carries O_DIRECT."""
    disk = tmp_path / "disk"
    disk.write_bytes(bytes(8 * MIB))
    process = subprocess.Popen([str(os_dir / "import")], stdin=subprocess.PIPE, stderr=subprocess.PIPE,
                               env=dict(ganeti_env.import_env([disk], 0), SNF_IMAGE_CONFIG=str(conf)),
                               cwd=os_dir)
    try:
        process.stdin.write(os.urandom(5 * MIB))
        process.stdin.flush()
        flags = disk_fd_flags(process.pid, disk)
        assert flags is not None and flags & O_DIRECT
    finally:
        process.stdin.close()
        process.wait(timeout=60)
    assert process.returncode == 0


def test_import_larger_than_disk_fails(tmp_path, os_dir, conf):
    disk = tmp_path / "disk"
    disk.write_bytes(bytes(MIB))
    result = run_script(os_dir, "import", ganeti_env.import_env([disk], 0), conf,
                        input=os.urandom(2 * MIB), capture_output=True)
    assert result.returncode == 1
    assert b"does not fit" in result.stderr.strip().splitlines()[-1]
    assert os.path.getsize(disk) == MIB


def test_export_missing_device_and_bad_api(tmp_path, os_dir, conf):
    env = ganeti_env.export_env([tmp_path / "missing"], 0)
    result = run_script(os_dir, "export", env, conf, capture_output=True)
    assert result.returncode == 1 and result.stdout == b""
    assert result.stderr.strip().splitlines()[-1].startswith(b"ERROR: cannot open disk 0")
    env["OS_API_VERSION"] = "10"
    result = run_script(os_dir, "export", env, conf, capture_output=True)
    assert result.returncode == 2


def test_rename_logs_the_change(tmp_path, os_dir, conf):
    disk = tmp_path / "disk"
    disk.write_bytes(bytes(4096))
    env = ganeti_env.rename_env([disk], "inst1.gnt.test", "inst2.gnt.test")
    result = run_script(os_dir, "rename", env, conf, capture_output=True, text=True)
    assert result.returncode == 0
    assert "inst1.gnt.test" in result.stderr and "inst2.gnt.test" in result.stderr
