"""snf-image-host.py image sources: local (IMAGE_DIR guards, checksums,
compression), network (a real http.server on 127.0.0.1: redirects, 404,
connection cut mid-stream, missing Content-Length), null, and external
back-ends with the original protocol (-p / -s / stream, priorities, .disabled).
Each case runs the real `deploy --no-helper` path onto a disk file."""

import bz2
import gzip
import hashlib
import lzma
import os

import pytest

from conftest import load_script
from host_testlib import HttpServer, Site, last_line

host = load_script("snf-image-host.py")
MIB = 1024 * 1024


def make_disk(path, size=8 * MIB, fill=b"\xee"):
    path.write_bytes(fill * size)
    return path


def image_bytes(size=3 * MIB + 123):
    return os.urandom(size)


def deploy_ok(site, disk, img_id, img_format="diskdump", **env):
    result = site.deploy("--disk", disk, "--img-id", img_id, "--img-format", img_format,
                         "--no-helper", env=env)
    assert result.returncode == 0, result.stderr.decode()
    return result


def assert_disk_starts_with(disk, data, size=8 * MIB, fill=b"\xee"):
    content = disk.read_bytes()
    assert len(content) == size, "the disk file must keep its size (never truncated)"
    assert content[: len(data)] == data
    assert content[len(data):] == fill * (size - len(data))


# --- local -------------------------------------------------------------------

@pytest.mark.parametrize("img_id", ["local://img.raw", "img.raw", "file://img.raw"])
def test_local_ids(site, tmp_path, img_id):
    data = image_bytes()
    (site.images / "img.raw").write_bytes(data)
    disk = make_disk(tmp_path / "disk")
    deploy_ok(site, disk, img_id)
    assert_disk_starts_with(disk, data)


def test_local_id_without_extension_uses_format_suffix(site, tmp_path):
    data = image_bytes(100_000)
    (site.images / "debian.diskdump").write_bytes(data)
    disk = make_disk(tmp_path / "disk")
    result = deploy_ok(site, disk, "debian")
    assert b"lacks the format extension" in result.stderr
    assert_disk_starts_with(disk, data)


@pytest.mark.parametrize("img_id", ["local://../secret.img", "sub/../../secret.img",
                                    "local:///etc/passwd", "link.img"])
def test_local_escapes_are_refused_and_disk_untouched(site, tmp_path, img_id):
    (site.root / "secret.img").write_bytes(b"secret" * 100)
    (site.images / "sub").mkdir()
    os.symlink(site.root / "secret.img", site.images / "link.img")
    disk = make_disk(tmp_path / "disk")
    before = disk.read_bytes()
    result = site.deploy("--disk", disk, "--img-id", img_id, "--img-format", "diskdump", "--no-helper")
    assert result.returncode != 0
    line = last_line(result)
    assert line.startswith("ERROR: deployment of") and "did not complete" in line
    assert "outside" in line
    assert disk.read_bytes() == before


def test_symlink_inside_image_dir_is_fine(site, tmp_path):
    data = image_bytes(5000)
    (site.images / "real.img").write_bytes(data)
    os.symlink("real.img", site.images / "alias.img")
    disk = make_disk(tmp_path / "disk")
    deploy_ok(site, disk, "local://alias.img")
    assert_disk_starts_with(disk, data)


def test_missing_image_and_missing_image_dir(site, tmp_path):
    disk = make_disk(tmp_path / "disk")
    result = site.deploy("--disk", disk, "--img-id", "nope.img", "--img-format", "diskdump", "--no-helper")
    assert result.returncode == 1 and "does not exist" in last_line(result)
    site.write_config(IMAGE_DIR=site.root / "no-such-dir")
    result = site.deploy("--disk", disk, "--img-id", "nope.img", "--img-format", "diskdump", "--no-helper")
    assert result.returncode == 1 and "IMAGE_DIR" in last_line(result)


@pytest.mark.parametrize("suffix, algorithm", [(".sha256", "sha256"), (".md5sum", "md5")])
def test_checksum_file_verified(site, tmp_path, suffix, algorithm):
    data = image_bytes(2 * MIB + 7)
    (site.images / "c.img").write_bytes(data)
    digest = hashlib.new(algorithm, data).hexdigest()
    (site.images / ("c.img" + suffix)).write_text(f"{digest}  c.img\n")
    disk = make_disk(tmp_path / "disk")
    result = deploy_ok(site, disk, "c.img")
    assert b"verifying the image" in result.stderr
    (site.images / ("c.img" + suffix)).write_text("0" * len(digest) + "  c.img\n")
    result = site.deploy("--disk", disk, "--img-id", "c.img", "--img-format", "diskdump", "--no-helper")
    assert result.returncode == 1 and "checksum mismatch" in last_line(result)


@pytest.mark.parametrize("compress", [gzip.compress, lzma.compress, bz2.compress])
def test_compressed_images_are_decompressed(site, tmp_path, compress):
    data = image_bytes(MIB) + bytes(2 * MIB) + b"tail"
    (site.images / "z.img").write_bytes(compress(data))
    disk = make_disk(tmp_path / "disk")
    deploy_ok(site, disk, "z.img")
    assert_disk_starts_with(disk, data)


def test_corrupt_compressed_image_fails_plainly(site, tmp_path):
    (site.images / "bad.img").write_bytes(gzip.compress(image_bytes(MIB))[:5000])
    disk = make_disk(tmp_path / "disk")
    result = site.deploy("--disk", disk, "--img-id", "bad.img", "--img-format", "diskdump", "--no-helper")
    assert result.returncode == 1 and "did not complete" in last_line(result)


def test_null_keeps_the_disk(site, tmp_path):
    disk = make_disk(tmp_path / "disk")
    result = deploy_ok(site, disk, "null")
    assert b'"progress":0.0' in result.stderr
    assert disk.read_bytes() == b"\xee" * 8 * MIB


# --- network -----------------------------------------------------------------

def test_http_download_and_redirect(site, tmp_path, http_server):
    data = image_bytes()
    http_server.serve("/img", data)
    redirect = http_server.serve("/old", http_server.url("/img"), kind="redirect")
    disk = make_disk(tmp_path / "disk")
    deploy_ok(site, disk, redirect)
    assert_disk_starts_with(disk, data)


def test_http_without_content_length(site, tmp_path, http_server):
    data = image_bytes(MIB + 3)
    url = http_server.serve("/nolen", data, kind="no-length")
    disk = make_disk(tmp_path / "disk")
    deploy_ok(site, disk, url)
    assert_disk_starts_with(disk, data)


def test_http_404_is_a_clear_error(site, tmp_path, http_server):
    disk = make_disk(tmp_path / "disk")
    result = site.deploy("--disk", disk, "--img-id", http_server.url("/missing"),
                         "--img-format", "diskdump", "--no-helper")
    assert result.returncode == 1
    assert "HTTP 404" in last_line(result) and "did not complete" in last_line(result)
    assert disk.read_bytes() == b"\xee" * 8 * MIB


def test_http_connection_cut_mid_stream_fails(site, tmp_path, http_server):
    url = http_server.serve("/cut", image_bytes(4 * MIB), kind="cut")
    disk = make_disk(tmp_path / "disk")
    result = site.deploy("--disk", disk, "--img-id", url, "--img-format", "diskdump", "--no-helper")
    assert result.returncode == 1
    assert "download cut" in last_line(result)


def test_http_refused_connection(site, tmp_path):
    server = HttpServer()
    url = server.url("/x")
    server.close()
    disk = make_disk(tmp_path / "disk")
    result = site.deploy("--disk", disk, "--img-id", url, "--img-format", "diskdump", "--no-helper")
    assert result.returncode == 1 and "cannot fetch image" in last_line(result)


def test_credentials_in_url_are_not_logged(site, tmp_path, http_server):
    data = image_bytes(10_000)
    http_server.serve("/img", data)
    url = http_server.url("/img").replace("http://", "http://user:hunter2pw@")
    disk = make_disk(tmp_path / "disk")
    result = deploy_ok(site, disk, url)
    assert b"hunter2pw" not in result.stderr + result.stdout


# --- external back-ends ----------------------------------------------------------

def write_backend(path, probe_regex, size, payload_command, probe_output="yes"):
    path.write_text(f"""#!/bin/sh
# test back-end with the original protocol
case "$1" in
  -p) case "$2" in {probe_regex}) echo {probe_output};; *) echo no;; esac; exit 0;;
  -s) echo {size}; exit 0;;
esac
{payload_command}
""")
    path.chmod(0o755)


def test_external_source_backend(site, tmp_path):
    data = image_bytes(MIB + 5)
    (tmp_path / "payload").write_bytes(data)
    write_backend(site.backends / "src" / "store", "store:*", len(data), f"cat {tmp_path / 'payload'}")
    disk = make_disk(tmp_path / "disk")
    result = deploy_ok(site, disk, "store:object-1")
    assert b"Using source back-end: store" in result.stderr
    assert_disk_starts_with(disk, data)


def test_external_backend_short_stream_fails(site, tmp_path):
    (tmp_path / "payload").write_bytes(b"x" * 1000)
    write_backend(site.backends / "src" / "store", "store:*", 5000, f"cat {tmp_path / 'payload'}")
    disk = make_disk(tmp_path / "disk")
    result = site.deploy("--disk", disk, "--img-id", "store:1", "--img-format", "diskdump", "--no-helper")
    assert result.returncode == 1 and "stream ended after 1000 of 5000" in last_line(result)


def test_external_backend_failure_exit_code(site, tmp_path):
    write_backend(site.backends / "src" / "store", "store:*", 0, "exit 7")
    disk = make_disk(tmp_path / "disk")
    result = site.deploy("--disk", disk, "--img-id", "store:1", "--img-format", "diskdump", "--no-helper")
    assert result.returncode == 1 and "failed (exit 7)" in last_line(result)


def test_directory_backend_priority_and_disabled(site, tmp_path):
    data_a, data_b = b"A" * 4096, b"B" * 8192
    (tmp_path / "a").write_bytes(data_a)
    (tmp_path / "b").write_bytes(data_b)
    (site.backends / "src" / "alpha").mkdir()
    write_backend(site.backends / "src" / "alpha" / "alpha", "*", len(data_a), f"cat {tmp_path / 'a'}")
    write_backend(site.backends / "src" / "beta", "*", len(data_b), f"cat {tmp_path / 'b'}")
    disk = make_disk(tmp_path / "disk")
    # equal priority (50): reverse name order, as upstream → beta first
    deploy_ok(site, disk, "anything")
    assert disk.read_bytes()[:8192] == data_b
    (site.backends_config / "src" / "alpha.priority").write_text("60\n")
    disk = make_disk(tmp_path / "disk")
    deploy_ok(site, disk, "anything")
    assert disk.read_bytes()[:4096] == data_a and disk.read_bytes()[4096:8192] == b"\xee" * 4096
    (site.backends_config / "src" / "alpha.disabled").write_text("")
    (site.backends_config / "src" / "beta.priority").write_text("abc")
    disk = make_disk(tmp_path / "disk")
    result = deploy_ok(site, disk, "anything")
    assert b"Invalid priority" in result.stderr or b"invalid priority" in result.stderr
    assert disk.read_bytes()[:8192] == data_b


def test_backend_probe_must_print_exactly_yes(site, tmp_path):
    write_backend(site.backends / "src" / "loud", "*", 4, "printf abcd", probe_output="YES")
    (site.backends / "src" / "noexec").write_text("#!/bin/sh\necho yes\n")
    disk = make_disk(tmp_path / "disk")
    result = site.deploy("--disk", disk, "--img-id", "thing:1", "--img-format", "diskdump", "--no-helper")
    assert result.returncode == 1 and "no source back-end can handle" in last_line(result)
    assert b"non-executable" in result.stderr


def test_external_destination_backend_for_uri_disk(tmp_path):
    """A URI-only disk (DISK_0_URI) goes through a dst back-end reading stdin."""
    import subprocess
    import sys
    import ganeti_env
    site = Site(tmp_path / "site")
    out = tmp_path / "received"
    (site.backends / "dst" / "catcher").write_text(
        f"#!/bin/sh\ncase \"$1\" in -p) case \"$2\" in catch:*) echo yes;; *) echo no;; esac; exit 0;; esac\n"
        f"cat > {out}\n")
    (site.backends / "dst" / "catcher").chmod(0o755)
    data = image_bytes(MIB + 1)
    (site.images / "u.img").write_bytes(data)
    env = ganeti_env.create_env([{"uri": "catch:vol1"}], osparams={"img_id": "u.img", "img_format": "diskdump"})
    env["SNF_IMAGE_CONFIG"] = str(site.config)
    # create with the helper would need a real helper VM: the copy is what is tested here,
    # so run the module's create with run_helper=False in a child interpreter.
    code = ("import sys; sys.path.insert(0, %r); from conftest import load_script; "
            "h = load_script('snf-image-host.py'); h.operation_create(dict(__import__('os').environ), "
            "run_helper=False)" % str(os.path.dirname(__file__)))
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, timeout=120)
    assert result.returncode == 0, result.stderr.decode()
    assert out.read_bytes() == data


# --- config_url ---------------------------------------------------------------------

def test_config_url_supplies_parameters(site, tmp_path, http_server):
    import json
    data = image_bytes(70_000)
    (site.images / "from-url.img").write_bytes(data)
    url = http_server.serve("/config.json", json.dumps({"IMG_ID": "from-url.img", "img_format": "diskdump",
                                                        "ignored_key": "x"}).encode())
    disk = make_disk(tmp_path / "disk")
    result = site.deploy("--disk", disk, "--img-id", "overridden.img", "--config-url", url, "--no-helper")
    assert result.returncode == 0, result.stderr.decode()
    assert_disk_starts_with(disk, data)


def test_config_url_errors(site, tmp_path, http_server):
    disk = make_disk(tmp_path / "disk")
    bad = http_server.serve("/bad.json", b'{"img_properties": {"A": 1}}')
    for url, fragment in ((http_server.url("/missing.json"), "HTTP 404"), (bad, "must be a string")):
        result = site.deploy("--disk", disk, "--config-url", url, "--no-helper")
        assert result.returncode != 0 and fragment in last_line(result)
    assert disk.read_bytes() == b"\xee" * 8 * MIB


def test_checksum_of_compressed_image(site, tmp_path):
    data = image_bytes(MIB)
    packed = lzma.compress(data)
    (site.images / "p.img").write_bytes(packed)
    (site.images / "p.img.sha256").write_text(hashlib.sha256(packed).hexdigest() + "\n")
    disk = make_disk(tmp_path / "disk")
    deploy_ok(site, disk, "p.img")
    assert_disk_starts_with(disk, data)
    (site.images / "p.img.sha256").write_text(hashlib.sha256(data).hexdigest() + "\n")
    result = site.deploy("--disk", disk, "--img-id", "p.img", "--img-format", "diskdump", "--no-helper")
    assert result.returncode == 1 and "checksum mismatch" in last_line(result)
