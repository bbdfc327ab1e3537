/* Declarations shared by olsys.c and the cffi builder (build.py feeds this
 * file to cffi's cdef, so it holds plain declarations only). */
#define OL_SPAWN_MAX_FDS 16

int ol_unshare(int flags);
int ol_setns(int fd, int nstype);
int ol_open_tree(int dirfd, const char *path, unsigned int flags);
int ol_mount_setattr(int dirfd, const char *path, unsigned int flags,
                     uint64_t attr_set, uint64_t attr_clr, uint64_t propagation);
int ol_prctl(int option, unsigned long arg2, unsigned long arg3);
int ol_drop_all_caps(int last_cap);
/* The handlers' seccomp filter, in two stages (olsys.c says why). */
#define OL_SECCOMP_SHELL 1
#define OL_SECCOMP_HANDLER 2
int ol_seccomp_install(int stage);
int ol_spawn(uint64_t flags, int cgroup_fd, const char *path, char *const argv[],
             char *const envp[], const int *fds, int nfds, int err_fd, int *pidfd);

/* cbits/shell.c: mount plans (sandbox/runtime/mounts.py), and a zygote
 * child's set-up as a shell (sandbox/runtime/zygote.py). */
#define OL_MOUNT_PRIVATE 1
#define OL_MOUNT_BIND 2
#define OL_MOUNT_TMPFS 3
#define OL_MOUNT_RESIZE_TMPFS 4
#define OL_MOUNT_REMOUNT_READONLY 5
#define OL_MOUNT_PROC 6
#define OL_MOUNT_DEVPTS 7
#define OL_MOUNT_MKDIR 8
#define OL_MOUNT_SYMLINK 9
#define OL_MOUNT_DEVICE 10
#define OL_MOUNT_MASK 11
#define OL_MOUNT_READONLY_PATH 12
#define OL_MOUNT_ATTACH_TREE 13
#define OL_MOUNT_PIVOT_ROOT 14

struct ol_mount_op {
    int kind;             /* OL_MOUNT_* */
    const char *src;      /* BIND: its source; SYMLINK: its target */
    const char *dst;      /* the path the step acts on */
    const char *options;  /* TMPFS, RESIZE_TMPFS: mount options */
    int readonly;         /* BIND */
    int nodev;            /* TMPFS, REMOUNT_READONLY */
    int fd;               /* ATTACH_TREE: a detached tree (open_tree) */
    unsigned int mode;    /* MKDIR */
    unsigned int major, minor;  /* DEVICE */
};

/* What failed: the step (-1 for one outside the mount plan), the syscall
 * (a static string) and errno. */
struct ol_failure {
    int index;
    const char *call;
    int err;
};

/* Files of /proc/net as they read in a network namespace just made. */
struct ol_netns_snapshot {
    int n;
    const char *const *names;  /* e.g. "snmp" */
    const char *const *data;
    const int *len;
};

struct ol_shell {
    const int *cgroup_fds;  /* each cgroup's cgroup.procs, open for writing */
    int ncgroup_fds;
    int output_fd;          /* becomes fds 1 and 2 */
    int channel_fd;         /* kept, with 0, 1 and 2; every other fd is closed */
    int ns_flags;           /* namespaces to unshare, the network's aside */
    int netns;              /* 1: a network namespace of its own; 0: the zygote's */
    int netns_fd;           /* a used one, to join if untouched; or -1 */
    const struct ol_netns_snapshot *pristine;  /* what untouched means; NULL: join none */
    int made_netns_fd;      /* out: the one it made (and brought lo up in), open; or -1 */
    const struct ol_mount_op *mounts;
    int nmounts;
    const char *hostname;
};

int ol_apply_mounts(const struct ol_mount_op *ops, int n, struct ol_failure *failure);
/* Bring up lo in the calling thread's network namespace: 0, or -1 and errno. */
int ol_loopback_up(void);
/* stamps[0]: when its cgroups and fds were done; stamps[1]: its namespaces
 * and mounts (CLOCK_MONOTONIC, Python's time.monotonic()). */
int ol_enter_shell(struct ol_shell *shell, struct ol_failure *failure, double *stamps);
/* Does /proc/net/sockstat's text show no socket, TIME_WAIT or fragment? */
int ol_sockstat_clean(const char *sockstat);
/* Fork n shells (sandbox/runtime/zygote.py): i + 1 in the i-th child. */
int ol_fork_shells(int n, int own_pidns, int *pids, struct ol_failure *failures);

/* A shell leaving root, in two steps (sandbox/runtime/privileges.py):
 * while it waits in the pool, and once it has its code. */
int ol_before_assignment(int last_cap, struct ol_failure *failure);

struct ol_identity {
    unsigned int host_uid;  /* its uid and gid on the host */
    unsigned int sandbox_uid, sandbox_gid;  /* who that is in its user namespace */
    int last_cap;           /* the highest capability number of this kernel */
    int pdeathsig;
};

int ol_drop_privileges(const struct ol_identity *id, struct ol_failure *failure);
