"""Giving up privileges, in two steps around the moment a handler process
gets its function: before it, the process still needs root for its mounts;
after it, the function's own code runs, so nothing may be left.
"""
import resource
import signal

from . import syscalls as sc

# Who handler code is inside its user namespace: "nobody".  On the host it
# is a uid of its own (the worker picks one per live sandbox), so two
# sandboxes never share an identity, and nothing a handler owns or writes is
# owned by any real user or by root.
SANDBOX_UID = SANDBOX_GID = 65534


def _last_cap():
    try:
        with open("/proc/sys/kernel/cap_last_cap") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 40


LAST_CAP = _last_cap()
# What a shell still uses before it drops everything: CAP_SETGID, CAP_SETUID,
# CAP_SETPCAP (to drop these), CAP_NET_ADMIN (its loopback), CAP_SYS_ADMIN
# (namespaces, mounts, hostname).
SHELL_CAPS = (6, 7, 8, 12, 21)


def narrow_bounding_set():
    """In the zygote, once: children inherit the bounding set, so each shell
    has only SHELL_CAPS left to drop (each drop commits new credentials,
    which is not free).  The zygote's own effective set is unchanged."""
    for cap in range(LAST_CAP + 1):
        if cap not in SHELL_CAPS:
            sc.prctl(sc.PR_CAPBSET_DROP, cap, "PR_CAPBSET_DROP(%d)" % cap)


class Privileges:
    """A shell giving up root, in two C calls (cbits/shell.c), from structs
    built while it waits in the pool.

    before_assignment(), while the shell waits in the pool (it still needs
    root for its mounts):
    - no exec can ever grant privileges again (no_new_privs: setuid
      binaries, file capabilities);
    - its bounding set is emptied: no capability can be regained by any
      means (its effective set stays, for the steps still to come);
    - no supplementary groups;
    - RLIMIT_CORE of 1 byte, soft and hard: a crash must not write the
      handler's memory anywhere, nor start a core dump helper as root on
      the host.  Not 0: the kernel ignores the limit for a pipe
      core_pattern but refuses one at exactly 1, and 1 byte is below any
      core file.  What the handler execs is dumpable again, and inherits it;
    - the seccomp filter but for the calls still to come (cbits/olsys.c).

    final(), once its code is attached, before any of it runs, takes these
    steps in this order:

    1. setresgid and setresuid to `host_uid`.  Leaving uid 0 clears the
       permitted, effective and ambient capability sets: mount, unshare,
       setns, ptrace of others, raw sockets, chroot, mknod and module loading
       all fail from here on.  The uid is the sandbox's own, never shared
       with another sandbox or a host user.
    2. Enter a user namespace of its own, as "nobody" (SANDBOX_UID) mapped
       to `host_uid`.  Its uid and gid maps hold that one id, so root (or any
       other host user) means nothing inside, and every file it creates
       belongs to host_uid on the host.  Its other namespaces still belong
       to the host's user namespace, so the capabilities a new user
       namespace grants its creator give no power over them; they are
       emptied anyway, the bounding set included.  setgroups is denied:
       otherwise it could drop a supplementary group that some file denies
       access to.
    3. Not dumpable: its memory and /proc files stay closed to other
       processes (its cores are the core limit's to stop).
    4. The parent-death signal, which a uid change clears: a handler never
       outlives its zygote.
    5. Last, the seccomp filter's last stage, which refuses the syscalls
       used above (cbits/olsys.c says which and why): from here on they
       stay refused for good."""

    def __init__(self, host_uid):
        self.identity = sc.ffi.new("struct ol_identity *", {
            "host_uid": host_uid, "sandbox_uid": SANDBOX_UID, "sandbox_gid": SANDBOX_GID,
            "last_cap": LAST_CAP, "pdeathsig": signal.SIGKILL})
        self.failure = sc.ffi.new("struct ol_failure *")

    def before_assignment(self):
        if sc.lib.ol_before_assignment(LAST_CAP, self.failure) < 0:
            raise sc.failed(self.failure, "shell")

    def final(self):
        if sc.lib.ol_drop_privileges(self.identity, self.failure) < 0:
            raise sc.failed(self.failure, "uid %d" % self.identity.host_uid)


def set_rlimits(nofile, fsize):
    """The function's own limits, soft and hard alike: without
    CAP_SYS_RESOURCE (gone soon after) no hard limit can be raised again.
    A file grown past `fsize` fails with EFBIG (Python ignores SIGXFSZ)."""
    for resource_id, value in ((resource.RLIMIT_NOFILE, nofile), (resource.RLIMIT_FSIZE, fsize)):
        if value is not None:
            resource.setrlimit(resource_id, (value, value))
