"""snf-image proven against a real Ganeti 3.0 cluster.

A module fixture brings up a single-node cluster inside a network namespace
(tests/ganeti/up.sh: file and sharedfile disk templates, the kvm hypervisor
with kvm_flag=disabled so that guests run under TCG, and fake), installs
snf-image with `make install`, points /etc/default/snf-image at the cached
helper VM and test image, and undoes all of it at the end, also when a test
fails (down.sh, the original /etc/default/snf-image back, `make uninstall`).
Every scenario goes through the real gnt-* commands and asserts on Ganeti's
own output and on the instance disks. The suite prints its timings (cluster
up, each add, start to the guest's report) in the terminal summary.

The scenarios share one cluster and run in file order: the rename, export
and import tests continue with the instance the deployment test created.
"""

import ast
import base64
import contextlib
import ctypes
import ctypes.util
import hashlib
import json
import os
import re
import secrets
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest

from conftest import CACHE_DIR, REPO, require_programs, require_root

pytestmark = [pytest.mark.ganeti, pytest.mark.slow, pytest.mark.qemu, pytest.mark.root]

CLUSTER_SCRIPTS = REPO / "tests" / "ganeti"
OS_NAME = "snf-image"
OS_DIR = Path("/srv/ganeti/os/snf-image")
CONFIG_FILE = Path("/etc/default/snf-image")
# What `make install` may create beyond OS_DIR; whatever of it did not exist
# before the suite is removed again at the end.
INSTALL_LEFTOVERS = [
    Path("/etc/default/snf-image-update-helper"),
    Path("/etc/ganeti/snf-image/variants/default.conf"),
    Path("/etc/ganeti/snf-image/variants"),
    Path("/etc/ganeti/snf-image"),
    Path("/etc/snf-image/backends/src"),
    Path("/etc/snf-image/backends/dst"),
    Path("/etc/snf-image/backends"),
    Path("/etc/snf-image"),
    Path("/var/lib/snf-image/helper"),
    Path("/var/lib/snf-image"),
]
GANETI_LOG_DIR = Path("/var/log/ganeti")
GANETI_OS_LOG_DIR = GANETI_LOG_DIR / "os"
CONSOLE_DIR = Path("/var/run/ganeti/kvm-hypervisor/ctrl")
TEST_IMAGE_DIR = CACHE_DIR / "ganeti-suite-images"
DOMAIN = "gnt.test"
NETWORK = "net1"
NETWORK_SUBNET = "10.77.1.0/24"
NETWORK_GATEWAY = "10.77.1.1"
BRIDGE = "gnt-br0"
INSTANCE_MEMORY = "512M"
# generous: two cores shared with other TCG guests in CI
GNT_TIMEOUT = 1800
BOOT_TIMEOUT = 900


def instance(number):
    return f"inst{number}.{DOMAIN}"


def escape_option_value(value):
    """Ganeti splits -O on commas; a backslash protects one."""
    return value.replace("\\", "\\\\").replace(",", "\\,")


def key_values(params):
    return ",".join(f"{key}={escape_option_value(value)}" for key, value in params.items())


# ---------------------------------------------------------------- cluster


class GanetiCluster:
    """The cluster of tests/ganeti/up.sh; every command runs in its namespace."""

    def __init__(self):
        self.node = self.gnt("gnt-cluster", "getmaster").stdout.strip()

    def command(self, *argv):
        return [str(CLUSTER_SCRIPTS / "gnt-ns"), *argv]

    def gnt(self, *argv, check=True, timeout=GNT_TIMEOUT):
        result = subprocess.run(self.command(*argv), stdin=subprocess.DEVNULL,
                                capture_output=True, text=True, timeout=timeout)
        if check and result.returncode != 0:
            raise AssertionError(f"{' '.join(argv[:2])} failed (exit {result.returncode}):\n"
                                 f"{result.stdout}\n{result.stderr}")
        return result

    def instance_field(self, name, field):
        return self.gnt("gnt-instance", "list", "--no-headers", "--separator=|",
                        "-o", field, name).stdout.strip()

    def instance_list_field(self, name, field):
        """A list field: Ganeti shows some as "['a', 'b']", others as "a,b"."""
        value = self.instance_field(name, field)
        if value.startswith("["):
            return ast.literal_eval(value)
        return value.split(",") if value else []

    def instances(self):
        return self.gnt("gnt-instance", "list", "--no-headers", "-o", "name").stdout.split()

    def disk_paths(self, name):
        """Paths of the instance's disks on the node (file templates: plain files)."""
        output = self.gnt("gnt-instance", "activate-disks", name).stdout
        paths = []
        for line in output.splitlines():
            # "vm.gnt.test:disk/0:/srv/ganeti/file-storage/inst1.gnt.test/....file.disk0"
            node, disk, path = line.split(":", 2)
            assert node == self.node and disk.startswith("disk/")
            paths.append(Path(path))
        if self.instance_field(name, "admin_state") != "up":
            self.gnt("gnt-instance", "deactivate-disks", name)
        return paths

    def remove(self, name):
        self.gnt("gnt-instance", "remove", "-f", "--shutdown-timeout=0", name)


@pytest.fixture(scope="session")
def timings(request):
    """Timings printed in the terminal summary (not asserted on). Modules that
    import the cluster fixtures (test_package) add to the same report."""
    report = request.config.pluginmanager.get_plugin("snf-image-ganeti-timings")
    if report is not None:
        return report.recorded
    recorded = []

    class TimingReport:
        def pytest_terminal_summary(self, terminalreporter):
            if recorded:
                terminalreporter.section("Ganeti suite timings")
                for label, seconds in recorded:
                    terminalreporter.write_line(f"{label:<68} {seconds:7.1f} s")

    report = TimingReport()
    report.recorded = recorded
    request.config.pluginmanager.register(report, "snf-image-ganeti-timings")
    return recorded


@contextlib.contextmanager
def timed(timings, label):
    started = time.monotonic()
    yield
    timings.append((label, time.monotonic() - started))


@pytest.fixture(scope="module")
def cluster(timings):
    require_root()
    require_programs("gnt-cluster", "ip", "socat", "fping", "qemu-system-x86_64",
                     "make", "sfdisk", "debugfs", "ssh-keygen")
    try:
        with timed(timings, "cluster up (tests/ganeti/up.sh)"):
            subprocess.run([str(CLUSTER_SCRIPTS / "up.sh")], check=True, timeout=600,
                           stdin=subprocess.DEVNULL)
        yield GanetiCluster()
    finally:
        started = time.monotonic()
        subprocess.run([str(CLUSTER_SCRIPTS / "down.sh")], timeout=900, stdin=subprocess.DEVNULL)
        timings.append(("cluster down (tests/ganeti/down.sh)", time.monotonic() - started))


# ---------------------------------------------------------------- installation


class SuiteConfiguration:
    """/etc/default/snf-image as the suite needs it. Ganeti runs the OS
    scripts with a clean environment, so this must be the real file."""

    def __init__(self, image_dir):
        self.settings = {
            "IMAGE_DIR": str(image_dir),
            "HELPER_DIR": "/nonexistent/snf-image-helper-not-built-yet",
            "HELPER_ACCEL": "tcg",
            # generous timeouts: CI shares two cores between several TCG guests
            "HELPER_SOFT_TIMEOUT": "900",
            "HELPER_HARD_TIMEOUT": "10",
        }
        self.write()

    def update(self, **settings):
        self.settings.update(settings)
        self.write()

    def write(self):
        lines = ["# written by tests/test_ganeti.py; the original is restored at the end"]
        lines += [f'{key}="{value}"' for key, value in self.settings.items()]
        CONFIG_FILE.write_text("\n".join(lines) + "\n")


@contextlib.contextmanager
def original_file_restored(path):
    original = path.read_bytes() if path.exists() else None
    try:
        yield
    finally:
        if original is None:
            path.unlink(missing_ok=True)
        else:
            path.write_bytes(original)


@contextlib.contextmanager
def new_paths_removed(paths):
    """Remove, at the end, those of `paths` that do not exist now (files; empty dirs)."""
    absent = [path for path in paths if not path.exists()]
    try:
        yield
    finally:
        for path in absent:
            if path.is_dir():
                with contextlib.suppress(OSError):
                    path.rmdir()
            elif path.exists():
                path.unlink()


def run_make(*arguments):
    result = subprocess.run(["make", "-C", str(REPO), *arguments], stdin=subprocess.DEVNULL,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"make {' '.join(arguments)} failed:\n{result.stdout}{result.stderr}"


@pytest.fixture(scope="module")
def installed(cluster, tmp_path_factory):
    """snf-image installed with `make install` into the cluster's OS path.
    The builder and the helper sources go to a scratch directory: Ganeti
    needs only OSDIR and the configuration under /etc."""
    scratch = tmp_path_factory.mktemp("snf-image-install")
    paths = [f"OSDIR={OS_DIR}", f"SBINDIR={scratch}/sbin", f"DATADIR={scratch}/share"]
    with contextlib.ExitStack() as stack:
        stack.enter_context(new_paths_removed(INSTALL_LEFTOVERS))
        stack.enter_context(original_file_restored(CONFIG_FILE))
        stack.callback(run_make, "uninstall", *paths)
        run_make("install", *paths)
        if TEST_IMAGE_DIR.exists():
            shutil.rmtree(TEST_IMAGE_DIR)
        TEST_IMAGE_DIR.mkdir(parents=True)
        stack.callback(shutil.rmtree, TEST_IMAGE_DIR, True)
        yield SuiteConfiguration(TEST_IMAGE_DIR)


# ---------------------------------------------------------------- the OS definition


def declared_parameters():
    """{name: description} of os-def/parameters.list, in file order."""
    lines = (REPO / "os-def" / "parameters.list").read_text().splitlines()
    return dict(line.split(None, 1) for line in lines if line.strip())


def test_gnt_os_diagnose_shows_snf_image_valid(cluster, installed):
    output = cluster.gnt("gnt-os", "diagnose").stdout
    assert re.search(rf"^OS: {OS_NAME} \[global status: valid\]$", output, re.M), output
    assert re.search(r"^  Variants: \[default\]$", output, re.M), output
    # "  Node: <uuid>, status: valid (path: ...) [API versions: 20] [variants: default]
    #  [parameters: img_id, ...] [trusted]"
    node_line = re.search(rf"^  Node: \S+, status: valid \(path: {OS_DIR}\) (.*)$", output, re.M)
    assert node_line, output
    details = dict(re.findall(r"\[([^:\]]+): ([^\]]*)\]", node_line.group(1)))
    assert details["API versions"] == "20"
    assert details["variants"] == "default"
    assert details["parameters"].split(", ") == list(declared_parameters())
    listed = cluster.gnt("gnt-os", "list", "--no-headers").stdout.split()
    assert f"{OS_NAME}+default" in listed


def test_gnt_os_info_shows_variants_and_parameters(cluster, installed):
    output = cluster.gnt("gnt-os", "info").stdout
    section = ("\n" + output).split(f"\n{OS_NAME}:", 1)[1].split("\n\n", 1)[0] + "\n"
    assert "\n  - valid: True\n" in section, section
    assert "\n  - API versions:\n    - 20\n" in section, section
    assert "\n  - variants:\n    - default\n" in section, section
    parameters = dict(re.findall(r"^    - (\w+): (.*)$", section.split("  - parameters:\n", 1)[1], re.M))
    assert parameters == declared_parameters() and len(parameters) == 12


# ---------------------------------------------------------------- deployments


class ArgumentListWatch:
    """Samples every process's argument list (/proc/*/cmdline) in a thread
    and keeps the ones that contain the secret. `own_arguments` are those of
    the test's own gnt-instance command, which was handed the secret on its
    command line (as Ganeti's CLI requires); that command, whatever runs it
    (gnt-ns, its forks, env, ip netns exec, python3), is not counted."""

    HELPER_MARK = b"snf_image_activate_helper"

    def __init__(self, secret, own_arguments):
        self.secret = secret.encode()
        self.own_arguments = [argument.encode() for argument in own_arguments]
        self.leaks = {}
        self.samples = 0
        self.saw_helper = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def _is_own_command(self, cmdline):
        arguments = cmdline.rstrip(b"\0").split(b"\0")
        return arguments[-len(self.own_arguments):] == self.own_arguments

    def _watch(self):
        while not self._stop.is_set():
            for entry in os.scandir("/proc"):
                if not entry.name.isdigit():
                    continue
                try:
                    with open(f"/proc/{entry.name}/cmdline", "rb") as cmdline_file:
                        cmdline = cmdline_file.read()
                except OSError:
                    continue
                if self.secret in cmdline and not self._is_own_command(cmdline):
                    shown = cmdline.replace(self.secret, b"<SECRET>").replace(b"\0", b" ")
                    self.leaks[int(entry.name)] = shown.decode(errors="replace")
                if self.HELPER_MARK in cmdline:
                    self.saw_helper = True
            self.samples += 1
            self._stop.wait(0.02)


def gnt_instance_add(cluster, name, params, *, secret_params=None, disk_mib, nic=None,
                     submit=False, template="file"):
    """The argument list of a `gnt-instance add` of snf-image+default
    (file disk, kvm hypervisor under TCG, one NIC, no start)."""
    argv = ["gnt-instance", "add", "-t", template, "-o", f"{OS_NAME}+default",
            "-H", "kvm", "-B", f"memory={INSTANCE_MEMORY},vcpus=1",
            "--disk", f"0:size={disk_mib}M", "-O", key_values(params)]
    if secret_params:
        argv += ["--os-parameters-secret", key_values(secret_params)]
    argv += ["--net", f"0:{nic}"] if nic else ["--no-nics"]
    argv += ["--no-name-check", "--no-ip-check", "--no-start", "-n", cluster.node]
    if submit:
        argv.append("--submit")
    return cluster.command(*argv, name)


def run_add(cluster, timings, name, params, **options):
    with timed(timings, f"gnt-instance add {name}"):
        return subprocess.run(gnt_instance_add(cluster, name, params, **options),
                              stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              timeout=GNT_TIMEOUT)


def partition_table(disk):
    output = subprocess.run(["sfdisk", "--json", str(disk)], check=True,
                            capture_output=True, text=True).stdout
    return json.loads(output)["partitiontable"]


def read_guest_file(disk, path, partition_start_sector):
    """A file of the ext4 file system at that sector of the disk, read with
    debugfs (the image is never mounted on the host)."""
    result = subprocess.run(
        ["debugfs", "-R", f"cat {path}", f"{disk}?offset={partition_start_sector * 512}"],
        check=True, capture_output=True)
    return result.stdout.decode()


def sha256_of(path):
    digest = hashlib.sha256()
    with open(path, "rb") as disk:
        while chunk := disk.read(4 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def os_log_files():
    return set(GANETI_OS_LOG_DIR.iterdir()) if GANETI_OS_LOG_DIR.is_dir() else set()


def files_containing(directory, needle):
    found = []
    for root, _dirs, files in os.walk(directory):
        for file_name in files:
            path = Path(root, file_name)
            with contextlib.suppress(OSError):
                if needle.encode() in path.read_bytes():
                    found.append(path)
    return found


class SerialConsole:
    """Ganeti's serial console socket of a kvm instance, read with socat
    inside the namespace (`gnt-instance console` needs ssh, which the test
    cluster does not set up)."""

    def __init__(self, cluster, name):
        self.command = cluster.command("socat", "-u",
                                       f"UNIX-CONNECT:{CONSOLE_DIR}/{name}.serial", "-")
        self.text = ""
        self._arrivals = []  # (monotonic time, length of self.text after the chunk)
        self._changed = threading.Condition()
        self.process = None

    def __enter__(self):
        deadline = time.monotonic() + 60
        while True:
            self.process = subprocess.Popen(self.command, stdin=subprocess.DEVNULL,
                                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
            time.sleep(0.5)
            if self.process.poll() is None or time.monotonic() > deadline:
                break
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        return self

    def __exit__(self, *exc):
        if self.process.poll() is None:
            self.process.terminate()
        self.process.wait(timeout=30)
        self._reader.join(timeout=30)

    def _read(self):
        while chunk := self.process.stdout.read1(65536):
            with self._changed:
                self.text += chunk.decode(errors="replace").replace("\r", "")
                self._arrivals.append((time.monotonic(), len(self.text)))
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    def seen_at(self, pattern):
        """When the first match of `pattern` had fully arrived, or None."""
        with self._changed:
            match = re.search(pattern, self.text, re.M | re.S)
            if match:
                return next(when for when, length in self._arrivals if length >= match.end())
        return None

    def wait_for(self, pattern, timeout=BOOT_TIMEOUT):
        deadline = time.monotonic() + timeout
        with self._changed:
            while not (match := re.search(pattern, self.text, re.M | re.S)):
                remaining = deadline - time.monotonic()
                if remaining <= 0 or (self.process.poll() is not None and not self._reader.is_alive()):
                    raise AssertionError(f"{pattern!r} not seen on the serial console; "
                                         f"its last lines:\n{self.text[-3000:]}")
                self._changed.wait(min(remaining, 5))
        return match


@pytest.fixture(scope="module")
def deployable(cluster, installed, timings):
    """The configuration points at the built helper VM and IMAGE_DIR holds
    the test Debian image (both cached across runs, built on the first)."""
    from helpervm import built_helper_dir
    from images import debian_image

    with timed(timings, "helper VM and test image ready (cached after the first run)"):
        helper_dir = built_helper_dir()
        image = Path(debian_image("mbr"))
    image_name = "debian-mbr.diskdump"
    linked = TEST_IMAGE_DIR / image_name
    try:
        os.link(image, linked)
    except OSError:
        shutil.copyfile(image, linked)
    installed.update(HELPER_DIR=str(helper_dir))
    return {"img_id": image_name, "image_size": linked.stat().st_size}


@pytest.fixture(scope="module")
def network(cluster):
    """A Ganeti network with a gateway, connected to the default node group."""
    cluster.gnt("gnt-network", "add", "--network", NETWORK_SUBNET, "--gateway", NETWORK_GATEWAY,
                NETWORK)
    cluster.gnt("gnt-network", "connect", "--nic-parameters", f"mode=bridged,link={BRIDGE}",
                NETWORK, "default")
    return NETWORK


@pytest.fixture(scope="session")
def ssh_keys(tmp_path_factory):
    keys = []
    for number in (1, 2):
        key_file = tmp_path_factory.mktemp("ssh") / "id_ed25519"
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C",
                        f"ganeti-suite-key-{number}", "-f", str(key_file)], check=True)
        keys.append(key_file.with_suffix(".pub").read_text().strip())
    return keys


def disk_size_for(deployable):
    """Image size rounded up to MiB, plus room for the tasks to grow into."""
    return -(-deployable["image_size"] // (1 << 20)) + 256


def image_params(deployable, **extra):
    params = {"img_id": deployable["img_id"], "img_format": "diskdump",
              "img_properties": json.dumps({"OSFAMILY": "linux", "ROOT_PARTITION": "1"},
                                           separators=(",", ":"))}
    params.update(extra)
    return params


def root_partition(disk):
    table = partition_table(disk)
    return table, table["partitions"][0]


def password_matches(password, shadow_hash):
    """Check a crypt(3) hash with the host's own libcrypt (libxcrypt knows every
    scheme the tasks write, yescrypt included), without the crypt module that
    Python 3.13 dropped; the password goes through no argument list."""
    library = ctypes.CDLL(ctypes.util.find_library("crypt") or "libcrypt.so.1")
    library.crypt.restype = ctypes.c_char_p
    library.crypt.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
    computed = library.crypt(password.encode(), shadow_hash.encode())
    return computed is not None and computed.decode() == shadow_hash


def shadow_hash(disk, start, user="root"):
    for line in read_guest_file(disk, "/etc/shadow", start).splitlines():
        fields = line.split(":")
        if fields[0] == user:
            return fields[1]
    raise AssertionError(f"no {user} in the guest's /etc/shadow")


def assert_customized(disk, *, hostname, key, password, disk_mib):
    """What the tasks did, read from the instance's disk without mounting it."""
    table, root = root_partition(disk)
    assert table["label"] == "dos"
    # FixPartitionTable + FilesystemResize: the root partition grew to the disk's end
    sectors = disk_mib * 2048
    assert root["start"] + root["size"] > sectors - 4096, table
    start = root["start"]
    assert read_guest_file(disk, "/etc/hostname", start).split() == [hostname]
    assert key in read_guest_file(disk, "/root/.ssh/authorized_keys", start)
    assert password_matches(password, shadow_hash(disk, start))


def new_os_logs(before, kind):
    """OS log files Ganeti wrote since `before` for one script kind
    (add, reinstall, rename, import, export)."""
    return sorted(path for path in os_log_files() - before if path.name.startswith(f"{kind}-"))


class Deployment:
    """What the scenarios below share: the first instance and its parameters."""
    name = None
    disk_mib = None
    password = None
    key = None
    ip = None
    mac = None


def test_add_deploys_debian_without_leaking_the_password(
        cluster, deployable, network, ssh_keys, timings):
    name = instance(1)
    password = "Gnt-" + secrets.token_hex(12)
    disk_mib = disk_size_for(deployable)
    logs_before = os_log_files()
    argv = gnt_instance_add(cluster, name, image_params(deployable, auth_keys=ssh_keys[0]),
                            secret_params={"img_passwd": password}, disk_mib=disk_mib,
                            nic=f"network={network},ip=pool")
    own_arguments = argv[argv.index("gnt-instance") + 1:]
    with ArgumentListWatch(password, own_arguments) as watch, \
            timed(timings, f"gnt-instance add {name}"):
        add = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
        output, _ = add.communicate(timeout=GNT_TIMEOUT)
    assert add.returncode == 0, output
    assert "running the instance OS create scripts..." in output
    # the password was in no other process's argument list while we watched
    # the deployment, and we did watch it: the helper VM was seen running
    assert watch.leaks == {}
    assert watch.saw_helper and watch.samples > 10
    # nor in any of Ganeti's logs, the OS logs among them
    (create_log,) = new_os_logs(logs_before, "add")
    assert "Image customization finished successfully." in create_log.read_text()
    assert files_containing(GANETI_LOG_DIR, password) == []
    # Ganeti's view of the instance
    fields = cluster.instance_field(name, "os,disk_template,hypervisor,status")
    assert fields.split("|") == [f"{OS_NAME}+default", "file", "kvm", "ADMIN_down"]
    assert cluster.instance_list_field(name, "nic.networks.names") == [network]
    (ip,) = cluster.instance_list_field(name, "nic.ips")
    (mac,) = cluster.instance_list_field(name, "nic.macs")
    assert ip.startswith("10.77.1.")
    # and the disk: hostname, key and password where the tasks put them
    (disk,) = cluster.disk_paths(name)
    assert disk.stat().st_size == disk_mib << 20
    assert_customized(disk, hostname=name, key=ssh_keys[0], password=password, disk_mib=disk_mib)
    Deployment.name, Deployment.disk_mib, Deployment.password = name, disk_mib, password
    Deployment.key, Deployment.ip, Deployment.mac = ssh_keys[0], ip, mac


# The test image's report (tools/build-test-image.py): JSON lines
# {"key", "rc", "b64"} between these markers, on the serial console.
REPORT_BEGIN = "==SNF-REPORT-BEGIN=="
REPORT_END = "==SNF-REPORT-END=="
REPORT_KEYS_USED = {"hostname", "etc_hostname", "ip_addr", "ip_route", "authorized_keys:root"}
KERNEL_MESSAGE = re.compile(r"\[ *\d+\.\d+\] [^\n]*\n")
REPORT_LINE = re.compile(r'\{"key":"[^"]*","rc":-?\d+,"b64":"[A-Za-z0-9+/=]*"\}')


def parse_report(console_text):
    """{key: (rc, text)} of the guest's report. Kernel or systemd messages
    may be interleaved with it on the console, so lines are picked out by
    their exact shape."""
    body = console_text.split(REPORT_BEGIN, 1)[1].split(REPORT_END, 1)[0]
    # a kernel message printed in the middle of a report line splits it: drop it
    body = KERNEL_MESSAGE.sub("", body)
    report = {}
    for line in REPORT_LINE.findall(body):
        item = json.loads(line)
        report[item["key"]] = (item["rc"], base64.b64decode(item["b64"]).decode(errors="replace"))
    return report


def boot_and_report(cluster, name, timings):
    """gnt-instance start, then read the serial console until the guest's
    report is complete (the guest powers itself off after it)."""
    started = time.monotonic()
    cluster.gnt("gnt-instance", "start", name)
    with SerialConsole(cluster, name) as console:
        console.wait_for(re.escape(REPORT_END))
        login = console.seen_at(r"login: ")
        report_time = console.seen_at(re.escape(REPORT_END))
        text = console.text
    if login is not None:
        timings.append((f"{name}: gnt-instance start to login prompt", login - started))
    timings.append((f"{name}: gnt-instance start to the guest's report", report_time - started))
    stop_instance(cluster, name)
    report = parse_report(text)
    missing = REPORT_KEYS_USED - set(report)
    assert not missing, (f"the guest's report lacks {sorted(missing)}; the console ended with:\n"
                         f"{text[-3000:]}")
    return report


def stop_instance(cluster, name):
    """Mark the instance stopped (the guest may already have powered off)."""
    cluster.gnt("gnt-instance", "shutdown", "--timeout=0", name, timeout=300)
    assert cluster.instance_field(name, "status") == "ADMIN_down"


def assert_booted_as_asked(report, *, hostname, ip, mac, key):
    assert report["hostname"] == (0, hostname + "\n")
    assert report["etc_hostname"][1].split() == [hostname]
    # the NIC with the instance's MAC has the address Ganeti's pool gave it
    # (statically: nothing in the namespace answers DHCP)
    (interface,) = [interface for interface in json.loads(report["ip_addr"][1])
                    if interface.get("address", "").lower() == mac.lower()]
    addresses = [(address["local"], address["prefixlen"])
                 for address in interface.get("addr_info", []) if address["family"] == "inet"]
    assert addresses == [(ip, 24)], interface
    default_routes = [route for route in json.loads(report["ip_route"][1])
                      if route["dst"] == "default"]
    assert [route.get("gateway") for route in default_routes] == [NETWORK_GATEWAY], default_routes
    assert key in report["authorized_keys:root"][1]


def test_start_boots_with_the_asked_hostname_and_network(cluster, timings):
    assert Deployment.name, "needs the instance of test_add_deploys_debian_..."
    report = boot_and_report(cluster, Deployment.name, timings)
    assert_booted_as_asked(report, hostname=Deployment.name, ip=Deployment.ip,
                           mac=Deployment.mac, key=Deployment.key)


def test_reinstall_with_other_parameters(cluster, deployable, ssh_keys, timings):
    name = Deployment.name
    assert name, "needs the instance of test_add_deploys_debian_..."
    password = "Gnt-" + secrets.token_hex(12)
    logs_before = os_log_files()
    with timed(timings, f"gnt-instance reinstall {name}"):
        result = cluster.gnt("gnt-instance", "reinstall", "-f",
                             "-O", key_values(image_params(deployable, auth_keys=ssh_keys[1])),
                             "--os-parameters-secret", key_values({"img_passwd": password}),
                             name)
    assert "Running instance OS create scripts..." in result.stdout + result.stderr
    assert len(new_os_logs(logs_before, "add")) == 1
    assert files_containing(GANETI_LOG_DIR, password) == []
    (disk,) = cluster.disk_paths(name)
    # the image was written afresh: the first key is gone, the second is there
    assert_customized(disk, hostname=name, key=ssh_keys[1], password=password,
                      disk_mib=Deployment.disk_mib)
    _table, root = root_partition(disk)
    assert ssh_keys[0] not in read_guest_file(disk, "/root/.ssh/authorized_keys", root["start"])
    assert not password_matches(Deployment.password, shadow_hash(disk, root["start"]))
    osparams = cluster.instance_field(name, "osparams")
    assert ssh_keys[1].split()[1] in osparams and password not in osparams
    Deployment.password, Deployment.key = password, ssh_keys[1]


def test_rename_keeps_the_disk(cluster, timings):
    old_name, new_name = Deployment.name, instance(2)
    assert old_name, "needs the instance of test_add_deploys_debian_..."
    (disk,) = cluster.disk_paths(old_name)
    checksum = sha256_of(disk)
    logs_before = os_log_files()
    with timed(timings, f"gnt-instance rename {old_name} {new_name}"):
        result = cluster.gnt("gnt-instance", "rename", "-f", "--no-ip-check", old_name, new_name)
    assert f"Instance '{old_name}' renamed to '{new_name}'" in result.stdout + result.stderr
    assert cluster.instance_field(new_name, "os") == f"{OS_NAME}+default"
    assert old_name not in cluster.instances()
    # Ganeti ran our rename script, which succeeded and changed nothing
    assert len(new_os_logs(logs_before, "rename")) == 1
    (disk,) = cluster.disk_paths(new_name)
    assert sha256_of(disk) == checksum
    Deployment.name = new_name


def test_export_then_import_under_a_new_name_is_byte_for_byte(cluster, network, timings):
    source, imported = Deployment.name, instance(5)
    assert source, "needs the instance of test_add_deploys_debian_..."
    with timed(timings, f"gnt-backup export {source}"):
        exported = cluster.gnt("gnt-backup", "export", "-n", cluster.node, source)
    assert "disk/0 finished sending data" in exported.stdout + exported.stderr
    assert source in cluster.gnt("gnt-backup", "list", "--no-headers").stdout
    with timed(timings, f"gnt-backup import {imported}"):
        result = cluster.gnt("gnt-backup", "import", "-n", cluster.node,
                             "--src-node", cluster.node, "--src-dir", source, "-t", "file",
                             "--net", f"0:mac=generate,network={network},ip=pool",
                             "--no-name-check", "--no-ip-check", imported)
    assert "disk/0 finished receiving data" in result.stdout + result.stderr
    assert cluster.instance_field(imported, "os") == f"{OS_NAME}+default"
    (source_disk,) = cluster.disk_paths(source)
    (imported_disk,) = cluster.disk_paths(imported)
    assert imported_disk != source_disk
    assert imported_disk.stat().st_size == source_disk.stat().st_size
    assert sha256_of(imported_disk) == sha256_of(source_disk)
    cluster.remove(imported)


# ---------------------------------------------------------------- failures


def test_bad_parameter_fails_at_verify_with_one_line(cluster, installed, timings):
    name = instance(8)
    result = run_add(cluster, timings, name,
                     {"img_id": "debian-mbr.diskdump", "img_format": "bogusdump"}, disk_mib=64)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    # Ganeti: "OS Parameters validation failed on node ...: OS validation
    # script failed (exited with exit code N), output: <what verify printed>"
    printed = output.split("OS validation script failed", 1)[1].split("output: ", 1)[1]
    assert printed.strip().splitlines() == [printed.strip()], output
    assert "img_format" in printed and "bogusdump" in printed, output
    assert name not in cluster.instances()


def test_missing_image_fails_at_create_with_our_message(cluster, deployable, timings):
    name = instance(9)
    missing = "no-such-image.diskdump"
    result = run_add(cluster, timings, name, image_params(deployable, img_id=missing),
                     disk_mib=64)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "OS create script failed" in output, output
    last_lines = output.split("last lines in the log file:", 1)[1].strip().splitlines()
    assert missing in last_lines[-1], output
    # nothing was written to the new disk
    (disk,) = cluster.disk_paths(name)
    with open(disk, "rb") as disk_file:
        assert disk_file.read(1 << 20) == bytes(1 << 20)
    cluster.remove(name)


# ---------------------------------------------------------------- concurrency


def test_two_adds_at_once_on_the_same_node_both_succeed(cluster, deployable, network,
                                                         ssh_keys, timings):
    # one on each of the cluster's disk templates
    names, templates = [instance(6), instance(7)], ["file", "sharedfile"]
    disk_mib = disk_size_for(deployable)
    started = time.monotonic()
    jobs = []
    for name, template in zip(names, templates):
        argv = gnt_instance_add(cluster, name, image_params(deployable, auth_keys=ssh_keys[0]),
                                disk_mib=disk_mib, nic=f"network={network},ip=pool",
                                submit=True, template=template)
        submitted = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True,
                                   text=True, check=True, timeout=300)
        # "JobID: 12" (on stderr)
        jobs.append(re.search(r"JobID:\s*(\d+)", submitted.stdout + submitted.stderr).group(1))
    for job in jobs:
        cluster.gnt("gnt-job", "wait", job)
    timings.append(("two gnt-instance add jobs at once, both done", time.monotonic() - started))
    listing = cluster.gnt("gnt-job", "list", "--no-headers", "--separator=|",
                          "-o", "id,status,start_ts,end_ts", *jobs).stdout
    rows = [line.split("|") for line in listing.splitlines()]
    assert [row[1] for row in rows] == ["success", "success"], listing
    # how Ganeti ran them: processing intervals of the two jobs
    intervals = [tuple(seconds + micro / 1e6 for seconds, micro in map(ast.literal_eval, row[2:4]))
                 for row in rows]
    for name, (start, end) in zip(names, intervals):
        timings.append((f"gnt-instance add {name} (job processing, submitted together)",
                        end - start))
    overlap = min(end for _start, end in intervals) - max(start for start, _end in intervals)
    timings.append(("  ... of which both jobs were running at once", max(overlap, 0.0)))
    for name, template in zip(names, templates):
        assert cluster.instance_field(name, "disk_template") == template
        (disk,) = cluster.disk_paths(name)
        _table, root = root_partition(disk)
        assert read_guest_file(disk, "/etc/hostname", root["start"]).split() == [name]
