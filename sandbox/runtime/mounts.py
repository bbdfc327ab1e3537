"""A sandbox's mount tree, planned as a list of plain records and applied by
one function, so a plan can be read and tested without root.

Both sides use it: the host's launcher builds a zygote's root with it, and a
zygote's forked child builds its own handler sandbox with it.
"""
import os
import stat
from collections import namedtuple

from . import syscalls as sc

# Make every mount in this namespace private: nothing we mount propagates
# back to the host, and nothing the host mounts later appears in here.
MakePrivate = namedtuple("MakePrivate", "")
# Bind `src` at `dst`; read-only binds also get nosuid+nodev.
Bind = namedtuple("Bind", "src dst readonly")
Tmpfs = namedtuple("Tmpfs", "dst size_mb mode nodev", defaults=(True,))
# A character device node, mode 0666.
DeviceNode = namedtuple("DeviceNode", "path major minor")
Proc = namedtuple("Proc", "dst")
Devpts = namedtuple("Devpts", "dst")
Mkdir = namedtuple("Mkdir", "path mode")
Symlink = namedtuple("Symlink", "target path")
RemountReadonly = namedtuple("RemountReadonly", "dst nodev", defaults=(True,))
ResizeTmpfs = namedtuple("ResizeTmpfs", "dst size_mb")
# Hide a /proc path: a file behind /dev/null, a directory behind an empty
# read-only tmpfs.  A path this kernel lacks is skipped.
Mask = namedtuple("Mask", "path")
# Make an existing path read-only (skipped if this kernel lacks it).
ReadonlyPath = namedtuple("ReadonlyPath", "path")
# Attach a detached mount (an open_tree fd from the host) at `dst`.
AttachTree = namedtuple("AttachTree", "fd dst")
# Make `new_root` the root and detach the old one, so no host path stays
# reachable through it.
PivotRoot = namedtuple("PivotRoot", "new_root")

_SAFE = sc.MS_NOSUID | sc.MS_NODEV


def _bind(op):
    sc.mount(op.src, op.dst, None, sc.MS_BIND | sc.MS_REC)
    if op.readonly:
        # A bind ignores MS_RDONLY on creation; only a remount applies it.
        sc.mount(None, op.dst, None, sc.MS_REMOUNT | sc.MS_BIND | sc.MS_RDONLY | _SAFE)


def _tmpfs(op):
    flags = _SAFE if op.nodev else sc.MS_NOSUID
    sc.mount("tmpfs", op.dst, "tmpfs", flags, "size=%dm,mode=%o" % (op.size_mb, op.mode))


def _device_node(op):
    try:
        os.mknod(op.path, 0o666 | stat.S_IFCHR, os.makedev(op.major, op.minor))
        os.chmod(op.path, 0o666)  # mknod's mode is filtered by the umask
    except OSError as e:
        raise sc.SyscallError("mknod", op.path, e.errno) from None


def _proc(op):
    sc.mount("proc", op.dst, "proc", _SAFE | sc.MS_NOEXEC)


def _devpts(op):
    # A new instance: the sandbox's ptys are its own, not the host's.
    sc.mount("devpts", op.dst, "devpts", sc.MS_NOSUID | sc.MS_NOEXEC,
             "newinstance,ptmxmode=0666,mode=620")


def _mkdir(op):
    try:
        os.mkdir(op.path, op.mode)
    except FileExistsError:
        pass
    except OSError as e:
        raise sc.SyscallError("mkdir", op.path, e.errno) from None


def _symlink(op):
    try:
        os.symlink(op.target, op.path)
    except OSError as e:
        raise sc.SyscallError("symlink", op.path, e.errno) from None


def _resize_tmpfs(op):
    sc.mount(None, op.dst, None, sc.MS_REMOUNT | _SAFE, "size=%dm" % op.size_mb)


def _mask(op):
    if os.path.isdir(op.path):
        sc.mount("tmpfs", op.path, "tmpfs", _SAFE | sc.MS_NOEXEC | sc.MS_RDONLY, "size=0k,mode=500")
    elif os.path.exists(op.path):
        sc.mount("/dev/null", op.path, None, sc.MS_BIND)


def _readonly_path(op):
    if os.path.exists(op.path):
        _bind(Bind(op.path, op.path, readonly=True))


def _remount_readonly(op):
    flags = _SAFE if op.nodev else sc.MS_NOSUID
    sc.mount(None, op.dst, None, sc.MS_REMOUNT | sc.MS_BIND | sc.MS_RDONLY | flags)


def _attach_tree(op):
    sc.move_mount(op.fd, op.dst)
    os.close(op.fd)


def _pivot_root(op):
    # pivot_root(".", ".") stacks the old root on top of the new one; the
    # lazy unmount then drops it without needing a directory to park it in.
    os.chdir(op.new_root)
    sc.pivot_root(".", ".")
    sc.umount2(".", sc.MNT_DETACH)
    os.chdir("/")


_APPLY = {
    MakePrivate: lambda op: sc.mount(None, "/", None, sc.MS_REC | sc.MS_PRIVATE),
    Bind: _bind,
    Tmpfs: _tmpfs,
    Proc: _proc,
    Devpts: _devpts,
    Mkdir: _mkdir,
    Symlink: _symlink,
    DeviceNode: _device_node,
    Mask: _mask,
    ResizeTmpfs: _resize_tmpfs,
    ReadonlyPath: _readonly_path,
    RemountReadonly: _remount_readonly,
    AttachTree: _attach_tree,
    PivotRoot: _pivot_root,
}


def apply(ops):
    """Apply a plan in order; the first failure raises a SyscallError."""
    for op in ops:
        _APPLY[type(op)](op)


# What of /proc a sandbox does not see, and what it sees read-only: the
# kernel's memory, keys, timers and scheduler internals, the magic SysRq
# key, hardware tables, and every kernel tunable.
PROC_MASKED = ("kcore", "keys", "kmsg", "timer_list", "sched_debug", "latency_stats",
               "sysrq-trigger", "acpi", "scsi", "asound")
PROC_READONLY = ("sys", "bus", "fs", "irq")


def shell_plan(scratch_mb):
    """What a zygote's child mounts over the zygote's tree to become a
    sandbox shell: its own /proc, and scratch /tmp and /dev/shm."""
    return [Proc("/proc")] + [Mask("/proc/" + p) for p in PROC_MASKED] + [
        ReadonlyPath("/proc/" + p) for p in PROC_READONLY] + [
        Tmpfs("/tmp", scratch_mb, 0o1777),
        Tmpfs("/dev/shm", scratch_mb, 0o1777),
        # Its own ptys: sandboxes share a uid, so a shared devpts would let
        # one open another's terminals.
        Devpts("/dev/pts"),
    ]


def code_plan(code_fd, scratch_mb=None):
    """What a shell mounts once it is given a function: its code, and its
    scratch space resized if the function asks for another size."""
    plan = [AttachTree(code_fd, "/handler")]
    if scratch_mb:
        plan += [ResizeTmpfs("/tmp", scratch_mb), ResizeTmpfs("/dev/shm", scratch_mb)]
    return plan
