"""Code shared by the Windows branches of the configuration tasks (not a task).

Pipeline: image source → O_DIRECT copy → floppy + helper VM → **tasks** → SUCCESS.
A Windows image is customized for Windows' own first-boot setup to finish:

* the registry hives (Windows/System32/config/SYSTEM, SOFTWARE, SAM) are read
  by a small reader of the REGF format here (no program start per value) and
  changed only through `hivexsh -w`, fed a script on stdin;
* the answer file at the root of the system drive (unattend.xml, or
  sysprep.inf for XP/2003) is edited with xml.etree / a line-preserving INI
  editor; every command we add runs a script from C:\\Windows\\SnfScripts;
* C:\\Windows\\Setup\\Scripts\\SetupComplete.cmd, which Windows runs once setup
  has finished, gets the lines that remove every file that held a secret and
  restore what was changed only for the duration of setup.

Secrets never reach a command line: a password goes into the answer file
(XML-escaped) and into a UTF-16 file that a VBScript reads; both are
deleted by that script and by SetupComplete.cmd.
"""

import os
import posixpath
import re
import struct
import sys
import time
import xml.etree.ElementTree as ET

sys.path.insert(0, os.path.dirname(os.path.realpath(__file__)))
import snf_image_tasklib as lib  # noqa: E402
from snf_image_tasklib import TaskError, helper  # noqa: E402

SYSTEM_HIVE = "/Windows/System32/config/SYSTEM"
SOFTWARE_HIVE = "/Windows/System32/config/SOFTWARE"
SAM_HIVE = "/Windows/System32/config/SAM"
SCRIPTS_DIR = "/Windows/SnfScripts"
SETUP_COMPLETE = "/Windows/Setup/Scripts/SetupComplete.cmd"
EXTEND_SCRIPT = f"{SCRIPTS_DIR}/ExtendFilesystem"
GUEST_SCRIPTS_DIR = "C:\\Windows\\SnfScripts"
ANSWER_FILES = ("/unattend.xml", "/autounattend.xml")
SYSPREP_INF = "/sysprep/sysprep.inf"
DEFAULT_INSTALL_FILES = "C:\\sysprep\\i386"
DIR_MODE = (0o755, 0, 0)

UNATTEND_NS = "urn:schemas-microsoft-com:unattend"
WCM_NS = "http://schemas.microsoft.com/WMIConfig/2002/State"
XSI_NS = "http://www.w3.org/2001/XMLSchema-instance"
COMPONENT_ATTRIBUTES = {"publicKeyToken": "31bf3856ad364e35", "language": "neutral",
                        "versionScope": "nonSxS"}

GENERALIZED_STATES = ("IMAGE_STATE_GENERALIZE_RESEAL_TO_OOBE",
                      "IMAGE_STATE_GENERALIZE_RESEAL_TO_AUDIT")
COMPUTER_NAME_MAX = 15
COMPUTER_NAME_RE = re.compile(r"^[A-Za-z0-9_-]+$")
# What an XML 1.0 answer file carries back unchanged (a CR would come back as LF).
XML_SAFE_VALUE = re.compile("[\t\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]*")
# What a program we start needs of our environment (which holds the secrets).
CHILD_ENV = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"), "LC_ALL": "C"}


# --------------------------------------------------------------------------
# Registry hives: a reader of the REGF format
# --------------------------------------------------------------------------

class Hive:
    """A registry hive file, read-only.  Keys are paths below the root key
    (`ControlSet001\\Control`), matched case-insensitively as Windows does."""

    def __init__(self, data, name="hive"):
        if data is None or len(data) < 4096 + 32 or data[:4] != b"regf":
            raise TaskError(f"The {name} registry hive is missing or is not a hive file")
        self.data = data
        self.name = name
        self.root = struct.unpack_from("<I", data, 36)[0]

    @classmethod
    def load(cls, root, path):
        return cls(root.read_bytes(path), os.path.basename(path))

    def _cell(self, offset):
        start = 4096 + offset
        if offset == 0xFFFFFFFF or start + 4 > len(self.data):
            raise TaskError(f"The {self.name} registry hive is damaged (cell {offset:#x})")
        size = abs(struct.unpack_from("<i", self.data, start)[0])
        return self.data[start + 4:start + size]

    def _key_name(self, cell):
        flags, = struct.unpack_from("<H", cell, 2)
        length, = struct.unpack_from("<H", cell, 72)
        raw = cell[76:76 + length]
        return raw.decode("latin-1") if flags & 0x20 else raw.decode("utf-16-le", "replace")

    def _subkey_offsets(self, list_offset):
        cell = self._cell(list_offset)
        kind, count = cell[:2], struct.unpack_from("<H", cell, 2)[0]
        if kind in (b"lf", b"lh"):
            return [struct.unpack_from("<I", cell, 4 + 8 * i)[0] for i in range(count)]
        if kind == b"li":
            return [struct.unpack_from("<I", cell, 4 + 4 * i)[0] for i in range(count)]
        if kind == b"ri":
            offsets = []
            for i in range(count):
                offsets += self._subkey_offsets(struct.unpack_from("<I", cell, 4 + 4 * i)[0])
            return offsets
        raise TaskError(f"The {self.name} registry hive is damaged (subkey list {kind!r})")

    def _children(self, nk_offset):
        cell = self._cell(nk_offset)
        count, list_offset = struct.unpack_from("<I", cell, 20)[0], \
            struct.unpack_from("<I", cell, 28)[0]
        if not count or list_offset == 0xFFFFFFFF:
            return {}
        return {self._key_name(self._cell(offset)).lower(): offset
                for offset in self._subkey_offsets(list_offset)}

    def _find(self, path):
        offset = self.root
        for part in [p for p in path.split("\\") if p]:
            offset = self._children(offset).get(part.lower())
            if offset is None:
                return None
        return offset

    def has_key(self, path):
        return self._find(path) is not None

    def subkeys(self, path):
        """Names of the subkeys of `path` ([] when it does not exist)."""
        offset = self._find(path)
        if offset is None:
            return []
        return [self._key_name(self._cell(child)) for child in self._children(offset).values()]

    def values(self, path):
        """{name: (type, raw bytes)} of the key `path` ({} when it does not exist),
        in the order the hive lists them."""
        offset = self._find(path)
        if offset is None:
            return {}
        cell = self._cell(offset)
        count, list_offset = struct.unpack_from("<II", cell, 36)
        values = {}
        if not count or list_offset == 0xFFFFFFFF:
            return values
        offsets = self._cell(list_offset)
        for i in range(count):
            vk = self._cell(struct.unpack_from("<I", offsets, 4 * i)[0])
            if vk[:2] != b"vk":
                raise TaskError(f"The {self.name} registry hive is damaged (value cell)")
            name_length, size, data_offset, kind, flags = struct.unpack_from("<HIIIH", vk, 2)
            raw_name = vk[20:20 + name_length]
            name = raw_name.decode("latin-1") if flags & 1 else raw_name.decode("utf-16-le", "replace")
            if size & 0x80000000:
                data = struct.pack("<I", data_offset)[:size & 0x7FFFFFFF]
            else:
                data = self._data(data_offset, size)
            values[name] = (kind, data)
        return values

    def _data(self, offset, size):
        cell = self._cell(offset)
        if cell[:2] == b"db" and size > 16344:            # big data: a list of segments
            count, segments = struct.unpack_from("<HI", cell, 2)
            segment_list = self._cell(segments)
            data = b"".join(self._cell(struct.unpack_from("<I", segment_list, 4 * i)[0])[:16344]
                            for i in range(count))
            return data[:size]
        return cell[:size]

    def value(self, path, name):
        """(type, raw bytes) of one value (name matched case-insensitively) or None."""
        for key, item in self.values(path).items():
            if key.lower() == name.lower():
                return item
        return None

    def string(self, path, name):
        item = self.value(path, name)
        if item is None:
            return None
        return item[1].decode("utf-16-le", "replace").split("\0")[0]

    def dword(self, path, name):
        item = self.value(path, name)
        if item is None or len(item[1]) < 4:
            return None
        return struct.unpack_from("<I", item[1])[0]


def current_control_set(system):
    number = system.dword("Select", "Current")
    if not number:
        raise TaskError("Unable to find the current control set (Select\\Current) "
                        "in the SYSTEM registry hive")
    return f"ControlSet{number:03d}"


def architecture(root):
    """`amd64` or `x86`, from PROCESSOR_ARCHITECTURE in the SYSTEM hive."""
    system = Hive.load(root, SYSTEM_HIVE)
    arch = system.string(current_control_set(system) + "\\Control\\Session Manager\\Environment",
                         "PROCESSOR_ARCHITECTURE")
    if not arch:
        raise TaskError("Unable to determine windows architecture")
    return arch.strip().lower()


def nt_version(root):
    """(major, minor) of Windows NT from the SOFTWARE hive."""
    software = Hive.load(root, SOFTWARE_HIVE)
    key = "Microsoft\\Windows NT\\CurrentVersion"
    major = software.dword(key, "CurrentMajorVersionNumber")     # Windows 10 and later
    if major:
        return major, software.dword(key, "CurrentMinorVersionNumber") or 0
    text = software.string(key, "CurrentVersion") or ""
    match = re.match(r"\s*(\d+)\.(\d+)", text)
    if not match:
        raise TaskError("Unable to determine the Windows version (CurrentVersion "
                        "in the SOFTWARE registry hive)")
    return int(match.group(1)), int(match.group(2))


def check_generalized(root):
    """Upstream's sysprep check on ImageState; a clear error if not deployable."""
    state = Hive.load(root, SOFTWARE_HIVE).string(
        "Microsoft\\Windows\\CurrentVersion\\Setup\\State", "ImageState")
    if state in GENERALIZED_STATES:
        return
    if state == "IMAGE_STATE_COMPLETE":
        raise TaskError("Image is not sysprepped: ImageState is IMAGE_STATE_COMPLETE. "
                        "Run sysprep /generalize /oobe /shutdown before taking the image")
    if state == "IMAGE_STATE_UNDEPLOYABLE":
        raise TaskError("Image is undeployable (ImageState is IMAGE_STATE_UNDEPLOYABLE): "
                        "sysprep did not finish; run sysprep /generalize again")
    if state in ("IMAGE_STATE_SPECIALIZE_RESEAL_TO_OOBE", "IMAGE_STATE_SPECIALIZE_RESEAL_TO_AUDIT"):
        raise TaskError(f"Image is not generalized (ImageState is {state}): "
                        "you must run sysprep /generalize before taking the image")
    raise TaskError("Can't check if image is sysprepped. Unknown System State: "
                    f"`{state or 'missing'}'")


def set_registry_values(root, hive_path, key, changes):
    """Set values of `key` in a hive through hivexsh: `changes` = {name: (type,
    raw bytes)}.  hivexsh replaces all values of a key at once, so every other
    value is written back byte for byte."""
    hive = Hive.load(root, hive_path)
    if not hive.has_key(key):
        raise TaskError(f"Key {key} is missing from the {os.path.basename(hive_path)} hive")
    values = dict(hive.values(key))
    lowered = {name.lower(): name for name in values}
    for name, item in changes.items():
        values[lowered.get(name.lower(), name)] = item        # in place when it exists
    script = [f"cd {key}", f"setval {len(values)}"]
    for name, (kind, data) in values.items():
        if "\n" in name:
            raise TaskError(f"Cannot rewrite a registry value whose name holds a newline in {key}")
        script += [name or "@", f"hex:{kind}:{','.join(f'{b:02x}' for b in data)}"]
    script.append("commit")
    real = root.real_path(os.path.dirname(hive_path))
    lib.run([lib.program("hivexsh"), "-w", os.path.join(real, os.path.basename(hive_path))],
            input="\n".join(script) + "\n", env=CHILD_ENV)


# --------------------------------------------------------------------------
# Computer name
# --------------------------------------------------------------------------

def computer_name(hostname):
    """The NetBIOS computer name for an instance name: its first DNS label,
    1-15 characters of letters, digits, `-` and `_`, not all digits."""
    if not hostname.isprintable():
        raise TaskError(f"Cannot make a Windows computer name of {hostname!r}: it holds "
                        "control characters")
    name = hostname.split(".")[0]
    if not name:
        raise TaskError(f"Cannot make a Windows computer name of `{hostname}'")
    if not COMPUTER_NAME_RE.match(name):
        raise TaskError(f"Cannot make a Windows computer name of `{hostname}': `{name}' may "
                        "hold only letters, digits, `-' and `_'")
    if len(name) > COMPUTER_NAME_MAX:
        raise TaskError(f"Cannot make a Windows computer name of `{hostname}': `{name}' has "
                        f"{len(name)} characters and Windows allows at most {COMPUTER_NAME_MAX}")
    if name.isdigit():
        raise TaskError(f"Cannot make a Windows computer name of `{hostname}': a computer "
                        "name cannot be all digits")
    return name


# --------------------------------------------------------------------------
# The answer file (unattend.xml)
# --------------------------------------------------------------------------

def _q(tag, namespace=UNATTEND_NS):
    return f"{{{namespace}}}{tag}"


ET.register_namespace("", UNATTEND_NS)
ET.register_namespace("wcm", WCM_NS)
ET.register_namespace("xsi", XSI_NS)


def answer_file_path(root):
    """The answer file at the root of the system drive, or None."""
    return next((path for path in ANSWER_FILES if root.is_file(path)), None)


class AnswerFile:
    """An unattend.xml, edited in place and written back as UTF-8."""

    def __init__(self, root, path=None):
        self.root = root
        self.path = path or answer_file_path(root)
        if self.path is None:
            raise TaskError("No Unattend.xml found in the instance.")
        data = root.read_bytes(self.path)
        try:
            parser = ET.XMLParser(target=ET.TreeBuilder(insert_comments=True))
            self.tree = ET.ElementTree(ET.fromstring(data, parser=parser))
        except ET.ParseError as error:
            raise TaskError(f"The answer file {self.path} is not valid XML: {error}") from None
        if self.tree.getroot().tag != _q("unattend"):
            raise TaskError(f"The answer file {self.path} is not an unattend file")

    def save(self):
        ET.indent(self.tree, "  ")
        data = ET.tostring(self.tree.getroot(), encoding="utf-8", xml_declaration=True)
        self.root.write(self.path, data + b"\n")

    def _matching(self, settings_pass, name, arch):
        """The components of that name and architecture (any case) in every copy of
        the pass: an answer file may repeat both."""
        return [c for s in self.tree.getroot().findall(_q("settings")) if s.get("pass") == settings_pass
                for c in s.findall(_q("component")) if c.get("name") == name
                and (c.get("processorArchitecture") or "").lower() == arch]

    def component(self, settings_pass, name, arch, create=True):
        found = self._matching(settings_pass, name, arch)
        if found or not create:
            return found[0] if found else None
        unattend = self.tree.getroot()
        settings = next((s for s in unattend.findall(_q("settings")) if s.get("pass") == settings_pass),
                        None)
        if settings is None:
            settings = ET.SubElement(unattend, _q("settings"), {"pass": settings_pass})
        return ET.SubElement(settings, _q("component"), dict(
            name=name, processorArchitecture=arch, **COMPONENT_ATTRIBUTES))

    @staticmethod
    def child(parent, *tags):
        """The element at `tags` below `parent`, created if missing."""
        element = parent
        for tag in tags:
            found = element.find(_q(tag))
            element = found if found is not None else ET.SubElement(element, _q(tag))
        return element

    def set_text(self, settings_pass, component, tags, text, arch):
        """Set the value in the component, and in every repeat of it the file holds."""
        for element in self._matching(settings_pass, component, arch) or \
                [self.component(settings_pass, component, arch)]:
            self.child(element, *tags).text = text

    def components(self, arch):
        return [c for c in self.tree.getroot().iter(_q("component"))
                if (c.get("processorArchitecture") or "").lower() == arch]

    def add_command(self, arch, description, command):
        """A RunSynchronousCommand of the specialize pass, after every existing one;
        nothing when a command already runs `command`'s script."""
        orders = [0]
        for component in self.components(arch):
            for entry in component.iter(_q("RunSynchronousCommand")):
                path = entry.findtext(_q("Path")) or ""
                if command.lower() in path.lower():
                    return
                order = (entry.findtext(_q("Order")) or "").strip()
                if order.isdigit():
                    orders.append(int(order))
        commands = self.child(self.component("specialize", "Microsoft-Windows-Deployment", arch),
                              "RunSynchronous")
        entry = ET.SubElement(commands, _q("RunSynchronousCommand"), {_q("action", WCM_NS): "add"})
        ET.SubElement(entry, _q("Description")).text = description
        ET.SubElement(entry, _q("Order")).text = str(max(orders) + 1)
        ET.SubElement(entry, _q("Path")).text = command

    def local_accounts(self, arch):
        """{name: LocalAccount element} of the accounts the answer file creates."""
        accounts = {}
        for component in self.components(arch):
            for account in component.iter(_q("LocalAccount")):
                name = (account.findtext(_q("Name")) or "").strip()
                if name and account.get(_q("action", WCM_NS), "add") == "add":
                    accounts[name] = account
        return accounts


# --------------------------------------------------------------------------
# sysprep.inf (Windows XP / 2003)
# --------------------------------------------------------------------------

class IniFile:
    """A sysprep.inf: keys set in place, everything else kept line for line."""

    def __init__(self, text):
        self.lines = text.replace("\r\n", "\n").split("\n")
        if self.lines and self.lines[-1] == "":
            self.lines.pop()

    def _section(self, section):
        start = None
        for number, line in enumerate(self.lines):
            stripped = line.strip()
            if stripped.startswith("[") and "]" in stripped:
                if start is not None:
                    return start, number
                if stripped[1:stripped.index("]")].strip().lower() == section.lower():
                    start = number
        return (start, len(self.lines)) if start is not None else (None, None)

    def get(self, section, key):
        start, end = self._section(section)
        if start is None:
            return None
        for line in self.lines[start + 1:end]:
            name, sep, value = line.partition("=")
            if sep and name.strip().lower() == key.lower():
                return value.strip()
        return None

    def set(self, section, key, value):
        start, end = self._section(section)
        if start is None:
            if self.lines and self.lines[-1].strip():
                self.lines.append("")
            self.lines += [f"[{section}]", f"{key}={value}"]
            return
        for number in range(start + 1, end):
            name, sep, _ = self.lines[number].partition("=")
            if sep and name.strip().lower() == key.lower():
                self.lines[number] = f"{name.strip()}={value}"
                return
        insert = end
        while insert > start + 1 and not self.lines[insert - 1].strip():
            insert -= 1
        self.lines.insert(insert, f"{key}={value}")

    def text(self):
        return "\r\n".join(self.lines) + "\r\n"


def load_sysprep_inf(root):
    data = root.read_bytes(SYSPREP_INF)
    if data is None:
        raise TaskError("SYSPREP.INF answer file not found.")
    return IniFile(data.decode("cp1252", "replace"))


def save_sysprep_inf(root, ini):
    try:
        root.write(SYSPREP_INF, ini.text().encode("cp1252"))
    except UnicodeEncodeError:
        raise TaskError("sysprep.inf can hold only characters of the Windows-1252 code page "
                        "(XP/2003 answer files)") from None


def oem_dir(ini):
    """$OEM$ next to InstallFilesPath (set to C:\\sysprep\\i386 when empty), which
    must lie below C:\\sysprep\\."""
    install_path = (ini.get("Unattended", "InstallFilesPath") or "").strip('"')
    if not install_path:
        install_path = DEFAULT_INSTALL_FILES
        ini.set("Unattended", "InstallFilesPath", install_path)
    prefix = "c:\\sysprep\\"
    if not install_path.lower().startswith(prefix):
        raise TaskError(f"Invalid value for InstallFilesPath ({install_path}): it must lie "
                        "below C:\\sysprep\\")
    relative = install_path[len(prefix):].replace("\\", "/")
    resolved = posixpath.normpath(posixpath.join("/sysprep", relative, "$OEM$"))
    if not resolved.startswith("/sysprep/"):
        raise TaskError(f"Invalid value for InstallFilesPath ({install_path})")
    return resolved


def add_legacy_command(root, ini, command):
    """A line of $OEM$\\CmdLines.txt, which mini-setup runs at its end; a command
    added later runs before SetupComplete.cmd (which removes our scripts)."""
    path = f"{oem_dir(ini)}/CmdLines.txt"
    root.makedirs(oem_dir(ini), *DIR_MODE)
    text = (root.read_bytes(path) or b"").decode("cp1252", "replace").replace("\r\n", "\n")
    lines = [line for line in text.split("\n") if line.strip()]
    if not any(line.strip().lower() == "[commands]" for line in lines):
        lines.insert(0, "[Commands]")
    last = f'"{guest_path(SETUP_COMPLETE)}"'.lower()
    position = next((n for n, line in enumerate(lines) if line.strip().lower() == last),
                    len(lines))
    lines.insert(position, command)
    root.write(path, ("\r\n".join(lines) + "\r\n").encode("cp1252"))


def inf_quote(text):
    """A quoted sysprep.inf string value ("" stands for one quote)."""
    if "\n" in text or "\r" in text:
        raise TaskError("A sysprep.inf value cannot hold a line break")
    return '"' + text.replace('"', '""') + '"'


# --------------------------------------------------------------------------
# Scripts run by Windows
# --------------------------------------------------------------------------

def guest_path(path):
    """/Windows/SnfScripts/x → C:\\Windows\\SnfScripts\\x."""
    return "C:" + path.replace("/", "\\")


def ensure_scripts(root, warn=None):
    """SnfScripts and SetupComplete.cmd (kept if the image has one; `warn` is
    told when its own lines could stop it before ours run)."""
    root.makedirs(SCRIPTS_DIR, *DIR_MODE)
    existing = root.read_bytes(SETUP_COMPLETE)
    if existing is None:
        root.write(SETUP_COMPLETE, b"", parents=DIR_MODE)
    elif warn and re.search(rb"^\s*(@\s*)?(exit|goto)\b", existing, re.IGNORECASE | re.MULTILINE):
        warn("The image's SetupComplete.cmd has an `exit' or `goto' line: the clean-up "
             "lines snf-image appends to it may not run")


def append_setup_complete(root, lines):
    """Append cmd lines to SetupComplete.cmd (CRLF), keeping what it holds."""
    data = root.read_bytes(SETUP_COMPLETE) or b""
    if data and not data.endswith(b"\n"):
        data += b"\r\n"
    data += "".join(line + "\r\n" for line in lines).encode("ascii")
    root.write(SETUP_COMPLETE, data, parents=DIR_MODE)


# --------------------------------------------------------------------------
# Passwords
# --------------------------------------------------------------------------

PASSWORD_FILE = f"{SCRIPTS_DIR}/password"
PASSWORD_SCRIPT = f"{SCRIPTS_DIR}/SetPasswords.vbs"
PASSWORD_COMMAND = f"cscript.exe //B //NoLogo {guest_path(PASSWORD_SCRIPT)}"
SAM_NAMES_KEY = "SAM\\Domains\\Account\\Users\\Names"
PASSWORD_NOT_REQUIRED = 0x20          # ADS_UF_PASSWD_NOTREQD

VBSCRIPT = """' Written by snf-image: sets the password of the accounts it was asked to,
' enables them and makes a password required.  The password is read from a
' UTF-16 file that is overwritten and deleted before any account is touched.
Option Explicit
Dim fso, stream, password, name, account
Set fso = CreateObject("Scripting.FileSystemObject")
Set stream = fso.OpenTextFile("{password_file}", 1, False, -1)
If stream.AtEndOfStream Then
  password = ""
Else
  password = stream.ReadAll
End If
stream.Close
Set stream = fso.OpenTextFile("{password_file}", 2, False, -1)
stream.Write String(Len(password) + 64, "X")
stream.Close
fso.DeleteFile "{password_file}", True
For Each name In Array({users})
  Set account = GetObject("WinNT://./" & name & ",user")
  account.SetPassword password
  account.AccountDisabled = False
  account.Put "UserFlags", account.Get("UserFlags") And Not {not_required}
  account.SetInfo
Next
"""


def sam_users(root):
    return Hive.load(root, SAM_HIVE).subkeys(SAM_NAMES_KEY)


def _vbs_string(text):
    return '"' + text.replace('"', '""') + '"'


def write_password_script(root, users, password):
    """The VBScript that sets the passwords of `users` (no secret in it) and the
    UTF-16 file it reads the password from."""
    root.write(PASSWORD_FILE, password.encode("utf-16-le"), mode=0o600)
    root.write(PASSWORD_SCRIPT, VBSCRIPT.format(
        password_file=guest_path(PASSWORD_FILE), users=", ".join(map(_vbs_string, users)),
        not_required=f"&H{PASSWORD_NOT_REQUIRED:X}").replace("\n", "\r\n"))


def _set_password_element(parent, password):
    for tag, text in (("Value", password), ("PlainText", "true")):
        AnswerFile.child(parent, tag).text = text


def change_passwords(family, password, password_hash, auth_keys, users_property, warn):
    if password_hash is not None:
        raise TaskError("On Windows images password hash is not applicable.")
    if auth_keys:
        warn("Windows images do not support auth_keys: ignoring them")
    if password is None:
        warn("Task ChangePassword will not run. Password is not set")
        return
    if not XML_SAFE_VALUE.fullmatch(password):
        raise TaskError("A Windows password can hold neither line breaks nor control characters "
                        "(an answer file cannot carry them)")
    users = users_property.split()
    if not users:
        warn("No USERS property defined: changing the password of Administrator")
        users = ["Administrator"]
    with lib.ImageRoot(helper.target()) as root:
        if not root.is_file(SAM_HIVE):
            raise TaskError("The SAM registry hive (Windows/System32/config/SAM) is missing")
        in_sam = {name.lower(): name for name in sam_users(root)}
        arch = architecture(root)
        answer = AnswerFile(root) if family == "windows" else None
        created = {name.lower(): account for name, account in
                   (answer.local_accounts(arch) if answer else {}).items()}
        for user in users:
            if user.lower() not in in_sam and user.lower() not in created:
                raise TaskError(f"User: `{user}' does not exist.")
        existing = [in_sam[user.lower()] for user in users if user.lower() in in_sam]
        if answer is not None:
            for user in users:
                if user.lower() in created:
                    _set_password_element(AnswerFile.child(created[user.lower()], "Password"),
                                          password)
            if "administrator" in [user.lower() for user in users]:
                component = answer.component("oobeSystem", "Microsoft-Windows-Shell-Setup", arch)
                _set_password_element(AnswerFile.child(component, "UserAccounts",
                                                       "AdministratorPassword"), password)
            if existing:
                answer.add_command(arch, "Set the passwords of existing accounts",
                                   PASSWORD_COMMAND)
            answer.save()
        else:
            ini = load_sysprep_inf(root)
            if "administrator" in [user.lower() for user in users]:
                ini.set("GuiUnattended", "AdminPassword", inf_quote(password))
                ini.set("GuiUnattended", "EncryptedAdminPassword", "No")
            save_sysprep_inf(root, ini)
            if existing:
                add_legacy_command(root, ini, PASSWORD_COMMAND)
        if existing:
            write_password_script(root, existing, password)
        lib.info(f"The password of {' '.join(users)} will be set during Windows setup")


# --------------------------------------------------------------------------
# Host name
# --------------------------------------------------------------------------

def assign_computer_name(family, hostname):
    name = computer_name(hostname)
    with lib.ImageRoot(helper.target()) as root:
        if family == "windows":
            answer = AnswerFile(root)
            answer.set_text("specialize", "Microsoft-Windows-Shell-Setup", ["ComputerName"],
                            name, architecture(root))
            answer.save()
        else:
            ini = load_sysprep_inf(root)
            ini.set("UserData", "ComputerName", name)
            save_sysprep_inf(root, ini)
    lib.info(f"Computer name set to {name}")


# --------------------------------------------------------------------------
# Personality files
# --------------------------------------------------------------------------

def inject_files(files, now=None):
    """Write each file at its path on the system drive (owner, group and mode
    mean nothing on NTFS); a file already there is kept as <path>.bak.<time>."""
    stamp = time.strftime("%Y%m%d.%H%M%S", time.gmtime(now))
    with lib.ImageRoot(helper.target()) as root:
        for item in files:
            components = lib.path_components(item.path)
            parent = "/" + "/".join(components[:-1])
            if root.is_dir(item.path):
                raise TaskError(f"{item.path} is a directory in the image")
            if root.exists(item.path) or root.is_link(item.path):
                real_parent = root.real_path(parent)
                backup = f"{components[-1]}.bak.{stamp}"
                os.rename(os.path.join(real_parent, components[-1]),
                          os.path.join(real_parent, backup))
                lib.info(f"Kept the existing {item.path} as {backup}")
            root.write(item.path, item.contents, parents=DIR_MODE)
            lib.info(f"Injected {item.path}")


def extend_script(partition):
    """The diskpart script that grows the NTFS of `partition` (already grown by
    the helper) into its partition; the Ganeti disk is Windows' disk 0."""
    return f"select disk 0\r\nselect partition {partition}\r\nextend filesystem\r\nexit\r\n"
