"""The Debian package as an operator uses it, on this machine: `make deb`,
lintian without errors, `dpkg -i` (files in place, conffiles, the postinst
saying how to get the helper and never building it), the real Ganeti cluster
of tests/ganeti listing the packaged OS as valid and creating an instance
through it, `dpkg -r` keeping configuration and data, `dpkg -P` removing
both the package's files and its configuration.

Everything the test changes is put back: files the package would own that
exist beforehand (and a `make install` copy of the OS in /srv/ganeti/os,
which Ganeti would find first) are moved aside and restored, and the
package is purged at the end whatever happened.
"""

import contextlib
import os
import re
import subprocess
import time
from pathlib import Path

import pytest

from conftest import REPO, load_script, require, require_programs, require_root
from test_ganeti import (OS_NAME, cluster, disk_size_for, gnt_instance_add, image_params,
                         instance, read_guest_file, root_partition, timed, timings)

pytestmark = [pytest.mark.ganeti, pytest.mark.slow, pytest.mark.qemu, pytest.mark.root]

MODULE_FIXTURES = (cluster, timings)    # the Ganeti suite's cluster, shared
VERSION = load_script("snf-image-host.py").SNF_IMAGE_VERSION
PACKAGE = "snf-image"
OS_DIR = Path("/usr/share/ganeti/os/snf-image")
BUILDER = Path("/usr/sbin/snf-image-update-helper")
CONFFILES = [Path("/etc/default/snf-image"), Path("/etc/default/snf-image-update-helper"),
             Path("/etc/ganeti/snf-image/variants/default.conf")]
DATA_DIR = Path("/var/lib/snf-image")
PACKAGED_HELPER_DIR = DATA_DIR / "helper"
# what the package owns or purges, and the OS that would shadow it: moved aside
MOVED_ASIDE = [*CONFFILES, Path("/etc/ganeti/snf-image"), Path("/etc/snf-image"),
               PACKAGED_HELPER_DIR, Path("/srv/ganeti/os/snf-image")]
DPKG_LOCK_WAIT = 600


def dpkg(*argv):
    """dpkg, waiting while another package manager on the machine holds its lock."""
    deadline = time.monotonic() + DPKG_LOCK_WAIT
    while True:
        result = subprocess.run(["dpkg", *argv], capture_output=True, text=True,
                                stdin=subprocess.DEVNULL, timeout=600,
                                env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"))
        if result.returncode == 0 or "lock" not in result.stderr or time.monotonic() > deadline:
            return result
        time.sleep(5)


def package_status():
    result = subprocess.run(["dpkg-query", "-W", "-f=${Status}", PACKAGE], capture_output=True,
                            text=True)
    return result.stdout if result.returncode == 0 else "not-installed"


@contextlib.contextmanager
def moved_aside(paths):
    saved = []
    try:
        for path in paths:
            if path.exists() or path.is_symlink():
                parking = path.with_name(path.name + ".saved-by-snf-image-test")
                assert not parking.exists(), f"{parking} exists: an earlier run did not restore it"
                path.rename(parking)
                saved.append((path, parking))
        yield
    finally:
        for path, parking in reversed(saved):
            if path.is_dir() and not path.is_symlink():
                subprocess.run(["rm", "-rf", str(path)], check=False)
            elif path.exists() or path.is_symlink():
                path.unlink()
            path.parent.mkdir(parents=True, exist_ok=True)
            parking.rename(path)


@pytest.fixture(scope="module")
def deb(tmp_path_factory):
    require_root()
    require_programs("dpkg-deb", "dpkg", "lintian", "make")
    require(package_status() == "not-installed",
            f"the {PACKAGE} package is installed on this machine; the test would replace it")
    out = tmp_path_factory.mktemp("deb")
    result = subprocess.run(["make", "-s", "-C", str(REPO), "deb", f"DEBDIR={out}"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    path = out / f"{PACKAGE}_{VERSION}_all.deb"
    assert result.stdout.strip().endswith(path.name) and path.is_file()
    return path


@pytest.fixture(scope="module")
def machine_restored(deb):
    """Whatever the scenario does, the package is purged and the machine's
    own files are back at the end; the data directory is removed if the
    test created it."""
    data_existed = DATA_DIR.exists()
    with moved_aside(MOVED_ASIDE):
        try:
            yield
        finally:
            if package_status() != "not-installed":
                dpkg("--purge", PACKAGE)
            if not data_existed:
                subprocess.run(["rm", "-rf", str(DATA_DIR)], check=False)


def test_lintian_reports_no_error(deb):
    result = subprocess.run(["lintian", "--no-cfg", str(deb)], capture_output=True, text=True,
                            timeout=600)
    errors = [line for line in result.stdout.splitlines() if line.startswith("E:")]
    assert errors == [], result.stdout
    assert result.returncode == 0, result.stdout + result.stderr


def test_package_metadata_and_files_follow_make_install(deb):
    control = subprocess.run(["dpkg-deb", "-f", str(deb)], capture_output=True, text=True,
                             check=True).stdout
    fields = dict(re.findall(r"^(\S+): (.*)$", control, re.M))
    assert fields["Package"] == PACKAGE and fields["Version"] == VERSION
    assert fields["Architecture"] == "all"
    depends = fields["Depends"]
    for needed in ("python3", "qemu-system-x86", "e2fsprogs"):
        assert needed in depends
    assert "multistrap" not in depends and "multistrap" in fields["Suggests"]
    listing = subprocess.run(["dpkg-deb", "-c", str(deb)], capture_output=True, text=True,
                             check=True).stdout
    files = {line.split()[-1].lstrip(".") for line in listing.splitlines()}
    for name in ("create", "import", "export", "rename", "verify", "ganeti_api_version",
                 "variants.list", "parameters.list", "snf-image-host.py"):
        assert f"{OS_DIR}/{name}" in files
    for name in ("snf-image-helper.py", "tasks.d/10FixPartitionTable", "tasks.d/snf_image_tasklib.py"):
        assert f"/usr/share/snf-image/helper/{name}" in files
    assert str(BUILDER) in files and "/usr/share/doc/snf-image/copyright" in files
    assert not [name for name in files if "__pycache__" in name]
    conffiles = subprocess.run(["dpkg-deb", "--ctrl-tarfile", str(deb)], capture_output=True,
                               check=True).stdout
    import io
    import tarfile
    with tarfile.open(fileobj=io.BytesIO(conffiles)) as control_tar:
        listed = control_tar.extractfile("./conffiles").read().decode().split()
    assert sorted(listed) == sorted(map(str, CONFFILES))


def test_install_list_create_remove_purge(deb, machine_restored, cluster, timings, tmp_path):
    # --- dpkg -i: files in place; the postinst says how to get the helper, builds nothing
    result = dpkg("-i", str(deb))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "snf-image-update-helper -y" in result.stdout
    assert not PACKAGED_HELPER_DIR.joinpath("current").exists()
    assert package_status() == "install ok installed"
    for path in CONFFILES + [OS_DIR / "create", OS_DIR / "verify", BUILDER]:
        assert path.exists(), path
    assert list((OS_DIR / "__pycache__").glob("snf-image-host.*.pyc")), "postinst compiles"
    help_text = subprocess.run([str(BUILDER), "-h"], capture_output=True, text=True).stdout
    assert all(option in help_text for option in ("-y", "-f", "-u URL", "HELPER_URL"))
    check = subprocess.run([str(BUILDER), "--check"], capture_output=True, text=True)
    assert check.returncode == 1 and "is missing" in check.stderr

    # --- Ganeti finds the packaged OS, valid, in its search path
    diagnose = cluster.gnt("gnt-os", "diagnose").stdout
    assert re.search(rf"^OS: {OS_NAME} \[global status: valid\]$", diagnose, re.M), diagnose
    assert re.search(rf"status: valid \(path: {OS_DIR}\)", diagnose), diagnose

    # --- verify refuses the add while this node has no helper: one line, the node named
    name = instance(7)
    deployable = packaged_site_ready(tmp_path)
    params = image_params(deployable)
    refused = subprocess.run(gnt_instance_add(cluster, name, params,
                                              disk_mib=disk_size_for(deployable)),
                             capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=600)
    assert refused.returncode != 0
    assert "the helper VM in HELPER_DIR" in refused.stdout + refused.stderr
    assert name not in cluster.instances()

    # --- the packaged builder fetches a site's export (file://, sha256 checked);
    # then an instance is created through the packaged OS
    fetched = subprocess.run([str(BUILDER), "-y", "-u", deployable["helper_url"]],
                             capture_output=True, text=True, timeout=600)
    assert fetched.returncode == 0, fetched.stdout + fetched.stderr
    with timed(timings, f"gnt-instance add {name} (packaged OS)"):
        added = subprocess.run(gnt_instance_add(cluster, name, params,
                                                disk_mib=disk_size_for(deployable)),
                               capture_output=True, text=True, stdin=subprocess.DEVNULL,
                               timeout=1800)
    assert added.returncode == 0, added.stdout + added.stderr
    (disk,) = cluster.disk_paths(name)
    _table, root = root_partition(disk)
    assert read_guest_file(disk, "/etc/hostname", root["start"]).split() == [name]
    cluster.remove(name)

    # --- dpkg -r: program files gone, configuration and data kept
    kept_image = DATA_DIR / "kept-by-remove.img"
    kept_image.write_bytes(b"an administrator's image")
    result = dpkg("-r", PACKAGE)
    assert result.returncode == 0, result.stdout + result.stderr
    assert package_status() == "deinstall ok config-files"
    assert not OS_DIR.exists() and not BUILDER.exists()
    assert all(path.exists() for path in CONFFILES)
    assert kept_image.exists() and (PACKAGED_HELPER_DIR / "current" / "manifest.json").exists()
    helper_bytes = sum(p.stat().st_size for p in (PACKAGED_HELPER_DIR / "current").iterdir())
    assert helper_bytes > 10 << 20
    assert f"OS: {OS_NAME} " not in cluster.gnt("gnt-os", "diagnose").stdout

    # --- dpkg -P: configuration and the built helper gone, the images kept
    (CONFFILES[2].parent / "site.conf").write_text("# a variant an administrator added\n")
    result = dpkg("-P", PACKAGE)
    assert result.returncode == 0, result.stdout + result.stderr
    assert package_status() == "not-installed"
    assert not any(path.exists() for path in CONFFILES)
    assert not Path("/etc/ganeti/snf-image").exists() and not Path("/etc/snf-image").exists()
    assert not PACKAGED_HELPER_DIR.exists()
    assert kept_image.read_bytes() == b"an administrator's image"
    kept_image.unlink()


def packaged_site_ready(tmp_path):
    """The packaged /etc/default/snf-image pointed at the test image (TCG,
    generous timeouts), and the helper build of the tests exported as a site
    would publish it. Returns what the add and the fetch need."""
    from helpervm import built_helper_dir
    from images import debian_image
    export = tmp_path / "site-helper.tar"
    subprocess.run(["python3", str(REPO / "snf-image-update-helper.py"), "--helper-dir",
                    str(built_helper_dir()), "--export", str(export)], check=True,
                   capture_output=True, env=dict(os.environ, SNF_IMAGE_CONFIG="/dev/null"))
    image_dir = tmp_path / "images"
    image_dir.mkdir()
    image = Path(debian_image("mbr"))
    linked = image_dir / "debian-mbr.diskdump"
    try:
        os.link(image, linked)
    except OSError:
        import shutil
        shutil.copyfile(image, linked)
    image_dir.chmod(0o755)
    with open(CONFFILES[0], "a") as config:
        config.write(f'\n# test settings\nIMAGE_DIR="{image_dir}"\nHELPER_ACCEL="tcg"\n'
                     'HELPER_SOFT_TIMEOUT="900"\n')
    return {"img_id": linked.name, "image_size": linked.stat().st_size,
            "helper_url": export.as_uri()}
