/*
 * Building a sandbox, in C: mount plans, a zygote child's whole set-up as a
 * shell, and a handler's last step, leaving root for good.
 *
 * Why C: a forked child pays a copy-on-write page fault (~3 us in a VM) for
 * every page of its parent's memory it writes, and running Python writes a
 * page for nearly every object it touches (reference counts).  Done in
 * Python, this set-up cost a shell ~250 such faults and ~1.5 ms of CPU;
 * here it touches a few pages of C stack.
 *
 * Mechanism only, like olsys.c: the plans, namespaces and fds come from
 * sandbox/runtime/mounts.py and zygote.py, and every failure is reported
 * back (which step, which syscall, errno) for Python to name.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/close_range.h>
#include <linux/mount.h>
#include <linux/stat.h>
#include <stdint.h>
#include <net/if.h>
#include <sched.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include "olsys.h"

#define FAIL(f, i, name) do { note_failure((f), (i), (name)); return -(f)->err; } while (0)
/* The same if `call`, a shim that returns -errno (olsys.c), fails. */
#define FAIL_IF_NEGATIVE(call, f, name) do { int rc_ = (call); \
        if (rc_ < 0) { errno = -rc_; FAIL(f, -1, name); } } while (0)

/* What failed: the step (-1 for one outside a mount plan), the call, errno. */
static void note_failure(struct ol_failure *failure, int index, const char *call)
{
    failure->index = index;
    failure->call = call;
    failure->err = errno;
}

#ifndef MNT_DETACH
#define MNT_DETACH 2  /* <sys/mount.h>, which clashes with <linux/mount.h> */
#endif

static const unsigned long SAFE = MS_NOSUID | MS_NODEV;

static int sys_mount(const char *src, const char *dst, const char *type,
                     unsigned long flags, const char *data)
{
    return (int)syscall(SYS_mount, src, dst, type, flags, data);
}

/* Bind src at dst; read-only binds also get nosuid and nodev.  A bind
 * ignores MS_RDONLY when it is made: only a remount applies it. */
static const char *bind_mount(const char *src, const char *dst, int readonly)
{
    if (sys_mount(src, dst, NULL, MS_BIND | MS_REC, NULL) < 0)
        return "mount --bind";
    if (readonly && sys_mount(NULL, dst, NULL, MS_REMOUNT | MS_BIND | MS_RDONLY | SAFE, NULL) < 0)
        return "remount read-only";
    return NULL;
}

/* The type of the file at path (S_IFDIR, S_IFREG...), 0 if there is none. */
static unsigned int file_type(const char *path)
{
    struct statx st;
    if (syscall(SYS_statx, AT_FDCWD, path, 0, STATX_TYPE, &st) < 0)
        return 0;
    return st.stx_mode & S_IFMT;
}

static const char *apply_one(const struct ol_mount_op *op)
{
    unsigned long nodev = op->nodev ? MS_NODEV : 0;
    unsigned int type;

    switch (op->kind) {
    case OL_MOUNT_PRIVATE:
        return sys_mount(NULL, "/", NULL, MS_REC | MS_PRIVATE, NULL) < 0 ? "make private" : NULL;
    case OL_MOUNT_BIND:
        return bind_mount(op->src, op->dst, op->readonly);
    case OL_MOUNT_TMPFS:
        return sys_mount("tmpfs", op->dst, "tmpfs", MS_NOSUID | nodev, op->options) < 0
            ? "mount tmpfs" : NULL;
    case OL_MOUNT_RESIZE_TMPFS:
        return sys_mount(NULL, op->dst, NULL, MS_REMOUNT | SAFE, op->options) < 0
            ? "resize tmpfs" : NULL;
    case OL_MOUNT_REMOUNT_READONLY:
        return sys_mount(NULL, op->dst, NULL, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | nodev,
                         NULL) < 0 ? "remount read-only" : NULL;
    case OL_MOUNT_PROC:
        return sys_mount("proc", op->dst, "proc", SAFE | MS_NOEXEC, NULL) < 0 ? "mount proc" : NULL;
    case OL_MOUNT_DEVPTS:
        /* A new instance: the sandbox's ptys are its own, not the host's.
         * With a cap of its own: every instance on the host draws from one
         * pool (kernel.pty.max, 4096 by default, less kernel.pty.reserve,
         * 1024, kept for the host's own instance), and one sandbox without
         * a cap took all 3072, so that every other sandbox and container
         * runtime got ENOSPC from /dev/ptmx.  A handler that drives a
         * program through a terminal needs one or two; 16 times the default
         * max_sandboxes (128) is 2048, two thirds of the pool for a whole
         * worker at most, leaving the rest to the host's others. */
        return sys_mount("devpts", op->dst, "devpts", MS_NOSUID | MS_NOEXEC,
                         "newinstance,ptmxmode=0666,mode=620,max=16") < 0 ? "mount devpts" : NULL;
    case OL_MOUNT_MKDIR:
        return syscall(SYS_mkdirat, AT_FDCWD, op->dst, op->mode) < 0 && errno != EEXIST
            ? "mkdir" : NULL;
    case OL_MOUNT_SYMLINK:
        return syscall(SYS_symlinkat, op->src, AT_FDCWD, op->dst) < 0 ? "symlink" : NULL;
    case OL_MOUNT_DEVICE:
        if (syscall(SYS_mknodat, AT_FDCWD, op->dst, S_IFCHR | 0666,
                    (op->major << 8) | (op->minor & 0xff)) < 0)
            return "mknod";
        /* mknod's mode went through the umask. */
        return syscall(SYS_fchmodat, AT_FDCWD, op->dst, 0666) < 0 ? "chmod" : NULL;
    case OL_MOUNT_MASK:
        /* A directory goes behind an empty read-only tmpfs, a file behind
         * /dev/null; a path this kernel lacks needs no hiding. */
        type = file_type(op->dst);
        if (type == S_IFDIR)
            return sys_mount("tmpfs", op->dst, "tmpfs", SAFE | MS_NOEXEC | MS_RDONLY,
                             "size=0k,mode=500") < 0 ? "mask" : NULL;
        if (type != 0)
            return sys_mount("/dev/null", op->dst, NULL, MS_BIND, NULL) < 0 ? "mask" : NULL;
        return NULL;
    case OL_MOUNT_READONLY_PATH:
        return file_type(op->dst) != 0 ? bind_mount(op->dst, op->dst, 1) : NULL;
    case OL_MOUNT_ATTACH_TREE:
        if (syscall(SYS_move_mount, op->fd, "", AT_FDCWD, op->dst, MOVE_MOUNT_F_EMPTY_PATH) < 0)
            return "move_mount";
        syscall(SYS_close, op->fd);
        return NULL;
    case OL_MOUNT_PIVOT_ROOT:
        /* pivot_root(".", ".") stacks the old root on top of the new one;
         * the lazy unmount then drops it, with no directory to park it in. */
        if (syscall(SYS_chdir, op->dst) < 0)
            return "chdir";
        if (syscall(SYS_pivot_root, ".", ".") < 0)
            return "pivot_root";
        if (syscall(SYS_umount2, ".", MNT_DETACH) < 0)
            return "umount old root";
        return syscall(SYS_chdir, "/") < 0 ? "chdir" : NULL;
    }
    errno = EINVAL;
    return "unknown mount step";
}

int ol_apply_mounts(const struct ol_mount_op *ops, int n, struct ol_failure *failure)
{
    for (int i = 0; i < n; i++) {
        const char *failed = apply_one(&ops[i]);
        if (failed)
            FAIL(failure, i, failed);
    }
    return 0;
}

static double now(void)
{
    struct timespec ts;
    syscall(SYS_clock_gettime, CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

/* close() that leaves errno as the failure before it set it. */
static void close_keeping_errno(int fd)
{
    int saved = errno;
    syscall(SYS_close, fd);
    errno = saved;
}

/* A new network namespace has a loopback device, but it is down. */
int ol_loopback_up(void)
{
    struct ifreq ifr;
    int s = (int)syscall(SYS_socket, AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    int rc;
    if (s < 0)
        return -1;
    memset(&ifr, 0, sizeof ifr);
    strcpy(ifr.ifr_name, "lo");
    rc = (int)syscall(SYS_ioctl, s, SIOCGIFFLAGS, &ifr);
    if (rc == 0) {
        ifr.ifr_flags |= IFF_UP;
        rc = (int)syscall(SYS_ioctl, s, SIOCSIFFLAGS, &ifr);
    }
    close_keeping_errno(s);
    return rc;
}

/* Close every fd but 0, 1, 2 and keep (which is above 2). */
static int close_all_but(int keep)
{
    if (keep > 3 && syscall(SYS_close_range, 3, keep - 1, 0) < 0)
        return -1;
    return (int)syscall(SYS_close_range, keep + 1, ~0U, 0);
}

/* /proc/net/<name> of the calling thread's network namespace, into buf:
 * its length (size if it did not fit), or -1. */
static long read_net_file(const char *name, char *buf, long size)
{
    char path[64] = "/proc/thread-self/net/";
    long n = 0, got = 0;
    int fd;

    if (strlen(path) + strlen(name) >= sizeof path)
        return -1;
    strcat(path, name);
    fd = (int)syscall(SYS_openat, AT_FDCWD, path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return -1;
    while (n < size && (got = syscall(SYS_read, fd, buf + n, size - n)) > 0)
        n += got;
    syscall(SYS_close, fd);
    return got < 0 ? -1 : n;
}

int ol_sockstat_clean(const char *sockstat)
{
    /* Only these fields are the namespace's own: orphans, allocations and
     * memory are the host's, and move with its traffic. */
    return strncmp(sockstat, "sockets: used 0\n", 16) == 0 && strstr(sockstat, " tw 0 ") &&
           strstr(sockstat, "\nFRAG: inuse 0 memory 0\n");
}

/* Did no sandbox leave a trace in the calling thread's network namespace?
 * No socket open in it (sockstat's "sockets: used" counts every kind, even
 * one whose only reference is in flight in a unix socket's queue), no TCP
 * TIME_WAIT, no IPv4 fragment waiting (an IPv6 one moved a counter), and
 * every file of `pristine` as in a namespace just made: no packet was ever
 * sent, received or refused in it (lo's counters, the IP, IPv6, ICMP, TCP
 * and UDP MIBs), and no IPv6 flow label was left (they outlive their
 * socket).  What else it holds (addresses, routes, rules, sysctls, lo's
 * state) takes CAP_NET_ADMIN over it to change, which no handler ever has:
 * the namespace belongs to the host's user namespace, the handler runs as
 * an unprivileged uid in one of its own. */
static int netns_untouched(const struct ol_netns_snapshot *pristine)
{
    char buf[16384];
    long n = read_net_file("sockstat", buf, sizeof buf - 1);

    if (n < 0)
        return 0;
    buf[n] = 0;
    if (!ol_sockstat_clean(buf))
        return 0;
    for (int i = 0; i < pristine->n; i++) {
        n = read_net_file(pristine->names[i], buf, sizeof buf);
        if (n != pristine->len[i] || memcmp(buf, pristine->data[i], (size_t)n) != 0)
            return 0;
    }
    return 1;
}

int ol_enter_shell(struct ol_shell *shell, struct ol_failure *failure, double *stamps)
{
    int null_fd, make_netns;

    /* Never a shell outside its cgroups: no limits would hold it, and no
     * kill through them would reach it. */
    if (shell->channel_fd < 3 || shell->output_fd < 3 || shell->ncgroup_fds < 1) {
        errno = EINVAL;
        FAIL(failure, -1, "check fds");
    }
    /* Its cgroups first, so everything it allocates from here on is
     * charged to it. */
    for (int i = 0; i < shell->ncgroup_fds; i++)
        if (syscall(SYS_write, shell->cgroup_fds[i], "0", 1) < 0)
            FAIL(failure, -1, "join cgroup");
    /* Output to its own pipe, which the worker reads: never the worker's log
     * or terminal, which it could reopen through /proc/self/fd. */
    if (syscall(SYS_dup2, shell->output_fd, 1) < 0 || syscall(SYS_dup2, shell->output_fd, 2) < 0)
        FAIL(failure, -1, "dup2 output");
    null_fd = (int)syscall(SYS_openat, AT_FDCWD, "/dev/null", O_RDONLY);
    if (null_fd < 0 || syscall(SYS_dup2, null_fd, 0) < 0)
        FAIL(failure, -1, "open /dev/null");
    /* A used network namespace (sandbox/loopback.py) is joined only if
     * its last sandbox left no trace in it; else this shell makes one. */
    make_netns = shell->netns;
    if (make_netns && shell->netns_fd >= 0 && shell->pristine &&
        syscall(SYS_setns, shell->netns_fd, CLONE_NEWNET) == 0)
        make_netns = !netns_untouched(shell->pristine);
    /* Nothing of the zygote's: its control socket, epoll, wakeup pipe... */
    if (close_all_but(shell->channel_fd) < 0)
        FAIL(failure, -1, "close_range");
    stamps[0] = now();
    if (syscall(SYS_unshare, shell->ns_flags | (make_netns ? CLONE_NEWNET : 0)) < 0)
        FAIL(failure, -1, "unshare");
    if (make_netns) {
        if (ol_loopback_up() < 0)
            FAIL(failure, -1, "bring up lo");
        /* For the worker to keep, and recycle once this sandbox is gone. */
        shell->made_netns_fd = (int)syscall(SYS_openat, AT_FDCWD, "/proc/thread-self/ns/net",
                                            O_RDONLY | O_CLOEXEC);
        if (shell->made_netns_fd < 0)
            FAIL(failure, -1, "open /proc/thread-self/ns/net");
    }
    if (ol_apply_mounts(shell->mounts, shell->nmounts, failure) < 0)
        return -failure->err;
    if (syscall(SYS_sethostname, shell->hostname, strlen(shell->hostname)) < 0)
        FAIL(failure, -1, "sethostname");
    stamps[1] = now();
    return 0;
}

/* Fork n children, each as pid 1 of a new PID namespace of its own, with the
 * C library's fork(): Python's os.fork would also run the interpreter's
 * after-fork work (threading's bookkeeping, at-fork callbacks), whose
 * objects are copied on write, ~200 pages per child; with one thread, none
 * of the locks that work resets can be held.
 *
 * In one loop because every page the zygote writes after a fork costs it a
 * copy-on-write fault (~2.5 us in a VM), and its Python work around one
 * fork writes ~120 pages: between these forks only this loop's locals and
 * the two arrays are written.
 *
 * Returns i + 1 in the i-th child.  In the parent: 0, with pids[i] the i-th
 * child's pid, or 0 and failures[i] filled; or -errno if it could not go
 * back to its own PID namespace (the rest are then not forked). */
int ol_fork_shells(int n, int own_pidns, int *pids, struct ol_failure *failures)
{
    memset(pids, 0, sizeof *pids * (size_t)n);
    for (int i = 0; i < n; i++) {
        pid_t pid;
        /* unshare(CLONE_NEWPID) only changes where the *next* child goes:
         * it becomes pid 1 of a new namespace, with no second fork. */
        if (syscall(SYS_unshare, CLONE_NEWPID) < 0) {
            note_failure(&failures[i], -1, "unshare");
            continue;
        }
        pid = fork();
        if (pid == 0)
            return i + 1;
        if (pid < 0)
            note_failure(&failures[i], -1, "fork");
        else
            pids[i] = pid;
        /* Back to our own, so that the next unshare is allowed. */
        if (syscall(SYS_setns, own_pidns, CLONE_NEWPID) < 0)
            return -errno;
    }
    return 0;
}

static int write_file(const char *path, const char *text)
{
    int fd = (int)syscall(SYS_openat, AT_FDCWD, path, O_WRONLY | O_CLOEXEC);
    long n;
    if (fd < 0)
        return -1;
    n = syscall(SYS_write, fd, text, strlen(text));
    close_keeping_errno(fd);
    return n < 0 ? -1 : 0;
}

int ol_before_assignment(int last_cap, struct ol_failure *failure)
{
    /* One byte, not 0: 0 stops a core file, but the kernel ignores the limit
     * for a pipe core_pattern (apport, systemd-coredump), which would start
     * a helper as root on the host for every crash in a sandbox; it refuses
     * a pipe dump at exactly 1, and 1 byte is below any core file's minimum
     * (a page).  The handler is not dumpable, but what it execs is again
     * (exec resets it), and a host with fs.suid_dumpable=2 dumps those that
     * are not too: only this limit, which its children inherit and no one
     * in the sandbox can raise, holds for all of them. */
    static const struct { unsigned long cur, max; } no_core = {1, 1};

    /* No exec can ever grant privileges again (setuid binaries, file caps). */
    if (syscall(SYS_prctl, PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) < 0)
        FAIL(failure, -1, "PR_SET_NO_NEW_PRIVS");
    /* Empty the bounding set: no capability can be regained by any means.
     * The effective set stays, for the mounts and the uid change still to
     * come.  Only those still in it are dropped (the zygote left a few):
     * each drop commits new credentials, even of a capability not there. */
    for (int cap = 0; cap <= last_cap; cap++)
        if (syscall(SYS_prctl, PR_CAPBSET_READ, cap, 0, 0, 0) > 0 &&
            syscall(SYS_prctl, PR_CAPBSET_DROP, cap, 0, 0, 0) < 0)
            FAIL(failure, -1, "PR_CAPBSET_DROP");
    if (syscall(SYS_setgroups, 0, NULL) < 0)
        FAIL(failure, -1, "setgroups");
    /* A crash must not write the handler's memory anywhere, nor start a
     * core dump helper on the host. */
    if (syscall(SYS_setrlimit, RLIMIT_CORE, &no_core) < 0)
        FAIL(failure, -1, "setrlimit(RLIMIT_CORE)");
    /* All of the seccomp filter but what the rest of the set-up calls. */
    FAIL_IF_NEGATIVE(ol_seccomp_install(OL_SECCOMP_SHELL), failure, "seccomp");
    return 0;
}

/* n in decimal at *p, which moves past it. */
static void put_decimal(char **p, unsigned int n)
{
    char digits[10];
    int count = 0;
    do
        digits[count++] = (char)('0' + n % 10);
    while ((n /= 10) != 0);
    while (count > 0)
        *(*p)++ = digits[--count];
}

/* "<inside> <host> 1": one id mapped, as /proc/self/uid_map takes it.  Not
 * with snprintf: its first call in a handler would touch (and copy) pages
 * of the C library's state while a call waits. */
static int write_map(const char *path, unsigned int inside, unsigned int host)
{
    char map[32], *p = map;
    put_decimal(&p, inside);
    *p++ = ' ';
    put_decimal(&p, host);
    memcpy(p, " 1", 3);
    return write_file(path, map);
}

int ol_drop_privileges(const struct ol_identity *id, struct ol_failure *failure)
{
    unsigned int uid = id->host_uid;

    if (syscall(SYS_setresgid, uid, uid, uid) < 0)
        FAIL(failure, -1, "setresgid");
    if (syscall(SYS_setresuid, uid, uid, uid) < 0)
        FAIL(failure, -1, "setresuid");
    /* Leaving root made it non-dumpable, which hands its /proc files to
     * root: it must own them again to write its own maps. */
    if (syscall(SYS_prctl, PR_SET_DUMPABLE, 1, 0, 0, 0) < 0)
        FAIL(failure, -1, "PR_SET_DUMPABLE");
    if (syscall(SYS_unshare, CLONE_NEWUSER) < 0)
        FAIL(failure, -1, "unshare user namespace");
    if (write_file("/proc/self/setgroups", "deny") < 0)
        FAIL(failure, -1, "write /proc/self/setgroups");
    if (write_map("/proc/self/uid_map", id->sandbox_uid, uid) < 0)
        FAIL(failure, -1, "write /proc/self/uid_map");
    if (write_map("/proc/self/gid_map", id->sandbox_gid, uid) < 0)
        FAIL(failure, -1, "write /proc/self/gid_map");
    FAIL_IF_NEGATIVE(ol_drop_all_caps(id->last_cap), failure, "drop capabilities");
    if (syscall(SYS_prctl, PR_SET_DUMPABLE, 0, 0, 0, 0) < 0)
        FAIL(failure, -1, "PR_SET_DUMPABLE");
    if (syscall(SYS_prctl, PR_SET_PDEATHSIG, id->pdeathsig, 0, 0, 0) < 0)
        FAIL(failure, -1, "PR_SET_PDEATHSIG");
    FAIL_IF_NEGATIVE(ol_seccomp_install(OL_SECCOMP_HANDLER), failure, "seccomp");
    return 0;
}
