"""Unit tests of the helper's pure logic (no root, no VM): kernel command
line, rules.json, property decoding and overrides, upstream's boolean rules,
partition naming, the choice of the partition to grow and the detection
candidates on parsed tables, mount listing, base distro."""

import json
import os

import pytest
from hypothesis import given, settings, strategies as st

from conftest import load_script, write_tree

helper = load_script("snf-image-helper.py", "snf_image_helper")


class Warnings(list):
    def __call__(self, message):
        self.append(message)


# -- kernel command line ------------------------------------------------------

def test_cmdline_flags_and_parameters():
    flags, parameters = helper.parse_cmdline(
        "console=ttyS0 panic=-1 quiet ro root=/dev/vda init=/usr/bin/snf-image-helper "
        "hypervisor=kvm snf_image_activate_helper rules_dev=/dev/fd0 odd=a=b\n")
    assert helper.ACTIVATION_FLAG in flags and "quiet" in flags
    assert parameters["hypervisor"] == "kvm"
    assert parameters["rules_dev"] == "/dev/fd0"
    assert parameters["odd"] == "a"           # upstream: between the first and second `=`
    assert "snf_image_debug_helper" not in flags


# -- rules.json -----------------------------------------------------------------

def test_rules_parsed():
    env, disks, prepared = helper.parse_rules(json.dumps({
        "format": 1, "env": {"SNF_IMAGE_HOSTNAME": "vm1", "SNF_IMAGE_PASSWD": "s3cr'et\n"},
        "disks": ["snf-disk0", "snf-disk1"], "prepared": "snf-prepared"}))
    assert env == {"SNF_IMAGE_HOSTNAME": "vm1", "SNF_IMAGE_PASSWD": "s3cr'et\n"}
    assert disks == ["snf-disk0", "snf-disk1"]
    assert prepared == "snf-prepared"


@pytest.mark.parametrize("text, fragment", [
    ("not json", "not valid JSON"),
    ("[1]", "not a JSON object"),
    ('{"format": 2, "env": {}, "disks": []}', "format 2"),
    ('{"env": {}, "disks": []}', "format None"),
    ('{"format": 1, "env": [], "disks": []}', "`env' is not an object"),
    ('{"format": 1, "env": {"PATH": "/x"}, "disks": []}', "not an SNF_IMAGE_ variable"),
    ('{"format": 1, "env": {"SNF_IMAGE_X": 1}, "disks": []}', "not a string"),
    ('{"format": 1, "env": {"SNF_IMAGE_X": "a\\u0000b"}, "disks": []}', "not a string"),
    ('{"format": 1, "env": {}, "disks": "snf-disk0"}', "not a list"),
    ('{"format": 1, "env": {}, "disks": [""]}', "not a list"),
    ('{"format": 1, "env": {}, "disks": [], "prepared": 1}', "`prepared' is not a disk serial"),
    ('{"format": 1, "env": {}, "disks": [], "prepared": ""}', "`prepared' is not a disk serial"),
])
def test_bad_rules_rejected_with_one_line(text, fragment):
    with pytest.raises(helper.HelperError) as caught:
        helper.parse_rules(text)
    assert fragment in str(caught.value)
    assert "\n" not in str(caught.value)


# -- properties -------------------------------------------------------------------

def test_properties_upper_cased_and_stringified():
    warnings = Warnings()
    decoded = helper.decode_properties(json.dumps({
        "osfamily": "linux", "Root_Partition": 1, "swap": None, "cloud_init": True,
        "nested": {"a": [1, "b"]}, "bad-key": "x", "with space": "y", "": "z",
        "ctl": "line1\nline2", "nul": "a\u0000b"}), "image properties", warnings)
    assert decoded == {
        "SNF_IMAGE_PROPERTY_OSFAMILY": "linux",
        "SNF_IMAGE_PROPERTY_ROOT_PARTITION": "1",
        "SNF_IMAGE_PROPERTY_SWAP": "null",
        "SNF_IMAGE_PROPERTY_CLOUD_INIT": "true",
        "SNF_IMAGE_PROPERTY_NESTED": '{"a": [1, "b"]}',
        "SNF_IMAGE_PROPERTY_CTL": "line1\nline2",
    }
    assert len(warnings) == 4 and all("Ignoring image properties key" in w for w in warnings)


def test_raw_control_characters_accepted_as_upstream():
    decoded = helper.decode_properties('{"users": "a\tb\nc"}', "image properties", Warnings())
    assert decoded["SNF_IMAGE_PROPERTY_USERS"] == "a\tb\nc"


@pytest.mark.parametrize("text", ["{bad", "[1, 2]", '"string"', "1"])
def test_invalid_properties_fatal(text):
    with pytest.raises(helper.HelperError) as caught:
        helper.decode_properties(text, "instance properties", Warnings())
    assert "instance properties" in str(caught.value)


def test_instance_properties_override_image_properties_key_by_key():
    env = {"SNF_IMAGE_PROPERTY_IGNORE_UNATTEND": "yes",
           "SNF_IMAGE_PROPERTIES": json.dumps({"OSFAMILY": "linux", "swap": "2:512",
                                               "ignore_unattend": "no"}),
           "SNF_IMAGE_INST_PROPERTIES": json.dumps({"osFamily": "windows", "USERS": "root"})}
    helper.apply_properties(env, Warnings())
    assert env["SNF_IMAGE_PROPERTY_OSFAMILY"] == "windows"
    assert env["SNF_IMAGE_PROPERTY_SWAP"] == "2:512"
    assert env["SNF_IMAGE_PROPERTY_USERS"] == "root"
    assert env["SNF_IMAGE_PROPERTY_IGNORE_UNATTEND"] == "no"   # rules env < properties


def test_empty_properties_variables_decode_nothing():
    env = {"SNF_IMAGE_PROPERTIES": "", "SNF_IMAGE_HOSTNAME": "x"}
    assert helper.apply_properties(dict(env), Warnings()) == env


property_keys = st.text(alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_",
                        min_size=1, max_size=12)
property_values = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\0"),
                          max_size=20)


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(property_keys, property_values), st.dictionaries(property_keys, property_values))
def test_override_semantics_hold_for_any_properties(image, instance):
    env = {"SNF_IMAGE_PROPERTIES": json.dumps(image), "SNF_IMAGE_INST_PROPERTIES": json.dumps(instance)}
    if not image:
        env["SNF_IMAGE_PROPERTIES"] = ""
    if not instance:
        env["SNF_IMAGE_INST_PROPERTIES"] = ""
    helper.apply_properties(env, Warnings())
    expected = {}
    for source in (image, instance):
        for key, value in source.items():
            expected["SNF_IMAGE_PROPERTY_" + key.upper()] = value
    got = {k: v for k, v in env.items() if k.startswith("SNF_IMAGE_PROPERTY_")}
    assert got == expected
    for key in set(image) | set(instance):
        assert helper.prop(key.lower(), env) == expected["SNF_IMAGE_PROPERTY_" + key.upper()]


# -- booleans ---------------------------------------------------------------------

@pytest.mark.parametrize("value, expected, warned", [
    ("Yes", True, False), ("TRUE", True, False), ("on", True, False), ("1", True, False),
    ("set", True, False), ("No", False, False), ("0", False, False), ("off", False, False),
    ("unset", False, False), ("FALSE", False, False), ("", False, True), ("maybe", True, True),
    (None, False, False),
])
def test_check_yes_no_upstream_table(value, expected, warned):
    env = {} if value is None else {"SNF_IMAGE_PROPERTY_CLOUD_INIT": value}
    warnings = Warnings()
    assert helper.parse_yes_no("SNF_IMAGE_PROPERTY_CLOUD_INIT",
                               env.get("SNF_IMAGE_PROPERTY_CLOUD_INIT"), warnings) is expected
    assert bool(warnings) is warned
    if value == "":
        assert "defined but empty" in warnings[0] and "`NO'" in warnings[0]
    if value == "maybe":
        assert "`YES'" in warnings[0]


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=10))
def test_yes_no_total(value):
    warnings = Warnings()
    result = helper.parse_yes_no("X", value, warnings)
    lowered = value.lower()
    assert result is ((lowered in helper.YES_VALUES)
                      or (lowered not in helper.NO_VALUES and lowered != ""))
    assert bool(warnings) is (lowered not in helper.YES_VALUES + helper.NO_VALUES)


def test_check_yes_no_reads_the_environment(monkeypatch, capsys):
    monkeypatch.delenv("SNF_IMAGE_MONITOR", raising=False)
    monkeypatch.setenv("SNF_IMAGE_PROPERTY_DO_SYNC", "On")
    assert helper.check_yes_no("do_sync") is True
    assert helper.check_yes_no("SNF_IMAGE_PROPERTY_DO_SYNC") is True
    assert helper.check_yes_no("absent_property") is False
    monkeypatch.setenv("SNF_IMAGE_PROPERTY_DO_SYNC", "")
    assert helper.check_yes_no("DO_SYNC") is False
    assert "Warning: Variable `SNF_IMAGE_PROPERTY_DO_SYNC' defined but empty" in capsys.readouterr().err


def test_properties_view_warns_once_per_property():
    warnings = Warnings()
    properties = helper.Properties({"SNF_IMAGE_PROPERTY_EXCLUDE_MOUNTED_TASKS": "perhaps"}, warnings)
    assert all(properties.yes("exclude_mounted_tasks") for _ in range(5))
    assert len(warnings) == 1


# -- names, devices, tables --------------------------------------------------------

@pytest.mark.parametrize("disk, number, expected", [
    ("/dev/vdb", 3, "/dev/vdb3"), ("/dev/sda", 1, "/dev/sda1"), ("/dev/loop0", 3, "/dev/loop0p3"),
    ("/dev/nvme0n1", 2, "/dev/nvme0n1p2"), ("/dev/mmcblk0", "1", "/dev/mmcblk0p1"),
])
def test_partition_device(disk, number, expected):
    assert helper.partition_device(disk, number) == expected


def table(label, *partitions):
    """A parsed table: (number, type, fstype[, start, size]); by default
    partitions lie in number order, 10 sectors each."""
    parsed = []
    for entry in partitions:
        number, kind, fstype = entry[:3]
        start, size = entry[3:] if len(entry) == 5 else (number * 10, 10)
        parsed.append({"number": number, "type": kind, "fstype": fstype, "start": start, "size": size})
    return {"label": label, "partitions": parsed}


@pytest.mark.parametrize("parsed, expected", [
    (None, None),
    (table("dos"), None),
    (table("dos", (1, "83", "ext4")), 1),
    (table("dos", (1, "83", "ext4"), (2, "82", "swap")), 2),
    # primary + extended + logicals: grow the last logical
    (table("dos", (1, "83", "ext4", 2048, 100), (2, "5", None, 3000, 500),
           (5, "83", "ext4", 3100, 100), (6, "83", "ext4", 3300, 100)), 6),
    (table("dos", (1, "83", "ext4", 2048, 100), (2, "F", None, 3000, 500), (5, "83", "ext4", 3100, 100)), 5),
    (table("dos", (1, "83", "ext4", 2048, 100), (2, "85", None, 3000, 500), (5, "83", "ext4", 3100, 100)), 5),
    # a primary follows the extended partition: grow that primary
    (table("dos", (1, "83", "ext4", 2048, 100), (2, "5", None, 3000, 500),
           (3, "83", "ext4", 4000, 100), (5, "83", "ext4", 3100, 100)), 3),
    # logical partitions numbered against their order on the disk
    (table("dos", (1, "83", "ext4", 2048, 100), (2, "5", None, 3000, 500),
           (5, "83", "ext4", 3300, 100), (6, "83", "ext4", 3100, 100)), 5),
    # the last partition is an empty extended one
    (table("dos", (1, "83", "ext4"), (2, "5", None)), 2),
    # empty slots are ignored
    (table("dos", (1, "83", "ext4", 2048, 100), (2, "0", None, 0, 0)), 1),
    # GPT: the partition that ends last, whatever its number (Debian cloud images: 1 after 14, 15)
    (table("gpt", (14, "BIOS", None, 2048, 6144), (15, "EFI", "vfat", 8192, 253952),
           (1, "LINUX", "ext4", 262144, 4000000)), 1),
    (table("gpt", (1, helper.GPT_MS_BASIC_DATA, "ntfs"), (2, "X", "ext4"), (7, "Y", "ext4")), 7),
])
def test_partition_to_resize(parsed, expected):
    assert helper.partition_to_resize(parsed) == expected


def test_detection_candidates_mbr_and_gpt():
    mbr = table("dos", (1, "A5", None), (2, "7", "ntfs"), (3, "83", "ext4"), (4, "5", None),
                (5, "82", "swap"), (6, "A6", None), (7, "A9", None), (8, "C", "vfat"))
    assert helper.detection_candidates(mbr) == [
        (1, "freebsd", True), (2, "windows", False), (3, "linux", False),
        (6, "openbsd", True), (7, "netbsd", True)]
    gpt = table("gpt", (1, "C12A7328-F81F-11D2-BA4B-00A0C93EC93B", "vfat"),
                (2, helper.GPT_MS_BASIC_DATA, "ntfs"), (3, helper.GPT_FREEBSD_UFS, "ufs"),
                (4, "0FC63DAF-8483-4772-8E79-3D69D8477DE4", "ext4"))
    assert helper.detection_candidates(gpt) == [
        (1, "linux", False), (2, "windows", False), (3, "freebsd", False), (4, "linux", False)]
    with pytest.raises(helper.HelperError, match="Unsupported partition table type `sun'"):
        helper.detection_candidates(table("sun", (1, "83", "ext4")))


def test_detection_stops_at_the_first_root():
    examined = []

    def examine(device, family, fstype, scratch):
        examined.append(device)
        return family if device.endswith("3") else None

    parsed = table("dos", (1, "83", "ext4"), (2, "82", "swap"), (3, "83", "ext4"), (5, "83", "ext4"))
    assert helper.detect_image_properties("/dev/vdb", parsed, "/tmp", examine) == ("linux", 3)
    assert examined == ["/dev/vdb1", "/dev/vdb3"]
    bsd = table("dos", (1, "A6", None), (2, "83", "ext4"))
    assert helper.detect_image_properties("/dev/vdb", bsd, "/tmp", examine) == ("openbsd", 1)
    nothing = table("dos", (1, "83", "ext4"))
    assert helper.detect_image_properties("/dev/vdb", nothing, "/tmp", lambda *a: None) == (None, None)


# -- mounts and distros ----------------------------------------------------------------

def test_mounted_under_deepest_first(tmp_path):
    mounts = tmp_path / "mounts"
    mounts.write_text(
        "/dev/vda / ext4 ro 0 0\n"
        "/dev/vdb1 /tmp/target.x ext4 rw 0 0\n"
        "/dev/vdb5 /tmp/target.x/usr ext4 rw 0 0\n"
        "/dev/vdb6 /tmp/target.x/usr/local ext4 rw 0 0\n"
        "/dev/vdb7 /tmp/target.x/a\\040b ext4 rw 0 0\n"
        "/dev/vdb8 /tmp/target.xy ext4 rw 0 0\n"
        "proc /tmp/target.x/proc proc rw 0 0\n")
    assert helper.mounted_under("/tmp/target.x", str(mounts)) == [
        "/tmp/target.x/usr/local", "/tmp/target.x/usr", "/tmp/target.x/proc",
        "/tmp/target.x/a b", "/tmp/target.x"]


@pytest.mark.parametrize("files, expected", [
    ({"etc/coreos/": None, "etc/debian_version": "12"}, "coreos"),
    ({"etc/debian_version": "12", "etc/redhat-release": "x"}, "debian"),
    ({"etc/redhat-release": "Fedora"}, "redhat"),
    ({"etc/slackware-version": "15"}, "slackware"),
    ({"etc/SuSE-release": "x"}, "suse"),
    ({"etc/gentoo-release": "x"}, "gentoo"),
    ({"etc/arch-release": ""}, "arch"),
    ({"etc/freebsd-update.conf": ""}, "freebsd"),
    ({"etc/release": "NetBSD 9.3"}, "netbsd"),
    ({"etc/motd": "OpenBSD 7.3 (GENERIC)\nwelcome"}, "openbsd"),
    ({"etc/motd": "Welcome to OpenBSD"}, None),
    ({}, None),
])
def test_base_distro(tmp_path, monkeypatch, files, expected):
    monkeypatch.delenv("SNF_IMAGE_MONITOR", raising=False)
    write_tree(tmp_path, files)
    assert helper.base_distro(str(tmp_path)) == expected


def test_find_case_insensitive(tmp_path):
    (tmp_path / "Windows" / "System32").mkdir(parents=True)
    assert helper.find_case_insensitive(str(tmp_path), "windows/system32") == \
        os.path.join(str(tmp_path), "Windows", "System32")
    assert helper.find_case_insensitive(str(tmp_path), "windows/system64") is None


def test_one_line_is_protocol_safe():
    assert helper.one_line("a\nb\r\nc") == "a b  c"
    assert len(helper.one_line("x" * 2000)) == helper.PROGRESS_LINE_MAX


def test_library_die_and_run(capsys):
    with pytest.raises(SystemExit) as caught:
        helper.die("it broke\nbadly")
    assert caught.value.code == 1
    assert capsys.readouterr().err == "ERROR: it broke badly\n"
    result = helper.run(["sh", "-c", "echo out; echo err >&2"], capture=True)
    assert result.stdout == "out\n"
    assert capsys.readouterr().err == "err\n"
    assert helper.run(["cat"], input=b"\x00bytes", capture=True).stdout == b"\x00bytes"
    with pytest.raises(SystemExit):
        helper.run(["sh", "-c", "echo first >&2; echo 'the reason' >&2; exit 3"])
    assert capsys.readouterr().err.endswith("ERROR: sh failed (exit code 3): the reason\n")
    assert helper.run(["false"], check=False).returncode == 1
    with pytest.raises(SystemExit):
        helper.run(["/nonexistent/program", "secret-argument"])
    err = capsys.readouterr().err
    assert "Program not found: /nonexistent/program" in err and "secret-argument" not in err


def test_warn_goes_to_the_progress_port(tmp_path, monkeypatch, capsys):
    port = tmp_path / "progress"
    port.write_text("")
    monkeypatch.setenv("SNF_IMAGE_MONITOR", str(port))
    helper.warn("two\nlines")
    assert port.read_text() == "WARNING:two lines\n"
    assert capsys.readouterr().err == "Warning: two\nlines\n"


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.from_regex(r"SNF_IMAGE_[A-Z0-9_]{1,12}", fullmatch=True),
                       st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\0"),
                               max_size=30)),
       st.lists(st.text(min_size=1, max_size=20), max_size=4))
def test_rules_round_trip(env, disks):
    assert helper.parse_rules(json.dumps({"format": 1, "env": env, "disks": disks})) == (env, disks, None)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(["dos", "gpt"]),
       st.lists(st.tuples(st.integers(1, 12), st.sampled_from(["83", "5", "F", "82", "7"]),
                          st.integers(0, 10000), st.integers(1, 500)),
                min_size=1, max_size=8, unique_by=lambda entry: entry[0]))
def test_partition_to_resize_invariants(label, entries):
    parsed = table(label, *[(number, kind, None, start, size) for number, kind, start, size in entries])
    chosen = helper.partition_to_resize(parsed)
    ends = {number: start + size for number, _, start, size in entries}
    assert chosen in ends
    if label == "gpt" or max(ends) <= 4:
        assert ends[chosen] == max(ends.values())      # nothing ends after it
    else:
        primaries = {n: e for n, e in ends.items() if n <= 4} or ends
        logicals = {n: e for n, e in ends.items() if n > 4}
        assert ends[chosen] in (max(primaries.values()), max(logicals.values()))
