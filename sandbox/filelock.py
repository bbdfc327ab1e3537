"""Lock files that say which running process owns something: a worker its
cluster's port, a worker its port's egress network.  The lock (flock) goes
with its holder, whatever kills it; the file is removed by its holder as it
stops, or by whoever finds it unheld."""
import fcntl
import os


def try_lock(path, create=False):
    """An fd of `path` holding its exclusive lock, or None if another
    process holds it (or, unless `create`, if there is no such file)."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC | (os.O_CREAT if create else 0), 0o600)
    except FileNotFoundError:
        if create:
            raise
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def claim(path):
    """An fd holding the lock of `path`, made if need be, or None if a
    running process holds it.  Held until the fd is closed."""
    while True:
        fd = try_lock(path, create=True)
        if fd is None:
            return None
        # Its last holder may have removed it between our open and our lock
        # (release): a lock on a file no longer there guards nothing.
        try:
            if os.path.samestat(os.fstat(fd), os.stat(path)):
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)


def release(path, fd):
    """Remove `path`, then let go of its lock: under the lock, so that
    nobody who took it meanwhile loses it (claim says why)."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    os.close(fd)


def remove_if_unheld(path):
    """Remove the lock file `path` if no running process holds it (its
    holder was SIGKILLed)."""
    fd = try_lock(path)
    if fd is not None:
        release(path, fd)


def holds(pid, path):
    """Does process `pid` have `path` open?  By the file itself, not its
    name: it may have been moved since (a renamed cluster directory)."""
    try:
        target = os.stat(path)
        fds = os.listdir("/proc/%d/fd" % pid)
    except OSError:
        return False
    for fd in fds:
        try:
            if os.path.samestat(os.stat("/proc/%d/fd/%s" % (pid, fd)), target):
                return True
        except OSError:
            pass  # closed meanwhile
    return False
