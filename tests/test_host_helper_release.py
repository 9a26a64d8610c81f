"""The host refuses a node's helper that is missing, broken or older than
its snf-image before a deployment starts: in `verify` (which Ganeti runs on
every node of the instance before an add) and in `create`/`deploy` before the
disk is written, with one line naming the node and its problem. Releases are
small fake ones with real manifests; a successful check is remembered per
file identity, and a file written afterwards is checked again."""

import json
import os
import subprocess

import pytest

from conftest import load_script
from helpervm import current_fake_release
from host_testlib import Site, last_line
import ganeti_env

host = load_script("snf-image-host.py")
NODE = os.uname().nodename


@pytest.fixture
def run_dir(tmp_path, monkeypatch):
    path = tmp_path / "run"
    monkeypatch.setattr(host, "RUN_DIR", path)
    return path


def damaged(helper_dir, damage):
    release = current_fake_release(helper_dir)
    if damage == "older":
        manifest = json.loads((release / "manifest.json").read_text())
        manifest["snf_image_version"] = "0.23.1"
        (release / "manifest.json").write_text(json.dumps(manifest))
    elif damage == "no-manifest":
        (release / "manifest.json").unlink()
    elif damage == "bad-manifest":
        (release / "manifest.json").write_text("{")
    elif damage == "altered":
        with open(release / "image", "r+b") as stream:
            stream.write(b"X")
    elif damage == "no-initrd":
        (release / "initrd").unlink()
    elif damage == "no-vmlinuz":
        (release / "vmlinuz").unlink()
    return release


PROBLEMS = [
    ("missing", "is missing (kernel, initrd, image not found)"),
    ("no-initrd", "is missing (initrd not found)"),
    ("no-manifest", "is broken (no manifest.json)"),
    ("bad-manifest", "is broken (unreadable manifest.json)"),
    ("altered", "is broken (image does not match its sha256 in manifest.json)"),
    ("no-vmlinuz", "is broken (vmlinuz listed in manifest.json is missing)"),
    ("older", f"is older than this node's snf-image (built for 0.23.1, the node runs {host.SNF_IMAGE_VERSION})"),
]


@pytest.mark.parametrize("damage, problem", PROBLEMS)
def test_each_problem_is_named(tmp_path, run_dir, damage, problem):
    helper_dir = tmp_path / "helper"
    if damage != "missing":
        damaged(helper_dir, damage)
    with pytest.raises(host.SnfError) as raised:
        host.resolve_helper(str(helper_dir))
    message = str(raised.value)
    assert message.startswith(f"node {NODE}: the helper VM in HELPER_DIR {helper_dir} {problem}")
    assert "snf-image-update-helper -y" in message and "\n" not in message


def test_healthy_and_newer_releases_are_accepted(tmp_path, run_dir):
    release = current_fake_release(tmp_path / "a")
    assert host.resolve_helper(str(tmp_path / "a")) == str(release)
    newer = current_fake_release(tmp_path / "b", version="99.0")
    assert host.resolve_helper(str(tmp_path / "b")) == str(newer)


def test_a_verified_release_is_not_read_again_until_a_file_changes(tmp_path, run_dir, monkeypatch):
    release = current_fake_release(tmp_path / "helper")
    assert host.helper_release_problem(str(release)) is None
    assert [p.name for p in run_dir.iterdir()][0].startswith("helper-verified-")
    assert oct(run_dir.stat().st_mode & 0o777) == "0o700"
    opened = []
    real_open = open

    def counting_open(path, *args, **kwargs):
        opened.append(os.path.basename(str(path)))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr("builtins.open", counting_open)
    assert host.helper_release_problem(str(release)) is None
    assert "image" not in opened, "the remembered check must not read the files again"
    monkeypatch.undo()
    monkeypatch.setattr(host, "RUN_DIR", run_dir)
    # the same size, the same mtime, one byte changed: ctime tells
    stat = (release / "image").stat()
    with open(release / "image", "r+b") as stream:
        stream.write(b"Y")
    os.utime(release / "image", ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert "image does not match" in host.helper_release_problem(str(release))


def run_verify(tmp_path, helper_dir, osparams):
    variants = tmp_path / "variants"
    variants.mkdir(exist_ok=True)
    (variants / "default.conf").write_text("")
    conf = tmp_path / "snf-image.conf"
    conf.write_text(f'VARIANTS_DIR="{variants}"\nHELPER_DIR="{helper_dir}"\n')
    env = ganeti_env.verify_env(osparams)
    env["SNF_IMAGE_CONFIG"] = str(conf)
    os_dir = ganeti_env.install_os_dir(tmp_path / "os")
    return subprocess.run([str(os_dir / "verify"), "parameters"], env=env, capture_output=True,
                          text=True, cwd=os_dir, timeout=60)


GOOD = {"img_id": "debian.img", "img_format": "diskdump", "img_passwd": "Canary-Verify-51"}


@pytest.mark.parametrize("damage, problem", [PROBLEMS[0], PROBLEMS[4], PROBLEMS[6]])
def test_verify_reports_the_nodes_helper_in_one_line(tmp_path, damage, problem):
    helper_dir = tmp_path / "helper"
    if damage != "missing":
        damaged(helper_dir, damage)
    result = run_verify(tmp_path, helper_dir, GOOD)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"ERROR: node {NODE}: the helper VM")
    assert problem in lines[0] and "Canary-Verify-51" not in result.stderr + result.stdout


def test_verify_reports_bad_parameters_before_the_helper(tmp_path):
    result = run_verify(tmp_path, tmp_path / "no-helper", dict(GOOD, img_format="qcow2"))
    assert result.returncode == 2 and "img_format" in result.stderr.strip().splitlines()[-1]
    current_fake_release(tmp_path / "helper")
    assert run_verify(tmp_path, tmp_path / "helper", GOOD).returncode == 0


@pytest.mark.parametrize("damage, problem", [PROBLEMS[4], PROBLEMS[6]])
def test_deploy_refuses_before_the_disk_is_written(tmp_path, damage, problem):
    helper_dir = tmp_path / "helper"
    damaged(helper_dir, damage)
    site = Site(tmp_path / "site", HELPER_DIR=helper_dir)
    (site.images / "i.img").write_bytes(os.urandom(8192))
    disk = tmp_path / "disk"
    disk.write_bytes(bytes(65536))
    result = site.deploy("--disk", disk, "--img-id", "i.img", "--img-format", "diskdump")
    assert result.returncode == 1
    line = last_line(result)
    assert "did not complete" in line and f"node {NODE}" in line and problem in line
    assert disk.read_bytes() == bytes(65536)
