"""Faults of URL fetching (UrlFetch, the host's one owner of reading a URL),
against a real HTTP server on 127.0.0.1: credentials never follow a redirect
to another host, a server that drips one byte a second fails within
URL_TIMEOUT, a cut download resumes with Range/If-Range (or reads again from
the start when the server ignores ranges, or fails when the object changed),
and every failure is one line through the real `deploy`/`create` path."""

import hashlib
import http.server
import os
import threading
import time

import pytest

from conftest import load_script
from host_testlib import Site, last_line

host = load_script("snf-image-host.py")
MIB = 1024 * 1024


class Behaviour:
    """What the server does: a shared, mutable script of the test."""

    def __init__(self):
        self.body = b""
        self.etag = '"v1"'
        self.cut_at = []            # byte offsets (of the whole object) where a connection is cut
        self.honour_ranges = True
        self.drip = False
        self.redirect = None
        self.seen = []              # (path, headers) of every request
        self.change_after_first = None
        self.files = {}             # other paths (checksum files); any other *.sha256 etc. is a 404


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    behaviour = None

    def log_message(self, *args):
        pass

    def do_GET(self):
        b = self.behaviour
        b.seen.append((self.path, dict(self.headers)))
        if b.redirect and self.path == "/moved":
            self.send_response(302)
            self.send_header("Location", b.redirect)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if self.path == "/secret-check":
            body = b"got " + self.headers.get("Authorization", "none").encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        path = self.path.split("?")[0]
        if path in b.files or path.endswith((".sha256", ".md5sum", ".sig")):
            body = b.files.get(path)
            self.send_response(200 if body is not None else 404)
            self.send_header("Content-Length", str(len(body or b"")))
            self.end_headers()
            self.wfile.write(body or b"")
            return
        if len(b.seen) > 1 and b.change_after_first is not None:
            b.body, b.etag = b.change_after_first
        start = 0
        wanted = self.headers.get("Range")
        if wanted and b.honour_ranges and self.headers.get("If-Range") == b.etag:
            start = int(wanted.split("=")[1].rstrip("-"))
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(b.body) - 1}/{len(b.body)}")
        else:
            self.send_response(200)
        self.send_header("ETag", b.etag)
        self.send_header("Content-Length", str(len(b.body) - start))
        self.end_headers()
        end = len(b.body)
        cuts = [c for c in b.cut_at if c > start]
        if cuts:
            end = cuts[0]
            b.cut_at.remove(cuts[0])
        if b.drip:
            for index in range(start, end):
                self.wfile.write(b.body[index:index + 1])
                self.wfile.flush()
                time.sleep(0.5)
            return
        self.wfile.write(b.body[start:end])
        self.wfile.flush()
        if end < len(b.body):
            self.connection.shutdown(2)
            self.close_connection = True


@pytest.fixture
def server():
    behaviour = Behaviour()
    handler = type("H", (Handler,), {"behaviour": behaviour})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    behaviour.url = lambda path, host="127.0.0.1": f"http://{host}:{httpd.server_address[1]}{path}"
    yield behaviour
    httpd.shutdown()
    httpd.server_close()


def fetch_all(url, **kwargs):
    kwargs.setdefault("timeout", 10)
    with host.UrlFetch(url, "image", stream=True, **kwargs) as fetch:
        data = bytearray()
        buffer = memoryview(bytearray(256 * 1024))
        while True:
            count = fetch.readinto(buffer)
            if not count:
                return bytes(data)
            data += buffer[:count]


def test_cut_download_resumes_with_range(server):
    server.body = os.urandom(3 * MIB)
    server.cut_at = [MIB, 2 * MIB + 17]
    assert fetch_all(server.url("/img")) == server.body
    ranges = [headers.get("Range") for _, headers in server.seen]
    assert ranges == [None, f"bytes={MIB}-", f"bytes={2 * MIB + 17}-"]
    assert all(headers.get("If-Range") == '"v1"' for _, headers in server.seen[1:])


def test_cut_download_restarts_when_ranges_are_ignored(server):
    server.body = os.urandom(2 * MIB)
    server.cut_at = [MIB + 5]
    server.honour_ranges = False
    assert fetch_all(server.url("/img")) == server.body


def test_resume_is_bounded(server):
    server.body = os.urandom(MIB)
    server.cut_at = [100_000 * n for n in range(1, 9)]
    with pytest.raises(host.SnfError, match="download cut"):
        fetch_all(server.url("/img"))
    assert len(server.seen) == 1 + host.URL_RESUME_ATTEMPTS


def test_object_changed_during_download_fails(server):
    server.body = os.urandom(MIB)
    server.cut_at = [300_000]
    server.change_after_first = (os.urandom(MIB), '"v2"')
    with pytest.raises(host.SnfError, match="changed on the server"):
        fetch_all(server.url("/img"))


def test_dripping_server_fails_within_the_deadline(server):
    server.body = b"{" + b" " * 1000 + b"}"
    server.drip = True
    started = time.monotonic()
    with pytest.raises(host.SnfError, match="URL_TIMEOUT"):
        with host.UrlFetch(server.url("/doc"), "config_url", timeout=2) as fetch:
            fetch.read(MIB)
    assert time.monotonic() - started < 6
    started = time.monotonic()
    with pytest.raises(host.SnfError, match="64 KiB"):
        fetch_all(server.url("/img"), timeout=2)
    assert time.monotonic() - started < 6


def test_credentials_go_only_to_their_own_host(server):
    server.redirect = server.url("/secret-check", host="localhost")      # another host name
    with host.UrlFetch(server.url("/moved").replace("http://", "http://user:pw@"), "x", timeout=10) as fetch:
        assert fetch.read(1000) == b"got none"
    server.redirect = server.url("/secret-check")                        # the same host
    with host.UrlFetch(server.url("/moved").replace("http://", "http://user:pw@"), "x", timeout=10) as fetch:
        assert fetch.read(1000) == b"got Basic dXNlcjpwdw=="


@pytest.mark.parametrize("url, expected", [
    ("http://[::1/x", "invalid URL"),
    ("http://127.0.0.1:99999/x", "invalid URL"),
    ("gopher://127.0.0.1/x", "only http"),
    ("http://127.0.0.1:1/x", "Connection refused"),
])
def test_bad_urls_are_one_error(url, expected):
    with pytest.raises(host.SnfError, match=expected) as info:
        host.UrlFetch(url, "image", timeout=5)
    assert "\n" not in str(info.value)


def test_config_url_drip_through_deploy(tmp_path, server):
    """The real deploy path: a config_url that drips ends as one line, the disk untouched."""
    server.body = b'{"img_id": "x", "img_format": "diskdump"}'
    server.drip = True
    site = Site(tmp_path / "site", URL_TIMEOUT="2")
    disk = tmp_path / "disk"
    disk.write_bytes(b"\x5a" * MIB)
    started = time.monotonic()
    result = site.deploy("--disk", disk, "--config-url", server.url("/cfg"), "--no-helper", timeout=60)
    assert time.monotonic() - started < 20
    assert result.returncode == 1
    assert "config_url" in last_line(result) and "URL_TIMEOUT" in last_line(result)
    assert disk.read_bytes() == b"\x5a" * MIB


def deploy_network_image(site, disk, url):
    return site.deploy("--disk", disk, "--img-id", url, "--img-format", "diskdump",
                       "--no-helper", timeout=120)


@pytest.fixture
def cut_image(tmp_path, server):
    """A 3 MiB network image whose downloads get cut; a site and a 4 MiB disk for it."""
    server.body = os.urandom(3 * MIB)
    disk = tmp_path / "disk"
    disk.write_bytes(bytes(4 * MIB))
    return server, Site(tmp_path / "site"), disk


def test_resumed_image_through_deploy_is_verified(cut_image):
    """A cut network image resumes and lands on the disk byte for byte."""
    server, site, disk = cut_image
    server.cut_at = [MIB + 4096 * 3 + 1]
    result = deploy_network_image(site, disk, server.url("/img.raw"))
    assert result.returncode == 0, result.stderr.decode()[-2000:]
    assert b"resuming" in result.stderr
    written = disk.read_bytes()[:len(server.body)]
    assert hashlib.sha256(written).digest() == hashlib.sha256(server.body).digest()


def test_resumed_download_checked_against_its_checksum_file(cut_image):
    """URL.sha256 next to the image: verified end to end across the resumed connections."""
    server, site, disk = cut_image
    server.cut_at = [MIB + 1, 2 * MIB + 3]
    server.files["/img.raw.sha256"] = hashlib.sha256(server.body).hexdigest().encode() + b"  img.raw\n"
    result = deploy_network_image(site, disk, server.url("/img.raw?token=1"))
    assert result.returncode == 0, result.stderr.decode()[-2000:]
    assert b"verifying the download against" in result.stderr and result.stderr.count(b"resuming") == 2
    assert disk.read_bytes()[:len(server.body)] == server.body
    # the same with a wrong digest: the error says what the disk now holds
    server.files["/img.raw.sha256"] = b"0" * 64 + b"\n"
    server.cut_at = [MIB + 1]
    result = deploy_network_image(site, disk, server.url("/img.raw"))
    assert result.returncode == 1
    assert "sha256 checksum mismatch" in last_line(result) and "disk now holds this bad image" in last_line(result)
