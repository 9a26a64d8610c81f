"""The helper VM for the tests and the benchmarks: built once by the real
builder, cached.

`built_helper_dir(tasks_dir=None)` returns a HELPER_DIR (with `current`,
`kernel`, `initrd`, `image` as `create` expects) built by
snf-image-update-helper.py into
SNF_IMAGE_TEST_CACHE/helper-<hash>/, where the hash covers the builder,
snf-image-helper.py, the tasks directory's content and the Debian suite. The
slow root stage (multistrap + kernel) is shared by all of them in
SNF_IMAGE_TEST_CACHE/helper-root-cache/, so another task set costs seconds.
A file lock keeps two test processes from building at once.

Use from a test module (conftest puts tools/ on sys.path) or a tool:

    from helpervm import built_helper_dir   # (helper_vm_dir is a conftest fixture)

    def test_something(helper_vm_dir): ...                  # repository tasks.d
    def test_other(tmp_path):
        helper_dir = built_helper_dir(tasks_dir=my_tasks)   # another task set

Command line: `python3 tools/helpervm.py [TASKS_DIR]` builds if needed and
prints the HELPER_DIR.
"""

import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from repository import REPO, load_script

BUILDER = REPO / "snf-image-update-helper.py"
HELPER_PROGRAM = REPO / "snf-image-helper.py"
DEFAULT_TASKS = REPO / "tasks.d"
SUITE = os.environ.get("SNF_IMAGE_TEST_SUITE", "trixie")
KEEP_HELPERS = 8  # cached helper-<hash> dirs kept (least recently used go first) ...
PRUNE_AFTER_SECONDS = 3600  # ... but never one used in the last hour (a running session's)
BUILD_TIMEOUT = 1800


def cache_dir():
    return Path(os.environ.get("SNF_IMAGE_TEST_CACHE", "/var/cache/snf-image-tests"))


def inputs_hash(tasks_dir=None):
    """Hash of everything the helper is built from (builder, helper, tasks, suite)."""
    digest = hashlib.sha256()
    digest.update(f"suite={SUITE}\0".encode())
    for path in (BUILDER, HELPER_PROGRAM):
        digest.update(path.read_bytes() if path.exists() else b"<absent>")
        digest.update(b"\0")
    builder = load_script(BUILDER.name)
    builder.hash_tree(digest, Path(tasks_dir) if tasks_dir else DEFAULT_TASKS)
    return digest.hexdigest()[:16]


class _Lock:
    """An exclusive flock on a file, as a context manager."""

    def __init__(self, path):
        self.path = path
        self.fd = None

    def __enter__(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        os.close(self.fd)


def _is_complete(helper_dir):
    return (helper_dir / "current" / "manifest.json").is_file()


def _last_used(path):
    for candidate in (path / ".last-used", path):
        try:
            return candidate.stat().st_mtime
        except FileNotFoundError:
            continue
    return 0.0


def _prune_old(keep_path):
    """Drop the least recently used helper-<hash> dirs beyond KEEP_HELPERS
    that no session has used for PRUNE_AFTER_SECONDS."""
    dirs = [p for p in cache_dir().glob("helper-*") if p.is_dir() and p.name != "helper-root-cache"]
    dirs.sort(key=_last_used)
    for old in dirs[:-KEEP_HELPERS]:
        if old == keep_path or time.time() - _last_used(old) < PRUNE_AFTER_SECONDS:
            continue
        with _Lock(cache_dir() / f"{old.name}.lock"):
            shutil.rmtree(old, ignore_errors=True)


def built_helper_dir(tasks_dir=None, show_progress=False):
    """HELPER_DIR of a helper built with tasks_dir (default: the repository's
    tasks.d), built by the real builder on first use and cached. With
    show_progress the builder's progress lines go to our stdout."""
    tasks = Path(tasks_dir).resolve() if tasks_dir else DEFAULT_TASKS
    key = inputs_hash(tasks)
    helper_dir = cache_dir() / f"helper-{key}"
    with _Lock(cache_dir() / f"helper-{key}.lock"):
        if not _is_complete(helper_dir):
            shutil.rmtree(helper_dir, ignore_errors=True)
            argv = [sys.executable, str(BUILDER), "--build",
                    "--helper-dir", str(helper_dir),
                    "--cache-dir", str(cache_dir() / "helper-root-cache"),
                    "--suite", SUITE, "--tasks", str(tasks),
                    "--helper-program", str(HELPER_PROGRAM)]
            no_settings = cache_dir() / "empty.conf"     # a regular file: /dev/null is refused
            no_settings.write_text("")
            env = dict(os.environ, SNF_IMAGE_CONFIG=str(no_settings))
            proc = subprocess.run(argv, stdout=None if show_progress else subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True, env=env,
                                  timeout=BUILD_TIMEOUT, check=False)
            if proc.returncode != 0 or not _is_complete(helper_dir):
                shutil.rmtree(helper_dir, ignore_errors=True)
                raise RuntimeError(f"helper build failed (exit {proc.returncode}):\n"
                                   f"{(proc.stdout or '')[-3000:]}\n{proc.stderr[-3000:]}")
        (helper_dir / ".last-used").touch()
    _prune_old(helper_dir)
    return helper_dir


if __name__ == "__main__":
    started = time.monotonic()
    result = built_helper_dir(sys.argv[1] if len(sys.argv) > 1 else None)
    print(result)
    print(f"({time.monotonic() - started:.1f} s)", file=sys.stderr)
