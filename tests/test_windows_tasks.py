"""The Windows branches of the tasks, run on the host against real NTFS and
real hives: the system partition of a windows_disks.py test disk, copied
and mounted with lowntfs-3g ignore_case as the helper mounts it.  Also the
pieces on their own: the hive reader against hivexget, hivexsh rewrites that
keep every other value, the NetBIOS name rules, answer-file and sysprep.inf
editing.  The full deployments through the helper VM are in
test_windows_e2e.py."""

import json
import os
import shutil
import struct
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

import regf
from conftest import REPO, load_script, require_programs, require_root
from windows_disks import CONTROL_SET, partition_table, wait_for_fuse, windows_image

TASKS = REPO / "tasks.d"
load_script("snf-image-helper.py", "snf_image_helper")
sys.path.insert(0, str(TASKS))
import snf_image_windows as win  # noqa: E402
from snf_image_tasklib import ImageRoot, TaskError  # noqa: E402

PASSWORD = 'p&s|w<r>d^%"! x'
NS = {"u": "urn:schemas-microsoft-com:unattend"}


# --------------------------------------------------------------------------
# Pieces
# --------------------------------------------------------------------------

def sample_hive():
    names = [regf.Key(f"Sub{i:03d}") for i in range(40)]
    return regf.Key("ROOT", subkeys=[
        regf.Key("Select", values=[regf.dword("Current", 3)]),
        regf.Key("Many", subkeys=names),
        regf.Key("Terminal Server", values=[
            regf.string("ProductVersion", "10.0"), regf.dword("fDenyTSConnections", 0),
            regf.binary("Blob", bytes(range(200))), regf.binary("Tiny", b"\x01\x02"),
            regf.Value("", regf.REG_SZ, "default\0".encode("utf-16-le")),
            regf.string("Ünïcode name", "välue")])])


def test_hive_reader_agrees_with_hivexget(tmp_path):
    require_programs("hivexget")
    path = tmp_path / "SYSTEM"
    path.write_bytes(regf.build_hive(sample_hive()))
    hive = win.Hive(path.read_bytes())
    assert hive.dword("select", "CURRENT") == 3                 # case-insensitive, as Windows
    assert sorted(hive.subkeys("Many")) == [f"Sub{i:03d}" for i in range(40)]
    values = hive.values("Terminal Server")
    assert values["Blob"] == (regf.REG_BINARY, bytes(range(200)))
    assert values["Tiny"] == (regf.REG_BINARY, b"\x01\x02")
    assert hive.string("Terminal Server", "Ünïcode name") == "välue"
    for name, expected in (("ProductVersion", hive.string("Terminal Server", "ProductVersion")),
                           ("fDenyTSConnections",
                            str(hive.dword("Terminal Server", "fDenyTSConnections")))):
        shown = subprocess.run(["hivexget", str(path), "Terminal Server", name],
                               capture_output=True, text=True, check=True).stdout.strip()
        assert shown == expected
    with pytest.raises(TaskError, match="not a hive file"):
        win.Hive(b"not a hive" * 1000, "SOFTWARE")


def test_registry_rewrite_keeps_every_other_value(tmp_path):
    require_programs("hivexsh")
    (tmp_path / "config").mkdir()
    path = tmp_path / "config" / "SYSTEM"
    path.write_bytes(regf.build_hive(sample_hive()))
    before = win.Hive(path.read_bytes()).values("Terminal Server")
    with ImageRoot(tmp_path) as root:
        win.set_registry_values(root, "/config/SYSTEM", "Terminal Server",
                                {"FDENYTSCONNECTIONS": (regf.REG_DWORD, struct.pack("<I", 1)),
                                 "New": (regf.REG_DWORD, struct.pack("<I", 5))})
    after = win.Hive(path.read_bytes()).values("Terminal Server")
    assert list(after) == list(before) + ["New"]              # replaced in place, added last
    assert after["fDenyTSConnections"] == (regf.REG_DWORD, struct.pack("<I", 1))
    assert {k: v for k, v in after.items() if k not in ("fDenyTSConnections", "New")} == \
        {k: v for k, v in before.items() if k != "fDenyTSConnections"}
    shown = subprocess.run(["hivexget", str(path), "Terminal Server", "fDenyTSConnections"],
                           capture_output=True, text=True, check=True).stdout.strip()
    assert shown == "1"


@pytest.mark.parametrize("hostname, expected", [
    ("web1", "web1"), ("win-test-01.example.org", "win-test-01"),
    ("fifteen-chars-1", "fifteen-chars-1"), ("a_b-c.d.e", "a_b-c"), ("0123x", "0123x")])
def test_computer_name(hostname, expected):
    assert win.computer_name(hostname) == expected


@pytest.mark.parametrize("hostname, message", [
    ("sixteen-chars-12", "16 characters and Windows allows at most 15"),
    ("12345.example.org", "cannot be all digits"),
    ("bad!name", "only letters, digits"), (".example.org", "Cannot make"),
    ("ünïcode", "only letters, digits")])
def test_bad_computer_names(hostname, message):
    with pytest.raises(TaskError, match=message):
        win.computer_name(hostname)


def test_ini_file_editing():
    ini = win.IniFile("; comment\r\n[GuiUnattended]\r\nAdminPassword=*\r\nTimeZone=85\r\n\r\n"
                      "[UserData]\r\nComputerName=*\r\n")
    ini.set("guiunattended", "adminpassword", win.inf_quote('a"b'))
    ini.set("GuiUnattended", "EncryptedAdminPassword", "No")
    ini.set("UserData", "ProductKey", "K")
    ini.set("Identification", "JoinWorkgroup", "WORKGROUP")
    assert ini.text() == ('; comment\r\n[GuiUnattended]\r\nAdminPassword="a""b"\r\nTimeZone=85\r\n'
                          'EncryptedAdminPassword=No\r\n\r\n[UserData]\r\nComputerName=*\r\n'
                          'ProductKey=K\r\n\r\n[Identification]\r\nJoinWorkgroup=WORKGROUP\r\n')
    assert ini.get("GUIUNATTENDED", "TimeZone") == "85"
    with pytest.raises(TaskError):
        win.inf_quote("two\nlines")


# --------------------------------------------------------------------------
# The tasks on a real NTFS
# --------------------------------------------------------------------------

@pytest.fixture
def ntfs(tmp_path):
    """mount(layout) → the system partition of that test disk, copied and
    mounted read-write as the helper mounts it."""
    require_root()
    require_programs("mkntfs", "ntfs-3g", "lowntfs-3g", "hivexsh", "losetup")
    mounted = []

    def mount(layout):
        image = windows_image(layout)
        system = partition_table(image)["partitions"][-1]
        copy = tmp_path / f"{layout}.ntfs"
        with open(image, "rb") as source, open(copy, "wb") as target:
            source.seek(system["start"] * 512)
            target.write(source.read(system["size"] * 512))
        loop = subprocess.run(["losetup", "--find", "--show", str(copy)], capture_output=True,
                              text=True, check=True).stdout.strip()
        target_dir = tmp_path / f"{layout}-target"
        target_dir.mkdir()
        subprocess.run(["mount", "-t", "lowntfs-3g", "-o", "ignore_case,windows_names,rw,norecover",
                        loop, str(target_dir)], check=True)
        mounted.append((target_dir, loop))
        return target_dir
    yield mount
    for target_dir, loop in mounted:
        subprocess.run(["umount", str(target_dir)], check=False)
        wait_for_fuse(target_dir)
        subprocess.run(["losetup", "-d", loop], check=False)


@pytest.fixture
def run(lib_dir, tmp_path, host):
    unattend, sysprep = host.default_answer_files(("W. Europe Standard Time", "110"))
    (tmp_path / "unattend.xml").write_bytes(unattend)
    (tmp_path / "sysprep.inf").write_bytes(sysprep)

    def run_task(task, target, env=None, family="windows", check=True):
        environ = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
                   "PYTHONDONTWRITEBYTECODE": "1", "SNF_IMAGE_HELPER_LIB": str(lib_dir),
                   "SNF_IMAGE_TARGET": str(target), "TASKNAME": task,
                   "SNF_IMAGE_PROPERTY_OSFAMILY": family,
                   "SNF_IMAGE_HOSTNAME": "win-test-01.example.org",
                   "SNF_IMAGE_UNATTEND": str(tmp_path / "unattend.xml"),
                   "SNF_IMAGE_SYSPREPINF": str(tmp_path / "sysprep.inf")}
        environ.update(env or {})
        result = subprocess.run([str(TASKS / task)], env=environ, capture_output=True,
                                text=True, timeout=120)
        if check:
            assert result.returncode == 0, result.stderr
        result.last = (result.stderr.strip().splitlines() or [""])[-1]
        return result
    return run_task


def answer(target):
    return ET.parse(target / "unattend.xml").getroot()


def test_windows_tasks_on_ntfs(ntfs, run):
    target = ntfs("mbr")
    run("35InstallUnattend", target, {"SNF_IMAGE_OS_PRODUCT_KEY": "KEY-1"})
    run("50AssignHostname", target)
    result = run("50ChangePassword", target, {"SNF_IMAGE_PASSWD": PASSWORD,
                                              "SNF_IMAGE_PROPERTY_USERS": "administrator JOHN"})
    assert PASSWORD not in result.stderr
    run("50DisableRemoteDesktopConnections", target)
    root = answer(target)
    shell = root.find("u:settings[@pass='specialize']/u:component"
                      "[@name='Microsoft-Windows-Shell-Setup'][@processorArchitecture='amd64']", NS)
    assert shell.findtext("u:ComputerName", namespaces=NS) == "win-test-01"
    assert shell.findtext("u:ProductKey", namespaces=NS) == "KEY-1"
    admin = root.find(".//u:AdministratorPassword/u:Value", NS)
    assert admin.text == PASSWORD
    assert b"&amp;" in (target / "unattend.xml").read_bytes()      # escaped in the XML text
    vbs = (target / "windows/snfscripts/setpasswords.vbs").read_text()
    assert 'Array("Administrator", "john")' in vbs                  # the SAM's spelling
    # a second run of the answer-file tasks adds no duplicate commands
    run("35InstallUnattend", target, {"SNF_IMAGE_OS_PRODUCT_KEY": "KEY-2"})
    paths = [p.text for p in answer(target).iter("{urn:schemas-microsoft-com:unattend}Path")]
    assert paths.count("diskpart.exe /s C:\\Windows\\SnfScripts\\ExtendFilesystem") == 1
    keys = [k.text for k in answer(target).iter("{urn:schemas-microsoft-com:unattend}ProductKey")]
    assert keys == ["KEY-2"]                                         # updated, not added
    hive = win.Hive((target / "windows/system32/config/system").read_bytes())
    assert hive.dword(f"ControlSet{CONTROL_SET:03d}\\Control\\Terminal Server",
                      "fDenyTSConnections") == 1


def test_windows_task_errors(ntfs, run):
    target = ntfs("mbr")
    assert run("35InstallUnattend", target, family="windows-legacy", check=False).last == \
        "ERROR: Windows image is not legacy (NT 6.1). Use 'windows' as OSFAMILY"
    run("35InstallUnattend", target)
    cases = [
        ("50ChangePassword", {"SNF_IMAGE_PASSWD": PASSWORD, "SNF_IMAGE_PROPERTY_USERS": "bob"},
         "ERROR: User: `bob' does not exist."),
        ("50ChangePassword", {"SNF_IMAGE_PASSWD_HASH": "$6$x$y"},
         "ERROR: On Windows images password hash is not applicable."),
        ("50AssignHostname", {"SNF_IMAGE_HOSTNAME": "sixteen-chars-12.example.org"},
         "ERROR: Cannot make a Windows computer name of `sixteen-chars-12.example.org': "
         "`sixteen-chars-12' has 16 characters and Windows allows at most 15"),
    ]
    for task, env, message in cases:
        result = run(task, target, env, check=False)
        assert (result.returncode, result.last) == (1, message)
    result = run("50ChangePassword", target)
    assert "Password is not set" in result.stderr
    assert not (target / "windows/snfscripts/password").exists()


def test_image_answer_file_kept_unless_ignored(ntfs, run):
    target = ntfs("gpt")
    setup_complete = target / "windows/setup/scripts/setupcomplete.cmd"
    setup_complete.write_bytes(setup_complete.read_bytes() + b"EXIT /B 0\r\n")
    result = run("35InstallUnattend", target)
    assert "Using the unattend.xml file found in the image" in result.stderr
    assert "SetupComplete.cmd has an `exit' or `goto' line" in result.stderr
    assert b"the image's own answer file" in (target / "unattend.xml").read_bytes()
    run("35InstallUnattend", target, {"SNF_IMAGE_PROPERTY_IGNORE_UNATTEND": "yes"})
    assert b"the image's own answer file" not in (target / "unattend.xml").read_bytes()


def test_not_generalized_and_legacy(ntfs, run):
    assert run("35InstallUnattend", ntfs("complete"), check=False).last.startswith(
        "ERROR: Image is not sysprepped: ImageState is IMAGE_STATE_COMPLETE")
    legacy = ntfs("legacy")
    assert run("35InstallUnattend", legacy, check=False).last == \
        "ERROR: Windows image seems older than Vista (NT 5.1). Use 'windows-legacy' as OSFAMILY"
    run("35InstallUnattend", legacy, family="windows-legacy")
    run("50ChangePassword", legacy, {"SNF_IMAGE_PASSWD": PASSWORD}, family="windows-legacy")
    inf = (legacy / "sysprep/sysprep.inf").read_bytes().decode("cp1252").split("\r\n")
    assert 'AdminPassword="' + PASSWORD.replace('"', '""') + '"' in inf
    cmdlines = (legacy / "sysprep/i386/$oem$/cmdlines.txt").read_bytes().decode().split("\r\n")
    assert cmdlines[0] == "[Commands]" and cmdlines[2].endswith('SetupComplete.cmd"')
    assert "SetPasswords.vbs" in cmdlines[1]


def test_personality_on_ntfs_keeps_backups(ntfs, run):
    target = ntfs("mbr")
    files = [{"path": "Users/Public/Desktop/readme.txt", "contents": "bmV3"}]
    run("60EnforcePersonality", target, {"SNF_IMAGE_PERSONALITY": json.dumps(files)})
    names = sorted(os.listdir(target / "users/public/desktop"))
    assert names[0] == "readme.txt" and names[1].startswith("readme.txt.bak.")
    assert (target / "users/public/desktop/readme.txt").read_bytes() == b"new"


def test_helper_root_has_the_windows_tools(helper_vm_dir):
    """ntfs-3g, ntfsresize, hivexsh and hivexget (and the Latin-1 converter hivex
    needs for key names) are in the built helper root."""
    release = Path(helper_vm_dir) / "current"
    manifest = json.loads((release / "manifest.json").read_text())
    assert {"ntfs-3g", "libhivex-bin"} <= set(manifest["packages"])
    require_programs("debugfs")
    for program in ("/usr/bin/ntfs-3g", "/usr/bin/lowntfs-3g", "/usr/sbin/ntfsresize",
                    "/usr/bin/ntfsinfo", "/usr/bin/hivexsh", "/usr/bin/hivexget",
                    "/usr/sbin/mount.lowntfs-3g",
                    "/usr/lib/x86_64-linux-gnu/gconv/ISO8859-1.so"):   # hivex's key names
        listing = subprocess.run(["debugfs", "-R", f"stat {program}", str(release / "image")],
                                 capture_output=True, text=True)
        assert "Type: regular" in listing.stdout or "Type: symlink" in listing.stdout, program
    assert shutil.which("hivexsh")
