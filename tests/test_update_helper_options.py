"""The original snf-image-update-helper's command line on this builder: -y
(and the question asked on a terminal), -f, -u URL / HELPER_URL (fetching an
export over a real loopback HTTP server and file://, always checked against
its sha256), -c refused in one line, and --check reporting a missing, broken
or outdated helper in one line that names the node. No root, no qemu: the
releases are small fake ones; booting real releases is test_update_helper_vm's."""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, load_script, run_on_terminal
from helpervm import current_fake_release, fake_release

builder = load_script("snf-image-update-helper.py")
BUILDER = REPO / "snf-image-update-helper.py"
BUILD_ID = "20260101T000000Z-0123abcd"


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    """No site configuration leaks in: both configuration files are private."""
    (tmp_path / "snf-image.conf").write_text("")
    monkeypatch.setattr(builder.host_program, "RUN_DIR", tmp_path / "run")
    monkeypatch.setenv("SNF_IMAGE_CONFIG", str(tmp_path / "snf-image.conf"))
    monkeypatch.setenv("SNF_IMAGE_UPDATE_HELPER_CONFIG", str(tmp_path / "update-helper.conf"))
    return tmp_path


@pytest.fixture
def exported(isolated):
    """An export (tar.gz + .sha256) of a fake release, as a site publishes it."""
    source = isolated / "build-node"
    current_fake_release(source, BUILD_ID)
    archive = isolated / "www" / "helper.tar.gz"
    archive.parent.mkdir()
    assert builder.main(["--helper-dir", str(source), "--export", str(archive)]) == 0
    return archive


def run_main(*argv):
    return builder.main([str(arg) for arg in argv])


def installed_build_id(helper_dir):
    current = Path(helper_dir) / "current"
    return current.resolve().name if current.is_symlink() else None


def one_error_line(capsys):
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), lines
    return lines[0]


# --- --export writes the checksum every fetch verifies ------------------------

def test_export_writes_a_sha256sum_line_beside_the_archive(exported):
    line = Path(f"{exported}.sha256").read_text()
    assert line == f"{hashlib.sha256(exported.read_bytes()).hexdigest()}  helper.tar.gz\n"
    result = subprocess.run(["sha256sum", "-c", "helper.tar.gz.sha256"], cwd=exported.parent,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_import_checks_the_sha256_beside_the_file(exported, isolated, capsys):
    target = isolated / "node"
    data = bytearray(exported.read_bytes())
    data[len(data) // 2] ^= 1
    altered = isolated / "altered.tar.gz"
    altered.write_bytes(bytes(data))
    Path(f"{altered}.sha256").write_text(Path(f"{exported}.sha256").read_text())
    assert run_main("--helper-dir", target, "--import", altered) == 1
    assert "does not match its sha256" in one_error_line(capsys)
    assert installed_build_id(target) is None
    assert run_main("--helper-dir", target, "--import", exported) == 0
    assert installed_build_id(target) == BUILD_ID


# --- -u URL and HELPER_URL ------------------------------------------------------

def publish(http_server, archive, checksum_kind="ok", archive_kind="ok", checksum=None):
    http_server.serve("/helper/helper.tar.gz.sha256",
                      checksum if checksum is not None else Path(f"{archive}.sha256").read_bytes(),
                      checksum_kind)
    return http_server.serve("/helper/helper.tar.gz", archive.read_bytes(), archive_kind)


def test_fetch_over_http_installs_the_release(exported, isolated, http_server):
    url = publish(http_server, exported)
    target = isolated / "node"
    assert run_main("-y", "--helper-dir", target, "-u", url) == 0
    assert installed_build_id(target) == BUILD_ID
    for name in ("kernel", "initrd", "image", "manifest.json"):
        assert (target / "current" / name).read_bytes() == \
            (isolated / "build-node" / "releases" / BUILD_ID / name).read_bytes()
    assert not [p for p in (target / "releases").iterdir() if p.name.startswith(".")]


def test_fetch_over_file_url(exported, isolated):
    target = isolated / "node"
    assert run_main("--helper-dir", target, "--url", exported.as_uri()) == 0
    assert installed_build_id(target) == BUILD_ID


def test_helper_url_of_the_configuration_is_the_default_action(exported, isolated, http_server):
    url = publish(http_server, exported)
    (isolated / "update-helper.conf").write_text(f'# as the original\nHELPER_URL="{url}"\n')
    target = isolated / "node"
    assert run_main("-y", "--helper-dir", target) == 0
    assert installed_build_id(target) == BUILD_ID


@pytest.mark.parametrize("setup, message", [
    (dict(archive_kind="cut"), "download cut|does not match"),
    (dict(checksum=b"0" * 64 + b"  helper.tar.gz\n"), "does not match"),
    (dict(checksum=b"<html>not found</html>\n"), "holds no sha256"),
    (dict(checksum_kind="missing"), "HTTP 404"),
])
def test_bad_download_changes_nothing(exported, isolated, http_server, capsys, setup, message):
    target = isolated / "node"
    current_fake_release(target, "20250101T000000Z-00000001")
    if setup.get("checksum_kind") == "missing":
        url = http_server.serve("/helper/helper.tar.gz", exported.read_bytes())
    else:
        url = publish(http_server, exported, **setup)
    assert run_main("-y", "--helper-dir", target, "-u", url) == 1
    line = one_error_line(capsys)
    assert any(part in line for part in message.split("|")), line
    assert installed_build_id(target) == "20250101T000000Z-00000001"
    assert sorted(p.name for p in (target / "releases").iterdir()) == ["20250101T000000Z-00000001"]


def test_unusable_scheme_is_refused_in_one_line(isolated, capsys):
    assert run_main("--helper-dir", isolated / "node", "-u", "ftp://127.0.0.1/helper.tar") == 1
    assert "must be http://, https:// or file://" in one_error_line(capsys)


def test_credentials_in_the_url_are_never_shown(exported, isolated, http_server, capsys):
    url = publish(http_server, exported).replace("http://", "http://site:Canary-Pw-77@")
    target = isolated / "node"
    assert run_main("-y", "--helper-dir", target, "-u", url) == 0
    assert installed_build_id(target) == BUILD_ID
    missing = url.replace("helper.tar.gz", "absent.tar.gz")
    assert run_main("-y", "--helper-dir", target, "-u", missing) == 1
    shown = capsys.readouterr()
    assert "Canary-Pw-77" not in shown.out + shown.err and "HTTP 404" in shown.err


def test_original_helper_archive_is_refused_with_what_to_do(isolated, capsys):
    import tarfile
    original = isolated / "snf_image_helper_image-0.23.1.tar.xz"
    with tarfile.open(original, "w:xz") as tar:
        for name in ("version", "kernel", "initrd", "image"):
            (isolated / name).write_text("0.23.1\n")
            tar.add(isolated / name, name)
    assert run_main("--helper-dir", isolated / "node", "--import", original) == 1
    assert "helper of the original snf-image" in one_error_line(capsys)


# --- -f and -c -------------------------------------------------------------------

def test_force_installs_a_release_of_another_version(isolated, http_server, capsys):
    source = isolated / "old-node"
    current_fake_release(source, BUILD_ID, version="0.23.1")
    archive = isolated / "helper.tar.gz"
    assert run_main("--helper-dir", source, "--export", archive) == 0
    url = publish(http_server, archive)
    target = isolated / "node"
    assert run_main("-y", "--helper-dir", target, "-u", url) == 1
    assert "-f installs it anyway" in one_error_line(capsys)
    assert installed_build_id(target) is None
    assert run_main("-y", "-f", "--helper-dir", target, "-u", url) == 0
    assert installed_build_id(target) == BUILD_ID


def test_dash_c_is_refused_with_one_line_saying_what_to_use(isolated, capsys):
    assert run_main("-c", "--helper-dir", isolated / "node") == 2
    line = one_error_line(capsys)
    assert "always checked against its sha256" in line and "-u URL" in line


def test_actions_exclude_each_other(isolated, capsys):
    assert run_main("--helper-dir", isolated, "--build", "-u", "file:///x") == 1
    assert "exclude each other" in one_error_line(capsys)


# --- --check: a node's helper reported in one line ---------------------------------

@pytest.mark.parametrize("damage, message", [
    (None, "is missing (kernel, initrd, image not found)"),
    (lambda r: (r / "image").write_bytes(b"changed"),
     "is broken (image does not match its sha256 in manifest.json)"),
    (lambda r: (r / "initrd").unlink(), "is missing (initrd not found)"),
    ("old", "is older than this node's snf-image (built for 0.23.1"),
])
def test_check_names_the_node_and_its_problem(isolated, capsys, damage, message):
    helper_dir = isolated / "node"
    if damage == "old":
        current_fake_release(helper_dir, BUILD_ID, version="0.23.1")
    elif damage is not None:
        damage(current_fake_release(helper_dir, BUILD_ID))
    assert run_main("--helper-dir", helper_dir, "--check") == 1
    line = one_error_line(capsys)
    assert line.startswith(f"Error: node {os.uname().nodename}: the helper in {helper_dir}")
    assert message in line and "snf-image-update-helper -y" in line


# --- the question asked on a terminal ----------------------------------------------

def builder_on_terminal(argv, answer, env, timeout=60):
    """Run the builder on a pseudo-terminal; type `answer` once the question shows."""
    return run_on_terminal([sys.executable, str(BUILDER), *map(str, argv)], env=env,
                           reply=None if answer is None else ("[y/N]?", answer), timeout=timeout)


@pytest.mark.parametrize("answer, replaced", [("n", False), ("", False), ("maybe\ny", True),
                                              ("y", True)])
def test_terminal_asks_before_replacing_the_current_helper(exported, isolated, answer, replaced):
    target = isolated / "node"
    current_fake_release(target, "20250101T000000Z-00000001")
    env = dict(os.environ, SNF_IMAGE_CONFIG=str(isolated / "snf-image.conf"),
               SNF_IMAGE_UPDATE_HELPER_CONFIG=str(isolated / "update-helper.conf"))
    code, shown = builder_on_terminal(["--helper-dir", target, "--import", exported], answer, env)
    assert "replaces the current helper" in shown and "20250101T000000Z-00000001" in shown
    assert shown.count("Do you want to continue [y/N]?") == (2 if answer.startswith("maybe") else 1)
    assert installed_build_id(target) == (BUILD_ID if replaced else "20250101T000000Z-00000001")
    assert code == (0 if replaced else 1)
    if not replaced:
        assert "Abort." in shown


def test_yes_or_no_terminal_means_no_question(exported, isolated):
    env = dict(os.environ, SNF_IMAGE_CONFIG=str(isolated / "snf-image.conf"),
               SNF_IMAGE_UPDATE_HELPER_CONFIG=str(isolated / "update-helper.conf"))
    target = isolated / "node"
    current_fake_release(target, "20250101T000000Z-00000001")
    code, shown = builder_on_terminal(["-y", "--helper-dir", target, "--import", exported], None, env)
    assert code == 0 and "[y/N]" not in shown
    fake_release(isolated / "other", "20250101T000000Z-00000002")
    (isolated / "other" / "current").symlink_to("releases/20250101T000000Z-00000002")
    result = subprocess.run([sys.executable, str(BUILDER), "--helper-dir", str(isolated / "other"),
                             "--import", str(exported)], stdin=subprocess.DEVNULL,
                            capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode == 0 and "[y/N]" not in result.stdout
    assert json.loads((isolated / "other" / "current" / "manifest.json").read_text())["build_id"] == BUILD_ID
