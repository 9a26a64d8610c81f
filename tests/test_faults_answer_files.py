"""Hostile answer files and values against the Windows answer-file editors.

The Windows tasks edit an unattend.xml that comes from the image or from the
os_answer_file parameter, and a sysprep.inf on XP/2003: both are input we do
not control. Whatever bytes they hold, and whatever password or computer
name is asked for, the editors either produce a file that Windows' own
parser would read back with exactly the values asked for, or stop with the
tasks' one error type (TaskError). Anything else (a traceback, an answer
file that no longer parses, a value that comes back changed) is a defect.
"""

import string
import sys
import xml.etree.ElementTree as ET

from hypothesis import HealthCheck, given, settings, strategies as st

from conftest import REPO, load_script

load_script("snf-image-helper.py", "snf_image_helper")
sys.path.insert(0, str(REPO / "tasks.d"))
import snf_image_windows as win  # noqa: E402
from snf_image_tasklib import ImageRoot, TaskError  # noqa: E402

NS = {"u": win.UNATTEND_NS}
FUZZ = settings(max_examples=150, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
MINIMAL = (b'<?xml version="1.0" encoding="utf-8"?>\n'
           b'<unattend xmlns="urn:schemas-microsoft-com:unattend"/>\n')

# What XML 1.0 can carry at all: a password outside it cannot be written to an answer file.
xml_text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=40)


def write_answer(tmp_path, data):
    (tmp_path / "unattend.xml").write_bytes(data)


def reparsed(tmp_path):
    return ET.parse(tmp_path / "unattend.xml").getroot()


@FUZZ
@given(data=st.binary(max_size=400))
def test_any_bytes_as_answer_file(tmp_path_factory, data):
    tmp_path = tmp_path_factory.mktemp("answer")
    write_answer(tmp_path, data)
    with ImageRoot(tmp_path) as root:
        try:
            answer = win.AnswerFile(root)
        except TaskError:
            return
        answer.set_text("specialize", "Microsoft-Windows-Shell-Setup", ["ComputerName"], "VM1", "amd64")
        answer.add_command("amd64", "extend", "C:\\Windows\\SnfScripts\\ExtendFilesystem")
        answer.save()
    assert reparsed(tmp_path).tag == f"{{{win.UNATTEND_NS}}}unattend"


@FUZZ
@given(inner=st.lists(st.sampled_from([
    '<settings pass="specialize"/>', '<settings pass="oobeSystem"><component name="x"/></settings>',
    '<settings pass="specialize"><component name="Microsoft-Windows-Shell-Setup" '
    'processorArchitecture="AMD64"><ComputerName>old</ComputerName></component></settings>',
    '<settings pass="specialize"><component name="Microsoft-Windows-Deployment" '
    'processorArchitecture="amd64"><RunSynchronous><RunSynchronousCommand><Order>x7</Order>'
    '<Path>cmd</Path></RunSynchronousCommand></RunSynchronous></component></settings>',
    '<!-- a comment -->', '<foreign xmlns="urn:other">text</foreign>', 'text between']), max_size=6))
def test_structured_answer_files_keep_parsing(tmp_path_factory, inner):
    tmp_path = tmp_path_factory.mktemp("answer")
    write_answer(tmp_path, ('<unattend xmlns="urn:schemas-microsoft-com:unattend">'
                            + "".join(inner) + "</unattend>").encode())
    with ImageRoot(tmp_path) as root:
        answer = win.AnswerFile(root)
        answer.set_text("specialize", "Microsoft-Windows-Shell-Setup", ["ComputerName"], "VM1", "amd64")
        answer.add_command("amd64", "extend", "C:\\Windows\\SnfScripts\\ExtendFilesystem")
        answer.add_command("amd64", "extend", "C:\\Windows\\SnfScripts\\ExtendFilesystem")
        answer.save()
    tree = reparsed(tmp_path)
    names = [name.text for component in tree.iterfind(".//u:component", NS)
             if component.get("name") == "Microsoft-Windows-Shell-Setup"
             and component.get("processorArchitecture", "").lower() == "amd64"
             for name in component.iterfind("u:ComputerName", NS)]
    assert names and set(names) == {"VM1"}  # processorArchitecture matched in any case, repeats too
    paths = [p.text for p in tree.iterfind(".//u:RunSynchronousCommand/u:Path", NS)]
    assert paths.count("C:\\Windows\\SnfScripts\\ExtendFilesystem") == 1


def test_entity_expansion_is_refused(tmp_path):
    bomb = ('<?xml version="1.0"?><!DOCTYPE unattend [<!ENTITY a "aaaaaaaaaa">'
            + "".join(f'<!ENTITY {n} "{("&" + p + ";") * 10}">'
                      for p, n in zip("abcdefgh", "bcdefghi"))
            + ']><unattend xmlns="urn:schemas-microsoft-com:unattend">&i;</unattend>')
    write_answer(tmp_path, bomb.encode())
    with ImageRoot(tmp_path) as root:
        try:
            answer = win.AnswerFile(root)
        except TaskError:
            return
        assert len(ET.tostring(answer.tree.getroot())) < 10 * 1024 * 1024


@FUZZ
@given(password=xml_text)
def test_password_comes_back_from_the_answer_file(tmp_path_factory, password):
    tmp_path = tmp_path_factory.mktemp("answer")
    write_answer(tmp_path, MINIMAL)
    with ImageRoot(tmp_path) as root:
        answer = win.AnswerFile(root)
        component = answer.component("oobeSystem", "Microsoft-Windows-Shell-Setup", "amd64")
        if not win.XML_SAFE_VALUE.fullmatch(password):
            return                  # change_passwords refuses it with one line (below)
        win._set_password_element(
            win.AnswerFile.child(component, "UserAccounts", "AdministratorPassword"), password)
        answer.save()
    values = [v.text or "" for v in reparsed(tmp_path).iterfind(
        ".//u:AdministratorPassword/u:Value", NS)]
    assert values == [password]


@FUZZ
@given(password=xml_text)
def test_unwritable_passwords_are_refused_before_any_edit(password):
    if win.XML_SAFE_VALUE.fullmatch(password):
        return
    try:
        win.change_passwords("windows", password, None, None, "", warn=lambda _: None)
    except TaskError as error:
        assert "control characters" in str(error) and password not in str(error)
    else:
        raise AssertionError("an answer file cannot carry this password")


@FUZZ
@given(text=st.text(max_size=300), section=st.text(string.ascii_letters, min_size=1, max_size=12),
       key=st.text(string.ascii_letters, min_size=1, max_size=12),
       value=st.text(st.characters(blacklist_characters="\r\n", blacklist_categories=("Cs",)),
                     max_size=30))
def test_sysprep_inf_set_then_get(text, section, key, value):
    ini = win.IniFile(text)
    ini.set(section, key, value)
    again = win.IniFile(ini.text())
    assert again.get(section, key) == value.strip()


@FUZZ
@given(password=st.text(st.characters(blacklist_categories=("Cs",)), max_size=30))
def test_sysprep_password_quoting(password):
    try:
        quoted = win.inf_quote(password)
    except TaskError:
        assert "\n" in password or "\r" in password
        return
    assert quoted.startswith('"') and quoted.endswith('"')
    assert quoted[1:-1].replace('""', '"') == password


@FUZZ
@given(hostname=st.text(max_size=80))
def test_computer_name_is_valid_or_refused(hostname):
    try:
        name = win.computer_name(hostname)
    except TaskError as error:
        assert "\n" not in str(error)
        return
    assert 1 <= len(name) <= win.COMPUTER_NAME_MAX and not name.isdigit()
    assert all(c in string.ascii_letters + string.digits + "-_" for c in name)
