"""One /etc/default/snf-image, two readers: the host program (`verify`, as
Ganeti calls it) and the helper builder (snf-image-update-helper) read every
file of one corpus through their real entry points and give the same
verdict: the same one-line error with exit status 2, or the same warnings
and on to their real work."""

import os
import re
import subprocess
import sys

import pytest

from conftest import REPO

# (file text, None when both accept it, else a fragment of the one-line error)
CORPUS = [
    ('DHCP_TAGS="auto\ndhcp"\nHELPER_MEMORY=300\n', None),                   # quoted value over two lines
    ("IMAGE_DIR='/srv/$HOME'\n", None),                                     # single quotes: literal
    ('export HELPER_MEMORY=512   # comment\n', None),
    ('HELPER_DEBIAN_MIRROR="http://deb.example/debian/"\n', None),
    ('QUOTED="a \\"b\\" c"\nEMPTY=\n', None),
    ('HELPER_SOFT_TIMOUT=10\nMULTISTRAP_CONFG=/x\n', None),                  # misspelt: warned, not fatal
    ('VERSION_CHECK="yes"\n', None),                                         # deprecated: warned
    ('IMAGE_DIR="/srv/$HOME"\n', "expansion is not supported"),
    ('HELPER_MEMORY=-5\n', "HELPER_MEMORY='-5'"),
    ('HELPER_MEMORY="12 MiB"\n', "HELPER_MEMORY="),
    ('HELPER_DIR=/a /b\n', "quote it"),
    ("HELPER_USER='unterminated\n", "missing closing '"),
    ('HELPER_DEBIAN_SUITE="tri xie;rm"\n', "HELPER_DEBIAN_SUITE"),
    ('HELPER_DEBIAN_MIRROR="mirror.example.org/debian"\n', "HELPER_DEBIAN_MIRROR"),
    ('QEMU=""\nMKFS_EXT4="  "\n', "MKFS_EXT4"),
    ('HELPER_ACCEL=fast\n', "HELPER_ACCEL"),
    ('this is not an assignment\n', "line 1"),
    ('HELPER_DIR="/a" trailing\n', "after the closing quote"),
]


def run_host(config, tmp_path):
    env = {"PATH": "/usr/bin:/bin", "SNF_IMAGE_CONFIG": str(config), "OS_API_VERSION": "20",
           "OSP_IMG_ID": "debian", "OSP_IMG_FORMAT": "diskdump"}
    return subprocess.run([sys.executable, str(REPO / "snf-image-host.py"), "verify", "parameters"],
                          env=env, capture_output=True, text=True, timeout=60, cwd=tmp_path)


def configuration_accepted(result):
    """verify went past the configuration: it succeeded, or it stopped only at
    the node's helper check that follows (this machine's HELPER_DIR may hold none)."""
    last = result.stderr.strip().splitlines()[-1] if result.stderr.strip() else ""
    return result.returncode == 0 or (result.returncode == 1 and "the helper VM in HELPER_DIR" in last)


def run_builder(config, tmp_path):
    env = {"PATH": "/usr/bin:/bin", "SNF_IMAGE_CONFIG": str(config)}
    argv = [sys.executable, str(REPO / "snf-image-update-helper.py"),
            "--helper-dir", str(tmp_path / "helper"), "--export", str(tmp_path / "helper.tar")]
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60, cwd=tmp_path)


def warnings_of(stderr):
    return [re.sub(r"^.*?WARNING: |^Warning: ", "", line) for line in stderr.splitlines()
            if "WARNING: " in line or line.startswith("Warning: ")]


@pytest.mark.parametrize("text, error", CORPUS)
def test_host_and_builder_agree(tmp_path, text, error):
    config = tmp_path / "snf-image"
    config.write_text(text)
    host, builder = run_host(config, tmp_path), run_builder(config, tmp_path)
    if error is None:
        assert configuration_accepted(host), host.stderr
        # past its configuration the builder does its real work: here, no helper to export
        assert builder.returncode == 1 and builder.stderr.splitlines()[-1].startswith("Error: no helper built")
        assert warnings_of(host.stderr) == warnings_of(builder.stderr)
        return
    for result, prefix in ((host, "ERROR: "), (builder, "Error: ")):
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1, result.stderr
        assert lines[0].startswith(prefix) and error in lines[0]
    assert host.stderr.strip()[len("ERROR: "):] == builder.stderr.strip()[len("Error: "):]
    assert not (tmp_path / "helper").exists()      # refused before anything is written


def test_the_null_device_means_no_configuration_and_a_fifo_is_refused(tmp_path):
    assert configuration_accepted(run_host("/dev/null", tmp_path))
    assert run_builder("/dev/null", tmp_path).stderr.startswith("Error: no helper built")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for result in (run_host(fifo, tmp_path), run_builder(fifo, tmp_path)):
        assert result.returncode == 2 and "is not a regular file" in result.stderr


def test_a_misspelt_key_names_the_closest_one_in_both(tmp_path):
    config = tmp_path / "snf-image"
    config.write_text("HELPER_SOFT_TIMOUT=10\nHELPER_DEBIAN_SUIT=bookworm\n")
    expected = ["configuration: unknown key HELPER_DEBIAN_SUIT (did you mean HELPER_DEBIAN_SUITE?)",
                "configuration: unknown key HELPER_SOFT_TIMOUT (did you mean HELPER_SOFT_TIMEOUT?)"]
    assert warnings_of(run_host(config, tmp_path).stderr) == expected
    assert warnings_of(run_builder(config, tmp_path).stderr) == expected
