"""A cluster directory's layout and its cgroup name.  Standard library only
(sandbox.filelock is too): `bin/admin` uses it with any python3.

    DIR/config/template.json   settings every worker starts from
    DIR/registry/<name>/       one directory per function
    DIR/logs/worker-<port>.log
    DIR/workers/<port>/        a running worker's config.json and pid
    DIR/workers/<port>.lock    held by the worker on that port
"""
import hashlib
import json
import os
import re
import shlex
import shutil

import sandbox.filelock as filelock

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_ROOTFS = os.path.join(REPO_ROOT, "build", "rootfs")
MARKER = os.path.join("config", "template.json")
# C0 controls, DEL and C1 controls.  The kernel refuses a newline in a
# cgroup's name, which the cluster's path gives (no worker could start in
# it); and any of them would break the one-line messages that name the
# cluster, over lines or into terminal escapes.
CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")


# A worker's exit status when a worker of its cluster has its port already.
ALREADY_RUNNING = 3


class ClusterError(Exception):
    """A cluster directory is missing, invalid, or cannot be created."""


def template_defaults():
    return {
        "rootfs": DEFAULT_ROOTFS,
        "host": "127.0.0.1",
        "max_sandboxes": 128,
        "sandboxes_mem_mb": None,
        "sandboxes_procs": None,
        "idle_sec": 600,
        "pool_size": 8,
        "max_connections": None,
        "zygote": True,
        "favor_cgroup_moves": True,
        "cpu_wake_latency_us": 0,
        "network_isolation": True,
        "uid_base": None,
        "egress": {"enabled": False, "subnet": "10.213.0.0/16", "spare": 2},
        "limits": {
            "mem_mb": 256,
            "procs": 64,
            "cpu_percent": 100,
            "scratch_mb": 64,
            "request_kb": 6144,
            "runtime_sec": 30,
            "response_kb": 6144,
            "nofile": 1024,
            "fsize_mb": 64,
            "concurrency": None,
        },
    }


class Cluster:
    def __init__(self, path):
        # Resolved: a worker's record names its cluster by this path, and
        # the cgroup is named from it, however the cluster was spelled.
        self.path = os.path.realpath(path)

    @property
    def template(self):
        return os.path.join(self.path, MARKER)

    @property
    def registry(self):
        return os.path.join(self.path, "registry")

    def log_file(self, port):
        return os.path.join(self.path, "logs", "worker-%d.log" % port)

    @property
    def workers_dir(self):
        return os.path.join(self.path, "workers")

    def worker_dir(self, port):
        return os.path.join(self.workers_dir, str(port))

    def lock_file(self, port):
        return os.path.join(self.workers_dir, "%d.lock" % port)

    def worker_ports(self):
        """Ports of the workers this cluster has state for."""
        try:
            names = os.listdir(self.workers_dir)
        except FileNotFoundError:
            return []
        return sorted(int(n) for n in names if n.isdigit())

    def claim_port(self, port):
        """An fd holding the lock on this cluster's `port`, or None if
        another worker holds it.  Two workers of one cluster on one port
        would share a cgroup (and the second, failing to listen, would
        remove it under the first): the lock is taken before anything
        else, and the holder alone writes the record's pid, and removes
        the record when it stops.  Held until the process exits."""
        self.check()
        os.makedirs(self.workers_dir, exist_ok=True)
        # Its holder removes the file as it stops (forget_worker).
        fd = filelock.claim(self.lock_file(port))
        if fd is None:
            return None
        wdir = self.worker_dir(port)
        os.makedirs(wdir, exist_ok=True)
        with open(os.path.join(wdir, "pid"), "w") as f:
            f.write("%d\n" % os.getpid())
        return fd

    def running_worker(self, port):
        """The pid of this cluster's worker on `port` if it runs, else None:
        the process its record names, if that process holds the port's lock
        file open.  A process that got a recycled pid does not; and the
        open file follows the cluster's directory if it was moved since."""
        try:
            with open(os.path.join(self.worker_dir(port), "pid")) as f:
                pid = int(f.read().strip())
        except (OSError, ValueError):
            return None
        return pid if filelock.holds(pid, self.lock_file(port)) else None

    def forget_worker(self, port):
        """Remove the record of the worker on `port`: called by the worker
        that claimed the port, as it stops, so the record is its own; its
        lock file last, while it still holds the lock."""
        shutil.rmtree(self.worker_dir(port), ignore_errors=True)
        try:
            os.unlink(self.lock_file(port))
        except FileNotFoundError:
            pass

    def remove_stale_locks(self):
        """Remove the lock files no worker holds (a SIGKILLed worker's)."""
        workers = self.workers_dir
        try:
            names = os.listdir(workers)
        except FileNotFoundError:
            return
        for name in names:
            if name.endswith(".lock"):
                filelock.remove_if_unheld(os.path.join(workers, name))

    @property
    def cgroup(self):
        """The cluster's cgroup, relative to each hierarchy's root.  The hash
        keeps two clusters with the same basename apart."""
        # fsencode: check() refuses a path that is not UTF-8, but what names
        # the cgroup of any path (a cluster made before that check, the
        # tests' look for leftovers) must not crash on one.
        digest = hashlib.sha1(os.fsencode(self.path)).hexdigest()[:8]
        return "openlambda/%s-%s" % (os.path.basename(self.path)[:32], digest)

    def worker_cgroup(self, port):
        return "%s/w%d" % (self.cgroup, port)

    def create(self, rootfs=None):
        self.check_path("create")
        template = template_defaults()
        if rootfs:
            template["rootfs"] = os.path.abspath(rootfs)
        try:
            # Its own mkdir, which fails if anything is there: then what
            # is there is not ours to remove below.  Not its parents: a typo
            # in a path must not make a tree of directories somewhere.
            os.mkdir(self.path)
        except FileExistsError:
            raise ClusterError("cluster %s already exists%s; nothing was changed" % (
                self.path, "" if os.path.isdir(self.path) else " (as a file, not a cluster)")
                ) from None
        except FileNotFoundError:
            raise ClusterError("create cluster %s: its parent directory %s does not exist"
                               % (self.path, os.path.dirname(self.path))) from None
        except OSError as e:
            raise ClusterError("create cluster %s: %s" % (self.path, e.strerror)) from None
        try:
            for sub in ("config", "registry", "logs", "workers"):
                os.mkdir(os.path.join(self.path, sub))
            self.write_template(template)
        except (OSError, ClusterError) as e:
            # Half a cluster (no template) would be refused by every command,
            # `new` included: none is left.
            shutil.rmtree(self.path, ignore_errors=True)
            raise ClusterError("create cluster %s: %s; what was made of it was removed" % (
                self.path, e.strerror if isinstance(e, OSError) else e)) from None

    def check(self):
        """Raise ClusterError unless this looks like a cluster directory.  Its
        template is not read: a broken one must not stop `kill` or `status`."""
        self.check_path("open")
        if os.path.lexists(self.path) and not os.path.isdir(self.path):
            raise ClusterError("%s is not a cluster: it is not a directory" % self.path)
        if not os.path.isdir(self.path):
            raise ClusterError("no cluster at %s (create one with: admin new -cluster %s)"
                               % (self.path, shlex.quote(self.path)))
        # Its records of workers are enough for `kill` and `status` to find
        # them when the template was deleted.
        if not os.path.isfile(self.template) and not os.path.isdir(self.workers_dir):
            raise ClusterError("%s is not a cluster: it has no %s" % (self.path, MARKER))

    def check_path(self, operation):
        """Refuse a path that is not valid UTF-8, or holds a control
        character (CONTROL)."""
        self.check_utf8(operation)
        if CONTROL.search(self.path):
            shown = CONTROL.sub(lambda m: repr(m.group())[1:-1], self.path)  # \n, \x1b...
            raise ClusterError("%s cluster %s: a cluster path must not hold control characters "
                               "(a newline, a tab...): it names the cluster's cgroups"
                               % (operation, shown))

    def check_utf8(self, operation):
        """Refuse a path that is not valid UTF-8: it goes into the workers'
        JSON configs and into cgroup names, where it cannot be written."""
        try:
            self.path.encode()
        except UnicodeEncodeError:
            # Its bad bytes as \xff, the rest as it is: printable, and no
            # surrogates for whatever prints the message.
            shown = self.path.encode(errors="surrogateescape").decode(errors="backslashreplace")
            raise ClusterError("%s cluster %s: a cluster path must be valid UTF-8 (it goes into "
                               "JSON configs and cgroup names)" % (operation, shown)) from None

    def read_template(self):
        try:
            with open(self.template) as f:
                template = json.load(f)
        except OSError as e:
            raise ClusterError("read %s: %s" % (self.template, e.strerror)) from None
        except ValueError as e:
            raise ClusterError("%s is not valid JSON: %s" % (self.template, e)) from None
        except RecursionError:  # the decoder's own limit, about 1000 levels
            raise ClusterError("%s is not valid JSON: nested too deeply" % self.template
                               ) from None
        if not isinstance(template, dict):
            raise ClusterError("%s must hold a JSON object" % self.template)
        return template

    def write_template(self, template):
        try:
            write_json(self.template, template)
        except OSError as e:
            raise ClusterError("write %s: %s" % (self.template, e.strerror)) from None


def write_json(path, value):
    """`value` as JSON at `path`, through a temporary file renamed over it:
    a reader (a worker starting) sees the old file or the new one, whole.
    If it cannot be written (a full disk), the old one stays, the temporary
    file goes, and the OSError is raised.  The temporary file is this
    process's own: two `admin` commands may write one record at once."""
    tmp = "%s.%d.tmp" % (path, os.getpid())
    try:
        with open(tmp, "w") as f:
            json.dump(value, f, indent=2, sort_keys=True)
            f.write("\n")
        os.replace(tmp, path)
    except OSError:
        remove_file(tmp)
        raise


def remove_file(path):
    """Remove a file we made, if it is there: cleaning up after a failure,
    which must not hide that failure with one of its own."""
    try:
        os.unlink(path)
    except OSError:
        pass


def merge(base, update):
    """Deep-merge JSON objects: nested objects merge, other values replace."""
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


# Keys for which null is a setting of its own, unlike their defaults: a
# null given to setconf for them is written, not taken as "the default".
NULL_IS_A_SETTING = ("idle_sec", "cpu_wake_latency_us")


def merge_unsetting(base, update, top=True):
    """`merge` for setconf: a null in `update`, at any depth, removes its
    key, so that the key's default applies again (for max_connections and
    uid_base, whose default is null, too); but for a key of
    NULL_IS_A_SETTING it is written.  No other null is ever written, not
    even inside an object `base` has no object for."""
    out = dict(base)
    for key, value in update.items():
        if value is None and top and key in NULL_IS_A_SETTING:
            out[key] = None
        elif value is None:
            out.pop(key, None)
        elif isinstance(value, dict):
            below = out.get(key)
            out[key] = merge_unsetting(below if isinstance(below, dict) else {}, value, top=False)
        else:
            out[key] = value
    return out
