"""A test handler with subcommands: event["op"] says what to do, from inside
the sandbox, and the result says what it saw."""
import ctypes
import errno
import os
import socket
import sys
import time


def _try(fn, *args):
    try:
        return {"ok": True, "value": fn(*args)}
    except OSError as e:
        return {"ok": False, "errno": errno.errorcode.get(e.errno, str(e.errno))}


def _write(path, data):
    with open(path, "w") as f:
        f.write(data)
    return len(data)


def _read(path):
    with open(path) as f:
        return f.read()


def _connect(host, port):
    with socket.create_connection((host, port), timeout=2):
        return "connected"


def _loopback():
    """A server and a client on the sandbox's own loopback."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        with socket.create_connection(server.getsockname(), timeout=2):
            return "connected"


def _attacks():
    """Each privileged thing a hostile handler might try: what happened."""
    import ctypes
    import resource
    import stat

    libc = ctypes.CDLL(None, use_errno=True)

    def c(result):
        if result != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))

    attempts = {
        "mount": lambda: c(libc.mount(b"tmpfs", b"/tmp", b"tmpfs", 0, None)),
        "umount": lambda: c(libc.umount2(b"/handler", 2)),
        "unshare": lambda: c(libc.unshare(0x00020000)),
        "setns": lambda: c(libc.setns(os.open("/proc/self/ns/uts", os.O_RDONLY), 0)),
        "chroot": lambda: os.chroot("/tmp"),
        "mknod": lambda: os.mknod("/tmp/mem", 0o600 | stat.S_IFCHR, os.makedev(1, 1)),
        "sethostname": lambda: socket.sethostname("evil"),
        "setuid0": lambda: os.setuid(0),
        "sysrq": lambda: open("/proc/sysrq-trigger", "w").write("h"),
        "raise_nofile": lambda: resource.setrlimit(
            resource.RLIMIT_NOFILE, (resource.getrlimit(resource.RLIMIT_NOFILE)[1] + 1,) * 2),
        "init_module": lambda: c(libc.syscall(175, None, 0, b"")),
        "unshare_user": lambda: c(libc.unshare(0x10000000)),
        "clone_newuser": lambda: c(0 if libc.syscall(56, 0x10000000 | 17, 0, 0, 0, 0) >= 0
                                   else -1),
        "keyctl": lambda: c(libc.syscall(250, 0, -3, 0, 0, 0)),  # KEYCTL_GET_KEYRING_ID
        "bpf": lambda: c(libc.syscall(321, 0, None, 0)),
        "ptrace_traceme": lambda: c(libc.ptrace(0, 0, None, None)),
        "userfaultfd": lambda: c(0 if libc.syscall(323, 0) >= 0 else -1),
        "perf_event_open": lambda: c(0 if libc.syscall(298, None, 0, -1, -1, 0) >= 0 else -1),
        "io_uring_setup": lambda: c(0 if libc.syscall(425, 1, None) >= 0 else -1),
    }
    out = {}
    for name, attempt in attempts.items():
        try:
            attempt()
            out[name] = "succeeded"
        except OSError as e:
            out[name] = errno.errorcode.get(e.errno, str(e.errno))
        except Exception as e:  # noqa: BLE001 - any refusal is fine
            out[name] = type(e).__name__
    return out


def _everyday():
    """What ordinary handlers do, which the hardening must not break."""
    import subprocess
    import threading
    out = []
    t = threading.Thread(target=lambda: out.append("thread"))
    t.start()
    t.join()
    pid = os.fork()
    if pid == 0:
        os._exit(7)
    out.append("fork exit %d" % os.WEXITSTATUS(os.waitpid(pid, 0)[1]))
    out.append(subprocess.run(["/bin/echo", "subprocess"], capture_output=True,
                              text=True).stdout.strip())
    with open("/dev/urandom", "rb") as f:
        out.append("urandom %d" % len(f.read(8)))
    # Shells are forked without Python's after-fork hooks (ol_fork_shells):
    # the modules whose state those hooks reset still work.
    import asyncio
    import concurrent.futures
    import multiprocessing
    with multiprocessing.get_context("fork").Pool(2) as pool:
        out.append("pool %s" % pool.map(abs, [-1, -2]))
    with concurrent.futures.ThreadPoolExecutor(2) as executor:
        out.append("executor %s" % list(executor.map(abs, [-3])))
    out.append(asyncio.run(asyncio.sleep(0, result="asyncio")))
    return out


def _status():
    with open("/proc/self/status") as f:
        return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)


def facts(_event):
    return {
        "pid": os.getpid(),
        "ppid": os.getppid(),
        "uid": os.getuid(),
        "hostname": socket.gethostname(),
        "root": sorted(os.listdir("/")),
        "dev": sorted(os.listdir("/dev")),
        "proc_pids": sorted(int(p) for p in os.listdir("/proc") if p.isdigit()),
        "mountinfo": _read("/proc/self/mountinfo").splitlines(),
        "cgroup": _read("/proc/self/cgroup").splitlines(),
        "cwd": os.getcwd(),
        "fds": sorted(int(fd) for fd in os.listdir("/proc/self/fd")),
    }


OPS = {
    "echo": lambda e: e,
    "facts": facts,
    "write": lambda e: _try(_write, e["path"], e.get("data", "x") * e.get("repeat", 1)),
    "read": lambda e: _try(_read, e["path"]),
    "exists": lambda e: os.path.exists(e["path"]),
    "listdir": lambda e: _try(os.listdir, e["path"]),
    "raise": lambda e: (_ for _ in ()).throw(RuntimeError(e.get("message", "boom"))),
    "exit": lambda e: os._exit(e.get("code", 3)),
    "sys.exit": lambda e: sys.exit(e.get("code")),
    "float": lambda e: float(e["value"]),
    "segv": lambda e: ctypes.string_at(0),
    "sleep": lambda e: (time.sleep(e.get("seconds", 0.1)), socket.gethostname())[1],
    "unjsonable": lambda e: {1, 2},
    "attacks": lambda e: _attacks(),
    "everyday": lambda e: _everyday(),
    "status": lambda e: _status(),
    "interfaces": lambda e: [name for _, name in socket.if_nameindex()],
    "connect": lambda e: _try(_connect, e["host"], e["port"]),
    "loopback": lambda e: _try(_loopback),
}


def handler(event):
    return OPS[event["op"]](event)
