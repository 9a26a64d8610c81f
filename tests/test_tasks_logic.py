"""Unit tests of the pure logic of the Linux configuration tasks (tasks.d/):
password hashing against the system's crypt(3), shadow and authorized_keys
edits, network decisions and every network renderer, fstab handling,
partition growth arithmetic and swap placement, and the symlink-safe file
access that keeps injected files inside the image.  No root needed."""

import base64
import ctypes
import ctypes.util
import os
import stat
import subprocess
import sys

import pytest
from hypothesis import given, settings, strategies as st

from conftest import load_script

sys.dont_write_bytecode = True
HELPER = load_script("snf-image-helper.py", "snf_image_helper")


def load_task(name):
    return load_script(f"tasks.d/{name}", "task_" + name[2:].lower())


LIB = load_script("tasks.d/snf_image_tasklib.py", "snf_image_tasklib")
PASSWORD = load_task("50ChangePassword")
FIX = load_task("10FixPartitionTable")
MOUNT = load_task("30MountImage")
NETWORK = load_task("50ConfigureNetwork")
PERSONALITY = load_task("60EnforcePersonality")
HOSTNAME = load_task("50AssignHostname")
RESIZE_MOUNTED = load_task("40FilesystemResizeMounted")
SSHKEYS = load_task("50DeleteSSHKeys")
SWAP = load_task("50AddSwap")
SELINUX = load_task("50SELinuxAutorelabel")

TaskError = LIB.TaskError


# --------------------------------------------------------------------------
# Password hashes, checked with the system's own crypt(3)
# --------------------------------------------------------------------------

def system_crypt():
    name = ctypes.util.find_library("crypt")
    library = ctypes.CDLL(name or "libcrypt.so.1")
    library.crypt.restype = ctypes.c_char_p
    library.crypt.argtypes = [ctypes.c_char_p, ctypes.c_char_p]

    def crypt(password, setting):
        return library.crypt(password.encode(), setting.encode()).decode()
    return crypt


CRYPT = system_crypt()
SALTS = st.text(alphabet=PASSWORD.SALT_ALPHABET, min_size=0, max_size=20)
PASSWORDS = st.text(alphabet=st.characters(blacklist_categories=("Cs",),
                                           blacklist_characters="\0"), max_size=150)


@settings(max_examples=60, deadline=None)
@given(password=PASSWORDS, salt=SALTS)
def test_sha512_crypt_matches_system_crypt(password, salt):
    assert PASSWORD.sha_crypt(password, salt, method="sha512") == CRYPT(password, "$6$" + salt)


@settings(max_examples=60, deadline=None)
@given(password=PASSWORDS, salt=SALTS)
def test_sha256_crypt_matches_system_crypt(password, salt):
    assert PASSWORD.sha_crypt(password, salt, method="sha256") == CRYPT(password, "$5$" + salt)


@settings(max_examples=60, deadline=None)
@given(password=PASSWORDS, salt=SALTS)
def test_md5_crypt_matches_system_crypt(password, salt):
    assert PASSWORD.md5_crypt(password, salt) == CRYPT(password, "$1$" + salt[:8])


@pytest.mark.parametrize("length", [0, 1, 31, 32, 33, 63, 64, 65, 128, 200])
def test_sha_crypt_block_boundaries_and_rounds(length):
    password = "p" * length
    assert PASSWORD.sha_crypt(password, "saltsalt", rounds=1000) == \
        CRYPT(password, "$6$rounds=1000$saltsalt")
    assert PASSWORD.sha_crypt(password, "saltsalt", rounds=2000, method="sha256") == \
        CRYPT(password, "$5$rounds=2000$saltsalt")


def test_drepper_reference_vectors():
    # From the specification's own test table.
    assert PASSWORD.sha_crypt("Hello world!", "saltstring") == (
        "$6$saltstring$svn8UoSVapNtMuq1ukKS4tPQd8iKwSMHWjl/O817G3uBnIFNjnQJu"
        "esI68u4OTLiBFdcbYEdFCoEOfaS35inz1")
    assert PASSWORD.sha_crypt("Hello world!", "saltstringsaltstring", rounds=10000) == (
        "$6$rounds=10000$saltstringsaltst$OW1/O6BYHV6BcXZu8QVeXbDWra3Oeqh0sbHbbMCVNSnCM/UrjmM0Dp"
        "8vOuZeHBy/YTBmSK6H9qs/y3RnOaw5v.")


def test_openssl_agrees():
    # A fixed test password in argv is fine in a test.
    result = subprocess.run(["openssl", "passwd", "-6", "-salt", "abcdefgh", "test-password"],
                            capture_output=True, text=True, check=True)
    assert PASSWORD.sha_crypt("test-password", "abcdefgh") == result.stdout.strip()


def test_hash_password_uses_fresh_salts_and_verifies():
    first = PASSWORD.hash_password("secret", "sha512")
    second = PASSWORD.hash_password("secret", "sha512")
    assert first != second and first.startswith("$6$")
    assert CRYPT("secret", first) == first
    assert CRYPT("secret", PASSWORD.hash_password("secret", "md5")).startswith("$1$")
    assert CRYPT("secret", PASSWORD.hash_password("secret", "blowfish")).startswith("$2b$")
    with pytest.raises(TaskError, match="not supported"):
        PASSWORD.hash_password("secret", "sha1")


def test_hashing_method_choice():
    assert PASSWORD.choose_method(None, None) == ("sha512", False)
    assert PASSWORD.choose_method(None, "ENCRYPT_METHOD SHA256\n") == ("sha256", False)
    assert PASSWORD.choose_method(None, "# ENCRYPT_METHOD MD5\nENCRYPT_METHOD YESCRYPT\n") == \
        ("yescrypt", False)
    assert PASSWORD.choose_method(None, "ENCRYPT_METHOD DES\n") == ("sha512", False)
    assert PASSWORD.choose_method("MD5", "ENCRYPT_METHOD SHA256") == ("md5", True)
    with pytest.raises(TaskError, match="Invalid PASSWD_HASHING_METHOD"):
        PASSWORD.choose_method("rot13", None)


SHADOW = """root:*:19000:0:99999:7:::
rootbeer:$6$x$y:19000:0:99999:7:::
user:!:19000:1:90:7:30::
"""


def test_update_shadow_changes_only_the_named_users():
    text = PASSWORD.update_shadow(SHADOW, ["root", "user"], "$6$s$h", 20000)
    lines = text.splitlines()
    assert lines[0] == "root:$6$s$h:20000:0:99999:7:::"
    assert lines[1] == "rootbeer:$6$x$y:19000:0:99999:7:::"
    assert lines[2] == "user:$6$s$h:20000:1:90:7:30::"


def test_update_shadow_missing_user():
    with pytest.raises(TaskError, match="`roo' does not exist"):
        PASSWORD.update_shadow(SHADOW, ["roo"], "$6$s$h", 1)


@pytest.mark.parametrize("template, expected", [
    (".ssh/authorized_keys", "/home/u/.ssh/authorized_keys"),
    ("%h/.ssh/keys_%u", "/home/u/.ssh/keys_u"),
    ("/etc/ssh/keys/%u", "/etc/ssh/keys/u"),
    ("/etc/ssh/keys/%U%%", "/etc/ssh/keys/1000%"),
    ("~/k", "/home/u/k"),
])
def test_authorized_keys_path(template, expected):
    assert PASSWORD.authorized_keys_path(template, "u", 1000, "/home/u") == expected


def test_sshd_config_first_value_with_include_and_match(tmp_path):
    (tmp_path / "etc/ssh/sshd_config.d").mkdir(parents=True)
    (tmp_path / "etc/ssh/sshd_config").write_text(
        "Include /etc/ssh/sshd_config.d/*.conf\nAuthorizedKeysFile .ssh/a .ssh/b\n"
        "Match User x\n  AuthorizedKeysFile /x\n")
    (tmp_path / "etc/ssh/sshd_config.d/10-keys.conf").write_text(
        "# comment\nAuthorizedKeysFile none /etc/ssh/k/%u\n")
    with LIB.ImageRoot(tmp_path) as root:
        directives = LIB.sshd_config_directives(root)
    assert PASSWORD.authorized_keys_template(directives) == "/etc/ssh/k/%u"
    assert PASSWORD.authorized_keys_template([]) == ".ssh/authorized_keys"
    assert PASSWORD.authorized_keys_template([("authorizedkeysfile", ["none"])]) is None


def test_chpasswd_config_per_cloud_init_version():
    old = PASSWORD.chpasswd_config(["root"], "$6$s$h", True, (20, 1))
    assert old == "ssh_pwauth: True\nchpasswd:\n  expire: false\n  list: |\n    root:$6$s$h\n"
    assert "  list: |\n" in PASSWORD.chpasswd_config(["root"], "$6$s$h", True, None)
    new = PASSWORD.chpasswd_config(["root"], 'pa"ss: #x', False, (22, 3))
    assert new.endswith('  users:\n    - name: "root"\n      password: "pa\\"ss: #x"\n'
                        "      type: text\n")


def test_merge_keys_appends_only_new_keys():
    existing = "ssh-ed25519 AAAA old"
    merged = PASSWORD.merge_keys(existing, ["ssh-ed25519 AAAA old", "ssh-rsa BBBB new"])
    assert merged == "ssh-ed25519 AAAA old\nssh-rsa BBBB new\n"
    assert PASSWORD.key_lines(" a \n\n# c\nb\n") == ["a", "b"]


# --------------------------------------------------------------------------
# Partition growth and swap placement
# --------------------------------------------------------------------------

P = FIX.Partition
C = FIX.Change
MIB = 2048
TOTAL = 600 * MIB          # a 600 MiB disk, 512-byte sectors
END = TOTAL - MIB          # where growth stops (exclusive)


def plan(label, partitions, swap=None, total=TOTAL):
    return FIX.Planner(label, partitions, total, 512).plan(swap)


def test_single_primary_grows_to_one_mib_before_the_end():
    assert plan("dos", [P(1, 2048, 100 * MIB, "83")]) == [C(1, 2048, END - 2048, None)]


def test_primary_with_primary_swap():
    assert plan("dos", [P(1, 2048, 100 * MIB, "83")], (2, 64)) == [
        C(1, 2048, END - 64 * MIB - 2048, None), C(2, END - 64 * MIB, 64 * MIB, "82")]


def test_primary_with_logical_swap_makes_an_extended_partition():
    changes = plan("dos", [P(1, 2048, 100 * MIB, "83")], (5, 64))
    swap_start = END - 64 * MIB
    assert changes == [C(1, 2048, swap_start - MIB - 2048, None),
                       C(2, swap_start - MIB, 64 * MIB + MIB, "5"),
                       C(5, swap_start, 64 * MIB, "82")]


def test_logical_partition_grows_with_its_extended_partition():
    parts = [P(1, 2048, 100 * MIB, "83"), P(2, 101 * MIB, 50 * MIB, "5"),
             P(5, 102 * MIB, 49 * MIB, "83")]
    assert plan("dos", parts) == [C(2, 101 * MIB, END - 101 * MIB, None),
                                  C(5, 102 * MIB, END - 102 * MIB, None)]
    swap_start = END - 32 * MIB
    assert plan("dos", parts, (6, 32)) == [
        C(2, 101 * MIB, END - 101 * MIB, None),
        C(5, 102 * MIB, swap_start - MIB - 102 * MIB, None),
        C(6, swap_start, 32 * MIB, "82")]
    assert plan("dos", parts, (3, 32)) == [
        C(2, 101 * MIB, swap_start - 101 * MIB, None),
        C(5, 102 * MIB, swap_start - 102 * MIB, None),
        C(3, swap_start, 32 * MIB, "82")]


def test_extended_type_0f_and_primary_after_extended():
    parts = [P(1, 2048, 10 * MIB, "83"), P(2, 11 * MIB, 10 * MIB, "F"),
             P(5, 12 * MIB, 9 * MIB, "83"), P(3, 21 * MIB, 10 * MIB, "83")]
    assert plan("dos", parts) == [C(3, 21 * MIB, END - 21 * MIB, None)]
    with pytest.raises(TaskError, match="extended partition is not at the end"):
        plan("dos", parts, (6, 8))


def test_empty_extended_partition_last():
    parts = [P(1, 2048, 10 * MIB, "83"), P(2, 11 * MIB, 10 * MIB, "5")]
    assert plan("dos", parts) == [C(2, 11 * MIB, END - 11 * MIB, None)]
    assert plan("dos", parts, (5, 8))[-1] == C(5, END - 8 * MIB, 8 * MIB, "82")


def test_gpt_last_partition_and_swap():
    parts = [P(1, 2048, 10 * MIB, "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"),
             P(2, 11 * MIB, 100 * MIB, "0FC63DAF-8483-4772-8E79-3D69D8477DE4")]
    assert plan("gpt", parts) == [C(2, 11 * MIB, END - 11 * MIB, None)]
    assert plan("gpt", parts, (3, 16)) == [
        C(2, 11 * MIB, END - 16 * MIB - 11 * MIB, None),
        C(3, END - 16 * MIB, 16 * MIB, FIX.GPT_SWAP_TYPE)]


def test_the_partition_ending_last_grows_not_the_highest_number():
    # Debian's cloud images: BIOS boot 14 and ESP 15 first, root 1 last on the disk.
    parts = [P(14, 2048, 6144, "21686148-6449-6E6F-744E-656564454649"),
             P(15, 8192, 253952, "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"),
             P(1, 262144, 200 * MIB, "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709")]
    assert plan("gpt", parts) == [C(1, 262144, END - 262144, None)]
    assert plan("gpt", parts, (2, 16))[-1] == C(2, END - 16 * MIB, 16 * MIB, FIX.GPT_SWAP_TYPE)
    assert FIX.last_partition("dos", [P(1, 2048, MIB, "83"), P(2, 10 * MIB, MIB, "83"),
                                      P(3, 5 * MIB, MIB, "83")]) == 2


def test_logical_partitions_need_an_extended_one():
    for parts in ([P(1, 2048, MIB, "83"), P(5, 2 * MIB, MIB, "83")], [P(5, 2048, MIB, "83")]):
        with pytest.raises(TaskError, match="without an extended partition"):
            plan("dos", parts)


def test_the_task_grows_the_partition_the_helper_names():
    """One rule: the partition grown is SNF_IMAGE_RESIZE_PART's (partition_to_resize)."""
    parts = [P(1, 2048, MIB, "83"), P(2, 4 * MIB, 10 * MIB, "5"), P(5, 5 * MIB, MIB, "83"),
             P(6, 7 * MIB, MIB, "83"), P(3, 2 * MIB, MIB, "83")]
    table = {"label": "dos", "partitions": [p._asdict() for p in parts]}
    assert FIX.last_partition("dos", parts) == HELPER.partition_to_resize(table) == 6
    assert [c.number for c in plan("dos", parts)] == [2, 6]


def test_growing_over_another_partition_is_refused():
    planner = FIX.Planner("gpt", [P(1, 2048, MIB, "X"), P(2, 10 * MIB, MIB, "X")], TOTAL, 512)
    with pytest.raises(TaskError, match="Partition 2 lies after partition 1"):
        planner.grow(1, END, False)


def test_never_shrinks_and_swap_needs_room():
    full = [P(1, 2048, TOTAL - 2048 - 100, "83")]
    assert plan("dos", full) == []
    with pytest.raises(TaskError, match="Not enough free space"):
        plan("dos", full, (2, 16))
    with pytest.raises(TaskError, match="larger than the disk"):
        plan("dos", [P(1, 2048, MIB, "83")], (2, 10_000))


def test_mbr_growth_stops_where_32_bit_entries_end():
    (change,) = plan("dos", [P(1, 2048, MIB, "83")], total=2**33)
    assert change.start + change.size <= 2**32 - 1
    (change,) = plan("gpt", [P(1, 2048, MIB, "X")], total=2**33)
    assert change.start + change.size == 2**33 - MIB


def test_swap_number_rules():
    with pytest.raises(TaskError, match="already exists"):
        plan("dos", [P(1, 2048, MIB, "83"), P(2, 2 * MIB, MIB, "83")], (1, 8))
    with pytest.raises(TaskError, match="would be number 5, not 7"):
        plan("dos", [P(1, 2048, MIB, "83")], (7, 8))
    with pytest.raises(TaskError, match="would be number 6"):
        plan("dos", [P(1, 2048, MIB, "83"), P(2, 2 * MIB, 3 * MIB, "5"),
                     P(5, 3 * MIB, MIB, "83")], (9, 8))
    with pytest.raises(TaskError, match="No free primary partition slot"):
        plan("dos", [P(n, n * MIB, MIB, "83") for n in range(1, 5)], (5, 8))


@pytest.mark.parametrize("value, expected", [
    ("2:512", (2, 512)), ("5:1", (5, 1)), ("c", ("disk", "c")), ("B", ("disk", "b")),
    ("", None), (None, None)])
def test_parse_swap(value, expected):
    assert FIX.parse_swap(value) == expected


@pytest.mark.parametrize("value", ["0:512", "2:0", "2:", "ab", "1:-3", "x:1"])
def test_parse_swap_invalid(value):
    with pytest.raises(TaskError, match="not valid"):
        FIX.parse_swap(value)


def test_swap_device_letters():
    environ = {"SNF_IMAGE_DEV_COUNT": "3", "SNF_IMAGE_DEV_1": "/dev/vdc",
               "SNF_IMAGE_DEV_2": "/dev/vdd"}
    assert SWAP.swap_device("c", "/dev/vdb", environ) == "/dev/vdd"
    assert SWAP.swap_device("2:64", "/dev/loop3", environ) == "/dev/loop3p2"
    with pytest.raises(TaskError, match="first disk"):
        SWAP.swap_device("a", "/dev/vdb", environ)
    with pytest.raises(TaskError, match="not available"):
        SWAP.swap_device("d", "/dev/vdb", environ)
    assert SWAP.fstab_has_uuid('UUID="ab-1" none swap sw 0 0\n', "ab-1")
    assert not SWAP.fstab_has_uuid("# UUID=ab-1\n", "ab-1")


# --------------------------------------------------------------------------
# fstab
# --------------------------------------------------------------------------

FSTAB = r"""# /etc/fstab
UUID=1111-aaaa /               ext4  errors=remount-ro 0 1
LABEL=boot     /boot           ext4  defaults 0 2
PARTUUID=abcd-02 /boot/efi     vfat  umask=0077 0 1
/dev/sda5      /usr/local      xfs   defaults 0 2
/dev/vda6      /usr            btrfs subvol=@usr,compress=zstd 0 0
UUID=2222      none            swap  sw 0 0
proc           /proc           proc  defaults 0 0
tmpfs          /tmp            tmpfs defaults 0 0
/dev/sr0       /media/cdrom0   udf,iso9660 user,noauto 0 0
/dev/fd0       /mnt/floppy     auto  rw 0 0
server:/x      /srv/nfs        nfs   defaults 0 0
UUID=3333      /data           ext4  noauto 0 0
/dev/sdb1      /space\040dir   ext4  nofail 0 0
"""


def test_fstab_selection_and_order():
    warnings = []
    entries = MOUNT.select_entries(MOUNT.parse_fstab(FSTAB), warn=warnings.append)
    assert [entry.mount_point for entry in entries] == [
        "/boot", "/boot/efi", "/space dir", "/usr", "/usr/local"]
    assert any("/dev/fd0" in warning for warning in warnings)
    assert MOUNT.mount_options(entries[3]) == "rw,subvol=@usr"


def test_fstab_devices_resolve_only_to_partitions_of_the_image_disk():
    partitions = {1: {"UUID": "1111-AAAA", "LABEL": "root"},
                  2: {"UUID": "b", "LABEL": "boot", "PART_ENTRY_UUID": "ABCD-02"},
                  5: {"TYPE": "xfs"}, 6: {}}
    find = MOUNT.find_partition
    assert find("UUID=1111-aaaa", partitions) == 1
    assert find('LABEL="boot"', partitions) == 2
    assert find("PARTUUID=abcd-02", partitions) == 2
    assert find("/dev/disk/by-label/boot", partitions) == 2
    assert find("/dev/sda5", partitions) == 5
    assert find("/dev/vda6", partitions) == 6
    assert find("/dev/nvme0n1p1", partitions) == 1
    assert find("/dev/sdb1", partitions) is None
    assert find("LABEL=Boot", partitions) is None
    assert find("UUID=9999", partitions) is None


# --------------------------------------------------------------------------
# Network: upstream's per-NIC rules and the renderers
# --------------------------------------------------------------------------

def nics_env(*nics):
    environ = {"SNF_IMAGE_NIC_COUNT": str(len(nics))}
    for index, nic in enumerate(nics):
        for key, value in nic.items():
            environ[f"SNF_IMAGE_NIC_{index}_{key}"] = value
    return environ


STATIC = {"MAC": "AA:00:00:00:00:01", "IP": "10.0.1.5", "NETWORK_SUBNET": "10.0.1.0/24",
          "NETWORK_GATEWAY": "10.0.1.1", "NETWORK_GATEWAY6": "2001:db8::1",
          "NETWORK_SUBNET6": "2001:db8::/64"}
DHCP = {"MAC": "aa:00:00:00:00:02", "IP": "10.0.2.5", "NETWORK_SUBNET": "10.0.2.0/24",
        "NETWORK_TAGS": "nfdhcpd other"}


def plans_for(*nics, default="", warnings=None):
    warnings = [] if warnings is None else warnings
    return NETWORK.plan_nics(NETWORK.read_nics(nics_env(*nics)), ["nfdhcpd"], ["dhcpv6"],
                             ["nfdhcpd"], default, warnings.append)


def test_tag_rules():
    static, dhcp = plans_for(STATIC, DHCP)
    assert (static.name, static.mac, static.ipv4, static.ipv6) == \
        ("eth0", "aa:00:00:00:00:01", "static", "slaac")
    assert (static.address, static.prefix, static.gateway) == ("10.0.1.5", 24, "10.0.1.1")
    # nfdhcpd is both a DHCP and a stateless DHCPv6 tag, but no GATEWAY6: no IPv6
    assert (dhcp.ipv4, dhcp.ipv6) == ("dhcp", None)
    stateful = plans_for(dict(STATIC, NETWORK_TAGS="dhcpv6"), DHCP)[0]
    assert stateful.ipv6 == "dhcp" and stateful.ipv4 == "static"
    both = plans_for(dict(STATIC, NETWORK_TAGS="dhcpv6 nfdhcpd"), DHCP)[0]
    assert (both.ipv4, both.ipv6) == ("dhcp", "slaac_dhcp")


def test_missing_subnet_means_dhcp_and_no_ip_means_no_ipv4():
    plan = plans_for({"MAC": "aa:00:00:00:00:03", "IP": "10.0.0.9"}, DHCP)[0]
    assert plan.ipv4 == "dhcp"
    plan = plans_for({"MAC": "aa:00:00:00:00:03", "NETWORK_SUBNET": "10.0.0.0/24"}, DHCP)[0]
    assert (plan.ipv4, plan.ipv6) == (None, None)


@pytest.mark.parametrize("default, expected", [
    ("dhcp", ("dhcp", None)), ("dhcpv6", (None, "dhcp")), ("slaac", (None, "slaac")),
    ("slaac_dhcp", (None, "slaac_dhcp")), ("dhcp+slaac", ("dhcp", "slaac")),
    ("dhcp+dhcpv6", ("dhcp", "dhcp")), ("", (None, None))])
def test_default_nic_config(default, expected):
    warnings = []
    plan = plans_for({"MAC": "aa:00:00:00:00:09"}, default=default, warnings=warnings)[0]
    assert (plan.ipv4, plan.ipv6) == expected
    assert "Detected a default NIC" in warnings[0]


@pytest.mark.parametrize("default", ["static", "dhcpv6+dhcp", "dhcp+dhcp"])
def test_default_nic_config_invalid(default):
    with pytest.raises(TaskError, match="Invalid DEFAULT_NIC_CONFIG"):
        plans_for({"MAC": "aa:00:00:00:00:09"}, default=default)


def test_invalid_nic_data():
    with pytest.raises(TaskError, match="no valid MAC"):
        plans_for({"IP": "10.0.0.1"}, DHCP)
    with pytest.raises(TaskError, match="invalid IP"):
        plans_for(dict(STATIC, IP="10.0.1.500"))


def test_render_ifupdown_and_link_files():
    plans = plans_for(STATIC, DHCP)
    text = NETWORK.render_ifupdown(plans)["/etc/network/interfaces"]
    assert "auto lo\niface lo inet loopback\n" in text
    assert ("auto eth0\nallow-hotplug eth0\niface eth0 inet static\n    address 10.0.1.5\n"
            "    netmask 255.255.255.0\n    gateway 10.0.1.1\niface eth0 inet6 auto\n"
            "    privext 0\n") in text
    assert "auto eth1\nallow-hotplug eth1\niface eth1 inet dhcp\n" in text
    links = NETWORK.render_link_files(plans)
    assert links["/etc/systemd/network/10-snf-image-eth1.link"].endswith(
        "[Match]\nMACAddress=aa:00:00:00:00:02\n\n[Link]\nName=eth1\n")
    bare = plans_for({"MAC": "aa:00:00:00:00:07", "NETWORK_SUBNET": "10.9.0.0/24"}, DHCP)
    assert "allow-hotplug eth0\niface eth0 inet manual\n" in \
        NETWORK.render_ifupdown(bare)["/etc/network/interfaces"]
    rules = NETWORK.render_udev_rules(plans)["/etc/udev/rules.d/70-snf-image-net.rules"]
    assert 'ATTR{address}=="aa:00:00:00:00:01", NAME="eth0"' in rules


def test_render_networkd():
    files = NETWORK.render_networkd(plans_for(STATIC, dict(DHCP, NETWORK_GATEWAY6="fe80::1",
                                                           NETWORK_TAGS="nfdhcpd dhcpv6")))
    static = files["/etc/systemd/network/10-snf-image-eth0.network"]
    assert "[Match]\nMACAddress=aa:00:00:00:00:01\n" in static
    assert "Address=10.0.1.5/24\nGateway=10.0.1.1\nIPv6AcceptRA=yes\n" in static
    assert "DHCP=" not in static
    assert "DHCP=yes\n" in files["/etc/systemd/network/10-snf-image-eth1.network"]


def test_render_netplan():
    text = NETWORK.render_netplan(plans_for(STATIC, DHCP), "NetworkManager")[
        "/etc/netplan/50-snf-image.yaml"]
    assert "  renderer: NetworkManager\n" in text
    assert ('    eth0:\n      match:\n        macaddress: "aa:00:00:00:00:01"\n'
            "      set-name: eth0\n      addresses: [10.0.1.5/24]\n      routes:\n"
            "        - to: 0.0.0.0/0\n          via: 10.0.1.1\n      accept-ra: true\n") in text
    assert "    eth1:\n" in text and "      dhcp4: true\n" in text


def test_render_nm_keyfiles():
    files = NETWORK.render_nm(plans_for(STATIC, DHCP), make_uuid=lambda: "u-1")
    static = files["/etc/NetworkManager/system-connections/snf-image-eth0.nmconnection"]
    assert "mac-address=AA:00:00:00:00:01\n" in static
    assert "[ipv4]\nmethod=manual\naddress1=10.0.1.5/24,10.0.1.1\n" in static
    assert "method=auto\n" in static.split("[ipv6]")[1]
    dhcp = files["/etc/NetworkManager/system-connections/snf-image-eth1.nmconnection"]
    assert "[ipv4]\nmethod=auto\n" in dhcp and "method=ignore" in dhcp.split("[ipv6]")[1]


def test_render_ifcfg():
    files = NETWORK.render_ifcfg(plans_for(STATIC, DHCP))
    static = files["/etc/sysconfig/network-scripts/ifcfg-eth0"]
    for line in ("DEVICE=eth0", "HWADDR=aa:00:00:00:00:01", "BOOTPROTO=static",
                 "IPADDR=10.0.1.5", "NETMASK=255.255.255.0", "GATEWAY=10.0.1.1",
                 "IPV6INIT=yes", "IPV6_AUTOCONF=yes"):
        assert line + "\n" in static
    assert "BOOTPROTO=dhcp\n" in files["/etc/sysconfig/network-scripts/ifcfg-eth1"]


def make_tree(base, files):
    for path, content in files.items():
        full = base / path.lstrip("/")
        full.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, tuple):
            full.symlink_to(content[1])
        elif content is None:
            full.mkdir(exist_ok=True)
        else:
            full.write_text(content)


@pytest.mark.parametrize("files, expected", [
    ({"/etc/netplan/50-cloud-init.yaml": "network: {}", "/etc/network/interfaces": "",
      "/usr/sbin/ifup": ""}, "netplan"),
    ({"/etc/systemd/system/multi-user.target.wants/systemd-networkd.service":
      ("link", "/lib/systemd/system/systemd-networkd.service"),
      "/etc/systemd/network": None, "/etc/network/interfaces": ""}, "networkd"),
    ({"/etc/network/interfaces": "", "/usr/sbin/ifup": "",
      "/usr/sbin/NetworkManager": ""}, "ifupdown"),
    ({"/etc/network/interfaces": "", "/usr/sbin/NetworkManager": "",
      "/etc/sysconfig/network-scripts": None}, "nm"),
    ({"/etc/sysconfig/network-scripts": None}, "ifcfg"),
    ({"/etc/sysconfig/network-scripts": None, "/usr/sbin/NetworkManager": "",
      "/etc/NetworkManager/NetworkManager.conf": "[main]\nplugins=ifcfg-rh\n"}, "ifcfg"),
    ({"/etc/sysconfig/network-scripts": None, "/usr/sbin/NetworkManager": "",
      "/etc/NetworkManager/NetworkManager.conf": "[main]\nplugins=ifcfg-rh,keyfile\n"}, "nm"),
    ({"/etc/systemd/network": None}, None),
])
def test_detect_backend_by_content(tmp_path, files, expected):
    make_tree(tmp_path, files)
    with LIB.ImageRoot(tmp_path) as root:
        assert NETWORK.detect_backend(root) == expected


def test_netplan_renderer_is_kept():
    assert NETWORK.netplan_renderer(["network:\n  version: 2\n",
                                     "network:\n  renderer: NetworkManager\n"]) == "NetworkManager"
    assert NETWORK.netplan_renderer([""]) is None


# --------------------------------------------------------------------------
# Files inside the image: no way out
# --------------------------------------------------------------------------

@pytest.fixture
def image_tree(tmp_path):
    """An image root with malicious links, and a file outside it that must survive."""
    root = tmp_path / "root"
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "victim").write_text("original")
    (root / "etc").mkdir(parents=True)
    (root / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/sh\n"
                                     f"me:x:{os.getuid()}:{os.getgid()}::/home/me:/bin/sh\n")
    (root / "etc/group").write_text(f"root:x:0:\nmine:x:{os.getgid()}:\n")
    (root / "abs").symlink_to("/")                        # absolute: the image's root
    (root / "up").symlink_to("../outside")                 # relative, leaves the image
    (root / "etc/relup").symlink_to("../../outside")
    (root / "deep").mkdir()
    (root / "deep/dotdot").symlink_to("../..")
    (root / "victimlink").symlink_to(str(outside / "victim"))   # absolute host path
    (root / "loop1").symlink_to("loop2")
    (root / "loop2").symlink_to("loop1")
    (root / "afile").write_text("x")
    return root, outside


def test_absolute_symlink_means_the_image_root(image_tree):
    root_dir, outside = image_tree
    with LIB.ImageRoot(root_dir) as root:
        root.write("/abs/etc/new", "inside", mode=0o600, uid=os.getuid(), gid=os.getgid())
        root.write("/abs/abs/abs/tmp/x/y", "deep", parents=(0o750, os.getuid(), os.getgid()))
    assert (root_dir / "etc/new").read_text() == "inside"
    assert (root_dir / "tmp/x/y").read_text() == "deep"
    assert stat.S_IMODE((root_dir / "tmp/x").stat().st_mode) == 0o750


@pytest.mark.parametrize("path", [
    "/../outside/victim", "/etc/../../outside/victim", "/up/victim", "/etc/relup/victim",
    "/deep/dotdot/outside/victim", "/abs/../outside/victim"])
def test_escapes_are_refused(image_tree, path):
    root_dir, outside = image_tree
    with LIB.ImageRoot(root_dir) as root:
        with pytest.raises(TaskError, match="outside the image"):
            root.write(path, "pwned", parents=(0o755, os.getuid(), os.getgid()))
    assert (outside / "victim").read_text() == "original"
    assert sorted(os.listdir(outside)) == ["victim"]


def test_final_symlink_is_replaced_not_followed(image_tree):
    root_dir, outside = image_tree
    with LIB.ImageRoot(root_dir) as root:
        root.write("/victimlink", "new", mode=0o644)
    assert (outside / "victim").read_text() == "original"
    assert not (root_dir / "victimlink").is_symlink()
    assert (root_dir / "victimlink").read_text() == "new"


def test_symlink_loops_and_files_in_the_way(image_tree):
    root_dir, _ = image_tree
    with LIB.ImageRoot(root_dir) as root:
        with pytest.raises(TaskError, match="Too many symbolic links"):
            root.write("/loop1/x", "x", parents=(0o755, 0, 0))
        with pytest.raises(TaskError, match="not a directory"):
            root.write("/afile/x", "x", parents=(0o755, 0, 0))
        with pytest.raises(TaskError, match="is a directory"):
            root.write("/etc", "x")
        # reading follows in-image links but never leaves the image
        assert root.read_text("/victimlink") is None
        assert root.read_text("/abs/etc/passwd").startswith("root:")


def test_personality_injection(image_tree):
    root_dir, outside = image_tree
    items = [{"path": "/home/me/.config/app.conf", "contents": base64.b64encode(b"a=1").decode(),
              "owner": "me", "group": "mine", "mode": 420},
             {"path": "/etc/motd", "contents": base64.b64encode(b"hi\n").decode()},
             {"path": "/abs/up/victim", "contents": base64.b64encode(b"x").decode()}]
    files = PERSONALITY.parse_personality(__import__("json").dumps(items[:2]))
    with LIB.ImageRoot(root_dir) as root:
        if os.geteuid() != 0:
            files = [f._replace(owner="me", group="mine") for f in files]
        PERSONALITY.inject(root, files)
        evil = PERSONALITY.parse_personality(__import__("json").dumps(items[2:]))
        with pytest.raises(TaskError, match="outside the image"):
            PERSONALITY.inject(root, evil)
    conf = root_dir / "home/me/.config/app.conf"
    assert conf.read_bytes() == b"a=1"
    assert stat.S_IMODE(conf.stat().st_mode) == 0o644
    assert conf.stat().st_uid == os.getuid()
    assert stat.S_IMODE((root_dir / "home/me/.config").stat().st_mode) == 0o750
    assert (outside / "victim").read_text() == "original"


@pytest.mark.parametrize("text, message", [
    ("{", "not valid JSON"), ("{}", "JSON list"), ('[{"contents": ""}]', "valid `path'"),
    ('[{"path": "/x"}]', "no `contents'"), ('[{"path": "/x", "contents": "!!"}]', "base64"),
    ('[{"path": "/x", "contents": "", "mode": "0644x"}]', "Invalid mode"),
    ('[{"path": "/x", "contents": "", "mode": 70000}]', "Invalid mode")])
def test_personality_invalid(text, message):
    with pytest.raises(TaskError, match=message):
        PERSONALITY.parse_personality(text)


def test_personality_defaults_and_unknown_owner(image_tree):
    root_dir, _ = image_tree
    (item,) = PERSONALITY.parse_personality('[{"path": "/x", "contents": "YQ=="}]')
    assert (item.owner, item.group, item.mode) == ("", "", 0o440)
    with LIB.ImageRoot(root_dir) as root:
        with pytest.raises(TaskError, match="`nobody' of /x does not exist"):
            PERSONALITY.inject(root, [item._replace(owner="nobody")])


# --------------------------------------------------------------------------
# Smaller pieces
# --------------------------------------------------------------------------

def test_hosts_127_0_1_1_line():
    text = "127.0.0.1\tlocalhost\n127.0.1.1\told.example old\n::1 localhost\n"
    assert HOSTNAME.update_hosts(text, "vm1.example.org", False) == \
        "127.0.0.1\tlocalhost\n127.0.1.1\tvm1.example.org vm1\n::1 localhost\n"
    assert HOSTNAME.update_hosts("127.0.0.1 localhost\n", "vm1", True) == \
        "127.0.0.1 localhost\n127.0.1.1\tvm1\n"
    assert HOSTNAME.update_hosts("127.0.0.1 localhost\n", "vm1", False) == "127.0.0.1 localhost\n"
    assert HOSTNAME.set_variable("A=1\nHOSTNAME=old\n", ["HOSTNAME"], "HOSTNAME=new") == \
        "A=1\nHOSTNAME=new\n"
    assert HOSTNAME.set_variable(None, ["hostname"], 'hostname="x"') == 'hostname="x"\n'


def ext_superblock(state=1, compat=0, incompat=0, ro_compat=0):
    block = bytearray(1024)
    block[0x38:0x3A] = b"\x53\xef"
    block[0x3A:0x3C] = state.to_bytes(2, "little")
    for offset, value in ((0x5C, compat), (0x60, incompat), (0x64, ro_compat)):
        block[offset:offset + 4] = value.to_bytes(4, "little")
    return bytes(block)


def test_ext_superblock_state_type_and_btrfs_parsing():
    for state, incompat, words, recovery in ((2, 0x4, "not clean with errors", True),
                                             (0, 0, "not clean", False),
                                             (1, 0x2c2, "clean", False)):
        superblock = LIB.ExtSuperblock(ext_superblock(state=state, incompat=incompat))
        assert (superblock.state_words(), superblock.needs_recovery()) == (words, recovery)
    assert LIB.ext_type(ext_superblock(incompat=0x2)) == "ext2"
    assert LIB.ext_type(ext_superblock(compat=0x4, incompat=0x6, ro_compat=0x3)) == "ext3"
    assert LIB.ext_type(ext_superblock(compat=0x4, incompat=0x2c2, ro_compat=0x46b)) == "ext4"
    assert LIB.ext_type(ext_superblock(incompat=0x40)) == "ext4"        # extents, no journal
    assert LIB.ext_type(ext_superblock(incompat=0x8)) is None           # an external journal
    shown = ("Label: none  uuid: 1\n\tTotal devices 1 FS bytes used 1MiB\n"
             "\tdevid    3 size 1.00GiB used 1MiB path /dev/null\n")
    assert RESIZE_MOUNTED.btrfs_devid(shown, "/dev/null") == "3"
    assert RESIZE_MOUNTED.btrfs_devid(shown, "/dev/zero") == "1"


def ext4_superblock(blocks=261888, compat=0x14, incompat=0x2c2, ro_compat=0x46b,
                    reserved_gdt=127, state=1):
    """The superblock of the 1 GiB Debian test image's root (4 KiB blocks)."""
    block = bytearray(ext_superblock(state, compat, incompat, ro_compat))
    for offset, size, value in ((0x04, 4, blocks & 0xFFFFFFFF), (0x150, 4, blocks >> 32),
                                (0x18, 4, 2), (0x14, 4, 0), (0x20, 4, 32768), (0x28, 4, 8192),
                                (0x4C, 4, 1), (0x58, 2, 256), (0xCE, 2, reserved_gdt),
                                (0xFE, 2, 64)):
        block[offset:offset + size] = value.to_bytes(size, "little")
    return LIB.ExtSuperblock(bytes(block))


def test_ext_growth_plan_from_the_superblock():
    sb = ext4_superblock()
    # the benchmark's partition: 5763072 sectors, as resize2fs grows it
    assert sb.fitting_blocks(5763072 * 512) == 720384
    # a last group (22: no backup) of 100 blocks cannot hold its 514 blocks
    # of metadata and 50 more; one of 600 can
    assert sb.fitting_blocks((22 * 32768 + 100) * 4096 + 4095) == 22 * 32768
    assert sb.fitting_blocks((22 * 32768 + 600) * 4096) == 22 * 32768 + 600
    assert sb.online_obstacle(720384) is None
    assert [sb.has_backup(group) for group in range(10)] == \
        [True, True, False, True, False, True, False, True, False, True]
    assert not sb.has_backup(15) and sb.has_backup(25) and sb.has_backup(49)
    cases = [({"incompat": 0x2c6}, "its journal needs recovery"),
             ({"compat": 0x10}, "no journal"),
             ({"ro_compat": 0x46b | 0x200}, "bigalloc"),
             ({"compat": 0x214}, "sparse_super2"),
             ({"compat": 0x4}, "neither resize_inode nor meta_bg"),
             # 9 GiB: 72 groups, two descriptor blocks of 64
             ({"reserved_gdt": 0, "size": 9 << 30}, "more group descriptors than the reserved ones"),
             ({"state": 3}, "errors recorded"),
             ({"blocks": 800000}, "larger than its partition")]
    for fields, reason in cases:
        size = fields.pop("size", 5763072 * 512)
        changed = ext4_superblock(**fields)
        assert changed.online_obstacle(changed.fitting_blocks(size)) == reason
    nine_gib = ext4_superblock().fitting_blocks(9 << 30)
    assert ext4_superblock(reserved_gdt=1).online_obstacle(nine_gib) is None
    # mounted, the journal in use says it needs recovery: that is no obstacle then
    assert ext4_superblock(incompat=0x2c6).online_obstacle(720384, mounted=True) is None
    assert ext4_superblock(compat=0x4, incompat=0x2d2).online_obstacle(720384) is None  # meta_bg
    narrow = ext4_superblock(incompat=0x242)                 # 32-bit: 16 TiB at most
    assert narrow.fitting_blocks(1 << 44) == (1 << 32) - 1
    assert narrow.fitting_blocks(1 << 45) is None
    assert narrow.online_obstacle(None) == "too large for a 32-bit file system"


def test_ssh_key_types_and_selinux_config():
    assert SSHKEYS.key_type("/k", "-----BEGIN OPENSSH PRIVATE KEY-----") == "ed25519"
    assert SSHKEYS.key_type("/etc/ssh/my_ecdsa_key", None) == "ecdsa"
    assert SSHKEYS.key_type("/etc/ssh/other", None) == "rsa"
    assert SELINUX.selinux_mode("# x\nSELINUX=enforcing\nSELINUXTYPE=targeted\n") == "enforcing"
    assert SELINUX.selinux_mode(None) is None
