"""The root zygote: pid 1 of its own sandbox, started from the rootfs's
python3 with the runtime and common modules already imported.

It serves one control channel (fd 3, SOCK_SEQPACKET) from the worker.  For
each shell a "fork" request asks for (a batch of them at a time), it forks
a child straight into a fresh PID namespace; the child finishes its own
sandbox (its cgroup, then mount, IPC, UTS and cgroup namespaces, a network
namespace made or joined, /proc, /tmp, /dev/shm) and says "ready" on its
channel.
That is a shell: the worker keeps a few ready, and gives one a function's
code only when a call needs it.  The zygote reaps its children and reports
each exit status to the worker.
"""
import gc
import _signal
import os
import random
import selectors
import signal
import socket
import sys
import time
import traceback

try:
    from . import handler, mounts, privileges, proto
    from . import syscalls as sc
except ImportError as e:  # a rootfs without msgpack or the cffi backend
    print("zygote: cannot boot: %s" % e, file=sys.stderr)
    sys.exit(3)  # proto.EXIT_BOOT_IMPORT, which may be what failed to import

CONTROL_FD = 3

# Imported here once so that every forked handler starts with them loaded
# (and shares their memory): the common stdlib, and the heavier modules that
# web-facing functions tend to use.  Then what some of those import only on
# first use (an EmailMessage's policy, as_string's generator, strptime's
# parser, ElementTree.tostring's codec): imported in a handler, email.policy
# alone took 4 ms of its cold start, and the benchmark's heavy handler now
# starts in 2.3 ms, not 6.7 (one worker alone, back to back).  Each module
# here makes every sandbox's fork and exit dearer, however: dataclasses,
# pathlib, glob, csv, gzip, statistics, hmac, secrets and urllib.request
# (2.1 MB more of the zygote, saving 1 to 8 ms each to a function that
# imports them) cost hello's churn 4% (A/B, 4 runs each), so they are left
# to the functions that use them.
PREIMPORTS = (
    "json", "traceback", "importlib", "inspect", "base64", "collections",
    "datetime", "functools", "hashlib", "itertools", "math", "random", "re",
    "string", "struct", "time", "typing", "uuid", "logging",
    "asyncio", "decimal", "email", "email.message", "email.parser", "http.client",
    "urllib.parse", "xml.etree.ElementTree",
    "email.policy", "email.generator", "_strptime", "encodings.ascii",
)

HANDLER_NS = sc.CLONE_NEWNS | sc.CLONE_NEWIPC | sc.CLONE_NEWUTS | sc.CLONE_NEWCGROUP

# What of /proc/net a used network namespace must read exactly as a new one
# does for a shell to join it (cbits/shell.c: netns_untouched says why): its
# loopback's counters, the IP, ICMP, TCP and UDP MIBs (v4 and v6), and IPv6
# flow labels.
NETNS_FILES = ("dev", "snmp", "snmp6", "netstat", "ip6_flowlabel")


class Zygote:
    def __init__(self, control):
        self.control = control
        self.children = {}  # pid in our namespace -> sandbox id
        self.own_pidns = os.open("/proc/self/ns/pid", os.O_RDONLY | os.O_CLOEXEC)
        self.plans = {}  # scratch_mb -> mounts.CompiledPlan
        self.pristine_netns = PristineNetns()
        self.wake_r, self.wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        # The handler only wakes the loop; reaping happens in the loop.
        signal.signal(signal.SIGCHLD, lambda *_: None)
        signal.set_wakeup_fd(self.wake_w)

    def serve(self):
        sel = selectors.DefaultSelector()
        sel.register(self.control, selectors.EVENT_READ, self.on_control)
        sel.register(self.wake_r, selectors.EVENT_READ, self.on_wakeup)
        proto.send_packet(self.control, {"op": "ready"})
        try:
            while True:
                for key, _ in sel.select():
                    key.data()
        except (ConnectionResetError, BrokenPipeError):
            # The worker closed its end with messages of ours unread (a reset,
            # not an EOF): it is gone just the same, and so are we.
            sys.exit(0)

    def on_control(self):
        """Every request queued on the channel, then the forks they ask
        for in one go (ol_fork_shells says why)."""
        batch = []
        while True:
            try:
                msg, fds = proto.recv_packet(self.control, socket.MSG_DONTWAIT)
            except BlockingIOError:
                break
            if msg is None:
                sys.exit(0)  # the worker is gone; as pid 1 we take every sandbox with us
            if msg.get("op") == "fork":
                try:
                    batch += split_fork_request(msg, fds)
                except ValueError as e:
                    self.refuse(msg, fds, str(e))
            else:
                for fd in fds:
                    os.close(fd)
        if batch:
            self.fork(batch)

    def refuse(self, msg, fds, error):
        """A fork request whose fds do not add up: none of its shells is forked."""
        for fd in fds:
            os.close(fd)
        for shell in msg.get("shells", ()):
            self.fork_failed(shell["id"], error)

    def fork_failed(self, sandbox_id, error):
        proto.send_packet(self.control, {"op": "fork_failed", "id": sandbox_id, "error": error})

    def on_wakeup(self):
        try:
            while os.read(self.wake_r, 512):
                pass
        except BlockingIOError:
            pass
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            sandbox_id = self.children.pop(pid, None)
            if sandbox_id is not None:
                proto.send_packet(self.control, {"op": "exit", "id": sandbox_id, "status": status})

    def fork(self, batch):
        forked_at = time.monotonic()
        # Shells a call is waiting for go first; pooled ones can wait.
        batch.sort(key=lambda request: request[0].get("pooled", True))
        # Everything the children's C set-up needs is built here, before the
        # forks: a child runs as little Python as it can (shell.c says why).
        setups = [ShellSetup(self.plan(msg["scratch_mb"]), fds, msg.get("netns", True),
                             msg.get("netns_given", False), self.pristine_netns.snapshot,
                             msg["hostname"])
                  for msg, fds in batch]
        pids = sc.ffi.new("int[]", len(batch))
        failures = sc.ffi.new("struct ol_failure[]", len(batch))
        rc = sc.lib.ol_fork_shells(len(batch), self.own_pidns, pids, failures)
        if rc > 0:
            self.become_shell(batch[rc - 1][0], setups[rc - 1], forked_at)
        for i, (msg, fds) in enumerate(batch):
            for fd in fds:
                os.close(fd)
            if pids[i]:
                self.children[pids[i]] = msg["id"]
            elif failures[i].call:  # (not forked at all if rc < 0)
                self.fork_failed(msg["id"], str(sc.failed(failures[i], "sandbox %s" % msg["id"])))
        if rc < 0:  # cannot fork any more children where they belong
            raise sc.SyscallError("setns", "the zygote's own PID namespace", -rc)

    def plan(self, scratch_mb):
        """A shell's mount plan for this scratch size, compiled once."""
        plan = self.plans.get(scratch_mb)
        if plan is None:
            plan = self.plans[scratch_mb] = mounts.CompiledPlan(mounts.shell_plan(scratch_mb))
        return plan

    def become_shell(self, msg, setup, forked_at):
        """In the child: finish the sandbox, then serve calls.  Never returns."""
        times = [forked_at, time.monotonic()]
        try:
            reseed()
            # The C module, not signal.py: its enum wrappers touch (and so
            # copy) some 70 pages of the zygote's memory per child.
            _signal.set_wakeup_fd(-1)
            _signal.signal(_signal.SIGCHLD, _signal.SIG_DFL)
            # Its fd is closed below with every other fd of the zygote's.
            self.control.detach()
            times += setup.enter()
        except Exception as e:
            handler.report_setup_failure(setup.channel_fd, e)
            os._exit(proto.EXIT_BOOT_SETUP)
        if msg.get("fresh"):
            # No zygote benefit: a new interpreter, for comparison only.
            os.dup2(setup.channel_fd, handler.FRESH_CHANNEL_FD)
            os.execv("/usr/bin/python3", ["python3", "-s", "-B", "-m", "olrt.fresh",
                                          repr(times), str(msg["uid"]),
                                          str(int(msg.get("rehearse", False)))])
        # Whatever happens, the child ends here: an exception must never
        # unwind into the zygote's own loop, which is on this stack too; not
        # even one raised while reporting another (the function may have
        # broken sys.stderr).
        status = 1
        try:
            handler.serve(setup.channel_fd, times, msg["uid"], rehearse=msg.get("rehearse", False),
                          ready_fds=setup.made_netns())
            status = 0
        except SystemExit as e:  # sys.exit() in the function: its status, as Python gives it
            status = exit_status(e.code)
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(status)


def exit_status(code):
    """The status Python exits with for sys.exit(code)."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xff
    print(code, file=sys.stderr)
    return 1


def split_fork_request(msg, fds):
    """(request, fds) for each shell a "fork" message asks for: its own
    fields and the message's common ones, and its slice of the fds.  A
    ValueError if the fds are not all there (the zygote ran out of fds, and
    the kernel dropped some)."""
    wanted = sum(shell["nfds"] for shell in msg["shells"])
    if wanted != len(fds):
        raise ValueError("fork request: %d fds came of the %d sent" % (len(fds), wanted))
    common = {k: v for k, v in msg.items() if k != "shells"}
    shells = []
    for shell in msg["shells"]:
        shells.append((dict(common, **shell), fds[:shell["nfds"]]))
        fds = fds[shell["nfds"]:]
    return shells


class ShellSetup:
    """A forked child's whole set-up as a shell (cbits/shell.c runs it):
    - join its cgroups first, so that everything it allocates from then on
      is charged to it;
    - its output to a pipe of its own, which the worker reads: never the
      worker's log or terminal, which it could reopen through /proc/self/fd;
    - stdin from /dev/null, and no other fd of the zygote's but its channel;
    - new mount, IPC, UTS and cgroup namespaces, and unless the worker runs
      with network_isolation off, a network namespace with only a loopback
      of its own: it cannot reach the worker's port, the host's loopback
      services or other sandboxes.  The worker may give it one to join, a
      recycled one that no sandbox left a trace in (sandbox/loopback.py);
      else it makes one, and passes it to the worker with its "ready";
    - its own /proc, scratch /tmp and /dev/shm, and ptys (mounts.shell_plan);
    - its hostname."""

    def __init__(self, plan, fds, netns, netns_given, pristine_netns, hostname):
        # fds: its channel, its output pipe, the namespace given, cgroups.
        self.channel_fd, output_fd = fds[0], fds[1]
        netns_fd, cgroup_fds = (fds[2], fds[3:]) if netns_given else (-1, fds[2:])
        self.plan = plan
        self.failure = sc.ffi.new("struct ol_failure *")
        self.stamps = sc.ffi.new("double[2]")
        self._cgroup_fds = sc.ffi.new("int[]", cgroup_fds or [0])
        self._hostname = sc.ffi.new("char[]", hostname.encode())
        self.spec = sc.ffi.new("struct ol_shell *", {
            "cgroup_fds": self._cgroup_fds, "ncgroup_fds": len(cgroup_fds),
            "output_fd": output_fd, "channel_fd": self.channel_fd,
            "ns_flags": HANDLER_NS, "netns": netns, "netns_fd": netns_fd,
            "pristine": pristine_netns, "made_netns_fd": -1,
            "mounts": plan.array, "nmounts": len(plan), "hostname": self._hostname})

    def enter(self):
        """Run it; returns the stamps of its two steps (fds, then mounts)."""
        if sc.lib.ol_enter_shell(self.spec, self.failure, self.stamps) < 0:
            if self.failure.index >= 0:
                raise self.plan.error(self.failure)
            raise sc.failed(self.failure, "shell")
        return [self.stamps[0], self.stamps[1]]

    def made_netns(self):
        """[the fd of the network namespace it made], or []."""
        return [self.spec.made_netns_fd] if self.spec.made_netns_fd >= 0 else []


class PristineNetns:
    """NETNS_FILES as they read in a network namespace just made (the
    zygote makes one for a moment), for its children's C set-up to compare
    a used namespace with; a file this kernel lacks (IPv6 off) is left out.
    If none can be made, `snapshot` is NULL and the children never join a
    used one."""

    def __init__(self):
        self.snapshot = sc.ffi.NULL
        try:
            files = self._read()
        except OSError as e:  # SyscallError included
            print("zygote: used network namespaces are not recycled: %s" % e, file=sys.stderr)
            return
        self._keep = [sc.ffi.new("char[]", name.encode()) for name in files] + [
            sc.ffi.new("char[]", data) for data in files.values()]
        n = len(files)
        self._arrays = (sc.ffi.new("char *[]", self._keep[:n]),
                        sc.ffi.new("char *[]", self._keep[n:]),
                        sc.ffi.new("int[]", [len(data) for data in files.values()]))
        self.snapshot = sc.ffi.new("struct ol_netns_snapshot *", {
            "n": n, "names": self._arrays[0], "data": self._arrays[1], "len": self._arrays[2]})

    @staticmethod
    def _read():
        own = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        try:
            sc.unshare(sc.CLONE_NEWNET)
            try:
                sc.loopback_up()
                files = {}
                for name in NETNS_FILES:
                    try:
                        with open("/proc/thread-self/net/" + name, "rb") as f:
                            files[name] = f.read()
                    except FileNotFoundError:
                        pass
                return files
            finally:
                # Back to its own, or every child would start in this one;
                # the new one is gone with it.
                try:
                    sc.setns(own, sc.CLONE_NEWNET)
                except OSError as e:  # then it must not serve at all
                    raise RuntimeError(str(e)) from None
        finally:
            os.close(own)


def reseed():
    """Forked without Python's after-fork work (ol_fork_shells), and as pid
    1 like every other sandbox: what draws random numbers from state copied
    from the zygote would draw the same ones in every sandbox.

    OpenSSL's generators are left alone: warm_up never builds them, so each
    sandbox that uses them builds its own from fresh entropy.  Built in the
    zygote, every child would have to reseed them (OpenSSL notices a fork
    by a new pid, and ours is always 1): ~0.15 ms of CPU per shell, for the
    few functions that use TLS."""
    random.seed()


def warm_up():
    for name in PREIMPORTS:
        __import__(name)
    # The first use of each cffi function costs page faults and a dlsym;
    # pay them here once instead of in every child.
    for name in dir(sc.lib):
        getattr(sc.lib, name)
    sc.ffi.new("int *")
    for _ in range(WARM_UP_RUNS):
        run_the_call_path()


# CPython 3.11 rewrites a function's bytecode as it runs it: it counts the
# first calls, then quickens it, then specializes each instruction to the
# types it meets.  Made in the zygote, those writes are made once; made in
# a child, each copies the page it falls in.  Past the interpreter's
# warm-up (8 calls), a child runs the code as the zygote left it: hello's
# shells wrote 30 fewer pages each, and churn went 396 to 409 per second
# (A/B, 3 runs each).
WARM_UP_RUNS = 10


def run_the_call_path():
    """What of a shell's Python can run outside a sandbox: a throw-away
    function loaded and called, its reply packed and unpacked (the
    rehearsal), the structs it builds for its code's mount and its
    privileges, and a message with an fd."""
    handler.rehearsal()
    mounts.CompiledPlan(mounts.code_plan(-1))
    privileges.Privileges(0)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with ours, theirs:
        proto.send_packet(ours, {"op": "ready", "t": [0.0], "rehearsed": True}, [theirs.fileno()])
        _data, fds = proto.recv_fds(theirs)
        for fd in fds:
            os.close(fd)


def cannot_boot(error, status):
    print("zygote: cannot boot: %s: %s" % (type(error).__name__, error), file=sys.stderr)
    sys.exit(status)


def main():
    # `python3 -m` put its working directory, /, first on sys.path: the
    # rootfs's top directories are no modules of a function's.
    if sys.path and sys.path[0] == "/":
        del sys.path[0]
    try:
        control = socket.socket(fileno=CONTROL_FD)
        warm_up()
        # Read by the dynamic linker at start-up (sandbox/launch.py says why
        # it is set), which goes on binding at load what is loaded later
        # (extension modules a function imports).  The programs a handler
        # runs, and the fresh interpreters of the comparison mode, start
        # without it.
        os.environ.pop("LD_BIND_NOW", None)
        # A handler's stdout is a pipe, so Python buffered it by the block
        # and its print()s reached the log only when the call ended, behind
        # the stderr (line-buffered) it wrote after them.  Set here, once
        # before any fork, every handler inherits it with nothing to do.
        sys.stdout.reconfigure(line_buffering=True)
        # ol_fork_shells is only safe with one thread: another one could
        # hold the GIL at the fork, and the child would wait for it forever.
        threads = os.listdir("/proc/self/task")
        if len(threads) != 1:
            raise RuntimeError("the zygote must have one thread, it has %d" % len(threads))
        privileges.narrow_bounding_set()
    except Exception as e:
        cannot_boot(e, proto.EXIT_BOOT_IMPORT)
    try:
        zygote = Zygote(control)
    except Exception as e:
        cannot_boot(e, proto.EXIT_BOOT_SETUP)
    # Everything made so far is shared with every child.  Out of the
    # collector's reach, it is never written to by a child's GC, so its
    # pages stay shared instead of being copied into each handler.
    gc.collect()
    gc.freeze()
    zygote.serve()


if __name__ == "__main__":
    main()
