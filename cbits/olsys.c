/*
 * Syscall shims for OpenLambda's sandboxes: mechanism only, no policy.
 *
 * Each shim returns the syscall's result, or -errno on failure, so the
 * Python side can raise an error naming the operation and its object
 * without racing on a global errno.
 *
 * This library is loaded both by the host's Python (the worker) and by the
 * rootfs's Python (zygotes and handlers), whose C libraries may differ.  So
 * it calls the kernel through syscall(2) and uses no glibc wrapper newer
 * than glibc 2.2.5: one .so then works on both sides of the pivot_root.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/audit.h>
#include <linux/capability.h>
#include <linux/filter.h>
#include <linux/netlink.h>
#include <linux/seccomp.h>
#include <stddef.h>
#include <linux/close_range.h>
#include <linux/sched.h>
#include <signal.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "olsys.h"

#define RET(expr) do { long r_ = (expr); return r_ < 0 ? -errno : (int)r_; } while (0)

int ol_unshare(int flags) { RET(syscall(SYS_unshare, flags)); }

int ol_setns(int fd, int nstype) { RET(syscall(SYS_setns, fd, nstype)); }

int ol_open_tree(int dirfd, const char *path, unsigned int flags)
{
    RET(syscall(SYS_open_tree, dirfd, path, flags));
}

int ol_mount_setattr(int dirfd, const char *path, unsigned int flags,
                     uint64_t attr_set, uint64_t attr_clr, uint64_t propagation)
{
    struct {
        uint64_t attr_set, attr_clr, propagation, userns_fd;
    } attr = { attr_set, attr_clr, propagation, 0 };
    RET(syscall(SYS_mount_setattr, dirfd, path, flags, &attr, sizeof attr));
}

int ol_prctl(int option, unsigned long arg2, unsigned long arg3)
{
    RET(syscall(SYS_prctl, option, arg2, arg3, 0, 0));
}

/* Empty every capability set: the bounding set (cap 0..last_cap), then the
 * effective, permitted and inheritable ones.  In one call because a new user
 * namespace hands its creator all of them again. */
int ol_drop_all_caps(int last_cap)
{
    struct __user_cap_header_struct header = {_LINUX_CAPABILITY_VERSION_3, 0};
    struct __user_cap_data_struct data[_LINUX_CAPABILITY_U32S_3];
    for (int cap = 0; cap <= last_cap; cap++)
        if (syscall(SYS_prctl, PR_CAPBSET_DROP, cap, 0, 0, 0) < 0 && errno != EINVAL)
            return -errno;
    memset(data, 0, sizeof(data));
    RET(syscall(SYS_capset, &header, data));
}

/* Runs in the child of ol_spawn: only async-signal-safe calls until execve. */
static void spawn_child(const char *path, char *const argv[], char *const envp[],
                        const int *fds, int nfds, int err_fd)
{
    int high[OL_SPAWN_MAX_FDS];
    sigset_t none;
    int i, e;

    /* Move every kept fd (and the error pipe) out of the way first, so that
     * placing fd i never clobbers a source still to be placed: above the
     * places, and no higher (a low open-file limit must still do). */
    err_fd = (int)syscall(SYS_fcntl, err_fd, F_DUPFD_CLOEXEC, OL_SPAWN_MAX_FDS);
    if (err_fd < 0)
        syscall(SYS_exit_group, 127);
    for (i = 0; i < nfds; i++) {
        high[i] = (int)syscall(SYS_fcntl, fds[i], F_DUPFD_CLOEXEC, OL_SPAWN_MAX_FDS);
        if (high[i] < 0)
            goto fail;
    }
    for (i = 0; i < nfds; i++)
        if (syscall(SYS_dup3, high[i], i, 0) < 0)
            goto fail;
    /* Nothing else crosses the exec: no worker socket, no listening port. */
    if (syscall(SYS_close_range, nfds, ~0U, CLOSE_RANGE_CLOEXEC) < 0)
        goto fail;

    /* The parent is a Python process: it ignores SIGPIPE and may block
     * signals.  An exec'd program must start with default dispositions. */
    signal(SIGPIPE, SIG_DFL);
    signal(SIGXFSZ, SIG_DFL);
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, NULL);

    /* A session of its own: no terminal, and no signals meant for the
     * worker's process group (Ctrl-C on a foreground worker). */
    if (syscall(SYS_setsid) < 0)
        goto fail;
    /* Die with the process that spawned us: a sandbox never outlives its
     * worker, even when the worker is SIGKILLed. */
    if (syscall(SYS_prctl, PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0) < 0)
        goto fail;
    syscall(SYS_execve, path, argv, envp);
fail:
    e = errno;
    syscall(SYS_write, err_fd, &e, sizeof e);
    syscall(SYS_exit_group, 127);
}

int ol_spawn(uint64_t flags, int cgroup_fd, const char *path, char *const argv[],
             char *const envp[], const int *fds, int nfds, int err_fd, int *pidfd)
{
    struct clone_args args;
    long pid;

    if (nfds < 0 || nfds > OL_SPAWN_MAX_FDS)
        return -EINVAL;
    memset(&args, 0, sizeof args);
    args.flags = flags | CLONE_PIDFD;
    args.pidfd = (uint64_t)(uintptr_t)pidfd;
    args.exit_signal = SIGCHLD;
    if (cgroup_fd >= 0) {
        args.flags |= CLONE_INTO_CGROUP;
        args.cgroup = (uint64_t)cgroup_fd;
    }
    pid = syscall(SYS_clone3, &args, sizeof args);
    if (pid < 0)
        return -errno;
    if (pid == 0)
        spawn_child(path, argv, envp, fds, nfds, err_fd);
    return (int)pid;
}

/*
 * The seccomp filter of handler processes, applied to every thread.
 *
 * Handlers already run unprivileged; the filter shrinks what the kernel
 * exposes to them.  It refuses (EPERM) the syscalls that Docker's default
 * profile blocks for the same reasons, the legacy AIO ones (their contexts
 * are a host-wide pool), namespace creation through clone()
 * flags, sockets of families other than unix, inet, inet6 and netlink
 * (EAFNOSUPPORT), netlink sockets for the kernel's uevents
 * (EPROTONOSUPPORT), and every other syscall ABI (32-bit int 0x80 and x32 calls use
 * other numbers and would walk around the list).  clone3 answers ENOSYS:
 * its flags sit in memory where a filter cannot read them, and glibc falls
 * back to clone(), whose flags can be checked.
 *
 * The rules are searched as a binary tree, not a list.  Installing a filter
 * makes the kernel run it once per syscall number to cache which ones it
 * always allows, and a handler's uncached syscalls run it too: a list of 50
 * rules made that 0.13 ms of every cold start, a tree a fraction of it.
 *
 * In two stages, whose filters stack (a call any of them refuses is
 * refused): OL_SECCOMP_SHELL, installed while the shell waits in the pool,
 * holds every rule but those for the calls the shell itself still makes
 * once it gets its function (attaching the code and resizing its scratch,
 * joining an egress namespace, entering its user namespace);
 * OL_SECCOMP_HANDLER, the last step before the function's code runs,
 * refuses those too.  Installing the whole filter then took 0.13 ms of
 * every cold start; the second stage alone is a handful of instructions.
 */
#if defined(__x86_64__)
#define OL_AUDIT_ARCH AUDIT_ARCH_X86_64
#elif defined(__aarch64__)
#define OL_AUDIT_ARCH AUDIT_ARCH_AARCH64
#endif

#ifdef OL_AUDIT_ARCH
enum action { DENY, NO_SUCH_CALL, CHECK_CLONE_FLAGS, CHECK_SOCKET_FAMILY };

struct rule {
    int nr;
    enum action action;
};

/* What a shell still calls once it has its function: refused by the last
 * stage only. */
static const int AT_ASSIGNMENT[] = {SYS_mount, SYS_move_mount, SYS_setns, SYS_unshare};

static int stage_of(int nr)
{
    for (size_t i = 0; i < sizeof AT_ASSIGNMENT / sizeof AT_ASSIGNMENT[0]; i++)
        if (AT_ASSIGNMENT[i] == nr)
            return OL_SECCOMP_HANDLER;
    return OL_SECCOMP_SHELL;
}

static const struct rule RULES[] = {
    {SYS_clone3, NO_SUCH_CALL}, {SYS_clone, CHECK_CLONE_FLAGS},
    /* Sockets of the families a network namespace isolates, and no other:
     * vsock, for one, reaches the hypervisor and every vsock service of the
     * machine from any namespace. */
    {SYS_socket, CHECK_SOCKET_FAMILY}, {SYS_socketpair, CHECK_SOCKET_FAMILY},
    {SYS_mount, DENY}, {SYS_umount2, DENY}, {SYS_pivot_root, DENY}, {SYS_chroot, DENY},
    {SYS_setns, DENY}, {SYS_unshare, DENY},
    {SYS_open_tree, DENY}, {SYS_move_mount, DENY}, {SYS_fsopen, DENY}, {SYS_fsconfig, DENY},
    {SYS_fsmount, DENY}, {SYS_fspick, DENY}, {SYS_mount_setattr, DENY},
    {SYS_keyctl, DENY}, {SYS_add_key, DENY}, {SYS_request_key, DENY},
    {SYS_bpf, DENY}, {SYS_perf_event_open, DENY}, {SYS_ptrace, DENY},
    {SYS_process_vm_readv, DENY}, {SYS_process_vm_writev, DENY}, {SYS_userfaultfd, DENY},
    {SYS_kexec_load, DENY}, {SYS_kexec_file_load, DENY}, {SYS_init_module, DENY},
    {SYS_finit_module, DENY}, {SYS_delete_module, DENY}, {SYS_reboot, DENY},
    {SYS_swapon, DENY}, {SYS_swapoff, DENY}, {SYS_acct, DENY}, {SYS_quotactl, DENY},
    {SYS_open_by_handle_at, DENY}, {SYS_name_to_handle_at, DENY},
    {SYS_settimeofday, DENY}, {SYS_clock_settime, DENY}, {SYS_clock_adjtime, DENY},
    {SYS_adjtimex, DENY}, {SYS_syslog, DENY}, {SYS_vhangup, DENY},
    {SYS_io_uring_setup, DENY}, {SYS_io_uring_enter, DENY}, {SYS_io_uring_register, DENY},
    /* Legacy AIO, refused as io_uring is: its contexts are counted host-wide
     * (fs.aio-nr against fs.aio-max-nr), so one sandbox calling io_setup
     * until it fails made io_setup fail for every process of the host, for
     * as long as its contexts lived.  glibc's POSIX aio_* use threads, not
     * these. */
    {SYS_io_setup, DENY}, {SYS_io_destroy, DENY}, {SYS_io_submit, DENY},
    {SYS_io_cancel, DENY}, {SYS_io_getevents, DENY}, {SYS_io_pgetevents, DENY},
#ifdef SYS_iopl
    {SYS_iopl, DENY}, {SYS_ioperm, DENY},
#endif
};

#define NRULES ((int)(sizeof RULES / sizeof RULES[0]))
#define CLONE_NAMESPACES 0x7E020000u  /* CLONE_NEWNS|NEWCGROUP|NEWUTS|NEWIPC|NEWUSER|NEWPID|NEWNET */
#define PROG_MAX 512

struct program {
    struct sock_filter insns[PROG_MAX];
    int len;
    int overflow;
};

static void emit(struct program *p, struct sock_filter insn)
{
    if (p->len < PROG_MAX)
        p->insns[p->len++] = insn;
    else
        p->overflow = 1;
}

static void ret(struct program *p, unsigned int value)
{
    emit(p, (struct sock_filter)BPF_STMT(BPF_RET | BPF_K, value));
}

static void load(struct program *p, unsigned int offset)
{
    emit(p, (struct sock_filter)BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offset));
}

static void jump(struct program *p, unsigned short op, unsigned int k, int jt, int jf)
{
    emit(p, (struct sock_filter)BPF_JUMP(BPF_JMP | op | BPF_K, k, jt, jf));
}

static int action_length(enum action action)
{
    return action == CHECK_CLONE_FLAGS ? 4 : action == CHECK_SOCKET_FAMILY ? 10 : 1;
}

/* What a matched syscall gets; each ends in a return. */
static void emit_action(struct program *p, enum action action)
{
    switch (action) {
    case DENY:
        ret(p, SECCOMP_RET_ERRNO | EPERM);
        break;
    case NO_SUCH_CALL:
        ret(p, SECCOMP_RET_ERRNO | ENOSYS);
        break;
    case CHECK_CLONE_FLAGS:
        load(p, offsetof(struct seccomp_data, args[0]));
        jump(p, BPF_JSET, CLONE_NAMESPACES, 0, 1);
        ret(p, SECCOMP_RET_ERRNO | EPERM);
        ret(p, SECCOMP_RET_ALLOW);
        break;
    case CHECK_SOCKET_FAMILY:
        load(p, offsetof(struct seccomp_data, args[0]));
        jump(p, BPF_JEQ, AF_UNIX, 7, 0);
        jump(p, BPF_JEQ, AF_INET, 6, 0);
        jump(p, BPF_JEQ, AF_INET6, 5, 0);
        jump(p, BPF_JEQ, AF_NETLINK, 1, 0);
        ret(p, SECCOMP_RET_ERRNO | EAFNOSUPPORT);
        /* Netlink but its uevents: a network namespace made by the host's
         * user namespace hears the host's device events, and listening
         * takes no privilege. */
        load(p, offsetof(struct seccomp_data, args[2]));
        jump(p, BPF_JEQ, NETLINK_KOBJECT_UEVENT, 0, 1);
        ret(p, SECCOMP_RET_ERRNO | EPROTONOSUPPORT);
        ret(p, SECCOMP_RET_ALLOW);
        break;
    }
}

/* A binary search for the syscall number (in A) among rules[0..n), sorted
 * by number; a number with no rule is allowed. */
static void emit_search(struct program *p, const struct rule *rules, int n)
{
    int at, mid, i;

    if (n <= 3) {
        for (i = 0; i < n; i++) {
            jump(p, BPF_JEQ, rules[i].nr, 0, action_length(rules[i].action));
            emit_action(p, rules[i].action);
        }
        ret(p, SECCOMP_RET_ALLOW);
        return;
    }
    mid = n / 2;
    at = p->len;
    jump(p, BPF_JGE, rules[mid].nr, 0, 0);  /* jt: set once the left half is out */
    emit_search(p, rules, mid);
    if (p->len - at - 1 > 255)
        p->overflow = 1;
    else if (at < PROG_MAX)
        p->insns[at].jt = (unsigned char)(p->len - at - 1);
    emit_search(p, rules + mid, n - mid);
}

static int by_number(const void *a, const void *b)
{
    return ((const struct rule *)a)->nr - ((const struct rule *)b)->nr;
}
#endif

int ol_seccomp_install(int stage)
{
#ifdef OL_AUDIT_ARCH
    struct program p;
    struct rule sorted[NRULES];
    struct sock_fprog prog;
    int n = 0;

    for (int i = 0; i < NRULES; i++)
        if (stage_of(RULES[i].nr) == stage)
            sorted[n++] = RULES[i];
    qsort(sorted, (size_t)n, sizeof sorted[0], by_number);
    p.len = p.overflow = 0;
    load(&p, offsetof(struct seccomp_data, arch));
    jump(&p, BPF_JEQ, OL_AUDIT_ARCH, 1, 0);
    ret(&p, SECCOMP_RET_ERRNO | EPERM);
    load(&p, offsetof(struct seccomp_data, nr));
#ifdef __X32_SYSCALL_BIT
    jump(&p, BPF_JGE, __X32_SYSCALL_BIT, 0, 1);
    ret(&p, SECCOMP_RET_ERRNO | EPERM);
#endif
    emit_search(&p, sorted, n);
    if (p.overflow)
        return -E2BIG;
    prog.len = (unsigned short)p.len;
    prog.filter = p.insns;
    RET(syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER, SECCOMP_FILTER_FLAG_TSYNC, &prog));
#else
    return -ENOSYS;
#endif
}
