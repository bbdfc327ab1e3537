"""A hostile test handler: event["op"] picks an attack, made from inside the
sandbox, and the reply says what happened.  An attempt's outcome is
"succeeded" or the name of the errno that refused it, so that the tests
can check the exact refusal.

Attacks that could change this sandbox for its next call (privileges,
limits, its working directory) are made in a forked child."""
import ctypes
import errno
import json
import os
import re
import resource
import signal
import socket
import threading
import time

libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
libc.ptrace.restype = ctypes.c_long
libc.process_vm_readv.restype = ctypes.c_ssize_t
libc.process_vm_writev.restype = ctypes.c_ssize_t

# x86_64 numbers of the syscalls that glibc has no wrapper for (the pidfd
# ones are the same on every architecture).
SYS_INIT_MODULE, SYS_DELETE_MODULE, SYS_FINIT_MODULE = 175, 176, 313
SYS_PIDFD_GETFD = 438
PTRACE_TRACEME, PTRACE_ATTACH, PTRACE_SEIZE = 0, 16, 0x4206
CAPABILITY_VERSION_3 = 0x20080522
# Memory that a forked child has at the same address as its parent: what
# the memory-reading attacks try to reach in another process.
BAIT = ctypes.create_string_buffer(b"bait", 64)
# Where the processes that leave_behind() starts write down the time.
TRAIL = "/tmp/trail"
# Made by hang() once it has left its grandchild behind.
HANGING = "/tmp/hanging"


def check(result):
    """A libc call's -1 as the OSError that Python would raise."""
    if result == -1:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return result


def syscall(number, *args):
    # Integers as longs: syscall(2) reads every argument as one.
    return check(libc.syscall(ctypes.c_long(number),
                              *[ctypes.c_long(a) if isinstance(a, int) else a for a in args]))


def outcome(attempt):
    try:
        attempt()
        return "succeeded"
    except OSError as e:
        return errno.errorcode.get(e.errno, str(e.errno))


def in_child(fn):
    """fn() run in a forked child; its JSON result comes back through a pipe."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(r)
            try:
                result = fn()
            except Exception as e:  # noqa: BLE001 - reported, not raised
                result = {"child raised": repr(e)}
            os.write(w, json.dumps(result).encode())
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        data = f.read()
    os.waitpid(pid, 0)
    return json.loads(data)


def fork_sleeper():
    """A child of this handler that does nothing, as an attack's target."""
    pid = os.fork()
    if pid == 0:
        time.sleep(60)
        os._exit(0)
    return pid


# -- ptrace and other processes' memory ----------------------------------------------
class IOVec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


def copy_memory(pid, write):
    """process_vm_readv (or _writev) of BAIT in `pid`."""
    local = ctypes.create_string_buffer(len(BAIT))
    ours = IOVec(ctypes.cast(local, ctypes.c_void_p), len(BAIT))
    theirs = IOVec(ctypes.cast(BAIT, ctypes.c_void_p), len(BAIT))
    call = libc.process_vm_writev if write else libc.process_vm_readv
    check(call(pid, ctypes.byref(ours), 1, ctypes.byref(theirs), 1, 0))


def open_mem(pid):
    os.close(os.open("/proc/%d/mem" % pid, os.O_RDONLY))


def steal_fd(pid, fd):
    """pidfd_getfd: a copy of another process's fd (pid 1's channel is fd 3)."""
    pidfd = os.pidfd_open(pid)
    try:
        os.close(syscall(SYS_PIDFD_GETFD, pidfd, fd, 0))
    finally:
        os.close(pidfd)


def ptrace(request, pid):
    check(libc.ptrace(request, pid, None, None))


def trace_others(_event):
    """Trace, or read and write the memory of, a child of this handler, and
    from a child, of pid 1 (this handler)."""
    target = fork_sleeper()
    try:
        out = {
            "attach child": outcome(lambda: ptrace(PTRACE_ATTACH, target)),
            "seize child": outcome(lambda: ptrace(PTRACE_SEIZE, target)),
            "read child memory": outcome(lambda: copy_memory(target, write=False)),
            "write child memory": outcome(lambda: copy_memory(target, write=True)),
            "open child /proc/pid/mem": outcome(lambda: open_mem(target)),
        }
    finally:
        os.kill(target, signal.SIGKILL)
        os.waitpid(target, 0)
    out.update(in_child(lambda: {
        "traceme": outcome(lambda: ptrace(PTRACE_TRACEME, 0)),
        "attach pid 1": outcome(lambda: ptrace(PTRACE_ATTACH, 1)),
        "read pid 1 memory": outcome(lambda: copy_memory(1, write=False)),
        "open pid 1 /proc/pid/mem": outcome(lambda: open_mem(1)),
        "steal pid 1 channel fd": outcome(lambda: steal_fd(1, 3)),
    }))
    return out


# -- chroot ------------------------------------------------------------------------------
def chroot_escape(event):
    """The classic escape: chroot into a subdirectory, climb out of it with
    "..", then chroot to where the climb ended."""
    def attempt():
        os.chdir("/tmp")
        os.makedirs("x", exist_ok=True)
        out = {"chroot x": outcome(lambda: os.chroot("x"))}
        for _ in range(64):
            os.chdir("..")
        out["chroot ."] = outcome(lambda: os.chroot("."))
        out["cwd"] = os.getcwd()
        out["root"] = sorted(os.listdir("/"))
        out["olrt"] = os.path.isdir("/ol/olrt")
        out["host paths seen"] = [p for p in event["host_paths"] if os.path.lexists(p)]
        return out
    return in_child(attempt)


# -- other functions' secrets ------------------------------------------------------------
# Where another function's code or scratch could show up, if anywhere.
SEARCHED = ["/tmp", "/dev/shm", "/handler", "/var/tmp", "/run", "/ol", "/root", "/home"]
PER_PROCESS = ["root/tmp", "root/dev/shm", "root/handler", "cwd"]
PER_PROCESS_FILES = ["environ", "cmdline"]


def pids():
    return [p for p in os.listdir("/proc") if p.isdigit()]


def search(event):
    """Every file under the places above, and each visible process's
    environment and command line: where each of event["secrets"] shows up,
    in a file's name or its content."""
    secrets = {s: s.encode() for s in event["secrets"]}
    hits = {s: [] for s in secrets}
    files = []
    tops = list(SEARCHED)
    for pid in pids():
        tops += ["/proc/%s/%s" % (pid, sub) for sub in PER_PROCESS]
        files += ["/proc/%s/%s" % (pid, name) for name in PER_PROCESS_FILES]
    for top in tops:
        for where, dirs, names in os.walk(top):
            for name in dirs + names:
                for secret, raw in secrets.items():
                    if raw in name.encode():
                        hits[secret].append(os.path.join(where, name))
            files += [os.path.join(where, n) for n in names]
    for path in files:
        try:
            with open(path, "rb") as f:
                data = f.read(1 << 20)
        except OSError:
            continue
        for secret, raw in secrets.items():
            if raw in data:
                hits[secret].append(path)
    return {"hits": hits, "paths seen": [p for p in event["paths"] if os.path.lexists(p)]}


# -- the worker's environment ------------------------------------------------------------
def grep_memory(pattern):
    """Every match of `pattern` in this process's anonymous memory (heap,
    stack and the rest that is no file's), where its environment and
    anything it was ever given would be.  It reads its own memory directly:
    /proc/self/mem is closed to a process that is not dumpable."""
    regex = re.compile(pattern.encode())
    found = set()
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split()
            path = fields[5] if len(fields) > 5 else ""
            if not fields[1].startswith("r") or path not in ("", "[heap]", "[stack]"):
                continue
            start, end = (int(x, 16) for x in fields[0].split("-"))
            data = ctypes.string_at(start, end - start)
            found.update(m.decode(errors="replace") for m in regex.findall(data))
    return sorted(found)


def environments(event):
    """Its environment, every environ file it can read in /proc, and what
    of event["patterns"] its memory holds."""
    files = {}
    for pid in ["self"] + pids():
        path = "/proc/%s/environ" % pid
        try:
            with open(path, "rb") as f:
                files[path] = f.read().decode(errors="replace")
        except OSError as e:
            files[path] = errno.errorcode.get(e.errno, str(e.errno))
    return {"environ": dict(os.environ), "files": files,
            # In a child, a copy of its memory: a bad read cannot kill the handler.
            "memory": in_child(lambda: {p: grep_memory(p) for p in event["patterns"]})}


# -- signals ---------------------------------------------------------------------------
def kill_pid_1(_event):
    """From a child, SIGKILL this handler, pid 1 of the sandbox."""
    return {"kill": in_child(lambda: outcome(lambda: os.kill(1, signal.SIGKILL))),
            "hostname": socket.gethostname()}


def kill_everyone(_event):
    """From a child, SIGKILL every process it may signal (kill -1)."""
    sleeper = fork_sleeper()
    result = in_child(lambda: outcome(lambda: os.kill(-1, signal.SIGKILL)))
    _, status = os.waitpid(sleeper, 0)
    return {"kill": result, "hostname": socket.gethostname(),
            "sleeper": os.WTERMSIG(status) if os.WIFSIGNALED(status) else "exited"}


def signal_outside(event):
    """A host process, by its host pid."""
    pid = event["pid"]
    return {"visible": os.path.lexists("/proc/%d" % pid),
            "signal 0": outcome(lambda: os.kill(pid, 0)),
            "SIGKILL": outcome(lambda: os.kill(pid, signal.SIGKILL)),
            "pidfd_open": outcome(lambda: os.close(os.pidfd_open(pid)))}


# -- vsock ---------------------------------------------------------------------------------
def vsock(event):
    """An AF_VSOCK socket, bound to a port that a host process holds.  It
    sends nothing: whether that port is taken says whether the sandbox
    shares the machine's vsock, and with it the way to the hypervisor."""
    try:
        sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
    except OSError as e:
        return {"socket": errno.errorcode.get(e.errno, str(e.errno))}
    with sock:
        return {"socket": "succeeded",
                "bind": outcome(lambda: sock.bind((socket.VMADDR_CID_ANY, event["port"])))}


# -- privileges and limits ---------------------------------------------------------------
LIMITS = ("RLIMIT_NOFILE", "RLIMIT_NPROC", "RLIMIT_CORE", "RLIMIT_STACK", "RLIMIT_AS",
          "RLIMIT_MEMLOCK", "RLIMIT_FSIZE", "RLIMIT_CPU")
INFINITY = (1 << 64) - 1  # RLIM_INFINITY as the kernel has it


class RLimit(ctypes.Structure):
    _fields_ = [("soft", ctypes.c_uint64), ("hard", ctypes.c_uint64)]


def get_limit(res, pid=0):
    old = RLimit()
    check(libc.prlimit(pid, res, None, ctypes.byref(old)))
    return old.soft, old.hard


def set_limit(res, soft, hard, pid=0):
    # Through libc: Python's resource module turns EPERM into ValueError.
    check(libc.prlimit(pid, res, ctypes.byref(RLimit(soft, hard)), None))


def raise_limits(_event):
    """Each limit: above its hard limit where that is finite, and back up
    after lowering it; and pid 1's, through prlimit."""
    def attempt():
        out = {}
        for name in LIMITS:
            res = getattr(resource, name)
            soft, hard = get_limit(res)
            if hard != INFINITY:
                out[name + " above hard"] = outcome(lambda: set_limit(res, hard + 1, hard + 1))
            if hard == 0:
                continue  # nothing to lower (RLIMIT_CORE)
            lowered = hard // 2 if hard != INFINITY else 1 << 20
            set_limit(res, min(soft, lowered), lowered)
            out[name + " back up"] = outcome(lambda: set_limit(res, min(soft, lowered), hard))
        soft, hard = get_limit(resource.RLIMIT_CORE, pid=1)  # 0: no core dumps
        out["pid 1's RLIMIT_CORE"] = outcome(
            lambda: set_limit(resource.RLIMIT_CORE, hard + 1, hard + 1, pid=1))
        return out
    return in_child(attempt)


class CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]


def capset_all():
    every = CapData(0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF)
    check(libc.capset(ctypes.byref(CapHeader(CAPABILITY_VERSION_3, 0)),
                      (CapData * 2)(every, every)))


def become_someone_else(_event):
    return in_child(lambda: {
        "setuid 0": outcome(lambda: os.setuid(0)),
        "setgid 0": outcome(lambda: os.setgid(0)),
        "setresuid 0": outcome(lambda: os.setresuid(0, 0, 0)),
        "seteuid 0": outcome(lambda: os.seteuid(0)),
        "setuid 1000": outcome(lambda: os.setuid(1000)),
        "setgroups [0]": outcome(lambda: os.setgroups([0])),
        "setgroups []": outcome(lambda: os.setgroups([])),
        "capset all": outcome(capset_all),
    })


def load_modules(_event):
    """The module syscalls, with arguments that would do nothing harmful
    even if they were let through: a bogus image, a Python file, and a
    module that does not exist."""
    image = ctypes.create_string_buffer(b"\x7fELF" + bytes(60))
    with open(__file__, "rb") as f:
        fd = f.fileno()
        return {
            "init_module": outcome(lambda: syscall(SYS_INIT_MODULE, image, len(image), b"")),
            "finit_module": outcome(lambda: syscall(SYS_FINIT_MODULE, fd, b"", 0)),
            "delete_module": outcome(lambda: syscall(SYS_DELETE_MODULE, b"ol_no_such_module",
                                                     os.O_NONBLOCK)),
        }


# -- leftovers ---------------------------------------------------------------------------
def stamp_forever(who):
    while True:
        with open(TRAIL, "a") as f:
            f.write("%s %.6f\n" % (who, time.time()))
        time.sleep(0.01)


def leave_behind(_event):
    """A double-forked grandchild and a thread that write the time to TRAIL
    every 10 ms, forever; the call itself returns at once."""
    child = os.fork()
    if child == 0:
        try:
            if os.fork() == 0:
                stamp_forever("grandchild")
        finally:
            os._exit(0)
    os.waitpid(child, 0)
    threading.Thread(target=stamp_forever, args=("thread",), daemon=True).start()
    return {"hostname": socket.gethostname()}


def read_trail(_event):
    with open(TRAIL) as f:
        lines = [line.split() for line in f.read().splitlines()]
    return {"hostname": socket.gethostname(),
            "stamps": [(who, float(t)) for who, t in (line for line in lines if len(line) == 2)]}


def hang(_event):
    """Leave a grandchild in a session of its own that ignores the polite
    signals, then never return."""
    child = os.fork()
    if child == 0:
        try:
            if os.fork() == 0:
                os.setsid()
                for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
                    signal.signal(sig, signal.SIG_IGN)
                time.sleep(3600)
        finally:
            os._exit(0)
    os.waitpid(child, 0)
    open(HANGING, "w").close()  # for the test: its grandchild is running
    time.sleep(3600)


OPS = {
    "trace_others": trace_others,
    "chroot_escape": chroot_escape,
    "search": search,
    "environments": environments,
    "kill_pid_1": kill_pid_1,
    "kill_everyone": kill_everyone,
    "signal_outside": signal_outside,
    "vsock": vsock,
    "raise_limits": raise_limits,
    "become_someone_else": become_someone_else,
    "load_modules": load_modules,
    "leave_behind": leave_behind,
    "read_trail": read_trail,
    "hang": hang,
}


def handler(event):
    return OPS[event["op"]](event)
