"""The syscalls Python's os module lacks, over the shims in cbits/.

Every failure raises SyscallError, which names the operation, its object and
the errno, so that no anonymous OSError leaves the sandbox package.
"""
import errno
import os

from ._olsys import ffi

lib = ffi.dlopen(os.path.join(os.path.dirname(os.path.abspath(__file__)), "libolsys.so"))

CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000

AT_FDCWD = -100
AT_RECURSIVE = 0x8000
AT_EMPTY_PATH = 0x1000
OPEN_TREE_CLONE = 0x1
OPEN_TREE_CLOEXEC = os.O_CLOEXEC
MOUNT_ATTR_RDONLY = 0x1
MOUNT_ATTR_NOSUID = 0x2
MOUNT_ATTR_NODEV = 0x4

PR_CAPBSET_DROP = 24

_NS_NAMES = (
    (CLONE_NEWNS, "mnt"), (CLONE_NEWCGROUP, "cgroup"), (CLONE_NEWUTS, "uts"),
    (CLONE_NEWIPC, "ipc"), (CLONE_NEWUSER, "user"), (CLONE_NEWPID, "pid"),
    (CLONE_NEWNET, "net"),
)


class SyscallError(OSError):
    """A syscall failed: `op` is its name, `obj` what it acted on."""

    def __init__(self, op, obj, err):
        super().__init__(err, os.strerror(err))
        self.op = op
        self.obj = obj

    def __str__(self):
        name = errno.errorcode.get(self.errno, str(self.errno))
        return "%s %s: %s (%s)" % (self.op, self.obj, self.strerror, name)


def ns_names(flags):
    return "+".join(name for bit, name in _NS_NAMES if flags & bit) or "none"


def _check(rc, op, obj):
    if rc < 0:
        raise SyscallError(op, obj, -rc)
    return rc


def failed(failure, obj):
    """The SyscallError for a `struct ol_failure` that cbits/shell.c filled."""
    return SyscallError(ffi.string(failure.call).decode(), obj, failure.err)


def _path(p):
    return ffi.NULL if p is None else os.fsencode(p)


def unshare(flags):
    _check(lib.ol_unshare(flags), "unshare", ns_names(flags))


def setns(fd, nstype):
    _check(lib.ol_setns(fd, nstype), "setns", "fd %d (%s)" % (fd, ns_names(nstype)))


def open_tree(path, flags, dirfd=AT_FDCWD):
    return _check(lib.ol_open_tree(dirfd, _path(path), flags), "open_tree", path)


def mount_setattr(fd, attr_set, flags=AT_EMPTY_PATH | AT_RECURSIVE):
    _check(lib.ol_mount_setattr(fd, b"", flags, attr_set, 0, 0), "mount_setattr", "fd %d" % fd)


def seccomp_install():
    """The handlers' whole seccomp filter (cbits/olsys.c), both stages, on
    every thread: what a handler ends up with."""
    for stage in (lib.OL_SECCOMP_SHELL, lib.OL_SECCOMP_HANDLER):
        _check(lib.ol_seccomp_install(stage), "seccomp", "SECCOMP_SET_MODE_FILTER")


def loopback_up():
    """Bring up lo in the calling thread's network namespace (a new one's is down)."""
    if lib.ol_loopback_up() < 0:
        raise SyscallError("bring up", "lo", ffi.errno)


def prctl(option, arg, name):
    _check(lib.ol_prctl(option, arg, 0), "prctl", name)


def spawn(argv, env, fds, ns_flags=0, cgroup_fd=-1):
    """clone3 a child into new namespaces (and a v2 cgroup), exec argv there.

    The child gets fds[i] as fd i and nothing else; it dies with its parent.
    Returns (pid, pidfd).  If exec fails, the child's errno is raised here.
    """
    keep = [ffi.new("char[]", os.fsencode(a)) for a in argv]
    keep_env = [ffi.new("char[]", os.fsencode("%s=%s" % kv)) for kv in env.items()]
    c_argv = ffi.new("char *[]", keep + [ffi.NULL])
    c_env = ffi.new("char *[]", keep_env + [ffi.NULL])
    c_fds = ffi.new("int[]", list(fds) or [0])
    pidfd = ffi.new("int *", -1)
    err_r, err_w = os.pipe2(os.O_CLOEXEC)
    try:
        pid = lib.ol_spawn(ns_flags, cgroup_fd, c_argv[0], c_argv, c_env,
                           c_fds, len(fds), err_w, pidfd)
        _check(pid, "clone3", "%s in new %s namespaces" % (argv[0], ns_names(ns_flags)))
        os.close(err_w)
        err_w = -1
        failed = os.read(err_r, 4)
    finally:
        os.close(err_r)
        if err_w >= 0:
            os.close(err_w)
    if failed:
        os.waitid(os.P_PIDFD, pidfd[0], os.WEXITED)
        os.close(pidfd[0])
        raise SyscallError("execve", argv[0], int.from_bytes(failed, "little"))
    return pid, pidfd[0]
