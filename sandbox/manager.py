"""Handler sandboxes as the worker sees them.  Nothing here knows HTTP,
registries or functions: a sandbox is given a code directory and a label.

Everything a cold start can do before its request arrives is done here
ahead of time:
- a pool of *shells*: children of the zygote that have already joined a
  cgroup (moving a process into a cgroup stalls for an RCU grace period,
  13+ ms after idle) and built their namespaces and mounts.  A call then
  only has to attach its code to one and import it;
- a pool of cgroups, all made at start-up: a dead sandbox's cgroup is
  reused, so no cgroup is made or removed while calls are served.
"""
import array
import asyncio
import collections
import fcntl
import itertools
import logging
import os
import re
import socket
import struct
import termios
import time
from dataclasses import dataclass

from .cgroups import Cgroup, Limits, default_total_mb, default_total_procs
from .errors import SandboxError
from .loopback import LoopbackPool
from .pools import Refill, wait_for_item
from .runtime import proto
from .runtime import syscalls as sc
from .uids import DEFAULT_FLOOR, UID_SLOTS, user_namespace_blocker
from .zygote import Zygote, describe_status

log = logging.getLogger("sandbox")


@dataclass(frozen=True)
class SandboxConfig:
    rootfs: str          # an unpacked root filesystem directory
    cgroup_root: str     # this worker's cgroup, relative to each hierarchy
    log_fd: int          # where zygote and handler output goes
    hostname: str
    limits: Limits = Limits()
    scratch_mb: int = 64
    pool_size: int = 8   # shells kept ready
    max_live: int = 128  # most sandboxes serving functions at once
    fresh: bool = False  # exec a new interpreter per sandbox: for comparison only
    netns: bool = True   # a network namespace of its own (False: the host's, unsafe)
    uid_base: int = DEFAULT_FLOOR  # sandbox n runs as host uid uid_base + n (sandbox.uids)
    total_mem_mb: int = None  # all sandboxes together; None: cgroups.default_total_mb
    total_procs: int = None   # all sandboxes together; None: cgroups.default_total_procs


# What the worker reads of a sandbox's output at a time.
OUTPUT_READ = 64 << 10
# A sandbox whose output is over its function's budget (OutputBudget) has
# its pipe grown to this, and emptied in the kernel this much at a time, at
# most this often (_drop_output): up to 100 MB/s; until the budget has room
# again for what waits in its pipe (_waiting_cost).
OUTPUT_DROP_CHUNK = 1 << 20
OUTPUT_DROP_EVERY = 0.01
# A longer line is written out in pieces of this size.
OUTPUT_LINE = 16 << 10
# A fresh channel's socket buffer (~200 KiB) takes this much in one send.
FIRST_MESSAGE_MAX = 32 << 10
# Control characters a handler writes reach the log escaped: a carriage
# return or a terminal's escape sequence could otherwise forge or hide the
# worker's own lines for whoever reads the log in a terminal.  So do the
# 8-bit controls (U+009B is CSI to some terminals), the marks that reorder
# text on screen (bidirectional overrides and isolates), and bytes that are
# not UTF-8 (0x9b is CSI to a terminal in an 8-bit mode), and Unicode's
# own line and paragraph separators.  Runs of them are escaped at once, by
# str.translate: one Python call per character (re.sub's) took the worker
# 0.4 s per MiB of control bytes, the event loop's time.
CONTROL_CODES = [*range(0x00, 0x09), *range(0x0a, 0x20), *range(0x7f, 0xa0), 0x061c, 0x200e,
                 0x200f, 0x2028, 0x2029, *range(0x202a, 0x202f), *range(0x2066, 0x206a)]
ESCAPES = {code: "\\x%02x" % code if code < 0x100 else "\\u%04x" % code for code in CONTROL_CODES}
# Bytes that are not UTF-8, as "surrogateescape" decodes them: U+DC80 is 0x80.
ESCAPES.update({0xdc00 + byte: "\\x%02x" % byte for byte in range(0x80, 0x100)})
TO_ESCAPE = re.compile("[%s]+" % "".join(re.escape(chr(code)) for code in ESCAPES))
# The same, one character at a time: a lone class is what the regex engine
# scans for fastest, half the time of the runs' pattern on clean text.
ANY_TO_ESCAPE = re.compile("[%s]" % "".join(re.escape(chr(code)) for code in ESCAPES))


class OutputBudget:
    """How much of its sandboxes' output each function may put in the log:
    per function, not per sandbox, for a function that fails at each call
    gets a new sandbox each time (one wrote 75 MB/s into the log), and a
    warm sandbox that logs a line per call must go on being heard.  A token
    bucket per function: bursts of up to BURST bytes, RATE bytes a second
    on average; what is over is dropped, and the log says how much."""
    RATE = 256 << 10
    BURST = 4 << 20

    def __init__(self):
        self.buckets = {}  # label -> [bytes it may write, when that was, bytes dropped]

    def charge(self, label, size):
        """`size` more bytes of what take() let through: its escapes."""
        self.buckets[label][0] -= size

    def has_room(self, label, size):
        return self._bucket(label)[0] >= size

    def dropped(self, label, size):
        """`size` bytes of the function's were dropped without a take()."""
        self._bucket(label)[2] += size

    def _bucket(self, label):
        """The function's bucket, refilled up to now."""
        now = time.monotonic()
        bucket = self.buckets.get(label)
        if bucket is None:
            if len(self.buckets) >= 10_000:  # forget the oldest
                del self.buckets[next(iter(self.buckets))]
            bucket = self.buckets[label] = [self.BURST, now, 0]
        bucket[0] = min(self.BURST, bucket[0] + (now - bucket[1]) * self.RATE)
        bucket[1] = now
        return bucket

    def take(self, label, size, written=None):
        """(whether `size` bytes of the function's may be written now, a line
        to write first about what was or is dropped, or None).  `written`:
        what of them the function wrote (not the prefixes), which is what a
        count of dropped bytes says; all of them by default."""
        bucket = self._bucket(label)
        if size > bucket[0]:
            first = not bucket[2]  # of a run
            bucket[2] += size if written is None else written
            if first:
                return False, b"[output of this function over %d KiB/s: dropped from here]" \
                    % (self.RATE >> 10)
            return False, None
        bucket[0] -= size
        dropped, bucket[2] = bucket[2], 0
        if dropped:
            return True, b"[%d bytes of output were dropped]" % dropped
        return True, None


def _escape_run(match):
    return match.group().translate(ESCAPES)


def escape_line(line):
    """A line of a handler's output as it may be written to the log."""
    text = line.decode("utf-8", "surrogateescape")
    if ANY_TO_ESCAPE.search(text) is None:  # most lines: UTF-8, nothing to escape
        return line
    return TO_ESCAPE.sub(_escape_run, text).encode()


# A shell builds its sandbox in milliseconds.  One still not ready after
# this long never will be (stopped, or stuck in the kernel), and it would
# hold its place among the shells being started for good, so that no new
# one is forked: it is killed, and a call waiting for it gets the error.
# Generous, for a pooled shell may be built at cpu.idle: CPU-bound
# handlers on every core slow it down (by about 300 times with one per core).
READY_DEADLINE = 60.0
# Seconds between attempts to restart a zygote that failed to boot.
RESTART_BACKOFF = (0.1, 0.5, 1.0, 2.0, 5.0)


def fd_batches(shells):
    """(shell, fds) pairs in consecutive runs whose fds fit in one message."""
    batch, nfds = [], 0
    for shell, fds in shells:
        if batch and nfds + len(fds) > proto.MAX_FDS:
            yield batch
            batch, nfds = [], 0
        batch.append((shell, fds))
        nfds += len(fds)
    if batch:
        yield batch


class Sandbox:
    """A shell while it waits in the pool; then one function's handler.
    `channel` is the worker's end of its stream socket."""

    def __init__(self, sandbox_id, cgroup, channel, uid):
        self.id = sandbox_id
        self.cgroup = cgroup
        self.uid = uid              # the host uid its code runs as
        self.network = "isolated"   # "isolated" (only its loopback), "host", or "egress ADDR"
        self.lease = None           # its egress namespace (sandbox.network.Lease)
        self.netns_fd = None        # its own loopback-only namespace, to recycle
        self.channel = channel
        self.label = None
        self.state = "starting"     # -> "pooled" -> "assigned"
        self.setup_times = ()       # monotonic stamps from the zygote and the shell
        self.taken_from_pool = False
        self.waited = 0.0           # seconds the caller of create() waited for a shell
        self.egress_wait = 0.0      # ...and before that, for an egress namespace
        self.assigned_at = None     # when it was given its code
        self.oom_kills = 0          # its cgroup's OOM kills before it (cgroups are reused)
        self.limit_hits = 0         # the times its cgroup had reached its own memory limit
        self.limits_customized = False
        self.out_of_memory = False
        self.lost_with_zygote = False  # it died because its zygote did: not its fault
        self.output_fd = None       # read end of its stdout/stderr pipe
        self.output_seen = 0
        self.output_partial = b""   # a line not finished yet
        self.output_dropping = False  # over its function's budget: _drop_output
        self.output_cost = 1.0      # what a byte of its output costs the budget, prefixes included
        self.exited = asyncio.get_running_loop().create_future()  # -> description
        self.ready_deadline = None  # the timer of READY_DEADLINE while it starts

    def host_pid(self):
        """The host pid of the sandbox's pid 1, or None once it is gone."""
        pids = self.cgroup.pids()
        return pids[0] if pids else None

    def setup_phases(self):
        """(phase, seconds) of building this sandbox, in order."""
        t = self.setup_times
        names = ("fork", "cgroup", "mounts", "interpreter")
        return [(names[i], t[i + 1] - t[i]) for i in range(len(t) - 1)]

    async def exit_reason(self, timeout=2.0):
        """Why the sandbox ended, e.g. "exited with status 3"."""
        try:
            return await asyncio.wait_for(asyncio.shield(self.exited), timeout)
        except asyncio.TimeoutError:
            return "closed its channel but is still running"

    def kill(self):
        if not self.exited.done():  # its cgroup may already serve another
            self.cgroup.kill()


class CgroupPool:
    """Cgroups made ahead of time and reused.  Each has a number, unique
    among the live ones, which also picks its sandbox's host uid."""

    def __init__(self, root, limits):
        self.root = root
        self.limits = limits
        self.free = []
        self.number = {}          # cgroup path -> its number
        self.spare_numbers = []   # of cgroups that were removed
        self.serial = 0
        self.oom_kills_known = {}  # cgroup path -> its OOM kills when last read

    def reserve(self, count):
        while len(self.free) < count:
            self.free.append(self._new())

    def acquire(self):
        return self.free.pop() if self.free else self._new()

    def put_back_unused(self, cgroup):
        """One no process was ever put in (its shell was not forked): it is
        as it was made.  Unlike release(), this reads nothing, so it works
        even when the worker is out of fds."""
        self.free.append(cgroup)

    def _new(self):
        if self.spare_numbers:
            number = self.spare_numbers.pop()
        elif self.serial + 1 < UID_SLOTS:
            self.serial += 1
            number = self.serial
        else:
            raise SandboxError("make cgroup", self.root, "all %d sandbox slots are in use"
                               % (UID_SLOTS - 1))
        cgroup = Cgroup("%s/cg-%d" % (self.root, number)).create(self.limits)
        self.number[cgroup.path] = number
        self.oom_kills_known[cgroup.path] = 0
        return cgroup

    def oom_kills(self, cgroup):
        """Its OOM kills so far: read when its last sandbox ended, if it was."""
        known = self.oom_kills_known.pop(cgroup.path, None)
        return cgroup.oom_kills() if known is None else known

    def read_oom_kills(self, cgroup):
        """Its OOM kills now, remembered for its next sandbox."""
        self.oom_kills_known[cgroup.path] = cgroup.oom_kills()
        return self.oom_kills_known[cgroup.path]

    def release(self, cgroup, customized=False):
        if cgroup.pids():
            cgroup.remove()  # not empty after its sandbox died: do not reuse
            self.spare_numbers.append(self.number.pop(cgroup.path))
            self.oom_kills_known.pop(cgroup.path, None)
            return
        # Back as it was made for the next one: its limits the defaults, and
        # thawed (a sandbox killed while frozen leaves its cgroup frozen, and
        # a shell forked into it would never say ready).
        if customized:
            cgroup.set_limits(self.limits)
        if cgroup.frozen:
            cgroup.thaw()
        self.free.append(cgroup)


class SandboxManager:
    def __init__(self, config, network=None):
        self.config = config
        self.network = network              # an EgressNetwork, if egress is enabled
        self.root = Cgroup(config.cgroup_root)
        # The sandboxes' cgroups, under one that holds their total memory,
        # and beside it the zygote's.  Memory a handler holds in files
        # (memfd, tmpfs) is charged to it but counts in no process's size,
        # by which the OOM killer picks: with the zygote under that total,
        # a few such handlers made it pick the zygote, the largest, and
        # every function's sandboxes died with it.  The zygote's own memory
        # is what it imported, made once.
        self.all_sandboxes = Cgroup(config.cgroup_root + "/sandboxes")
        # What they may have together (cgroups.cap_memory, cap_procs).
        self.total_mem_mb = config.total_mem_mb or default_total_mb()
        self.total_procs = config.total_procs or default_total_procs()
        self.cgroups = CgroupPool(self.all_sandboxes.path, config.limits)
        self.sandboxes = {}                 # id -> Sandbox, in every state
        self.pool = collections.deque()     # pooled shells, ready for a function
        self.starting = 0                   # shells forked but not yet ready
        self.waiters = collections.deque()  # futures of create() calls awaiting a shell
        self.rehearsed = 0                  # shells ready after a rehearsal (_fork_shells)
        self.unrehearsed = 0                # ...and without one
        self.refill_later = Refill(self._refill)
        # Recycled loopback-only namespaces, for the shells to join.
        self.loopback = LoopbackPool(2 * config.pool_size) if config.netns else None
        self.output_budget = OutputBudget()
        self.devnull = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)  # for _drop_output
        self.zygote = None
        self.closing = False
        self._serial = 0
        self._restarting = None
        self.zygote_trouble = None          # why sandboxes cannot be made now, if so

    async def start(self):
        blocker = user_namespace_blocker()
        if blocker:
            # Said once, now, rather than by every sandbox as it gets its code.
            raise SandboxError("start sandboxes", "on this host", "%s; each handler runs in a "
                               "user namespace of its own: change that setting to start" % blocker)
        # A worker that was SIGKILLed leaves cgroups behind; take them over.
        self.root.remove()
        self.all_sandboxes.create()
        self.all_sandboxes.cap_memory(self.total_mem_mb)
        self.all_sandboxes.cap_procs(self.total_procs)
        started = time.monotonic()
        # Every sandbox that can be alive at once (plus a few dying) gets its
        # cgroup now: a cgroup mkdir takes ~0.5 ms, which calls must not wait
        # behind, and doing it in a thread would fight the loop for the GIL.
        reserve = self.config.max_live + self.config.pool_size * 2
        self.cgroups.reserve(reserve)
        log.info("made %d cgroups in %.0f ms" % (reserve, (time.monotonic() - started) * 1e3))
        await self._start_zygote()
        self._refill()

    async def _start_zygote(self):
        cgroup = Cgroup(self.config.cgroup_root + "/zygote").create()
        self.zygote = Zygote(self.config.rootfs, cgroup, self.config.log_fd,
                             self.config.hostname, self.config.scratch_mb,
                             self._on_child_exit, self._on_zygote_death)
        await self.zygote.start()

    def _on_zygote_death(self, zygote, reason):
        # Its children died with it (it was pid 1 of their parent namespace).
        for sandbox_id, sandbox in list(self.sandboxes.items()):
            sandbox.lost_with_zygote = True
            self._on_child_exit(sandbox_id, None, "its zygote " + reason)
        if self.closing:
            return
        log.warning("zygote %s; restarting it" % reason)
        self._restarting = asyncio.ensure_future(self._restart_zygote())

    async def _restart_zygote(self):
        """Until a new zygote runs: one that fails to boot after a death
        (fds or memory short for a moment, or killed again) is retried, less
        often each time, for no call can be served without one."""
        for attempt in itertools.count():
            try:
                await self._start_zygote()
            except (SandboxError, OSError) as e:  # ZygoteBootError included
                self.zygote_trouble = "its zygote could not be restarted: %s" % e
                delay = RESTART_BACKOFF[min(attempt, len(RESTART_BACKOFF) - 1)]
                if attempt % 12 == 0:  # then about once a minute
                    log.warning("%s; trying again in %g s (attempt %d)" % (
                        self.zygote_trouble, delay, attempt + 1))
                await asyncio.sleep(delay)
                continue
            if self.zygote_trouble:
                log.warning("zygote restarted (attempt %d)" % (attempt + 1))
            self.zygote_trouble = None
            self._refill()
            return

    # -- shells ---------------------------------------------------------------------
    def _refill(self):
        if self.closing or self.config.fresh or self.zygote is None or not self.zygote.alive:
            return
        missing = self.config.pool_size - len(self.pool) - self.starting
        if missing > 0:
            try:
                self._fork_shells(missing)
            except SandboxError as e:
                log.warning(str(e))

    def _fork_shells(self, count, pooled=True):
        """`count` new shells, asked of the zygote in as few messages as
        the fds allow: it forks each message's shells in one go.  If one
        cannot be made, those before it still are, and the error is logged;
        it is raised if there are none."""
        # A shell for the pool is built in the background, at cpu.idle: it
        # must not take the CPUs from the calls being served (and their
        # replies).  One that a call waits for goes first (see _take_shell):
        # at cpu.idle, or even at the same share as theirs, sandboxes busy
        # with CPU-bound calls held other functions' cold starts back by
        # seconds (32 of them: p99 5.4 s, the shells' own build 2.9 s).
        share = "idle" if pooled and not self.waiters else "first"
        made, error = [], None
        try:
            while len(made) < count:
                made.append(self._new_shell(share))
        except SandboxError as e:
            error = e
        shells = []
        batches = list(fd_batches(made))
        # The rehearsal (handler.rehearsal) trades 0.3 ms of CPU per shell
        # for a faster cold start.  While calls wait for shells the CPUs are
        # behind, and the next ready shell goes to a waiting call, which
        # would wait for its rehearsal too: skipping it then made churn at
        # concurrency 8 9% faster (413 to 450 a second, 3 runs each) and
        # 200 functions at concurrency 8 10% (p50 19.4 to 17.6 ms).  One of
        # these left unused in the pool rehearses later
        # (handler.rehearse_if_unused).
        rehearse = pooled and not self.waiters
        for i, batch in enumerate(batches):
            try:
                self.zygote.fork([(shell.id, shell.uid, pooled, shell.netns_fd is not None, fds)
                                  for shell, fds in batch],
                                 self.config.scratch_mb, self.config.fresh, self.config.netns,
                                 rehearse)
            except SandboxError as e:
                error = e
                for shell, fds in (item for unsent in batches[i:] for item in unsent):
                    self._discard_new_shell(shell, fds)
                break
            for shell, fds in batch:
                for fd in fds:
                    os.close(fd)  # the zygote has its own copies now
                self._watch_new_shell(shell)
                shells.append(shell)
        if error is not None:
            if not shells:
                raise error
            log.warning(str(error))
        return shells

    def _new_shell(self, share):
        """A Sandbox for a shell not yet forked, and the fds the zygote
        passes to it: its channel, its output pipe, a used network namespace
        for it to join if it finds no trace in it (sandbox.loopback), its
        cgroup.procs files."""
        self._serial += 1
        sandbox_id = "sb-%d" % self._serial
        cgroup = self.cgroups.acquire()
        fds = []
        ours = output = netns_fd = None
        try:
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            fds.append(theirs.detach())
            # Only our end is non-blocking: the handler's writes must block
            # (not fail) when the pipe is full; we read it as fast as it fills.
            output, output_w = os.pipe2(os.O_CLOEXEC)
            os.set_blocking(output, False)
            fds.append(output_w)
            netns_fd = self.loopback.take() if self.loopback is not None else None
            if netns_fd is not None:
                fds.append(os.dup(netns_fd))  # dup'd: ours stays open with the sandbox
            fds += cgroup.open_procs()
            # Ready, its process sleeps until a call; while it builds its
            # sandbox, it runs our code, not a function's (_on_shell_ready
            # puts it back to "normal" before any).
            cgroup.set_cpu_share(share)
        except (OSError, SandboxError) as e:  # CgroupError is a SandboxError
            for fd in fds:
                os.close(fd)
            if ours is not None:
                ours.close()
            if output is not None:
                os.close(output)
            if netns_fd is not None:
                self.loopback.give_back(netns_fd)
            self.cgroups.put_back_unused(cgroup)
            raise SandboxError("fork shell", sandbox_id, str(e)) from None
        uid = self.config.uid_base + self.cgroups.number[cgroup.path]
        sandbox = Sandbox(sandbox_id, cgroup, ours, uid)
        sandbox.output_fd = output
        sandbox.netns_fd = netns_fd
        return sandbox, fds

    def _discard_new_shell(self, sandbox, fds):
        """One that _new_shell made but the zygote was not asked for."""
        for fd in fds:
            os.close(fd)
        sandbox.channel.close()
        os.close(sandbox.output_fd)
        self._release_netns(sandbox, reusable=True)
        self.cgroups.release(sandbox.cgroup)

    def _watch_new_shell(self, sandbox):
        """Asked for: wait for it to say it is ready, and copy its output."""
        if not self.config.netns:
            sandbox.network = "host"
        sandbox.oom_kills = self.cgroups.oom_kills(sandbox.cgroup)
        sandbox.limit_hits = sandbox.cgroup.limit_hits()
        self.sandboxes[sandbox.id] = sandbox
        self.starting += 1
        sandbox.channel.setblocking(False)
        loop = asyncio.get_running_loop()
        loop.add_reader(sandbox.channel.fileno(), self._on_shell_ready, sandbox)
        loop.add_reader(sandbox.output_fd, self._on_output, sandbox)
        sandbox.ready_deadline = loop.call_later(READY_DEADLINE, self._shell_failed, sandbox,
                                                 "not ready after %g s" % READY_DEADLINE)

    def _finish_output(self, sandbox):
        """Its processes are gone: copy what is left in its pipe, close it."""
        for _ in range(64):
            if sandbox.output_fd is None:
                return
            before = sandbox.output_seen
            self._on_output(sandbox)
            if sandbox.output_fd is not None and sandbox.output_seen == before:
                break  # nothing more to read, but no EOF either
        if sandbox.output_fd is not None:
            self._close_output(sandbox)

    def _start_dropping(self, sandbox, cost, written):
        sandbox.output_dropping = True
        sandbox.output_cost = cost / written  # of the read refused
        # Its unfinished line would run into what comes after the drop.
        self.output_budget.dropped(sandbox.label or "-", len(sandbox.output_partial))
        sandbox.output_partial = b""
        try:  # fewer, larger drops
            fcntl.fcntl(sandbox.output_fd, fcntl.F_SETPIPE_SZ, OUTPUT_DROP_CHUNK)
        except OSError:
            pass  # over fs.pipe-max-size: drop 64 KiB at a time

    def _waiting_cost(self, sandbox):
        """What reading its pipe would cost its function's budget now, at
        the cost per byte of the read it last refused; at most a burst,
        which the budget can always have again.  Read again only once the
        budget has as much: resumed at a fixed 64 KiB, each read was
        refused anew (a flood of short lines costs ten times its bytes with
        their prefixes), and the flood was read and split in Python, at 88%
        of a CPU.  A line after the flood costs little, and is read soon."""
        try:
            waiting = struct.unpack("i", fcntl.ioctl(sandbox.output_fd, termios.FIONREAD,
                                                     b"\0" * 4))[0]
        except OSError:
            waiting = OUTPUT_READ
        return min(min(waiting, OUTPUT_READ) * sandbox.output_cost, OutputBudget.BURST)

    def _drop_output(self, sandbox):
        """While its function is over budget, what a sandbox writes is moved
        from its pipe to /dev/null in the kernel, a MiB at most every
        OUTPUT_DROP_EVERY s.  Four floods read in Python woke the worker for
        each 64 KiB they wrote, and took 0.8 of its CPU; a handler that
        writes faster than this drains now waits for its pipe, on its own
        time."""
        try:
            moved = os.splice(sandbox.output_fd, self.devnull, OUTPUT_DROP_CHUNK,
                              flags=os.SPLICE_F_NONBLOCK)
        except BlockingIOError:
            return
        if not moved:  # its writers are gone
            self._close_output(sandbox)
            return
        sandbox.output_seen += moved
        self.output_budget.dropped(sandbox.label or "-", moved)
        loop = asyncio.get_running_loop()
        loop.remove_reader(sandbox.output_fd)
        loop.call_later(OUTPUT_DROP_EVERY, self._watch_output_again, sandbox)

    def _watch_output_again(self, sandbox):
        if sandbox.output_fd is not None:
            asyncio.get_running_loop().add_reader(sandbox.output_fd, self._on_output, sandbox)

    @staticmethod
    def _close_output(sandbox):
        asyncio.get_running_loop().remove_reader(sandbox.output_fd)
        os.close(sandbox.output_fd)
        sandbox.output_fd = None

    def _on_output(self, sandbox):
        """Copy a sandbox's output into the log, a line at a time, each line
        prefixed with the function and the sandbox, within its function's
        budget (OutputBudget)."""
        label = sandbox.label or "-"
        if sandbox.output_dropping:
            if not self.output_budget.has_room(label, self._waiting_cost(sandbox)):
                self._drop_output(sandbox)
                return
            sandbox.output_dropping = False
        try:
            data = os.read(sandbox.output_fd, OUTPUT_READ)
        except BlockingIOError:
            return
        if not data:
            self._close_output(sandbox)
            data = b"\n" if sandbox.output_partial else b""
        sandbox.output_seen += len(data)
        lines = (sandbox.output_partial + data).split(b"\n")
        partial = lines.pop()
        while len(partial) >= OUTPUT_LINE:
            lines.append(partial[:OUTPUT_LINE])
            partial = partial[OUTPUT_LINE:]
        sandbox.output_partial = partial
        if lines:
            prefix = ("[%s %s] " % (label, sandbox.id)).encode()
            # What it costs the log, prefixes and escapes included (empty
            # lines cost nothing of their own); but taken from the budget
            # before anything is escaped, so that output the budget drops
            # costs the worker no escaping, and the escapes after.
            size = sum(len(prefix) + len(line) + 1 for line in lines)
            written = size - len(prefix) * len(lines)
            allowed, notice = self.output_budget.take(label, size, written)
            out = b""
            if allowed:
                out = b"".join(prefix + escape_line(line) + b"\n" for line in lines)
                self.output_budget.charge(label, len(out) - size)
            elif sandbox.output_fd is not None:  # (else it has ended: nothing more to drop)
                self._start_dropping(sandbox, size, written)
            out = (prefix + notice + b"\n" if notice else b"") + out
            if out:
                os.write(self.config.log_fd, out)

    def _on_shell_ready(self, sandbox):
        try:
            data, fds = proto.recv_fds(sandbox.channel)
        except BlockingIOError:
            return
        except OSError:
            data, fds = b"", []
        unpacker = proto.unpacker()
        unpacker.feed(data)
        msg = next(unpacker, None)
        if fds and self.loopback is not None:
            # It made a namespace (sent with "ready", before any function's
            # code ran): the one it was given, if any, had a trace in it.
            if sandbox.netns_fd is not None:
                self.loopback.refused += 1
                os.close(sandbox.netns_fd)
            sandbox.netns_fd = fds.pop(0)
        elif sandbox.netns_fd is not None and msg and msg.get("op") == "ready":
            self.loopback.joined += 1
        for fd in fds:
            os.close(fd)
        if not msg or msg.get("op") != "ready":
            reason = msg.get("errorMessage") if msg else self._why_silent(sandbox)
            self._shell_failed(sandbox, reason)
            return
        try:
            # Every function runs with the same share of the CPUs.
            sandbox.cgroup.set_cpu_share("normal")
        except SandboxError as e:
            self._shell_failed(sandbox, str(e))
            return
        self._started(sandbox)
        sandbox.setup_times = msg["t"]
        if msg.get("rehearsed"):
            self.rehearsed += 1
        else:
            self.unrehearsed += 1
        waiter = self._next_waiter()
        if waiter is not None:
            sandbox.state = "assigned"
            waiter.set_result(sandbox)
        else:
            sandbox.state = "pooled"
            self.pool.append(sandbox)

    def _started(self, sandbox):
        """It said ready, or failed: no longer one of those starting."""
        asyncio.get_running_loop().remove_reader(sandbox.channel.fileno())
        sandbox.ready_deadline.cancel()
        self.starting -= 1

    def _shell_failed(self, sandbox, reason):
        """It could not build its sandbox: say why once, and do not refill,
        or a broken host would fork shells in a tight loop."""
        self._started(sandbox)
        if not self.closing:  # else it was killed with the others
            log.warning("shell %s failed: %s" % (sandbox.id, reason))
        sandbox.state = "failed"
        sandbox.kill()
        self._fail_waiter(SandboxError("build sandbox", sandbox.id, reason))

    def _why_silent(self, sandbox):
        """Why a shell closed its channel before it said anything."""
        if self.cgroups.read_oom_kills(sandbox.cgroup) > sandbox.oom_kills:
            return "it ran out of memory while it started " + self._which_memory_limit(sandbox)
        return "it closed its channel"

    def _which_memory_limit(self, sandbox):
        """Which limit an OOM kill in `sandbox` came from, in words: its
        own, if its cgroup reached it since the sandbox began (a cgroup
        counts the times its own limit is reached, not its parent's), else
        the one on all sandboxes together (cgroups.cap_memory).  Not by the
        total's count: one time it is reached may kill in several sandboxes,
        and only the first would have been told."""
        if sandbox.cgroup.limit_hits() > sandbox.limit_hits:
            return "(its limit is %d MB)" % sandbox.cgroup.memory_limit_mb()
        return "(all sandboxes together reached their %d MB, sandboxes_mem_mb)" % (
            self.total_mem_mb)

    def _next_waiter(self):
        """The oldest create() still waiting for a shell (cancelled ones skipped)."""
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                return waiter
        return None

    def _fail_waiter(self, error):
        waiter = self._next_waiter()
        if waiter is not None:
            waiter.set_exception(error)

    async def _take_shell(self):
        if self.pool:
            sandbox = self.pool.popleft()
            sandbox.state = "assigned"
            sandbox.taken_from_pool = True
            return sandbox
        waiter = asyncio.get_running_loop().create_future()
        self.waiters.append(waiter)
        if self.starting < len(self.waiters):
            try:
                self._fork_shells(1, pooled=False)
            except BaseException:
                self.waiters.remove(waiter)
                raise
        else:
            self._hurry_a_shell()
        return await wait_for_item(waiter, self.waiters, self._back_to_pool)

    def _hurry_a_shell(self):
        """A call waits for a shell being built for the pool: the oldest of
        those still at cpu.idle goes first from now on."""
        for sandbox in self.sandboxes.values():  # in the order they were forked
            if sandbox.state == "starting" and sandbox.cgroup.cpu_share == "idle":
                try:
                    sandbox.cgroup.set_cpu_share("first")
                except SandboxError as e:
                    log.warning(str(e))
                return

    def _back_to_pool(self, shell):
        """A shell handed to a caller that gave up: it would otherwise stay
        "assigned" for good."""
        shell.state = "pooled"
        self.pool.appendleft(shell)

    # -- sandboxes -------------------------------------------------------------------
    async def create(self, code_dir, label="", limits=None, scratch_mb=None, egress=False,
                     process_limits=None, first_message=b""):
        """A sandbox serving the code in `code_dir`: a ready shell given it,
        with `limits` and `scratch_mb` where they differ from the defaults,
        a network with egress if asked, and `process_limits` for the
        handler process to set on itself ({"nofile", "fsize", "response"},
        see sandbox.runtime.handler).

        `first_message` (packed, at most FIRST_MESSAGE_MAX bytes) goes to
        the shell with its code, in the same send: the first request, which
        it then finds as soon as its code is loaded, instead of waiting for
        the caller to get round to sending it (up to 0.3 ms after idle)."""
        if len(first_message) > FIRST_MESSAGE_MAX:
            raise ValueError("first_message is %d bytes, over %d"
                             % (len(first_message), FIRST_MESSAGE_MAX))
        started = time.monotonic()
        if self.closing:
            raise SandboxError("create sandbox", code_dir, "the manager is shutting down")
        if egress and self.network is None:
            raise SandboxError("create sandbox", code_dir, "egress is not enabled on this worker")
        if self.zygote_trouble:
            raise SandboxError("create sandbox", code_dir, self.zygote_trouble)
        if self._restarting is not None and not self._restarting.done():
            await self._restarting
        lease = await self.network.acquire() if egress else None
        leased = time.monotonic()
        try:
            sandbox = await self._take_shell()
            if sandbox.exited.done():  # it died between being handed over and now
                raise SandboxError("create sandbox", sandbox.id, await sandbox.exit_reason())
        except BaseException:
            if lease is not None:
                self.network.release(lease, reusable=True)
            raise
        if lease is not None:
            # Its own from here on: released when the sandbox is gone.
            sandbox.lease, sandbox.network = lease, "egress " + lease.address
        self.refill_later.after_take(len(self.pool) + self.starting, self.config.pool_size)
        sandbox.egress_wait = leased - started
        sandbox.waited = time.monotonic() - leased
        sandbox.label = label
        assign = {"op": "assign", "function": label}
        if process_limits:
            assign["process_limits"] = process_limits
        if scratch_mb and scratch_mb != self.config.scratch_mb:
            assign["scratch_mb"] = scratch_mb
        try:
            if limits and limits != self.config.limits:
                # Before it has its code: nothing runs yet under the old limits.
                sandbox.limits_customized = True
                sandbox.cgroup.set_limits(limits)
            code_fd = self._code_tree(code_dir)
            fds = [code_fd]
            if lease is not None:
                assign["egress"] = True
                fds.append(lease.fd)
            data = proto.pack(assign) + first_message
            sandbox.assigned_at = time.monotonic()
            try:
                sent = sandbox.channel.sendmsg(
                    [data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
            finally:
                os.close(code_fd)
            if sent != len(data):  # not on an empty channel; but never leave half sent
                raise OSError("sent %d of %d bytes" % (sent, len(data)))
        except (OSError, SandboxError) as e:  # SyscallError included: it names the operation
            sandbox.kill()
            sandbox.channel.close()
            raise SandboxError("give code to sandbox", sandbox.id, str(e)) from None
        return sandbox

    @staticmethod
    def _code_tree(code_dir):
        """A detached, read-only copy of the mount at `code_dir`, which the
        sandbox attaches at /handler.  Passing it as an fd means the zygote
        and the shell never need to see any host path."""
        fd = sc.open_tree(code_dir, sc.OPEN_TREE_CLONE | sc.OPEN_TREE_CLOEXEC | sc.AT_RECURSIVE)
        try:
            sc.mount_setattr(fd, sc.MOUNT_ATTR_RDONLY | sc.MOUNT_ATTR_NOSUID | sc.MOUNT_ATTR_NODEV)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _on_child_exit(self, sandbox_id, status, error=None):
        sandbox = self.sandboxes.pop(sandbox_id, None)
        if sandbox is None:
            return
        if sandbox.state == "starting":
            self._started(sandbox)
            self._fail_waiter(SandboxError("build sandbox", sandbox_id,
                                           error or describe_status(status)))
        if sandbox.state in ("starting", "pooled", "failed"):
            if sandbox in self.pool:
                self.pool.remove(sandbox)
            sandbox.channel.close()
        self._finish_output(sandbox)
        if status is not None and self.cgroups.read_oom_kills(sandbox.cgroup) > sandbox.oom_kills:
            sandbox.out_of_memory = True
            error = "ran out of memory " + self._which_memory_limit(sandbox)
        emptied = True
        try:
            self.cgroups.release(sandbox.cgroup, sandbox.limits_customized)
        except SandboxError as e:
            emptied = False
            log.warning(str(e))
        if sandbox.lease is not None:
            # Recycled only once nothing can be left in it: its cgroup was
            # empty, or emptied (killed and waited for) on release.
            self.network.release(sandbox.lease, reusable=emptied)
            sandbox.lease = None
        self._release_netns(sandbox, reusable=emptied)
        if not sandbox.exited.done():
            sandbox.exited.set_result(error or describe_status(status))
        if sandbox.state == "pooled":
            # Only a pooled shell's death calls for a new one: refilling after
            # shells that failed to start would fork in a loop on a broken host.
            self._refill()

    def _release_netns(self, sandbox, reusable):
        """Its loopback-only namespace, for the pool to check and recycle
        once no process can be left in it."""
        if sandbox.netns_fd is not None:
            if reusable:
                self.loopback.give_back(sandbox.netns_fd)
            else:
                os.close(sandbox.netns_fd)
            sandbox.netns_fd = None

    async def destroy(self, sandbox, timeout=2.0):
        """Kill a sandbox and wait until it is gone and its cgroup free."""
        sandbox.channel.close()
        if sandbox.id in self.sandboxes:
            sandbox.kill()
            await sandbox.exit_reason(timeout)

    async def shutdown(self):
        self.closing = True
        for sandbox in list(self.sandboxes.values()):
            sandbox.kill()
        if self._restarting is not None:
            self._restarting.cancel()
        if self.zygote is not None:
            await self.zygote.stop()
        for sandbox_id in list(self.sandboxes):
            self._on_child_exit(sandbox_id, None, "the worker shut down")
        while self.waiters:
            self._fail_waiter(SandboxError("create sandbox", "-", "the worker is shutting down"))
        if self.loopback is not None:
            self.loopback.close()
        os.close(self.devnull)
        try:
            self.root.remove()
            self.root.remove_empty_parents()
        except SandboxError as e:
            log.warning("shutdown: %s" % e)

