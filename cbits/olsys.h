/* Declarations shared by olsys.c and the cffi builder (build.py feeds this
 * file to cffi's cdef, so it holds plain declarations only). */
#define OL_SPAWN_MAX_FDS 16

int ol_unshare(int flags);
int ol_setns(int fd, int nstype);
int ol_mount(const char *source, const char *target, const char *fstype,
             unsigned long flags, const char *data);
int ol_umount2(const char *target, int flags);
int ol_pivot_root(const char *new_root, const char *put_old);
int ol_open_tree(int dirfd, const char *path, unsigned int flags);
int ol_move_mount(int from_dirfd, const char *from_path, int to_dirfd,
                  const char *to_path, unsigned int flags);
int ol_mount_setattr(int dirfd, const char *path, unsigned int flags,
                     uint64_t attr_set, uint64_t attr_clr, uint64_t propagation);
int ol_fork(void);
int ol_prctl(int option, unsigned long arg2, unsigned long arg3);
int ol_drop_all_caps(int last_cap);
int ol_seccomp_install(void);
int ol_spawn(uint64_t flags, int cgroup_fd, const char *path, char *const argv[],
             char *const envp[], const int *fds, int nfds, int err_fd, int *pidfd);
