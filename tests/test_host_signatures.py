"""Signed images: a detached OpenPGP signature next to the image (NAME.sig, or
URL.sig for a download) checked with the real gpgv against IMAGE_KEYRING,
through the real `deploy` path. A local image is verified before the copy
(a bad or missing-but-required signature leaves the disk untouched); a
download is verified while it is copied."""

import os
import subprocess

import pytest

from conftest import require_programs
from host_testlib import last_line

MIB = 1024 * 1024
ORIGINAL = b"\x33" * (2 * MIB)


@pytest.fixture(scope="module")
def signer(tmp_path_factory):
    """A throw-away signing key; sign(path) writes path.sig; the keyring for gpgv."""
    require_programs("gpg", "gpgv")
    home = tmp_path_factory.mktemp("gnupg")
    os.chmod(home, 0o700)
    gpg = ["gpg", "--batch", "--homedir", str(home), "--pinentry-mode", "loopback", "--passphrase", ""]
    subprocess.run(gpg + ["--quick-gen-key", "snf-image test <test@example.org>", "ed25519", "sign", "never"],
                   check=True, capture_output=True)
    keyring = home / "trusted.gpg"
    keyring.write_bytes(subprocess.run(gpg + ["--export"], check=True, capture_output=True).stdout)

    def sign(path, target=None):
        subprocess.run(gpg + ["--detach-sign", "--output", str(target or f"{path}.sig"), str(path)],
                       check=True, capture_output=True)
    sign.keyring = keyring
    return sign


@pytest.fixture
def disk(tmp_path):
    path = tmp_path / "disk"
    path.write_bytes(ORIGINAL)
    return path


def deploy(site, disk, img_id):
    return site.deploy("--disk", disk, "--img-id", img_id, "--img-format", "diskdump", "--no-helper", timeout=120)


def test_local_signatures(site, disk, signer, tmp_path):
    site.write_config(IMAGE_KEYRING=signer.keyring)
    image = site.images / "signed.img"
    image.write_bytes(os.urandom(MIB))
    signer(image)
    result = deploy(site, disk, "signed.img")
    assert result.returncode == 0, result.stderr.decode()[-1000:]
    assert disk.read_bytes()[:MIB] == image.read_bytes()
    # tampered with after signing: refused before writing
    disk.write_bytes(ORIGINAL)
    tampered = site.images / "tampered.img"
    tampered.write_bytes(image.read_bytes()[:-1] + b"\0")
    os.link(f"{image}.sig", f"{tampered}.sig")
    result = deploy(site, disk, "tampered.img")
    assert result.returncode == 1 and "signature does not verify" in last_line(result)
    assert "nothing was written" in last_line(result) and disk.read_bytes() == ORIGINAL
    # unsigned: accepted unless signatures are required
    (site.images / "plain.img").write_bytes(os.urandom(MIB))
    assert deploy(site, disk, "plain.img").returncode == 0
    disk.write_bytes(ORIGINAL)
    site.write_config(IMAGE_SIGNATURE_REQUIRED="yes")
    result = deploy(site, disk, "plain.img")
    assert result.returncode == 2 and "has no signature" in last_line(result)
    assert disk.read_bytes() == ORIGINAL
    # a signature by another key
    other = tmp_path / "other-keyring"
    other.write_bytes(b"")
    site.write_config(IMAGE_KEYRING=other)
    result = deploy(site, disk, "signed.img")
    assert result.returncode == 1 and "signature does not verify" in last_line(result)
    assert disk.read_bytes() == ORIGINAL


def test_required_signature_needs_a_keyring(site, disk):
    site.write_config(IMAGE_SIGNATURE_REQUIRED="yes")
    result = deploy(site, disk, "x.img")
    assert result.returncode == 2 and "needs IMAGE_KEYRING" in last_line(result)


def test_download_signatures(site, disk, signer, tmp_path, http_server):
    site.write_config(IMAGE_KEYRING=signer.keyring, IMAGE_SIGNATURE_REQUIRED="yes")
    data = os.urandom(MIB)
    (tmp_path / "d.img").write_bytes(data)
    signer(tmp_path / "d.img")
    url = http_server.serve("/d.img", data)
    http_server.serve("/d.img.sig", (tmp_path / "d.img.sig").read_bytes())
    result = deploy(site, disk, url)
    assert result.returncode == 0, result.stderr.decode()[-1000:]
    assert disk.read_bytes()[:MIB] == data
    bad = http_server.serve("/bad.img", data[:-1] + b"\1")
    http_server.serve("/bad.img.sig", (tmp_path / "d.img.sig").read_bytes())
    result = deploy(site, disk, bad)
    assert result.returncode == 1 and "signature does not verify" in last_line(result)
    assert "disk now holds this unverified image" in last_line(result)
    unsigned = http_server.serve("/unsigned.img", data)
    disk.write_bytes(ORIGINAL)
    result = deploy(site, disk, unsigned)
    assert result.returncode == 2 and "has no signature" in last_line(result)
    assert disk.read_bytes() == ORIGINAL
