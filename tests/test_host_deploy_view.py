"""`deploy` on a terminal shows a bar for the copy and the helper's tasks as
they run; into a pipe it prints the plain, timestamped log. The terminal is
a real pseudo-terminal (os.openpty) as stderr of the real program."""

import os
import re
import sys

import pytest

from conftest import REPO, require_programs, require_root, run_on_terminal
from host_testlib import Site

HOST = REPO / "snf-image-host.py"
MIB = 1 << 20
TIMESTAMPED = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d (INFO|WARNING): ", re.M)


def deploy_on_terminal(site, *args, timeout=900):
    """Run deploy with a pseudo-terminal as stderr; (exit status, what it showed)."""
    return run_on_terminal([sys.executable, str(HOST), "deploy", *map(str, args)],
                           env=site.env(COLUMNS="80"), streams=("stderr",), timeout=timeout)


def rendered(shown):
    """What stays on screen: each \\r-rewritten line reduced to its last version."""
    lines = []
    for raw in shown.replace("\r\n", "\n").split("\n"):
        lines.append(raw.split("\r")[-1].replace("\x1b[K", ""))
    return lines


@pytest.fixture
def copy_site(tmp_path):
    site = Site(tmp_path / "site", PROGRESS_INTERVAL="0.01", COPY_BUFFER_SIZE="256K")
    (site.images / "big.img").write_bytes(os.urandom(48 * MIB))
    disk = tmp_path / "disk"
    with open(disk, "wb") as handle:
        handle.truncate(64 * MIB)
    return site, disk


def test_terminal_shows_a_copy_bar_not_the_log(copy_site):
    site, disk = copy_site
    code, shown = deploy_on_terminal(site, "--disk", disk, "--img-id", "big.img",
                                     "--img-format", "diskdump", "--no-helper")
    assert code == 0, shown
    assert "\r\x1b[K" in shown, "the bar is rewritten in place"
    assert not TIMESTAMPED.search(shown) and "[MONITOR]" not in shown
    screen = rendered(shown)
    bars = [line for line in screen if line.startswith("copy [")]
    assert len(bars) == 1, screen
    assert re.fullmatch(r"copy \[#+\] 100\.0%  48\.0 MiB of 48\.0 MiB  \d+ MiB/s", bars[0]), bars
    assert len(bars[0]) <= 80
    assert shown.count("copy [") > 2, "the bar moved during the copy"
    assert any(line.startswith("Image copied; --no-helper given") for line in screen)


def test_pipe_and_plain_get_the_timestamped_log(copy_site):
    site, disk = copy_site
    result = site.deploy("--disk", disk, "--img-id", "big.img", "--img-format", "diskdump",
                         "--no-helper")
    log = result.stderr.decode()
    assert result.returncode == 0, log
    assert TIMESTAMPED.search(log) and "[MONITOR]" in log and "\x1b" not in log
    code, shown = deploy_on_terminal(site, "--disk", disk, "--img-id", "big.img",
                                     "--img-format", "diskdump", "--no-helper", "--plain")
    assert code == 0 and TIMESTAMPED.search(shown) and "copy [" not in shown


def test_terminal_error_ends_with_the_one_line_cause(copy_site):
    site, disk = copy_site
    code, shown = deploy_on_terminal(site, "--disk", disk, "--img-id", "missing.img",
                                     "--img-format", "diskdump", "--no-helper")
    screen = [line for line in rendered(shown) if line.strip()]
    assert code == 1 and screen[-1].startswith("ERROR: deployment of") and "missing.img" in screen[-1]


@pytest.mark.qemu
@pytest.mark.slow
def test_terminal_shows_each_task_as_it_runs(tmp_path, helper_vm_dir):
    require_root()
    require_programs("qemu-system-x86_64", "mmdebstrap")
    from images import IMAGES_DIR, debian_image
    image = debian_image("mbr")
    site = Site(tmp_path / "site", IMAGE_DIR=IMAGES_DIR, HELPER_DIR=helper_vm_dir,
                HELPER_SOFT_TIMEOUT="15m")
    disk = tmp_path / "disk"
    with open(disk, "wb") as handle:
        handle.truncate(os.path.getsize(image) + 256 * MIB)
    code, shown = deploy_on_terminal(
        site, "--disk", disk, "--hostname", "view.example.org", "--img-id", image.name,
        "--img-format", "diskdump",
        "--img-properties", '{"OSFAMILY": "linux", "ROOT_PARTITION": "1"}')
    screen = rendered(shown)
    assert code == 0, "\n".join(screen[-30:])
    tasks = [m.group(1) for line in screen if (m := re.fullmatch(r"  task (\w+) done \(\d+\.\d s\)", line))]
    assert tasks[:3] == ["FixPartitionTable", "FilesystemResizeUnmounted", "MountImage"], screen
    assert "AssignHostname" in tasks and tasks[-1] in ("UmountImage", "FilesystemResizeAfterUmount")
    assert "  task MountImage ..." in shown, "a running task is shown before it ends"
    assert any(line.startswith("copy [") and "100.0%" in line for line in screen)
    assert screen[-2] == "Image customization finished successfully." or \
        "Image customization finished successfully." in screen
    assert not TIMESTAMPED.search(shown) and "HELPER: " not in shown
