"""Hostile input through the real `deploy` path (the same operation_create
that Ganeti's `create` runs): each case is refused with exit 2 and one line,
last, before a byte reaches the disk (the disk file is compared afterwards),
and the canary secret shows up nowhere. Plus hypothesis fuzzing of every
parser the host and the helper apply to input: configuration files, OS
parameters, config_url documents, URLs, helper progress lines, rules.json,
properties: no exception other than the one error type."""

import base64
import json
import os
import socket
import threading
import urllib.parse

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from conftest import load_script
from helpervm import current_fake_release
from host_testlib import Site, last_line

host = load_script("snf-image-host.py")
helper = load_script("snf-image-helper.py", "snf_image_helper")
MIB = 1024 * 1024
SECRET = "Canary-S3cret-Pw"
ORIGINAL = b"\x5a" * (2 * MIB)


@pytest.fixture
def case(tmp_path):
    """A site whose helper release passes the node's check (the refused cases never boot it)."""
    helper_dir = tmp_path / "helper"
    current_fake_release(helper_dir)
    (tmp_path / "run").mkdir()
    site = Site(tmp_path / "site", HELPER_DIR=helper_dir, TEMP_DIR=tmp_path / "run")
    (site.images / "good.img").write_bytes(os.urandom(MIB))
    disk = tmp_path / "disk"
    disk.write_bytes(ORIGINAL)
    secret_file = tmp_path / "pw"
    secret_file.write_text(SECRET)

    def refused(*args, env=None, code=2, expect=""):
        result = site.deploy("--disk", disk, "--passwd-file", secret_file, *args, env=env, timeout=60)
        text = result.stderr.decode("utf-8", "replace")
        assert result.returncode == code, text[-2000:]
        assert text.strip().splitlines()[-1].startswith("ERROR: ")
        assert expect in last_line(result), last_line(result)
        assert sum(line.startswith("ERROR") or " ERROR: " in line for line in text.splitlines()) == 1
        assert SECRET not in text and "PRIVATE KEY" not in text
        assert disk.read_bytes() == ORIGINAL
        assert os.listdir(tmp_path / "run") == []
        return last_line(result)
    refused.site = site
    refused.disk = disk
    return refused


IMAGE = ["--img-id", "good.img", "--img-format", "diskdump"]


def test_deeply_nested_json(case):
    case(*IMAGE, "--img-properties", "[" * 30000 + "]" * 30000, expect="img_properties is not valid JSON")
    case(*IMAGE, "--img-properties", '{"a":' * 20000 + "1" + "}" * 20000, expect="img_properties")


@pytest.mark.parametrize("img_id, expect", [
    ("http://[::1/image", "malformed URL"),
    ("http://[::zz:1]:80/image", "malformed URL"),
    ("http://127.0.0.1:99999/image", "malformed URL"),
    ("http://127.0.0.1:-1/image", "malformed URL"),
    ("http:///image", "without a host"),
])
def test_bad_image_urls(case, img_id, expect):
    case("--img-id", img_id, "--img-format", "diskdump", expect=expect)


def test_bad_config_and_answer_urls(case):
    case(*IMAGE, "--config-url", "http://127.0.0.1:70000/c", expect="config_url: malformed URL")
    case(*IMAGE, "--os-answer-file", "http://[fe80::1/x", expect="os_answer_file: malformed URL")


def test_invalid_utf8_parameter(case):
    case(*IMAGE, env={"OSP_IMG_PROPERTIES": '{"a": "\udcff"}'}, expect="img_properties: not valid UTF-8")
    case("--img-format", "diskdump", env={"OSP_IMG_ID": "good\udcfe.img"}, expect="img_id: not valid UTF-8")


def test_control_characters_cannot_forge_log_lines(case):
    line = case("--img-id", "good.img\nERROR: forged", "--img-format", "diskdump",
                expect="img_id: contains control characters")
    assert "forged" not in line
    line = case(*IMAGE, "--hostname", "vm1\nERROR: forged\r", expect="invalid instance name")


def test_log_escapes_control_characters(capsys):
    host.log("a\nERROR: forged\x1b[2J\x85")
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "\\nERROR: forged\\x1b[2J\\x85" in err


@pytest.mark.parametrize("setting", ["HELPER_SOFT_TIMEOUT", "HELPER_HARD_TIMEOUT", "URL_TIMEOUT"])
def test_zero_timeouts_are_refused(case, setting):
    case.site.write_config(**{setting: "0"})
    case(*IMAGE, expect=f"{setting}='0': a timeout must be longer than 0")


def test_fifo_as_configuration_file(case, tmp_path):
    assert host.read_config_file("/dev/null") == {}       # "no settings", as the helper builder's tests use
    fifo = tmp_path / "fifo.conf"
    os.mkfifo(fifo)
    case(*IMAGE, env={"SNF_IMAGE_CONFIG": str(fifo)}, expect="is not a regular file")
    variant_fifo = case.site.variants / "odd.conf"
    os.mkfifo(variant_fifo)
    case(*IMAGE, "--variant", "odd", expect="is not a regular file")


def test_empty_images(case, http_server):
    (case.site.images / "empty.img").write_bytes(b"")
    case("--img-id", "empty.img", "--img-format", "diskdump", expect="is empty")
    url = http_server.serve("/empty.img", b"")
    case("--img-id", url, "--img-format", "diskdump", expect="is empty")


def test_empty_after_decompression(case):
    import gzip
    (case.site.images / "nothing.img.gz").write_bytes(gzip.compress(b""))
    result = case.site.deploy("--disk", case.disk, "--img-id", "nothing.img.gz", "--img-format", "diskdump",
                              "--no-helper")
    assert result.returncode == 2 and "the image is empty" in last_line(result)


def test_raw_image_starting_with_gzip_magic_is_copied(case):
    raw = b"\x1f\x8b\x00\xff" + os.urandom(MIB - 4)
    (case.site.images / "raw.img").write_bytes(raw)
    result = case.site.deploy("--disk", case.disk, "--img-id", "raw.img", "--img-format", "diskdump",
                              "--no-helper")
    assert result.returncode == 0, result.stderr.decode()[-1000:]
    assert case.disk.read_bytes()[:MIB] == raw


def test_answer_file_problems_are_found_before_writing(case, http_server, tmp_path):
    images = case.site.images
    (images / "real.xml").write_text("<unattend/>")
    (images / "link.xml").symlink_to(images / "real.xml")
    (tmp_path / "outside.xml").write_text("<unattend/>")
    os.mkfifo(images / "fifo.xml")
    case(*IMAGE, "--os-answer-file", f"file://{images}/link.xml", expect="may not be a symbolic link")
    case(*IMAGE, "--os-answer-file", f"file://{tmp_path}/outside.xml", expect="inside IMAGE_DIR")
    case(*IMAGE, "--os-answer-file", f"file://{images}/missing.xml", expect="No such file")
    case(*IMAGE, "--os-answer-file", f"file://{images}/fifo.xml", expect="not a regular file")
    case(*IMAGE, "--os-answer-file", http_server.url("/absent.xml"), expect="HTTP 404")


def test_floppy_budget_names_the_parameter(case, tmp_path):
    entry = {"path": "/etc/big", "contents": base64.b64encode(os.urandom(1100 * 1024)).decode()}
    personality = tmp_path / "personality.json"
    personality.write_text(json.dumps([entry]))
    line = case(*IMAGE, "--img-personality-file", personality, expect="do not fit on the rules floppy")
    assert "img_personality is" in line


def test_local_checksum_mismatch_refused_before_writing(case):
    (case.site.images / "good.img.sha256").write_text("0" * 64 + "  good.img\n")
    case(*IMAGE, code=1, expect="checksum mismatch")
    assert "nothing was written" in case(*IMAGE, code=1)


def test_config_url_document_attacks(case, http_server):
    deep = http_server.serve("/deep", b"[" * 200000 + b"]" * 200000)
    case(*IMAGE, "--config-url", deep, code=1, expect="config_url document is not valid JSON")
    bad = http_server.serve("/bad", json.dumps({"img_id": "http://[::1/x", "img_format": "diskdump"}).encode())
    case("--config-url", bad, expect="img_id: malformed URL")


def test_config_url_never_answers(case):
    """A server that accepts and says nothing: URL_TIMEOUT ends it."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(5)
    accepted = []
    threading.Thread(target=lambda: accepted.append(listener.accept()), daemon=True).start()
    case.site.write_config(URL_TIMEOUT="2")
    try:
        case(*IMAGE, "--config-url", f"http://127.0.0.1:{listener.getsockname()[1]}/c", code=1,
             expect="URL_TIMEOUT")
    finally:
        listener.close()


# --- fuzzing: no exception but the expected error type ------------------------------------

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
json_text = st.recursive(st.none() | st.booleans() | st.integers() | st.text(),
                         lambda children: st.lists(children, max_size=3)
                         | st.dictionaries(st.text(max_size=5), children, max_size=3),
                         max_leaves=20).map(json.dumps)
nasty_text = st.text() | json_text | st.sampled_from(["[" * 5000, '{"a":' * 5000, "\udcff", "\x00", "http://[::1"])


@FUZZ
@given(st.text())
def test_fuzz_configuration_text(text):
    try:
        raw = host.parse_config_text(text, "fuzz.conf")
    except ValueError:
        return
    try:
        host.finalize_config(raw)
    except host.SnfError:
        pass


@FUZZ
@given(st.dictionaries(st.sampled_from(host.OS_PARAMETERS), nasty_text))
def test_fuzz_os_parameters(params):
    problems = host.validate_parameters(params)
    assert all(isinstance(problem, str) and "\n" not in problem for problem in problems)


@FUZZ
@given(st.binary() | nasty_text.map(lambda t: t.encode("utf-8", "surrogatepass")))
def test_fuzz_config_url_document(body):
    try:
        host.decode_config_document(body)
    except host.SnfError:
        pass


@FUZZ
@given(st.text())
def test_fuzz_urls(text):
    host.url_problem(text)
    host.redact_url(text)
    # only loopback is ever contacted: the fuzzed text goes into the user, the port and the path
    quoted = urllib.parse.quote(text, safe="")      # no '@' or '/' that would move the host elsewhere
    for url in (f"http://{quoted}@127.0.0.1:1/", f"http://127.0.0.1:{quoted}/", f"http://127.0.0.1:1/{text}"):
        try:
            host.UrlFetch(url, "fuzz", timeout=0.5, resume=0).close()
        except host.SnfError:
            pass


class Sink:
    def __init__(self):
        self.messages = []

    def send(self, kind, **fields):
        self.messages.append((kind, fields))


@FUZZ
@given(st.lists(st.binary(max_size=2000), max_size=20))
def test_fuzz_progress_lines(chunks):
    protocol = host.HelperProtocol(Sink())
    for chunk in chunks:
        protocol.feed(chunk)
    protocol.finish()


@FUZZ
@given(nasty_text | st.builds(lambda env, disks: json.dumps({"format": 1, "env": env, "disks": disks}),
                              st.dictionaries(st.text(), st.text() | st.integers()),
                              st.lists(st.text() | st.integers())))
def test_fuzz_rules_and_properties(text):
    for parse in (helper.parse_rules, lambda t: helper.decode_properties(t, "image properties", warn=id)):
        try:
            parse(text)
        except helper.HelperError:
            pass


# --- children: no secret in their environment, a monitor that stops reading ----------------

def test_back_ends_and_monitor_get_no_secret(case, tmp_path):
    site = case.site
    payload = tmp_path / "payload"
    payload.write_bytes(os.urandom(MIB))
    backend = site.backends / "src" / "store"
    backend.write_text(f"""#!/bin/sh
env >> {tmp_path}/backend.env
case "$1" in
  -p) case "$2" in store:*) echo yes;; *) echo no;; esac; exit 0;;
  -s) echo {MIB}; exit 0;;
esac
cat {payload}
""")
    backend.chmod(0o755)
    monitor = tmp_path / "monitor"
    monitor.write_text(f"#!/bin/sh\nenv > {tmp_path}/monitor.env\ncat > {tmp_path}/monitor.out\n")
    monitor.chmod(0o755)
    site.write_config(PROGRESS_MONITOR=monitor)
    result = site.deploy("--disk", case.disk, "--img-id", "store:x", "--img-format", "diskdump", "--no-helper",
                         "--img-properties", '{"A": "1"}',
                         env={"OSP_IMG_PASSWD": SECRET, "OSP_AUTH_KEYS": SECRET,
                              "OSP_CLOUD_USERDATA": base64.b64encode(SECRET.encode()).decode()})
    assert result.returncode == 0, result.stderr.decode()[-1000:]
    for name in ("backend.env", "monitor.env", "monitor.out"):
        text = (tmp_path / name).read_text()
        assert SECRET not in text and base64.b64encode(SECRET.encode()).decode() not in text, name
        assert "OSP_" not in text, name


def test_a_monitor_that_stops_reading_does_not_stall(capfd):
    started = __import__("time").monotonic()
    with host.Monitor(["sh", "-c", "sleep 30", "monitor"], "vm") as monitor:
        for number in range(20000):
            monitor.send("image-info", messages=[f"message {number} " + "x" * 200])
    assert __import__("time").monotonic() - started < 15
    err = capfd.readouterr().err
    assert err.count("progress messages are dropped") == 1


# --- corrupt and truncated images of every compression format ------------------------------

def _compressed(kind, data):
    import bz2
    import gzip
    import lzma
    import shutil
    import subprocess
    if kind == "gzip":
        return gzip.compress(data)
    if kind == "xz":
        return lzma.compress(data)
    if kind == "bzip2":
        return bz2.compress(data)
    if shutil.which("zstd") is None:
        pytest.skip("zstd not installed")
    return subprocess.run(["zstd", "-q", "-c"], input=data, capture_output=True, check=True).stdout


@pytest.mark.parametrize("kind", ["gzip", "xz", "bzip2", "zstd"])
@pytest.mark.parametrize("damage", ["corrupt", "truncated"])
def test_damaged_compressed_images(case, kind, damage):
    data = os.urandom(256 * 1024) * 8
    packed = bytearray(_compressed(kind, data))
    if damage == "truncated":
        packed = packed[:len(packed) * 2 // 3]
    else:
        for offset in range(len(packed) // 3, len(packed) // 3 + 64):
            packed[offset] ^= 0x5A
    name = f"damaged-{kind}.img"
    (case.site.images / name).write_bytes(bytes(packed))
    result = case.site.deploy("--disk", case.disk, "--img-id", name, "--img-format", "diskdump",
                              "--no-helper", timeout=120)
    text = result.stderr.decode("utf-8", "replace")
    assert result.returncode == 1, text[-1500:]
    assert last_line(result).startswith("ERROR: ") and "Traceback" not in text
    assert kind in last_line(result) or "compress" in last_line(result), last_line(result)
    assert [line for line in text.splitlines() if line.startswith("ERROR")] == [last_line(result)]


# --- one operation per disk: create, import and export lock the disk ----------------------

def test_busy_disk_is_refused_by_every_verb(case, tmp_path):
    import fcntl
    import subprocess
    import ganeti_env
    os_dir = ganeti_env.install_os_dir(tmp_path / "os")
    with open(case.disk, "rb") as held:
        fcntl.flock(held, fcntl.LOCK_EX)            # as a running deployment holds it
        case(*IMAGE, code=1, expect="is in use by another snf-image deployment, import or export")
        for verb, env in (("export", ganeti_env.export_env([case.disk], 0)),
                          ("import", ganeti_env.import_env([case.disk], 0))):
            env["SNF_IMAGE_CONFIG"] = str(case.site.config)
            result = subprocess.run([str(os_dir / verb)], env=env, cwd=os_dir, input=b"x" * 4096,
                                    capture_output=True, timeout=60)
            assert result.returncode == 1
            assert last_line(result) == (f"ERROR: disk 0 ({case.disk}) is in use by another snf-image "
                                         f"deployment, import or export: {verb} refused")
            assert result.stdout == b"" and case.disk.read_bytes() == ORIGINAL
