"""The helper's task runner on the host: real task programs in a temporary
tasks directory, a temporary target directory, and files standing in for the
serial ports.  Covers C-locale ordering, the attribute line, the exclusion
matrix, the overwrite protocol, failure reporting
(ERROR: line, STDERR: tail, signals), the library used from a task, and the
worker's result line."""

import io
import os
import sys

import pytest

from conftest import REPO, load_script

helper = load_script("snf-image-helper.py", "snf_image_helper")

ALL_ATTRIBUTES = "excludable fs_resize_excludable mounted_excludable cloudinit_excludable overwritable"


class Setup:
    """A tasks dir, a target dir, a progress file and a log the tasks append to."""

    def __init__(self, root):
        self.root = root
        self.tasks = root / "tasks"
        self.tasks.mkdir()
        self.target = root / "target"
        self.target.mkdir()
        self.lib = root / "lib"
        self.lib.mkdir()
        (self.lib / "snf_image_helper.py").symlink_to(REPO / "snf-image-helper.py")
        self.progress = root / "progress"
        self.progress.write_text("")
        self.log = root / "log"
        self.log.write_text("")
        self.console = io.StringIO()
        self.env = {"PATH": os.environ["PATH"], "LOG": str(self.log),
                    "SNF_IMAGE_TARGET": str(self.target),
                    "SNF_IMAGE_MONITOR": str(self.progress),
                    "SNF_IMAGE_HELPER_LIB": str(self.lib)}

    def task(self, file_name, attributes="", body='echo "$TASKNAME" >> "$LOG"', mode=0o755):
        path = self.tasks / file_name
        path.write_text(f"#!/bin/sh\n# snf-image-task: {attributes}\nset -e\n{body}\n")
        path.chmod(mode)
        return path

    def overwrite(self, relative, body, mode=0o755):
        path = self.target / "root/snf-image/helper" / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"#!/bin/sh\n{body}\n")
        path.chmod(mode)
        return path

    def run(self, properties=None):
        env = dict(self.env)
        for name, value in (properties or {}).items():
            env["SNF_IMAGE_PROPERTY_" + name] = value
        runner = helper.TaskRunner(str(self.tasks), env, helper.Properties(env), helper.Console(self.console))
        runner.run_all()

    def progress_lines(self):
        return self.progress.read_text().splitlines()

    def log_lines(self):
        return self.log.read_text().splitlines()


@pytest.fixture
def setup(tmp_path, monkeypatch):
    monkeypatch.setattr(helper, "_monitor_fd", None)
    value = Setup(tmp_path)
    monkeypatch.setenv("SNF_IMAGE_MONITOR", str(value.progress))
    return value


def test_c_locale_order_and_run_parts_names(setup):
    for name in ("50a", "50Z", "2a", "20B", "10A", "81Last"):
        setup.task(name)
    setup.task("30NotExecutable", mode=0o644)
    setup.task("40bad.name")
    setup.task("45backup~")
    (setup.tasks / "35Directory").mkdir()
    setup.run()
    assert setup.log_lines() == ["10A", "20B", "2a", "50Z", "50a", "81Last"]
    progress = setup.progress_lines()
    assert progress[:4] == ["TASK_START:A", "TASK_END:A", "TASK_START:B", "TASK_END:B"]
    assert progress[-2:] == ["TASK_START:Last", "TASK_END:Last"]
    assert "skipped: 30NotExecutable" in setup.console.getvalue()


def test_attribute_line_parsed(tmp_path):
    path = tmp_path / "50Task"
    path.write_text("#!/usr/bin/python3\n\"\"\"doc\"\"\"\n#  snf-image-task:  excludable overwritable bogus\n")
    attributes, unknown = helper.read_task_attributes(str(path))
    assert attributes == {"excludable", "overwritable"} and unknown == ["bogus"]
    path.write_text("#!/bin/sh\necho no attributes\n")
    assert helper.read_task_attributes(str(path)) == (set(), [])


# upstream's exclusion matrix: which property skips a task with which attribute
MATRIX = [
    ("excludable", {"EXCLUDE_TASK_THETASK": "yes"}, True),
    ("excludable", {"EXCLUDE_TASK_OTHER": "yes"}, False),
    ("", {"EXCLUDE_TASK_THETASK": "yes"}, False),
    ("mounted_excludable", {"EXCLUDE_TASK_THETASK": "yes"}, False),
    ("fs_resize_excludable", {"EXCLUDE_FILESYSTEMRESIZE_TASKS": "1"}, True),
    ("excludable", {"EXCLUDE_FILESYSTEMRESIZE_TASKS": "1"}, False),
    ("mounted_excludable", {"EXCLUDE_MOUNTED_TASKS": "true"}, True),
    ("excludable fs_resize_excludable", {"EXCLUDE_MOUNTED_TASKS": "true"}, False),
    ("cloudinit_excludable", {"CLOUD_INIT": "on"}, True),
    ("mounted_excludable overwritable", {"CLOUD_INIT": "on"}, False),
    ("excludable", {"EXCLUDE_TASK_THETASK": "no"}, False),
    ("excludable", {"EXCLUDE_TASK_THETASK": "perhaps"}, True),     # unknown value = YES
    ("excludable", {"EXCLUDE_TASK_THETASK": ""}, False),           # empty = NO
]


@pytest.mark.parametrize("attributes, properties, skipped", MATRIX)
def test_exclusion_matrix(setup, attributes, properties, skipped):
    setup.task("50TheTask", attributes)
    setup.run(properties)
    assert setup.log_lines() == ([] if skipped else ["50TheTask"])
    progress = setup.progress_lines()
    # TASK_START and TASK_END are sent even for a skipped task
    assert progress[0] == "TASK_START:TheTask" and progress[-1] == "TASK_END:TheTask"
    warnings = [line for line in progress if line.startswith("WARNING:")]
    if skipped:
        assert any("TheTask was excluded" in w or "not running when cloud-init" in w for w in warnings)


def test_exclude_task_name_is_case_insensitive(setup):
    setup.task("50ChangePassword", ALL_ATTRIBUTES)
    setup.run({"EXCLUDE_TASK_CHANGEPASSWORD": "yes"})
    assert setup.log_lines() == []
    # the environment a real helper builds from {"exclude_task_changepassword": "Yes"}
    env = helper.apply_properties({"SNF_IMAGE_PROPERTIES": '{"exclude_task_changepassword": "Yes"}'})
    assert env["SNF_IMAGE_PROPERTY_EXCLUDE_TASK_CHANGEPASSWORD"] == "Yes"


def test_task_environment(setup):
    setup.task("50Env", "", 'echo "$TASKNAME|${CLOUD_INIT_CONFNAME-unset}|$SNF_IMAGE_TARGET" >> "$LOG"')
    setup.run()
    setup.run({"CLOUD_INIT": "yes"})
    assert setup.log_lines() == [f"50Env|unset|{setup.target}",
                                 f"50Env|98_snf-image-50Env.cfg|{setup.target}"]


# -- overwrite protocol ---------------------------------------------------------

def overwritable(setup):
    setup.task("50Thing", "excludable mounted_excludable overwritable",
               'echo "original $OVERWRITTEN_TASK" >> "$LOG"')


def test_overwrite_replaces_the_task(setup):
    overwritable(setup)
    script = setup.overwrite("deep/er/OVERWRITE_TASK_thing", 'echo "script $1 $TASKNAME" >> "$LOG"')
    setup.run({"ALLOW_MOUNTED_TASK_OVERWRITING": "yes"})
    assert setup.log_lines() == ["script pre-exec 50Thing"]
    assert f"WARNING:Task Thing was overwritten by file: `/root/snf-image/helper/deep/er/{script.name}'" \
        in setup.progress_lines()


def test_overwrite_101_runs_original_then_post_exec(setup):
    overwritable(setup)
    script = setup.overwrite("overwrite_task_Thing", 'echo "script $1" >> "$LOG"; [ "$1" = post-exec ] || exit 101')
    setup.run({"ALLOW_MOUNTED_TASK_OVERWRITING": "yes"})
    assert setup.log_lines() == ["script pre-exec", f"original {script}", "script post-exec"]
    assert setup.progress_lines()[-1] == "TASK_END:Thing"


def test_overwrite_failure_fails_the_task(setup):
    overwritable(setup)
    setup.overwrite("overwrite_task_Thing", 'echo "ERROR: replacement broke" >&2; exit 1')
    with pytest.raises(helper.TaskFailed, match="^replacement broke$"):
        setup.run({"ALLOW_MOUNTED_TASK_OVERWRITING": "yes"})
    assert "TASK_END:Thing" not in setup.progress_lines()


def test_post_exec_failure_fails_the_task(setup):
    overwritable(setup)
    setup.overwrite("overwrite_task_Thing", '[ "$1" = post-exec ] && exit 4; exit 101')
    with pytest.raises(helper.TaskFailed, match=r"Task Thing failed \(exit code 4\)"):
        setup.run({"ALLOW_MOUNTED_TASK_OVERWRITING": "yes"})
    assert setup.log_lines()[0].startswith("original ")


@pytest.mark.parametrize("case", ["property off", "not executable", "two files",
                                  "not overwritable", "a directory"])
def test_overwrite_ignored(setup, case):
    properties = {"ALLOW_MOUNTED_TASK_OVERWRITING": "yes"}
    if case == "not overwritable":
        setup.task("50Thing", "mounted_excludable", 'echo "original" >> "$LOG"')
    else:
        overwritable(setup)
    if case == "property off":
        properties = {}
    if case == "a directory":
        (setup.target / "root/snf-image/helper/overwrite_task_thing").mkdir(parents=True)
    else:
        setup.overwrite("overwrite_task_thing", 'echo script >> "$LOG"',
                        mode=0o644 if case == "not executable" else 0o755)
    if case == "two files":
        setup.overwrite("sub/OVERWRITE_TASK_THING", 'echo script >> "$LOG"')
    setup.run(properties)
    assert [line.split()[0] for line in setup.log_lines()] == ["original"]


def test_overwrite_search_survives_symlink_loops(setup):
    overwritable(setup)
    base = setup.target / "root/snf-image/helper"
    base.mkdir(parents=True)
    (base / "loop").symlink_to(base)
    setup.overwrite("linked/overwrite_task_thing", 'echo script >> "$LOG"')
    setup.run({"ALLOW_MOUNTED_TASK_OVERWRITING": "yes"})
    assert setup.log_lines() == ["script"]


# -- failures --------------------------------------------------------------------

def test_failure_message_is_the_last_error_line(setup):
    setup.task("10Good")
    setup.task("20Bad", "", 'echo "ERROR: first" >&2; echo "ERROR: the real one" >&2; echo noise >&2; exit 2')
    setup.task("30Never")
    with pytest.raises(helper.TaskFailed) as caught:
        setup.run()
    assert str(caught.value) == "the real one"
    assert setup.log_lines() == ["10Good"]
    assert setup.progress_lines()[-2:] == ["TASK_START:Bad", "ERROR:the real one"]
    console = setup.console.getvalue()
    assert "[20Bad] noise" in console and "Z [20Bad] ERROR: first" in console


def test_failure_without_error_line_sends_the_stderr_tail(setup):
    setup.task("20Bad", "", 'for i in $(seq 1 15); do echo "line $i" >&2; done; exit 3')
    with pytest.raises(helper.TaskFailed, match=r"^Task Bad failed \(exit code 3\)$"):
        setup.run()
    progress = setup.progress_lines()
    start = progress.index("STDERR:10:line 6")
    assert progress[start + 1:] == [f"line {i}" for i in range(7, 16)]


def test_failure_by_signal(setup):
    setup.task("20Killed", "", "kill -9 $$")
    with pytest.raises(helper.TaskFailed, match=r"killed by signal SIGKILL"):
        setup.run()
    assert setup.progress_lines()[-1] == "ERROR:Task Killed failed (killed by signal SIGKILL)"


def test_background_process_holding_stdout_does_not_hang(setup):
    setup.task("20Daemon", "", "sleep 3 &\necho started >> \"$LOG\"")
    setup.run()
    assert setup.log_lines() == ["started"]


def test_python_task_uses_the_library(setup):
    path = setup.tasks / "50Python"
    path.write_text(
        f"#!{sys.executable}\n# snf-image-task: excludable\n"
        "import os, sys\n"
        "sys.path.insert(0, os.environ['SNF_IMAGE_HELPER_LIB'])\n"
        "import snf_image_helper as helper\n"
        "helper.warn('from the task')\n"
        "if helper.check_yes_no('FAIL_NOW'):\n"
        "    helper.die(f'failing on purpose, osfamily={helper.prop(\"osfamily\")}')\n")
    path.chmod(0o755)
    setup.run({"OSFAMILY": "linux"})
    assert "WARNING:from the task" in setup.progress_lines()
    with pytest.raises(helper.TaskFailed, match="^failing on purpose, osfamily=linux$"):
        setup.run({"OSFAMILY": "linux", "FAIL_NOW": "yes"})


# -- the worker's result line, without root -----------------------------------------

def make_deployment(tmp_path, cmdline):
    (tmp_path / "cmdline").write_text(cmdline)
    for port in ("result", "progress"):
        (tmp_path / port).write_text("")
    return helper.Deployment(cmdline_path=str(tmp_path / "cmdline"),
                             result_port=str(tmp_path / "result"),
                             progress_port=str(tmp_path / "progress"),
                             tasks_dir=str(tmp_path / "tasks"), scratch_dir=str(tmp_path),
                             console=helper.Console(io.StringIO()))


def test_worker_refuses_without_activation_flag(tmp_path, monkeypatch):
    monkeypatch.setattr(helper, "_monitor_fd", None)
    deployment = make_deployment(tmp_path, "console=ttyS0 hypervisor=kvm rules_dev=/dev/fd0\n")
    assert deployment.main() == helper.WORKER_FAILED
    assert (tmp_path / "result").read_text() == \
        "ERROR: Kernel command line activation flag snf_image_activate_helper is missing: refusing to run\n"


def test_worker_check_mode_touches_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(helper, "_monitor_fd", None)
    deployment = make_deployment(tmp_path, "console=ttyS0 snf_image_check_helper rules_dev=/nonexistent\n")
    assert deployment.main() == helper.WORKER_SUCCESS
    assert (tmp_path / "result").read_text() == "SUCCESS\n"


@pytest.mark.parametrize("cmdline, message", [
    ("snf_image_activate_helper hypervisor=xen-hvm rules_dev=/dev/fd0",
     "ERROR: Unknown or unsupported hypervisor `xen-hvm' (this helper supports hypervisor=kvm)"),
    ("snf_image_activate_helper hypervisor=kvm", "ERROR: rules_serial= is missing from the kernel command line"),
])
def test_worker_bad_command_line(tmp_path, monkeypatch, cmdline, message):
    monkeypatch.setattr(helper, "_monitor_fd", None)
    deployment = make_deployment(tmp_path, cmdline)
    assert deployment.main() == helper.WORKER_FAILED
    assert (tmp_path / "result").read_text() == message + "\n"
    assert (tmp_path / "progress").read_text() == "ERROR:" + message[len("ERROR: "):] + "\n"


def test_worker_reports_a_bug_as_one_line(tmp_path, monkeypatch):
    monkeypatch.setattr(helper, "_monitor_fd", None)
    deployment = make_deployment(tmp_path, "snf_image_activate_helper hypervisor=kvm rules_dev=/dev/fd0")

    def broken():
        raise KeyError("surprise")
    monkeypatch.setattr(deployment, "prepare_and_run", broken)
    assert deployment.main() == helper.WORKER_FAILED
    assert (tmp_path / "result").read_text() == \
        "ERROR: Internal error of the helper: KeyError: 'surprise'\n"


# -- Python tasks run in a fork of the runner ------------------------------------

def python_task(setup, file_name, body, attributes="", shebang=None):
    path = setup.tasks / file_name
    path.write_text(f"#!{shebang or sys.executable}\n# snf-image-task: {attributes}\n"
                    "import json, os, sys\n" + body + "\n")
    path.chmod(0o755)
    return path


REPORT = ("with open(os.environ['LOG'], 'a') as log:\n"
          "    log.write(json.dumps({'forked': '_pytest' in sys.modules,\n"
          "                          'tasklib_preloaded': 'snf_image_tasklib' in sys.modules,\n"
          "                          'env': dict(os.environ), 'argv': sys.argv, 'cwd': os.getcwd(),\n"
          "                          'stdin': sys.stdin.read(), 'path0': sys.path[0],\n"
          "                          'name': __name__, 'file': __file__}) + '\\n')\n")


def reports(setup):
    import json
    return [json.loads(line) for line in setup.log_lines()]


def test_python_task_runs_in_a_fork_with_the_task_environment(setup):
    (setup.tasks / "snf_image_tasklib.py").symlink_to(REPO / "tasks.d/snf_image_tasklib.py")
    path = python_task(setup, "50Python", REPORT + "print('to stdout'); print('to stderr', file=sys.stderr)")
    setup.run({"CLOUD_INIT": "yes"})
    (report,) = reports(setup)
    assert report["forked"] and report["tasklib_preloaded"]
    expected_env = dict(setup.env, TASKNAME="50Python", SNF_IMAGE_PROPERTY_CLOUD_INIT="yes",
                        CLOUD_INIT_CONFNAME="98_snf-image-50Python.cfg")
    assert report["env"] == expected_env          # exactly the task's, nothing of the runner's
    assert report["argv"] == [str(path)] and report["cwd"] == "/" and report["stdin"] == ""
    assert report["path0"] == str(setup.tasks) and report["name"] == "__main__"
    assert report["file"] == str(path)
    console = setup.console.getvalue()
    assert "[50Python] to stdout" in console and "[50Python] to stderr" in console
    assert setup.progress_lines() == ["TASK_START:Python", "TASK_END:Python"]


def test_non_python_tasks_are_executed(setup):
    python_task(setup, "10Options", REPORT, shebang=f"{sys.executable} -I")
    python_task(setup, "20Python2", REPORT, shebang="/usr/bin/env python3")
    setup.task("30Shell", "", 'echo "shell $TASKNAME $(cat /proc/$$/comm)" >> "$LOG"')
    setup.run()
    first, second, third = setup.log_lines()
    assert not __import__("json").loads(first)["forked"]      # a shebang with options: exec'd
    assert __import__("json").loads(second)["forked"]         # env python3: in the fork
    assert third == "shell 30Shell 30Shell"


@pytest.mark.parametrize("body, message, last_progress", [
    ("sys.exit(3)", r"^Task Bad failed \(exit code 3\)$", "STDERR:1:before"),
    ("sys.exit('a message')", r"^Task Bad failed \(exit code 1\)$", "a message"),
    ("print('ERROR: told why', file=sys.stderr); sys.exit(2)", "^told why$", "ERROR:told why"),
    ("raise ValueError('broken task')", r"^Task Bad failed \(exit code 1\)$",
     "ValueError: broken task"),
    ("sys.path.insert(0, os.environ['SNF_IMAGE_HELPER_LIB'])\n"
     "import snf_image_helper as helper\nhelper.die('through the library')",
     "^through the library$", "ERROR:through the library"),
    ("import signal\nos.kill(os.getpid(), signal.SIGKILL)",
     r"^Task Bad failed \(killed by signal SIGKILL\)$", "STDERR:1:before"),
    ("sys.exit(0)", None, None),
    ("os._exit(0)", None, None),
    ("raise SystemExit", None, None),
])
def test_python_task_exit_status_and_stderr_tail(setup, body, message, last_progress):
    python_task(setup, "20Bad", "print('before', file=sys.stderr)\n" + body)
    python_task(setup, "30Next", "open(os.environ['LOG'], 'a').write('next ran\\n')")
    if message is None:
        setup.run()
        assert setup.log_lines() == ["next ran"]
        return
    with pytest.raises(helper.TaskFailed, match=message):
        setup.run()
    assert setup.log_lines() == []
    progress = setup.progress_lines()
    assert progress[-1] == last_progress
    if not last_progress.startswith("ERROR:"):      # the tail starts with the first stderr line
        assert any(line.startswith("STDERR:") and line.endswith(":before") for line in progress)


def test_python_tasks_do_not_leak_into_each_other_or_the_runner(setup):
    python_task(setup, "10Dirty", "os.environ['LEAK'] = 'x'; sys.modules['leaked'] = sys; os.chdir('/tmp')")
    python_task(setup, "20Clean", "open(os.environ['LOG'], 'a').write("
                "f\"{'LEAK' in os.environ} {'leaked' in sys.modules} {os.getcwd()}\\n\")")
    cwd = os.getcwd()
    setup.run()
    assert setup.log_lines() == ["False False /"]
    assert "leaked" not in sys.modules and "LEAK" not in os.environ and os.getcwd() == cwd


def test_python_task_overwrite_protocol(setup):
    python_task(setup, "50Thing", "open(os.environ['LOG'], 'a').write("
                "f\"original {os.environ['OVERWRITTEN_TASK']} {'_pytest' in sys.modules}\\n\")",
                attributes="mounted_excludable overwritable")
    script = setup.overwrite("overwrite_task_thing", 'echo "script $1" >> "$LOG"; [ "$1" = post-exec ] || exit 101')
    setup.run({"ALLOW_MOUNTED_TASK_OVERWRITING": "yes"})
    assert setup.log_lines() == ["script pre-exec", f"original {script} True", "script post-exec"]
    assert setup.progress_lines()[-1] == "TASK_END:Thing"


def test_python_task_background_child_does_not_hang(setup):
    python_task(setup, "20Daemon", "import subprocess\nsubprocess.Popen(['sleep', '3'])\n"
                "open(os.environ['LOG'], 'a').write('started\\n')")
    setup.run()
    assert setup.log_lines() == ["started"]


# -- tasks with nothing to do, precompiled task code ----------------------------

def test_task_with_nothing_to_do_is_not_started(setup):
    python_task(setup, "10Windows", REPORT, attributes="overwritable osfamily=windows,windows-legacy")
    python_task(setup, "20Linux", REPORT, attributes="osfamily=linux")
    python_task(setup, "30CloudInit", REPORT, attributes="cloudinit_only")
    setup.run({"OSFAMILY": "linux"})
    assert [report["env"]["TASKNAME"] for report in reports(setup)] == ["20Linux"]
    assert setup.progress_lines() == ["TASK_START:Windows", "TASK_END:Windows",
                                      "TASK_START:Linux", "TASK_END:Linux",
                                      "TASK_START:CloudInit", "TASK_END:CloudInit"]
    console = setup.console.getvalue()
    assert "[10Windows] nothing to do for OSFAMILY linux" in console
    assert "[30CloudInit] nothing to do: cloud-init is not enabled" in console
    setup.log.write_text("")
    setup.run({"OSFAMILY": "windows-legacy", "CLOUD_INIT": "yes"})
    assert [report["env"]["TASKNAME"] for report in reports(setup)] == ["10Windows", "30CloudInit"]


def test_overwrite_script_of_a_task_with_nothing_to_do_still_runs(setup):
    python_task(setup, "50Thing", REPORT, attributes="overwritable osfamily=windows")
    setup.overwrite("overwrite_task_thing", 'echo "script $1" >> "$LOG"; [ "$1" = post-exec ] || exit 101')
    setup.run({"OSFAMILY": "linux", "ALLOW_MOUNTED_TASK_OVERWRITING": "yes"})
    assert setup.log_lines() == ["script pre-exec", "script post-exec"]


def test_family_attribute_words(tmp_path):
    path = tmp_path / "10Task"
    path.write_text("#!/bin/sh\n# snf-image-task: osfamily=linux,freebsd osfamily=plan9 osfamily=\n")
    attributes, unknown = helper.read_task_attributes(str(path))
    assert attributes == {"osfamily=linux,freebsd"} and unknown == ["osfamily=plan9", "osfamily="]
    assert helper.Task(str(path), attributes).families == {"linux", "freebsd"}
    assert helper.Task(str(path), set()).families is None


def pyc_with(code_source, hashed_source):
    """A hash-based pyc holding the code of `code_source`, recording the hash of `hashed_source`."""
    import importlib.util
    import marshal
    return (importlib.util.MAGIC_NUMBER + (3).to_bytes(4, "little")
            + importlib.util.source_hash(hashed_source)
            + marshal.dumps(compile(code_source, "task", "exec")))


def test_precompiled_task_code_is_used_only_for_its_own_source(setup):
    import importlib.util
    path = python_task(setup, "50Task", "open(os.environ['LOG'], 'a').write('from source\\n')")
    cached = importlib.util.cache_from_source(str(path))
    os.makedirs(os.path.dirname(cached))
    other = b"import os\nopen(os.environ['LOG'], 'a').write('from the cache\\n')\n"
    with open(cached, "wb") as handle:
        handle.write(pyc_with(other, path.read_bytes()))
    setup.run()
    with open(cached, "wb") as handle:
        handle.write(pyc_with(other, path.read_bytes() + b"\n# changed\n"))
    setup.run()
    with open(cached, "wb") as handle:
        handle.write(b"garbage")
    setup.run()
    assert setup.log_lines() == ["from the cache", "from source", "from source"]


def test_builder_precompiles_the_python_tasks(setup):
    import importlib.util
    import subprocess
    builder = load_script("snf-image-update-helper.py")
    task = python_task(setup, "50Task", "print('x')")
    setup.task("60Shell")
    (setup.tasks / "module.py").write_text("x = 1\n")
    subprocess.run([sys.executable, "-c", builder.PRECOMPILE_TASKS_SOURCE, str(setup.tasks)],
                   check=True)
    cached = importlib.util.cache_from_source(str(task))
    assert sorted(os.listdir(os.path.dirname(cached))) == [os.path.basename(cached)]
    code = helper.load_task_code(str(task))
    with open(cached, "rb") as handle:
        assert code.co_consts == __import__("marshal").loads(handle.read()[16:]).co_consts
