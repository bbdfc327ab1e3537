"""A sandbox's mount tree, planned as a list of plain records and applied by
cbits/shell.c, so a plan can be read and tested without root, and applied
in a forked child without running Python.

Both sides use it: the host's launcher builds a zygote's root with it, and a
zygote's forked child builds its own handler sandbox with it.
"""
import os
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

# Each step as cbits/shell.c runs it: (kind, its fields in struct ol_mount_op).
_C_STEPS = {
    MakePrivate: (sc.lib.OL_MOUNT_PRIVATE, {}),
    Bind: (sc.lib.OL_MOUNT_BIND, {"src": "src", "dst": "dst", "readonly": "readonly"}),
    Tmpfs: (sc.lib.OL_MOUNT_TMPFS, {"dst": "dst", "nodev": "nodev"}),
    ResizeTmpfs: (sc.lib.OL_MOUNT_RESIZE_TMPFS, {"dst": "dst"}),
    RemountReadonly: (sc.lib.OL_MOUNT_REMOUNT_READONLY, {"dst": "dst", "nodev": "nodev"}),
    Proc: (sc.lib.OL_MOUNT_PROC, {"dst": "dst"}),
    Devpts: (sc.lib.OL_MOUNT_DEVPTS, {"dst": "dst"}),
    Mkdir: (sc.lib.OL_MOUNT_MKDIR, {"dst": "path", "mode": "mode"}),
    Symlink: (sc.lib.OL_MOUNT_SYMLINK, {"src": "target", "dst": "path"}),
    DeviceNode: (sc.lib.OL_MOUNT_DEVICE, {"dst": "path", "major": "major", "minor": "minor"}),
    Mask: (sc.lib.OL_MOUNT_MASK, {"dst": "path"}),
    ReadonlyPath: (sc.lib.OL_MOUNT_READONLY_PATH, {"dst": "path"}),
    AttachTree: (sc.lib.OL_MOUNT_ATTACH_TREE, {"dst": "dst", "fd": "fd"}),
    PivotRoot: (sc.lib.OL_MOUNT_PIVOT_ROOT, {"dst": "new_root"}),
}


class CompiledPlan:
    """A plan as the C array that cbits/shell.c applies.  Made once, it can
    be applied (or handed to ol_enter_shell) without building anything."""

    def __init__(self, ops):
        self.ops = list(ops)
        self.array = sc.ffi.new("struct ol_mount_op[]", max(len(self.ops), 1))
        self._strings = []  # what the array points to, kept alive with it
        self.failure = sc.ffi.new("struct ol_failure *")
        for c_op, op in zip(self.array, self.ops):
            c_op.kind, fields = _C_STEPS[type(op)]
            for c_field, field in fields.items():
                value = getattr(op, field)
                if isinstance(value, str):
                    value = sc.ffi.new("char[]", os.fsencode(value))
                    self._strings.append(value)
                setattr(c_op, c_field, value)
            if isinstance(op, (Tmpfs, ResizeTmpfs)):
                options = "size=%dm" % op.size_mb
                if isinstance(op, Tmpfs):
                    options += ",mode=%o" % op.mode
                self._strings.append(sc.ffi.new("char[]", options.encode()))
                c_op.options = self._strings[-1]

    def __len__(self):
        return len(self.ops)

    def set_fd(self, index, fd):
        """Give step `index` (an AttachTree) the fd it attaches."""
        self.array[index].fd = fd

    def apply(self):
        """Apply it in order; the first failure raises a SyscallError."""
        if sc.lib.ol_apply_mounts(self.array, len(self), self.failure) < 0:
            raise self.error(self.failure)

    def error(self, failure):
        """The SyscallError for what ol_apply_mounts reported."""
        op = self.ops[failure.index]
        obj = getattr(op, "dst", None) or getattr(op, "path", None) or getattr(op, "new_root")
        if isinstance(op, Bind):
            obj = "%s on %s" % (op.src, op.dst)
        return sc.failed(failure, obj)


def apply(ops):
    """Apply a plan in order; the first failure raises a SyscallError."""
    CompiledPlan(ops).apply()


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
        # one open another's terminals.  At most 16 (cbits/shell.c says why).
        Devpts("/dev/pts"),
    ]


def code_plan(code_fd):
    """What a shell mounts once it is given a function: its code."""
    return [AttachTree(code_fd, "/handler")]


def scratch_plan(scratch_mb):
    """A shell's scratch space resized, for a function that asks for
    another size than the worker's default."""
    return [ResizeTmpfs("/tmp", scratch_mb), ResizeTmpfs("/dev/shm", scratch_mb)]
