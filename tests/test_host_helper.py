"""snf-image-host.py helper-VM launcher: the selectors loop, driven by real
qemu guests under TCG that boot a one-sector program writing to the serial
ports (console, result, progress) and then reset (-no-reboot exits), hang, or
exit through isa-debug-exit; timeouts; SIGTERM cleanup; the floppy (read back
with debugfs, no mount); the qemu command line; the KVM probe."""

import json
import os
import signal
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from conftest import REPO, load_script, require_programs
from host_testlib import Site, last_line

host = load_script("snf-image-host.py")

COM1, COM2, COM3 = 0x3F8, 0x2F8, 0x3E8


def boot_sector(messages, ending="reset", exit_code=1):
    """16-bit code at 0x7c00: print each (port, bytes) message, then
    reset (triple fault: qemu -no-reboot exits 0), hang, or exit via isa-debug-exit."""
    prefix = bytes.fromhex("fa31c08ed8")                   # cli; xor ax,ax; mov ds,ax
    ending_code_length = {"reset": 6, "hang": 2, "exit": 6}[ending]
    code_length = len(prefix) + 14 * len(messages) + ending_code_length
    data, offsets = b"", []
    for _, message in messages:
        offsets.append(code_length + len(data))
        data += message + b"\0"
    code = bytearray(prefix)
    for (port, _), offset in zip(messages, offsets):
        code += b"\xbe" + struct.pack("<H", 0x7C00 + offset)       # mov si, msg
        code += b"\xba" + struct.pack("<H", port)                  # mov dx, port
        code += bytes.fromhex("ac84c07403eeebf8")                  # lodsb; test; jz; out dx,al; jmp
    if ending == "reset":                                          # lidt [zero]; int3
        code += b"\x0f\x01\x1e" + struct.pack("<H", 0x7C00 + code_length + len(data)) + b"\xcc"
    elif ending == "hang":
        code += b"\xeb\xfe"
    else:
        code += bytes((0xB0, exit_code, 0xE6, 0xF4, 0xEB, 0xFE))
    assert len(code) == code_length
    sector = bytes(code) + data + bytes(6)
    assert len(sector) <= 510
    return sector + bytes(510 - len(sector)) + b"\x55\xaa"


def guest_argv(disk, fds, extra=()):
    argv = ["qemu-system-x86_64", "-accel", "tcg", "-machine", "pc", "-m", "16", "-nodefaults",
            "-nographic", "-no-reboot", "-vga", "none", "-monitor", "none", "-parallel", "none",
            "-drive", f"file={disk},format=raw,if=ide,index=0"]
    for name in ("console", "result", "progress"):
        argv += ["-serial", f"file:/proc/self/fd/{fds[name]}"]
    return argv + ["-serial", "null", "-runas", "nobody", *extra]


class RecordingMonitor(host.Monitor):
    """The real Monitor class with its messages kept for inspection."""

    def __init__(self):
        super().__init__([], "test")
        self.messages = []

    def send(self, message_type, **fields):
        self.messages.append({"type": message_type, **fields})


PROGRESS = b"TASK_START:FixPartitionTable\nWARNING:careful\nSTDERR:2:line one\nline two\nTASK_END:FixPartitionTable\n"


def run_guest(tmp_path, messages, ending="reset", soft="60", extra=()):
    require_programs("qemu-system-x86_64")
    disk = tmp_path / "guest.img"
    disk.write_bytes(boot_sector(messages, ending))
    config = host.finalize_config({"HELPER_SOFT_TIMEOUT": soft, "HELPER_HARD_TIMEOUT": "3"})
    monitor = RecordingMonitor()
    started = time.monotonic()
    try:
        host.run_qemu_helper(lambda fds: guest_argv(disk, fds, extra), config, monitor, str(tmp_path))
        error = None
    except host.SnfError as exc:
        error = exc
    return error, monitor.messages, time.monotonic() - started


@pytest.mark.qemu
def test_success_relays_console_and_progress(tmp_path, capfd):
    error, messages, _ = run_guest(tmp_path, [(COM1, b"\r\nhello from the guest\r\n"), (COM3, PROGRESS),
                                              (COM2, b"SUCCESS\r\n")])
    assert error is None
    assert [m.get("subtype") for m in messages] == ["task-start", "warning", "error", "task-end"]
    assert messages[0] == {"type": "image-helper", "subtype": "task-start", "task": "FixPartitionTable"}
    assert messages[1]["messages"] == ["careful"]
    assert messages[2]["stderr"] == "line one\nline two\n"
    assert "HELPER: hello from the guest" in capfd.readouterr().err


@pytest.mark.qemu
def test_error_result(tmp_path):
    error, _, _ = run_guest(tmp_path, [(COM2, b"ERROR: task FixPartitionTable failed\r\n")])
    assert error.exit_code == 3
    assert str(error) == "image customization failed inside the helper VM: task FixPartitionTable failed"


@pytest.mark.qemu
@pytest.mark.parametrize("result", [b"", b"SUCCESSFUL\n", b"\nSUCCESS\n"])
def test_only_success_on_the_first_line_counts(tmp_path, result):
    messages = [(COM1, b"console\r\n")] + ([(COM2, result)] if result else [])
    error, _, _ = run_guest(tmp_path, messages)
    assert error is not None and error.exit_code == 3
    if not result.strip():
        assert "without reporting a result" in str(error)


@pytest.mark.qemu
def test_crash_is_distinct(tmp_path):
    error, _, _ = run_guest(tmp_path, [(COM1, b"about to crash\r\n")], ending="exit",
                            extra=("-device", "isa-debug-exit,iobase=0xf4,iosize=0x04"))
    assert error.exit_code == 3 and "crashed (qemu exit status 3)" in str(error)


@pytest.mark.qemu
def test_soft_timeout_terminates(tmp_path):
    error, _, elapsed = run_guest(tmp_path, [(COM1, b"hanging\r\n")], ending="hang", soft="2")
    assert error.exit_code == 3
    assert "did not finish within HELPER_SOFT_TIMEOUT (2 s)" in str(error) and "terminated" in str(error)
    assert elapsed < 120


def test_hard_timeout_kills_what_ignores_sigterm(tmp_path):
    config = host.finalize_config({"HELPER_SOFT_TIMEOUT": "1", "HELPER_HARD_TIMEOUT": "1"})
    script = "trap '' TERM; while :; do sleep 0.1; done"
    started = time.monotonic()
    with pytest.raises(host.SnfError) as error:
        host.run_qemu_helper(lambda fds: ["sh", "-c", script], config, RecordingMonitor(), str(tmp_path))
    assert "killed" in str(error.value) and time.monotonic() - started < 120


def test_missing_qemu_program(tmp_path):
    config = host.finalize_config({})
    with pytest.raises(host.SnfError, match="cannot start the helper VM"):
        host.run_qemu_helper(lambda fds: ["/nonexistent/qemu"], config, RecordingMonitor(), str(tmp_path))


@pytest.mark.parametrize("lines, expected", [
    ([b"TASK_START:A", b"TASK_END:A"], [("task-start", "A"), ("task-end", "A")]),
    ([b"", b"   ", b"BOGUS:thing"], []),
    ([b"STDERR:x:oops"], []),
    ([b"STDERR:3:a", b"b"], [("error", "a\nb\n")]),      # unterminated at EOF: flushed
    ([b"ERROR:bad thing"], [("error", ["bad thing"])]),
])
def test_progress_protocol_edge_cases(lines, expected):
    monitor = RecordingMonitor()
    protocol = host.HelperProtocol(monitor)
    protocol.feed(b"\n".join(lines))
    protocol.finish()
    got = [(m["subtype"], m.get("task") or m.get("messages") or m.get("stderr")) for m in monitor.messages]
    assert got == expected


def test_progress_monitor_program_receives_json(tmp_path):
    out = tmp_path / "monitor.out"
    script = tmp_path / "monitor"
    script.write_text(f"#!/bin/sh\necho \"$1\" > {out}.argv\ncat > {out}\n")
    script.chmod(0o755)
    with host.Monitor([str(script)], "vm1.example.org") as monitor:
        monitor.send("image-info", messages=["hello"])
        monitor.send("image-copy-progress", total=10, position=5, progress=50.0)
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [m["type"] for m in lines] == ["image-info", "image-copy-progress"]
    assert all(isinstance(m["timestamp"], float) for m in lines)
    assert Path(f"{out}.argv").read_text().strip() == "vm1.example.org"


def test_dead_monitor_does_not_stop_deployment(tmp_path, capfd):
    script = tmp_path / "monitor"
    script.write_text("#!/bin/sh\nexit 0\n")
    script.chmod(0o755)
    with host.Monitor([str(script)], "vm1") as monitor:
        monitor.process.wait(timeout=60)      # the monitor is gone before the first message
        for _ in range(3):
            monitor.send("image-info", messages=["still going"])
    err = capfd.readouterr().err
    assert "progress monitor died" in err and "[MONITOR]" in err


# --- the floppy ------------------------------------------------------------------

def debugfs_cat(image, name):
    result = subprocess.run(["debugfs", "-R", f"cat /{name}", str(image)], capture_output=True, check=True)
    return result.stdout


@pytest.mark.parametrize("answer_file", [False, True])
def test_floppy_contents(tmp_path, answer_file):
    require_programs("mkfs.ext2", "debugfs")
    config = host.finalize_config({"WINDOWS_TIMEZONE": "w. europe standard time", "IMAGE_DIR": str(tmp_path)})
    params = {"img_id": "x", "img_format": "extdump", "img_passwd": "S3cretPW"}
    if answer_file:
        answer = tmp_path / "answer.xml"
        answer.write_text("<unattend>custom</unattend>")
        params["os_answer_file"] = answer.as_uri()
    environ = {"NIC_COUNT": "1", "NIC_0_MAC": "aa:00:00:00:00:01", "NIC_0_IP": "10.0.0.2",
               "OTHER": "not copied"}
    rules = {"format": 1, "disks": ["snf-disk0"],
             "env": host.helper_environment(environ, params, config, "extdump", "vm1.example.org",
                                            answer_file)}
    workdir = tmp_path / "work"
    workdir.mkdir()
    floppy = host.make_floppy(str(workdir), config, rules, params)
    info = os.stat(floppy)
    assert info.st_size == 1440 * 1024 and info.st_mode & 0o777 == 0o600
    assert sorted(os.listdir(workdir)) == ["floppy.img"]          # content dir removed
    loaded = json.loads(debugfs_cat(floppy, "rules.json"))
    env = loaded["env"]
    assert loaded["disks"] == ["snf-disk0"] and loaded["format"] == 1
    assert env["SNF_IMAGE_PASSWD"] == "S3cretPW" and env["SNF_IMAGE_HOSTNAME"] == "vm1.example.org"
    assert env["SNF_IMAGE_PROPERTY_OSFAMILY"] == "linux" and env["SNF_IMAGE_PROPERTY_ROOT_PARTITION"] == "1"
    assert env["SNF_IMAGE_NIC_0_IP"] == "10.0.0.2" and "SNF_IMAGE_OTHER" not in env
    assert "SNF_IMAGE_PASSWD_HASH" not in env
    unattend = debugfs_cat(floppy, "unattend.xml")
    if answer_file:
        assert unattend == b"<unattend>custom</unattend>"
        assert env["SNF_IMAGE_PROPERTY_IGNORE_UNATTEND"] == "yes"
        stat_out = subprocess.run(["debugfs", "-R", "stat /sysprep.inf", str(floppy)],
                                  capture_output=True, text=True).stdout
        assert "symlink" in stat_out.lower()
    else:
        assert b"<TimeZone>W. Europe Standard Time</TimeZone>" in unattend
        assert b"TimeZone=110" in debugfs_cat(floppy, "sysprep.inf")


# --- the qemu command line and the accelerator ----------------------------------------

def test_helper_command_line(tmp_path):
    config = host.finalize_config({"HELPER_MEMORY": "300", "HELPER_USER": "nobody"})
    disks = [host.Disk(0, path="/dev/loop7"), host.Disk(1, path="/srv/a,b.disk")]
    argv = host.helper_command(config, "/h/releases/1", "tcg", disks, "/run/x/floppy.img",
                               {"console": 5, "result": 6, "progress": 7})
    joined = " ".join(argv)
    assert argv[:3] == ["qemu-system-x86_64", "-accel", "tcg"]
    assert "-runas nobody" in joined and "-m 300" in joined and "-no-reboot" in joined
    assert "-nodefaults" in joined and "-kernel /h/releases/1/kernel" in joined
    assert "file=/dev/loop7,format=raw,if=none,id=disk0,cache=none,aio=threads" in joined
    assert "file=/srv/a,,b.disk" in joined and "serial=snf-disk1" in joined
    assert argv.count("-serial") == 4 and "file:/proc/self/fd/6" in argv and argv[-3] == "null"
    assert "readonly=on" in joined and "snf_image_activate_helper" in joined
    assert "snf_image_debug_helper" not in joined
    # the rules travel on a read-only virtio disk found by its serial (no floppy controller)
    assert "file=/run/x/floppy.img,format=raw,if=none,id=rules,readonly=on" in joined
    assert "virtio-blk-pci,drive=rules,serial=snf-rules" in joined and "rules_serial=snf-rules" in joined
    assert "if=floppy" not in joined and "rules_dev" not in joined
    # the root disk comes first, so that it is /dev/vda
    assert joined.index("serial=snf-helper-root") < joined.index("serial=snf-disk0")
    append = argv[argv.index("-append") + 1].split()
    assert {"quiet", "panic=-1", "mitigations=off", "init=/usr/bin/snf-image-helper"} <= set(append)
    firmware = host.helper_firmware()
    assert (["-bios", firmware] == argv[argv.index("-bios"):argv.index("-bios") + 2]) if firmware \
        else "-bios" not in argv
    debug = host.helper_command(host.finalize_config({"HELPER_DEBUG": "yes"}), "/h", "kvm", disks, "/f",
                                {"console": 5, "result": 6, "progress": 7})
    assert "snf_image_debug_helper" in " ".join(debug) and "pty" in debug
    # the mailbox of prepared keys and hashes: read-only for the guest, read
    # through the page cache so that what the host posts later is seen
    assert "snf-prepared" not in joined
    mailbox = " ".join(host.helper_command(config, "/h", "tcg", disks, "/f", {}, prepared="/run/x/prepared.img"))
    assert "file=/run/x/prepared.img,format=raw,if=none,id=prepared,readonly=on,cache=writeback" in mailbox
    assert "virtio-blk-pci,drive=prepared,serial=snf-prepared" in mailbox


@pytest.mark.qemu
def test_probe_guest_runs_under_tcg():
    require_programs("qemu-system-x86_64")
    assert host.probe_accelerator(["qemu-system-x86_64"], "tcg", timeout=60)


@pytest.mark.qemu
def test_auto_accelerator_never_hangs(tmp_path, monkeypatch):
    require_programs("qemu-system-x86_64")
    monkeypatch.setattr(host, "RUN_DIR", tmp_path / "run")
    config = host.finalize_config({"HELPER_ACCEL": "auto"})
    started = time.monotonic()
    accel = host.choose_accelerator(config)
    assert accel in ("kvm", "tcg") and time.monotonic() - started < 60
    if os.path.exists("/dev/kvm"):
        cached = json.loads((tmp_path / "run" / "accel").read_text())
        assert cached["accel"] == accel and cached["boot_id"] == host.boot_id()
        started = time.monotonic()
        assert host.choose_accelerator(config) == accel and time.monotonic() - started < 5


def test_explicit_accelerator_is_used_as_is():
    assert host.choose_accelerator(host.finalize_config({"HELPER_ACCEL": "kvm"})) == "kvm"


# --- create without a usable helper; SIGTERM cleanup ---------------------------------

def test_create_without_helper_fails_plainly_and_cleans_up(tmp_path, monkeypatch):
    (tmp_path / "run").mkdir()
    site = Site(tmp_path / "site", HELPER_DIR=tmp_path / "no-helper", TEMP_DIR=tmp_path / "run")
    (site.images / "i.img").write_bytes(os.urandom(8192))
    disk = tmp_path / "disk"
    disk.write_bytes(bytes(65536))
    result = site.deploy("--disk", disk, "--img-id", "i.img", "--img-format", "diskdump",
                         env={"OSP_IMG_PASSWD": "Secr3tValue"})
    assert result.returncode == 1
    line = last_line(result)
    assert "did not complete" in line and "snf-image-update-helper" in line
    assert b"Secr3tValue" not in result.stderr + result.stdout
    assert disk.read_bytes() == bytes(65536), "the disk must not be touched when no helper can run"
    assert os.listdir(tmp_path / "run") == []


@pytest.mark.qemu
def test_sigterm_kills_qemu_and_removes_temp_files(tmp_path):
    require_programs("qemu-system-x86_64")
    disk = tmp_path / "guest.img"
    disk.write_bytes(boot_sector([(COM1, b"waiting\r\n")], "hang"))
    code = textwrap.dedent(f"""
        import sys, os
        sys.path.insert(0, {str(REPO / 'tests')!r})
        from conftest import load_script
        from test_host_helper import guest_argv
        host = load_script("snf-image-host.py")
        config = host.finalize_config({{"HELPER_SOFT_TIMEOUT": "600"}})
        def work():
            with host.private_temp_dir({str(tmp_path / "run")!r}) as workdir:
                print("WORKDIR", workdir, flush=True)
                host.run_qemu_helper(lambda fds: guest_argv({str(disk)!r}, fds), config,
                                     host.Monitor([], "x"), workdir)
        sys.exit(host.main.__globals__["SnfError"] and _run(work))
        """)
    code = code.replace("sys.exit(host.main.__globals__[\"SnfError\"] and _run(work))", textwrap.dedent("""
        signal = __import__("signal")
        signal.signal(signal.SIGTERM, host._terminate)
        try:
            work()
        except host.SnfError as exc:
            print("ERROR:", exc, file=sys.stderr)
            sys.exit(exc.exit_code)
        """))
    process = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    workdir = process.stdout.readline().split()[1]
    qemu_pid = None
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        children = subprocess.run(["pgrep", "-P", str(process.pid), "qemu"], capture_output=True,
                                  text=True).stdout.split()
        if children:
            qemu_pid = int(children[0])
            break
        time.sleep(0.05)
    assert qemu_pid is not None
    time.sleep(1)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 1 and "interrupted by signal SIGTERM" in err.strip().splitlines()[-1]
    assert not os.path.exists(workdir)
    for _ in range(300):
        if not os.path.exists(f"/proc/{qemu_pid}"):
            break
        time.sleep(0.1)
    assert not os.path.exists(f"/proc/{qemu_pid}"), "qemu survived SIGTERM of its parent"


def test_answer_file_outside_image_dir_is_refused(tmp_path):
    config = host.finalize_config({"IMAGE_DIR": str(tmp_path / "images")})
    (tmp_path / "images").mkdir()
    with pytest.raises(host.SnfError, match="inside IMAGE_DIR"):
        host.fetch_answer_file("file:///etc/shadow", config.IMAGE_DIR, 5)
    with pytest.raises(host.SnfError, match="inside IMAGE_DIR"):
        host.fetch_answer_file(f"file://{tmp_path}/images/../x.xml", config.IMAGE_DIR, 5)


@pytest.mark.parametrize("outcome, expected", [
    (dict(exit_code=0, result=b"SUCCESS\n"), None),
    (dict(exit_code=0, result=b"SUCCESS\r\nmore"), None),
    (dict(exit_code=0, result=b"ERROR: no root file system\n"),
     "customization failed inside the helper VM: no root file system"),
    (dict(exit_code=0, result=b"garbage"), "unexpected result: 'garbage'"),
    (dict(exit_code=0, console_tail=["booting", "Kernel panic"]),
     "without reporting a result (last console line: Kernel panic)"),
    (dict(exit_code=0), "last console line: no console output"),
    (dict(exit_code=1, result=b"SUCCESS\n", qemu_tail=["could not open disk"]),
     "crashed (qemu exit status 1): could not open disk"),
    (dict(exit_code=-9, timed_out="killed", result=b"SUCCESS\n"), "within HELPER_SOFT_TIMEOUT (7 s) and was killed"),
])
def test_helper_outcome_names_the_reason(outcome, expected):
    config = host.finalize_config({"HELPER_SOFT_TIMEOUT": "7"})
    fields = dict(result=b"", timed_out=None, console_tail=[], qemu_tail=[]) | outcome
    if expected is None:
        host._check_helper_outcome(host.HelperOutcome(**fields), config)
        return
    with pytest.raises(host.SnfError) as error:
        host._check_helper_outcome(host.HelperOutcome(**fields), config)
    assert expected in str(error.value) and error.value.exit_code == 3


def test_the_helper_command_line_has_one_owner(tmp_path):
    """The builder's --check boot and the benchmark use the host's
    helper_command; nothing else in the product spells the command line."""
    from types import SimpleNamespace
    builder = load_script("snf-image-update-helper.py")
    settings = SimpleNamespace(programs={"QEMU": ["qemu-system-x86_64"]}, memory=300, user="nobody")
    argv = builder.qemu_command(settings, tmp_path, "tcg", tmp_path, append_extra=("snf_image_check_helper",))
    config = host.finalize_config({"HELPER_MEMORY": "300", "HELPER_USER": "nobody" if os.geteuid() == 0 else "root"})
    assert argv == host.helper_command(config, str(tmp_path), "tcg", [], None,
                                       {"console": str(tmp_path / "console"), "result": str(tmp_path / "result")},
                                       extra_append=("snf_image_check_helper",))
    assert "snf_image_activate_helper" not in " ".join(argv)       # a check boot touches no disk
    assert builder.HELPER_INIT == host.HELPER_INIT and builder.ROOT_SERIAL == host.HELPER_ROOT_SERIAL
    spelled = [path.relative_to(REPO).as_posix() for path in sorted(REPO.rglob("*.py"))
               if "tests" not in path.relative_to(REPO).parts
               and any(marker in path.read_text(errors="replace")
                       for marker in ("drive=helperroot", "rootfstype=ext4", "panic=-1"))]
    assert spelled == ["snf-image-host.py"]


def test_a_stop_signal_waits_for_the_end_of_a_deferred_block():
    """Starting qemu and recording its pid is not cut in two by SIGTERM: the
    block runs to its end, then the operation unwinds with the usual line."""
    import signal
    saved = {signum: signal.getsignal(signum) for signum in host.STOP_SIGNALS}
    try:
        for signum in host.STOP_SIGNALS:
            signal.signal(signum, host._terminate)
        finished = []
        with pytest.raises(host.SnfError, match="^interrupted by signal SIGTERM$"):
            with host.stop_signals_deferred():
                os.kill(os.getpid(), signal.SIGTERM)
                finished.append("pid recorded")
        assert finished == ["pid recorded"]
        assert signal.getsignal(signal.SIGHUP) == signal.SIG_IGN, "further signals are ignored"
    finally:
        for signum, handler in saved.items():
            signal.signal(signum, handler)
