"""cgroups behind one interface, over three host layouts:

- "v2": controllers on the unified hierarchy (recent Debian, Ubuntu, Fedora);
- "hybrid": memory/pids/cpu on v1 hierarchies, plus a cgroup2 tree without
  controllers (these dev and CI machines).  Limits go through v1; freeze,
  kill and population events through v2's core files, which work there;
- "v1": v1 only.  Freeze through the v1 freezer; kill by signals, frozen.

The mode is detected once per process.  Only the standard library is used,
so `bin/admin` can clean up with any python3.
"""
import errno
import functools
import os
import select
import signal
import subprocess
import time
from dataclasses import dataclass, field

from .errors import CgroupError

LIMITED = ("memory", "pids", "cpu")
CPU_PERIOD_US = 100_000


@dataclass(frozen=True)
class Limits:
    mem_mb: int = 256
    procs: int = 64
    cpu_percent: int = 100


@dataclass(frozen=True)
class Mode:
    name: str                        # "v2", "hybrid" or "v1"
    v2_root: str = None              # where cgroup2 is mounted, if anywhere
    v1_roots: dict = field(default_factory=dict)  # controller -> mount point
    v1_freezer: str = None           # the v1 freezer, used only where there is no v2


def _cgroup_mounts(mountinfo="/proc/self/mountinfo"):
    """(fstype, mount point, super options) of every cgroup mount."""
    with open(mountinfo) as f:
        for line in f:
            left, right = line.split(" - ", 1)
            fstype, _source, super_opts = right.split()[:3]
            if fstype in ("cgroup", "cgroup2"):
                yield fstype, left.split()[4], super_opts.split(",")


def detect_mode(mountinfo="/proc/self/mountinfo"):
    v2_root = None
    v1_roots = {}
    freezer = None
    for fstype, point, opts in _cgroup_mounts(mountinfo):
        if fstype == "cgroup2":
            v2_root = v2_root or point
        else:
            for controller in LIMITED:
                if controller in opts:
                    v1_roots.setdefault(controller, point)
            if "freezer" in opts:
                freezer = freezer or point
    if v2_root:
        try:
            with open(os.path.join(v2_root, "cgroup.controllers")) as f:
                controllers = f.read().split()
        except OSError:
            controllers = []
        if set(LIMITED) <= set(controllers):
            return Mode("v2", v2_root)
    missing = [c for c in LIMITED if c not in v1_roots]
    if missing:
        raise CgroupError("detect cgroups", mountinfo,
                          "no hierarchy offers the %s controller(s)" % ", ".join(missing))
    if v2_root:
        return Mode("hybrid", v2_root, v1_roots)
    return Mode("v1", None, v1_roots, freezer)


@functools.lru_cache(maxsize=None)
def mode():
    """The host's cgroup layout, detected once."""
    return detect_mode()


def favor_moves():
    """Remount the cgroup2 tree with `favordynmods` (Linux 6.0+), unless it
    has it already.  Returns a line saying what happened.

    Moving a process into a cgroup otherwise waits for an RCU grace period
    whenever the host has been idle (6-15 ms here) while holding the global
    cgroup_mutex, so every cgroup operation on the host stalls behind it.
    The option makes the kernel keep that lock in its writer-friendly mode:
    moves take microseconds, and fork and exit pay a little more.  It is
    host-wide, which is why it is a setting (favor_cgroup_moves)."""
    root = mode().v2_root
    if not root:
        return "no cgroup2 tree: cgroup moves stay slow after idle"
    for fstype, point, opts in _cgroup_mounts():
        if fstype == "cgroup2" and point == root and "favordynmods" in opts:
            return "%s already has favordynmods" % root
    # mount(8) keeps the tree's other options (nsdelegate...) as they are.
    done = subprocess.run(["mount", "-o", "remount,favordynmods", root],
                          capture_output=True, text=True)
    if done.returncode != 0:
        return "could not remount %s with favordynmods (%s): cgroup moves stay slow after " \
               "idle" % (root, done.stderr.strip() or "status %d" % done.returncode)
    return "remounted %s with favordynmods: cgroup moves no longer wait after idle" % root


def _write(path, value):
    """Write a control file.  Not open(path, "w"): its O_TRUNC makes the
    kernel change the file's attributes first, under a lock of the whole
    cgroup tree that other cgroup work can hold for milliseconds."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.write(fd, value.encode())
        finally:
            os.close(fd)
    except OSError as e:
        raise CgroupError("write %r to" % value, path, e.strerror) from None


class Cgroup:
    """One cgroup, by its path relative to each hierarchy's root."""

    def __init__(self, path, mode_=None):
        self.path = path.strip("/")
        self.mode = mode_ or mode()
        self.frozen = False  # by freeze(); a frozen cgroup stays so with no process in it
        self.cpu_share = "normal"  # by set_cpu_share(): what its files say now

    def __repr__(self):
        return "Cgroup(%r, %s)" % (self.path, self.mode.name)

    # -- where it lives ---------------------------------------------------
    def v2_dir(self):
        return os.path.join(self.mode.v2_root, self.path) if self.mode.v2_root else None

    def limit_dirs(self):
        """controller -> directory for the hierarchies that hold limits."""
        if self.mode.name == "v2":
            return {c: self.v2_dir() for c in LIMITED}
        return {c: os.path.join(root, self.path) for c, root in self.mode.v1_roots.items()}

    def dirs(self):
        """Every directory of this cgroup, in every hierarchy, deduplicated."""
        found = list(dict.fromkeys(self.limit_dirs().values()))
        if self.v2_dir() and self.v2_dir() not in found:
            found.append(self.v2_dir())
        if self.mode.v1_freezer:
            found.append(os.path.join(self.mode.v1_freezer, self.path))
        return found

    # -- lifecycle ----------------------------------------------------------
    def create(self, limits=None):
        for d in self.dirs():
            self._mkdirs(d)
        if limits:
            self.set_limits(limits)
        return self

    def _mkdirs(self, d):
        if self.mode.name == "v2":
            # Controllers must be enabled in every ancestor for a leaf to
            # get memory.max and friends.
            parent = os.path.dirname(d)
            if parent != self.mode.v2_root.rstrip("/") and not os.path.isdir(parent):
                self._mkdirs(parent)
            self._enable_controllers(parent)
        try:
            os.makedirs(d, exist_ok=True)
        except OSError as e:
            raise CgroupError("mkdir", d, e.strerror) from None

    @staticmethod
    def _enable_controllers(d):
        with open(os.path.join(d, "cgroup.subtree_control")) as f:
            enabled = f.read().split()
        wanted = [c for c in LIMITED if c not in enabled]
        if wanted:
            _write(os.path.join(d, "cgroup.subtree_control"), " ".join("+" + c for c in wanted))

    def set_limits(self, limits):
        d = self.limit_dirs()
        quota = max(1000, CPU_PERIOD_US * limits.cpu_percent // 100)
        if self.mode.name == "v2":
            _write(os.path.join(d["memory"], "memory.max"), str(limits.mem_mb << 20))
            swap = os.path.join(d["memory"], "memory.swap.max")
            if os.path.exists(swap):  # absent when swap accounting is off
                _write(swap, "0")
            _write(os.path.join(d["pids"], "pids.max"), str(limits.procs))
            _write(os.path.join(d["cpu"], "cpu.max"), "%d %d" % (quota, CPU_PERIOD_US))
        else:
            _write(os.path.join(d["memory"], "memory.limit_in_bytes"), str(limits.mem_mb << 20))
            # v1 leaves socket buffers out of memory.limit_in_bytes: without
            # a limit of their own, one sandbox queued 745 MB on loopback
            # TCP at a 256 MB limit, on the way to the host-wide tcp_mem
            # pressure that throttles every socket of the host.  The limit
            # (which also turns the accounting on) covers UDP too.
            tcp = os.path.join(d["memory"], "memory.kmem.tcp.limit_in_bytes")
            if os.path.exists(tcp):
                _write(tcp, str(limits.mem_mb << 20))
            _write(os.path.join(d["pids"], "pids.max"), str(limits.procs))
            _write(os.path.join(d["cpu"], "cpu.cfs_period_us"), str(CPU_PERIOD_US))
            _write(os.path.join(d["cpu"], "cpu.cfs_quota_us"), str(quota))

    def cap_memory(self, mem_mb):
        """A memory limit on this cgroup and everything under it: the
        sandboxes' total, so that together they cannot push the host into
        its own OOM killer (which picks the largest process of the host,
        likely not ours), only into the cgroup's, which picks one of them.
        v1 counts socket buffers apart (set_limits says why): their total
        is also held to half the host's TCP pressure threshold, which
        throttles every socket of the host once reached.  On v2 they are
        memory like any other, and only this limit holds them."""
        d = self.limit_dirs()["memory"]
        if self.mode.name == "v2":
            _write(os.path.join(d, "memory.max"), str(mem_mb << 20))
            return
        _write(os.path.join(d, "memory.limit_in_bytes"), str(mem_mb << 20))
        tcp = os.path.join(d, "memory.kmem.tcp.limit_in_bytes")
        if os.path.exists(tcp):
            _write(tcp, str(min(mem_mb << 20, host_tcp_pressure_bytes() // 2)))

    def cap_procs(self, procs):
        """A limit on the processes and threads in this cgroup and under
        it: the sandboxes' total, so that together they cannot take the
        host's pids (kernel.pid_max is 32,768 on many hosts)."""
        _write(os.path.join(self.limit_dirs()["pids"], "pids.max"), str(procs))

    # cpu.weight (v2) or cpu.shares (v1) of a "first" cgroup, against the
    # normal 100 or 1024 of every other sandbox's.
    FIRST_WEIGHT = 8

    def set_cpu_share(self, share):
        """How this cgroup competes for the CPUs with its siblings (every
        sandbox is one): "idle" runs only when nothing else wants the CPU,
        and yields to any other at once (cpu.idle, Linux 5.15+; normal
        before); "normal"; or "first", with FIRST_WEIGHT times the normal
        weight.  Not nice(2): the scheduler shares the CPUs between cgroups
        first, so a process's niceness only orders it against the processes
        of its own cgroup.  Only the files that change are written."""
        if share == self.cpu_share:
            return
        d = self.limit_dirs()["cpu"]
        if "idle" in (share, self.cpu_share):
            path = os.path.join(d, "cpu.idle")
            try:
                _write(path, "1" if share == "idle" else "0")
            except CgroupError:
                if os.path.exists(path):
                    raise
        if "first" in (share, self.cpu_share):
            name, normal = ("cpu.weight", 100) if self.mode.name == "v2" else ("cpu.shares", 1024)
            _write(os.path.join(d, name),
                   str(normal * (self.FIRST_WEIGHT if share == "first" else 1)))
        self.cpu_share = share

    def memory_limit_mb(self):
        name = "memory.max" if self.mode.name == "v2" else "memory.limit_in_bytes"
        try:
            with open(os.path.join(self.limit_dirs()["memory"], name)) as f:
                return int(f.read()) >> 20
        except (OSError, ValueError):
            return 0

    def held_memory(self):
        """Bytes this cgroup and those under it hold that the kernel cannot
        reclaim but by killing (no swap): anonymous memory and shmem (tmpfs,
        memfd), not the page cache of files.  0 if it cannot be read."""
        keys = ("anon", "shmem") if self.mode.name == "v2" else ("total_rss", "total_shmem")
        held = 0
        try:
            with open(os.path.join(self.limit_dirs()["memory"], "memory.stat")) as f:
                for line in f:
                    key, _, value = line.partition(" ")
                    if key in keys:
                        held += int(value)
        except (OSError, ValueError):
            return 0
        return held

    def oom_kills(self):
        """How many processes the kernel has killed here for lack of memory
        (v2's memory.events, v1's memory.oom_control: both say oom_kill)."""
        name = "memory.events" if self.mode.name == "v2" else "memory.oom_control"
        try:
            with open(os.path.join(self.limit_dirs()["memory"], name)) as f:
                for line in f:
                    if line.startswith("oom_kill "):
                        return int(line.split()[1])
        except OSError:
            pass
        return 0

    def limit_hits(self):
        """How often this cgroup's own memory limit was reached (not its
        descendants'): v2's memory.events.local says max, v1's failcnt."""
        d = self.limit_dirs()["memory"]
        try:
            if self.mode.name != "v2":
                with open(os.path.join(d, "memory.failcnt")) as f:
                    return int(f.read())
            with open(os.path.join(d, "memory.events.local")) as f:
                for line in f:
                    if line.startswith("max "):
                        return int(line.split()[1])
        except (OSError, ValueError):
            pass
        return 0

    def open_procs(self):
        """fds of cgroup.procs in every hierarchy.  Writing "0" to each moves
        the writer in, even from inside a sandbox where /sys is not mounted."""
        fds = []
        try:
            for d in self.dirs():
                fds.append(os.open(os.path.join(d, "cgroup.procs"), os.O_WRONLY | os.O_CLOEXEC))
        except OSError as e:
            for fd in fds:
                os.close(fd)
            raise CgroupError("open", os.path.join(d, "cgroup.procs"), e.strerror) from None
        return fds

    def open_dir(self):
        """An fd for clone3's CLONE_INTO_CGROUP (v2 only), else -1."""
        d = self.v2_dir()
        if not d:
            return -1
        try:
            return os.open(d, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as e:
            raise CgroupError("open", d, e.strerror) from None

    def pids(self):
        d = self.v2_dir() or self.dirs()[0]
        try:
            with open(os.path.join(d, "cgroup.procs")) as f:
                return [int(p) for p in f.read().split()]
        except FileNotFoundError:
            return []

    def freeze(self, frozen=True):
        """Stop (or, with frozen=False, resume) every process in this cgroup
        and below: v2's cgroup.freeze, or the v1 freezer on v1-only hosts."""
        d = self.v2_dir()
        if d:
            _write(os.path.join(d, "cgroup.freeze"), "1" if frozen else "0")
        elif self.mode.v1_freezer:
            _write(os.path.join(self.mode.v1_freezer, self.path, "freezer.state"),
                   "FROZEN" if frozen else "THAWED")
        else:
            raise CgroupError("freeze", self.path, "no cgroup2 tree and no v1 freezer")
        self.frozen = frozen

    def thaw(self):
        self.freeze(False)

    def kill(self):
        """SIGKILL every process in this cgroup and below."""
        d = self.v2_dir()
        if d and os.path.exists(os.path.join(d, "cgroup.kill")):
            try:
                _write(os.path.join(d, "cgroup.kill"), "1")
                return
            except CgroupError:
                if not os.path.isdir(d):
                    return
                raise
        # No cgroup.kill (v1, or a kernel before 5.14): signal each process,
        # frozen where we can, so that none can fork a new one meanwhile.
        frozen = bool(d or self.mode.v1_freezer) and os.path.isdir(self.dirs()[-1])
        if frozen:
            self.freeze()
        for sub in self._walk_bottom_up(self.dirs()[0]):
            for pid in _read_pids(sub):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        if frozen:
            self.thaw()  # SIGKILL takes effect once the processes run again

    def wait_empty(self, timeout=5.0):
        """Wait until no process is left in this cgroup's subtree."""
        deadline = time.monotonic() + timeout
        d = self.v2_dir()
        if d and os.path.exists(os.path.join(d, "cgroup.events")):
            # cgroup.events signals POLLPRI when "populated" changes.
            with open(os.path.join(d, "cgroup.events"), "rb", buffering=0) as f:
                poller = select.poll()
                poller.register(f, select.POLLPRI)
                while b"populated 1" in (f.seek(0) or f.read()):
                    left = deadline - time.monotonic()
                    if left <= 0:
                        return False
                    poller.poll(left * 1000)
                return True
        while any(_read_pids(sub) for sub in self._walk_bottom_up(self.dirs()[0])):
            if time.monotonic() > deadline:
                return False
            self.kill()
            time.sleep(0.005)
        return True

    def remove(self):
        """Kill what is left, then remove this cgroup and all below it in
        every hierarchy.  A cgroup that is already gone is fine."""
        if not any(os.path.isdir(d) for d in self.dirs()):
            return
        self.kill()
        if not self.wait_empty():
            raise CgroupError("empty", self.v2_dir() or self.dirs()[0], "processes still alive after SIGKILL")
        for top in self.dirs():
            for d in self._walk_bottom_up(top):
                _rmdir(d)

    def remove_empty_parents(self):
        """rmdir each ancestor of this cgroup that is left empty."""
        parent = os.path.dirname(self.path)
        while parent:
            for d in Cgroup(parent, self.mode).dirs():
                try:
                    os.rmdir(d)
                except OSError:
                    return  # not empty (another worker or cluster), or gone
            parent = os.path.dirname(parent)

    @staticmethod
    def _walk_bottom_up(top):
        if not os.path.isdir(top):
            return []
        return [root for root, _dirs, _files in os.walk(top, topdown=False)]


def host_tcp_pressure_bytes(path="/proc/sys/net/ipv4/tcp_mem"):
    """Where the host's TCP enters memory pressure (tcp_mem's second value,
    in pages)."""
    with open(path) as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def default_total_mb():
    """Three quarters of the host's memory: what sandboxes may take
    together unless the worker's config says otherwise."""
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") * 3 // 4 >> 20


def default_total_procs(path="/proc/sys/kernel/pid_max"):
    """A quarter of the host's pids: what sandboxes may have together
    unless the worker's config says otherwise."""
    with open(path) as f:
        return int(f.read()) // 4


def _read_pids(d):
    try:
        with open(os.path.join(d, "cgroup.procs")) as f:
            return [int(p) for p in f.read().split()]
    except FileNotFoundError:
        return []


def _rmdir(d):
    # A cgroup can report EBUSY for a moment after its last process was
    # reaped, while the kernel finishes tearing it down.
    for _ in range(200):
        try:
            os.rmdir(d)
            return
        except FileNotFoundError:
            return
        except OSError as e:
            if e.errno != errno.EBUSY:
                raise CgroupError("rmdir", d, e.strerror) from None
            time.sleep(0.005)
    raise CgroupError("rmdir", d, "still busy after 1 s")
