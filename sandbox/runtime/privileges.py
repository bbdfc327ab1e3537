"""Giving up privileges, in two steps around the moment a handler process
gets its function: before it, the process still needs root for its mounts;
after it, the function's own code runs, so nothing may be left.
"""
import os
import resource
import signal

from . import syscalls as sc

# The unprivileged identity that handler code runs as.  Without a user
# namespace it is the host's "nobody"; everything it could reach as nobody
# is already hidden by the mount, PID and network namespaces.
HANDLER_UID = HANDLER_GID = 65534


def _last_cap():
    try:
        with open("/proc/sys/kernel/cap_last_cap") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 40


LAST_CAP = _last_cap()
# What a shell still uses before it drops everything: CAP_SETGID, CAP_SETUID,
# CAP_SETPCAP (to drop these), CAP_NET_ADMIN (its loopback), CAP_SYS_ADMIN
# (namespaces, mounts, hostname), CAP_SYS_NICE (its priority back).
SHELL_CAPS = (6, 7, 8, 12, 21, 23)


def narrow_bounding_set():
    """In the zygote, once: children inherit the bounding set, so each shell
    has only SHELL_CAPS left to drop (each drop commits new credentials,
    which is not free).  The zygote's own effective set is unchanged."""
    for cap in range(LAST_CAP + 1):
        if cap not in SHELL_CAPS:
            sc.prctl(sc.PR_CAPBSET_DROP, cap, "PR_CAPBSET_DROP(%d)" % cap)


def before_assignment():
    """While the shell waits in the pool (it is still root)."""
    # No exec can ever grant privileges again (setuid binaries, file caps).
    sc.prctl(sc.PR_SET_NO_NEW_PRIVS, 1, "PR_SET_NO_NEW_PRIVS")
    # Empty the bounding set: no capability can be regained by any means.
    for cap in SHELL_CAPS:
        sc.prctl(sc.PR_CAPBSET_DROP, cap, "PR_CAPBSET_DROP(%d)" % cap)
    os.setgroups([])
    # A crash must not write the handler's memory anywhere.
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def after_assignment():
    """Once the code is attached, before any of it runs."""
    # Leaving uid 0 clears the permitted, effective and ambient capability
    # sets: mount, unshare, setns, ptrace of others, raw sockets, chroot,
    # mknod and module loading all fail from here on.
    os.setresgid(HANDLER_GID, HANDLER_GID, HANDLER_GID)
    os.setresuid(HANDLER_UID, HANDLER_UID, HANDLER_UID)
    # Not dumpable: its memory and /proc files stay closed to other
    # processes of the same uid (other sandboxes run as nobody too).
    sc.prctl(sc.PR_SET_DUMPABLE, 0, "PR_SET_DUMPABLE")
    # A uid change clears the parent-death signal, so it is set after it:
    # a handler never outlives its zygote.
    sc.prctl(sc.PR_SET_PDEATHSIG, signal.SIGKILL, "PR_SET_PDEATHSIG")
    # Last: the filter refuses the syscalls used above (cbits/olsys.c says
    # which and why); from here on they stay refused for good.
    sc.seccomp_install()
