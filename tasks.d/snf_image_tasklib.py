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
* the plan for growing ext2/3/4 that tasks 20, 40 and 81 share
  (ExtSuperblock: the size resize2fs would give it, and whether the kernel
  may grow it online; the offline check and growth).
* what the image's systemd will do at the next boot: whether it is a first
  boot (machine-id(5)), which units are pulled in, and whether a unit's
  conditions hold (SystemdUnits: one listing of each unit directory and one
  read of each unit file per analysis).
"""

import errno
import fnmatch
import os
import re
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


# The file systems the disk tasks act on, told apart by their own
# signatures in one read of the device instead of a blkid run (a tenth of a
# second under TCG).  Anything else, and any device that also carries a
# signature of something that may hold a file system (LUKS, LVM, md RAID,
# swap) or more than one of these, is left to blkid.
EXT_MAGIC_OFFSET = 1024 + 0x38
EXT_COMPAT_HAS_JOURNAL = 0x4
EXT_INCOMPAT_JOURNAL_DEV = 0x8
EXT2_INCOMPAT = 0x2 | 0x10                  # filetype, meta_bg
EXT3_INCOMPAT = EXT2_INCOMPAT | 0x4         # + recover
EXT2_RO_COMPAT = 0x1 | 0x2 | 0x4            # sparse_super, large_file, btree_dir
FS_SIGNATURES = (("xfs", 0, b"XFSB"), ("ntfs", 3, b"NTFS    "),
                 ("btrfs", 0x10040, b"_BHRfS_M"), ("ext", EXT_MAGIC_OFFSET, b"\x53\xef"))
OTHER_SIGNATURES = ((0, b"LUKS\xba\xbe"), (0, b"LABELONE"), (512, b"LABELONE"),
                    (1024, b"LABELONE"), (1536, b"LABELONE"), (0, b"\xfc\x4e\x2b\xa9"),
                    (4096, b"\xfc\x4e\x2b\xa9"), (4086, b"SWAPSPACE2"), (4086, b"SWAP-SPACE"))
MD_MAGIC = b"\xfc\x4e\x2b\xa9"
PROBE_BYTES = 0x10040 + 8


def ext_type(superblock):
    """ext2, ext3 or ext4 (blkid's rule), or None for an external journal,
    from the 1024-byte ext superblock."""
    compat, incompat, ro_compat = (int.from_bytes(superblock[offset:offset + 4], "little")
                                   for offset in (0x5C, 0x60, 0x64))
    if incompat & EXT_INCOMPAT_JOURNAL_DEV:
        return None
    if ro_compat & ~EXT2_RO_COMPAT:
        return "ext4"
    if compat & EXT_COMPAT_HAS_JOURNAL:
        return "ext3" if not incompat & ~EXT3_INCOMPAT else "ext4"
    return "ext2" if not incompat & ~EXT2_INCOMPAT else "ext4"


def _quick_filesystem_type(device):
    """The file system type by its signature, or None when blkid must tell."""
    try:
        fd = os.open(device, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        head = os.pread(fd, PROBE_BYTES, 0)
        size = os.lseek(fd, 0, os.SEEK_END)
        # md RAID 0.90 and 1.0 superblocks live at the end of the device
        tails = [os.pread(fd, 4, offset) for offset in
                 ((size & ~0xFFFF) - 0x10000, ((size >> 9) - 16 & ~7) * 512) if offset > 0]
    except OSError:
        return None
    finally:
        os.close(fd)
    if any(head[offset:offset + len(magic)] == magic for offset, magic in OTHER_SIGNATURES) \
            or MD_MAGIC in tails:
        return None
    found = [name for name, offset, magic in FS_SIGNATURES
             if head[offset:offset + len(magic)] == magic]
    if len(found) != 1:
        return None
    if found[0] == "ext":
        return ext_type(head[1024:2048])
    return found[0]


def filesystem_type(device):
    """The type of the file system on `device` (ext2/3/4, xfs, btrfs, ntfs
    read directly; anything else as blkid -p tells it), or ""."""
    return _quick_filesystem_type(device) or probe_device(device).get("TYPE", "")


def require_block_device(path, what):
    try:
        mode = os.stat(path).st_mode
    except OSError:
        raise TaskError(f"{what} {path} does not exist") from None
    if not stat.S_ISBLK(mode):
        raise TaskError(f"{what} {path} is not a block device")


# --------------------------------------------------------------------------
# Growing ext2/3/4 (tasks 20, 40 and 81 share one plan)
# --------------------------------------------------------------------------
#
# FilesystemResizeUnmounted owns the growth of ext*: excluding it leaves the
# file system as it is, as ever.  It grows the file system offline itself
# (e2fsck -f -p, resize2fs) unless the kernel can grow it online, in which
# case FilesystemResizeMounted does so once it is mounted (the
# EXT4_IOC_RESIZE_FS ioctl, as resize2fs does for a mounted file system) and
# FilesystemResizeAfterUmount grows offline whatever is still smaller than
# its partition then.  The size aimed at is resize2fs's own choice.

EXT_TYPES = ("ext2", "ext3", "ext4")
EXT_STATE_VALID = 0x1
EXT_STATE_ERROR = 0x2
EXT_COMPAT_RESIZE_INODE = 0x10
EXT_COMPAT_SPARSE_SUPER2 = 0x200
EXT_INCOMPAT_RECOVER = 0x4
EXT_INCOMPAT_META_BG = 0x10
EXT_INCOMPAT_64BIT = 0x80
EXT_RO_COMPAT_SPARSE_SUPER = 0x1
EXT_RO_COMPAT_BIGALLOC = 0x200
E2FSCK_OK = (0, 1)                          # 1 = errors corrected
EXT_GROWER = "20FilesystemResizeUnmounted"
ONLINE_GROWER = "40FilesystemResizeMounted"
SAFETY_NET = "81FilesystemResizeAfterUmount"


def _u16(raw, offset):
    return int.from_bytes(raw[offset:offset + 2], "little")


def _u32(raw, offset):
    return int.from_bytes(raw[offset:offset + 4], "little")


class ExtSuperblock:
    """What growing needs from a 1024-byte ext2/3/4 superblock."""

    def __init__(self, raw):
        self.compat, self.incompat, self.ro_compat = (_u32(raw, o) for o in (0x5C, 0x60, 0x64))
        self.is_64bit = bool(self.incompat & EXT_INCOMPAT_64BIT)
        self.blocks = _u32(raw, 0x04) + ((_u32(raw, 0x150) << 32) if self.is_64bit else 0)
        self.block_size = 1024 << _u32(raw, 0x18)
        self.first_data_block = _u32(raw, 0x14)
        self.blocks_per_group = _u32(raw, 0x20)
        self.inodes_per_group = _u32(raw, 0x28)
        self.state = _u16(raw, 0x3A)
        inode_size = _u16(raw, 0x58) if _u32(raw, 0x4C) >= 1 else 128
        self.inode_blocks_per_group = -(-self.inodes_per_group * inode_size // self.block_size)
        self.reserved_gdt_blocks = _u16(raw, 0xCE)
        desc_size = _u16(raw, 0xFE) if self.is_64bit else 32
        self.descriptors_per_block = self.block_size // (desc_size or 32)
        self.backup_groups = (_u32(raw, 0x24C), _u32(raw, 0x250))

    def state_words(self):
        """The state as tune2fs words it."""
        words = "clean" if self.state & EXT_STATE_VALID else "not clean"
        return words + " with errors" if self.state & EXT_STATE_ERROR else words

    def needs_recovery(self):
        return bool(self.incompat & EXT_INCOMPAT_RECOVER)

    def groups(self, blocks):
        return -(-(blocks - self.first_data_block) // self.blocks_per_group)

    def descriptor_blocks(self, blocks):
        return -(-self.groups(blocks) // self.descriptors_per_block)

    def has_backup(self, group):
        """Whether group `group` holds a superblock backup (libext2fs's rule)."""
        if group == 0:
            return True
        if self.compat & EXT_COMPAT_SPARSE_SUPER2:
            return group in self.backup_groups
        if group == 1 or not self.ro_compat & EXT_RO_COMPAT_SPARSE_SUPER:
            return True
        if group % 2 == 0:
            return False
        for base in (3, 5, 7):
            power = base
            while power < group:
                power *= base
            if power == group:
                return True
        return False

    def fitting_blocks(self, device_bytes):
        """The block count resize2fs gives the file system on a device of
        `device_bytes` (its default size): the device's size rounded down
        to whole pages, and a last group too small for its own metadata (and
        50 blocks) dropped.  None when a 32-bit file system cannot get there."""
        blocks = device_bytes // self.block_size
        page_blocks = os.sysconf("SC_PAGE_SIZE") // self.block_size
        if page_blocks > 1:
            blocks -= blocks % page_blocks
        if not self.is_64bit:
            if blocks == 1 << 32:
                blocks -= 1
            elif blocks > 1 << 32:
                return None
        while blocks > self.first_data_block:
            groups = self.groups(blocks)
            overhead = 2 + self.inode_blocks_per_group
            if self.compat & EXT_COMPAT_SPARSE_SUPER2:
                has_backup = self.backup_groups[0 if groups == 2 else 1] != 0
            else:
                has_backup = self.has_backup(groups - 1)
            if has_backup:
                overhead += 1 + self.descriptor_blocks(blocks) + self.reserved_gdt_blocks
            rest = (blocks - self.first_data_block) % self.blocks_per_group
            if groups > 1 and rest and rest < overhead + 50:
                blocks -= rest
                continue
            return blocks
        return None

    def online_obstacle(self, new_blocks, mounted=False):
        """Why the kernel should not grow this file system online to
        `new_blocks` (None: nothing is in the way).  Mounted, the journal is
        in use and says so: only the unmounted superblock tells recovery."""
        if new_blocks is None:
            return "too large for a 32-bit file system"
        if new_blocks < self.blocks:
            return "larger than its partition"
        if not self.compat & EXT_COMPAT_HAS_JOURNAL:
            return "no journal"
        if self.needs_recovery() and not mounted:
            return "its journal needs recovery"
        if self.state & EXT_STATE_ERROR:
            return "errors recorded"
        if self.ro_compat & EXT_RO_COMPAT_BIGALLOC:
            return "bigalloc"
        if self.compat & EXT_COMPAT_SPARSE_SUPER2:
            return "sparse_super2"
        if not self.incompat & EXT_INCOMPAT_META_BG:
            if not self.compat & EXT_COMPAT_RESIZE_INODE:
                return "neither resize_inode nor meta_bg"
            # Past the reserved descriptor blocks the kernel would switch the
            # file system to meta_bg; resize2fs keeps its features.
            if self.descriptor_blocks(new_blocks) > \
                    self.descriptor_blocks(self.blocks) + self.reserved_gdt_blocks:
                return "more group descriptors than the reserved ones"
        if self.groups(new_blocks) * self.inodes_per_group > 0xFFFFFFFF:
            return "too many inodes"
        return None


def read_ext_superblock(device):
    """(ExtSuperblock, size of the device in bytes)."""
    fd = os.open(device, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return ExtSuperblock(os.pread(fd, 1024, 1024)), os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)


def task_exclusion(file_name):
    """Why the runner does not run the task `file_name` of this directory
    (its exclusion rules, applied by the runner's own code), or None."""
    path = os.path.join(os.path.dirname(os.path.realpath(__file__)), file_name)
    if not os.access(path, os.X_OK):
        return f"{file_name[2:]} is not installed"
    attributes, _ = helper.read_task_attributes(path)
    properties = helper.Properties(os.environ, warn=lambda message: None)
    reason = helper.exclusion_reason(helper.Task(path, attributes), properties)
    return reason and reason.rstrip(".")


def ext_growth_excluded():
    """Set when ext* must not be grown: FilesystemResizeUnmounted is excluded."""
    return task_exclusion(EXT_GROWER) is not None


def require_clean_ext(partition, superblock):
    """Refuse an ext* that is not clean by its superblock (as upstream)."""
    state = superblock.state_words()
    if state != "clean":
        raise TaskError(f"The file system state of partition {partition} is not clean "
                        f"(state = {state})")


def grow_ext_offline(partition, fstype, superblock, why):
    """Check and grow an unmounted ext* (its `superblock` as read before)
    as resize2fs does by default; an unclean one is refused."""
    require_clean_ext(partition, superblock)
    if superblock.needs_recovery():
        helper.warn(f"The journal of {partition} needs recovery; e2fsck will replay it")
    result = run([program("e2fsck"), "-f", "-p", partition], check=False)
    if result.returncode not in E2FSCK_OK:
        raise TaskError(f"e2fsck of {partition} failed (exit code {result.returncode})")
    run([program("resize2fs"), partition])
    after = read_ext_superblock(partition)[0].blocks
    verb = "grown" if after > superblock.blocks else "resized"
    info(f"{fstype} on {partition} {verb} offline from {superblock.blocks} to {after} "
         f"blocks ({why})")


# --------------------------------------------------------------------------
# Files inside the image
# --------------------------------------------------------------------------

MAX_SYMLINK_HOPS = 40
DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def path_components(path):
    return [part for part in str(path).split("/") if part not in ("", ".")]


def read_entry(dir_fd, name):
    """(contents, stat) of the entry `name` of an open directory, never
    following a link: contents only of a regular file, (None, None) when it
    cannot be opened."""
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK,
                     dir_fd=dir_fd)
    except OSError:
        return None, None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            return None, info
        chunks = []
        while chunk := os.read(fd, max(info.st_size + 1, 65536)):
            chunks.append(chunk)
        return b"".join(chunks), info
    finally:
        os.close(fd)


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

    def readlink(self, path):
        """Target of the symbolic link `path` (not followed), or None."""
        try:
            fd, name, _ = self._parent(path, follow_last=False)
        except TaskError:
            return None
        try:
            return os.readlink(name, dir_fd=fd)
        except OSError:
            return None
        finally:
            os.close(fd)

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
            return read_entry(fd, name)[0]
        finally:
            os.close(fd)

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
            temporary = f".{name[:200]}.snf-image-{os.urandom(6).hex()}"
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


# --------------------------------------------------------------------------
# systemd: first boot, units and their conditions
# --------------------------------------------------------------------------

ETC_MACHINE_ID = "/etc/machine-id"
GENERATED_HEADER = "Written by snf-image for this instance"
# In systemd's order of precedence (/lib for images without a merged /usr).
UNIT_DIRS = ("/etc/systemd/system", "/usr/local/lib/systemd/system",
             "/usr/lib/systemd/system", "/lib/systemd/system")
SYSTEMD_LIB_DIRS = ("/usr/lib/systemd", "/lib/systemd",
                    "/usr/lib/x86_64-linux-gnu/systemd", "/usr/lib64/systemd")
# systemd 247 made "uninitialized" in /etc/machine-id mean "first boot".
UNINITIALIZED_SINCE = 247
RUNTIME_PATHS = ("/run/", "/proc/", "/sys/", "/dev/", "/tmp/", "/var/run/")
PULLING_KEYS = ("Wants", "Requires", "Requisite", "BindsTo", "Upholds")
VIRTUALIZATION_TRUE = {"yes", "true", "1", "vm", "kvm", "qemu"}
VIRTUALIZATION_FALSE = {"no", "false", "0", "container", "docker", "lxc", "lxc-libvirt",
                        "podman", "systemd-nspawn", "openvz", "wsl", "proot", "rkt",
                        "xen", "vmware", "microsoft", "oracle", "bochs", "uml", "zvm",
                        "parallels", "bhyve", "qnx", "acrn", "powervm", "apple", "sre",
                        "google", "amazon"}


def machine_id_state(root):
    """"missing", "uninitialized", "empty" or "id": what /etc/machine-id holds."""
    text = root.read_text(ETC_MACHINE_ID)
    if text is None:
        return "missing"
    text = text.strip()
    if text == "uninitialized":
        return "uninitialized"
    return "empty" if not text else "id"


def systemd_version(root):
    """The image's systemd version (from libsystemd-shared-NNN.so), or None."""
    for directory in SYSTEMD_LIB_DIRS:
        for path in root.glob(directory, "libsystemd-shared-*.so"):
            match = re.search(r"libsystemd-shared-(\d+)", path)
            if match:
                return int(match.group(1))
    return None


def is_first_boot(root):
    """Whether systemd will take the image's next boot for its first boot
    (machine-id(5), "First Boot Semantics"): /etc/machine-id missing, or
    holding "uninitialized" (systemd 247 and later).  An empty file is not a
    first boot: systemd only makes a new id and stores it."""
    state = machine_id_state(root)
    if state == "missing":
        return True
    if state == "uninitialized":
        version = systemd_version(root)
        return version is None or version >= UNINITIALIZED_SINCE
    return False


def split_unit_name(name):
    """("sshd-keygen@", "rsa", ".service") for an instance, (name, None, "") otherwise."""
    stem, dot, suffix = name.rpartition(".")
    if "@" in stem:
        prefix, _, instance = stem.partition("@")
        return prefix + "@", instance, dot + suffix
    return name, None, ""


def parse_unit(text, settings=None):
    """{section.key: [values]} of a unit file, merged into `settings`; an
    empty assignment resets the list, as systemd does."""
    settings = {} if settings is None else settings
    section = ""
    pending = ""
    for raw in (text or "").splitlines():
        line = raw.strip()
        if pending:
            line = pending + line
            pending = ""
        if not line:
            continue
        first, last = line[0], line[-1]
        if last == "\\":
            pending = line[:-1] + " "
            continue
        if first == "#" or first == ";":
            continue
        if first == "[" and last == "]":
            section = line[1:-1]
            continue
        key, sep, value = line.partition("=")
        if not sep:
            continue
        key, value = f"{section}.{key.strip()}", value.strip()
        if value:
            settings.setdefault(key, []).append(value)
        else:
            settings[key] = []
    return settings


def expand_specifiers(value, name):
    """%i %I %n %N %p %% of a unit name; None when another specifier is used."""
    prefix, instance, suffix = split_unit_name(name)
    values = {"i": instance or "", "I": instance or "", "n": name,
              "N": name[:-len(suffix)] if suffix else name.rpartition(".")[0],
              "p": prefix.rstrip("@") if instance is not None else name.rpartition(".")[0],
              "%": "%"}
    out = []
    index = 0
    while index < len(value):
        if value[index] == "%" and index + 1 < len(value):
            replacement = values.get(value[index + 1])
            if replacement is None:
                return None
            out.append(replacement)
            index += 2
            continue
        out.append(value[index])
        index += 1
    return "".join(out)


class UnitDirectory:
    """One listed directory of the image (units, drop-ins or a .wants): its
    descriptor, its real path (names with every link resolved) and its
    entries {name: "link", "dir" or "other"}."""

    def __init__(self, fd=None, real=(), entries=None):
        self.fd = fd
        self.real = real
        self.entries = entries or {}


NO_DIRECTORY = UnitDirectory()


class SystemdUnits:
    """What the image's systemd will do at its next boot, as one analysis:
    each unit directory (and each .wants, .requires and .d directory asked
    for) is listed once, each unit file and drop-in read once and each
    unit's settings worked out once.  It sees the image as it was then:
    after changing units, make a new analysis.

    Directories are opened through ImageRoot (links resolved inside the
    image); an entry that is no link is opened from its directory's
    descriptor without following anything, a link is resolved through
    ImageRoot again, so no link leads out of the image.  Units a directory
    of higher precedence defines hide those of lower ones (UNIT_DIRS)."""

    def __init__(self, root):
        self.root = root
        self._directories = {}        # real path -> UnitDirectory
        self._files = {}              # guest path -> (text, masked)
        self._settings = {}
        self._pulled = None
        self._first_boot = None
        try:
            self._unit_dirs = [(path, self._directory(path)) for path in UNIT_DIRS]
        except BaseException:
            self.close()
            raise
        self._where = {}              # file name -> (guest directory, UnitDirectory)
        for path, directory in self._unit_dirs:
            for name in directory.entries:
                self._where.setdefault(name, (path, directory))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        for directory in self._directories.values():
            os.close(directory.fd)
        self._directories = {}

    def _directory(self, path, parent=None):
        """The listing of directory `path`; `parent`, the listing that holds
        it, lets a plain directory be opened from there without a walk."""
        name = path.rsplit("/", 1)[1]
        kind = parent.entries.get(name) if parent is not None else "link"   # else: walk
        if kind is None or kind == "other":
            return NO_DIRECTORY
        fd = None
        if kind == "dir":
            try:
                fd = os.open(name, DIR_FLAGS, dir_fd=parent.fd)
                real = parent.real + (name,)
            except OSError:
                fd = None             # changed since it was listed: walk to it
        if fd is None:
            try:
                fd, names = self.root._walk(path_components(path), path)
            except TaskError:
                return NO_DIRECTORY
            real = tuple(names)
        known = self._directories.get(real)
        if known is not None:         # /lib is /usr/lib on a merged /usr
            os.close(fd)
            return known
        directory = UnitDirectory(fd, real)
        self._directories[real] = directory
        with os.scandir(fd) as entries:
            for entry in entries:
                directory.entries[entry.name] = (
                    "link" if entry.is_symlink() else
                    "dir" if entry.is_dir(follow_symlinks=False) else "other")
        return directory

    def _read(self, path, directory, name):
        """(text or None, masked) of the file `name` of a listed directory;
        masked: a link to /dev/null or an empty regular file."""
        if path in self._files:
            return self._files[path]
        if directory.entries[name] == "link":
            try:
                target = os.readlink(name, dir_fd=directory.fd)
            except OSError:
                target = None
            text = self.root.read_text(path)
            if target is not None and target.rstrip("/") == "/dev/null":
                masked = True
            elif text is not None:
                masked = not text
            else:
                info = self.root.stat(path)
                masked = info is not None and stat.S_ISREG(info.st_mode) and not info.st_size
        else:
            data, info = read_entry(directory.fd, name)
            if info is None:
                try:
                    info = os.stat(name, dir_fd=directory.fd, follow_symlinks=False)
                except OSError:
                    pass
            text = None if data is None else data.decode("utf-8", "surrogateescape")
            masked = info is not None and stat.S_ISREG(info.st_mode) and not info.st_size
        self._files[path] = text, masked
        return text, masked

    def _find(self, name):
        """(guest path, directory, file name) of the file defining unit
        `name` (an instance falls back to its template), or None."""
        prefix, instance, suffix = split_unit_name(name)
        for candidate in [name] if instance is None else [name, prefix + suffix]:
            found = self._where.get(candidate)
            if found is not None:
                return f"{found[0]}/{candidate}", found[1], candidate
        return None

    def unit_file(self, name):
        """Guest path of the file defining unit `name`, or None."""
        found = self._find(name)
        return None if found is None else found[0]

    def masked(self, name):
        """Masked: the unit's file is a link to /dev/null or an empty file."""
        found = self._find(name)
        return found is not None and self._read(*found)[1]

    def settings(self, name):
        """The unit's settings with its drop-ins applied (shared: do not
        change them), or None when it does not exist."""
        if name not in self._settings:
            self._settings[name] = self._read_settings(name)
        return self._settings[name]

    def _read_settings(self, name):
        found = self._find(name)
        if found is None:
            return None
        settings = parse_unit(self._read(*found)[0])
        prefix, instance, suffix = split_unit_name(name)
        dropin_dirs = [name + ".d"] if instance is None else [prefix + suffix + ".d", name + ".d"]
        dropins = {}                  # a later directory's file of the same name wins
        for path, directory in reversed(self._unit_dirs):
            for dropin_dir in dropin_dirs:
                if dropin_dir not in directory.entries:
                    continue
                listing = self._directory(f"{path}/{dropin_dir}", directory)
                for conf in listing.entries:
                    if fnmatch.fnmatchcase(conf, "*.conf"):
                        dropins[conf] = (f"{path}/{dropin_dir}/{conf}", listing, conf)
        for conf in sorted(dropins):
            parse_unit(self._read(*dropins[conf])[0], settings)
        return settings

    def first_boot(self):
        if self._first_boot is None:
            self._first_boot = is_first_boot(self.root)
        return self._first_boot

    def pulled(self, settings_out=None):
        """Units the next boot pulls in: those linked in a *.wants/*.requires
        directory, and what they Want/Require in turn (an approximation of
        the boot transaction that errs on the side of including a unit).  A
        dict given as settings_out receives each one's settings."""
        if self._pulled is None:
            todo = []
            for path, directory in self._unit_dirs:
                for name in directory.entries:
                    if name.endswith((".wants", ".requires")):
                        todo.extend(self._directory(f"{path}/{name}", directory).entries)
            seen = set()
            while todo:
                name = todo.pop()
                if name in seen:
                    continue
                seen.add(name)
                settings = self.settings(name) or {}
                for key in PULLING_KEYS:
                    for value in settings.get(f"Unit.{key}", []):
                        for other in value.split():
                            other = expand_specifiers(other, name)
                            if other:
                                todo.append(other)
            self._pulled = seen
        if settings_out is not None:
            for name in self._pulled:
                settings_out[name] = self.settings(name) or {}
        return self._pulled

    def will_run(self, name, first_boot=None, pulled=None):
        """Whether unit `name` runs at the image's next boot: True, False, or
        None when its conditions cannot be decided offline."""
        if first_boot is None:
            first_boot = self.first_boot()
        settings = self.settings(name)
        if settings is None or self.masked(name):
            return False
        if name not in (self.pulled() if pulled is None else pulled):
            return False
        return unit_conditions_hold(self.root, name, settings, first_boot)


# A single question about the image's units, answered by an analysis of its
# own (a task asking several questions makes one SystemdUnits for all).

def unit_file(root, name):
    """SystemdUnits.unit_file"""
    with SystemdUnits(root) as units:
        return units.unit_file(name)


def unit_masked(root, name):
    """SystemdUnits.masked"""
    with SystemdUnits(root) as units:
        return units.masked(name)


def unit_settings(root, name):
    """SystemdUnits.settings"""
    with SystemdUnits(root) as units:
        return units.settings(name)


def pulled_units(root, settings_out=None):
    """SystemdUnits.pulled"""
    with SystemdUnits(root) as units:
        return units.pulled(settings_out)


def condition_value(root, key, argument, first_boot):
    """True/False when a condition (or assertion) can be decided from the image
    before it boots, None when only the running system could tell."""
    kind = key.split(".", 1)[1].removeprefix("Condition").removeprefix("Assert")
    if kind == "FirstBoot":
        wanted = argument.lower() in ("yes", "true", "1", "on")
        return wanted == first_boot
    if kind.startswith(("Path", "File", "Directory")) and \
            argument.startswith(RUNTIME_PATHS):
        return None             # made at boot: only the running system can tell
    if kind == "PathExists":
        return root.exists(argument) or root.is_link(argument)
    if kind == "PathExistsGlob":
        directory, _, pattern = argument.rpartition("/")
        return bool(root.glob(directory or "/", pattern))
    if kind == "PathIsDirectory":
        return root.is_dir(argument)
    if kind == "PathIsSymbolicLink":
        return root.is_link(argument)
    if kind == "FileNotEmpty":
        info = root.stat(argument)
        return root.is_file(argument) and info.st_size > 0
    if kind == "DirectoryNotEmpty":
        return root.is_dir(argument) and bool(root.listdir(argument))
    if kind == "FileIsExecutable":
        info = root.stat(argument)
        return root.is_file(argument) and bool(info.st_mode & 0o111)
    if kind == "PathIsReadWrite":
        # The image's file systems are writable at boot unless its fstab
        # mounts the root read-only (a path on another mount: cannot tell).
        if not root.exists(argument):
            return False
        return not root_mounted_read_only(root)
    if kind == "Virtualization":
        if argument.lower() in VIRTUALIZATION_TRUE:
            return True
        if argument.lower() in VIRTUALIZATION_FALSE:
            return False
    return None


def root_mounted_read_only(root):
    for line in (root.read_text("/etc/fstab") or "").splitlines():
        fields = line.split("#", 1)[0].split()
        if len(fields) >= 4 and fields[1] == "/":
            return "ro" in fields[3].split(",")
    return False


def unit_conditions_hold(root, name, settings, first_boot):
    """systemd's rule: every plain condition true, and at least one of the
    triggering (`|`) ones if there are any; with None for "cannot tell"."""
    plain, triggering = [], []
    for key, values in settings.items():
        if not key.startswith(("Unit.Condition", "Unit.Assert")):
            continue
        for value in values:
            trigger = value.startswith("|")
            value = value.lstrip("|")
            negate = value.startswith("!")
            value = expand_specifiers(value.lstrip("!"), name)
            result = None if value is None else condition_value(root, key, value, first_boot)
            if result is not None and negate:
                result = not result
            (triggering if trigger else plain).append(result)
    if False in plain:
        return False
    if triggering and True not in triggering:
        return None if None in triggering else False
    return None if None in plain else True


def unit_will_run(root, name, first_boot=None, pulled=None):
    """SystemdUnits.will_run"""
    with SystemdUnits(root) as units:
        return units.will_run(name, first_boot, pulled)


# --------------------------------------------------------------------------
# Material prepared on the node (the mailbox disk, DESIGN.md §5)
# --------------------------------------------------------------------------

MAILBOX_MAGIC = b"SNFPREP1"
MAILBOX_READY, MAILBOX_NOTHING = b"R", b"N"
MAILBOX_HEADER_SIZE = 4096
MAILBOX_PAYLOAD_MAX = 60 * 1024
# the host answers within its keygen timeout (60 s) of the helper's start
MAILBOX_WAIT = 90.0
MAILBOX_POLL = 0.02
# a header whose payload does not match is re-read for this long (a read
# that overlapped the host's write), then taken as no material
MAILBOX_SETTLE = 1.0


def _read_mailbox_once(fd, view):
    """One look into the mailbox through the page-aligned buffer `view`:
    ("ready", payload), ("nothing", None), ("empty", None) while nothing is
    posted, or ("torn", None) for a header whose payload does not match it."""
    import struct
    import zlib
    os.preadv(fd, [view[:MAILBOX_HEADER_SIZE]], 0)
    magic, state = bytes(view[:8]), bytes(view[8:9])
    if magic != MAILBOX_MAGIC or state not in (MAILBOX_READY, MAILBOX_NOTHING):
        return "empty", None
    if state == MAILBOX_NOTHING:
        return "nothing", None
    length, checksum = struct.unpack("<II", view[9:17])
    if length > MAILBOX_PAYLOAD_MAX:
        return "torn", None
    aligned = -(-length // 4096) * 4096
    got = os.preadv(fd, [view[MAILBOX_HEADER_SIZE:MAILBOX_HEADER_SIZE + aligned]],
                    MAILBOX_HEADER_SIZE) if aligned else 0
    payload = bytes(view[MAILBOX_HEADER_SIZE:MAILBOX_HEADER_SIZE + length])
    if got >= length and zlib.crc32(payload) == checksum:
        return "ready", payload
    return "torn", None


def read_mailbox(path, wait=MAILBOX_WAIT):
    """The payload (bytes) the host posted into the mailbox `path`, waiting
    up to `wait` seconds for it; None when the host posted nothing, gave no
    answer in time or the mailbox does not hold a consistent payload. A
    block device is read with O_DIRECT: the guest's page cache would keep
    showing the empty mailbox the kernel read at boot."""
    import mmap
    import time
    flags = os.O_RDONLY | os.O_CLOEXEC
    try:
        if stat.S_ISBLK(os.stat(path).st_mode):
            flags |= os.O_DIRECT
        fd = os.open(path, flags)
    except OSError as error:
        helper.warn(f"cannot open the mailbox {path}: {error.strerror}")
        return None
    started = time.monotonic()
    told, torn_since = False, None
    try:
        with mmap.mmap(-1, MAILBOX_HEADER_SIZE + MAILBOX_PAYLOAD_MAX) as buffer, \
                memoryview(buffer) as view:   # page-aligned, as O_DIRECT wants
            while True:
                kind, payload = _read_mailbox_once(fd, view)
                if kind in ("ready", "nothing"):
                    return payload
                now = time.monotonic()
                if kind == "torn":
                    torn_since = torn_since or now
                    if now - torn_since > MAILBOX_SETTLE:
                        helper.warn("the mailbox of material prepared on the node is inconsistent; "
                                    "making it here")
                        return None
                if now - started > wait:
                    helper.warn(f"no answer from the node in the mailbox within {wait:.0f} s; making it here")
                    return None
                if now - started > 0.5 and not told:
                    info("waiting for the SSH host keys and password hashes being made on the node")
                    told = True
                time.sleep(MAILBOX_POLL)
    except OSError as error:
        helper.warn(f"cannot read the mailbox {path}: {error.strerror}")
        return None
    finally:
        os.close(fd)


def prepared(section):
    """The `section` (ssh_host_keys, password_hashes) of what the host made
    natively for this deployment, {} when there is none or it is unreadable:
    the tasks then make everything themselves."""
    path = env("PREPARED")
    if not path:
        return {}
    payload = read_mailbox(path)
    if payload is None:
        return {}
    import json
    try:
        material = json.loads(payload)
    except ValueError:
        return {}
    value = material.get(section) if isinstance(material, dict) and material.get("format") == 1 else None
    return value if isinstance(value, dict) else {}
