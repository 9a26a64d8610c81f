"""snf-image-host.py: configuration parsing, parameter precedence and
validation (verify), run both in-process and through the real os-def/verify
wrapper with the environment Ganeti 3 passes."""

import json
import re
import subprocess
import sys

import pytest
from hypothesis import given, strategies as st

from conftest import REPO, load_script
import ganeti_env
from helpervm import current_fake_release

host = load_script("snf-image-host.py")


# --- configuration file syntax ----------------------------------------------

def test_config_syntax_forms():
    text = """
# comment
IMAGE_DIR="/srv/images"   # trailing comment
export HELPER_USER='snf'
HELPER_MEMORY=300
PROGRESS_MONITOR="/usr/bin/mon --flag \\"x\\""
MULTI="a
b"

IMG_PASSWD_HASH='$6$salt$hash'
"""
    values = host.parse_config_text(text, "test.conf")
    assert values == {"IMAGE_DIR": "/srv/images", "HELPER_USER": "snf", "HELPER_MEMORY": "300",
                      "PROGRESS_MONITOR": '/usr/bin/mon --flag "x"', "MULTI": "a\nb",
                      "IMG_PASSWD_HASH": "$6$salt$hash"}


@pytest.mark.parametrize("line, fragment", [
    ('IMAGE_DIR="/srv/$HOME"', "expansion is not supported"),
    ('IMAGE_DIR=$(rm -rf /)', "shell characters"),
    ("IMAGE_DIR='unterminated", "missing closing"),
    ("this is not an assignment", "line 1"),
    ('IMAGE_DIR="a" trailing', "after the closing quote"),
    ("IMAGE_DIR=`id`", "shell characters"),
])
def test_config_syntax_errors_are_one_line_naming_the_line(line, fragment):
    with pytest.raises(ValueError) as error:
        host.parse_config_text(line, "x.conf")
    message = str(error.value)
    assert fragment in message and "\n" not in message and "x.conf line 1" in message


def test_config_is_never_executed(tmp_path):
    marker = tmp_path / "executed"
    conf = tmp_path / "conf"
    conf.write_text(f"IMAGE_DIR='$(touch {marker})'\nHELPER_USER=`touch {marker}`\n")
    with pytest.raises(host.SnfError):
        host.load_config({"SNF_IMAGE_CONFIG": str(conf)})
    assert not marker.exists()


values_text = st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\0\r"),
                      max_size=40)


@given(st.dictionaries(st.from_regex(r"[A-Z_][A-Z0-9_]{0,12}", fullmatch=True), values_text, max_size=6))
def test_config_single_quote_round_trip(assignments):
    lines = []
    for key, value in assignments.items():
        if "'" in value:
            escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("$", "\\$").replace("`", "\\`")
            lines.append(f'{key}="{escaped}"')
        else:
            lines.append(f"{key}='{value}'")
    assert host.parse_config_text("\n".join(lines), "h.conf") == assignments


@given(st.text(max_size=60))
def test_config_parser_never_crashes(text):
    try:
        host.parse_config_text(text, "fuzz.conf")
    except ValueError as error:
        assert "fuzz.conf" in str(error)


# --- settings ---------------------------------------------------------------

@pytest.mark.parametrize("text, seconds", [("120", 120), ("90s", 90), ("2m", 120), ("1h", 3600),
                                           ("1d", 86400), ("2.5m", 150), (" 7 ", 7)])
def test_duration_syntax(text, seconds):
    assert host.parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "m", "-1", "2x", "1 h 2", "abc", "1e3"])
def test_duration_rejects(text):
    with pytest.raises(ValueError):
        host.parse_duration(text)


@given(st.integers(min_value=0, max_value=10**6), st.sampled_from(["", "s", "m", "h", "d"]))
def test_duration_property(number, suffix):
    factor = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[suffix]
    assert host.parse_duration(f"{number}{suffix}") == number * factor


@given(st.integers(min_value=0, max_value=2**20), st.sampled_from(["", "K", "M", "G", "k", "m"]))
def test_byte_size_property(number, suffix):
    factor = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3}[suffix.upper()]
    assert host.parse_byte_size(f"{number}{suffix}") == number * factor


def test_defaults_are_upstreams_plus_design():
    config = host.finalize_config({})
    assert config.HELPER_SOFT_TIMEOUT == 120 and config.HELPER_HARD_TIMEOUT == 5
    assert config.HELPER_USER == "nobody" and config.HELPER_MEMORY == 256
    assert config.IMAGE_DIR == "/var/lib/snf-image" and config.HELPER_DIR == "/var/lib/snf-image/helper"
    assert config.DEFAULT_NIC_CONFIG == "dhcp" and config.HELPER_ACCEL == "auto"
    assert config.COPY_BUFFER_SIZE == 4 * 1024 * 1024
    assert config.WINDOWS_TIMEZONE == ("GMT Standard Time", "085")
    assert config.DHCP_TAGS == "auto dhcp nfdhcpd"
    assert config.QEMU == ["qemu-system-x86_64"]


def test_empty_value_means_default_like_upstream():
    assert host.finalize_config({"HELPER_MEMORY": ""}).HELPER_MEMORY == 256


@pytest.mark.parametrize("key, value", [
    ("HELPER_MEMORY", "lots"), ("HELPER_ACCEL", "xen"), ("DEFAULT_NIC_CONFIG", "static"),
    ("DEFAULT_NIC_CONFIG", "dhcpv6+dhcp"), ("HELPER_SOFT_TIMEOUT", "2 minutes"),
    ("COPY_BUFFER_SIZE", "1000"), ("HELPER_DEBUG", "maybe"), ("WINDOWS_TIMEZONE", "Mars Time"),
    ("HELPER_USER", "bad user"), ("QEMU", ""),
])
def test_invalid_setting_is_one_line_naming_the_key(key, value):
    if value == "":
        return  # empty means default, checked above
    with pytest.raises(host.SnfError) as error:
        host.finalize_config({key: value})
    assert key in str(error.value) and error.value.exit_code == 2


def test_timezone_case_insensitive():
    assert host.finalize_config({"WINDOWS_TIMEZONE": "w. europe standard time"}).WINDOWS_TIMEZONE \
        == ("W. Europe Standard Time", "110")
    assert len(host.WINDOWS_TIMEZONES) == 75


def test_defaults_example_parses_commented_and_uncommented(tmp_path):
    example = (REPO / "defaults.example").read_text()
    assert host.load_config({"SNF_IMAGE_CONFIG": str(REPO / "defaults.example")}).HELPER_MEMORY == 256
    uncommented = "\n".join(line[1:] if line[:1] == "#" and "=" in line and line[1:2].isupper()
                            else line for line in example.splitlines())
    path = tmp_path / "conf"
    path.write_text(uncommented)
    config = host.load_config({"SNF_IMAGE_CONFIG": str(path)})
    for setting in host.SETTINGS:
        assert setting.name in config.raw, f"{setting.name} missing from defaults.example"


def test_missing_explicit_config_is_an_error(tmp_path):
    with pytest.raises(host.SnfError):
        host.load_config({"SNF_IMAGE_CONFIG": str(tmp_path / "nope")})


# --- variants and precedence ------------------------------------------------

@pytest.fixture
def conf_dirs(tmp_path):
    variants = tmp_path / "variants"
    variants.mkdir()
    conf = tmp_path / "snf-image"
    conf.write_text(f'VARIANTS_DIR="{variants}"\nHELPER_MEMORY=300\nIMG_FORMAT=extdump\n'
                    'IMG_ID=from-config\n')
    return {"SNF_IMAGE_CONFIG": str(conf)}, variants


def test_precedence_default_config_variant_osp_configurl(conf_dirs):
    environ, variants = conf_dirs
    (variants / "default.conf").write_text("HELPER_MEMORY=400\nIMG_FORMAT=ntfsdump\n")
    config = host.load_config(environ, "default")
    assert config.HELPER_MEMORY == 400
    assert config.HELPER_SOFT_TIMEOUT == 120
    params = host.collect_parameters({**environ, "OSP_IMG_ID": "osp"}, config, fetch_config_url=False)
    assert params["img_format"] == "ntfsdump" and params["img_id"] == "osp"
    document = host.decode_config_document(json.dumps({"IMG_ID": "from-url", "unknown": "x"}))
    params.update(document)
    assert params["img_id"] == "from-url"


def test_variant_errors(conf_dirs):
    environ, variants = conf_dirs
    with pytest.raises(host.SnfError, match="published variant 'default'"):
        host.load_config(environ, "default")
    with pytest.raises(host.SnfError, match="unofficial variant"):
        host.load_config(environ, "other")
    with pytest.raises(host.SnfError, match="invalid OS variant"):
        host.load_config(environ, "../etc")


def test_set_versus_empty():
    config = host.finalize_config({})
    params = host.collect_parameters({"OSP_IMG_PASSWD": "", "OSP_IMG_ID": "x"}, config)
    assert params == {"img_passwd": "", "img_id": "x"}
    env = host.helper_environment({"NIC_COUNT": "0"}, params | {"img_properties": ""}, config,
                                  "diskdump", "vm1", False)
    assert env["SNF_IMAGE_PASSWD"] == ""
    assert "SNF_IMAGE_PASSWD_HASH" not in env and "SNF_IMAGE_PROPERTIES" not in env


@pytest.mark.parametrize("body, fragment", [
    (b"not json", "not valid JSON"), (b"[1, 2]", "JSON object"),
    (b'{"img_properties": {"OSFAMILY": "linux"}}', "must be a string"),
])
def test_config_url_document_errors(body, fragment):
    with pytest.raises(host.SnfError, match=fragment):
        host.decode_config_document(body)


# --- parameter validation -----------------------------------------------------

GOOD = {"img_id": "debian.img", "img_format": "diskdump"}


def problems(**params):
    return host.validate_parameters({**GOOD, **params})


def test_good_parameters():
    personality = json.dumps([{"path": "/etc/motd", "contents": "aGVsbG8=", "owner": "root",
                               "group": "root", "mode": 0o644}])
    assert problems(img_passwd="", img_properties='{"OSFAMILY": "linux", "SWAP": 2, "X": true}',
                    inst_properties="", img_personality=personality, cloud_userdata="I2Nsb3VkLWNvbmZpZw==",
                    os_product_key="abcde-12345-ABCDE-12345-abcde", os_answer_file="file:///x",
                    auth_keys="ssh-ed25519 AAAA user") == []


@pytest.mark.parametrize("params, fragment", [
    ({"img_format": "qcow2"}, "img_format"),
    ({"img_id": ""}, "Missing OS parameter: img_id"),
    ({"img_passwd": "", "img_passwd_hash": ""}, "Conflicting"),
    ({"img_properties": "{"}, "not valid JSON"),
    ({"img_properties": "[]"}, "JSON object"),
    ({"img_properties": '{"a-b": "x"}'}, "property name"),
    ({"inst_properties": '{"A": {"nested": 1}}'}, "must be a string"),
    ({"img_personality": '{"path": "/x"}'}, "JSON list"),
    ({"img_personality": '[{"path": "x", "contents": ""}]'}, "absolute"),
    ({"img_personality": '[{"path": "/x", "contents": "!!"}]'}, "base64"),
    ({"img_personality": '[{"path": "/x", "contents": "", "mode": "0644"}]'}, "mode"),
    ({"img_personality": '[{"path": "/x", "contents": "", "colour": 1}]'}, "unknown key"),
    ({"cloud_userdata": "not base64!"}, "cloud_userdata"),
    ({"os_product_key": ""}, "os_product_key"),
    ({"os_product_key": "ABCDE-12345"}, "os_product_key"),
    ({"os_answer_file": "gopher://x"}, "os_answer_file"),
    ({"config_url": "ftp://x"}, "config_url"),
    ({"img_id": "local://../etc/passwd"}, "outside IMAGE_DIR"),
    ({"img_id": "sub/../../x"}, "outside IMAGE_DIR"),
    ({"img_id": "null", "img_format": "extdump"}, "null"),
    ({"img_passwd_hash": "a:b"}, "img_passwd_hash"),
])
def test_bad_parameters(params, fragment):
    found = problems(**params)
    assert found and any(fragment in p for p in found), found
    assert all("\n" not in p for p in found)


def test_problems_never_quote_secrets():
    secret = "Sup3r-S3cret-Passw0rd"
    found = host.validate_parameters({"img_passwd": secret, "img_passwd_hash": secret + ":x",
                                      "os_product_key": secret, "cloud_userdata": secret + "!"})
    assert found and not any(secret in p for p in found)


def test_config_url_alone_is_enough_for_verify():
    assert host.validate_parameters({"config_url": "http://example.org/c.json"}) == []


# --- through the real os-def/verify wrapper -------------------------------------

def run_verify(osparams, tmp_path, extra_env=None, extra_conf=""):
    variants = tmp_path / "variants"
    variants.mkdir(exist_ok=True)
    (variants / "default.conf").write_text("")
    helper_dir = tmp_path / "helper"
    if not helper_dir.exists():     # verify also checks the node's helper
        current_fake_release(helper_dir)
    conf = tmp_path / "snf-image.conf"
    conf.write_text(f'VARIANTS_DIR="{variants}"\nHELPER_DIR="{helper_dir}"\n' + extra_conf)
    env = ganeti_env.verify_env(osparams)
    env["SNF_IMAGE_CONFIG"] = str(conf)
    env.update(extra_env or {})
    os_dir = ganeti_env.install_os_dir(tmp_path / "os")
    return subprocess.run([str(os_dir / "verify"), "parameters"], env=env,
                          capture_output=True, text=True, cwd=os_dir, timeout=60)


def test_verify_script_accepts_good_parameters(tmp_path):
    result = run_verify({"img_id": "debian.img", "img_format": "diskdump", "img_passwd": "x"}, tmp_path)
    assert result.returncode == 0, result.stderr


def test_verify_script_rejects_bad_parameters_one_line_each(tmp_path):
    result = run_verify({"img_id": "debian.img", "img_format": "qcow2", "img_passwd": "pw1234secret",
                         "img_passwd_hash": "$6$x", "img_properties": "{"}, tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 3
    assert lines[-1].startswith("ERROR: ")
    assert "pw1234secret" not in result.stderr + result.stdout


def test_verify_script_rejects_bad_configuration(tmp_path):
    result = run_verify(GOOD, tmp_path)
    assert result.returncode == 0
    result = run_verify(GOOD, tmp_path, extra_conf="DEFAULT_NIC_CONFIG=static\n")
    assert result.returncode == 2 and "DEFAULT_NIC_CONFIG" in result.stderr.strip().splitlines()[-1]


def test_verify_usage(tmp_path):
    result = subprocess.run([sys.executable, str(REPO / "snf-image-host.py"), "verify"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2


def test_unknown_verb_and_api_version(tmp_path):
    result = subprocess.run([sys.executable, str(REPO / "snf-image-host.py"), "frobnicate"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    env = ganeti_env.create_env([tmp_path / "d"], osparams=GOOD)
    env["OS_API_VERSION"] = "15"
    os_dir = ganeti_env.install_os_dir(tmp_path / "os")
    result = subprocess.run([str(os_dir / "create")], env=env, capture_output=True,
                            text=True, cwd=os_dir, timeout=60)
    assert result.returncode == 2 and "OS API version" in result.stderr.strip().splitlines()[-1]


def test_unknown_config_key_warns_with_the_closest_known_key(capfd):
    raw = host.parse_config_text("HELPER_SOFT_TIMOUT=10\nBOGUS_SETTING=1\nIMG_ID=debian\n"
                                 "MULTISTRAP_CONFIG=/etc/ms.conf\nHELPER_HARD_TIMEOUT=60\n", "test")
    config = host.finalize_config(raw)
    err = capfd.readouterr().err
    assert "unknown key HELPER_SOFT_TIMOUT (did you mean HELPER_SOFT_TIMEOUT?)" in err
    assert "unknown key BOGUS_SETTING (ignored)" in err
    # OS parameters preset by a variant, the builder's keys and settings are known
    assert "IMG_ID" not in err and "MULTISTRAP_CONFIG" not in err and "HARD" not in err
    assert config.HELPER_SOFT_TIMEOUT == host.finalize_config({}).HELPER_SOFT_TIMEOUT


def test_example_configuration_has_only_known_keys():
    keys = set(re.findall(r"^#? ?([A-Z][A-Z0-9_]*)=", (REPO / "defaults.example").read_text(), re.M))
    assert keys and keys <= host.KNOWN_CONFIG_KEYS


def test_every_setting_says_who_reads_it():
    assert {s.readers for s in host.SETTINGS} <= {host.HOST, host.BUILDER, host.BOTH}
    assert len(host.SETTINGS_BY_NAME) == len(host.SETTINGS)
    for setting in host.SETTINGS:
        assert setting.read_by(host.HOST) or setting.read_by(host.BUILDER)
        setting.convert(setting.default)          # every default passes its own check


def _keys_used_by(source):
    return set(re.findall(r"config\.([A-Z][A-Z0-9_]+)", source)) | \
        set(re.findall(r'programs\["([A-Z][A-Z0-9_]+)"\]', source))


def test_the_readers_column_matches_the_code():
    """A key the host or the builder reads is marked as read by it; a key
    marked as the builder's alone is really used by the builder."""
    builder = load_script("snf-image-update-helper.py")
    builder_keys = _keys_used_by((REPO / "snf-image-update-helper.py").read_text()) \
        | {key for _option, key, _help in builder.CONFIG_OPTIONS}
    host_keys = _keys_used_by((REPO / "snf-image-host.py").read_text())
    assert builder_keys and host_keys
    assert builder_keys <= {s.name for s in host.SETTINGS if s.read_by(host.BUILDER)}
    assert host_keys <= {s.name for s in host.SETTINGS if s.read_by(host.HOST)}
    assert {s.name for s in host.SETTINGS if s.readers == host.BUILDER} <= builder_keys
    assert not hasattr(builder, "parse_config_text") and not hasattr(builder, "SETTINGS_TABLE")
