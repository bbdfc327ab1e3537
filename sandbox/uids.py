"""Which host uid each sandbox's code runs as, and whether this host lets
it have the user namespace that maps it.  Standard library only: `bin/admin`
checks configs with it.

A worker's sandboxes run as uid_base + n, where n is the number of the
sandbox's cgroup, unique among its live sandboxes.  So no two sandboxes
share an identity (one cannot signal, trace or read another's files even
if both could see them), and none is a real user of the host or root.
"""
# Numbers per worker: its uids are uid_base .. uid_base + UID_SLOTS - 1.
UID_SLOTS = 16384
# Far above the host's own users (below 65536) and the subordinate ranges
# that tools such as podman hand out from 100000 up.
DEFAULT_FLOOR = 1 << 30
# The highest uid the kernel accepts (uid_t -1 means "no uid").
UID_MAX = (1 << 32) - 2


def default_base(port):
    """Each port its own range, so workers on one host never share uids;
    the last one still ends below 2**31 (signed 32-bit tools stay happy)."""
    return DEFAULT_FLOOR + port * UID_SLOTS


# Host settings that stop a handler, which is no longer root when it makes
# its user namespace, from getting a working one: (file, bad value, why).
USERNS_BLOCKERS = (
    ("/proc/sys/user/max_user_namespaces", "0", "user namespaces are off (user.max_user_namespaces=0)"),
    ("/proc/sys/kernel/unprivileged_userns_clone", "0",
     "unprivileged user namespaces are off (kernel.unprivileged_userns_clone=0)"),
    ("/proc/sys/kernel/apparmor_restrict_unprivileged_userns", "1",
     "AppArmor takes every capability from unprivileged user namespaces "
     "(kernel.apparmor_restrict_unprivileged_userns=1), so none can map its uid"),
)


def user_namespace_blocker():
    """Why sandboxes cannot have their user namespaces on this host, or None."""
    for path, bad, why in USERNS_BLOCKERS:
        try:
            with open(path) as f:
                if f.read().strip() == bad:
                    return why
        except OSError:
            pass  # a kernel without that setting
    return None
