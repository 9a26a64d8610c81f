"""Shared test plumbing: the dash-named scripts as modules (tools/repository.py),
the test cache, fixtures, and the rule that root/loop/qemu tests may skip on a developer machine that
cannot run them but never in CI (CI=true turns such a skip into a failure)."""

import contextlib
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
from repository import REPO, load_script  # noqa: E402  (tests may use tools, not the reverse)

CACHE_DIR = Path(os.environ.get("SNF_IMAGE_TEST_CACHE", "/var/cache/snf-image-tests"))
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def require(condition, reason):
    """Skip when the machine cannot run the test; in CI, fail instead."""
    if condition:
        return
    if IN_CI:
        pytest.fail(f"required in CI but unavailable: {reason}")
    pytest.skip(reason)


def require_root():
    require(os.geteuid() == 0, "needs root")


def require_programs(*programs):
    missing = [p for p in programs if shutil.which(p) is None]
    require(not missing, f"needs {', '.join(missing)}")


def write_tree(root, files):
    """Create {relative path: text} below root; a path ending in / is a directory."""
    for name, text in files.items():
        path = Path(root) / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if name.endswith("/"):
            path.mkdir(exist_ok=True)
        else:
            path.write_text(text)


def image_tree(base, files):
    """Lay out an image's files below base: {"/abs/path": text, a directory as
    None, a symbolic link as ("link", target)}; returns base."""
    for path, content in files.items():
        full = base / path.lstrip("/")
        full.parent.mkdir(parents=True, exist_ok=True)
        if content is None:
            full.mkdir(exist_ok=True)
        elif isinstance(content, tuple):
            full.symlink_to(content[1])
        else:
            full.write_text(content)
    return base


@contextlib.contextmanager
def e2e_site_root(prefix):
    """A private site directory for end-to-end deployments: images/ and an empty
    variants/default.conf, below the test cache (the file system of the cached
    images, so that link_or_copy links them); removed afterwards."""
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix=prefix, dir=CACHE_DIR))
    try:
        (root / "images").mkdir()
        (root / "variants").mkdir()
        (root / "variants" / "default.conf").write_text("")
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


def link_or_copy(source, target):
    """A cached image into a site: a hard link where the file system allows, else a copy."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def run_on_terminal(argv, *, env, streams=("stdin", "stdout", "stderr"), reply=None, timeout=60):
    """Run argv with a pseudo-terminal as the named standard streams (the
    others /dev/null) and read what it shows until it exits. `reply` is
    (prompt, answer): `answer` and a newline are typed once `prompt` shows.
    Returns (exit status, everything shown)."""
    import select
    import subprocess
    import time
    main_fd, terminal_fd = os.openpty()
    chosen = {name: terminal_fd if name in streams else subprocess.DEVNULL
              for name in ("stdin", "stdout", "stderr")}
    proc = subprocess.Popen(argv, env=env, close_fds=True, **chosen)
    os.close(terminal_fd)
    shown, answered = b"", reply is None
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([main_fd], [], [], 0.5)
            if ready:
                try:
                    chunk = os.read(main_fd, 65536)
                except OSError:            # EIO: the last writer closed the terminal
                    chunk = b""
                if not chunk:
                    break
                shown += chunk
            if not answered and reply[0].encode() in shown:
                os.write(main_fd, reply[1].encode() + b"\n")
                answered = True
            if not ready and proc.poll() is not None:
                break
        return proc.wait(timeout=60), shown.decode(errors="replace")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(main_fd)


def require_helper_build():
    """Skip (or fail in CI) where the builder cannot run."""
    require_root()
    require_programs("multistrap", "mkfs.ext4", "depmod", "qemu-system-x86_64", "cp")


@pytest.fixture(scope="session")
def host():
    return load_script("snf-image-host.py")


@pytest.fixture(scope="session")
def helper():
    return load_script("snf-image-helper.py", "snf_image_helper")


@pytest.fixture(scope="session")
def cache_dir():
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    return CACHE_DIR


@pytest.fixture(scope="module")
def lib_dir(tmp_path_factory):
    """SNF_IMAGE_HELPER_LIB for tasks run on the host: the helper program
    importable as snf_image_helper, as the builder installs it in the VM."""
    path = tmp_path_factory.mktemp("helperlib")
    (path / "snf_image_helper.py").symlink_to(REPO / "snf-image-helper.py")
    return path


@pytest.fixture
def site(tmp_path):
    """A private site configuration (IMAGE_DIR, variants, back-ends) under tmp_path."""
    from host_testlib import Site
    return Site(tmp_path / "site")


@pytest.fixture
def http_server():
    """A real HTTP server on 127.0.0.1 with misbehaving routes."""
    from host_testlib import HttpServer
    server = HttpServer()
    yield server
    server.close()


@pytest.fixture(scope="session")
def helper_vm_dir():
    """HELPER_DIR of the helper built from the repository's tasks.d."""
    from helpervm import built_helper_dir
    require_helper_build()
    return built_helper_dir()
