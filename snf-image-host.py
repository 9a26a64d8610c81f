#!/usr/bin/python3
"""snf-image host side: the Ganeti OS definition's program (runs as root on the node).

Pipeline of `create`: image source (local file, URL, null or a site back-end)
→ optional decompression and checksum → O_DIRECT copy onto the Ganeti disk
(with a synthesized MBR for filesystem dumps) → floppy with rules.json +
answer files → unprivileged helper VM (qemu -runas) that runs the
customization tasks against the disk → `SUCCESS` on its result port → exit 0.

Verbs: create, import, export, rename, verify (called by the os-def/ wrappers
with Ganeti's environment, OS API 20) and `deploy` (the same pipeline without
Ganeti, onto a disk file or block device). Exit codes: 0 success, 1 the
operation failed, 2 bad usage / parameters / configuration, 3 helper VM failed.
The last line printed on failure is the one-line root cause.
"""

import sys

if sys.version_info < (3, 11):
    sys.exit("ERROR: snf-image-host.py needs Python 3.11 or newer")

# Only what every verb needs is imported here: the OS scripts start a fresh
# interpreter for each operation, and a `create` whose image copy takes well
# under a second would otherwise spend a measurable part of it importing
# modules it never uses. Modules needed by one path only (checksums, base64
# checks, temporary directories, the helper VM's selectors loop, argparse for
# `deploy`, urllib.request) are imported in the function that uses them.
import bisect
import errno
import fcntl
import io
import json
import mmap
import os
import queue
import re
import shlex
import signal
import stat
import struct
import subprocess
import threading
import time
import urllib.parse
from collections import namedtuple
from contextlib import contextmanager, nullcontext, suppress
from pathlib import Path

# ---------------------------------------------------------------------------
# Constants
# ---------------------------------------------------------------------------

SNF_IMAGE_VERSION = "0.24.0"      # the release; the builder writes it into every helper manifest
OS_DIR = Path(__file__).resolve().parent
DEFAULT_CONFIG_FILE = "/etc/default/snf-image"
RUN_DIR = Path("/run/snf-image")
OS_API_VERSION = "20"
MIB = 1024 * 1024
MBR_HEADER_SIZE = MIB            # filesystem dumps start at sector 2048
FILE_DIRECT_ALIGNMENT = 4096     # safe O_DIRECT alignment for regular files
BLKSSZGET = 0x1268
BLKDISCARD = 0x1277              # linux/fs.h _IO(0x12, 119)
BLKZEROOUT = 0x127F              # linux/fs.h _IO(0x12, 127)
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
ZERO_CHUNK = 64 * 1024           # granularity of the all-zero test in a copy buffer
BLKGETSIZE64 = 0x80081272
F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
FLOPPY_SIZE = 1440 * 1024
KVM_PROBE_TIMEOUT = 3.0
URL_MIN_BYTES = 64 * 1024       # an image download brings this much per URL_TIMEOUT, or fails
URL_RESUME_ATTEMPTS = 3          # times a cut download resumes with Range/If-Range
MBR_BIN_CANDIDATES = ("/usr/lib/syslinux/mbr/mbr.bin", "/usr/lib/SYSLINUX/mbr.bin",
                      "/usr/share/syslinux/mbr.bin", "/usr/lib/syslinux/mbr.bin")

# The twelve OS parameters of parameters.list, in upstream's order.
OS_PARAMETERS = ("img_id", "img_format", "img_passwd", "img_passwd_hash", "auth_keys",
                 "img_properties", "img_personality", "inst_properties", "config_url",
                 "os_product_key", "os_answer_file", "cloud_userdata")
IMAGE_FORMATS = ("diskdump", "extdump", "ntfsdump")
NIC_CONFIGS = ("", "dhcp", "dhcpv6", "slaac", "slaac_dhcp", "dhcp+dhcpv6", "dhcp+slaac",
               "dhcp+slaac_dhcp")

# Microsoft time zone names and their sysprep.inf indexes (upstream's
# ms-timezone-indexes.txt).
WINDOWS_TIMEZONES = {
    "000": "Dateline Standard Time", "001": "Samoa Standard Time",
    "002": "Hawaiian Standard Time", "003": "Alaskan Standard Time",
    "004": "Pacific Standard Time", "010": "Mountain Standard Time",
    "013": "Mexico Standard Time 2", "015": "U.S. Mountain Standard Time",
    "020": "Central Standard Time", "025": "Canada Central Standard Time",
    "030": "Mexico Standard Time", "033": "Central America Standard Time",
    "035": "Eastern Standard Time", "040": "U.S. Eastern Standard Time",
    "045": "S.A. Pacific Standard Time", "050": "Atlantic Standard Time",
    "055": "S.A. Western Standard Time", "056": "Pacific S.A. Standard Time",
    "060": "Newfoundland and Labrador Standard Time", "065": "E. South America Standard Time",
    "070": "S.A. Eastern Standard Time", "073": "Greenland Standard Time",
    "075": "Mid-Atlantic Standard Time", "080": "Azores Standard Time",
    "083": "Cape Verde Standard Time", "085": "GMT Standard Time",
    "090": "Greenwich Standard Time", "095": "Central Europe Standard Time",
    "100": "Central European Standard Time", "105": "Romance Standard Time",
    "110": "W. Europe Standard Time", "113": "W. Central Africa Standard Time",
    "115": "E. Europe Standard Time", "120": "Egypt Standard Time",
    "125": "FLE Standard Time", "130": "GTB Standard Time",
    "135": "Israel Standard Time", "140": "South Africa Standard Time",
    "145": "Russian Standard Time", "150": "Arab Standard Time",
    "155": "E. Africa Standard Time", "158": "Arabic Standard Time",
    "160": "Iran Standard Time", "165": "Arabian Standard Time",
    "170": "Caucasus Standard Time",
    "175": "Transitional Islamic State of Afghanistan Standard Time",
    "180": "Ekaterinburg Standard Time", "185": "West Asia Standard Time",
    "190": "India Standard Time", "193": "Nepal Standard Time",
    "195": "Central Asia Standard Time", "200": "Sri Lanka Standard Time",
    "201": "N. Central Asia Standard Time", "203": "Myanmar Standard Time",
    "205": "S.E. Asia Standard Time", "207": "North Asia Standard Time",
    "210": "China Standard Time", "215": "Singapore Standard Time",
    "220": "Taipei Standard Time", "225": "W. Australia Standard Time",
    "227": "North Asia East Standard Time", "230": "Korea Standard Time",
    "235": "Tokyo Standard Time", "240": "Yakutsk Standard Time",
    "245": "A.U.S. Central Standard Time", "250": "Cen. Australia Standard Time",
    "255": "A.U.S. Eastern Standard Time", "260": "E. Australia Standard Time",
    "265": "Tasmania Standard Time", "270": "Vladivostok Standard Time",
    "275": "West Pacific Standard Time", "280": "Central Pacific Standard Time",
    "285": "Fiji Islands Standard Time", "290": "New Zealand Standard Time",
    "300": "Tonga Standard Time",
}

# The default answer files, written from Microsoft's unattend schema: the
# specialize pass names the machine "*" (a random name until the helper writes
# the instance's), sets the time zone and marks the local account step of OOBE
# as done (the helper sets the passwords); the oobeSystem pass answers every
# OOBE question.  Each component is present for amd64 and x86 images; the
# helper adds ComputerName, ProductKey, passwords and its commands.
UNATTEND_TEMPLATE = """<?xml version="1.0" encoding="utf-8"?>
<!-- Default answer file of snf-image (time zone from WINDOWS_TIMEZONE). -->
<unattend xmlns="urn:schemas-microsoft-com:unattend" xmlns:wcm="http://schemas.microsoft.com/WMIConfig/2002/State">
{components}
</unattend>
"""
UNATTEND_COMPONENTS = """  <settings pass="specialize">
    <component name="Microsoft-Windows-Shell-Setup" processorArchitecture="{arch}" publicKeyToken="31bf3856ad364e35" language="neutral" versionScope="nonSxS">
      <ComputerName>*</ComputerName>
      <TimeZone>{timezone}</TimeZone>
      <DisableAutoDaylightTimeSet>false</DisableAutoDaylightTimeSet>
      <RegisteredOrganization>snf-image</RegisteredOrganization>
      <RegisteredOwner>snf-image</RegisteredOwner>
    </component>
    <component name="Microsoft-Windows-Deployment" processorArchitecture="{arch}" publicKeyToken="31bf3856ad364e35" language="neutral" versionScope="nonSxS">
      <RunSynchronous>
        <RunSynchronousCommand wcm:action="add">
          <Description>No local account to create in OOBE</Description>
          <Order>1</Order>
          <Path>reg.exe add "HKLM\\SOFTWARE\\Microsoft\\Windows\\CurrentVersion\\Setup\\OOBE" /v UnattendCreatedUser /t REG_DWORD /d 1 /f</Path>
        </RunSynchronousCommand>
      </RunSynchronous>
    </component>
  </settings>
  <settings pass="oobeSystem">
    <component name="Microsoft-Windows-International-Core" processorArchitecture="{arch}" publicKeyToken="31bf3856ad364e35" language="neutral" versionScope="nonSxS">
      <InputLocale>en-US</InputLocale>
      <SystemLocale>en-US</SystemLocale>
      <UILanguage>en-US</UILanguage>
      <UserLocale>en-US</UserLocale>
    </component>
    <component name="Microsoft-Windows-Shell-Setup" processorArchitecture="{arch}" publicKeyToken="31bf3856ad364e35" language="neutral" versionScope="nonSxS">
      <OOBE>
        <HideEULAPage>true</HideEULAPage>
        <NetworkLocation>Other</NetworkLocation>
        <ProtectYourPC>1</ProtectYourPC>
      </OOBE>
    </component>
  </settings>"""
SYSPREP_TEMPLATE = """;Default sysprep.inf written by snf-image (time zone from WINDOWS_TIMEZONE)
[Unattended]
OemSkipEula=Yes
InstallFilesPath=C:\\sysprep\\i386

[GuiUnattended]
OEMSkipRegional=1
TimeZone={timezone_index}
OemSkipWelcome=1

[UserData]
FullName="User"
OrgName="snf-image"
ComputerName=*

[Identification]
JoinWorkgroup=WORKGROUP

[Networking]
InstallDefaultComponents=Yes
"""

# A 512-byte boot sector that prints "SNF-KVM-OK" to COM1 in a loop: the
# probe guest that tells whether KVM really runs guests on this host.
KVM_PROBE_MESSAGE = b"SNF-KVM-OK"
KVM_PROBE_CODE = bytes.fromhex("fa31c08ed8be207cac84c07406baf803eeebf5bf0008b9ffffe2fe4f75f8ebe5")


# ---------------------------------------------------------------------------
# Errors and output
# ---------------------------------------------------------------------------

class SnfError(Exception):
    """An expected failure: printed as one line by main(), exit code attached."""

    def __init__(self, message, exit_code=1):
        super().__init__(" ".join(str(message).split()))
        self.exit_code = exit_code


def usage_error(message):
    return SnfError(message, exit_code=2)


def _timestamp():
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())


CONTROL_CHARACTERS = re.compile(r"[\x00-\x1f\x7f\x80-\x9f]")


def printable(text):
    """One line whatever the text holds: control characters (a newline in an
    instance name or image id would forge a log line) are shown escaped."""
    return CONTROL_CHARACTERS.sub(lambda m: ascii(m.group())[1:-1], str(text))


def log(message, level="INFO"):
    """Everything goes to stderr: for export, stdout carries the disk data."""
    try:
        print(f"{_timestamp()} {level}: {printable(message)}", file=sys.stderr, flush=True)
    except (BrokenPipeError, ValueError):
        pass


def warn(message):
    log(message, "WARNING")


def redact_url(url):
    """Drop user:password@ from a URL before it is logged."""
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:
        return "<unparsable URL>"
    if parts.username is None and parts.password is None:
        return url
    netloc = parts.hostname or ""
    if parts.port:
        netloc += f":{parts.port}"
    return urllib.parse.urlunsplit((parts.scheme, "***@" + netloc, parts.path, parts.query, ""))


class _Deadline:
    """Shuts the watched sockets down when the time is up: a server that sends
    one byte a second never trips a socket timeout, but it trips this.
    `window` seconds for the whole fetch, or, with `min_bytes`, for each
    `min_bytes` received (a large image may take long, but not at a trickle)."""

    def __init__(self, window, min_bytes=None):
        self.window, self.min_bytes = window, min_bytes
        self.expires = time.monotonic() + window
        self.counted = 0
        self.expired = False
        self.sockets = []
        self.lock = threading.Lock()
        self.stopped = threading.Event()
        threading.Thread(target=self._watch, name="url-deadline", daemon=True).start()

    def _watch(self):
        while not self.stopped.wait(max(0.05, self.expires - time.monotonic())):
            if time.monotonic() >= self.expires:
                with self.lock:
                    self.expired = True
                    for sock in self.sockets:
                        self.shut(sock)
                return

    def received(self, count):
        if self.min_bytes is None:
            return
        self.counted += count
        if self.counted >= self.min_bytes:
            self.counted = 0
            self.expires = time.monotonic() + self.window

    def watch(self, sock):
        with self.lock:
            self.sockets.append(sock)
            if self.expired:
                self.shut(sock)

    @staticmethod
    def shut(sock):
        import socket
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def describe(self):
        if self.min_bytes is None:
            return f"not finished within URL_TIMEOUT ({self.window:g} s)"
        return f"less than {self.min_bytes // 1024} KiB received in URL_TIMEOUT ({self.window:g} s)"

    def cancel(self):
        self.stopped.set()


def _url_handlers(deadline, origin_host, authorization):
    """urllib handlers whose connections obey the deadline and whose redirects
    carry the credentials only back to the host they were given for."""
    import urllib.request

    def watched(connection_class):
        class Connection(connection_class):
            def connect(self):
                super().connect()
                deadline.watch(self.sock)
        return Connection

    class HTTPHandler(urllib.request.HTTPHandler):
        def do_open(self, http_class, request, **kwargs):
            return super().do_open(watched(http_class), request, **kwargs)

    class HTTPSHandler(urllib.request.HTTPSHandler):
        def do_open(self, http_class, request, **kwargs):
            return super().do_open(watched(http_class), request, **kwargs)

    class RedirectHandler(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, request, fp, code, message, headers, new_url):
            new = super().redirect_request(request, fp, code, message, headers, new_url)
            if new is not None and authorization:
                new.remove_header("Authorization")
                parts = urllib.parse.urlsplit(new.full_url)
                if (parts.scheme.lower(), parts.hostname, parts.port) == origin_host:
                    new.add_unredirected_header("Authorization", authorization)
            return new

    return [HTTPHandler(), HTTPSHandler(), RedirectHandler()]


class UrlFetch:
    """The one owner of reading a URL (config_url, network images, answer files).

    Basic credentials in the URL are sent only to the URL's own host (never
    after a redirect elsewhere), each read waits at most `timeout` seconds and
    the whole fetch at most `deadline` seconds, a cut download resumes with
    Range/If-Range up to URL_RESUME_ATTEMPTS times (read again from the start
    and skipped when the server ignores ranges, refused when the object
    changed meanwhile), and every failure is one SnfError naming `what`.
    Use as a context manager; `size` is the announced length or None.
    """

    def __init__(self, url, what, *, timeout, stream=False, resume=URL_RESUME_ATTEMPTS):
        self.url, self.what, self.timeout = url, what, timeout
        self.shown = redact_url(url)
        self.deadline = _Deadline(timeout, URL_MIN_BYTES if stream else None)
        self.resumes_left = resume
        self.position = 0
        self.response = None
        self.size = None
        self.validator = None
        try:
            parts = urllib.parse.urlsplit(url)
            port = parts.port
        except ValueError as exc:
            raise self.error(f"invalid URL ({exc})") from None
        if parts.scheme.lower() not in ("http", "https", "ftp", "ftps") or not parts.hostname:
            raise self.error("only http://, https://, ftp:// and ftps:// URLs with a host name can be fetched")
        self.request_url, self.authorization = url, None
        if parts.username is not None and parts.scheme.lower() in ("http", "https"):
            host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
            netloc = host + (f":{port}" if port else "")
            self.request_url = urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, parts.query, ""))
            import base64
            token = f"{urllib.parse.unquote(parts.username)}:{urllib.parse.unquote(parts.password or '')}"
            self.authorization = "Basic " + base64.b64encode(token.encode()).decode()
        self.origin = (parts.scheme.lower(), parts.hostname, port)
        self._open()
        length = self.response.headers.get("Content-Length")
        self.size = int(length) if length and length.strip().isdigit() else None
        self.validator = self.response.headers.get("ETag") or self.response.headers.get("Last-Modified")

    def error(self, reason):
        return SnfError(f"cannot fetch {self.what} {self.shown}: {reason}")

    def _open(self, offset=0):
        import urllib.error
        import urllib.request
        opener = urllib.request.build_opener(*_url_handlers(self.deadline, self.origin, self.authorization))
        request = urllib.request.Request(self.request_url)
        if self.authorization:
            request.add_unredirected_header("Authorization", self.authorization)
        if offset:
            request.add_header("Range", f"bytes={offset}-")
            request.add_header("If-Range", self.validator)
        try:
            self.response = opener.open(request, timeout=self.timeout)
        except urllib.error.HTTPError as exc:
            exc.close()
            raise self.error(f"HTTP {exc.code} {exc.reason}") from None
        except (urllib.error.URLError, OSError, ValueError) as exc:
            raise self.error(self._reason(exc)) from None
        except Exception as exc:        # http.client.HTTPException: a broken reply
            raise self.error(self._reason(exc)) from None

    def _reason(self, exc):
        if self.deadline.expired:
            return self.deadline.describe()
        reason = getattr(exc, "reason", None) or exc
        text = " ".join(str(reason).split()) or type(exc).__name__
        return text if not isinstance(reason, OSError) or not reason.strerror else reason.strerror

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    def close(self):
        self.deadline.cancel()
        for sock in self.deadline.sockets:      # wakes a reader thread blocked in recv (an interrupted copy)
            self.deadline.shut(sock)
        if self.response is not None:
            self.response.close()

    def read(self, limit):
        """The whole body of a small document, refused when longer than `limit`."""
        chunks, total = [], 0
        buffer = bytearray(65536)
        while True:
            count = self.readinto(memoryview(buffer))
            if not count:
                return b"".join(chunks)
            total += count
            if total > limit:
                raise self.error(f"longer than {limit} bytes")
            chunks.append(bytes(buffer[:count]))

    def readinto(self, buffer):
        while True:
            try:
                count = self.response.readinto(buffer)
            except Exception as exc:      # OSError, IncompleteRead, a shut socket
                if self.deadline.expired:
                    raise self.error(self._reason(exc)) from None
                cut = self._reason(exc)
            else:
                if self.deadline.expired:
                    raise self.error(self._reason(None))
                if count or self.size is None or self.position == self.size:
                    self.position += count
                    self.deadline.received(count)
                    return count
                cut = f"connection closed after {self.position} of {self.size} bytes"
            self._resume(cut)

    def _resume(self, cut):
        if not self.resumes_left or self.size is None or not self.validator \
                or not self.url.lower().startswith(("http://", "https://")):
            raise self.error(f"download cut ({cut})")
        self.resumes_left -= 1
        warn(f"{self.what} {self.shown}: download cut at byte {self.position} ({cut}); resuming")
        self.response.close()
        self._open(self.position)
        status = getattr(self.response, "status", 200)
        headers = self.response.headers
        now = headers.get("ETag") or headers.get("Last-Modified")
        if now != self.validator and (status != 206 or now is not None):
            raise self.error("the object changed on the server during the download")
        if status == 206:
            start = re.match(r"bytes (\d+)-", headers.get("Content-Range", ""))
            if not start or int(start.group(1)) != self.position:
                raise self.error("the server resumed at the wrong position")
            return
        skip = self.position          # ranges ignored: read again from the start, drop what we have
        warn(f"{self.what} {self.shown}: the server ignores ranges; reading again from the start")
        scratch = memoryview(bytearray(65536))
        while skip:
            try:
                count = self.response.readinto(scratch[:min(skip, len(scratch))])
            except Exception as exc:
                raise self.error(f"download cut again ({self._reason(exc)})") from None
            if not count:
                raise self.error("download cut again while reading up to the resume point")
            skip -= count


def human_size(count):
    return f"{count / MIB:.1f} MiB"


# ---------------------------------------------------------------------------
# Configuration: one table of settings, parsed (never executed) from
# /etc/default/snf-image and the variant file
# ---------------------------------------------------------------------------

def parse_duration(text):
    """timeout(1) syntax: a number with an optional s/m/h/d suffix → seconds."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?|\.\d+)\s*([smhd]?)\s*", text)
    if not match:
        raise ValueError("expected a duration such as 120, 90s, 2m, 1h or 1d")
    return float(match.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[match.group(2)]


def parse_byte_size(text):
    """`4M`, `1048576`, `512K`, `1G` → bytes."""
    match = re.fullmatch(r"\s*(\d+)\s*([KMG]?)(i?B)?\s*", text, re.IGNORECASE)
    if not match:
        raise ValueError("expected a size such as 4M, 1024K or 1048576")
    return int(match.group(1)) * {"": 1, "K": 1024, "M": MIB, "G": 1024 * MIB}[match.group(2).upper()]


def _check_timeout(text):
    seconds = parse_duration(text)
    if seconds <= 0:
        raise ValueError("a timeout must be longer than 0 seconds")
    return seconds


def _check_yes_no(text):
    if text not in ("yes", "no"):
        raise ValueError("expected yes or no")
    return text == "yes"


def _check_choice(choices):
    def check(text):
        if text not in choices:
            raise ValueError("expected one of " + ", ".join(repr(c) for c in choices))
        return text
    return check


def _check_positive_int(text):
    if not re.fullmatch(r"\d+", text.strip()) or int(text) <= 0:
        raise ValueError("expected a positive integer")
    return int(text)


def _check_buffer_size(text):
    size = parse_byte_size(text)
    if size < 4096 or size % 4096 or size > 256 * MIB:
        raise ValueError("expected a multiple of 4K between 4K and 256M")
    return size


def _check_command(text):
    argv = shlex.split(text)
    if not argv:
        raise ValueError("expected a program name")
    return argv


def _check_optional_command(text):
    return shlex.split(text)


def _check_timezone(text):
    for index, name in WINDOWS_TIMEZONES.items():
        if name.lower() == text.strip().lower():
            return (name, index)
    raise ValueError("not a Windows time zone name (e.g. 'GMT Standard Time', 'W. Europe Standard Time')")


def _check_user(text):
    if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]*", text):
        raise ValueError("expected a user name")
    return text


def _check_debian_suite(text):
    if not re.fullmatch(r"[a-z][a-z0-9.-]*", text):
        raise ValueError("expected a Debian suite name such as trixie")
    return text


def _check_mirror_url(text):
    text = text.rstrip("/")
    if text and not re.fullmatch(r"(https?|ftp|file):/[^\s\[\]]*", text):
        raise ValueError("expected an http(s), ftp or file URL (empty: the host's APT sources)")
    return text


def _as_is(text):
    return text


# Who reads a setting: the OS definition (this program), the helper builder
# (snf-image-update-helper, which loads this module for the grammar and the
# table), or both. Every key is validated by both programs all the same, so
# one file gets one verdict whichever program reads it first.
HOST, BUILDER, BOTH = "host", "builder", "both"


class Setting:
    def __init__(self, name, default, convert, help_text, readers=HOST):
        self.name, self.default, self.convert, self.help = name, default, convert, help_text
        self.readers = readers

    def read_by(self, program):
        """Whether HOST or BUILDER uses this setting."""
        return self.readers in (program, BOTH)

    @property
    def is_program(self):
        """The value is a command (a program and its arguments, as an argument list)."""
        return self.convert is _check_command


SETTINGS = (
    Setting("IMAGE_DIR", "/var/lib/snf-image", _as_is, "directory of local images (local://NAME)"),
    Setting("HELPER_DIR", "/var/lib/snf-image/helper", _as_is, "helper VM files written by snf-image-update-helper",
            BOTH),
    Setting("HELPER_CACHE_DIR", "", _as_is, "cache of the helper's slow root stage; empty: HELPER_DIR/cache",
            BUILDER),
    Setting("HELPER_SOFT_TIMEOUT", "120", _check_timeout, "helper VM run time before SIGTERM (120, 2m, 1h)"),
    Setting("HELPER_HARD_TIMEOUT", "5", _check_timeout, "extra time after SIGTERM before SIGKILL"),
    Setting("HELPER_USER", "nobody", _check_user, "user qemu runs as (-runas)", BOTH),
    Setting("HELPER_MEMORY", "256", _check_positive_int, "helper VM memory in MiB", BOTH),
    Setting("HELPER_DEBUG", "no", _check_yes_no, "yes: debug shell on a pty instead of powering off after a failure"),
    Setting("HELPER_ACCEL", "auto", _check_choice(("auto", "kvm", "tcg")), "qemu accelerator: kvm, tcg or auto"),
    Setting("HELPER_DEBIAN_SUITE", "trixie", _check_debian_suite, "Debian suite of the helper root", BUILDER),
    Setting("HELPER_DEBIAN_MIRROR", "", _check_mirror_url, "Debian mirror for the helper; empty: host's APT sources",
            BUILDER),
    Setting("IMAGE_DEBUG", "no", _check_yes_no, "yes: log every external command"),
    Setting("CLOUD_INIT_DEBUG", "no", _check_yes_no, "yes: cloud-init debug logging in the image"),
    Setting("PROGRESS_MONITOR", "", _check_optional_command, "program receiving the JSON progress messages on stdin"),
    Setting("UNATTEND", "", _as_is, "deprecated: unattend.xml to use instead of the default one"),
    Setting("WINDOWS_TIMEZONE", "GMT Standard Time", _check_timezone, "Windows time zone for the default answer files"),
    Setting("VARIANTS_DIR", "/etc/ganeti/snf-image/variants", _as_is, "directory of VARIANT.conf files"),
    Setting("BACKENDS_DIR", str(OS_DIR / "backends"), _as_is, "external back-ends {src,dst}/NAME"),
    Setting("BACKENDS_CONFIG_DIR", "/etc/snf-image/backends", _as_is, "{src,dst}/NAME.priority and NAME.disabled"),
    Setting("DHCP_TAGS", "auto dhcp nfdhcpd", _as_is, "network tags meaning DHCPv4"),
    Setting("STATEFUL_DHCPV6_TAGS", "dhcpv6 stateful_dhcpv6", _as_is, "network tags meaning DHCPv6"),
    Setting("STATELESS_DHCPV6_TAGS", "nfdhcpd stateless_dhcpv6", _as_is, "network tags meaning SLAAC + stateless DHCPv6"),
    Setting("DEFAULT_NIC_CONFIG", "dhcp", _check_choice(NIC_CONFIGS), "configuration of a lone NIC without information"),
    Setting("COPY_BUFFER_SIZE", "4M", _check_buffer_size, "O_DIRECT copy buffer size"),
    Setting("COPY_OVERLAP", "yes", _check_yes_no, "read the next buffer while the previous one is written"),
    Setting("COPY_WRITERS", "1", _check_positive_int, "O_DIRECT writes kept in flight on a disk (1: in order)"),
    Setting("SPARSE_COPY", "yes", _check_yes_no, "write only the image's data, zero the rest of its range cheaply"),
    Setting("PROGRESS_INTERVAL", "3", parse_duration, "seconds between copy progress messages"),
    Setting("URL_TIMEOUT", "60", _check_timeout, "seconds a config_url or answer file may take; an image "
            "download must bring 64 KiB in each such interval"),
    Setting("TEMP_DIR", "/run/snf-image", _as_is, "private directory for the floppy and other temporary files"),
    Setting("MBR_BIN", "", _as_is, "boot code for filesystem dumps; empty: syslinux's mbr.bin"),
    Setting("XEN_SCRIPTS_DIR", "/etc/xen/scripts", _as_is, "unused (accepted for compatibility)"),
    Setting("XEN_CMD", "xl", _as_is, "unused (accepted for compatibility)"),
    Setting("MULTISTRAP_CONFIG", "", _as_is, "multistrap configuration instead of the built-in one "
            "(it must still install python3, busybox-static and linux-image-amd64)", BUILDER),
    Setting("MULTISTRAP_APTPREFDIR", "", _as_is, "APT preference files (pinning) for multistrap", BUILDER),
    Setting("IMAGE_KEYRING", "", _as_is, "OpenPGP keyring for gpgv; set: NAME.sig / URL.sig signatures are checked"),
    Setting("IMAGE_SIGNATURE_REQUIRED", "no", _check_yes_no, "yes: an image without a signature is refused"),
    Setting("GPGV", "gpgv", _check_command, "gpgv program (image signatures)"),
    Setting("QEMU", "qemu-system-x86_64", _check_command, "qemu program", BOTH),
    Setting("QEMU_IMG", "qemu-img", _check_command, "qemu-img program (tools)"),
    Setting("MKFS_EXT2", "mkfs.ext2", _check_command, "mkfs.ext2 program (floppy)"),
    Setting("SSH_KEYGEN", "ssh-keygen", _check_command, "ssh-keygen program (SSH host keys made on the node; "
            "missing: the helper makes them)"),
    Setting("MULTISTRAP", "multistrap", _check_command, "multistrap program", BUILDER),
    Setting("MKFS_EXT4", "mkfs.ext4", _check_command, "mkfs.ext4 program (the helper's root image)", BUILDER),
    Setting("DEPMOD", "depmod", _check_command, "depmod program", BUILDER),
    Setting("ZSTD", "zstd", _check_command, "zstd program (decompresses zstd kernels and modules)", BUILDER),
    Setting("CP", "cp", _check_command, "cp program", BUILDER),
    Setting("CHROOT", "chroot", _check_command, "chroot program (byte-compiles the helper with the root's python3)",
            BUILDER),
)
SETTINGS_BY_NAME = {s.name: s for s in SETTINGS}
DEPRECATED_SETTINGS = {"VERSION_CHECK": "VERSION_CHECK is obsolete and ignored",
                       "KVM": "KVM is replaced by QEMU", "CURL": "CURL is no longer used (urllib)"}


def _unquote_double(text, where):
    out, i = [], 0
    while i < len(text):
        char = text[i]
        if char == "\\" and i + 1 < len(text):
            nxt = text[i + 1]
            if nxt in '"\\$`':
                out.append(nxt)
            elif nxt == "\n":
                pass
            else:
                out.append("\\" + nxt)
            i += 2
            continue
        if char == "$" or char == "`":
            raise ValueError(f"{where}: variable or command expansion is not supported "
                             "(write the value literally, or use single quotes)")
        out.append(char)
        i += 1
    return "".join(out)


def parse_config_text(text, source):
    """Parse KEY="value" / KEY='value' / KEY=value / export KEY=... lines.

    Returns {KEY: value}. Never executes anything; raises ValueError with a
    one-line message naming the file, line and key on a syntax error.
    """
    values = {}
    assignment = re.compile(r"(?:export\s+)?([A-Za-z_][A-Za-z0-9_]*)=(.*)", re.DOTALL)
    lines = text.split("\n")
    lineno = 0
    while lineno < len(lines):
        raw = lines[lineno]
        lineno += 1
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        match = assignment.fullmatch(line)
        if not match:
            raise ValueError(f"{source} line {lineno}: cannot parse {line.split('=')[0][:40]!r} "
                             "(expected KEY=\"value\")")
        key, rest = match.group(1), match.group(2)
        where = f"{source} line {lineno} ({key})"
        if rest.startswith('"') or rest.startswith("'"):
            quote = rest[0]
            body = rest[1:]
            # a quoted value may span lines
            while True:
                end = _closing_quote(body, quote)
                if end is not None or lineno >= len(lines):
                    break
                body += "\n" + lines[lineno]
                lineno += 1
            if end is None:
                raise ValueError(f"{where}: missing closing {quote}")
            value = body[:end]
            trailer = body[end + 1:].strip()
            if trailer and not trailer.startswith("#"):
                raise ValueError(f"{where}: unexpected text after the closing quote")
            values[key] = _unquote_double(value, where) if quote == '"' else value
        else:
            value = re.split(r"\s+#", rest, maxsplit=1)[0].strip()
            if re.search(r"[\s\"'`$;&|<>()]", value):
                raise ValueError(f"{where}: unquoted value contains spaces or shell characters "
                                 "(quote it)")
            values[key] = value.replace("\\", "")
    return values


def _closing_quote(body, quote):
    i = 0
    while i < len(body):
        if quote == '"' and body[i] == "\\":
            i += 2
            continue
        if body[i] == quote:
            return i
        i += 1
    return None


def read_config_file(path):
    if os.fspath(path) == os.devnull:       # SNF_IMAGE_CONFIG=/dev/null: the built-in defaults
        return {}
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise SnfError(f"cannot read configuration file {path}: {exc.strerror}", 2) from None
    try:
        with open(fd, "rb", closefd=True) as handle:
            info = os.fstat(handle.fileno())
            if not stat.S_ISREG(info.st_mode):
                raise SnfError(f"configuration file {path} is not a regular file", 2)
            if info.st_size > 4 * MIB:
                raise SnfError(f"configuration file {path} is larger than 4 MiB", 2)
            text = handle.read().decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise SnfError(f"cannot read configuration file {path}: {exc}", 2) from None
    try:
        return parse_config_text(text, path)
    except ValueError as exc:
        raise SnfError(f"invalid configuration: {exc}", 2) from None


class Config:
    """The settings in effect plus the OS parameters pre-set by configuration files."""

    def __init__(self, values, raw):
        self._values = values
        self.raw = raw          # every KEY=value read from the files (OS parameters included)

    def __getattr__(self, name):
        try:
            return self._values[name]
        except KeyError:
            raise AttributeError(name) from None


def load_config(environ, variant=None, overrides=None):
    """Built-in defaults < configuration file < variant file < overrides (the
    builder's command-line options)."""
    explicit = environ.get("SNF_IMAGE_CONFIG")
    path = explicit or DEFAULT_CONFIG_FILE
    raw = {}
    file_values = read_config_file(path)
    if file_values is None and explicit:
        raise SnfError(f"configuration file {path} (SNF_IMAGE_CONFIG) does not exist", 2)
    raw.update(file_values or {})
    if variant:
        variants_dir = raw.get("VARIANTS_DIR") or SETTINGS_BY_NAME["VARIANTS_DIR"].default
        raw.update(read_variant_file(variants_dir, variant))
    raw.update(overrides or {})
    return finalize_config(raw)


def read_variant_file(variants_dir, variant):
    if not re.fullmatch(r"[A-Za-z0-9_.+-]+", variant) or variant.startswith("."):
        raise SnfError(f"invalid OS variant name {variant!r}", 2)
    if not os.path.isdir(variants_dir):
        raise SnfError(f"OS variants directory {variants_dir} does not exist", 2)
    path = os.path.join(variants_dir, variant + ".conf")
    values = read_config_file(path)
    if values is None:
        if variant in listed_variants():
            raise SnfError(f"published variant {variant!r} is missing its configuration file {path}", 2)
        raise SnfError(f"unofficial variant {variant!r} is not supported (no {path})", 2)
    return values


def listed_variants():
    for path in (OS_DIR / "variants.list", OS_DIR / "os-def" / "variants.list"):  # installed, repository
        try:
            lines = path.read_text().splitlines()
            break
        except OSError:
            continue
    else:
        return []
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


# Every key a configuration or variant file may set: the settings (the
# builder's included), the deprecated ones, and the OS parameters they may preset.
KNOWN_CONFIG_KEYS = frozenset(set(SETTINGS_BY_NAME) | set(DEPRECATED_SETTINGS)
                              | {name.upper() for name in OS_PARAMETERS})


def closest_key_hint(name):
    import difflib
    matches = difflib.get_close_matches(name, sorted(KNOWN_CONFIG_KEYS), n=1, cutoff=0.75)
    return f" (did you mean {matches[0]}?)" if matches else " (ignored)"


def finalize_config(raw):
    values = {}
    for setting in SETTINGS:
        text = raw.get(setting.name, "")
        if text == "":          # upstream's ${VAR:=default}: empty means default
            text = setting.default
        try:
            values[setting.name] = setting.convert(text)
        except ValueError as exc:
            raise SnfError(f"invalid configuration value {setting.name}={text!r}: {exc}", 2) from None
    for name, message in DEPRECATED_SETTINGS.items():
        if name in raw:
            warn(f"configuration: {message}")
    for name in sorted(raw.keys() - KNOWN_CONFIG_KEYS):
        warn(f"configuration: unknown key {name}{closest_key_hint(name)}")
    if values["IMAGE_SIGNATURE_REQUIRED"] and not values["IMAGE_KEYRING"]:
        raise SnfError("invalid configuration: IMAGE_SIGNATURE_REQUIRED=yes needs IMAGE_KEYRING", 2)
    return Config(values, raw)


# ---------------------------------------------------------------------------
# OS parameters: collection (precedence, set versus empty) and validation
# ---------------------------------------------------------------------------

def collect_parameters(environ, config, fetch_config_url=True):
    """{name: value} for every parameter that is *set* (possibly to "")."""
    params = {}
    for name in OS_PARAMETERS:
        if name.upper() in config.raw:
            params[name] = config.raw[name.upper()]
    for name in OS_PARAMETERS:
        key = "OSP_" + name.upper()
        if key in environ:
            params[name] = environ[key]
    if fetch_config_url and params.get("config_url"):
        params.update(fetch_config_url_params(params["config_url"], config.URL_TIMEOUT))
    return params


def fetch_config_url_params(url, timeout):
    if not re.match(r"https?://", url, re.IGNORECASE):
        raise SnfError("config_url must be an http:// or https:// URL", 2)
    if url_problem(url):
        raise SnfError(f"Invalid OS parameter config_url: {url_problem(url)}", 2)
    log(f"Downloading configuration parameters from: {redact_url(url)}")
    with UrlFetch(url, "config_url", timeout=timeout) as fetch:
        body = fetch.read(16 * MIB)
    return decode_config_document(body)


def load_json(text):
    """json.loads, with too deep a nesting (RecursionError) reported as invalid JSON."""
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError("nested too deeply") from None


def decode_config_document(body):
    """The config_url JSON: an object; keys case-insensitive; string values only."""
    try:
        document = load_json(body)
    except (ValueError, UnicodeDecodeError):
        raise SnfError("config_url document is not valid JSON") from None
    if not isinstance(document, dict):
        raise SnfError("config_url document must be a JSON object")
    params = {}
    for key, value in document.items():
        name = str(key).lower()
        if name not in OS_PARAMETERS:
            continue
        if not isinstance(value, str):
            raise SnfError(f"config_url document: the value of {name} must be a string "
                           "(encode JSON values such as img_properties as a string)")
        params[name] = value
    return params


PRODUCT_KEY_RE = re.compile(r"([a-zA-Z0-9]{5}-){4}[a-zA-Z0-9]{5}")
ANSWER_FILE_RE = re.compile(r"(https?|ftps?|file)://.+", re.IGNORECASE)
PROPERTY_NAME_RE = re.compile(r"[A-Za-z0-9_]+")


def _validate_properties(name, text):
    if text == "":
        return None
    try:
        value = load_json(text)
    except ValueError:
        return f"{name} is not valid JSON"
    if not isinstance(value, dict):
        return f"{name} must be a JSON object of property names to values"
    for key, item in value.items():
        if not PROPERTY_NAME_RE.fullmatch(key):
            return f"{name}: property name {key[:40]!r} may only contain letters, digits and _"
        if isinstance(item, (dict, list)) or item is None:
            return f"{name}: the value of property {key} must be a string, number or boolean"
    return None


def _validate_personality(text):
    if text == "":
        return None
    try:
        value = load_json(text)
    except ValueError:
        return "img_personality is not valid JSON"
    if not isinstance(value, list):
        return "img_personality must be a JSON list of {path, contents, owner, group, mode} objects"
    allowed = {"path", "contents", "owner", "group", "mode"}
    for index, entry in enumerate(value):
        where = f"img_personality entry {index}"
        if not isinstance(entry, dict):
            return f"{where} is not a JSON object"
        unknown = set(entry) - allowed
        if unknown:
            return f"{where}: unknown key {sorted(unknown)[0]!r} (allowed: contents, group, mode, owner, path)"
        path = entry.get("path")
        if not isinstance(path, str) or not path.startswith("/") or "\0" in path or path.rstrip("/") == "":
            return f"{where}: path must be an absolute file path"
        contents = entry.get("contents")
        if not isinstance(contents, str):
            return f"{where}: contents (base64) is missing"
        import base64
        import binascii
        try:
            base64.b64decode(contents, validate=True)
        except (binascii.Error, ValueError):
            return f"{where}: contents is not valid base64"
        for key in ("owner", "group"):
            if key in entry and not (isinstance(entry[key], str)
                                     and re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]*\$?", entry[key])):
                return f"{where}: {key} must be a user or group name"
        if "mode" in entry:
            mode = entry["mode"]
            if isinstance(mode, bool) or not isinstance(mode, int) or not 0 <= mode <= 0o7777:
                return f"{where}: mode must be an integer between 0 and 4095 (e.g. 420 for 0644)"
    return None


def url_problem(url):
    """Why `url` cannot be fetched (malformed IPv6 host, port out of range, no host), or None."""
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port                          # raises on a port outside 0-65535 or not a number
    except ValueError as exc:
        return f"malformed URL ({exc})"
    if not parts.hostname:
        return "URL without a host name"
    return None


def url_beside(url, suffix):
    """The URL of a file next to another one (its checksum, its signature): the suffix
    goes onto the path, before any query."""
    parts = urllib.parse.urlsplit(url)
    return urllib.parse.urlunsplit(parts._replace(path=parts.path + suffix))


PLAIN_PARAMETERS = ("img_id", "img_format", "config_url", "os_answer_file")


def validate_parameters(params, require_image=True):
    """Return a list of one-line problems (empty: valid). Secret values are never quoted."""
    problems = []
    for name, value in params.items():
        if re.search("[\ud800-\udfff]", value):        # os.environ's stand-ins for undecodable bytes
            problems.append(f"Invalid OS parameter {name}: not valid UTF-8")
        elif name in PLAIN_PARAMETERS and CONTROL_CHARACTERS.search(value):
            problems.append(f"Invalid OS parameter {name}: contains control characters")
    if problems:
        return problems
    has_config_url = bool(params.get("config_url"))
    if "config_url" in params and params["config_url"] != "":
        if not re.fullmatch(r"https?://[^\s/]+.*", params["config_url"], re.IGNORECASE):
            problems.append("Invalid OS parameter config_url: must be an http:// or https:// URL")
        elif url_problem(params["config_url"]):
            problems.append(f"Invalid OS parameter config_url: {url_problem(params['config_url'])}")
    if require_image and not has_config_url:
        for name in ("img_id", "img_format"):
            if not params.get(name):
                problems.append(f"Missing OS parameter: {name}")
    fmt = params.get("img_format")
    if fmt and fmt not in IMAGE_FORMATS:
        problems.append(f"Invalid OS parameter img_format: {fmt[:40]!r} "
                        "(valid values: diskdump, extdump, ntfsdump)")
    img_id = params.get("img_id")
    if img_id:
        problem = _validate_image_id(img_id, fmt)
        if problem:
            problems.append(problem)
    if "img_passwd" in params and "img_passwd_hash" in params:
        problems.append("Conflicting OS parameters img_passwd and img_passwd_hash: give only one")
    passwd_hash = params.get("img_passwd_hash")
    if passwd_hash and re.search(r"[:\s]", passwd_hash):
        problems.append("Invalid OS parameter img_passwd_hash: a password hash cannot contain ':' or spaces")
    if "\0" in params.get("img_passwd", ""):
        problems.append("Invalid OS parameter img_passwd: contains a NUL character")
    for name in ("img_properties", "inst_properties"):
        if name in params:
            problem = _validate_properties(name, params[name])
            if problem:
                problems.append("Invalid OS parameter " + problem)
    if "img_personality" in params:
        problem = _validate_personality(params["img_personality"])
        if problem:
            problems.append("Invalid OS parameter " + problem)
    if "cloud_userdata" in params and params["cloud_userdata"] != "":
        import base64
        import binascii
        try:
            base64.b64decode("".join(params["cloud_userdata"].split()), validate=True)
        except (binascii.Error, ValueError):
            problems.append("Invalid OS parameter cloud_userdata: not valid base64")
    if "os_product_key" in params and not PRODUCT_KEY_RE.fullmatch(params["os_product_key"]):
        problems.append("Invalid OS parameter os_product_key: expected XXXXX-XXXXX-XXXXX-XXXXX-XXXXX")
    answer_file = params.get("os_answer_file")
    if answer_file is not None and not ANSWER_FILE_RE.fullmatch(answer_file):
        problems.append("Invalid OS parameter os_answer_file: expected an http(s)://, ftp(s):// or file:// URL")
    elif answer_file and not answer_file.lower().startswith("file:") and url_problem(answer_file):
        problems.append(f"Invalid OS parameter os_answer_file: {url_problem(answer_file)}")
    if "\0" in params.get("auth_keys", ""):
        problems.append("Invalid OS parameter auth_keys: contains a NUL character")
    return problems


def _validate_image_id(img_id, fmt):
    if img_id == "null":
        if fmt and fmt != "diskdump":
            return "Invalid OS parameter img_id: null (keep the disk as it is) needs img_format diskdump"
        return None
    if re.match(r"(https?|ftps?)://", img_id, re.IGNORECASE):
        problem = url_problem(img_id)
        return f"Invalid OS parameter img_id: {problem}" if problem else None
    name = local_image_name(img_id)
    if name is None:
        return None     # maybe a site back-end's id (pithos://...)
    if name == "" or "\0" in name:
        return "Invalid OS parameter img_id: empty local image name"
    normalized = os.path.normpath(name)
    if name.startswith("/") or normalized == ".." or normalized.startswith("../"):
        return "Invalid OS parameter img_id: local image name points outside IMAGE_DIR"
    return None


# ---------------------------------------------------------------------------
# The Ganeti environment
# ---------------------------------------------------------------------------

class Disk:
    def __init__(self, index, path=None, uri=None):
        self.index, self.path, self.uri = index, path, uri

    @property
    def target(self):
        return self.path or self.uri


def check_api_version(environ):
    version = environ.get("OS_API_VERSION", "")
    if version != OS_API_VERSION:
        raise SnfError(f"unsupported OS API version {version!r}: only OS API version 20 is supported", 2)


def require_env(environ, *names):
    missing = [n for n in names if not environ.get(n)]
    if missing:
        raise SnfError("missing OS API variable: " + ", ".join(missing), 2)


def _is_disk_file(path):
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return False
    return stat.S_ISBLK(mode) or stat.S_ISREG(mode)


def instance_disks(environ):
    require_env(environ, "DISK_COUNT")
    try:
        count = int(environ["DISK_COUNT"])
    except ValueError:
        raise SnfError(f"invalid DISK_COUNT {environ['DISK_COUNT']!r}", 2) from None
    if count < 1:
        raise SnfError("at least one disk is needed (DISK_COUNT is 0)", 2)
    disks = []
    for index in range(count):
        path = environ.get(f"DISK_{index}_PATH") or None
        uri = environ.get(f"DISK_{index}_URI") or None
        if path and not _is_disk_file(path):
            if not uri:
                raise SnfError(f"disk {index}: {path} is neither a block device nor a regular file")
            path = None
        if not path and not uri:
            raise SnfError(f"disk {index}: Ganeti gave neither DISK_{index}_PATH nor DISK_{index}_URI", 2)
        disks.append(Disk(index, path, uri))
    return disks


@contextmanager
def disk_locks(disks, operation):
    """One deployment, import or export per disk at a time: an exclusive flock
    on each disk (the device node or file), held until the operation ends and
    refused at once, naming the disk, when another snf-image holds it. A few
    retries ride out udev, which locks a device for a moment while probing it."""
    fds = []
    try:
        for index, path in disks:
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
            except OSError as exc:
                raise SnfError(f"cannot open disk {index} ({path}) for {operation}: {exc.strerror}") from None
            fds.append(fd)
            for attempt in range(20):
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    time.sleep(0.1)
            else:
                raise SnfError(f"disk {index} ({path}) is in use by another snf-image deployment, import "
                               f"or export: {operation} refused")
        yield
    finally:
        for fd in fds:
            os.close(fd)


# ---------------------------------------------------------------------------
# Progress monitor (JSON messages as upstream)
# ---------------------------------------------------------------------------

class Monitor:
    """Sends the JSON progress messages to PROGRESS_MONITOR's stdin, else to the log.

    A monitor that dies (or never starts) must not stop the deployment.
    """

    def __init__(self, command, instance):
        self.process = None
        self.unsent = b""           # the rest of a line the pipe took only in part
        self.dropped = 0
        if command:
            try:
                self.process = subprocess.Popen(command + [instance], stdin=subprocess.PIPE,
                                                stdout=sys.stderr, close_fds=True)
            except OSError as exc:
                warn(f"cannot start the progress monitor {command[0]}: {exc.strerror}; "
                     "messages go to the log")
                return
            # a monitor that stops reading must not stall the deployment: its
            # pipe never blocks, and what it cannot take is dropped
            os.set_blocking(self.process.stdin.fileno(), False)
            try:
                fcntl.fcntl(self.process.stdin.fileno(), F_SETPIPE_SZ, MIB)
            except OSError:
                pass

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    def send(self, message_type, **fields):
        message = {"type": message_type, **fields, "timestamp": time.time()}
        line = json.dumps(message, separators=(",", ":")) + "\n"
        if self.process is not None:
            try:
                self._write(line.encode())
                return
            except (OSError, ValueError):
                warn("the progress monitor died; further messages go to the log")
                self._reap()
        log("[MONITOR] " + line.rstrip("\n"))

    def _write(self, data):
        fd = self.process.stdin.fileno()
        if self.unsent:
            self.unsent = self.unsent[self._write_some(fd, self.unsent):]
        if self.unsent:
            self._drop()
            return
        self.unsent = data[self._write_some(fd, data):]

    @staticmethod
    def _write_some(fd, data):
        try:
            return os.write(fd, data)
        except BlockingIOError:
            return 0

    def _drop(self):
        self.dropped += 1
        if self.dropped == 1:
            warn("the progress monitor does not read its input: progress messages are dropped")

    def info(self, text):
        log(text)
        self.send("image-info", messages=[text])

    def _reap(self):
        process, self.process = self.process, None
        try:
            process.stdin.close()
        except OSError:
            pass
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def close(self):
        if self.process is not None:
            self._reap()


class HelperProtocol:
    """Turns the helper's progress-port lines into image-helper JSON messages."""

    MAX_LINE = 512
    MAX_STDERR_LINES = 10
    MAX_LINES = 5000          # far more than any task set sends; a flood is cut off here

    def __init__(self, monitor):
        self.monitor = monitor
        self.pending = b""
        self.stderr_left = 0
        self.stderr_lines = []
        self.lines_seen = 0

    def feed(self, data):
        lines = (self.pending + data).split(b"\n")
        self.pending = lines.pop()
        for line in lines:
            self.lines_seen += 1
            if self.lines_seen > self.MAX_LINES:
                if self.lines_seen == self.MAX_LINES + 1:
                    warn(f"helper progress port: more than {self.MAX_LINES} lines; the rest is ignored")
                continue
            self.line(line[:self.MAX_LINE].decode("utf-8", "replace").rstrip("\r"))
        if len(self.pending) > self.MAX_LINE:
            warn("helper progress port: line longer than 512 characters ignored")
            self.pending = b""

    def finish(self):
        if self.pending:
            self.line(self.pending.decode("utf-8", "replace").rstrip("\r"))
            self.pending = b""
        if self.stderr_lines:
            self._flush_stderr()

    def _flush_stderr(self):
        self.monitor.send("image-helper", subtype="error", stderr="\n".join(self.stderr_lines) + "\n")
        self.stderr_lines = []
        self.stderr_left = 0

    def line(self, line):
        if self.stderr_left:
            self.stderr_lines.append(line)
            self.stderr_left -= 1
            if not self.stderr_left:
                self._flush_stderr()
            return
        text = line.strip()
        if not text:
            return
        command, _, rest = text.partition(":")
        if command == "TASK_START":
            self.monitor.send("image-helper", subtype="task-start", task=rest)
            log(f"helper: task {rest} started")
        elif command == "TASK_END":
            self.monitor.send("image-helper", subtype="task-end", task=rest)
        elif command == "WARNING":
            self.monitor.send("image-helper", subtype="warning", messages=[rest])
        elif command == "ERROR":
            self.monitor.send("image-helper", subtype="error", messages=[rest])
        elif command == "STDERR":
            count, _, first = rest.partition(":")
            if not count.isdigit() or not 1 <= int(count) <= self.MAX_STDERR_LINES:
                warn("helper progress port: malformed STDERR line ignored")
                return
            self.stderr_lines = [first]
            self.stderr_left = int(count) - 1
            if not self.stderr_left:
                self._flush_stderr()
        else:
            warn(f"helper progress port: unknown message {command[:40]!r} ignored")


# ---------------------------------------------------------------------------
# Subprocess helpers
# ---------------------------------------------------------------------------

@contextmanager
def killing_on_exit(process, grace=5.0):
    """Yield a Popen; whatever happens, it is gone (SIGTERM, then SIGKILL) afterwards."""
    try:
        yield process
    finally:
        if process.poll() is None:
            try:
                process.terminate()
                process.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            except ProcessLookupError:
                pass
        for stream in (process.stdin, process.stdout, process.stderr):
            if stream is not None:
                try:
                    stream.close()
                except OSError:
                    pass


def die_with_parent():
    """preexec_fn: SIGKILL when the deployer dies. Only for children that keep
    our credentials: qemu's -runas (setuid) clears this, so the helper VM relies
    on the work directory's guard instead."""
    import ctypes
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def run_captured(argv, *, timeout, not_found, pass_fds=()):
    """Run argv to completion with its output captured (stdin /dev/null). A
    missing program, one that cannot start or the timeout raises one line,
    starting with `not_found` or naming the program; the caller judges the
    exit status."""
    try:
        return subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True,
                              pass_fds=pass_fds, timeout=timeout, check=False)
    except FileNotFoundError:
        raise SnfError(not_found) from None
    except OSError as exc:
        raise SnfError(f"cannot run {argv[0]}: {exc.strerror}") from None
    except subprocess.TimeoutExpired:
        raise SnfError(f"{argv[0]} did not finish within {timeout} s") from None


def last_stderr_line(result, default=""):
    lines = result.stderr.decode("utf-8", "replace").strip().splitlines()
    return lines[-1] if lines else default


def run_program(argv, *, what, timeout=120, debug=False):
    if debug:
        log("running: " + shlex.join(argv))
    try:
        result = run_captured(argv, timeout=timeout, not_found=f"program {argv[0]} not found")
    except SnfError as exc:
        raise SnfError(f"{what}: {exc}") from None
    if result.returncode != 0:
        raise SnfError(f"{what}: {os.path.basename(argv[0])} failed (exit {result.returncode}): "
                       f"{last_stderr_line(result)}")
    return result.stdout.decode("utf-8", "replace")


# ---------------------------------------------------------------------------
# Image streams: readers that fill buffers, checksum, decompression
# ---------------------------------------------------------------------------

class CountingReader:
    """readinto() wrapper that checks the byte count against the announced size."""

    def __init__(self, raw, expected, description):
        self.raw, self.expected, self.description = raw, expected, description
        self.count = 0

    def readinto(self, buffer):
        n = self.raw.readinto(buffer) or 0
        self.count += n
        if n == 0 and self.expected is not None and self.count != self.expected:
            raise SnfError(f"{self.description}: stream ended after {self.count} of "
                           f"{self.expected} bytes (connection cut or image truncated)")
        if self.expected is not None and self.count > self.expected:
            raise SnfError(f"{self.description}: stream is longer than the announced {self.expected} bytes")
        return n

    def skip_hole(self):
        length = skip_hole(self.raw)
        self.count += length
        return length

    def at_hole(self):
        return at_hole(self.raw)


class HashingReader:
    def __init__(self, raw, algorithm, expected_hex, description):
        import hashlib
        self.raw = raw
        self.hash = hashlib.new(algorithm)
        self.algorithm, self.expected, self.description = algorithm, expected_hex.lower(), description

    def readinto(self, buffer):
        n = self.raw.readinto(buffer) or 0
        if n:
            self.hash.update(buffer[:n])
        elif self.hash.hexdigest() != self.expected:
            raise SnfError(f"{self.description}: {self.algorithm} checksum mismatch "
                           f"(got {self.hash.hexdigest()[:16]}..., expected {self.expected[:16]}...): "
                           "the disk now holds this bad image")
        return n

    def skip_hole(self):
        length = skip_hole(self.raw)
        zeros = memoryview(bytes(min(length, MIB)))
        for start in range(0, length, MIB):      # the hole is part of the checksummed image
            self.hash.update(zeros[:min(MIB, length - start)])
        return length

    def at_hole(self):
        return at_hole(self.raw)


class PeekReader(io.RawIOBase):
    """Lets the first bytes be inspected (compression magic) without losing them."""

    def __init__(self, raw):
        self.raw, self.head = raw, b""

    def readable(self):
        return True

    def peek(self, size):
        while len(self.head) < size:
            chunk = bytearray(size - len(self.head))
            n = self.raw.readinto(memoryview(chunk)) or 0
            if not n:
                break
            self.head += bytes(chunk[:n])
        return self.head[:size]

    def readinto(self, buffer):
        if self.head:
            n = min(len(buffer), len(self.head))
            buffer[:n] = self.head[:n]
            self.head = self.head[n:]
            return n
        return self.raw.readinto(buffer) or 0

    def skip_hole(self):
        return 0 if self.head else skip_hole(self.raw)

    def at_hole(self):
        return not self.head and at_hole(self.raw)


def skip_hole(reader):
    """Skip the hole (aligned run of zeros known without reading) at the reader's
    position and return its length; 0 when the reader is at data or knows no holes."""
    method = getattr(reader, "skip_hole", None)
    return method() if method else 0


def at_hole(reader):
    method = getattr(reader, "at_hole", None)
    return bool(method and method())


class HoleRegions:
    """A reader that knows, region by region, where runs of zeros lie: reads
    stop where one starts, skip_hole() steps over it without reading it.
    Subclasses set size, position, region_end and in_hole in _locate()."""

    def skip_hole(self):
        if not self.at_hole():
            return 0
        length = self.region_end - self.position
        self.position = self.region_end
        return length

    def at_hole(self):
        self._locate()
        return self.in_hole and self.position < self.size


class HoleSkippingFile(HoleRegions):
    """A local image file read front to back that knows its holes (SEEK_DATA/SEEK_HOLE)."""

    def __init__(self, file, size):
        self.fd, self.size = file.fileno(), size
        self.position = 0
        self.region_end = 0         # end of the data extent or hole that holds position
        self.in_hole = False

    def _locate(self):
        """Find the region holding position. Region ends are multiples of
        FILE_DIRECT_ALIGNMENT (but for the file's end), whatever the file
        system's block size, so that every skip and every read starts aligned."""
        if self.position < self.region_end or self.position >= self.size:
            return
        align = FILE_DIRECT_ALIGNMENT
        try:
            data = os.lseek(self.fd, self.position, os.SEEK_DATA)
        except OSError as exc:          # ENXIO: a hole up to the end; else: no hole information
            data = self.size if exc.errno == errno.ENXIO else self.position
            if exc.errno != errno.ENXIO:
                self.in_hole, self.region_end = False, self.size
                return
        hole_end = min(data, self.size) // align * align
        if hole_end > self.position:
            self.in_hole, self.region_end = True, hole_end
            return
        try:
            hole = os.lseek(self.fd, max(data, self.position), os.SEEK_HOLE)
        except OSError:
            hole = self.size
        self.in_hole, self.region_end = False, min(-(-hole // align) * align, self.size)

    def readinto(self, view):
        self._locate()
        if self.position >= self.size:
            return 0
        count = min(len(view), self.region_end - self.position)
        n = os.preadv(self.fd, [view[:count]], self.position)
        self.position += n
        return n


def _gzip_header(head):
    """A real gzip member starts with method 8 (deflate) and no reserved flag bits;
    a raw disk image that merely starts with 1f 8b is copied as it is."""
    return len(head) == 10 and head[2] == 8 and not head[3] & 0xE0


COMPRESSION_MAGIC = ((b"\x1f\x8b", "gzip"), (b"\xfd7zXZ\x00", "xz"), (b"BZh", "bzip2"),
                     (b"\x28\xb5\x2f\xfd", "zstd"))
# Each decompressor runs as its own process: decompression then overlaps with the
# download and with the disk writes, and xz -T0 uses every core on multi-block files.
DECOMPRESSORS = {"gzip": ("gzip", "-dc"), "xz": ("xz", "-dc", "-T0"), "bzip2": ("bzip2", "-dc"),
                 "zstd": ("zstd", "-dcq")}
DECOMPRESSOR_WARNING_EXIT = {"gzip": 2}      # "trailing garbage ignored"


@contextmanager
def decompressing(reader, description):
    """Yield (reader, compression name or None), decompressing by magic bytes.

    The reader yielded is a PeekReader: the caller can look at the image's
    own header (qcow2 and other container formats) whatever the compression.
    """
    peek = PeekReader(reader)
    head = peek.peek(6)
    for magic, name in COMPRESSION_MAGIC:
        if head.startswith(magic) and (name != "bzip2" or head[3:4] in b"123456789") \
                and (name != "gzip" or _gzip_header(peek.peek(10))):
            break
    else:
        yield peek, None
        return
    import shutil
    program = shutil.which(DECOMPRESSORS[name][0])
    if program:
        log(f"{description}: {name}-compressed image, decompressing with {os.path.basename(program)} "
            "while copying")
        with ProgramDecompressor(peek, [program, *DECOMPRESSORS[name][1:]], name, description) as stream:
            yield PeekReader(stream), name
        return
    log(f"{description}: {name}-compressed image, decompressing while copying")
    yield PeekReader(DecompressReader(_python_decompressor(peek, name), name, description)), name


def _python_decompressor(peek, name):
    """The standard library's decompressor, where the program is not installed."""
    buffered = io.BufferedReader(peek, buffer_size=MIB)
    if name == "gzip":
        import gzip
        return gzip.GzipFile(fileobj=buffered, mode="rb")
    if name == "xz":
        import lzma
        return lzma.LZMAFile(buffered)
    if name == "bzip2":
        import bz2
        return bz2.BZ2File(buffered)
    try:
        from compression import zstd        # Python 3.14
    except ImportError:
        raise SnfError("the image is zstd-compressed and the zstd program is not installed") from None
    return zstd.ZstdFile(buffered)


class ProgramDecompressor:
    """Decompresses in a child process: a feeder thread writes the compressed
    stream to its stdin while the copier reads its stdout. Errors of the
    compressed stream (truncated download, checksum) are raised at the end
    of the output, before the decompressor's own complaint about them."""

    def __init__(self, source, argv, name, description):
        import tempfile
        self.source, self.name, self.description = source, name, description
        self.error, self.ended = None, False
        self.stderr = tempfile.TemporaryFile()
        try:
            self.process = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                            stderr=self.stderr, bufsize=0)
        except OSError as exc:
            self.stderr.close()
            raise SnfError(f"cannot run {argv[0]}: {exc.strerror}") from None
        for pipe in (self.process.stdin, self.process.stdout):
            try:
                fcntl.fcntl(pipe.fileno(), F_SETPIPE_SZ, MIB)
            except OSError:
                pass
        self.feeder = threading.Thread(target=self._feed, name=f"{name}-feeder", daemon=True)
        self.feeder.start()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        with killing_on_exit(self.process, grace=1.0):
            pass
        self.process.stdout.close()
        self.feeder.join(timeout=5)
        self.stderr.close()

    def _feed(self):
        view = memoryview(bytearray(MIB))
        pipe = self.process.stdin
        try:
            while True:
                count = self.source.readinto(view)
                if not count:
                    break
                done = 0
                while done < count:
                    done += pipe.write(view[done:count])
        except (BrokenPipeError, ValueError):
            pass            # the decompressor stopped reading: its exit status tells why
        except BaseException as exc:     # raised by the reading thread at the end
            self.error = exc
        finally:
            try:
                pipe.close()
            except OSError:
                pass

    def readinto(self, buffer):
        if self.ended:
            return 0
        count = self.process.stdout.readinto(buffer)
        if count:
            return count
        self.ended = True
        self.feeder.join()
        code = self.process.wait()
        if self.error is not None:
            raise self.error
        if code not in (0, DECOMPRESSOR_WARNING_EXIT.get(self.name)):
            self.stderr.seek(0)
            lines = self.stderr.read().decode("utf-8", "replace").strip().splitlines() or [""]
            raise SnfError(f"{self.description}: corrupt {self.name} data: {lines[-1][:200]}")
        return 0


class DecompressReader:
    def __init__(self, stream, name, description):
        self.stream, self.name, self.description = stream, name, description

    def readinto(self, buffer):
        try:
            return self.stream.readinto(buffer)
        except SnfError:
            raise
        except Exception as exc:      # OSError, EOFError, LZMAError, BadGzipFile...
            raise SnfError(f"{self.description}: corrupt {self.name} data: {exc}") from None


def drain(reader):
    """Read a stream to its end (trailing bytes after a compressed image are ignored)."""
    scratch = memoryview(bytearray(MIB))
    while skip_hole(reader) or reader.readinto(scratch):
        pass


def fill_buffer(reader, view, stop_at_holes=False):
    """Read until the buffer is full or EOF (dd iflag=fullblock), or, with
    stop_at_holes, until a hole the reader can skip starts."""
    filled = 0
    size = len(view)
    while filled < size:
        try:
            n = reader.readinto(view[filled:])
        except OSError as exc:
            raise SnfError(f"read error on the input stream: {exc.strerror or exc}") from None
        if not n:
            break
        filled += n
        if stop_at_holes and filled < size and at_hole(reader):
            break
    return filled


# ---------------------------------------------------------------------------
# Image sources: built-in local / network / null and external back-ends
# ---------------------------------------------------------------------------

def local_image_name(img_id):
    """NAME for local://NAME, file://NAME and plain ids without ':'; None otherwise."""
    if img_id.startswith("local://"):
        return img_id[len("local://"):]
    if img_id.startswith("file://"):
        return img_id[len("file://"):]
    if ":" not in img_id:
        return img_id
    return None


class ImageSource:
    """An opened image: `size` (bytes or None) and `reader` (readinto)."""

    name = "?"
    size = None

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    def close(self):
        pass

    def finish(self):
        """Called after EOF: checks that the producer succeeded."""


class NullSource(ImageSource):
    name = "null"
    size = 0

    def __init__(self):
        self.reader = io.BytesIO(b"")


def available_memory():
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


# The checksum files looked for next to an image (NAME.sha256, URL.sha256, ...).
CHECKSUM_FILES = ((".sha256", "sha256"), (".md5sum", "md5"))


def checksum_digest(text, algorithm, where):
    """The digest a checksum file starts with (`sha256sum` output or a bare digest)."""
    token = (text.split() or [""])[0].lower()
    if not re.fullmatch(r"[0-9a-f]{%d}" % {"sha256": 64, "md5": 32}[algorithm], token):
        raise SnfError(f"checksum file {where} does not start with a {algorithm} digest")
    return token


class LocalSource(ImageSource):
    name = "local"

    def __init__(self, img_id, image_dir, image_format):
        name = local_image_name(img_id)
        if img_id.startswith("file://"):
            warn("image ids starting with file:// are deprecated, use local://")
        path = self.resolve(name, image_dir, image_format)
        self.path = path
        try:
            self.file = open(path, "rb", buffering=0)
        except OSError as exc:
            raise SnfError(f"cannot open image file {path}: {exc.strerror}") from None
        try:    # read once, front to back: the kernel doubles its read-ahead
            os.posix_fadvise(self.file.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)
        except OSError:
            pass
        self.size = os.fstat(self.file.fileno()).st_size
        if self.size == 0:
            self.file.close()
            raise SnfError(f"image file {path} is empty", 2)
        reader = HoleSkippingFile(self.file, self.size)
        checksum = self.find_checksum(path)
        self.checksum = None        # set when the checksum is still to be checked while reading
        if checksum and self.size <= available_memory() // 2:
            self.verify_first(*checksum)
        elif checksum:
            self.checksum = checksum
            algorithm, digest, checksum_path = checksum
            log(f"verifying the image against {checksum_path} while copying (too large to read twice "
                "from the page cache)")
            reader = HashingReader(reader, algorithm, digest, f"image {os.path.basename(path)}")
        self.reader = CountingReader(reader, self.size, f"image file {path}")

    def verify_first(self, algorithm, digest, checksum_path):
        """One extra read, before the disk is touched; the copy then reads from the page cache."""
        import hashlib
        log(f"verifying the image against {checksum_path} before writing")
        try:
            actual = hashlib.file_digest(self.file, algorithm).hexdigest()
            self.file.seek(0)
        except OSError as exc:
            raise SnfError(f"cannot read image file {self.path}: {exc.strerror}") from None
        if actual != digest:
            self.file.close()
            raise SnfError(f"image {os.path.basename(self.path)}: {algorithm} checksum mismatch against "
                           f"{checksum_path} (got {actual[:16]}..., expected {digest[:16]}...); "
                           "nothing was written")

    @staticmethod
    def resolve(name, image_dir, image_format):
        if not name:
            raise SnfError("empty local image name", 2)
        try:
            root = os.path.realpath(image_dir, strict=True)
        except OSError:
            raise SnfError(f"the IMAGE_DIR directory {image_dir} does not exist") from None
        candidates = [os.path.join(root, name)]
        if image_format:
            candidates.append(candidates[0] + "." + image_format)
        for index, candidate in enumerate(candidates):
            normalized = os.path.normpath(candidate)
            if not normalized.startswith(root.rstrip("/") + "/"):
                raise SnfError(f"image id {name[:60]!r} points to a file outside IMAGE_DIR {image_dir}", 2)
            if not os.path.lexists(candidate):
                continue
            real = os.path.realpath(candidate)
            if not real.startswith(root.rstrip("/") + "/"):
                raise SnfError(f"image {name[:60]!r} is a symbolic link to a file outside IMAGE_DIR {image_dir}", 2)
            if not os.path.isfile(real):
                raise SnfError(f"image {candidate} is not a regular file")
            if index:
                warn(f"the image id lacks the format extension: using {candidate}")
            return real
        raise SnfError(f"image file {candidates[0]} does not exist")

    @staticmethod
    def find_checksum(path):
        for suffix, algorithm in CHECKSUM_FILES:
            checksum_path = path + suffix
            try:
                text = Path(checksum_path).read_text(errors="replace")
            except FileNotFoundError:
                continue
            except OSError as exc:
                raise SnfError(f"cannot read checksum file {checksum_path}: {exc.strerror}") from None
            return algorithm, checksum_digest(text, algorithm, checksum_path), checksum_path
        return None

    def close(self):
        self.file.close()


class NetworkSource(ImageSource):
    name = "network"

    def __init__(self, url, timeout):
        self.url = url
        shown = redact_url(url)
        self.fetch = UrlFetch(url, "image", timeout=timeout, stream=True)
        self.size = self.fetch.size
        if self.size == 0:
            self.fetch.close()
            raise SnfError(f"image {shown} is empty (Content-Length 0)", 2)
        if self.size is None:
            warn(f"{shown}: the server did not announce the image size")
        self.reader = CountingReader(self.fetch, self.size, f"download of {shown}")
        try:
            checksum = self.find_checksum(url, timeout)
        except BaseException:
            self.fetch.close()
            raise
        if checksum:     # checked end to end, across resumed connections, while copying
            algorithm, digest, where = checksum
            log(f"verifying the download against {where} while copying")
            self.reader = HashingReader(self.reader, algorithm, digest, f"image {shown}")

    @staticmethod
    def find_checksum(url, timeout):
        """URL.sha256 or URL.md5sum when the server has one (a 4xx answer: none)."""
        for suffix, algorithm in CHECKSUM_FILES:
            where = redact_url(url) + suffix
            try:
                with UrlFetch(url_beside(url, suffix), "checksum file", timeout=timeout) as fetch:
                    text = fetch.read(4096).decode("utf-8", "replace")
            except SnfError as exc:
                if re.search(r": HTTP 4\d\d ", str(exc)):
                    continue
                raise
            return algorithm, checksum_digest(text, algorithm, where), where
        return None

    def close(self):
        self.fetch.close()


class ExternalSource(ImageSource):
    """An external source back-end: `-s ID` prints the size, `ID` streams the image."""

    def __init__(self, backend, img_id, debug=False):
        self.name = backend.name
        self.backend = backend
        size_text = run_program([backend.program, "-s", img_id],
                                what=f"source back-end {backend.name} (size)", debug=debug).strip()
        if not size_text.isdigit():
            raise SnfError(f"source back-end {backend.name}: -s printed {size_text[:30]!r}, not a size")
        self.size = int(size_text)
        try:
            self.process = subprocess.Popen([backend.program, img_id], stdin=subprocess.DEVNULL,
                                            stdout=subprocess.PIPE, bufsize=0)
        except OSError as exc:
            raise SnfError(f"cannot run source back-end {backend.program}: {exc.strerror}") from None
        self.reader = CountingReader(self.process.stdout, self.size, f"source back-end {backend.name}")

    def finish(self):
        code = self.process.wait()
        if code != 0:
            raise SnfError(f"source back-end {self.backend.name} failed (exit {code})")

    def close(self):
        with killing_on_exit(self.process):
            pass


class Backend:
    def __init__(self, name, priority, program=None, builtin=None):
        self.name, self.priority, self.program, self.builtin = name, priority, program, builtin

    def probe(self, ident):
        if self.builtin is not None:
            return self.builtin(ident)
        try:
            result = subprocess.run([self.program, "-p", ident], stdin=subprocess.DEVNULL,
                                    capture_output=True, timeout=60, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            warn(f"ignoring back-end {self.program} that could not be probed: {exc}")
            return False
        if result.returncode != 0:
            warn(f"ignoring back-end {self.program} that returned an error (rc={result.returncode})")
            return False
        return result.stdout.decode("utf-8", "replace").rstrip("\n") == "yes"


def _builtin_source_probes():
    return {
        "null": lambda ident: ident == "null",
        "network": lambda ident: re.match(r"(https?|ftps?)://", ident, re.IGNORECASE) is not None,
        "local": lambda ident: local_image_name(ident) is not None,
    }


BUILTIN_PRIORITIES = {"src": {"null": 30, "network": 20, "local": 10}, "dst": {"local": 10}}


def read_priority(config_dir, kind, name):
    path = os.path.join(config_dir, kind, name + ".priority")
    try:
        text = Path(path).read_text().strip()
    except OSError:
        return None
    if re.fullmatch(r"\d{1,2}", text):
        return int(text)
    warn(f"invalid priority {text[:10]!r} in {path}: using 50")
    return 50


def list_backends(config, kind, builtins):
    candidates = []
    for name, probe in builtins.items():
        candidates.append(Backend(name, BUILTIN_PRIORITIES[kind][name], builtin=probe))
    directory = os.path.join(config.BACKENDS_DIR, kind)
    try:
        entries = sorted(os.listdir(directory))
    except OSError:
        entries = []
    for entry in entries:
        if entry.startswith("."):
            continue
        path = os.path.join(directory, entry)
        program = os.path.join(path, entry) if os.path.isdir(path) else path
        candidates.append(Backend(entry, 50, program=program))
    selected = []
    for backend in candidates:
        if os.path.exists(os.path.join(config.BACKENDS_CONFIG_DIR, kind, backend.name + ".disabled")):
            log(f"not examining disabled back-end {kind}/{backend.name}")
            continue
        priority = read_priority(config.BACKENDS_CONFIG_DIR, kind, backend.name)
        if priority is not None:
            backend.priority = priority
        if backend.program and not os.access(backend.program, os.X_OK):
            warn(f"ignoring non-executable back-end {backend.program}")
            continue
        selected.append(backend)
    selected.sort(key=lambda b: (b.priority, b.name), reverse=True)
    return selected


def choose_backend(config, kind, ident, builtins, shown):
    for backend in list_backends(config, kind, builtins):
        if backend.probe(ident):
            return backend
    raise SnfError(f"no {'source' if kind == 'src' else 'destination'} back-end can handle {shown!r}")


def open_image_source(config, img_id, image_format):
    shown = redact_url(img_id)
    backend = choose_backend(config, "src", img_id, _builtin_source_probes(), shown)
    log(f"Using source back-end: {backend.name}")
    if backend.builtin is None:
        return ExternalSource(backend, img_id, config.IMAGE_DEBUG)
    if backend.name == "null":
        return NullSource()
    if backend.name == "network":
        source = NetworkSource(img_id, config.URL_TIMEOUT)
    else:
        source = LocalSource(img_id, config.IMAGE_DIR, image_format)
    if config.IMAGE_KEYRING:
        try:
            check_signature(config, source)
        except BaseException:
            source.close()
            raise
    return source


def check_signature(config, source):
    """A detached OpenPGP signature next to the image (NAME.sig, URL.sig), checked
    with gpgv against IMAGE_KEYRING: a local image before the copy, a download
    while it is copied (its failure then says what the disk holds)."""
    if isinstance(source, LocalSource):
        signature_path = source.path + ".sig"
        if not os.path.isfile(signature_path):
            return _missing_signature(config, signature_path)
        log(f"verifying the image's signature {signature_path} before writing")
        _run_gpgv(config, [signature_path, source.path], "nothing was written")
        return None
    if isinstance(source, NetworkSource):
        try:
            with UrlFetch(url_beside(source.url, ".sig"), "image signature", timeout=config.URL_TIMEOUT) as fetch:
                signature = fetch.read(MIB)
        except SnfError as exc:
            if "HTTP 404" not in str(exc):
                raise
            return _missing_signature(config, redact_url(source.url) + ".sig")
        log("verifying the image's signature while copying")
        checking = SignatureCheckingReader(config, source.reader, signature)
        close_download = source.close

        def close():
            checking.close()
            close_download()
        source.reader, source.finish, source.close = checking, checking.finish, close
        return None
    return _missing_signature(config, f"a signature for source back-end {source.name}")


def _missing_signature(config, where):
    if config.IMAGE_SIGNATURE_REQUIRED:
        raise SnfError(f"the image has no signature ({where}) and IMAGE_SIGNATURE_REQUIRED is yes; "
                       "nothing was written", 2)
    log(f"the image is not signed ({where} absent)")


def _run_gpgv(config, arguments, consequence):
    with private_gnupg_home() as home:
        argv = config.GPGV + ["--homedir", home, "--keyring", os.path.abspath(config.IMAGE_KEYRING), *arguments]
        result = run_captured(argv, timeout=600,
                              not_found=f"program {argv[0]} not found (needed for IMAGE_KEYRING)")
    if result.returncode != 0:
        reason = last_stderr_line(result, "no message").removeprefix("gpgv: ")
        raise SnfError(f"the image's signature does not verify against IMAGE_KEYRING "
                       f"({reason}); {consequence}")


@contextmanager
def private_gnupg_home():
    import shutil
    import tempfile
    home = tempfile.mkdtemp(prefix="snf-image-gnupg-")
    try:
        yield home
    finally:
        shutil.rmtree(home, ignore_errors=True)


class SignatureCheckingReader:
    """Passes a download through to the copy and to `gpgv SIG -`; finish() has the verdict."""

    def __init__(self, config, raw, signature):
        import tempfile
        self.config, self.raw = config, raw
        self.signature_file = tempfile.NamedTemporaryFile(prefix="snf-image-sig-")
        self.signature_file.write(signature)
        self.signature_file.flush()
        self.home = tempfile.mkdtemp(prefix="snf-image-gnupg-")
        argv = config.GPGV + ["--homedir", self.home, "--keyring", os.path.abspath(config.IMAGE_KEYRING),
                              self.signature_file.name, "-"]
        try:
            self.process = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                            stderr=subprocess.PIPE)
        except OSError as exc:
            raise SnfError(f"cannot run {argv[0]}: {exc.strerror}") from None

    def readinto(self, buffer):
        count = self.raw.readinto(buffer)
        if count:
            try:
                self.process.stdin.write(buffer[:count])
            except OSError:
                pass                        # gpgv gave up: finish() reports it
        return count

    def close(self):
        import shutil
        with killing_on_exit(self.process, grace=1.0):
            pass
        self.signature_file.close()
        shutil.rmtree(self.home, ignore_errors=True)

    def finish(self):
        stdin, self.process.stdin = self.process.stdin, None
        try:
            stdin.close()
        except OSError:
            pass
        try:
            _, errors = self.process.communicate(timeout=600)
        except subprocess.TimeoutExpired:
            errors = b"gpgv did not finish"
        finally:
            self.close()
        if self.process.returncode != 0:
            lines = errors.decode("utf-8", "replace").strip().splitlines() or ["no message"]
            raise SnfError(f"the image's signature does not verify against IMAGE_KEYRING "
                           f"({lines[-1].removeprefix('gpgv: ')}): the disk now holds this unverified image")


# ---------------------------------------------------------------------------
# Destinations and the O_DIRECT copier
# ---------------------------------------------------------------------------

class DiskWriter:
    """A block device or regular file opened for O_DIRECT writing (never truncated)."""

    def __init__(self, path, allow_grow=False):
        self.path = path
        try:
            info = os.stat(path)
        except OSError as exc:
            raise SnfError(f"cannot use disk {path}: {exc.strerror}") from None
        self.is_block = stat.S_ISBLK(info.st_mode)
        if not (self.is_block or stat.S_ISREG(info.st_mode)):
            raise SnfError(f"disk {path} is neither a block device nor a regular file")
        flags = os.O_WRONLY | os.O_CLOEXEC
        self.direct = True
        try:
            self.fd = os.open(path, flags | os.O_DIRECT)
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise SnfError(f"cannot open disk {path} for writing: {exc.strerror}") from None
            warn(f"{path}: O_DIRECT is not supported here, writing through the page cache")
            self.direct = False
            self.fd = os.open(path, flags)
        if self.is_block:
            self.size = _block_device_size(self.fd)
            self.alignment = _logical_block_size(self.fd)
        else:
            self.size = None if allow_grow else info.st_size
            self.alignment = FILE_DIRECT_ALIGNMENT
        self.position = 0
        self.zeroing_lock = threading.Lock()
        self.zeroers = None         # the ways to zero a range on this disk, cheapest first

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    def close(self):
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def write(self, view, count):
        """Write count bytes of view at the current position (page-aligned buffer)."""
        if self.size is not None and self.position + count > self.size:
            raise SnfError(f"the image does not fit on disk {self.path}: it is larger than the "
                           f"disk ({self.size} bytes)")
        tail = count % self.alignment if self.direct else 0
        aligned = count - tail
        self._write_all(view, 0, aligned)
        if tail:
            # GNU dd: the last short block is written without O_DIRECT.
            fcntl.fcntl(self.fd, fcntl.F_SETFL, fcntl.fcntl(self.fd, fcntl.F_GETFL) & ~os.O_DIRECT)
            self.direct = False
            self._write_all(view, aligned, count)

    def seek(self, offset):
        self.position = offset      # every write is a pwrite() at self.position

    def write_at(self, view, count, offset):
        """pwrite() a full, aligned buffer at offset (thread-safe: no shared file position)."""
        if self.size is not None and offset + count > self.size:
            raise SnfError(f"the image does not fit on disk {self.path}: it is larger than the "
                           f"disk ({self.size} bytes)")
        self._pwrite_all(view, 0, count, offset)

    def _write_all(self, view, start, end):
        self._pwrite_all(view, start, end, self.position)
        self.position += end - start

    def _pwrite_all(self, view, start, end, offset):
        """Write view[start:end] at disk offset `offset`, retrying partial writes."""
        done = start
        while done < end:
            at = offset + done - start
            try:
                written = os.pwrite(self.fd, view[done:end], at)
            except OSError as exc:
                if exc.errno == errno.ENOSPC:
                    raise SnfError(f"disk {self.path} is full at byte {at} "
                                   "(the image is larger than the disk)") from None
                raise SnfError(f"write error on disk {self.path} at byte {at}: "
                               f"{exc.strerror}") from None
            if written <= 0:
                raise SnfError(f"short write on disk {self.path} at byte {at}")
            done += written

    def zero_range(self, offset, length):
        """Make [offset, offset + length) read as zeros by the cheapest correct means
        for this disk (decided at the first range, logged once); aligned ranges only."""
        if self.size is not None and offset + length > self.size:
            raise SnfError(f"the image does not fit on disk {self.path}: it is larger than the "
                           f"disk ({self.size} bytes)")
        with self.zeroing_lock:
            if self.zeroers is None:
                self.zeroers = self._zeroing_means()
            while True:
                name, zero, proven = self.zeroers[0]
                try:
                    zero(offset, length)
                except OSError as exc:
                    if len(self.zeroers) == 1 or exc.errno not in (
                            errno.EOPNOTSUPP, errno.ENOTTY, errno.EINVAL, errno.ENOSYS, errno.EIO):
                        raise SnfError(f"cannot zero {length} bytes at byte {offset} of disk "
                                       f"{self.path}: {exc.strerror}") from None
                    log(f"disk {self.path}: {name} failed ({exc.strerror}), trying the next means")
                    self.zeroers.pop(0)
                    continue
                if not proven and not self._reads_zeros(offset, length):
                    warn(f"disk {self.path}: {name} left old data behind: writing zeros instead")
                    self.zeroers.pop(0)
                    continue
                if not getattr(self, "zeroing_logged", False):
                    self.zeroing_logged = True
                    log(f"disk {self.path}: the image's zero ranges are skipped and zeroed by {name}")
                return

    def _zeroing_means(self):
        """(name, function, proven): proven means reads of the range are guaranteed to
        return zeros afterwards; a means that is not is checked by reading a sample back."""
        means = []
        if self.is_block:
            means.append(("BLKZEROOUT", self._zero_out, True))
            if _discard_zeroes_data(self.fd):
                means.append(("BLKDISCARD", self._discard, False))
        else:
            means.append(("fallocate hole punching", self._punch_hole, True))
        means.append(("writing zeros", self._write_zeros, True))
        return means

    def _zero_out(self, offset, length):
        fcntl.ioctl(self.fd, BLKZEROOUT, struct.pack("QQ", offset, length))

    def _discard(self, offset, length):
        fcntl.ioctl(self.fd, BLKDISCARD, struct.pack("QQ", offset, length))

    def _punch_hole(self, offset, length):
        fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)

    def _write_zeros(self, offset, length):
        with mmap.mmap(-1, min(length, MIB)) as zeros, memoryview(zeros) as view:
            for start in range(offset, offset + length, len(view)):
                count = min(len(view), offset + length - start)
                self._pwrite_all(view, 0, count, start)

    def _reads_zeros(self, offset, length):
        """Read back the first, middle and last block of the range, bypassing the cache."""
        block = max(self.alignment, FILE_DIRECT_ALIGNMENT)
        if length < block:
            return True
        fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC | (os.O_DIRECT if self.direct else 0))
        try:
            with mmap.mmap(-1, block) as buffer, memoryview(buffer) as view:
                middle = offset + (length // 2) // block * block
                for at in (offset, middle, offset + length - block):
                    if os.preadv(fd, [view], at) != block or buffer[:] != bytes(block):
                        return False
        finally:
            os.close(fd)
        return True

    def sync(self):
        try:
            os.fsync(self.fd)
        except OSError as exc:
            raise SnfError(f"cannot flush disk {self.path}: {exc.strerror}") from None
        if not self.is_block:
            return
        try:
            os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_DONTNEED)
        except OSError:
            pass


class BackendWriter:
    """An external destination back-end reading the image on its stdin."""

    def __init__(self, backend, target):
        self.path = backend.name
        self.backend = backend
        self.size = None
        self.alignment = 1
        self.position = 0
        try:
            self.process = subprocess.Popen([backend.program, target], stdin=subprocess.PIPE,
                                            stdout=sys.stderr, bufsize=0)
        except OSError as exc:
            raise SnfError(f"cannot run destination back-end {backend.program}: {exc.strerror}") from None

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        with killing_on_exit(self.process):
            pass

    def write(self, view, count):
        try:
            self.process.stdin.write(view[:count])
        except BrokenPipeError:
            raise SnfError(f"destination back-end {self.backend.name} stopped reading "
                           f"(exit {self.process.wait()})") from None
        self.position += count

    def sync(self):
        self.process.stdin.close()
        code = self.process.wait()
        if code != 0:
            raise SnfError(f"destination back-end {self.backend.name} failed (exit {code})")


def _block_device_size(fd):
    try:
        return struct.unpack("Q", fcntl.ioctl(fd, BLKGETSIZE64, bytes(8)))[0]
    except OSError:
        return os.lseek(fd, 0, os.SEEK_END)


def _discard_zeroes_data(fd):
    """The block queue's promise that discarded blocks read as zeros (0 on every Linux
    since 4.12: discard then never replaces BLKZEROOUT)."""
    rdev = os.fstat(fd).st_rdev
    path = f"/sys/dev/block/{os.major(rdev)}:{os.minor(rdev)}/queue/discard_zeroes_data"
    try:
        return Path(path).read_text().strip() == "1"
    except OSError:
        return False


def fallocate(fd, mode, offset, length):
    """fallocate(2) with a mode (os.posix_fallocate has none: no hole punching)."""
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    libc.fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
    if libc.fallocate(fd, mode, offset, length) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


def _logical_block_size(fd):
    try:
        return max(512, struct.unpack("i", fcntl.ioctl(fd, BLKSSZGET, bytes(4)))[0])
    except OSError:
        return FILE_DIRECT_ALIGNMENT


class CopyProgress:
    def __init__(self, monitor, total, interval, label, skip=0):
        self.monitor, self.total, self.interval, self.label = monitor, total, interval, label
        self.skip = skip        # bytes written before the image (the synthesized MBR)
        self.started = self.last = time.monotonic()

    def update(self, position, final=False):
        now = time.monotonic()
        if not final and now - self.last < self.interval:
            return
        position = max(0, position - self.skip)
        self.last = now
        total = self.total or 0
        percent = float("%2.2f" % (position * 100 / total)) if total else 0.0
        if self.monitor is not None:
            self.monitor.send("image-copy-progress", total=total, position=position, progress=percent)
        rate = position / max(now - self.started, 1e-6) / MIB
        of_total = f" of {human_size(total)} ({percent:.1f}%)" if total else ""
        log(f"{self.label}: {human_size(position)}{of_total}, {rate:.0f} MiB/s")


def copy_buffer(size):
    """A page-aligned anonymous buffer for O_DIRECT, on transparent huge pages
    when the kernel gives them (THP "always" or "madvise"; else plain pages).

    A 4 MiB buffer is then 2 physically contiguous 2 MiB pages instead of 1024
    scattered 4 KiB ones: an O_DIRECT write pins 2 pages and becomes one
    block request where 4 KiB pages need several (virtio-blk takes at most
    254 segments per request), and reading into it misses the TLB less.
    Private, not shared: nothing else maps it.
    """
    buffer = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        buffer.madvise(mmap.MADV_HUGEPAGE)
    except (AttributeError, OSError):       # no THP in this kernel or Python build
        pass
    return buffer


def copy_stream(reader, writer, buffer_size, progress=None, overlap=True, prefix=b"", writers=1,
                sparse=False):
    """Copy reader → writer in full, aligned buffers; returns the byte count.

    With overlap, writer threads write the buffers the calling thread reads
    (the syscalls release the GIL): one keeps the order of a plain stream;
    with writers > 1 (disks only) that many keep several O_DIRECT pwrite()s in
    flight at their own offsets, like qemu-img convert -W, so the device queue
    never runs dry. With sparse (disks only), holes the reader knows are not
    read and all-zero runs are not written: the disk zeroes those ranges by
    its cheapest means instead. The unaligned tail is written last, alone
    (it clears O_DIRECT on the fd).
    """
    total = 0
    if prefix:
        with mmap.mmap(-1, -(-len(prefix) // 4096) * 4096) as buffer:
            with memoryview(buffer) as view:
                view[:len(prefix)] = prefix
                writer.write(view, len(prefix))
        total += len(prefix)
    positional = hasattr(writer, "write_at")
    sparse = sparse and positional and hasattr(writer, "zero_range")
    threads = writers if positional else 1
    # with one writer two buffers, not more: one being written while the next is read; a
    # third lets the reader run further ahead, so the data a write copies is colder in the
    # CPU caches (2 beat 3 by 1-20 % on a loop device and on a file, against dd)
    count = 1 if not overlap else 2 if threads == 1 else threads + 2
    views = [memoryview(copy_buffer(buffer_size)) for _ in range(count)]
    tails = []
    try:
        scanner = ZeroScanner() if sparse else None
        if overlap:
            end = _threaded_copy(reader, writer, views, threads, scanner, tails, progress, total, sparse)
        else:
            sink = _BlockSink(writer, scanner, tails)
            end = total
            for offset, view, length in _image_blocks(reader, lambda: views[0], total, sparse):
                sink.put(offset, view, length)
                end = offset + length
                if progress:
                    progress.update(end)
            sink.flush()
        for offset, data in tails:
            writer.seek(offset)         # pwrite() left the file position where it was
            writer.write(data, len(data))
        if progress:
            progress.update(end)
        return end
    finally:
        for view in views:
            buffer = view.obj
            view.release()
            try:
                buffer.close()
            except BufferError:
                pass


def _image_blocks(reader, next_view, offset, holes):
    """(offset, view, count) in image order; view None: a hole of count bytes, not read."""
    while True:
        hole = skip_hole(reader) if holes else 0
        if hole:
            yield offset, None, hole
            offset += hole
            continue
        view = next_view()
        if view is None:
            return
        count = fill_buffer(reader, view, stop_at_holes=holes)
        yield offset, view, count
        offset += count
        if count < len(view) and not (holes and at_hole(reader)):
            return


def _threaded_copy(reader, writer, views, threads, scanner, tails, progress, start, holes):
    """The calling thread reads blocks in order; `threads` writer threads write them."""
    free, work = queue.Queue(), queue.Queue()
    for view in views:
        free.put(view)
    errors = []

    def write_blocks():
        sink = _BlockSink(writer, scanner, tails)
        while True:
            item = work.get()
            if item is None:
                break
            offset, view, count = item
            try:
                if not errors:
                    sink.put(offset, view, count)
            except BaseException as exc:       # re-raised by the calling thread
                errors.append(exc)
            if view is not None:
                free.put(view)
        try:
            if not errors:
                sink.flush()
        except BaseException as exc:
            errors.append(exc)

    workers = [threading.Thread(target=write_blocks, name=f"disk-writer-{n}", daemon=True)
               for n in range(threads)]
    for worker in workers:
        worker.start()
    end = start
    try:
        for offset, view, count in _image_blocks(reader, free.get, start, holes):
            work.put((offset, view, count))
            end = offset + count
            if progress:
                progress.update(end)
            if errors:
                break
    finally:
        for _ in workers:
            work.put(None)
        for worker in workers:
            worker.join()
    if errors:
        raise errors[0]
    return end


class ZeroScanner:
    """Splits a copy buffer into data and all-zero runs of ZERO_CHUNK bytes.

    libc memcmp of a run against itself shifted by one byte: a run whose first
    byte is 0 and that equals its shift is all zeros. One pass at memory speed,
    no zero buffer, the GIL released. The first bytes of all runs are fetched
    in one strided copy: a buffer of dense data is told from them alone, in a
    few microseconds (memoryview == compares item by item, 50 times slower
    than memcmp on zeros).
    """

    def __init__(self):
        import ctypes
        self.ctypes = ctypes
        self.memcmp = ctypes.CDLL(None).memcmp
        self.memcmp.argtypes = (ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t)
        self.memcmp.restype = ctypes.c_int

    def _address(self, view):
        anchor = self.ctypes.c_char.from_buffer(view)
        address = self.ctypes.addressof(anchor)
        del anchor                      # releases the export: the buffer can be closed later
        return address

    def _is_zero(self, view, address, start, end):
        return view[start] == 0 and self.memcmp(address + start, address + start + 1, end - start - 1) == 0

    def runs(self, view, count):
        """[(start, end, is_data)] covering view[:count], neighbours of a kind merged."""
        firsts = view[:count:ZERO_CHUNK].tobytes()     # the first byte of every run, in one call
        if 0 not in firsts:
            return [(0, count, True)]
        address = self._address(view)
        if self._is_zero(view, address, 0, count):
            return [(0, count, False)]
        runs = []
        for index, start in enumerate(range(0, count, ZERO_CHUNK)):
            end = min(start + ZERO_CHUNK, count)
            data = firsts[index] != 0 or not self._is_zero(view, address, start, end)
            if runs and runs[-1][2] == data:
                runs[-1] = (runs[-1][0], end, data)
            else:
                runs.append((start, end, data))
        return runs


class _BlockSink:
    """Writes the blocks one writer thread is given: data at its offset; with a
    scanner, zero runs and holes merged into ranges the disk zeroes; the
    unaligned tail set aside in `tails` to be written last."""

    MAX_ZERO_RANGE = 1024 * MIB         # one zeroing call stays short and interruptible

    def __init__(self, writer, scanner, tails):
        self.writer, self.scanner, self.tails = writer, scanner, tails
        self.positional = hasattr(writer, "write_at")
        self.alignment = getattr(writer, "alignment", 1)
        self.pending = None             # (offset, length) to zero

    def put(self, offset, view, count):
        if view is None:
            self._zeros(offset, count)
            return
        if not count:
            return
        if not self.positional:
            self.writer.write(view, count)
            return
        aligned = count - count % self.alignment
        if self.scanner and aligned:
            for start, end, data in self.scanner.runs(view, aligned):
                if data:
                    self.writer.write_at(view[start:end], end - start, offset + start)
                else:
                    self._zeros(offset + start, end - start)
        elif aligned:
            self.writer.write_at(view, aligned, offset)
        if aligned < count:
            self.tails.append((offset + aligned, bytes(view[aligned:count])))

    def _zeros(self, offset, length):
        if self.pending and sum(self.pending) == offset and self.pending[1] < self.MAX_ZERO_RANGE:
            self.pending = (self.pending[0], self.pending[1] + length)
            return
        self.flush()
        self.pending = (offset, length)

    def flush(self):
        if self.pending:
            self.writer.zero_range(*self.pending)
            self.pending = None


# ---------------------------------------------------------------------------
# Disk images in qemu's formats (qcow2, vmdk, vdi, vhdx, qed, vpc)
# ---------------------------------------------------------------------------

QEMU_HEADER_PEEK = 512
QEMU_IMAGE_MAGIC = ((0, b"QFI\xfb", "qcow2"), (0, b"KDMV", "vmdk"), (0, b"# Disk DescriptorFile", "vmdk"),
                    (0x40, b"\x7f\x10\xda\xbe", "vdi"), (0, b"vhdxfile", "vhdx"), (0, b"QED\x00", "qed"),
                    (0, b"conectix", "vpc"))
QCOW2_INCOMPAT_DATA_FILE = 1 << 2
QCOW2_AUTOCLEAR_DATA_FILE_RAW = 1 << 1
QCOW2_EXT_DATA_FILE = 0x44415441
QEMU_FORMATS_WITH_BACKING = ("qcow2", "qed", "vmdk")
QEMU_CHECK_OK = (0, 3, 63)          # clean, leaked clusters only, format has no check


def qemu_image_format(head):
    """The qemu format named by the image's header (never by its name), or None for raw."""
    for offset, magic, name in QEMU_IMAGE_MAGIC:
        if head[offset:offset + len(magic)] == magic:
            return name
    return None


def check_qemu_image_header(fd, kind, size, shown):
    """Refuse, from our own reading of the header and before qemu-img opens the file,
    an image that would make qemu read another file: a backing file, an external
    data file, VMDK extents elsewhere. Returns nothing; raises SnfError."""
    def read(offset, length):
        data = os.pread(fd, length, offset)
        if len(data) < length:
            raise SnfError(f"{shown}: truncated {kind} image (header cut at byte {offset + len(data)})")
        return data

    def refuse(why):
        raise SnfError(f"{shown}: {kind} image refused: {why}", 2)

    if kind == "qcow2":
        version, backing_offset, backing_size, cluster_bits, _, crypt = struct.unpack(
            ">IQIIQI", read(4, 32))
        if version not in (2, 3):
            refuse(f"qcow version {version} is not supported (only qcow2 versions 2 and 3)")
        if backing_offset or backing_size:
            refuse("it has a backing file (it would make qemu-img read another file)")
        if crypt:
            refuse("it is encrypted")
        if not 9 <= cluster_bits <= 21:
            raise SnfError(f"{shown}: corrupt qcow2 header (cluster_bits {cluster_bits})")
        header_length = 72
        if version == 3:
            incompatible, _, autoclear, _, header_length = struct.unpack(">QQQII", read(72, 32))
            if incompatible & QCOW2_INCOMPAT_DATA_FILE or autoclear & QCOW2_AUTOCLEAR_DATA_FILE_RAW:
                refuse("its data is in an external data file")
        cluster = read(0, min(1 << cluster_bits, size))
        position = header_length
        while position + 8 <= len(cluster):     # header extensions end within the first cluster
            kind_code, length = struct.unpack(">II", cluster[position:position + 8])
            if kind_code == 0:
                break
            if kind_code == QCOW2_EXT_DATA_FILE:
                refuse("its header names an external data file")
            position += 8 + -(-length // 8) * 8
    elif kind == "vmdk":
        if read(0, 4) != b"KDMV":
            refuse("a VMDK descriptor file keeps the data in other files: only single-file "
                   "(monolithicSparse or streamOptimized) VMDK images are accepted")
        capacity, _, descriptor_sector, descriptor_sectors = struct.unpack("<QQQQ", read(12, 32))
        if capacity == 0:
            refuse("its layout is given by a descriptor, which may name other files")
        if descriptor_sector:
            text = read(descriptor_sector * 512, min(descriptor_sectors * 512, 65536))
            text = text.split(b"\0", 1)[0].decode("ascii", "replace")
            extents = re.findall(r"(?m)^\s*(?:RW|RDONLY|NOACCESS)\s+\d+\s+(\w+)", text)
            parent = re.search(r'(?m)^\s*parentCID\s*=\s*"?([0-9a-fA-F]+)', text)
            if "parentFileNameHint" in text or (parent and parent.group(1).lower() != "ffffffff"):
                refuse("it has a parent image (it would make qemu-img read another file)")
            if len(extents) > 1 or any(extent != "SPARSE" for extent in extents):
                refuse("its descriptor names extents in other files")
    elif kind == "qed":
        features, = struct.unpack("<Q", read(16, 8))
        _, backing_size = struct.unpack("<II", read(56, 8))
        if features & 1 or backing_size:
            refuse("it has a backing file (it would make qemu-img read another file)")
    elif kind == "vpc":
        disk_type, = struct.unpack(">I", read(60, 4))
        if disk_type == 4:
            refuse("it is a differencing disk (it has a parent)")
    elif kind == "vdi":
        image_type, = struct.unpack("<I", read(0x4C, 4))
        if image_type == 4:
            refuse("it is a differencing image (it has a parent)")
    # vhdx: qemu refuses images with a parent itself, without opening it


def qemu_image_name(kind, fd):
    """qemu's name for the already opened, already checked image file: the descriptor
    (same inode as the one checked), the format fixed, backing files forbidden."""
    options = {"driver": kind, "file": {"driver": "file", "filename": f"/proc/self/fd/{fd}"}}
    if kind in QEMU_FORMATS_WITH_BACKING:
        options["backing"] = None
    return "json:" + json.dumps(options)


def _run_qemu_img(config, arguments, fd, shown, kind, ok=(0,)):
    """qemu-img reading the image through descriptor `fd`. An exit status not
    in `ok` means a corrupt image, told with qemu-img's last message (cut to
    300 characters: it may quote the image's JSON name whole)."""
    try:
        result = run_captured([*config.QEMU_IMG, *arguments], timeout=600, pass_fds=(fd,),
                              not_found=f"program {config.QEMU_IMG[0]} not found (QEMU_IMG)")
    except SnfError as exc:
        raise SnfError(f"{shown}: {exc}") from None
    if result.returncode not in ok:
        raise SnfError(f"{shown}: corrupt {kind} image: {last_stderr_line(result)[:300]}")
    return result


class MappedImageFile(HoleRegions):
    """The guest view of a qemu-format image file, read front to back through
    its map: [(guest offset, length, file offset, or None for zeros)], in
    order, without gaps, neighbours merged. Like HoleSkippingFile, reads stop
    where a run of zeros starts and skip_hole() steps over it unread; region
    ends are multiples of FILE_DIRECT_ALIGNMENT (but for the image's end), so
    the zeros at the edges of a run are filled in, not skipped."""

    def __init__(self, fd, extents, size, shown):
        self.fd, self.size, self.shown = fd, size, shown
        self.extents = extents
        self.starts = [start for start, _, _ in extents]
        align = FILE_DIRECT_ALIGNMENT
        self.holes = [(-(-start // align) * align, (start + length) // align * align)
                      for start, length, file_offset in extents if file_offset is None]
        self.holes = [(first, end) for first, end in self.holes if end > first]
        self.hole_starts = [first for first, _ in self.holes]
        self.position = 0
        self.region_end = 0
        self.in_hole = False

    def _locate(self):
        if self.position < self.region_end or self.position >= self.size:
            return
        index = bisect.bisect_right(self.hole_starts, self.position) - 1
        if index >= 0 and self.position < self.holes[index][1]:
            self.in_hole, self.region_end = True, self.holes[index][1]
        else:
            following = index + 1
            self.in_hole = False
            self.region_end = self.holes[following][0] if following < len(self.holes) else self.size

    def readinto(self, view):
        self._locate()
        if self.position >= self.size:
            return 0
        count = min(len(view), self.region_end - self.position)
        done = 0
        index = bisect.bisect_right(self.starts, self.position) - 1
        while done < count:
            start, length, file_offset = self.extents[index]
            inside = self.position + done - start
            piece = min(length - inside, count - done)
            if file_offset is None:
                view[done:done + piece] = bytes(piece)
            elif os.preadv(self.fd, [view[done:done + piece]], file_offset + inside) != piece:
                raise SnfError(f"{self.shown}: its map points past the end of the file (truncated or damaged)")
            done += piece
            index += 1
        self.position += count
        return count


def qemu_image_extents(map_output, virtual_size):
    """qemu-img map's JSON as [(guest offset, length, file offset or None)],
    neighbours merged; None when some data has no place in the image file
    itself (compressed, encrypted, another layer), or the map is not one
    unbroken cover of the virtual size."""
    extents, position = [], 0
    for entry in json.loads(map_output):
        start, length = int(entry["start"]), int(entry["length"])
        if start != position or length <= 0 or entry.get("depth", 0) != 0:
            return None
        if entry.get("zero"):
            file_offset = None
        elif entry.get("data") and isinstance(entry.get("offset"), int) and not entry.get("compressed"):
            file_offset = entry["offset"]
        else:
            return None
        last = extents[-1] if extents else None
        if last and (last[2] is None and file_offset is None
                     or last[2] is not None and file_offset == last[2] + last[1]):
            extents[-1] = (last[0], last[1] + length, last[2])
        else:
            extents.append((start, length, file_offset))
        position = start + length
    return extents if position == virtual_size else None


def write_qemu_image(job, source, reader, kind):
    """Write a local image in a qemu format onto the disk: a qcow2 whose data
    all lies in the file itself through the copier, by qemu-img's map of it;
    anything else with `qemu-img convert`."""
    config, monitor, disk = job.config, job.monitor, job.disks[0]
    shown = f"image {os.path.basename(source.path)}"
    fd = source.file.fileno()
    log(f"{shown}: {kind} disk image (from its header)")
    check_qemu_image_header(fd, kind, source.size, shown)
    name = qemu_image_name(kind, fd)
    info = _run_qemu_img(config, ["info", "--output=json", name], fd, shown, kind)
    try:
        details = json.loads(info.stdout)
        virtual_size = int(details["virtual-size"])
    except (ValueError, KeyError, TypeError):
        raise SnfError(f"{shown}: qemu-img info printed no virtual size") from None
    if details.get("format") != kind:
        raise SnfError(f"{shown}: qemu-img reads it as {details.get('format')!r}, not as {kind}")
    if source.checksum:
        log(f"verifying the image against {source.checksum[2]} before writing")
        drain(reader)               # hashes the file, holes as zeros; a mismatch raises
    check = _run_qemu_img(config, ["check", "--output=json", name], fd, shown, kind,
                          ok=(*QEMU_CHECK_OK, 2))
    if check.returncode == 2:
        try:
            corruptions = json.loads(check.stdout).get("corruptions", "some")
        except ValueError:
            corruptions = "some"
        raise SnfError(f"{shown}: corrupt {kind} image: qemu-img check found {corruptions} corruptions "
                       "(truncated or damaged file)")
    extents = None
    if kind == "qcow2":
        mapped = _run_qemu_img(config, ["map", "--output=json", name], fd, shown, kind)
        try:
            extents = qemu_image_extents(mapped.stdout, virtual_size)
        except (ValueError, KeyError, TypeError):
            raise SnfError(f"{shown}: qemu-img map printed no usable map") from None
    with DiskWriter(disk.path) as writer:
        target_size, direct = writer.size, writer.direct
        if virtual_size > target_size:
            raise SnfError(f"the image ({virtual_size} bytes) is larger than disk {disk.path} "
                           f"({target_size} bytes)")
        if extents is not None:
            log(f"{shown}: copied by its map ({len(extents)} extents)")
            copied, progress = copy_with_progress(job, MappedImageFile(fd, extents, virtual_size, shown),
                                                  writer, virtual_size)
            writer.sync()
            if copied != virtual_size:
                raise SnfError(f"{shown}: {copied} of {virtual_size} bytes written")
            progress.update(virtual_size, final=True)
            monitor.info(f"Image copy finished ({virtual_size} bytes written to {disk.path}).")
            return
    log(f"{shown}: written with qemu-img convert")
    monitor.info("Starting image copy...")
    argv = [*config.QEMU_IMG, "convert", "-p", "-n", "-O", "raw", "-t", "none" if direct else "writeback"]
    if config.COPY_WRITERS > 1:
        argv.append("-W")
    if not config.SPARSE_COPY:
        argv += ["-S", "0"]
    progress = CopyProgress(monitor, virtual_size, config.PROGRESS_INTERVAL, "copy")
    _convert_with_progress([*argv, name, disk.path], fd, progress, virtual_size, shown)
    progress.update(virtual_size, final=True)
    monitor.info(f"Image copy finished ({virtual_size} bytes written to {disk.path}).")


def _convert_with_progress(argv, fd, progress, virtual_size, shown):
    """Run qemu-img convert -p, turning its "(NN.NN/100%)" lines into progress messages."""
    import tempfile
    with tempfile.TemporaryFile() as errors:
        try:
            process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=errors,
                                       pass_fds=(fd,), bufsize=0)
        except OSError as exc:
            raise SnfError(f"cannot run {argv[0]}: {exc.strerror}") from None
        with killing_on_exit(process):
            pending = b""
            while True:
                chunk = process.stdout.read(4096)
                if not chunk:
                    break
                pending += chunk
                *done, pending = re.split(rb"[\r\n]", pending)
                for line in reversed(done):
                    match = re.search(rb"\((\d+(?:\.\d+)?)/100%\)", line)
                    if match:
                        progress.update(int(virtual_size * float(match.group(1)) / 100))
                        break
            code = process.wait()
        if code != 0:
            errors.seek(0)
            lines = errors.read().decode("utf-8", "replace").strip().splitlines() or [""]
            raise SnfError(f"{shown}: qemu-img convert failed (exit {code}): {lines[-1][:300]}")


# ---------------------------------------------------------------------------
# Filesystem dumps: the synthesized MBR
# ---------------------------------------------------------------------------

def find_mbr_boot_code(configured):
    candidates = [configured] if configured else list(MBR_BIN_CANDIDATES)
    for path in candidates:
        try:
            data = Path(path).read_bytes()
        except OSError:
            continue
        if len(data) < 440:
            raise SnfError(f"boot code {path} is shorter than 440 bytes")
        return data[:440]
    raise SnfError("no MBR boot code found (install syslinux-common or set MBR_BIN): "
                   + ", ".join(candidates))


def _chs(lba):
    heads, sectors = 255, 63
    cylinder = lba // (heads * sectors)
    if cylinder > 1023:
        return bytes((254, 255, 255))
    head = (lba // sectors) % heads
    sector = lba % sectors + 1
    return bytes((head, sector | ((cylinder >> 2) & 0xC0), cylinder & 0xFF))


def build_mbr(boot_code, image_format, image_size):
    """Sector 0 for an ext/ntfs dump: one bootable partition at 2048 covering the image."""
    partition_type = {"extdump": 0x83, "ntfsdump": 0x07}[image_format]
    start = MBR_HEADER_SIZE // 512
    sectors = max(image_size // 512, 1)
    end = start + sectors - 1
    entry = (bytes((0x80,)) + _chs(start) + bytes((partition_type,)) + _chs(end)
             + struct.pack("<II", start, sectors))
    import secrets
    signature = 0
    while signature == 0:
        signature = secrets.randbits(32)
    sector = bytearray(512)
    sector[0:440] = boot_code[:440]
    sector[440:444] = struct.pack("<I", signature)
    sector[446:462] = entry
    sector[510:512] = b"\x55\xaa"
    return bytes(sector)


def rewrite_first_sector(path, sector):
    """Replace sector 0 (used when the filesystem dump's size was not known up front)."""
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.pwrite(fd, sector, 0)
        os.fsync(fd)
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------
# The floppy and the helper VM
# ---------------------------------------------------------------------------

def private_temp_dir(base=None):
    """A 0700 directory for the floppy and friends, under TEMP_DIR (default
    /run/snf-image: root only, gone at reboot), removed on every exit path."""
    return WorkDir(Path(base or RUN_DIR))


def process_start(pid):
    """The start time of process `pid` (tells a process from a later one with its number), or None."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def record_process(path, pid):
    """A pid file that names one process for good: "PID START-TIME"."""
    temporary = f"{path}.{os.getpid()}"
    write_private(temporary, f"{pid} {process_start(pid)}\n".encode())
    os.replace(temporary, path)


def recorded_process(path):
    """The pid recorded in `path` if that very process still runs, else None."""
    try:
        pid, start = Path(path).read_text().split()
    except (OSError, ValueError):
        return None
    return int(pid) if pid.isdigit() and process_start(pid) == start else None


def reap_workdir(workdir):
    """Kill the helper VM recorded in a work directory and remove the directory (floppy included)."""
    pid = recorded_process(os.path.join(workdir, "qemu.pid"))
    if pid is not None:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    import shutil
    shutil.rmtree(workdir, ignore_errors=True)


def reap_leftovers(base):
    """Work directories whose deployment died (even by SIGKILL, with its guard):
    their qemu is killed and the directory removed by the next run."""
    try:
        entries = [entry for entry in os.scandir(base) if entry.name.startswith("deploy-") and entry.is_dir()]
    except OSError:
        return
    for entry in entries:
        owner = os.path.join(entry.path, "owner.pid")
        if recorded_process(owner) is not None:
            continue                    # a deployment running now
        try:
            if not os.path.exists(owner) and time.time() - entry.stat().st_mtime < 60:
                continue                # being set up this very moment
        except OSError:
            continue
        warn(f"removing the leftovers of an interrupted deployment: {entry.path}")
        reap_workdir(entry.path)


class WorkDir:
    """The private work directory of one deployment, with a guard process that
    cleans up after us if we die without cleaning (SIGKILL included): the guard
    waits for the end of a pipe only we hold; at its end without our "done", it
    kills the recorded qemu and removes the directory with the floppy."""

    def __init__(self, base):
        self.base, self.path, self.guard, self.guard_pipe = base, None, None, None

    def __enter__(self):
        try:
            self.base.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise SnfError(f"cannot create the temporary directory {self.base}: {exc.strerror}") from None
        reap_leftovers(self.base)
        import tempfile
        self.path = tempfile.mkdtemp(prefix="deploy-", dir=str(self.base))
        try:
            record_process(os.path.join(self.path, "owner.pid"), os.getpid())
            read_end, self.guard_pipe = os.pipe()
            try:
                self.guard = subprocess.Popen([sys.executable, "-I", "-S", os.path.abspath(__file__),
                                               "guard-workdir", self.path],
                                              stdin=read_end, stdout=subprocess.DEVNULL, start_new_session=True)
            finally:
                os.close(read_end)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self.path

    def __exit__(self, *exc_info):
        reap_workdir(self.path)
        if self.guard_pipe is not None:
            try:
                os.write(self.guard_pipe, b"done\n")
            except OSError:
                pass
            os.close(self.guard_pipe)
        if self.guard is not None:
            try:
                self.guard.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass


def guard_workdir(workdir):
    """The guard of a WorkDir (a hidden verb): see WorkDir."""
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, signal.SIG_IGN)
    said = b""
    while True:
        chunk = os.read(0, 64)
        if not chunk:
            break
        said += chunk
    if said != b"done\n" and os.path.isdir(workdir):
        reap_workdir(workdir)


# OS parameters and their SNF_IMAGE_* names in the tasks' environment: the
# first five are passed when set (even if empty), the others when not empty.
HELPER_ENV_NAMES = (("img_passwd", "PASSWD"), ("img_passwd_hash", "PASSWD_HASH"),
                    ("os_product_key", "OS_PRODUCT_KEY"), ("auth_keys", "AUTH_KEYS"),
                    ("cloud_userdata", "CLOUD_USERDATA"), ("img_properties", "PROPERTIES"),
                    ("inst_properties", "INST_PROPERTIES"), ("img_personality", "PERSONALITY"))


def helper_environment(environ, params, config, image_format, instance, answer_file_used):
    env = {
        "SNF_IMAGE_TYPE": image_format,
        "SNF_IMAGE_HOSTNAME": instance,
        "SNF_IMAGE_DHCP_TAGS": config.DHCP_TAGS,
        "SNF_IMAGE_STATEFUL_DHCPV6_TAGS": config.STATEFUL_DHCPV6_TAGS,
        "SNF_IMAGE_STATELESS_DHCPV6_TAGS": config.STATELESS_DHCPV6_TAGS,
        "SNF_IMAGE_DEFAULT_NIC_CONFIG": config.DEFAULT_NIC_CONFIG,
    }
    for name, key in HELPER_ENV_NAMES[:5]:
        if name in params:                         # set, even if empty
            env["SNF_IMAGE_" + key] = params[name]
    for name, key in HELPER_ENV_NAMES[5:]:
        if params.get(name):                       # only if non-empty
            env["SNF_IMAGE_" + key] = params[name]
    if config.CLOUD_INIT_DEBUG:
        env["SNF_IMAGE_CLOUD_INIT_DEBUG"] = "yes"
    if answer_file_used:
        env["SNF_IMAGE_PROPERTY_IGNORE_UNATTEND"] = "yes"
    if image_format in ("extdump", "ntfsdump"):
        env["SNF_IMAGE_PROPERTY_OSFAMILY"] = "linux" if image_format == "extdump" else "windows"
        env["SNF_IMAGE_PROPERTY_ROOT_PARTITION"] = "1"
    for key in sorted(environ):
        if key.startswith("NIC_"):
            env["SNF_IMAGE_" + key] = environ[key]
    return env


def fetch_answer_file(url, image_dir, timeout):
    """os_answer_file: http(s)/ftp(s), or file:// limited to IMAGE_DIR (never any host file)."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme.lower() == "file":
        given = os.path.normpath(urllib.parse.unquote(parts.path))
        path = os.path.realpath(given)
        root = os.path.realpath(image_dir).rstrip("/") + "/"
        if not path.startswith(root):
            raise SnfError("os_answer_file: file:// answer files must be inside IMAGE_DIR", 2)
        if path != given:
            raise SnfError("os_answer_file: a file:// answer file may not be a symbolic link", 2)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            raise SnfError(f"cannot read os_answer_file {path}: {exc.strerror}", 2) from None
        with open(fd, "rb") as handle:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise SnfError(f"os_answer_file {path} is not a regular file", 2)
            return handle.read(FLOPPY_SIZE + 1)
    log("Downloading the answer file given in os_answer_file")
    try:
        with UrlFetch(url, "os_answer_file", timeout=timeout) as fetch:
            return fetch.read(FLOPPY_SIZE)
    except SnfError as exc:
        raise SnfError(str(exc), 2) from None


def default_answer_files(timezone):
    name, index = timezone
    components = "\n".join(UNATTEND_COMPONENTS.format(arch=arch, timezone=name)
                           for arch in ("amd64", "x86"))
    return (UNATTEND_TEMPLATE.format(components=components).encode(),
            SYSPREP_TEMPLATE.format(timezone_index=index).replace("\n", "\r\n").encode())


def write_private(path, data):
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    with open(fd, "wb") as handle:
        handle.write(data)


FLOPPY_BUDGET = FLOPPY_SIZE - 160 * 1024     # what ext2's own structures leave for the files


def check_floppy_budget(rules_json, unattend, sysprep, env):
    """Refuse, naming the largest parameter, what would not fit on the floppy."""
    def blocks(data):
        return -(-len(data or b"") // 1024) * 1024
    total = blocks(rules_json) + blocks(unattend) + blocks(sysprep)
    if total <= FLOPPY_BUDGET:
        return
    sizes = {key: len(value.encode()) for key, value in env.items()}
    sizes["os_answer_file"] = len(unattend or b"")
    largest = max(sizes, key=sizes.get)
    names = {"SNF_IMAGE_" + key: name for name, key in HELPER_ENV_NAMES}
    raise SnfError(f"the OS parameters do not fit on the rules floppy ({total // 1024} KiB of at most "
                   f"{FLOPPY_BUDGET // 1024} KiB): {names.get(largest, largest)} is "
                   f"{sizes[largest] // 1024} KiB", 2)


def floppy_files(config, rules, params):
    """The rules disk's files {name: bytes}, answer files fetched and the size
    budget checked (sysprep.inf None: a link to unattend.xml)."""
    rules_json = json.dumps(rules, indent=1, sort_keys=True).encode()
    if config.UNATTEND:
        warn("the UNATTEND setting is deprecated; use os_answer_file")
        try:
            unattend = Path(config.UNATTEND).read_bytes()
        except OSError as exc:
            raise SnfError(f"cannot read UNATTEND file {config.UNATTEND}: {exc.strerror}", 2) from None
        sysprep = default_answer_files(config.WINDOWS_TIMEZONE)[1]
    elif params.get("os_answer_file"):
        unattend = fetch_answer_file(params["os_answer_file"], config.IMAGE_DIR, config.URL_TIMEOUT)
        sysprep = None
    else:
        unattend, sysprep = default_answer_files(config.WINDOWS_TIMEZONE)
    check_floppy_budget(rules_json, unattend, sysprep, rules["env"])
    return {"rules.json": rules_json, "unattend.xml": unattend, "sysprep.inf": sysprep}


def write_floppy(workdir, config, files):
    """Write `files` (floppy_files) into a 1440 KiB ext2 image (mkfs.ext2 -d)."""
    content = os.path.join(workdir, "floppy-content")
    os.mkdir(content, 0o700)
    try:
        for name, data in files.items():
            if data is None:
                os.symlink("unattend.xml", os.path.join(content, name))
            else:
                write_private(os.path.join(content, name), data)
        floppy = os.path.join(workdir, "floppy.img")
        fd = os.open(floppy, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        os.ftruncate(fd, FLOPPY_SIZE)
        os.close(fd)
        run_program(config.MKFS_EXT2 + ["-q", "-F", "-m", "0", "-L", "snf-rules", "-d", content, floppy],
                    what="creating the rules floppy", debug=config.IMAGE_DEBUG)
        return floppy
    finally:
        import shutil
        shutil.rmtree(content, ignore_errors=True)


def make_floppy(workdir, config, rules, params):
    """Write rules.json, unattend.xml, sysprep.inf into a 1440 KiB ext2 image (mkfs.ext2 -d)."""
    return write_floppy(workdir, config, floppy_files(config, rules, params))


# ---------------------------------------------------------------------------
# Material prepared on the node for the two costly tasks
# ---------------------------------------------------------------------------

# What 50DeleteSSHKeys makes (types, sizes, PEM form) and 50ChangePassword
# hashes with (crypt_gensalt_rn prefix and cost, 0: libxcrypt's default).
PREPARED_KEY_TYPES = {"rsa": ["-b", "3072", "-m", "PEM"], "ecdsa": ["-b", "256", "-m", "PEM"],
                      "ed25519": []}
PREPARED_HASH_PREFIXES = {"yescrypt": ("$y$", 0), "sha512": ("$6$", 0), "sha256": ("$5$", 0),
                          "md5": ("$1$", 0), "blowfish": ("$2b$", 10)}
# without PASSWD_HASHING_METHOD: what Debian 11+, Ubuntu 20.04+, Fedora (yescrypt)
# and RHEL, SUSE and the task's own default (SHA-512) hash with
DEFAULT_PREPARED_METHODS = ("yescrypt", "sha512")
PREPARED_USERS_MAX = 16
PREPARED_KEYGEN_TIMEOUT = 60
# The mailbox disk (DESIGN.md §5): a header block, then the JSON payload.
# The host fills it while the helper boots; the tasks wait for its header.
PREPARED_SERIAL = "snf-prepared"
MAILBOX_MAGIC = b"SNFPREP1"
MAILBOX_READY, MAILBOX_NOTHING = b"R", b"N"
MAILBOX_HEADER_SIZE = 4096
MAILBOX_PAYLOAD_MAX = 60 * 1024
MAILBOX_SIZE = MAILBOX_HEADER_SIZE + MAILBOX_PAYLOAD_MAX
LIBCRYPT = "libcrypt.so.1"
CRYPT_DATA_SIZE = 32768             # sizeof(struct crypt_data) in libxcrypt
NO_VALUES = ("no", "false", "off", "0", "unset", "")


def _merged_properties(params):
    """img_properties then inst_properties (key by key), names upper-cased."""
    merged = {}
    for name in ("img_properties", "inst_properties"):
        try:
            value = json.loads(params.get(name) or "{}")
        except ValueError:
            continue
        if isinstance(value, dict):
            merged.update({str(key).upper(): str(item) for key, item in value.items()})
    return merged


def _crypt_functions():
    """crypt_gensalt_rn and crypt_rn of the node's libxcrypt, or None."""
    import ctypes
    try:
        library = ctypes.CDLL(LIBCRYPT)
        gensalt, crypt_rn = library.crypt_gensalt_rn, library.crypt_rn
    except (OSError, AttributeError):
        return None
    gensalt.restype = ctypes.c_char_p
    gensalt.argtypes = [ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p, ctypes.c_int,
                        ctypes.c_char_p, ctypes.c_int]
    crypt_rn.restype = ctypes.c_char_p
    crypt_rn.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_void_p, ctypes.c_int]
    return gensalt, crypt_rn


def node_crypt(functions, password, method):
    """crypt(3) of `password` with a fresh setting of `method` (the node's own
    random salt, the task's cost), or None; the work area is zeroed."""
    import ctypes
    gensalt, crypt_rn = functions
    prefix, cost = PREPARED_HASH_PREFIXES[method]
    output = ctypes.create_string_buffer(192)
    setting = gensalt(prefix.encode(), cost, None, 0, output, len(output))
    if not setting or not setting.startswith(prefix.encode()):
        return None
    work_area = ctypes.create_string_buffer(CRYPT_DATA_SIZE)
    try:
        result = crypt_rn(password.encode("utf-8"), setting, work_area, CRYPT_DATA_SIZE)
        hashed = result.decode("ascii", "replace") if result else ""
    finally:
        ctypes.memset(work_area, 0, CRYPT_DATA_SIZE)
    return hashed if hashed.startswith(setting.decode("ascii", "replace")) else None


def mailbox_header(state, payload=b""):
    """The mailbox's first block: magic, state, payload length and CRC-32 (it
    tells a read that overlapped the write; both ends trust each other, and
    the guest's hashlib would load OpenSSL, 0.1 s under TCG, in each task)."""
    import zlib
    header = MAILBOX_MAGIC + state + struct.pack("<II", len(payload), zlib.crc32(payload))
    return header.ljust(MAILBOX_HEADER_SIZE, b"\0")


def create_mailbox(path):
    """The empty mailbox disk image (0600, its blocks allocated: filling it
    later cannot fail for want of space)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, bytes(MAILBOX_SIZE))
    finally:
        os.close(fd)
    return path


def fill_mailbox(path, payload):
    """Post `payload` (bytes, or None for "nothing prepared") into the
    mailbox: the payload first, then the header that announces it, so that
    a reader never takes a half-written payload for a complete one."""
    if payload is not None and len(payload) > MAILBOX_PAYLOAD_MAX:
        warn(f"the material prepared on the node ({len(payload)} bytes) exceeds the mailbox; "
             "the helper makes it itself")
        payload = None
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        if payload is None:
            os.pwrite(fd, mailbox_header(MAILBOX_NOTHING), 0)
        else:
            os.pwrite(fd, payload, MAILBOX_HEADER_SIZE)
            os.pwrite(fd, mailbox_header(MAILBOX_READY, payload), 0)
    finally:
        os.close(fd)


class HostPreparation:
    """SSH host keys and password hashes made on the node (native CPU, not
    the helper's TCG) for 50DeleteSSHKeys and 50ChangePassword; the tasks
    use them only when they are what they would make themselves. The work
    starts before the copy; `deliver` posts the result into the mailbox disk
    while the helper boots, so nobody waits for it unless a task needs it
    sooner. ssh-keygen writes into a private directory of the work
    directory, removed as soon as the keys are read (and with the work
    directory on any exit). Anything missing on the node (ssh-keygen,
    libxcrypt, a method) just leaves that part to the helper."""

    def __init__(self, workdir, config, params, image_format, instance):
        self.workdir, self.config = workdir, config
        self.params, self.image_format, self.instance = params, image_format, instance
        self.keygens, self.key_dir, self.hasher, self.hashes = {}, None, None, {}
        self.mailbox, self.deliverer = None, None

    @property
    def announced(self):
        """Whether the helper gets a mailbox (the tasks may ask for something)."""
        key_types, methods, _users = self.wanted()
        return bool(key_types or methods)

    def wanted(self):
        """(key types, hash methods, users) the helper may ask for."""
        properties = _merged_properties(self.params)

        def yes(name):
            return properties.get(name, "no").lower() not in NO_VALUES
        if self.image_format == "ntfsdump" or properties.get("OSFAMILY", "").startswith("windows") \
                or yes("EXCLUDE_ALL_TASKS"):
            return (), (), ()
        key_types = () if yes("CLOUD_INIT") or yes("EXCLUDE_TASK_DELETESSHKEYS") else tuple(PREPARED_KEY_TYPES)
        methods, users = (), ()
        if self.params.get("img_passwd") and "img_passwd_hash" not in self.params \
                and not yes("EXCLUDE_TASK_CHANGEPASSWORD"):
            users = tuple(dict.fromkeys(properties.get("USERS", "").split())) or ("root",)
            asked = properties.get("PASSWD_HASHING_METHOD", "").strip().lower()
            methods = (asked,) if asked else DEFAULT_PREPARED_METHODS
            methods = tuple(method for method in methods if method in PREPARED_HASH_PREFIXES)
            if len(users) > PREPARED_USERS_MAX:
                methods = ()
        return key_types, methods, users

    def __enter__(self):
        key_types, methods, users = self.wanted()
        if self.announced:
            self.mailbox = create_mailbox(os.path.join(self.workdir, "prepared.img"))
        import shutil
        if key_types and shutil.which(self.config.SSH_KEYGEN[0]):
            import tempfile
            self.key_dir = tempfile.mkdtemp(prefix="hostkeys-", dir=self.workdir)
            comment = "root@" + (self.instance or "localhost").split(".")[0]
            for kind in key_types:
                argv = self.config.SSH_KEYGEN + ["-q", "-t", kind, *PREPARED_KEY_TYPES[kind], "-N", "",
                                                 "-C", comment, "-f", os.path.join(self.key_dir, kind)]
                try:
                    self.keygens[kind] = subprocess.Popen(argv, stdin=subprocess.DEVNULL,
                                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                except OSError:
                    break
        if methods:
            functions = _crypt_functions()
            if functions:
                password = self.params["img_passwd"]
                self.hasher = threading.Thread(target=self._hash, args=(functions, password, methods, users),
                                               name="prepare-hashes", daemon=True)
                self.hasher.start()
        return self

    def _hash(self, functions, password, methods, users):
        for method in methods:
            hashes = {user: node_crypt(functions, password, method) for user in users}
            if all(hashes.values()):
                self.hashes[method] = hashes

    def collect(self):
        """The JSON payload (bytes) with what was made, or None."""
        keys = {}
        deadline = time.monotonic() + PREPARED_KEYGEN_TIMEOUT
        for kind, process in self.keygens.items():
            try:
                status = process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                continue
            path = os.path.join(self.key_dir, kind)
            try:
                private = Path(path).read_text(encoding="ascii")
                public = Path(path + ".pub").read_text(encoding="ascii").strip()
            except (OSError, UnicodeDecodeError):
                continue
            if status == 0:
                keys[kind] = {"private": private, "public": public}
        self._discard_keys()
        if self.hasher is not None:
            self.hasher.join(max(0.1, deadline - time.monotonic()))
        hashes = {} if self.hasher is None or self.hasher.is_alive() else self.hashes
        if not keys and not hashes:
            return None
        log(f"prepared on the node: SSH host keys ({', '.join(keys) or 'none'}), password hashes "
            f"({', '.join(hashes) or 'none'})")
        return json.dumps({"format": 1, "ssh_host_keys": keys, "password_hashes": hashes},
                          indent=1, sort_keys=True).encode()

    def deliver(self):
        """Collect and post into the mailbox in the background (a no-op
        without a mailbox); an answer is posted whatever happens."""
        if self.mailbox is None:
            return

        def collect_and_post():
            try:
                payload = self.collect()
            except Exception as error:      # a bug: the tasks then make everything themselves
                warn(f"preparing keys and hashes on the node failed: {error}")
                payload = None
            try:
                fill_mailbox(self.mailbox, payload)
            except OSError as error:
                warn(f"cannot post into the mailbox {self.mailbox}: {error.strerror}")
        self.deliverer = threading.Thread(target=collect_and_post, name="prepared-mailbox", daemon=True)
        self.deliverer.start()

    def _kill_keygens(self):
        for process in list(self.keygens.values()):
            if process.poll() is None:
                process.kill()

    def _discard_keys(self):
        self._kill_keygens()
        for process in self.keygens.values():
            process.wait()
        self.keygens = {}
        if self.key_dir:
            import shutil
            shutil.rmtree(self.key_dir, ignore_errors=True)
            self.key_dir = None

    def __exit__(self, *exc_info):
        if self.deliverer is not None:
            self._kill_keygens()            # the helper is done: stop waiting for keys
            self.deliverer.join()
            self.deliverer = None
        self._discard_keys()
        self.hashes = {}
        if self.mailbox is not None:    # the helper is gone: its unused keys go too
            with suppress(FileNotFoundError):
                os.unlink(self.mailbox)
            self.mailbox = None


HELPER_RELEASE_FILES = ("kernel", "initrd", "image")


def resolve_helper(helper_dir):
    """The release directory holding kernel, initrd and image (resolved once).
    A missing, broken or outdated release is refused here, before any disk is
    written, with one line naming the node and its problem."""
    current = os.path.join(helper_dir, "current")
    release = os.path.realpath(current) if os.path.lexists(current) else helper_dir
    problem = helper_release_problem(release)
    if problem:
        raise SnfError(f"node {os.uname().nodename}: the helper VM in HELPER_DIR {helper_dir} "
                       f"{problem}: run snf-image-update-helper -y (or -u URL to fetch the "
                       "site's build)")
    return release


def _version_key(text):
    return tuple(int(number) for number in re.findall(r"[0-9]+", str(text)))


def helper_release_problem(release):
    """None for a complete release built for this snf-image, else what is wrong."""
    missing = [name for name in HELPER_RELEASE_FILES if not os.path.isfile(os.path.join(release, name))]
    if missing:
        return f"is missing ({', '.join(missing)} not found)"
    try:
        with open(os.path.join(release, "manifest.json"), "rb") as stream:
            manifest = json.load(stream)
        files, built_for = manifest["files"], manifest["snf_image_version"]
        if not isinstance(files, dict) or not set(HELPER_RELEASE_FILES) <= set(files):
            raise ValueError("incomplete file list")
    except FileNotFoundError:
        return "is broken (no manifest.json)"
    except (OSError, ValueError, KeyError, TypeError):
        return "is broken (unreadable manifest.json)"
    if _version_key(built_for) < _version_key(SNF_IMAGE_VERSION):
        return f"is older than this node's snf-image (built for {built_for}, the node runs {SNF_IMAGE_VERSION})"
    return _helper_checksum_problem(release, files)


def _helper_checksum_problem(release, files):
    """Compare every file with its sha256 in the manifest. A successful check
    is remembered in RUN_DIR by the files' identity (inode, size, mtime,
    ctime: any write changes ctime), so that each create does not re-read
    hundreds of MiB; a changed or replaced file is read again."""
    import hashlib
    signature = {}
    for name in sorted(files):
        if "/" in name or name.startswith("."):
            return f"is broken (manifest.json lists {name!r})"
        try:
            info = os.stat(os.path.join(release, name))
        except OSError:
            return f"is broken ({name} listed in manifest.json is missing)"
        signature[name] = [info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns]
    stamp = RUN_DIR / ("helper-verified-" + hashlib.sha256(release.encode()).hexdigest()[:16])
    try:
        if json.loads(stamp.read_text()) == {"release": release, "files": signature}:
            return None
    except (OSError, ValueError):
        pass
    for name, expected in sorted(files.items()):
        try:
            with open(os.path.join(release, name), "rb") as stream:
                actual = hashlib.file_digest(stream, "sha256").hexdigest()
        except OSError as exc:
            return f"is broken (cannot read {name}: {exc.strerror})"
        if actual != expected:
            return f"is broken ({name} does not match its sha256 in manifest.json)"
    partial = stamp.with_name(f".{stamp.name}.{os.getpid()}")
    try:
        RUN_DIR.mkdir(mode=0o700, exist_ok=True)
        write_private(partial, json.dumps({"release": release, "files": signature}).encode())
        os.replace(partial, stamp)
    except OSError:
        with suppress(OSError):     # not root (unit tests): verified again next time
            os.unlink(partial)
    return None


def qemu_drive_value(text):
    return text.replace(",", ",,")


def boot_id():
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return "unknown"


def choose_accelerator(config):
    if config.HELPER_ACCEL != "auto":
        return config.HELPER_ACCEL
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "tcg"
    cache = RUN_DIR / "accel"
    try:
        cached = json.loads(cache.read_text())
        if cached.get("boot_id") == boot_id() and cached.get("accel") in ("kvm", "tcg"):
            return cached["accel"]
    except (OSError, ValueError, AttributeError):
        pass
    works = probe_accelerator(config.QEMU, "kvm")
    accel = "kvm" if works else "tcg"
    log(f"KVM probe guest {'ran' if works else 'did not run'} within {KVM_PROBE_TIMEOUT:.0f} s: using {accel}")
    try:
        RUN_DIR.mkdir(mode=0o700, exist_ok=True)
        tmp = cache.with_suffix(f".tmp{os.getpid()}")   # concurrent deployments share no file
        tmp.write_text(json.dumps({"boot_id": boot_id(), "accel": accel}))
        tmp.replace(cache)
    except OSError as exc:
        warn(f"cannot cache the accelerator choice in {cache}: {exc.strerror}")
    return accel


def probe_accelerator(qemu, accel, timeout=KVM_PROBE_TIMEOUT):
    """Boot a one-sector guest that prints to COM1; True if its message arrives in time."""
    message = KVM_PROBE_MESSAGE + b"\r\n\0"
    sector = KVM_PROBE_CODE + message
    sector = sector + bytes(510 - len(sector)) + b"\x55\xaa"
    import selectors
    import tempfile
    with tempfile.TemporaryDirectory(prefix="snf-image-probe-") as workdir:
        disk = os.path.join(workdir, "probe.img")
        Path(disk).write_bytes(sector)
        read_end, write_end = os.pipe()
        argv = qemu + ["-accel", accel, "-machine", "pc", "-m", "16", "-nodefaults", "-nographic",
                       "-no-reboot", "-vga", "none", "-monitor", "none", "-parallel", "none",
                       "-drive", f"file={qemu_drive_value(disk)},format=raw,if=ide,index=0",
                       "-serial", f"file:/proc/self/fd/{write_end}"]
        try:
            process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                       stderr=subprocess.DEVNULL, pass_fds=(write_end,),
                                       preexec_fn=die_with_parent)
        except OSError:
            os.close(read_end)
            os.close(write_end)
            return False
        os.close(write_end)
        seen = b""
        deadline = time.monotonic() + timeout
        with killing_on_exit(process, grace=1.0), selectors.DefaultSelector() as selector:
            selector.register(read_end, selectors.EVENT_READ)
            try:
                while KVM_PROBE_MESSAGE not in seen:
                    left = deadline - time.monotonic()
                    if left <= 0 or not selector.select(left):
                        break
                    chunk = os.read(read_end, 4096)
                    if not chunk:
                        break
                    seen = (seen + chunk)[-256:]
            finally:
                os.close(read_end)
        return KVM_PROBE_MESSAGE in seen


def supports_direct_io(path):
    """False for files on file systems without O_DIRECT (tmpfs), where qemu's cache=none fails."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT | os.O_CLOEXEC)
    except OSError as exc:
        return exc.errno != errno.EINVAL
    os.close(fd)
    return True


# The helper's kernel command line. Besides what the helper needs (console,
# root, init, activation), options that shorten the boot under TCG, each
# measured by tools/bench-helper.py and none taking away a device the helper
# uses: no speculative-execution mitigations and no zeroing of every
# allocation (the VM runs nothing but the helper and lives for one
# deployment), no timer check, no crypto self-tests, expedited RCU
# grace periods, no keyboard/mouse probing, one PCI bus, no audit, no KASLR,
# no read-only remapping of the kernel (and so no W+X scan). PCI interrupt
# routing without ACPI (the virtio disks use MSI-X; evaluating the ACPI link
# devices cost about 0.2 s per disk under TCG; ACPI still powers the VM off),
# no rewriting of every SMP lock prefix for one CPU, and no start-up of what
# the helper never uses: the jitter entropy source's timing self-test (about
# 0.9 s under TCG; the kernel's random pool does not depend on it), the
# tracing enum maps, the KDF self-test and the built-in module-signing
# certificates (the helper's modules are loaded unsigned anyway). Not
# tsc=reliable: it skips the refined TSC calibration, and on a loaded host
# the first estimate can be far off, making the guest's clock (timeouts,
# file times written into the image) run fast.
HELPER_KERNEL_OPTIONS = (
    "console=ttyS0", "panic=-1", "quiet", "ro", "root=/dev/vda", "rootfstype=ext4",
    "mitigations=off", "init_on_alloc=0", "no_timer_check",
    "cryptomgr.notests", "rcupdate.rcu_expedited=1", "i8042.noaux", "i8042.nokbd",
    "pci=lastbus=0", "audit=0", "nokaslr", "rodata=off", "nowatchdog",
    "pci=noacpi", "noreplace-smp",
    "initcall_blacklist=jent_mod_init,trace_eval_init,crypto_kdf108_init,load_system_certificate_list",
)
HELPER_INIT = "/usr/bin/snf-image-helper"
# qemu's minimal firmware: it hands over to the kernel about 2 s sooner than
# SeaBIOS under TCG. Where qemu does not ship it, qemu's default BIOS is used.
HELPER_FIRMWARE_CANDIDATES = ("/usr/share/qemu/qboot.rom",)
HELPER_ROOT_SERIAL = "snf-helper-root"
RULES_SERIAL = "snf-rules"


def helper_firmware():
    return next((path for path in HELPER_FIRMWARE_CANDIDATES if os.path.isfile(path)), None)


def helper_command(config, release, accel, disks, rules, ports, *, prepared=None, kernel=None,
                   init=HELPER_INIT, extra_append=()):
    """The helper VM's qemu command line (DESIGN.md §4). The one place it is
    built: `create`, the builder's --check and tools/bench-helper.py use it.

    `rules` is the rules image (None: no rules disk and no activation flag, as
    the builder's boot check wants); `ports` maps console, result and progress
    to an inherited descriptor (int) or a file path (str); a missing port is
    discarded. `prepared` is the mailbox disk of HostPreparation (§5), if any.
    `kernel` replaces the release's kernel (the benchmark's bzImage)."""
    append = [*HELPER_KERNEL_OPTIONS, f"init={init}", "hypervisor=kvm"]
    if rules is not None:
        append += ["snf_image_activate_helper", f"rules_serial={RULES_SERIAL}"]
    if config.HELPER_DEBUG:
        append.append("snf_image_debug_helper")
    append += list(extra_append)
    firmware = helper_firmware()
    argv = config.QEMU + [
        "-accel", accel, "-machine", "pc", "-cpu", "max", "-smp", "1", "-m", str(config.HELPER_MEMORY),
        "-nodefaults", "-nographic", "-no-reboot", "-vga", "none", "-monitor", "none",
        "-parallel", "none", *(["-bios", firmware] if firmware else []),
        "-kernel", str(kernel or os.path.join(release, "kernel")),
        "-initrd", os.path.join(release, "initrd"),
        "-append", " ".join(append),
        "-drive", f"file={qemu_drive_value(os.path.join(release, 'image'))},format=raw,if=none,"
                  "id=helperroot,readonly=on",
        "-device", f"virtio-blk-pci,drive=helperroot,serial={HELPER_ROOT_SERIAL}",
    ]
    for disk in disks:
        cache = "none" if disk.path is None or supports_direct_io(disk.path) else "writeback"
        argv += ["-drive", f"file={qemu_drive_value(disk.target)},format=raw,if=none,id=disk{disk.index},"
                           f"cache={cache},aio=threads",
                 "-device", f"virtio-blk-pci,drive=disk{disk.index},serial=snf-disk{disk.index}"]
    if rules is not None:
        argv += ["-drive", f"file={qemu_drive_value(str(rules))},format=raw,if=none,id=rules,readonly=on",
                 "-device", f"virtio-blk-pci,drive=rules,serial={RULES_SERIAL}"]
    if prepared is not None:    # filled while the guest runs: qemu reads it through the page cache
        argv += ["-drive", f"file={qemu_drive_value(str(prepared))},format=raw,if=none,id=prepared,"
                           "readonly=on,cache=writeback",
                 "-device", f"virtio-blk-pci,drive=prepared,serial={PREPARED_SERIAL}"]
    for name in ("console", "result", "progress"):
        port = ports.get(name)
        if port is None:
            argv += ["-serial", "null"]
        else:
            argv += ["-serial", f"file:/proc/self/fd/{port}" if isinstance(port, int) else f"file:{port}"]
    argv += ["-serial", "pty" if config.HELPER_DEBUG else "null"]
    if config.HELPER_USER != "root":
        argv += ["-runas", config.HELPER_USER]
    return argv


ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1bc|[\x00-\x08\x0b-\x1f\x7f]")


class LineRelay:
    """Splits a byte stream into lines and logs them with a prefix, up to
    LOG_LIMIT bytes (a flooding guest must not fill the node's disk); the
    last lines are kept for the error message either way."""

    LOG_LIMIT = MIB

    def __init__(self, prefix, keep=1):
        self.prefix, self.pending, self.last = prefix, b"", []
        self.keep = keep
        self.logged = 0

    def feed(self, data):
        lines = (self.pending + data).split(b"\n")
        self.pending = lines.pop()
        for line in lines:
            self.emit(line)
        if len(self.pending) > 4096:
            self.emit(self.pending)
            self.pending = b""

    def emit(self, raw):
        line = ANSI_ESCAPE.sub("", raw[:4096].decode("utf-8", "replace")).rstrip("\r\n")
        if not line.strip():
            return
        self.last = (self.last + [line])[-self.keep:]
        self.logged += len(line)
        if self.logged > self.LOG_LIMIT:
            if self.logged - len(line) <= self.LOG_LIMIT:
                warn(f"{self.prefix.strip(': ')} output beyond {self.LOG_LIMIT // MIB} MiB is not logged")
            return
        if self.prefix.startswith("HELPER"):
            try:       # as upstream's sed 's|^|HELPER: |': the guest has its own timestamps
                print(self.prefix + printable(line), file=sys.stderr, flush=True)
            except (BrokenPipeError, ValueError):
                pass
        else:
            log(self.prefix + line)

    def finish(self):
        if self.pending:
            self.emit(self.pending)
            self.pending = b""


def run_helper_vm(config, monitor, release, disks, floppy, workdir, prepared=None):
    """Boot the helper with the instance's disks, the floppy and the mailbox
    disk `prepared` (if any); raise unless SUCCESS."""
    accel = choose_accelerator(config)
    monitor.info("Starting customization VM...")
    log(f"helper VM: {release}, accel {accel}, {config.HELPER_MEMORY} MiB, user {config.HELPER_USER}")
    run_qemu_helper(lambda fds: helper_command(config, release, accel, disks, floppy, fds, prepared=prepared),
                    config, monitor, workdir)
    monitor.info("Customization VM exited normally.")


def run_qemu_helper(build_argv, config, monitor, workdir):
    """Start qemu with pipes as its console/result/progress ports and supervise it.

    One selectors loop relays the console into the log, turns progress lines
    into JSON messages, collects the result and enforces HELPER_SOFT_TIMEOUT
    (SIGTERM) then HELPER_HARD_TIMEOUT (SIGKILL). Returns only on SUCCESS.
    """
    pipes = {}
    try:
        for name in ("console", "result", "progress", "stderr"):
            pipes[name] = os.pipe()
        child_fds = {name: pipes[name][1] for name in ("console", "result", "progress")}
        argv = build_argv(child_fds)
        if config.IMAGE_DEBUG:
            log("running: " + shlex.join(argv))
        # a process group of its own: a signal to ours is handled by us, then
        # qemu stopped through its recorded pid (by us, the guard or the next
        # run), so a stop signal waits until that pid is on record
        with stop_signals_deferred():
            try:
                process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=pipes["stderr"][1],
                                           stderr=pipes["stderr"][1], pass_fds=tuple(child_fds.values()),
                                           cwd=workdir, process_group=0)
            except OSError as exc:
                raise SnfError(f"cannot start the helper VM ({argv[0]}): {exc.strerror}", 3) from None
            record_process(os.path.join(workdir, "qemu.pid"), process.pid)
        for name in pipes:
            os.close(pipes[name][1])
            pipes[name] = (pipes[name][0], None)
        readers = {pipes[name][0]: name for name in pipes}
        outcome = _supervise(process, readers, config, monitor)
    finally:
        for read_end, write_end in pipes.values():
            for fd in (read_end, write_end):
                if fd is not None:
                    try:
                        os.close(fd)
                    except OSError:
                        pass
    _check_helper_outcome(outcome, config)


class HelperOutcome(namedtuple("HelperOutcome", "exit_code result timed_out console_tail qemu_tail")):
    """How a helper VM run ended: qemu's exit status, the bytes of the result
    port, None / "terminated" / "killed", and the last console and qemu lines."""
    __slots__ = ()


def _supervise(process, readers, config, monitor):
    """Relay the helper's ports until qemu exits and its pipes close; a HelperOutcome."""
    import selectors
    console = LineRelay("HELPER: ", keep=3)
    qemu_output = LineRelay("qemu: ", keep=3)
    protocol = HelperProtocol(monitor)
    result = b""
    started = time.monotonic()
    soft_deadline = started + config.HELPER_SOFT_TIMEOUT
    hard_deadline = None
    timed_out = None
    open_readers = dict(readers)
    with killing_on_exit(process, grace=2.0), selectors.DefaultSelector() as selector:
        for fd in open_readers:
            selector.register(fd, selectors.EVENT_READ)
        while open_readers or process.poll() is None:
            now = time.monotonic()
            if hard_deadline is None and now >= soft_deadline:
                warn(f"helper VM did not finish within HELPER_SOFT_TIMEOUT "
                     f"({config.HELPER_SOFT_TIMEOUT:g} s): sending SIGTERM")
                timed_out = "terminated"
                process.terminate()
                hard_deadline = now + config.HELPER_HARD_TIMEOUT
            elif hard_deadline is not None and now >= hard_deadline and process.poll() is None:
                warn("helper VM still running after HELPER_HARD_TIMEOUT: sending SIGKILL")
                timed_out = "killed"
                process.kill()
                hard_deadline = now + 3600
            if not open_readers:
                time.sleep(0.05)
                continue
            wait = (hard_deadline or soft_deadline) - now
            for key, _ in selector.select(max(0.0, min(wait, 1.0))):
                chunk = os.read(key.fd, 65536)
                name = open_readers[key.fd]
                if not chunk:
                    selector.unregister(key.fd)
                    del open_readers[key.fd]
                elif name == "console":
                    console.feed(chunk)
                elif name == "stderr":
                    qemu_output.feed(chunk)
                elif name == "progress":
                    protocol.feed(chunk)
                elif len(result) < 65536:
                    result += chunk
    console.finish()
    qemu_output.finish()
    protocol.finish()
    elapsed = time.monotonic() - started
    log(f"helper VM stopped after {elapsed:.1f} s (qemu exit status {process.returncode})")
    return HelperOutcome(exit_code=process.returncode, result=result, timed_out=timed_out,
                         console_tail=console.last, qemu_tail=qemu_output.last)


def _check_helper_outcome(outcome, config):
    """Return only when the helper reported SUCCESS; otherwise the one-line reason."""
    if outcome.timed_out:
        raise SnfError(f"helper VM did not finish within HELPER_SOFT_TIMEOUT "
                       f"({config.HELPER_SOFT_TIMEOUT:g} s) and was {outcome.timed_out}", 3)
    first = outcome.result.decode("utf-8", "replace").replace("\r", "").split("\n")[0].strip()
    if outcome.exit_code != 0:
        detail = outcome.qemu_tail[-1] if outcome.qemu_tail else "no error message"
        raise SnfError(f"helper VM crashed (qemu exit status {outcome.exit_code}): {detail}", 3)
    if first == "SUCCESS":
        return
    if first.startswith("ERROR:"):
        raise SnfError(f"image customization failed inside the helper VM: {first[6:].strip()}", 3)
    if first:
        raise SnfError(f"helper VM reported an unexpected result: {first[:80]!r}", 3)
    detail = outcome.console_tail[-1] if outcome.console_tail else "no console output"
    raise SnfError(f"helper VM stopped without reporting a result (last console line: {detail[:120]})", 3)


# ---------------------------------------------------------------------------
# Operations
# ---------------------------------------------------------------------------

def check_required_create_params(params):
    for name in ("img_id", "img_format"):
        if not params.get(name):
            raise SnfError(f"Missing OS parameter: {name}", 2)
    problems = validate_parameters(params)
    if problems:
        raise SnfError(problems[0], 2)


def operation_create(environ, run_helper=True):
    instance = environ.get("INSTANCE_NAME") or "the instance"
    try:
        _create(environ, run_helper)
    except SnfError as exc:
        raise SnfError(f"deployment of {instance} did not complete: {exc}", exc.exit_code) from None


def _create(environ, run_helper):
    check_api_version(environ)
    config = load_config(environ, environ.get("OS_VARIANT"))
    require_env(environ, "INSTANCE_NAME", "HYPERVISOR", "DISK_COUNT")
    instance = environ["INSTANCE_NAME"]
    if CONTROL_CHARACTERS.search(instance) or re.search("[\ud800-\udfff]", instance):
        raise SnfError("invalid instance name: control characters or invalid UTF-8", 2)
    disks = instance_disks(environ)
    params = collect_parameters(environ, config)
    check_required_create_params(params)
    if environ.get("HYPERVISOR") not in ("kvm", "fake"):
        log(f"hypervisor {environ['HYPERVISOR']}: the helper VM runs under qemu anyway")
    with disk_locks([(disk.index, disk.path) for disk in disks if disk.path], "deployment"), \
            Monitor(config.PROGRESS_MONITOR, instance) as monitor:
        try:
            deploy_image(Deployment(config=config, monitor=monitor, environ=environ, params=params,
                                    disks=disks, instance=instance, run_helper=run_helper))
        except SnfError as exc:
            monitor.send("image-error", messages=[str(exc)])
            raise
        except KeyboardInterrupt:
            monitor.send("image-error", messages=["Image deployment was interrupted."])
            raise


class Deployment(namedtuple("Deployment", "config monitor environ params disks instance run_helper boot_code",
                            defaults=(None,))):
    """One deployment's inputs, gathered once by _create and handed down the pipeline
    (deploy_image → copy_image → floppy → helper VM). Read-only: a stage that learns
    more (the MBR boot code) passes on a copy made with _replace. A named tuple, not a
    dataclass: importing dataclasses would cost every OS operation ~30 ms."""
    __slots__ = ()

    @property
    def image_format(self):
        return self.params["img_format"]

    @property
    def filesystem_dump(self):
        """extdump/ntfsdump: a bare file system, written after an MBR built on the host."""
        return self.image_format in ("extdump", "ntfsdump")


def deploy_image(job):
    """Copy the image onto the first disk, then (unless run_helper is false) customize it."""
    config, monitor, environ, params = job.config, job.monitor, job.environ, job.params
    disks, instance, run_helper = job.disks, job.instance, job.run_helper
    img_id, image_format = params["img_id"], job.image_format
    monitor.info(f"Processing image with ID: {redact_url(img_id)} and type: {image_format}")
    if job.filesystem_dump:
        job = job._replace(boot_code=find_mbr_boot_code(config.MBR_BIN))
    if job.filesystem_dump and img_id == "null":
        raise SnfError("img_id null (keep the disk) works only with img_format diskdump", 2)
    release = None
    if run_helper:      # fail before the disk is touched when the helper cannot run at all
        import shutil
        release = resolve_helper(config.HELPER_DIR)
        for program in (config.QEMU[0], config.MKFS_EXT2[0]):
            if shutil.which(program) is None:
                raise SnfError(f"program {program} not found (needed for the helper VM)")
    # the work directory holds the floppy: only the helper VM needs one. The
    # floppy's files come first: answer files fetched and its size budget
    # checked before the first byte reaches the disk. The floppy itself is
    # written after the copy; what the node prepares meanwhile follows in the
    # mailbox disk while the helper boots.
    with private_temp_dir(config.TEMP_DIR) if run_helper else nullcontext() as workdir:
        preparation = HostPreparation(workdir, config, params, image_format, instance) if run_helper else None
        if run_helper:
            rules = {
                "format": 1,
                "env": helper_environment(environ, params, config, image_format, instance,
                                          bool(params.get("os_answer_file")) and not config.UNATTEND),
                "disks": [f"snf-disk{disk.index}" for disk in disks],
            }
            if preparation.announced:
                rules["prepared"] = PREPARED_SERIAL
            files = floppy_files(config, rules, params)
        with preparation or nullcontext():
            with open_image_source(config, img_id, image_format) as source:
                copy_image(job, source)
            if not run_helper:
                monitor.info("Image copied; --no-helper given: the image was NOT customized.")
                return
            floppy = write_floppy(workdir, config, files)
            preparation.deliver()
            run_helper_vm(config, monitor, release, disks, floppy, workdir, preparation.mailbox)
        monitor.info("Image customization finished successfully.")


def copy_image(job, source):
    """Write the image source onto the deployment's first disk (with the MBR of a filesystem dump)."""
    config, monitor, disk = job.config, job.monitor, job.disks[0]
    if isinstance(source, NullSource):
        monitor.info("Image ID is null: the disk is kept as it is, no data copied.")
        CopyProgress(monitor, 0, config.PROGRESS_INTERVAL, "copy").update(0, final=True)
        return
    with decompressing(source.reader, "image") as (reader, compression):
        image_kind = qemu_image_format(reader.peek(QEMU_HEADER_PEEK))
        if image_kind:
            if job.filesystem_dump:
                raise SnfError(f"the image is a {image_kind} disk image, not a filesystem dump: "
                               f"use img_format diskdump", 2)
            if compression or not isinstance(source, LocalSource) or not disk.path:
                raise SnfError(f"the image is a {image_kind} disk image, which needs random access: "
                               "only an uncompressed file in IMAGE_DIR can be written onto a disk with a path")
            write_qemu_image(job, source, reader, image_kind)
            return
        copied = _copy_raw(job, source, reader, compression)
    shown_target = disk.path or redact_url(disk.uri)
    monitor.info(f"Image copy finished ({copied} bytes written to {shown_target}).")


def copy_with_progress(job, reader, writer, total, header=b""):
    """"Starting image copy...", then reader → writer by the copier with the
    configured buffers, overlap, writers and sparseness, `header` first;
    (bytes written, the CopyProgress for the caller's final update)."""
    config, monitor = job.config, job.monitor
    monitor.info("Starting image copy...")
    progress = CopyProgress(monitor, total, config.PROGRESS_INTERVAL, "copy", skip=len(header))
    copied = copy_stream(reader, writer, config.COPY_BUFFER_SIZE, progress, overlap=config.COPY_OVERLAP,
                         prefix=header, writers=config.COPY_WRITERS, sparse=config.SPARSE_COPY)
    return copied, progress


def _copy_raw(job, source, reader, compression):
    """Copy a raw (possibly decompressed) stream; returns the bytes written."""
    config, disk = job.config, job.disks[0]
    image_format, boot_code, filesystem_dump = job.image_format, job.boot_code, job.filesystem_dump
    image_size = None if compression else source.size
    header = b""
    if filesystem_dump:
        header = build_mbr(boot_code, image_format, image_size or 0) + bytes(MBR_HEADER_SIZE - 512)
    shown_target = disk.path or redact_url(disk.uri)
    if disk.path:
        writer_cm = DiskWriter(disk.path)
    else:
        backend = choose_backend(config, "dst", disk.uri, {}, redact_url(disk.uri))
        log(f"Using destination back-end: {backend.name}")
        if filesystem_dump and image_size is None:
            raise SnfError("a filesystem dump of unknown size cannot be written through a destination back-end")
        writer_cm = BackendWriter(backend, disk.uri)
    with writer_cm as writer:
        if writer.size is not None and image_size is not None and image_size + len(header) > writer.size:
            raise SnfError(f"the image ({image_size + len(header)} bytes) is larger than disk "
                           f"{shown_target} ({writer.size} bytes)")
        copied, progress = copy_with_progress(job, reader, writer, image_size, header)
        drain(source.reader)       # a decompressor may stop early: size and checksum checks run at EOF
        source.finish()
        writer.sync()
        progress.update(copied, final=True)
    if copied == len(header):
        raise SnfError("the image is empty (no data after decompression)", 2)
    if filesystem_dump and image_size is None:
        rewrite_first_sector(disk.path, build_mbr(boot_code, image_format, copied - len(header)))
    return copied


def _indexed_device(environ, prefix):
    index = environ.get(f"{prefix}_INDEX", "")
    device = environ.get(f"{prefix}_DEVICE") or environ.get(f"{prefix}_DISK_PATH")
    if not device and index.isdigit():
        device = environ.get(f"DISK_{index}_PATH")
    if not device:
        if environ.get(f"{prefix}_DISK_URI"):
            raise SnfError(f"disk {index} is only reachable by URI: snf-image cannot "
                           f"{prefix.lower()} userspace-only disks", 1)
        raise SnfError(f"missing OS API variable: {prefix}_DEVICE", 2)
    return index or "?", device


def operation_export(environ):
    check_api_version(environ)
    config = load_config(environ, environ.get("OS_VARIANT"))
    index, device = _indexed_device(environ, "EXPORT")
    with disk_locks([(index, device)], "export"):
        _export(config, index, device, environ)


def _export(config, index, device, environ):
    try:
        fd = os.open(device, os.O_RDONLY | os.O_CLOEXEC | os.O_DIRECT)
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            raise SnfError(f"cannot open disk {index} ({device}) for export: {exc.strerror}") from None
        fd = os.open(device, os.O_RDONLY | os.O_CLOEXEC)
    try:
        info = os.fstat(fd)
        size = _block_device_size(fd) if stat.S_ISBLK(info.st_mode) else info.st_size
        os.lseek(fd, 0, os.SEEK_SET)
        size_fd = environ.get("EXP_SIZE_FD", "")
        if size_fd.isdigit():
            try:
                os.write(int(size_fd), f"{size}\n".encode())
                os.close(int(size_fd))
            except OSError as exc:
                warn(f"cannot write the export size to EXP_SIZE_FD {size_fd}: {exc.strerror}")
        log(f"exporting disk {index} ({device}, {human_size(size)}) to stdout")
        out = sys.stdout.fileno()
        reader = DirectReader(fd)
        writer = StreamWriter(out, "stdout")
        progress = CopyProgress(None, size, 30, f"export disk {index}")
        copied = copy_stream(reader, writer, config.COPY_BUFFER_SIZE, progress, overlap=config.COPY_OVERLAP)
    finally:
        os.close(fd)
    if copied != size:
        raise SnfError(f"export of disk {index} read {copied} of {size} bytes")
    log(f"exported disk {index}: {copied} bytes")


class DirectReader:
    """Reads an O_DIRECT fd: a short read means the end (never retried unaligned)."""

    def __init__(self, fd):
        self.fd, self.ended = fd, False

    def readinto(self, view):
        if self.ended:
            return 0
        try:
            count = os.readv(self.fd, [view])
        except OSError as exc:
            raise SnfError(f"read error on the disk being exported: {exc.strerror}") from None
        if count < len(view):
            self.ended = True
        return count


class StreamWriter:
    def __init__(self, fd, description):
        self.fd, self.path, self.size, self.position = fd, description, None, 0

    def write(self, view, count):
        offset = 0
        while offset < count:
            try:
                offset += os.write(self.fd, view[offset:count])
            except OSError as exc:
                raise SnfError(f"cannot write to {self.path}: {exc.strerror}") from None
        self.position += count

    def sync(self):
        pass


def operation_import(environ):
    check_api_version(environ)
    config = load_config(environ, environ.get("OS_VARIANT"))
    index, device = _indexed_device(environ, "IMPORT")
    try:
        fcntl.fcntl(0, F_SETPIPE_SZ, MIB)
    except OSError:
        pass
    log(f"importing stdin into disk {index} ({device})")
    reader = io.FileIO(0, "rb", closefd=False)
    with disk_locks([(index, device)], "import"), DiskWriter(device) as writer:
        progress = CopyProgress(None, None, 30, f"import disk {index}")
        copied = copy_stream(reader, writer, config.COPY_BUFFER_SIZE, progress, overlap=config.COPY_OVERLAP,
                             writers=config.COPY_WRITERS, sparse=config.SPARSE_COPY)
        writer.sync()
    log(f"imported disk {index}: {copied} bytes")


def operation_rename(environ):
    old, new = environ.get("OLD_INSTANCE_NAME", "?"), environ.get("INSTANCE_NAME", "?")
    if environ.get("OS_API_VERSION") != OS_API_VERSION:
        warn(f"OS API version {environ.get('OS_API_VERSION')!r} is not 20")
    log(f"instance renamed from {old} to {new}; nothing to change on its disks")


def operation_verify(environ, args):
    if args != ["parameters"]:
        raise usage_error("usage: verify parameters")
    config = load_config(environ, environ.get("OS_VARIANT"))
    params = collect_parameters(environ, config, fetch_config_url=False)
    problems = validate_parameters(params)
    if params.get("config_url") and not problems:
        log("config_url given: the other parameters are checked when it is fetched at create time")
    if problems:
        for problem in problems[:-1]:
            print(printable(problem), file=sys.stderr, flush=True)
        raise SnfError(problems[-1], 2)
    resolve_helper(config.HELPER_DIR)   # Ganeti runs verify on every node before an add


# ---------------------------------------------------------------------------
# `deploy`: the same pipeline without Ganeti
# ---------------------------------------------------------------------------

DEPLOY_DESCRIPTION = """\
Deploy an image onto a disk file or block device without Ganeti (plain KVM,
libvirt, tests): the image is copied onto the first --disk with O_DIRECT and
then customized by the helper VM, exactly as Ganeti's create would do.

Parameters are the OS parameters of the OS definition. Secrets never go on
the command line: give them in files (--passwd-file FILE, '-' = stdin) or in
the environment as OSP_IMG_PASSWD, OSP_AUTH_KEYS, ... (as Ganeti passes them).
The configuration is /etc/default/snf-image (or $SNF_IMAGE_CONFIG)."""


def deploy_parser():
    import argparse
    parser = argparse.ArgumentParser(prog="snf-image-host.py deploy", description=DEPLOY_DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    target = parser.add_argument_group("target")
    target.add_argument("--disk", action="append", required=True, metavar="PATH",
                        help="disk file or block device (repeat for more disks; the image goes onto the first)")
    target.add_argument("--hostname", default="snf-image-vm", help="host name of the new system")
    target.add_argument("--nic", action="append", default=[], metavar="KEY=VALUE,...",
                        help="a NIC as Ganeti describes it: mac=..,ip=..,mode=..,link=..,"
                             "network_subnet=..,network_gateway=..,network_subnet6=..,"
                             "network_gateway6=..,network_tags=..")
    target.add_argument("--variant", default="", help="OS variant (reads VARIANTS_DIR/VARIANT.conf)")
    image = parser.add_argument_group("image (OS parameters)")
    image.add_argument("--img-id", help="local://NAME, NAME, http(s)/ftp URL, null or a back-end id")
    image.add_argument("--img-format", help="diskdump, extdump or ntfsdump")
    image.add_argument("--img-properties", metavar="JSON", help="image properties (JSON object)")
    image.add_argument("--inst-properties", metavar="JSON", help="instance properties (JSON object)")
    image.add_argument("--config-url", metavar="URL", help="JSON document with the parameters")
    image.add_argument("--os-answer-file", metavar="URL", help="Windows answer file URL")
    secret = parser.add_argument_group("secrets (files; '-' reads stdin)")
    for name in ("passwd", "passwd-hash", "auth-keys", "img-personality", "cloud-userdata",
                 "os-product-key"):
        secret.add_argument(f"--{name}-file", metavar="FILE")
    run = parser.add_argument_group("run")
    run.add_argument("--no-helper", action="store_true",
                     help="stop after the copy (the image is not customized)")
    run.add_argument("--plain", action="store_true",
                     help="print the plain log also on a terminal (without a terminal, "
                          "e.g. into a pipe or file, the log is always plain)")
    return parser


def _read_secret(path, stdin_state):
    if path == "-":
        if stdin_state["used"]:
            raise usage_error("only one secret can be read from stdin")
        stdin_state["used"] = True
        data = sys.stdin.read()
    else:
        try:
            data = Path(path).read_text()
        except OSError as exc:
            raise usage_error(f"cannot read {path}: {exc.strerror}") from None
    return data[:-1] if data.endswith("\n") and data.count("\n") == 1 else data


class TerminalView:
    """What `deploy` shows on a terminal in place of the plain log: a bar for
    the copy, each task of the helper VM as it runs, the other messages
    without timestamps, and the final line. It is a filter over the very log
    lines a pipe receives (the [MONITOR] JSON messages among them), so both
    show the same events; it replaces sys.stderr while `deploy` runs."""

    LOG_LINE = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d ([A-Z]+): (.*)")
    # shown as the bar and the task lines once monitor messages arrive
    SUMMARIZED = ("copy: ", "helper: task ", "HELPER: ")

    def __init__(self, stream):
        import shutil
        self.stream, self.width = stream, max(40, min(shutil.get_terminal_size().columns, 100))
        self.lock = threading.Lock()
        self.partial, self.transient, self.monitored = "", None, False
        self.task = self.copy_started = None

    def __enter__(self):
        self.saved, sys.stderr = sys.stderr, self
        return self

    def __exit__(self, *exc_info):
        sys.stderr = self.saved
        with self.lock:
            if self.partial:
                self._line(self.partial)
            if self.transient:
                self.stream.write("\n")
            self.stream.flush()

    def write(self, text):
        with self.lock:
            *lines, self.partial = (self.partial + text).split("\n")
            for line in lines:
                self._line(line)
        return len(text)

    def flush(self):
        self.stream.flush()

    def isatty(self):
        return True

    def fileno(self):
        return self.stream.fileno()

    def _line(self, line):
        match = self.LOG_LINE.fullmatch(line)
        # without a timestamp: the helper's console, the final ERROR line, usage
        level, message = match.groups() if match else (None, line)
        if message.startswith("[MONITOR] "):
            with suppress(ValueError, AttributeError):
                self._monitor(json.loads(message[len("[MONITOR] "):]))
            return
        if level == "DEBUG" or (self.monitored and message.startswith(self.SUMMARIZED)):
            return
        self._show(message if level in (None, "INFO") else f"{level.lower()}: {message}")

    def _monitor(self, message):
        self.monitored = True
        kind, subtype = message.get("type"), message.get("subtype")
        if kind == "image-copy-progress":
            self._copy_bar(int(message.get("position", 0)), int(message.get("total", 0)))
        elif kind == "image-helper" and subtype == "task-start":
            self.task = (message.get("task", "?"), time.monotonic())
            self._show(f"  task {self.task[0]} ...", transient="task")
        elif kind == "image-helper" and subtype == "task-end" and self.task:
            name, started = self.task
            self._show(f"  task {name} done ({time.monotonic() - started:.1f} s)")
            self.task = None
        elif kind == "image-helper" and subtype in ("warning", "error"):
            lines = message.get("messages") or str(message.get("stderr", "")).splitlines()
            for text in lines:
                self._show(f"  {subtype}: {text}")

    def _copy_bar(self, position, total):
        now = time.monotonic()
        if self.copy_started is None:
            self.copy_started = (now, position)
        elapsed = max(now - self.copy_started[0], 1e-3)
        rate = (position - self.copy_started[1]) / elapsed / MIB
        if total:
            done = min(position / total, 1.0)
            text = f" {done * 100:5.1f}%  {human_size(position)} of {human_size(total)}  {rate:.0f} MiB/s"
            cells = max(self.width - len(text) - 7, 10)
            filled = int(done * cells)
            self._show(f"copy [{'#' * filled}{'-' * (cells - filled)}]{text}", transient="bar")
        else:
            self._show(f"copy {human_size(position)}  {rate:.0f} MiB/s", transient="bar")

    def _show(self, text, transient=None):
        """A line that stays, or a transient one: "bar" (rewritten by the next
        bar, kept as it last was under anything else) or "task" (a running
        task, rewritten by whatever comes next)."""
        if self.transient == "task" or (self.transient == "bar" and transient == "bar"):
            prefix = "\r\x1b[K"
        else:
            prefix = "\n" if self.transient else ""
        self.stream.write(prefix + text + ("" if transient else "\n"))
        self.stream.flush()
        self.transient = transient


def operation_deploy(args, process_environ):
    parser = deploy_parser()
    options = parser.parse_args(args)
    view = TerminalView(sys.stderr) if sys.stderr.isatty() and not options.plain else nullcontext()
    with view:
        _deploy(options, process_environ)


def _deploy(options, process_environ):
    environ = {key: value for key, value in process_environ.items()
               if key.startswith("OSP_") or key in ("SNF_IMAGE_CONFIG", "PATH")}
    environ.update({"OS_API_VERSION": OS_API_VERSION, "OS_VARIANT": options.variant,
                    "INSTANCE_NAME": options.hostname, "HYPERVISOR": "kvm",
                    "DISK_COUNT": str(len(options.disk)), "NIC_COUNT": str(len(options.nic))})
    for index, path in enumerate(options.disk):
        if not _is_disk_file(path):
            raise usage_error(f"--disk {path}: not a block device or regular file")
        environ[f"DISK_{index}_PATH"] = path
    for index, text in enumerate(options.nic):
        for item in text.split(","):
            key, sep, value = item.partition("=")
            if not sep or not re.fullmatch(r"[a-z0-9_]+", key):
                raise usage_error(f"--nic {text!r}: expected key=value pairs")
            environ[f"NIC_{index}_{key.upper()}"] = value
    plain = {"img_id": options.img_id, "img_format": options.img_format,
             "img_properties": options.img_properties, "inst_properties": options.inst_properties,
             "config_url": options.config_url, "os_answer_file": options.os_answer_file}
    for name, value in plain.items():
        if value is not None:
            environ["OSP_" + name.upper()] = value
    stdin_state = {"used": False}
    files = {"img_passwd": options.passwd_file, "img_passwd_hash": options.passwd_hash_file,
             "auth_keys": options.auth_keys_file, "img_personality": options.img_personality_file,
             "cloud_userdata": options.cloud_userdata_file, "os_product_key": options.os_product_key_file}
    for name, path in files.items():
        if path is not None:
            environ["OSP_" + name.upper()] = _read_secret(path, stdin_state)
    operation_create(environ, run_helper=not options.no_helper)


# ---------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------

USAGE = """usage: snf-image-host.py VERB
  create | import | export | rename   run by Ganeti (OS API 20) with its environment
  verify parameters                   check the OSP_* parameters
  deploy --help                       deploy an image without Ganeti"""


def withhold_parameters_from_children():
    """The OS parameters (passwords, keys, user data, URLs with credentials)
    are read from `environ` once; no child (qemu, the progress monitor,
    back-ends, mkfs) inherits them."""
    for key in [key for key in os.environ if key.startswith("OSP_")]:
        del os.environ[key]


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
_deferral = {"depth": 0, "pending": None}


def _interrupted(signum):
    return SnfError(f"interrupted by signal {signal.Signals(signum).name}")


def _terminate(signum, _frame):
    """The first stop signal unwinds the operation (every resource is a context
    manager); further ones are ignored so that they cannot cut the clean-up short.
    Inside stop_signals_deferred the unwinding waits for the end of the block."""
    for other in STOP_SIGNALS:
        signal.signal(other, signal.SIG_IGN)
    if _deferral["depth"]:
        _deferral["pending"] = signum
        return
    raise _interrupted(signum)


@contextmanager
def stop_signals_deferred():
    """A stop signal arriving inside the block takes effect at its end: what
    the block does (start a process and record its pid) is not cut in two."""
    _deferral["depth"] += 1
    try:
        yield
    finally:
        _deferral["depth"] -= 1
    if not _deferral["depth"] and _deferral["pending"] is not None:
        signum, _deferral["pending"] = _deferral["pending"], None
        raise _interrupted(signum)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    for signum in STOP_SIGNALS:
        signal.signal(signum, _terminate)
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE, file=sys.stderr if not argv else sys.stdout)
        return 2 if not argv else 0
    verb, rest = argv[0], argv[1:]
    environ = dict(os.environ)
    withhold_parameters_from_children()
    try:
        if verb == "guard-workdir" and len(rest) == 1:
            guard_workdir(rest[0])
        elif verb == "create" and not rest:
            operation_create(environ)
        elif verb == "import" and not rest:
            operation_import(environ)
        elif verb == "export" and not rest:
            operation_export(environ)
        elif verb == "rename":
            operation_rename(environ)
        elif verb == "verify":
            operation_verify(environ, rest)
        elif verb == "deploy":
            operation_deploy(rest, environ)
        else:
            raise usage_error(f"unknown verb or arguments: {' '.join(argv)[:80]!r}\n{USAGE}")
    except SnfError as exc:
        print(f"ERROR: {printable(exc)}", file=sys.stderr, flush=True)
        return exc.exit_code
    except KeyboardInterrupt:
        print("ERROR: interrupted", file=sys.stderr, flush=True)
        return 1
    except Exception as exc:        # a bug: keep the traceback, but still end with one line
        import traceback
        traceback.print_exc()
        print(f"ERROR: internal error ({type(exc).__name__}): {printable(' '.join(str(exc).split())[:200])}",
              file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
