"""The handlers' seccomp filter (cbits/olsys.c), checked syscall by syscall
in a forked child of the test process that installs it: every refused call
answers its errno without running, and ordinary calls still run."""
import ctypes
import errno
import os
import platform
import socket

import pytest

from sandbox.runtime import syscalls as sc

pytestmark = pytest.mark.skipif(platform.machine() != "x86_64",
                                reason="syscall numbers below are x86_64's")

# x86_64 numbers of every syscall the filter refuses with EPERM.
REFUSED = {
    "ptrace": 101, "syslog": 103, "vhangup": 153, "pivot_root": 155, "adjtimex": 159,
    "chroot": 161, "acct": 163, "settimeofday": 164, "mount": 165, "umount2": 166,
    "swapon": 167, "swapoff": 168, "reboot": 169, "iopl": 172, "ioperm": 173,
    "init_module": 175, "delete_module": 176, "quotactl": 179, "clock_settime": 227,
    "kexec_load": 246, "add_key": 248, "request_key": 249, "keyctl": 250, "unshare": 272,
    "perf_event_open": 298, "name_to_handle_at": 303, "open_by_handle_at": 304,
    "clock_adjtime": 305, "setns": 308, "process_vm_readv": 310, "process_vm_writev": 311,
    "finit_module": 313, "kexec_file_load": 320, "bpf": 321, "userfaultfd": 323,
    "io_uring_setup": 425, "io_uring_enter": 426, "io_uring_register": 427,
    "io_setup": 206, "io_destroy": 207, "io_getevents": 208, "io_submit": 209, "io_cancel": 210,
    "io_pgetevents": 333,
    "open_tree": 428, "move_mount": 429, "fsopen": 430, "fsconfig": 431, "fsmount": 432,
    "fspick": 433, "mount_setattr": 442,
}
# Harmless calls on both sides of every refused one: each must still run.
ALLOWED = {"sched_yield": 24, "getpid": 39, "uname": 63, "getuid": 102, "getgid": 104,
           "getppid": 110, "getpgrp": 111, "gettid": 186, "time": 201, "getcpu": 309,
           "membarrier": 324, "rseq_unregistered": 334}
CLONE3, CLONE = 435, 56
CLONE_NEWUSER, SIGCHLD = 0x10000000, 17
AF_VSOCK, AF_PACKET = 40, 17
NETLINK_ROUTE, NETLINK_KOBJECT_UEVENT = 0, 15


def errno_of(libc, nr, *args):
    """0 if the call succeeded, else its errno."""
    ctypes.set_errno(0)
    rc = libc.syscall(nr, *[ctypes.c_long(a) for a in args])
    return ctypes.get_errno() if rc == -1 else 0


def in_filtered_child(check, install=sc.seccomp_install):
    """Run check(libc) in a forked child under the filter; return its dict."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(r)
            os.setsid()
            # Its own namespaces: a call the filter wrongly let through
            # (with the bogus arguments below) could change nothing shared.
            sc.unshare(sc.CLONE_NEWNS | sc.CLONE_NEWUTS | sc.CLONE_NEWIPC | sc.CLONE_NEWNET)
            install()
            result = check(ctypes.CDLL(None, use_errno=True))
            os.write(w, repr(result).encode())
        finally:
            os._exit(0)
    os.close(w)
    data = b""
    while chunk := os.read(r, 65536):
        data += chunk
    os.close(r)
    os.waitpid(pid, 0)
    assert data, "the filtered child died"
    return eval(data)


def test_every_refused_syscall_answers_eperm():
    results = in_filtered_child(
        lambda libc: {name: errno_of(libc, nr, 0, 0, 0, 0, 0) for name, nr in REFUSED.items()})
    wrong = {name: errno.errorcode.get(e, e) for name, e in results.items() if e != errno.EPERM}
    assert not wrong, wrong


# What a shell still calls once it has its function: the filter's last
# stage refuses them, the first leaves them to the kernel.
AT_ASSIGNMENT = ("mount", "move_mount", "setns", "unshare")


def test_a_waiting_shell_is_refused_all_but_what_its_assignment_still_calls():
    def shell_stage():
        assert sc.lib.ol_seccomp_install(sc.lib.OL_SECCOMP_SHELL) == 0
    results = in_filtered_child(
        lambda libc: {name: errno_of(libc, nr, 0, 0, 0, 0, 0) for name, nr in REFUSED.items()},
        install=shell_stage)
    assert {name for name, e in results.items() if e != errno.EPERM} == set(AT_ASSIGNMENT)


def test_ordinary_syscalls_run():
    def check(libc):
        buf = ctypes.create_string_buffer(400)
        out = {name: errno_of(libc, nr) for name, nr in ALLOWED.items()
               if name not in ("uname", "rseq_unregistered")}
        ctypes.set_errno(0)
        out["uname"] = 0 if libc.syscall(63, buf) == 0 else ctypes.get_errno()
        return out
    results = in_filtered_child(check)
    assert not {name: e for name, e in results.items() if e == errno.EPERM}, results


def test_clone_flags_and_clone3():
    def check(libc):
        return {"clone3": errno_of(libc, CLONE3, 0, 0),
                "clone_newuser": errno_of(libc, CLONE, CLONE_NEWUSER | SIGCHLD, 0, 0, 0, 0)}
    assert in_filtered_child(check) == {"clone3": errno.ENOSYS, "clone_newuser": errno.EPERM}


def test_socket_families():
    def check(libc):
        out = {}
        for name, family in (("unix", socket.AF_UNIX), ("inet", socket.AF_INET),
                             ("inet6", socket.AF_INET6), ("vsock", AF_VSOCK),
                             ("packet", AF_PACKET)):
            try:
                socket.socket(family, socket.SOCK_DGRAM).close()
                out[name] = 0
            except OSError as e:
                out[name] = e.errno
        return out
    results = in_filtered_child(check)
    assert results["unix"] == results["inet"] == 0
    assert results["inet6"] in (0, errno.EADDRNOTAVAIL)  # a host without IPv6
    assert results["vsock"] == results["packet"] == errno.EAFNOSUPPORT


def test_netlink_but_the_hosts_device_events():
    """Routing netlink is how getaddrinfo learns the addresses; uevents
    would tell the host's device events to any listener in a network
    namespace the host made."""
    def check(libc):
        out = {}
        for name, protocol in (("route", NETLINK_ROUTE), ("uevent", NETLINK_KOBJECT_UEVENT)):
            try:
                socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, protocol).close()
                out[name] = 0
            except OSError as e:
                out[name] = e.errno
        return out
    assert in_filtered_child(check) == {"route": 0, "uevent": errno.EPROTONOSUPPORT}
