"""Windows images end to end: the Windows-like test disks of windows_disks.py
(real NTFS, real SYSTEM/SOFTWARE/SAM hives, a System Reserved partition)
deployed by the real `create` of the OS definition through the real helper VM
(built from the repository's tasks.d, booted under TCG) onto larger disks.
Each case deploys once and checks everything on the result, read-only on the
host: the partition table and NTFS sizes, the System Reserved partition byte
for byte, the answer file parsed as XML, the scripts it runs, the registry
values (hivexget), the files SetupComplete.cmd removes, and that the password
appears in no log and nowhere but the files Windows setup removes.

Cases: MBR Windows 7 with the default answer file (hostname, a password full
of cmd and XML metacharacters, product key, time zone, personality); GPT
Windows 8.1 with os_answer_file (which replaces the image's own answer file
and creates an account) and OFFLINE_NTFSRESIZE; XP (sysprep.inf, offline
resize); an image that was never sysprepped; an os_answer_file that cannot be
read (refused before the disk is written)."""

import base64
import json
import os
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

import ganeti_env
from conftest import e2e_site_root, link_or_copy, require_helper_build, require_programs
from helpervm import built_helper_dir
from test_e2e_helper import leftover_processes
from windows_disks import (CONTROL_SET, README, SETUP_COMPLETE, mounted_ntfs, ntfs_volume_bytes,
                           partition_digest, partition_table, windows_image)

pytestmark = [pytest.mark.slow, pytest.mark.qemu, pytest.mark.root]

PASSWORD = 'Sn&f|<i>^m%a"g!e 0 \'x'
PRODUCT_KEY = "ABCDE-FGHIJ-KLMNO-PQRST-UVWXY"
CREATE_TIMEOUT = 900
DISK_SIZE = 256 << 20
NS = {"u": "urn:schemas-microsoft-com:unattend"}
WCM_ACTION = "{http://schemas.microsoft.com/WMIConfig/2002/State}action"
ANSWER_FILE = """<?xml version="1.0" encoding="utf-8"?>
<unattend xmlns="urn:schemas-microsoft-com:unattend" xmlns:wcm="http://schemas.microsoft.com/WMIConfig/2002/State">
  <settings pass="specialize">
    <component name="Microsoft-Windows-Deployment" processorArchitecture="amd64" publicKeyToken="31bf3856ad364e35" language="neutral" versionScope="nonSxS">
      <RunSynchronous>
        <RunSynchronousCommand wcm:action="add"><Order>4</Order><Path>cmd /c echo first</Path></RunSynchronousCommand>
        <RunSynchronousCommand wcm:action="add"><Order>7</Order><Path>cmd /c echo second</Path></RunSynchronousCommand>
      </RunSynchronous>
    </component>
  </settings>
  <settings pass="oobeSystem">
    <component name="Microsoft-Windows-Shell-Setup" processorArchitecture="amd64" publicKeyToken="31bf3856ad364e35" language="neutral" versionScope="nonSxS">
      <UserAccounts>
        <LocalAccounts>
          <LocalAccount wcm:action="add">
            <Name>clouduser</Name>
            <Group>Administrators</Group>
            <Password><Value>to be replaced</Value><PlainText>true</PlainText></Password>
          </LocalAccount>
        </LocalAccounts>
      </UserAccounts>
    </component>
  </settings>
</unattend>
"""


@pytest.fixture(scope="module")
def site():
    require_helper_build()
    require_programs("mkntfs", "ntfs-3g", "hivexget", "losetup")
    helper_dir = built_helper_dir()
    with e2e_site_root("windows-e2e-") as root:
        for layout in ("mbr", "gpt", "complete", "legacy"):
            link_or_copy(windows_image(layout), root / "images" / f"windows-{layout}.img")
        (root / "images" / "answer.xml").write_text(ANSWER_FILE)
        yield {"root": root, "helper_dir": helper_dir}


class Deployment:
    def __init__(self, site, tmp_path, layout):
        self.site = site
        self.tmp = tmp_path
        self.image = site["root"] / "images" / f"windows-{layout}.img"
        self.layout = layout
        config = tmp_path / "snf-image.conf"
        config.write_text(
            f'IMAGE_DIR="{site["root"]}/images"\n'
            f'VARIANTS_DIR="{site["root"]}/variants"\n'
            f'HELPER_DIR="{site["helper_dir"]}"\n'
            'HELPER_ACCEL="tcg"\n'
            'HELPER_SOFT_TIMEOUT="10m"\n'
            'HELPER_HARD_TIMEOUT="10"\n'
            'WINDOWS_TIMEZONE="w. europe standard time"\n')
        self.config = config
        self.os_dir = ganeti_env.install_os_dir(tmp_path / "os")
        self.disk = tmp_path / "disk0.img"
        subprocess.run(["truncate", "-s", str(DISK_SIZE), str(self.disk)], check=True)

    def create(self, properties, instance="win-test-01.example.org", **osparams):
        osparams = dict({"img_id": self.image.name, "img_format": "diskdump",
                         "img_passwd": PASSWORD,
                         "img_properties": json.dumps(properties)}, **osparams)
        env = ganeti_env.create_env([self.disk], instance=instance, nics=[], osparams=osparams)
        env["SNF_IMAGE_CONFIG"] = str(self.config)
        result = subprocess.run([str(self.os_dir / "create")], env=env, cwd=self.os_dir,
                                capture_output=True, text=True, timeout=CREATE_TIMEOUT)
        self.output = result.stdout + result.stderr
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        self.last_line = lines[-1] if lines else ""
        assert PASSWORD not in self.output
        assert not leftover_processes(self.tmp), "qemu left running"
        return result.returncode

    def partitions(self):
        return {int(p["node"][len(str(self.disk)):]): p
                for p in partition_table(self.disk)["partitions"]}

    def source_partitions(self):
        return {int(p["node"][len(str(self.image)):]): p
                for p in partition_table(self.image)["partitions"]}


@pytest.fixture
def deploy(site, tmp_path):
    made = []

    def make(layout):
        directory = tmp_path / f"d{len(made)}"
        directory.mkdir()
        made.append(Deployment(site, directory, layout))
        return made[-1]
    yield make
    for deployment in made:
        deployment.disk.unlink(missing_ok=True)


def answer_values(path):
    """The answer file as XML: {(pass, component, arch): element}."""
    root = ET.parse(path).getroot()
    assert root.tag == "{urn:schemas-microsoft-com:unattend}unattend"
    found = {}
    for settings in root.findall("u:settings", NS):
        for component in settings.findall("u:component", NS):
            found[(settings.get("pass"), component.get("name"),
                   component.get("processorArchitecture"))] = component
    return found


def commands(component):
    return [(entry.findtext("u:Order", namespaces=NS), entry.findtext("u:Path", namespaces=NS),
             entry.get(WCM_ACTION))
            for entry in component.iter("{urn:schemas-microsoft-com:unattend}RunSynchronousCommand")]


def hive_value(path, key, name):
    return subprocess.run(["hivexget", str(path), key, name], capture_output=True, text=True,
                          check=True).stdout.strip()


def check_unchanged_system_reserved(deployment):
    source = deployment.source_partitions()[1]
    target = deployment.partitions()[1]
    assert (target["start"], target["size"]) == (source["start"], source["size"])
    assert partition_digest(deployment.disk, target["start"], target["size"]) == \
        partition_digest(deployment.image, source["start"], source["size"])


def password_bearing_files(system):
    """Every file of the system drive holding the password (as is, UTF-16, XML- or
    INF-quoted)."""
    needles = (PASSWORD.encode(), PASSWORD.encode("utf-16-le"),
               PASSWORD.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").encode(),
               PASSWORD.replace('"', '""').encode("cp1252"))        # sysprep.inf quoting
    found = []
    for directory, _, names in os.walk(system):
        for name in names:
            data = Path(directory, name).read_bytes()
            if any(needle in data for needle in needles):
                found.append(str(Path(directory, name).relative_to(system)).lower())
    return sorted(found)


def test_windows_mbr_default_answer_file(deploy):
    deployment = deploy("mbr")
    personality = [{"path": "/Users/Public/Desktop/readme.txt",
                    "contents": base64.b64encode(b"injected\r\n").decode()},
                   {"path": "/ProgramData/snf/new.txt", "contents": base64.b64encode(b"new").decode()}]
    code = deployment.create({"USERS": "Administrator john"}, os_product_key=PRODUCT_KEY,
                             img_personality=json.dumps(personality))
    assert code == 0, deployment.output
    assert "Detected OSFAMILY: windows" in deployment.output
    assert "Detected ROOT_PARTITION: 2" in deployment.output

    # the system partition grew to 1 MiB before the end; Windows extends the NTFS itself
    parts = deployment.partitions()
    source = deployment.source_partitions()
    assert parts[2]["start"] == source[2]["start"]
    assert parts[2]["start"] + parts[2]["size"] == DISK_SIZE // 512 - 2048
    assert ntfs_volume_bytes(deployment.disk, parts[2]["start"]) == \
        ntfs_volume_bytes(deployment.image, source[2]["start"])
    check_unchanged_system_reserved(deployment)

    with mounted_ntfs(deployment.disk, parts[2]["start"], parts[2]["size"]) as system:
        answer = answer_values(system / "unattend.xml")
        shell = answer[("specialize", "Microsoft-Windows-Shell-Setup", "amd64")]
        assert shell.findtext("u:ComputerName", namespaces=NS) == "win-test-01"
        assert shell.findtext("u:TimeZone", namespaces=NS) == "W. Europe Standard Time"
        assert shell.findtext("u:ProductKey", namespaces=NS) == PRODUCT_KEY
        deployment_component = answer[("specialize", "Microsoft-Windows-Deployment", "amd64")]
        run = commands(deployment_component)
        assert run[0][0] == "1" and "UnattendCreatedUser" in run[0][1]
        assert run[1:] == [("2", "diskpart.exe /s C:\\Windows\\SnfScripts\\ExtendFilesystem", "add"),
                           ("3", "cscript.exe //B //NoLogo C:\\Windows\\SnfScripts\\SetPasswords.vbs",
                            "add")]
        oobe = answer[("oobeSystem", "Microsoft-Windows-Shell-Setup", "amd64")]
        admin = oobe.find("u:UserAccounts/u:AdministratorPassword", NS)
        assert admin.findtext("u:Value", namespaces=NS) == PASSWORD
        assert admin.findtext("u:PlainText", namespaces=NS) == "true"
        assert {child.tag.split("}")[1]: child.text for child in oobe.find("u:OOBE", NS)} == \
            {"HideEULAPage": "true", "NetworkLocation": "Other", "ProtectYourPC": "1"}
        assert shell.findtext("u:DisableAutoDaylightTimeSet", namespaces=NS) == "false"
        assert shell.findtext("u:RegisteredOwner", namespaces=NS) == "snf-image"
        international = answer[("oobeSystem", "Microsoft-Windows-International-Core", "amd64")]
        assert {child.tag.split("}")[1]: child.text for child in international} == \
            {"InputLocale": "en-US", "SystemLocale": "en-US", "UILanguage": "en-US",
             "UserLocale": "en-US"}
        assert set(answer) == {(p, c, a) for a in ("amd64", "x86") for p, c in (
            ("specialize", "Microsoft-Windows-Shell-Setup"),
            ("specialize", "Microsoft-Windows-Deployment"),
            ("oobeSystem", "Microsoft-Windows-International-Core"),
            ("oobeSystem", "Microsoft-Windows-Shell-Setup"))}
        # the x86 components are the default's, untouched
        x86 = answer[("specialize", "Microsoft-Windows-Shell-Setup", "x86")]
        assert x86.findtext("u:ComputerName", namespaces=NS) == "*"
        assert x86.findtext("u:TimeZone", namespaces=NS) == "W. Europe Standard Time"

        scripts = system / "Windows" / "SnfScripts"
        assert (scripts / "ExtendFilesystem").read_bytes() == \
            b"select disk 0\r\nselect partition 2\r\nextend filesystem\r\nexit\r\n"
        vbs = (scripts / "SetPasswords.vbs").read_text()
        assert 'Array("Administrator", "john")' in vbs and PASSWORD not in vbs
        assert (scripts / "password").read_bytes() == PASSWORD.encode("utf-16-le")
        setup_complete = (system / "Windows/Setup/Scripts/SetupComplete.cmd").read_bytes()
        assert setup_complete.startswith(SETUP_COMPLETE)          # the image's own lines kept
        added = setup_complete[len(SETUP_COMPLETE):].decode().split("\r\n")
        assert 'rmdir /S /Q "C:\\Windows\\SnfScripts"' in added
        assert 'del /Q /F "C:\\unattend.xml"' in added
        assert 'del /Q /F "%WINDIR%\\Panther\\unattend.xml"' in added
        assert ('reg add "HKLM\\SYSTEM\\CurrentControlSet\\Control\\Terminal Server" '
                '/v fDenyTSConnections /t REG_DWORD /d 0 /f') in added
        # the password lives only in files that setup removes
        assert password_bearing_files(system) == ["unattend.xml", "windows/snfscripts/password"]

        hive = system / "Windows/System32/config/SYSTEM"
        live = f"ControlSet{CONTROL_SET:03d}\\Control\\Terminal Server"
        assert hive_value(hive, live, "fDenyTSConnections") == "1"
        assert hive_value(hive, live, "ProductVersion") == "5.1"          # others kept
        assert hive_value(hive, live, "fSingleSessionPerUser") == "1"
        assert hive_value(hive, "ControlSet001\\Control\\Terminal Server",
                          "fDenyTSConnections") == "7"                       # not the live set

        desktop = system / "Users/Public/Desktop"
        assert (desktop / "readme.txt").read_bytes() == b"injected\r\n"
        backups = [p for p in desktop.iterdir() if p.name.startswith("readme.txt.bak.")]
        assert len(backups) == 1 and backups[0].read_bytes() == README
        assert (system / "ProgramData/snf/new.txt").read_bytes() == b"new"


def test_windows_gpt_answer_file_url_and_offline_resize(deploy, site):
    deployment = deploy("gpt")
    answer_url = f"file://{site['root']}/images/answer.xml"
    code = deployment.create({"USERS": "clouduser Administrator", "OFFLINE_NTFSRESIZE": "yes",
                              "OFFLINE_NTFSRESIZE_NOCHECK": "yes"},
                             instance="fifteen-chars-1", os_answer_file=answer_url)
    assert code == 0, deployment.output
    assert "Detected ROOT_PARTITION: 3" in deployment.output     # after System Reserved and MSR
    parts = deployment.partitions()
    assert parts[3]["start"] + parts[3]["size"] == DISK_SIZE // 512 - 2048
    assert parts[2]["size"] == deployment.source_partitions()[2]["size"]       # MSR untouched
    # grown offline by ntfsresize to fill the partition
    assert ntfs_volume_bytes(deployment.disk, parts[3]["start"]) >= (parts[3]["size"] - 8) * 512
    assert "The NTFS dirty flag was cleared: please run CHKDSK manually" in deployment.output
    check_unchanged_system_reserved(deployment)
    with mounted_ntfs(deployment.disk, parts[3]["start"], parts[3]["size"]) as system:
        # os_answer_file forces IGNORE_UNATTEND: the image's own answer file was replaced
        answer = answer_values(system / "unattend.xml")
        assert b"the image's own answer file" not in (system / "unattend.xml").read_bytes()
        shell = answer[("specialize", "Microsoft-Windows-Shell-Setup", "amd64")]
        assert shell.findtext("u:ComputerName", namespaces=NS) == "fifteen-chars-1"
        assert shell.find("u:ProductKey", NS) is None
        run = commands(answer[("specialize", "Microsoft-Windows-Deployment", "amd64")])
        assert run == [("4", "cmd /c echo first", "add"), ("7", "cmd /c echo second", "add"),
                       ("8", "diskpart.exe /s C:\\Windows\\SnfScripts\\ExtendFilesystem", "add"),
                       ("9", "cscript.exe //B //NoLogo C:\\Windows\\SnfScripts\\SetPasswords.vbs",
                        "add")]
        oobe = answer[("oobeSystem", "Microsoft-Windows-Shell-Setup", "amd64")]
        account = oobe.find("u:UserAccounts/u:LocalAccounts/u:LocalAccount", NS)
        assert account.findtext("u:Password/u:Value", namespaces=NS) == PASSWORD
        assert oobe.findtext("u:UserAccounts/u:AdministratorPassword/u:Value",
                             namespaces=NS) == PASSWORD
        # offline resize: the diskpart script stays the no-op
        assert (system / "Windows/SnfScripts/ExtendFilesystem").read_bytes() == b"exit\r\n"
        assert 'Array("Administrator")' in (system / "Windows/SnfScripts/SetPasswords.vbs").read_text()
        setup_complete = (system / "Windows/Setup/Scripts/SetupComplete.cmd").read_text()
        assert "/v fDenyTSConnections /t REG_DWORD /d 0 /f" in setup_complete     # absent before
        hive = system / "Windows/System32/config/SYSTEM"
        assert hive_value(hive, f"ControlSet{CONTROL_SET:03d}\\Control\\Terminal Server",
                          "fDenyTSConnections") == "1"
        assert password_bearing_files(system) == ["unattend.xml", "windows/snfscripts/password"]


def test_windows_legacy_sysprep_inf(deploy):
    deployment = deploy("legacy")
    code = deployment.create({}, instance="xp-box.example.org", os_product_key=PRODUCT_KEY)
    assert code == 0, deployment.output
    assert "Detected OSFAMILY: windows-legacy" in deployment.output     # NT 5.1 in SOFTWARE
    parts = deployment.partitions()
    assert parts[1]["start"] + parts[1]["size"] == DISK_SIZE // 512 - 2048
    assert ntfs_volume_bytes(deployment.disk, parts[1]["start"]) >= (parts[1]["size"] - 8) * 512
    with mounted_ntfs(deployment.disk, parts[1]["start"], parts[1]["size"]) as system:
        inf = (system / "sysprep" / "sysprep.inf").read_bytes().decode("cp1252")
        assert "\r\n" in inf
        lines = inf.split("\r\n")
        assert "ComputerName=xp-box" in lines
        assert "TimeZone=110" in lines                      # W. Europe Standard Time
        assert f"ProductKey={PRODUCT_KEY}" in lines
        assert 'AdminPassword="' + PASSWORD.replace('"', '""') + '"' in lines
        assert "EncryptedAdminPassword=No" in lines
        assert "InstallFilesPath=C:\\sysprep\\i386" in lines
        cmdlines = (system / "sysprep/i386/$OEM$/CmdLines.txt").read_bytes().decode().split("\r\n")
        assert cmdlines[:3] == ["[Commands]",
                                "cscript.exe //B //NoLogo C:\\Windows\\SnfScripts\\SetPasswords.vbs",
                                '"C:\\Windows\\Setup\\Scripts\\SetupComplete.cmd"']
        setup_complete = (system / "WINDOWS/Setup/Scripts/SetupComplete.cmd").read_text()
        assert 'del /Q /F "C:\\sysprep\\sysprep.inf"' in setup_complete
        assert "/v fDenyTSConnections /t REG_DWORD /d 1 /f" in setup_complete
        assert password_bearing_files(system) == ["sysprep/sysprep.inf",
                                                  "windows/snfscripts/password"]


def test_windows_image_not_generalized(deploy):
    deployment = deploy("complete")
    assert deployment.create({}) == 3, deployment.output
    assert "Image is not sysprepped: ImageState is IMAGE_STATE_COMPLETE" in deployment.last_line


def test_unreadable_answer_file_is_refused_before_writing(deploy, site):
    deployment = deploy("mbr")
    code = deployment.create({}, os_answer_file=f"file://{site['root']}/images/missing.xml")
    assert code != 0 and "os_answer_file" in deployment.last_line
    with open(deployment.disk, "rb") as disk:
        assert not disk.read(1 << 20).strip(b"\0")          # nothing written
