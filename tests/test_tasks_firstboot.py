"""First-boot mechanisms of Linux images, decided before the image boots:
systemd's first-boot semantics of /etc/machine-id, units pulled in, masked
or conditioned (snf_image_tasklib), who makes the new SSH host keys
(50DeleteSSHKeys), the first-boot wizard kept off the console
(50ChangeMachineId), NetworkManager profiles taken out of use
(50ConfigureNetwork) and the password hash the image's PAM expects
(50ChangePassword).  The task scripts run against image trees in a
directory, as tests/test_tasks_tree.py does; writing root-owned files needs
root."""

import ctypes
import os
import subprocess

import pytest

from conftest import REPO, image_tree, load_script, require_programs, require_root

load_script("snf-image-helper.py", "snf_image_helper")
LIB = load_script("tasks.d/snf_image_tasklib.py", "snf_image_tasklib")
PASSWORD = load_script("tasks.d/50ChangePassword", "task_changepassword")
TASKS = REPO / "tasks.d"

DEBIAN13_KEYGEN = """[Unit]
Description=Generate sshd host keys on first boot
ConditionFirstBoot=yes
ConditionPathIsReadWrite=/etc/ssh
ConditionPathIsSymbolicLink=!/etc/ssh
Before=ssh.service sshd.service sshd@.service

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=ssh-keygen -A
"""
REDHAT_KEYGEN = """[Unit]
Description=OpenSSH %i Server Key Generation
ConditionFileNotEmpty=|!/etc/ssh/ssh_host_%i_key

[Service]
Type=oneshot
ExecStart=/usr/libexec/openssh/sshd-keygen %i
"""
FIRSTBOOT = """[Unit]
ConditionPathIsReadWrite=/etc
ConditionFirstBoot=yes

[Service]
Type=oneshot
ExecStart=systemd-firstboot --prompt-locale --prompt-keymap --prompt-timezone --prompt-root-password
"""
UNITS = "/usr/lib/systemd/system"
WANTS = "/etc/systemd/system/multi-user.target.wants"
SYSTEMD_257 = {"/usr/lib/x86_64-linux-gnu/systemd/libsystemd-shared-257.so": ""}


def debian13(base, machine_id, **extra):
    files = {"/etc/machine-id": machine_id, **SYSTEMD_257,
             f"{UNITS}/ssh.service": "[Service]\nExecStart=/usr/sbin/sshd -D\n",
             f"{UNITS}/sshd-keygen.service": DEBIAN13_KEYGEN,
             f"{WANTS}/ssh.service": ("link", f"{UNITS}/ssh.service"),
             "/etc/systemd/system/ssh.service.wants/sshd-keygen.service":
                 ("link", f"{UNITS}/sshd-keygen.service"),
             "/usr/sbin/sshd": "", "/etc/ssh/sshd_config": "PermitRootLogin yes\n",
             "/etc/ssh/ssh_host_ed25519_key": "old", "/etc/ssh/ssh_host_ed25519_key.pub": "old",
             "/etc/ssh/ssh_host_rsa_key": "old", "/etc/ssh/ssh_host_rsa_key.pub": "old",
             "/etc/ssh/ssh_host_dsa_key": "old"}
    files.update(extra)
    return image_tree(base, files)


# --------------------------------------------------------------------------
# machine-id(5) first-boot semantics and unit conditions (no root needed)
# --------------------------------------------------------------------------

@pytest.mark.parametrize("content, state, first_boot", [
    (None, "missing", True), ("uninitialized\n", "uninitialized", True),
    ("", "empty", False), ("\n", "empty", False), ("0123456789abcdef" * 2 + "\n", "id", False)])
def test_machine_id_states(tmp_path, content, state, first_boot):
    files = dict(SYSTEMD_257)
    if content is not None:
        files["/etc/machine-id"] = content
    with LIB.ImageRoot(image_tree(tmp_path, files)) as root:
        assert LIB.machine_id_state(root) == state
        assert LIB.is_first_boot(root) is first_boot


def test_uninitialized_is_no_first_boot_before_systemd_247(tmp_path):
    root_dir = image_tree(tmp_path, {"/etc/machine-id": "uninitialized\n",
                               "/usr/lib/systemd/libsystemd-shared-246.so": ""})
    with LIB.ImageRoot(root_dir) as root:
        assert LIB.systemd_version(root) == 246
        assert LIB.is_first_boot(root) is False


def test_debian13_keygen_runs_only_on_a_first_boot(tmp_path):
    with LIB.ImageRoot(debian13(tmp_path / "id", "1" * 32 + "\n")) as root:
        assert LIB.unit_will_run(root, "sshd-keygen.service") is False
    with LIB.ImageRoot(debian13(tmp_path / "empty", "")) as root:
        assert LIB.unit_will_run(root, "sshd-keygen.service") is False
    with LIB.ImageRoot(debian13(tmp_path / "first", "uninitialized\n")) as root:
        assert LIB.unit_will_run(root, "sshd-keygen.service") is True


def test_masked_not_pulled_and_dropin_conditions(tmp_path):
    masked = debian13(tmp_path / "masked", "uninitialized\n", **{
        "/etc/systemd/system/sshd-keygen.service": ("link", "/dev/null")})
    with LIB.ImageRoot(masked) as root:
        assert LIB.unit_masked(root, "sshd-keygen.service")
        assert LIB.unit_will_run(root, "sshd-keygen.service") is False
    lonely = image_tree(tmp_path / "lonely", {"/etc/machine-id": "", **SYSTEMD_257,
                                        f"{UNITS}/sshd-keygen.service": DEBIAN13_KEYGEN})
    with LIB.ImageRoot(lonely) as root:
        assert LIB.unit_will_run(root, "sshd-keygen.service", first_boot=True) is False
    # A drop-in that resets the conditions makes it run on every boot.
    dropin = debian13(tmp_path / "dropin", "1" * 32 + "\n", **{
        "/etc/systemd/system/sshd-keygen.service.d/always.conf":
            "[Unit]\nConditionFirstBoot=\nConditionPathIsReadWrite=\n"})
    with LIB.ImageRoot(dropin) as root:
        assert LIB.unit_will_run(root, "sshd-keygen.service") is True
    # A condition only the running system can tell: not decidable offline.
    kernel = debian13(tmp_path / "kernel", "uninitialized\n", **{
        "/etc/systemd/system/sshd-keygen.service.d/k.conf":
            "[Unit]\nConditionKernelCommandLine=!nokeys\n"})
    with LIB.ImageRoot(kernel) as root:
        assert LIB.unit_will_run(root, "sshd-keygen.service") is None
    # Paths made at boot (Red Hat's cloud-init drop-in) cannot be decided either.
    runtime = debian13(tmp_path / "runtime", "uninitialized\n", **{
        "/usr/lib/systemd/system/sshd-keygen.service.d/cloud.conf":
            "[Unit]\nConditionPathExists=!/run/systemd/generator.early/multi-user.target.wants/"
            "cloud-init.target\n"})
    with LIB.ImageRoot(runtime) as root:
        assert LIB.unit_will_run(root, "sshd-keygen.service") is None


def test_redhat_template_through_its_target(tmp_path):
    root_dir = image_tree(tmp_path, {
        "/etc/machine-id": "1" * 32 + "\n", **SYSTEMD_257,
        f"{UNITS}/sshd.service": "[Unit]\nWants=sshd-keygen.target\n[Service]\nExecStart=/usr/sbin/sshd\n",
        f"{UNITS}/sshd-keygen.target": "[Unit]\nWants=sshd-keygen@rsa.service sshd-keygen@ed25519.service\n",
        f"{UNITS}/sshd-keygen@.service": REDHAT_KEYGEN,
        f"{WANTS}/sshd.service": ("link", f"{UNITS}/sshd.service")})
    with LIB.ImageRoot(root_dir) as root:
        pulled = LIB.pulled_units(root)
        assert {"sshd-keygen.target", "sshd-keygen@rsa.service"} <= pulled
        # Triggering condition on %i: true once the key is gone.
        assert LIB.unit_will_run(root, "sshd-keygen@rsa.service") is True
        (tmp_path / "etc/ssh").mkdir()
        (tmp_path / "etc/ssh/ssh_host_rsa_key").write_text("key")
        assert LIB.unit_will_run(root, "sshd-keygen@rsa.service") is False


# --------------------------------------------------------------------------
# One analysis of the image's units (SystemdUnits)
# --------------------------------------------------------------------------

def merged_usr(base, **extra):
    """A merged-/usr image (/lib is usr/lib) whose units name each other
    through aliases, masks, drop-ins and a template."""
    files = {"/lib": ("link", "usr/lib"), "/etc/machine-id": "1" * 32 + "\n", **SYSTEMD_257,
             f"{UNITS}/ssh.service": "[Unit]\nWants=keys@rsa.service keys@ed25519.service\n"
                                     "[Service]\nExecStart=/usr/sbin/sshd -D\n",
             f"{UNITS}/keys@.service": "[Unit]\nConditionPathExists=!/etc/ssh/%i\n"
                                       "[Service]\nExecStart=ssh-keygen -t %i\n",
             f"{UNITS}/keys@.service.d/10-base.conf": "[Service]\nNice=1\n",
             f"{UNITS}/keys@rsa.service.d/10-base.conf": "[Service]\nNice=2\n",
             f"{UNITS}/keys@rsa.service.d/20-more.conf": "[Service]\nNice=3\n",
             "/etc/systemd/system/keys@.service.d/15-site.conf": "[Service]\nIOWeight=5\n",
             "/etc/systemd/system/keys@.service.d/10-base.conf": "[Service]\nNice=4\n",
             "/etc/systemd/system/sshd.service": ("link", "/lib/systemd/system/ssh.service"),
             f"{WANTS}/sshd.service": ("link", "/etc/systemd/system/sshd.service"),
             f"{UNITS}/getty.target": "[Unit]\nWants=gone.service\n",
             f"{UNITS}/gone.service": "[Service]\nExecStart=/bin/true\n",
             "/etc/systemd/system/gone.service": ("link", "/dev/null"),
             "/etc/systemd/system/getty.target.wants/empty.service": ("link", "../empty.service"),
             "/etc/systemd/system/empty.service": "",
             f"{WANTS}/getty.target": ("link", f"{UNITS}/getty.target")}
    files.update(extra)
    return image_tree(base, files)


def test_one_analysis_answers_like_a_question_at_a_time(tmp_path):
    image = merged_usr(tmp_path)
    names = ["ssh.service", "sshd.service", "keys@rsa.service", "keys@ed25519.service",
             "keys@.service", "gone.service", "empty.service", "getty.target", "absent.service"]
    with LIB.ImageRoot(image) as root, LIB.SystemdUnits(root) as units:
        settings = {}
        assert units.pulled(settings) == LIB.pulled_units(root) == {
            "sshd.service", "keys@rsa.service", "keys@ed25519.service", "getty.target",
            "gone.service", "empty.service"}
        assert settings["sshd.service"]["Service.ExecStart"] == ["/usr/sbin/sshd -D"]
        for name in names:
            assert units.unit_file(name) == LIB.unit_file(root, name)
            assert units.masked(name) == LIB.unit_masked(root, name)
            assert units.settings(name) == LIB.unit_settings(root, name)
            assert units.will_run(name) == LIB.unit_will_run(root, name)
        # an alias is read through its link, inside the image
        assert units.unit_file("sshd.service") == "/etc/systemd/system/sshd.service"
        assert units.settings("sshd.service")["Unit.Wants"] == \
            ["keys@rsa.service keys@ed25519.service"]
        # masks: a link to /dev/null hides the vendor unit; an empty file
        assert units.masked("gone.service") and units.masked("empty.service")
        assert not units.masked("ssh.service") and not units.masked("absent.service")
        assert units.will_run("gone.service") is False
        # an instance: its template's file, the template's and its own drop-ins
        # in name order, /etc's drop-in of a name replacing /usr/lib's
        assert units.unit_file("keys@rsa.service") == f"{UNITS}/keys@.service"
        assert units.settings("keys@rsa.service")["Service.Nice"] == ["4", "3"]
        assert units.settings("keys@ed25519.service")["Service.Nice"] == ["4"]
        assert units.settings("keys@ed25519.service")["Service.IOWeight"] == ["5"]
        assert units.settings("absent.service") is None
        assert units.will_run("keys@rsa.service") is True
        (tmp_path / "etc/ssh").mkdir()
        (tmp_path / "etc/ssh/rsa").write_text("key")
        assert units.will_run("keys@rsa.service") is False      # conditions are not cached


def test_each_directory_listed_and_each_file_read_once(tmp_path, monkeypatch):
    image = merged_usr(tmp_path)
    opened, listed = [], []
    real_open, real_scandir = os.open, os.scandir

    def counting_open(path, *args, **kwargs):
        opened.append(os.path.basename(path))
        return real_open(path, *args, **kwargs)

    def counting_scandir(fd):
        listed.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real_scandir(fd)

    with LIB.ImageRoot(image) as root:
        monkeypatch.setattr(os, "open", counting_open)
        monkeypatch.setattr(os, "scandir", counting_scandir)
        with LIB.SystemdUnits(root) as units:
            pulled = units.pulled({})
            for name in sorted(pulled) * 2:
                units.will_run(name)
                units.settings(name)
        monkeypatch.undo()
    assert len(listed) == len(set(listed)), "a directory listed twice (/lib is /usr/lib)"
    assert str(image / "usr/lib/systemd/system") in listed
    reads = [name for name in opened if name.endswith((".service", ".target", ".conf"))]
    assert len(reads) == len(set(reads)) and "keys@.service" in reads and "20-more.conf" in reads


def test_units_never_read_outside_the_image(tmp_path):
    outside = tmp_path / "outside"
    image_tree(outside, {"/evil.service": "[Unit]\nWants=evil-too.service\n",
                         "/evil-too.service": "[Service]\nExecStart=ssh-keygen -A\n",
                         "/units/multi-user.target.wants/evil.service":
                             ("link", "../../evil.service"),
                         "/units/evil.service": "[Service]\nExecStart=ssh-keygen -A\n"})
    image = image_tree(tmp_path / "image", {
        "/etc/machine-id": "", **SYSTEMD_257,
        # unit directories that lead out of the image are not listed
        "/etc/systemd/system": ("link", "../../../outside/units"),
        "/usr/local/lib/systemd/system": ("link", str(outside / "units")),
        # a unit or a drop-in linked outside is not read; a .wants linked outside not listed
        f"{UNITS}/evil.service": ("link", "../../../../../outside/evil.service"),
        f"{UNITS}/ok.service.d/evil.conf": ("link", "../../../../../../outside/evil.service"),
        f"{UNITS}/ok.service": "[Service]\nExecStart=/bin/true\n",
        f"{UNITS}/ok.target.wants":
            ("link", "../../../../../outside/units/multi-user.target.wants"),
        f"{UNITS}/sockets.target.wants/evil.service": ("link", "../evil.service")})
    with LIB.ImageRoot(image) as root, LIB.SystemdUnits(root) as units:
        settings = {}
        assert units.pulled(settings) == {"evil.service"}
        assert settings == {"evil.service": {}}
        assert units.unit_file("evil.service") == f"{UNITS}/evil.service"
        assert units.settings("ok.service") == {"Service.ExecStart": ["/bin/true"]}


def test_unit_directories_through_links_inside_the_image(tmp_path):
    """An /etc/systemd/system that is a link (absolute: the image's root), a
    .wants and a drop-in directory that are links, a directory named like a unit."""
    image = image_tree(tmp_path, {
        "/etc/machine-id": "uninitialized\n", **SYSTEMD_257,
        "/etc/systemd/system": ("link", "/srv/units"),
        "/srv/units/multi-user.target.wants": ("link", "/srv/wanted"),
        "/srv/wanted/keygen.service": ("link", "/srv/units/keygen.service"),
        "/srv/units/keygen.service": DEBIAN13_KEYGEN,
        "/srv/units/keygen.service.d": ("link", "../dropins"),
        "/srv/dropins/x.conf": "[Unit]\nConditionPathIsReadWrite=\n",
        "/srv/dropins/y.conf": ("link", "/srv/y.conf"),
        "/srv/y.conf": "[Service]\nExecStart=\nExecStart=ssh-keygen -A -v\n",
        f"{UNITS}/odd.service": None})
    with LIB.ImageRoot(image) as root, LIB.SystemdUnits(root) as units:
        assert units.pulled() == {"keygen.service"}
        assert units.unit_file("keygen.service") == "/etc/systemd/system/keygen.service"
        settings = units.settings("keygen.service")
        assert settings["Service.ExecStart"] == ["ssh-keygen -A -v"]
        assert "Unit.ConditionPathIsReadWrite" in settings and \
            not settings["Unit.ConditionPathIsReadWrite"]
        assert units.will_run("keygen.service") is True
        assert units.settings("odd.service") == {} and not units.masked("odd.service")
        assert root.read_bytes(UNITS + "/odd.service") is None


# --------------------------------------------------------------------------
# The task scripts
# --------------------------------------------------------------------------

@pytest.fixture
def run(lib_dir, tmp_path):
    progress = tmp_path / "progress"

    def run_task(task, target, env=None):
        progress.write_text("")
        environ = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
                   "PYTHONDONTWRITEBYTECODE": "1", "SNF_IMAGE_HELPER_LIB": str(lib_dir),
                   "SNF_IMAGE_TARGET": str(target), "TASKNAME": task,
                   "SNF_IMAGE_MONITOR": str(progress), "SNF_IMAGE_PROPERTY_OSFAMILY": "linux",
                   "SNF_IMAGE_HOSTNAME": "vm9.example.org", **(env or {})}
        result = subprocess.run([str(TASKS / task)], env=environ, capture_output=True,
                                text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        return result
    return run_task


def fingerprint_type(path):
    return subprocess.run(["ssh-keygen", "-lf", str(path)], check=True, capture_output=True,
                          text=True).stdout.split()[-1]


def test_keys_made_by_the_helper_when_the_generator_skips(run, tmp_path):
    require_root()
    require_programs("ssh-keygen")
    root = debian13(tmp_path / "image", "1" * 32 + "\n")
    result = run("50DeleteSSHKeys", root)
    assert "sshd-keygen.service will not run at the next boot (not a first boot)" in result.stderr
    ssh = root / "etc/ssh"
    assert sorted(p.name for p in ssh.glob("ssh_host_*")) == [
        "ssh_host_ed25519_key", "ssh_host_ed25519_key.pub", "ssh_host_rsa_key", "ssh_host_rsa_key.pub"]
    assert "BEGIN RSA PRIVATE KEY" in (ssh / "ssh_host_rsa_key").read_text(), "PEM for old sshd"
    assert fingerprint_type(ssh / "ssh_host_rsa_key.pub") == "(RSA)"
    assert fingerprint_type(ssh / "ssh_host_ed25519_key") == "(ED25519)"
    info = (ssh / "ssh_host_ed25519_key").stat()
    assert (info.st_mode & 0o777, info.st_uid) == (0o600, 0)
    assert (ssh / "ssh_host_ed25519_key.pub").stat().st_mode & 0o777 == 0o644
    assert "dsa host keys" in result.stderr            # no longer made, and said so


def test_keys_left_to_the_image_on_a_first_boot(run, tmp_path):
    require_root()
    root = debian13(tmp_path / "image", "uninitialized\n")
    result = run("50DeleteSSHKeys", root)
    assert "The image's sshd-keygen.service makes new host keys at its first boot" in result.stderr
    assert not list((root / "etc/ssh").glob("ssh_host_*"))


def test_cleaned_image_without_generator_gets_default_keys(run, tmp_path):
    require_root()
    require_programs("ssh-keygen")
    root = image_tree(tmp_path / "image", {"/etc/machine-id": "", **SYSTEMD_257, "/usr/sbin/sshd": "",
                                     "/etc/ssh/sshd_config": "Port 22\n"})
    run("50DeleteSSHKeys", root)
    assert sorted(p.name for p in (root / "etc/ssh").glob("ssh_host_*_key")) == [
        "ssh_host_ecdsa_key", "ssh_host_ed25519_key", "ssh_host_rsa_key"]


def test_first_boot_wizard_does_not_prompt(run, tmp_path):
    require_root()
    files = {"/etc/machine-id": "uninitialized\n", **SYSTEMD_257,
             f"{UNITS}/systemd-firstboot.service": FIRSTBOOT,
             f"{UNITS}/sysinit.target.wants/systemd-firstboot.service":
                 ("link", "../systemd-firstboot.service"),
             "/var/lib/dbus/machine-id": "2" * 32 + "\n"}
    root = image_tree(tmp_path / "first", files)
    run("50ChangeMachineId", root)
    assert (root / "etc/machine-id").read_text() == "uninitialized\n"
    assert not (root / "var/lib/dbus/machine-id").exists(), "systemd would take the old id from it"
    dropin = root / "etc/systemd/system/systemd-firstboot.service.d/50-snf-image.conf"
    assert dropin.read_text().splitlines()[1:] == ["[Service]", "ExecStart=",
                                                   "ExecStart=systemd-firstboot"]
    with LIB.ImageRoot(root) as image:
        assert LIB.unit_settings(image, "systemd-firstboot.service")["Service.ExecStart"] == \
            ["systemd-firstboot"]
    # Not a first boot: a new id, no drop-in.
    files["/etc/machine-id"] = "3" * 32 + "\n"
    other = image_tree(tmp_path / "id", files)
    run("50ChangeMachineId", other)
    new_id = (other / "etc/machine-id").read_text().strip()
    assert len(new_id) == 32 and new_id != "3" * 32
    assert (other / "var/lib/dbus/machine-id").read_text().strip() == new_id
    assert not (other / "etc/systemd/system/systemd-firstboot.service.d").exists()


NICS = {"SNF_IMAGE_NIC_COUNT": "2",
        "SNF_IMAGE_NIC_0_MAC": "aa:00:00:5e:10:01", "SNF_IMAGE_NIC_0_IP": "192.0.2.10",
        "SNF_IMAGE_NIC_0_NETWORK_SUBNET": "192.0.2.0/24",
        "SNF_IMAGE_NIC_0_NETWORK_GATEWAY": "192.0.2.1",
        "SNF_IMAGE_NIC_1_MAC": "aa:00:00:5e:10:02", "SNF_IMAGE_NIC_1_IP": "10.0.3.15",
        "SNF_IMAGE_NIC_1_NETWORK_SUBNET": "10.0.3.0/24", "SNF_IMAGE_NIC_1_NETWORK_TAGS": "dhcp",
        "SNF_IMAGE_DHCP_TAGS": "dhcp"}


def test_networkmanager_profiles_of_the_image_are_taken_out_of_use(run, tmp_path):
    require_root()
    connections = "/etc/NetworkManager/system-connections"
    root = image_tree(tmp_path / "image", {
        "/usr/sbin/NetworkManager": "", "/etc/NetworkManager/NetworkManager.conf": "[main]\n",
        f"{connections}/Wired connection 1.nmconnection":
            "[connection]\nid=Wired connection 1\ntype=ethernet\n[ipv4]\nmethod=auto\n",
        f"{connections}/other-nic": "[connection]\nid=o\ntype=802-3-ethernet\n"
                                    "[802-3-ethernet]\nmac-address=AA:00:00:00:00:09\n",
        f"{connections}/mine": "[connection]\nid=m\ntype=ethernet\n"
                               "[ethernet]\nmac-address=AA:00:00:5E:10:02\n",
        f"{connections}/home-wifi.nmconnection": "[connection]\nid=w\ntype=wifi\n"})
    run("50ConfigureNetwork", root, NICS)
    left = sorted(p.name for p in (root / connections.lstrip("/")).iterdir())
    assert left == ["home-wifi.nmconnection", "other-nic", "snf-image-eth0.nmconnection",
                    "snf-image-eth1.nmconnection"]
    disabled = root / "etc/NetworkManager/snf-image-disabled"
    assert sorted(p.name for p in disabled.iterdir()) == ["Wired connection 1.nmconnection", "mine"]
    assert disabled.stat().st_mode & 0o777 == 0o700
    assert (root / "etc/NetworkManager/conf.d/90-snf-image.conf").read_text().splitlines()[1:] == \
        ["[main]", "no-auto-default+=AA:00:00:5E:10:01,AA:00:00:5E:10:02"]


# --------------------------------------------------------------------------
# Password hashes the image expects
# --------------------------------------------------------------------------

DEBIAN_PAM = "password\t[success=1 default=ignore]\tpam_unix.so obscure yescrypt\n"
RHEL8_PAM = "password    sufficient    pam_unix.so sha512 shadow nullok try_first_pass use_authtok\n"


def test_method_from_pam_then_login_defs():
    assert PASSWORD.choose_method(None, "ENCRYPT_METHOD SHA512\n", [DEBIAN_PAM]) == ("yescrypt", False)
    assert PASSWORD.choose_method(None, "ENCRYPT_METHOD YESCRYPT\n", [None, RHEL8_PAM]) == \
        ("sha512", False)
    assert PASSWORD.choose_method(None, "ENCRYPT_METHOD YESCRYPT\n", []) == ("yescrypt", False)
    assert PASSWORD.choose_method(None, None, ["# password pam_unix.so md5\n"]) == ("sha512", False)
    assert PASSWORD.choose_method("yescrypt", None, [RHEL8_PAM]) == ("yescrypt", True)


def test_yescrypt_through_libcrypt_verifies_with_the_system_crypt():
    library = ctypes.CDLL("libcrypt.so.1")
    library.crypt.restype = ctypes.c_char_p
    library.crypt.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
    first = PASSWORD.hash_password("pässwörd", "yescrypt")
    second = PASSWORD.hash_password("pässwörd", "yescrypt")
    assert first.startswith("$y$") and first != second
    assert library.crypt("pässwörd".encode(), first.encode()).decode() == first
    assert library.crypt(b"other", first.encode()).decode() != first


def test_unavailable_libcrypt_method(monkeypatch):
    monkeypatch.setattr(PASSWORD, "LIBCRYPT", "libcrypt-absent.so.9")
    with pytest.raises(LIB.TaskError, match="not available"):
        PASSWORD.hash_password("pw", "yescrypt")
    monkeypatch.setattr(PASSWORD.helper, "warn", lambda message: None)
    assert PASSWORD.hash_password("pw", "yescrypt", fallback=True).startswith("$6$")


# --------------------------------------------------------------------------
# cloud-init's per-instance state
# --------------------------------------------------------------------------

def test_cloud_init_state_of_the_same_instance_is_forgotten(run, tmp_path):
    require_root()
    cloud = "/var/lib/cloud"
    state = {f"{cloud}/data/instance-id": "vm9.example.org\n",
             f"{cloud}/instance": ("link", f"{cloud}/instances/vm9.example.org"),
             f"{cloud}/instances/vm9.example.org/obj.pkl": "pickle",
             f"{cloud}/instances/vm9.example.org/sem/config_ssh": "done",
             f"{cloud}/instances/vm9.example.org/sem/config_users_groups": "done",
             f"{cloud}/instances/vm9.example.org/user-data.txt": "kept",
             "/etc/cloud/cloud.cfg.d": None}
    env = {"SNF_IMAGE_PROPERTY_CLOUD_INIT": "yes"}
    same = image_tree(tmp_path / "same", state)
    result = run("35InitializeDatasource", same, env)
    assert "state of instance vm9.example.org: 5 file(s) removed" in result.stderr
    instance = same / "var/lib/cloud/instances/vm9.example.org"
    assert sorted(p.name for p in instance.rglob("*")) == ["sem", "user-data.txt"]
    assert not (same / "var/lib/cloud/instance").is_symlink()
    other = image_tree(tmp_path / "other", dict(state, **{f"{cloud}/data/instance-id": "vm1\n"}))
    result = run("35InitializeDatasource", other, env)
    assert "new instance" in result.stderr
    assert (other / "var/lib/cloud/instances/vm9.example.org/sem/config_ssh").exists()
