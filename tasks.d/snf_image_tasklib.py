"""Code shared by the configuration tasks of the helper VM (not a task itself).

Pipeline: image source → O_DIRECT copy → floppy + helper VM → **tasks** → SUCCESS.
The tasks in this directory import this module next to themselves; the runner
skips it because its name is not a run-parts task name.  It holds what more
than one task needs:

* ImageRoot: every file the tasks read or write inside the image goes through
  it.  Paths are resolved component by component from an open descriptor of
  the image's root, with chroot semantics for symbolic links (an absolute link
  means the image's root, never the helper's), `..` above the root refused and
  the final component never followed when it is replaced.  So no path or link
  in the image can make a task write outside it.
* the image's passwd/group/sshd_config, blkid probing, cloud-init files,
  program names (each overridable from the environment, e.g. SFDISK=/sbin/sfdisk).
"""

import errno
import fnmatch
import os
import secrets
import stat
import sys

sys.path.insert(0, os.environ.get("SNF_IMAGE_HELPER_LIB", "/usr/lib/snf-image-helper"))
import snf_image_helper as helper  # noqa: E402


class TaskError(Exception):
    """An expected failure of a task: its message is the task's one-line error."""


# --------------------------------------------------------------------------
# Programs and environment
# --------------------------------------------------------------------------

def program(name):
    """The external program `name`, overridable by the environment variable
    of the same name upper-cased with `-`/`.` as `_` (XFS_GROWFS=...)."""
    variable = name.upper().replace("-", "_").replace(".", "_")
    return os.environ.get(variable) or name


def env(name, default=None):
    """SNF_IMAGE_<name> from the task environment."""
    return os.environ.get("SNF_IMAGE_" + name, default)


def require_env(name):
    value = env(name)
    if not value:
        raise TaskError(f"SNF_IMAGE_{name} is not set")
    return value


def osfamily():
    return (helper.prop("OSFAMILY") or "").strip()


def task_name():
    """The task's file name, as upstream's TASKNAME (e.g. 50ChangePassword)."""
    return os.environ.get("TASKNAME") or os.path.basename(sys.argv[0])


def run_task(body):
    """Run a task's body: a TaskError becomes the one-line `ERROR:` of the task."""
    try:
        body()
    except TaskError as error:
        helper.die(str(error))
    except helper.HelperError as error:
        helper.die(str(error))


def info(message):
    """A line on the console log (stderr) that is not a warning."""
    print(message, file=sys.stderr, flush=True)


def run(argv, **kwargs):
    return helper.run(argv, **kwargs)


def probe_device(device):
    """blkid's low-level probe of a device: {"TYPE": ..., "UUID": ..., ...}."""
    result = helper.run([program("blkid"), "-p", "-o", "export", device],
                        capture=True, check=False)
    values = {}
    for line in (result.stdout or "").splitlines():
        key, sep, value = line.partition("=")
        if sep:
            values[key] = value
    return values


def require_block_device(path, what):
    try:
        mode = os.stat(path).st_mode
    except OSError:
        raise TaskError(f"{what} {path} does not exist") from None
    if not stat.S_ISBLK(mode):
        raise TaskError(f"{what} {path} is not a block device")


# --------------------------------------------------------------------------
# Files inside the image
# --------------------------------------------------------------------------

MAX_SYMLINK_HOPS = 40
DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def path_components(path):
    return [part for part in str(path).split("/") if part not in ("", ".")]


class ImageRoot:
    """The mounted image's root; all access below it is symlink-safe (see module doc)."""

    def __init__(self, path):
        self.path = os.path.abspath(path)
        try:
            self.fd = os.open(self.path, DIR_FLAGS)
        except OSError as error:
            raise TaskError(f"Cannot open the image root {self.path}: {error.strerror}") from None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    # -- resolution --------------------------------------------------------

    def _walk(self, components, shown, create=None):
        """Open the directory reached by `components`; return (fd, real names).

        create = (mode, uid, gid) makes missing directories on the way."""
        fd = os.dup(self.fd)
        ancestors = []
        names = []
        todo = list(components)
        hops = 0
        try:
            while todo:
                name = todo.pop(0)
                if name in ("", "."):
                    continue
                if name == "..":
                    if not ancestors:
                        raise TaskError(f"Path {shown} leads outside the image")
                    os.close(fd)
                    fd = ancestors.pop()
                    names.pop()
                    continue
                try:
                    child = os.open(name, DIR_FLAGS, dir_fd=fd)
                except FileNotFoundError:
                    if create is None:
                        raise TaskError(f"Directory {shown} does not exist in the image") from None
                    mode, uid, gid = create
                    os.mkdir(name, 0o700, dir_fd=fd)
                    child = os.open(name, DIR_FLAGS, dir_fd=fd)
                    os.fchown(child, uid, gid)
                    os.fchmod(child, mode)
                except OSError as error:
                    if error.errno not in (errno.ELOOP, errno.ENOTDIR):
                        raise TaskError(f"Cannot open {shown} in the image: {error.strerror}") from None
                    entry = os.stat(name, dir_fd=fd, follow_symlinks=False)
                    if not stat.S_ISLNK(entry.st_mode):
                        raise TaskError(f"{shown}: /{'/'.join(names + [name])} "
                                        "is not a directory") from None
                    hops += 1
                    if hops > MAX_SYMLINK_HOPS:
                        raise TaskError(f"Too many symbolic links in {shown}") from None
                    link = os.readlink(name, dir_fd=fd)
                    todo = path_components(link) + todo
                    if link.startswith("/"):
                        for ancestor in ancestors:
                            os.close(ancestor)
                        ancestors = []
                        names = []
                        os.close(fd)
                        fd = os.dup(self.fd)
                    continue
                ancestors.append(fd)
                fd = child
                names.append(name)
            return fd, names
        except BaseException:
            os.close(fd)
            raise
        finally:
            for ancestor in ancestors:
                os.close(ancestor)

    def _parent(self, path, create=None, follow_last=True):
        """(parent fd, final name, real parent names) of `path`, following a
        final symlink inside the image when follow_last."""
        components = path_components(path)
        hops = 0
        while True:
            if not components or components[-1] == "..":
                raise TaskError(f"Invalid path {path}")
            fd, names = self._walk(components[:-1], path, create)
            name = components[-1]
            if not follow_last:
                return fd, name, names
            try:
                info = os.stat(name, dir_fd=fd, follow_symlinks=False)
            except FileNotFoundError:
                return fd, name, names
            if not stat.S_ISLNK(info.st_mode):
                return fd, name, names
            hops += 1
            if hops > MAX_SYMLINK_HOPS:
                os.close(fd)
                raise TaskError(f"Too many symbolic links in {path}")
            link = os.readlink(name, dir_fd=fd)
            os.close(fd)
            components = path_components(link) if link.startswith("/") else \
                names + path_components(link)

    def real_path(self, path, create=None):
        """Host path of the directory `path` with every symlink resolved inside
        the image (for mount points and chroot work)."""
        fd, names = self._walk(path_components(path), path, create)
        os.close(fd)
        return os.path.join(self.path, *names)

    def guest_path(self, path):
        """The path as the guest sees it, with symlinks resolved (for messages)."""
        fd, name, names = self._parent(path)
        os.close(fd)
        return "/" + "/".join(names + [name])

    # -- queries -----------------------------------------------------------

    def stat(self, path, follow=True):
        try:
            fd, name, _ = self._parent(path, follow_last=follow)
        except TaskError:
            return None
        try:
            return os.stat(name, dir_fd=fd, follow_symlinks=False)
        except OSError:
            return None
        finally:
            os.close(fd)

    def exists(self, path):
        return self.stat(path) is not None

    def is_file(self, path):
        info = self.stat(path)
        return info is not None and stat.S_ISREG(info.st_mode)

    def is_dir(self, path):
        if not path_components(path):
            return True
        info = self.stat(path)
        return info is not None and stat.S_ISDIR(info.st_mode)

    def is_link(self, path):
        info = self.stat(path, follow=False)
        return info is not None and stat.S_ISLNK(info.st_mode)

    def listdir(self, path):
        try:
            fd, _ = self._walk(path_components(path), path)
        except TaskError:
            return []
        try:
            return sorted(os.listdir(fd))
        finally:
            os.close(fd)

    def glob(self, directory, pattern):
        return [f"{directory.rstrip('/')}/{name}" for name in self.listdir(directory)
                if fnmatch.fnmatchcase(name, pattern)]

    def read_bytes(self, path):
        """Contents of a regular file, or None when it does not exist."""
        try:
            fd, name, _ = self._parent(path)
        except TaskError:
            return None
        try:
            file_fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK,
                              dir_fd=fd)
        except OSError:
            return None
        finally:
            os.close(fd)
        with os.fdopen(file_fd, "rb") as handle:
            if not stat.S_ISREG(os.fstat(handle.fileno()).st_mode):
                return None
            return handle.read()

    def read_text(self, path):
        data = self.read_bytes(path)
        return None if data is None else data.decode("utf-8", "surrogateescape")

    # -- changes -----------------------------------------------------------

    def write(self, path, data, mode=None, uid=None, gid=None, parents=None):
        """Create or replace the file `path` atomically (temp file + rename).

        A symbolic link at `path` is replaced, never followed.  mode/uid/gid
        None keep those of the replaced file (0644 root:root for a new one).
        parents = (mode, uid, gid) creates missing parent directories."""
        if isinstance(data, str):
            data = data.encode("utf-8", "surrogateescape")
        fd, name, _ = self._parent(path, create=parents, follow_last=False)
        try:
            try:
                old = os.stat(name, dir_fd=fd, follow_symlinks=False)
            except FileNotFoundError:
                old = None
            if old is not None and stat.S_ISDIR(old.st_mode):
                raise TaskError(f"{path} is a directory in the image")
            keep = old if old is not None and stat.S_ISREG(old.st_mode) else None
            mode = mode if mode is not None else (stat.S_IMODE(keep.st_mode) if keep else 0o644)
            uid = uid if uid is not None else (keep.st_uid if keep else 0)
            gid = gid if gid is not None else (keep.st_gid if keep else 0)
            temporary = f".{name[:200]}.snf-image-{secrets.token_hex(6)}"
            file_fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                              | os.O_CLOEXEC, 0o600, dir_fd=fd)
            try:
                with os.fdopen(file_fd, "wb") as handle:
                    handle.write(data)
                    os.fchown(handle.fileno(), uid, gid)
                    os.fchmod(handle.fileno(), mode)
                os.rename(temporary, name, src_dir_fd=fd, dst_dir_fd=fd)
            except BaseException:
                try:
                    os.unlink(temporary, dir_fd=fd)
                except OSError:
                    pass
                raise
        finally:
            os.close(fd)

    def rewrite(self, path, data):
        """Replace the contents of an existing regular file in place, keeping its
        inode (owner, mode, extended attributes such as SELinux labels)."""
        if isinstance(data, str):
            data = data.encode("utf-8", "surrogateescape")
        fd, name, _ = self._parent(path)
        try:
            try:
                file_fd = os.open(name, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK,
                                  dir_fd=fd)
            except OSError as error:
                raise TaskError(f"Cannot open {path} in the image: {error.strerror}") from None
        finally:
            os.close(fd)
        with os.fdopen(file_fd, "wb") as handle:
            if not stat.S_ISREG(os.fstat(handle.fileno()).st_mode):
                raise TaskError(f"{path} is not a regular file in the image")
            handle.truncate(0)
            handle.write(data)

    def append_line(self, path, line, mode=0o644):
        """Append one line to a text file (a missing final newline is added first)."""
        text = self.read_text(path)
        if text is None:
            self.write(path, line.rstrip("\n") + "\n", mode=mode)
            return
        if text and not text.endswith("\n"):
            text += "\n"
        self.rewrite(path, text + line.rstrip("\n") + "\n")

    def makedirs(self, path, mode=0o755, uid=0, gid=0):
        """Create missing directories of `path`; return its real host path."""
        return self.real_path(path, create=(mode, uid, gid))

    def set_dir_owner(self, path, mode, uid, gid):
        """chown/chmod an existing directory (symlinks resolved inside the image)."""
        fd, _ = self._walk(path_components(path), path)
        try:
            os.fchown(fd, uid, gid)
            os.fchmod(fd, mode)
        finally:
            os.close(fd)

    def remove(self, path):
        """Remove a file or symlink (not followed); True if something was removed."""
        try:
            fd, name, _ = self._parent(path, follow_last=False)
        except TaskError:
            return False
        try:
            os.unlink(name, dir_fd=fd)
            return True
        except FileNotFoundError:
            return False
        except IsADirectoryError:
            raise TaskError(f"{path} is a directory in the image") from None
        finally:
            os.close(fd)


# --------------------------------------------------------------------------
# Users, groups and sshd_config of the image
# --------------------------------------------------------------------------

def parse_passwd(text):
    """{user: (uid, gid, home)} from passwd text."""
    users = {}
    for line in (text or "").splitlines():
        fields = line.split(":")
        if len(fields) < 7 or line.startswith(("#", "+", "-")):
            continue
        try:
            users.setdefault(fields[0], (int(fields[2]), int(fields[3]), fields[5]))
        except ValueError:
            continue
    return users


def parse_group(text):
    """{group: gid} from group text."""
    groups = {}
    for line in (text or "").splitlines():
        fields = line.split(":")
        if len(fields) < 3 or line.startswith(("#", "+", "-")):
            continue
        try:
            groups.setdefault(fields[0], int(fields[2]))
        except ValueError:
            continue
    return groups


def sshd_config_directives(root, path="/etc/ssh/sshd_config", depth=0):
    """(keyword lower-cased, [arguments]) of the global section of sshd_config,
    in the order sshd reads them, following Include (sshd uses the first value
    of most keywords).  Returns None when the file does not exist."""
    text = root.read_text(path)
    if text is None:
        return None
    directives = []
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.replace("=", " ", 1).split() if "=" in line.split()[0] else line.split()
        keyword, arguments = parts[0].lower(), parts[1:]
        if keyword == "match":
            break          # everything after the first Match is conditional
        if keyword == "include" and depth < 8:
            for pattern in arguments:
                if not pattern.startswith("/"):
                    pattern = "/etc/ssh/" + pattern
                directory, _, name_pattern = pattern.rpartition("/")
                for included in root.glob(directory or "/", name_pattern):
                    directives.extend(sshd_config_directives(root, included, depth + 1) or [])
            continue
        directives.append((keyword, arguments))
    return directives


def sshd_config_value(directives, keyword):
    for name, arguments in directives or []:
        if name == keyword.lower():
            return arguments
    return None


# --------------------------------------------------------------------------
# cloud-init
# --------------------------------------------------------------------------

CLOUD_CFG_DIRS = ("/etc/cloud/cloud.cfg.d", "/usr/local/etc/cloud/cloud.cfg.d")
CLOUD_SEED_DIR = "/var/lib/cloud/seed/nocloud-net"
CLOUD_PER_ONCE_DIR = "/var/lib/cloud/scripts/per-once"


def cloud_init_enabled():
    return helper.check_yes_no("CLOUD_INIT")


def cloud_config_name(name=None):
    return f"98_snf-image-{name or task_name()}.cfg"


def cloud_config_path(root, name=None):
    """Where this task's cloud-init configuration goes (upstream's
    get_cloud_init_config, with /usr/local instead of upstream's /local)."""
    for directory in CLOUD_CFG_DIRS:
        if root.is_dir(directory):
            root.makedirs(CLOUD_PER_ONCE_DIR)
            return f"{directory}/{cloud_config_name(name)}"
    raise TaskError("Unable to find directory to host the cloud-init configuration "
                    "(is cloud-init installed in the image?)")


def write_cloud_config(root, text, keep, mode=0o644, name=None):
    """Write this task's cloud.cfg.d file; unless keep, a per-once script
    removes it at the first boot (it holds secrets)."""
    path = cloud_config_path(root, name)
    root.write(path, text, mode=mode, uid=0, gid=0)
    if not keep:
        script = f"{CLOUD_PER_ONCE_DIR}/rm_{cloud_config_name(name)}.sh"
        executable = not env("CLOUD_INIT_DEBUG")
        root.write(script, f"#!/bin/sh\nrm -f {path}\n", mode=0o755 if executable else 0o644,
                   uid=0, gid=0)
    return path


def cloud_seed_dir(root):
    root.makedirs(CLOUD_SEED_DIR)
    return CLOUD_SEED_DIR


def append_meta_data(root, text):
    path = f"{cloud_seed_dir(root)}/meta-data"
    old = root.read_text(path) or ""
    if old and not old.endswith("\n"):
        old += "\n"
    root.write(path, old + text, mode=0o600, uid=0, gid=0)
