#!/usr/bin/env python3
"""`make demo`: snf-image end to end on this machine, in a few minutes.

  1. builds the helper VM with the real builder (snf-image-update-helper.py),
     unless the one built last time still matches the sources;
  2. builds a small real Debian image (tools/build-test-image.py, bookworm
     from the host's own Debian mirror), cached;
  3. deploys it onto a fresh 3 GiB disk file through the real OS definition
     (os-def/create -> snf-image-host.py) with the environment a single-node
     Ganeti cluster passes, customized: hostname, a generated password (kept
     in a 0600 file, never on a command line), an SSH key, swap, a DHCP NIC;
  4. boots the deployed disk under qemu TCG and shows the guest's own report;
  5. prints where the result is and how to boot it again and log in.

Runs as root (loop devices, qemu -runas). Nothing leaves this machine: the
demo guest is on a qemu user-mode network with restrict=on.
"""

import argparse
import getpass
import json
import os
import secrets
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import helpervm
from repository import REPO, load_script

CACHE_DIR = Path(os.environ.get("SNF_IMAGE_TEST_CACHE", "/var/cache/snf-image-tests"))
DEMO_DIR = Path(os.environ.get("SNF_IMAGE_DEMO_DIR", "/var/tmp/snf-image-demo"))
INSTANCE = "demo-vm.example.org"
NIC_MAC = "aa:00:00:de:e0:01"
DISK_SIZE_MIB = 3072
SWAP_MIB = 256
GANETI_PATH = "/sbin:/bin:/usr/sbin:/usr/bin"
OS_DEF_FILES = ("create", "import", "export", "rename", "verify",
                "ganeti_api_version", "variants.list", "parameters.list")


class DemoError(Exception):
    """An expected failure; main() prints it as one line."""


def step(text):
    print(f"\n==> {text}", flush=True)


# ----------------------------------------------------------------- artifacts

def ensure_helper():
    """The helper VM built by the real builder, cached as the tests cache it
    (tools/helpervm.py: rebuilt only when the builder, helper or tasks change)."""
    try:
        return helpervm.built_helper_dir(show_progress=True)
    except RuntimeError as error:
        raise DemoError(f"building the helper VM failed: {str(error).splitlines()[0]}") from None


def ensure_image(layout="mbr"):
    builder = load_script("tools/build-test-image.py", "build_test_image")
    try:
        return builder.cached_image(layout, CACHE_DIR / "images")
    except builder.BuildError as error:
        raise DemoError(f"building the Debian image failed: {error}") from None


def install_os_dir(os_dir):
    """The OS definition laid out as `make install` does."""
    os_dir.mkdir(parents=True, exist_ok=True)
    for name in OS_DEF_FILES:
        shutil.copy2(REPO / "os-def" / name, os_dir / name)
    shutil.copy2(REPO / "snf-image-host.py", os_dir / "snf-image-host.py")
    for kind in ("src", "dst"):
        (os_dir / "backends" / kind).mkdir(parents=True, exist_ok=True)
    return os_dir


def write_config(work, image_dir, helper_dir, accel="tcg", extra=""):
    variants = work / "variants"
    variants.mkdir(parents=True, exist_ok=True)
    (variants / "default.conf").write_text("")
    config = work / "snf-image.conf"
    config.write_text(f'IMAGE_DIR="{image_dir}"\nVARIANTS_DIR="{variants}"\n'
                      f'HELPER_DIR="{helper_dir}"\nHELPER_ACCEL="{accel}"\n'
                      f'HELPER_SOFT_TIMEOUT="15m"\n{extra}')
    return config


def ganeti_create_env(config, disk, image, osparams, instance=INSTANCE, nics=({"mac": NIC_MAC},)):
    """What Ganeti 3 passes to `create` on a single-node cluster (kvm, file disk)."""
    env = {"OS_API_VERSION": "20", "OS_NAME": "snf-image", "OS_VARIANT": "default",
           "DEBUG_LEVEL": "0", "PATH": GANETI_PATH, "INSTANCE_NAME": instance,
           "INSTANCE_OS": "snf-image+default", "INSTANCE_UUID": str(uuid.uuid4()),
           "INSTANCE_PRIMARY_NODE": str(uuid.uuid4()), "INSTANCE_SECONDARY_NODES": "",
           "INSTANCE_BE_vcpus": "1", "INSTANCE_BE_maxmem": "512", "INSTANCE_BE_minmem": "512",
           "INSTANCE_HV_disk_type": "paravirtual", "INSTANCE_HV_nic_type": "paravirtual",
           "INSTANCE_HV_kvm_flag": "disabled", "INSTANCE_HV_kernel_path": "",
           "HYPERVISOR": "kvm", "DISK_COUNT": "1", "DISK_0_PATH": str(disk),
           "DISK_0_SIZE": str(disk.stat().st_size // (1024 * 1024)), "DISK_0_ACCESS": "rw",
           "DISK_0_UUID": str(uuid.uuid4()), "DISK_0_BACKEND_TYPE": "file:loop",
           "DISK_0_FRONTEND_TYPE": "paravirtual", "NIC_COUNT": str(len(nics)),
           "SNF_IMAGE_CONFIG": str(config)}
    for index, nic in enumerate(nics):
        env.update({f"NIC_{index}_MODE": "bridged", f"NIC_{index}_LINK": "br0",
                    f"NIC_{index}_BRIDGE": "br0", f"NIC_{index}_UUID": str(uuid.uuid4()),
                    f"NIC_{index}_FRONTEND_TYPE": "paravirtual"})
        env.update({f"NIC_{index}_{key.upper()}": value for key, value in nic.items()})
    osparams = dict(osparams, img_id=image.name, img_format="diskdump")
    env.update({"OSP_" + name.upper(): value for name, value in osparams.items()})
    return env


def fresh_disk(path, size_mib=DISK_SIZE_MIB):
    path.unlink(missing_ok=True)
    with open(path, "wb") as disk:
        disk.truncate(size_mib * 1024 * 1024)
    path.chmod(0o600)
    return path


def run_create(os_dir, env, output=None):
    started = time.monotonic()
    result = subprocess.run([str(os_dir / "create")], env=env, cwd=os_dir,
                            stdout=output, stderr=subprocess.STDOUT if output else None)
    return result.returncode, time.monotonic() - started


# ----------------------------------------------------------------- demo

def demo_secrets(work, ask_password):
    password_file = work / "password"
    if ask_password:
        password = getpass.getpass("root password for the demo VM: ")
        if not password:
            raise DemoError("empty password")
    else:
        password = secrets.token_urlsafe(12)
    fd = os.open(password_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(password + "\n")
    key = work / "id_ed25519"
    if not key.exists():
        if subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "snf-image-demo",
                           "-f", str(key)]).returncode != 0:
            raise DemoError("ssh-keygen failed")
    return password, password_file, key


def show_report(report):
    def line(label, value):
        print(f"  {label:<22} {value}")
    line("hostname", report.text("hostname").strip())
    line("/etc/hosts 127.0.1.1", " ".join(l for l in report.text("etc_hosts").splitlines()
                                          if l.startswith("127.0.1.1")))
    ifname, addresses = report.addresses(NIC_MAC)
    line(f"addresses of {ifname}", ", ".join(f"{a[1]}/{a[2]}" for a in addresses if a[3] == "global"))
    df = report.text("df_root").splitlines()[1].split()
    line("root file system", f"{df[0]} {int(df[2]) / 2**30:.2f} GiB ({df[1]})")
    swaps = [s.split()[:3] for s in report.text("swaps").splitlines()]
    line("swap", ", ".join(f"{s[0]} {int(s[2]) // 2**20} MiB" for s in swaps) or "none")
    shadow = [l.split(":") for l in report.text("shadow").splitlines()]
    line("root password hash", next(f[1][:12] + "…" for f in shadow if f[0] == "root"))
    keys = report.text("authorized_keys:root").strip().splitlines()
    line("root authorized_keys", f"{len(keys)} key(s), mode {report.text('authorized_keys_stat:root').strip()}")
    line("machine-id", report.text("machine_id").strip())
    for path, text in sorted(report.keys_with_prefix("ssh_host_key:").items()):
        line("SSH host key", text.strip())
    failed = report.text("failed_units").strip()
    line("failed units", failed or "none")
    line("system state", report.text("system_state").strip())


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work-dir", type=Path, default=DEMO_DIR,
                        help=f"where the result goes (default {DEMO_DIR}, or $SNF_IMAGE_DEMO_DIR)")
    parser.add_argument("--ask-password", action="store_true",
                        help="prompt for the root password instead of generating one")
    parser.add_argument("--accel", choices=("tcg", "auto", "kvm"), default="tcg",
                        help="accelerator of the helper VM (default tcg)")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    try:
        if os.geteuid() != 0:
            raise DemoError("run as root (loop devices, mounts, qemu -runas)")
        for program in ("qemu-system-x86_64", "mmdebstrap", "multistrap", "extlinux", "ssh-keygen"):
            if shutil.which(program) is None:
                raise DemoError(f"{program} is missing: run tools/install-deps.sh (make deps)")
        work = args.work_dir
        work.mkdir(parents=True, exist_ok=True)
        work.chmod(0o700)
        started = time.monotonic()

        step("1/5 helper VM (snf-image-update-helper.py)")
        helper_dir = ensure_helper()

        step("2/5 Debian image (tools/build-test-image.py: bookworm, MBR, ext4, extlinux)")
        image = ensure_image("mbr")
        print(f"image: {image} ({image.stat().st_size // 2**20} MiB)")

        step(f"3/5 deploy through os-def/create onto a {DISK_SIZE_MIB} MiB disk, as Ganeti would")
        password, password_file, key = demo_secrets(work, args.ask_password)
        disk = fresh_disk(work / f"{INSTANCE}-disk0.img")
        config = write_config(work, image.parent, helper_dir, args.accel)
        os_dir = install_os_dir(work / "os")
        properties = {"OSFAMILY": "linux", "ROOT_PARTITION": "1", "SWAP": f"2:{SWAP_MIB}"}
        osparams = {"img_passwd": password, "img_properties": json.dumps(properties),
                    "auth_keys": (key.with_suffix(".pub")).read_text()}
        env = ganeti_create_env(config, disk, image, osparams)
        status, seconds = run_create(os_dir, env)
        if status != 0:
            raise DemoError(f"create failed with exit status {status} (its last line above says why)")
        print(f"create finished in {seconds:.1f} s")

        step("4/5 boot the deployed disk under qemu TCG and read the guest's own report")
        guest = load_script("tools/guest.py", "guest")
        try:
            report = guest.boot(disk, [guest.Nic(NIC_MAC)], keep_dir=work / "first-boot")
        except guest.GuestError as error:
            raise DemoError(str(error)) from None
        show_report(report)

        step("5/5 result")
        print(f"""  deployed disk   {disk}
  root password   in {password_file} (mode 0600)
  SSH key         {key} (its public half is in root's authorized_keys)
  first boot log  {work / 'first-boot' / 'console.log'}

  Boot it again (it stays up now; log in on the console as root, or by SSH):
    qemu-system-x86_64 -accel tcg -m 512 -nographic \\
      -drive file={disk},format=raw,if=virtio \\
      -nic user,model=virtio-net-pci,mac={NIC_MAC},restrict=on,hostfwd=tcp:127.0.0.1:2222-:22
    ssh -i {key} -p 2222 -o StrictHostKeyChecking=no root@127.0.0.1

  demo took {time.monotonic() - started:.0f} s""")
    except DemoError as error:
        print(f"demo: error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
