"""Builds the environment Ganeti 3 passes to the OS scripts, for the tests.

Modelled on environment dumps of a real Ganeti 3.0.2: the
common instance set for create/import/export/rename, the core set for verify,
plus the script-specific variables (EXPORT_*/IMPORT_*/EXP_SIZE_FD,
OLD_INSTANCE_NAME, INSTANCE_REINSTALL). Like Ganeti, the environment is
clean: nothing of the caller's environment leaks in except what is asked.
"""

import uuid

GANETI_PATH = "/sbin:/bin:/usr/sbin:/usr/bin"


def core_env(osparams=None, variant="default", os_name="snf-image"):
    """What verify receives: OS_* , DEBUG_LEVEL, PATH and OSP_*."""
    env = {"OS_API_VERSION": "20", "OS_NAME": os_name, "OS_VARIANT": variant,
           "DEBUG_LEVEL": "0", "PATH": GANETI_PATH}
    for name, value in (osparams or {}).items():
        env["OSP_" + name.upper().replace("-", "_")] = value
    return env


def nic_env(nics):
    """nics: list of dicts with mac, ip, mode, link, name, network_* keys."""
    env = {"NIC_COUNT": str(len(nics))}
    for index, nic in enumerate(nics):
        nic = dict(nic)
        nic.setdefault("mac", f"aa:00:00:{index:02x}:00:01")
        nic.setdefault("mode", "bridged")
        nic.setdefault("link", "gnt-br0")
        nic.setdefault("uuid", str(uuid.uuid4()))
        if nic["mode"] == "bridged":
            nic.setdefault("bridge", nic["link"])
        for key, value in nic.items():
            if value is not None:
                env[f"NIC_{index}_{key.upper()}"] = str(value)
    return env


def instance_env(disks, nics=(), osparams=None, instance="inst1.gnt.test",
                 hypervisor="kvm", variant="default", os_name="snf-image"):
    """The set create/import/export/rename get. disks: list of paths (or
    {"uri": ...} dicts for userspace-only disks)."""
    env = core_env(osparams, variant, os_name)
    env.update({
        "INSTANCE_NAME": instance, "INSTANCE_OS": f"{os_name}+{variant}",
        "INSTANCE_UUID": str(uuid.uuid4()),
        "INSTANCE_PRIMARY_NODE": str(uuid.uuid4()), "INSTANCE_SECONDARY_NODES": "",
        "INSTANCE_CTIME": "1795654618.662041", "INSTANCE_MTIME": "1795654618.721591",
        "INSTANCE_BE_always_failover": "False", "INSTANCE_BE_auto_balance": "True",
        "INSTANCE_BE_maxmem": "128", "INSTANCE_BE_minmem": "128",
        "INSTANCE_BE_spindle_use": "1", "INSTANCE_BE_vcpus": "1",
        "HYPERVISOR": hypervisor, "DISK_COUNT": str(len(disks)),
    })
    if hypervisor == "kvm":
        env.update({"INSTANCE_HV_disk_type": "paravirtual", "INSTANCE_HV_nic_type": "paravirtual",
                    "INSTANCE_HV_kvm_flag": "disabled", "INSTANCE_HV_acpi": "True",
                    "INSTANCE_HV_kernel_path": "", "INSTANCE_HV_root_path": "/dev/vda1"})
    else:
        env["INSTANCE_HV_migration_mode"] = "live"
    for index, disk in enumerate(disks):
        if isinstance(disk, dict):
            env[f"DISK_{index}_URI"] = disk["uri"]
        else:
            env[f"DISK_{index}_PATH"] = str(disk)
            env[f"DISK_{index}_BACKEND_TYPE"] = "file:loop"
        env[f"DISK_{index}_ACCESS"] = "rw"
        env[f"DISK_{index}_UUID"] = str(uuid.uuid4())
        env[f"DISK_{index}_SIZE"] = "64"
        if hypervisor == "kvm":
            env[f"DISK_{index}_FRONTEND_TYPE"] = "paravirtual"
    env.update(nic_env(list(nics)))
    return env


def create_env(disks, nics=(), osparams=None, reinstall=False, **kwargs):
    env = instance_env(disks, nics, osparams, **kwargs)
    if reinstall:
        env["INSTANCE_REINSTALL"] = "1"
    return env


def export_env(disks, index, size_fd=None, **kwargs):
    env = instance_env(disks, **kwargs)
    path = str(disks[index])
    env.update({"EXPORT_INDEX": str(index), "EXPORT_DEVICE": path, "EXPORT_DISK_PATH": path,
                "HOME": "/root", "LANG": "C.UTF-8", "LC_ALL": "C", "TERM": "dumb"})
    if size_fd is not None:
        env["EXP_SIZE_FD"] = str(size_fd)
    return env


def import_env(disks, index, size_fd=None, **kwargs):
    env = instance_env(disks, **kwargs)
    path = str(disks[index])
    env.update({"IMPORT_INDEX": str(index), "IMPORT_DEVICE": path, "IMPORT_DISK_PATH": path,
                "HOME": "/root", "LANG": "C.UTF-8", "LC_ALL": "C", "TERM": "dumb"})
    if size_fd is not None:
        env["EXP_SIZE_FD"] = str(size_fd)
    return env


def rename_env(disks, old_name, new_name, **kwargs):
    env = instance_env(disks, instance=new_name, **kwargs)
    env["OLD_INSTANCE_NAME"] = old_name
    return env


def verify_env(osparams, **kwargs):
    return core_env(osparams, **kwargs)


def install_os_dir(dest):
    """Lay out an OS definition directory as `make install` does (os-def/* and
    snf-image-host.py side by side, backends/{src,dst}) and return its path."""
    import shutil
    from pathlib import Path
    repo = Path(__file__).resolve().parent.parent
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    for item in (repo / "os-def").iterdir():
        shutil.copy2(item, dest / item.name)
    shutil.copy2(repo / "snf-image-host.py", dest / "snf-image-host.py")
    (dest / "backends" / "src").mkdir(parents=True, exist_ok=True)
    (dest / "backends" / "dst").mkdir(parents=True, exist_ok=True)
    return dest
