"""The Debian test images themselves: layout on disk, and a pristine boot.

Before any deployment, each Debian 12 image (tools/build-test-image.py,
cached by tests/images.py) must boot under qemu TCG and print its report:
that is what the end-to-end tests rely on when they boot a deployed disk.
Today's images are booted once only, deployed (tests/test_e2e_linux.py):
their layout is checked here.
"""

import json
import subprocess

import pytest

import guest
from conftest import require_programs, require_root
from images import LAYOUTS, SUITE, builder, debian_image

MIB = 1024 * 1024
GIB = 1024 * MIB
NICS = (guest.Nic("52:54:00:5e:00:01"), guest.Nic("52:54:00:5e:00:02", net="10.0.3.0/24"))


# ----------------------------------------------------------------- report parsing (no root)

def encode(key, rc, data):
    import base64
    return json.dumps({"key": key, "rc": rc, "b64": base64.b64encode(data).decode()})


def test_parse_report_takes_the_last_complete_report_and_ignores_noise():
    serial = "\r\n".join([
        "garbage before", guest.REPORT_BEGIN, encode("hostname", 0, b"old\n"), guest.REPORT_END,
        "noise", guest.REPORT_BEGIN, encode("hostname", 0, b"vm1\n"),
        encode("changed_files", 0, b"f\troot\troot\t640\t3\tabc\t/etc/x y\n"),
        encode("ip_addr", 0, json.dumps([{"ifname": "ens3", "address": "AA:00:00:00:00:01",
                                          "addr_info": [{"family": "inet", "local": "192.0.2.10",
                                                         "prefixlen": 24, "scope": "global"}]}]).encode()),
        "", guest.REPORT_END, "[  12.0] reboot: Power down"])
    report = guest.parse_report(serial)
    assert report.text("hostname") == "vm1\n"
    assert report.changed_files() == {"/etc/x y": {"type": "f", "owner": "root", "group": "root",
                                                   "mode": 0o640, "size": 3, "sha256": "abc"}}
    assert report.addresses("aa:00:00:00:00:01") == ("ens3", [("inet", "192.0.2.10", 24, "global")])
    with pytest.raises(KeyError):
        report.addresses("aa:00:00:00:00:02")


def test_parse_report_without_end_marker_fails():
    with pytest.raises(guest.GuestError, match="no complete report"):
        guest.parse_report(guest.REPORT_BEGIN + "\n" + encode("hostname", 0, b"x"), console="boot\nlog")


def test_mirror_comes_from_the_host_apt_sources(tmp_path, monkeypatch):
    tool = builder()
    sources = tmp_path / "debian.sources"
    sources.write_text("Types: deb\nURIs: http://mirror.example/debian\nSuites: bookworm\n"
                       "Components: main\n\nTypes: deb\nURIs: http://mirror.example/debian-security\n"
                       "Suites: bookworm-security\nComponents: main\n")
    monkeypatch.setattr(tool, "APT_SOURCES", sources)
    assert tool.host_debian_mirror("bookworm") == "http://mirror.example/debian"
    monkeypatch.setattr(tool, "APT_SOURCES", tmp_path / "absent")
    monkeypatch.setattr(tool, "LEGACY_APT_SOURCES", tmp_path / "absent")
    with pytest.raises(tool.BuildError, match="no Debian mirror"):
        tool.host_debian_mirror("bookworm")


def test_recipe_hash_depends_on_what_the_image_is_built_from():
    tool = builder()
    base = tool.short_hash(tool.recipe_for("mbr", "bookworm", "http://a/debian", 1024))
    assert base == tool.short_hash(tool.recipe_for("mbr", "bookworm", "http://a/debian", 1024))
    for other in (("gpt", "bookworm", "http://a/debian", 1024), ("mbr", "trixie", "http://a/debian", 1024),
                  ("mbr", "bookworm", "http://b/debian", 1024), ("mbr", "bookworm", "http://a/debian", 2048)):
        assert tool.short_hash(tool.recipe_for(*other)) != base
    assert "cloud-init" in tool.recipe_for("mbr-cloudinit", "bookworm", "http://a/debian", 1024)["packages"]
    with pytest.raises(tool.BuildError, match="unknown layout"):
        tool.recipe_for("zfs", "bookworm", "http://a/debian", 1024)


@pytest.mark.qemu
def test_guest_that_never_reports_times_out_and_qemu_is_killed(tmp_path):
    require_programs(guest.QEMU)
    disk = tmp_path / "blank.img"
    disk.write_bytes(bytes(1024 * 1024))          # SeaBIOS: no bootable device, forever
    with pytest.raises(guest.GuestError, match="did not report .timed out after 15 s"):
        guest.boot(disk, NICS[:1], timeout=15, keep_dir=tmp_path / "logs")
    leftovers = subprocess.run(["pgrep", "-f", str(disk)], capture_output=True, text=True).stdout
    assert leftovers == ""
    assert (tmp_path / "logs" / "console.log").exists()


# ----------------------------------------------------------------- images on disk

def built(layout):
    require_root()
    require_programs("mmdebstrap", "sfdisk", "sgdisk", "extlinux", "mkfs.ext4", "losetup")
    return layout, debian_image(layout)


@pytest.fixture(scope="module", params=list(LAYOUTS))
def image(request):
    return built(request.param)


@pytest.fixture(scope="module", params=[layout for layout in LAYOUTS if LAYOUTS[layout] == SUITE])
def debian12_image(request):
    return built(request.param)


def partition_table(path):
    return json.loads(subprocess.run(["sfdisk", "--json", str(path)], check=True,
                                     capture_output=True, text=True).stdout)["partitiontable"]


def filesystem_type(path, offset):
    return subprocess.run(["blkid", "--probe", "--offset", str(offset), "-o", "value", "-s", "TYPE",
                           str(path)], capture_output=True, text=True).stdout.strip()


@pytest.mark.root
@pytest.mark.slow
def test_image_layout(image):
    layout, path = image
    assert path.stat().st_size <= GIB
    table = partition_table(path)
    parts = table["partitions"]
    with open(path, "rb") as disk:
        boot_code = disk.read(440)
    if layout.startswith("mbr"):
        assert table["label"] == "dos"
        assert len(parts) == 1 and parts[0]["bootable"] and parts[0]["type"] == "83"
        assert filesystem_type(path, parts[0]["start"] * 512) == "ext4"
        assert boot_code == open("/usr/lib/syslinux/mbr/mbr.bin", "rb").read()[:440]
    elif layout.startswith("gpt-cloud"):
        assert table["label"] == "gpt"
        numbered = {int(p["node"].rsplit("img", 1)[1]): p for p in parts}
        assert sorted(numbered) == [1, 14, 15]
        root, bios_boot, esp = numbered[1], numbered[14], numbered[15]
        assert bios_boot["type"] == "21686148-6449-6E6F-744E-656564454649"
        assert esp["type"] == "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"
        assert root["start"] > esp["start"] > bios_boot["start"], "root is numbered 1 but comes last"
        assert "LegacyBIOSBootable" in root.get("attrs", "")
        assert filesystem_type(path, esp["start"] * 512) == "vfat"
        assert filesystem_type(path, root["start"] * 512) == "ext4"
        if layout == "gpt-cloud-uefi":
            listing = subprocess.run(["mdir", "-b", "-i", f"{path}@@{esp['start'] * 512}", "::/EFI/BOOT"],
                                     capture_output=True, text=True, check=True,
                                     env={"MTOOLS_SKIP_CHECK": "1", "PATH": "/usr/bin:/bin"}).stdout
            assert "BOOTX64.EFI" in listing.upper()
    else:
        assert table["label"] == "gpt"
        boot, swap, root = parts
        assert "LegacyBIOSBootable" in boot.get("attrs", "")
        assert swap["type"] == "0657FD6D-A4AB-43C4-84E5-0933C84B4F4F"
        assert root["start"] > swap["start"] > boot["start"], "root must be the last partition"
        root_fstype = "xfs" if layout == "gpt-xfs" else "ext4"
        assert [filesystem_type(path, p["start"] * 512) for p in parts] == ["ext4", "swap", root_fstype]
        assert boot_code == open("/usr/lib/syslinux/mbr/gptmbr.bin", "rb").read()[:440]


@pytest.mark.root
@pytest.mark.qemu
@pytest.mark.slow
def test_pristine_image_boots_and_reports(debian12_image, tmp_path):
    layout, path = debian12_image
    require_programs(guest.QEMU)
    before = path.stat().st_mtime_ns
    report = guest.boot(path, NICS, snapshot=True, keep_dir=tmp_path)
    assert path.stat().st_mtime_ns == before, "a snapshot boot must not change the cached image"

    assert report.text("hostname").strip() == "snf-test-image"
    assert report.text("system_state").strip() == "running"
    assert report.text("failed_units").strip() == ""
    assert report.text("fstab").count("UUID=") == {"gpt": 3, "gpt-cloud": 2}.get(layout, 1)
    size = int(report.text("df_root").splitlines()[1].split()[2])
    assert 0.6 * GIB < size < GIB
    assert len(report.text("machine_id").strip()) == 32
    assert report.keys_with_prefix("ssh_host_key:"), "the image ships (stale) SSH host keys"
    assert any(line.startswith("debian:") for line in report.text("shadow").splitlines())
    # Nothing on the root file system changed since the build but boot noise.
    assert set(report.changed_files()) <= {"/etc/resolv.conf"}
    ifname, addresses = report.addresses(NICS[0].mac)
    assert ifname == "ens3"
    assert ("inet", "10.0.2.15", 24, "global") in addresses     # the image's own DHCP config
    swaps = report.text("swaps").split()
    if layout == "gpt":
        assert swaps[:3] == ["/dev/vda2", "partition", str(64 * MIB - 4096)]
        assert "/dev/vda1" in report.text("df_boot")
        assert report.addresses(NICS[1].mac)[1][0][:2] == ("inet", "10.0.3.15")
        assert "file:/etc/network/interfaces" not in report
    else:
        assert swaps == []
        assert "iface ens3 inet dhcp" in report.text("file:/etc/network/interfaces")
    if layout == "mbr-cloudinit":
        # No NoCloud seed in the pristine image: cloud-init stays out of the way.
        assert "disabled" in report.text("cloud_init_status")
