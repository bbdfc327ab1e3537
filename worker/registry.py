"""Where functions live: `<registry>/<name>/`, with `lambda_func.py` defining
handler(event) or `f.py` defining f(event), and optionally an `ol.yaml`
whose `limits:` block overrides the cluster's limits for that function, and
whose `egress: true` gives its sandboxes a route out (if the cluster
enables egress).

Changes are tracked with inotify, drained at each lookup, so the next call
after an edit always sees the new code, with no polling and no stat of the
whole tree per call; the worker's loop also drains them as they arrive
(worker/server.py), so that a deleted function's sandboxes go at once.
A function's tree is watched only up to MAX_DIRS directories; and if the
registry itself is deleted, `on_gone` says so (its worker then stops).
"""
import dataclasses
import errno
import logging
import os
import re
import resource
import stat

import yaml
from inotify_simple import INotify, flags

from .config import ConfigError, check_limits, check_nofile_within, shown, shown_names
from .errors import InitFailed, NotFound

log = logging.getLogger("worker")
ENTRY_FILES = ("lambda_func.py", "f.py")
CONFIG_FILE = "ol.yaml"
# Limits a function may set for itself.  The request body limit is not one:
# it is enforced before the request is routed to any function.
FUNCTION_LIMITS = ("mem_mb", "procs", "cpu_percent", "scratch_mb", "runtime_sec", "response_kb",
                   "nofile", "fsize_mb", "concurrency")
NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}\Z")
WATCH = (flags.MODIFY | flags.ATTRIB | flags.CLOSE_WRITE | flags.CREATE | flags.DELETE
         | flags.MOVED_FROM | flags.MOVED_TO | flags.DELETE_SELF | flags.MOVE_SELF)
# Most directories of one function's tree (its own, and every one below it
# but __pycache__), each of which takes one of the host's inotify watches
# (fs.inotify.max_user_watches, as few as 8192 on a small host) and about
# 1 KiB of kernel memory, and is walked on the worker's loop (1,000 in
# 10 ms here).  A function's own code is tens of directories; this
# project's whole virtualenv, numpy and pyroute2 among it, is 432.  A tree
# over it is refused, not walked (and the walk stops at it): a tree of
# 40,000 stalled the worker for seconds, took 40,000 watches, and its
# deletion overflowed inotify's queue.
MAX_DIRS = 1000


class Function:
    """A function's code as last seen: `version` grows with every change."""

    def __init__(self, name, path, version, limits, egress=False):
        self.name = name
        self.path = path
        self.version = version
        self.limits = limits  # the cluster's, with ol.yaml's on top
        self.egress = egress  # its sandboxes get a network with a route out


class Registry:
    def __init__(self, root, limits, egress=False, totals=None):
        self.root = root
        self.limits = limits  # the cluster's defaults
        self.egress = egress  # whether functions may ask for egress
        # {limit: (what all sandboxes together may have, the key that says so)}
        self.totals = totals or {}
        self.inotify = INotify(nonblocking=True)
        # DELETE_SELF: the registry itself was deleted (its cluster with it,
        # its workers' lock files too).  It comes once nothing holds the
        # directory: sandboxes of its functions hold theirs until retired.
        # So the worker holds no fd of it.  A move sends nothing: a moved
        # cluster's worker keeps serving it.
        self.root_watch = self.inotify.add_watch(root, flags.CREATE | flags.DELETE
                                                 | flags.MOVED_FROM | flags.MOVED_TO
                                                 | flags.ATTRIB | flags.DELETE_SELF)
        self.gone = False  # the registry was deleted
        self.on_gone = lambda: None
        # A directory has one watch descriptor, which two functions share if
        # their names lead to the same directory (a symbolic link).
        self.watches = {}   # watch descriptor -> {function name: directory}
        self.watched = {}   # function name -> its watch descriptors, once its tree is watched
        self.cache = {}     # name -> Function
        self.versions = {}  # name -> version counter
        self.unwatched = set()  # names said once to be beyond inotify's watch limit
        self.on_change = lambda name: None

    def close(self):
        self.inotify.close()

    def lookup(self, name):
        self.drain_changes()
        fn = self.cache.get(name)
        if fn is not None:
            return fn
        if not NAME.match(name) or name.startswith(".."):
            raise NotFound("%r is not a function name: at most 128 letters, digits, '_', '.' "
                           "and '-', not starting with '.' or '-'" % name[:200])
        path = os.path.join(self.root, name)
        try:
            with os.scandir(path) as it:  # one directory read answers all we ask
                entries = list(it)
        except (FileNotFoundError, NotADirectoryError):
            raise NotFound(_not_a_function(name, path)) from None
        except OSError as e:  # a loop of symbolic links, say
            raise InitFailed("function %r: its directory cannot be read: %s"
                             % (name, e.strerror), "Runtime.ConfigError") from None
        if not any(e.name in ENTRY_FILES and e.is_file() for e in entries):
            raise InitFailed("function %r has no entry file: expected lambda_func.py with "
                             "handler(event) or f.py with f(event)" % name,
                             "Runtime.HandlerNotFound")
        # Its tree is walked once: its watches stay through edits, and a
        # directory made in it later is watched as it appears (drain_changes).
        watched = name in self.watched or self._watch_tree(name, path, MAX_DIRS)
        if watched is None:
            # Not watched, so looked at again at each call: a walk that stops
            # at MAX_DIRS + 1, and only until the tree is made smaller.
            raise InitFailed("function %r has more than %d directories (not counting "
                             "__pycache__): the worker watches each for edits, and at most %d "
                             "of one function's" % (name, MAX_DIRS, MAX_DIRS),
                             "Runtime.ConfigError")
        limits, egress = self.limits, False
        if any(e.name == CONFIG_FILE for e in entries):
            limits, egress = self._read_config(name, os.path.join(path, CONFIG_FILE))
        if not watched:
            # An edit could go unseen: a new version each call, so that no
            # sandbox with old code is ever reused.
            self.versions[name] = self.versions.get(name, 0) + 1
            return Function(name, path, self.versions[name], limits, egress)
        fn = Function(name, path, self.versions.setdefault(name, 0), limits, egress)
        self.cache[name] = fn
        return fn

    def _read_config(self, name, path):
        """(limits, egress) from the function's ol.yaml, checked."""
        where = "%s of function %r" % (CONFIG_FILE, name)
        try:
            config = yaml.load(_read_own_file(path, CONFIG_MAX), Loader=ConfigLoader) or {}
        except OSError as e:
            raise InitFailed("%s cannot be read: %s" % (where, e.strerror), "Runtime.ConfigError"
                             ) from None
        except Refused as e:
            raise InitFailed("%s: %s" % (where, _yaml_problem(e)), "Runtime.ConfigError"
                             ) from None
        except (yaml.YAMLError, ValueError) as e:  # ValueError: an int over 4300 digits
            raise InitFailed("%s cannot be read: not valid YAML: %s" % (where, _yaml_problem(e)),
                             "Runtime.ConfigError") from None
        if not isinstance(config, dict):
            raise InitFailed("%s: expected a mapping with `limits:` and `egress:`, found %s"
                             % (where, shown(config)), "Runtime.ConfigError")
        if set(config) - {"limits", "egress"}:
            raise InitFailed("%s: expected only `limits:` and `egress:`, found %s"
                             % (where, shown_names(config)), "Runtime.ConfigError")
        egress = config.get("egress", False)
        if not isinstance(egress, bool):
            raise InitFailed("%s: egress must be true or false, not %s" % (where, shown(egress)),
                             "Runtime.ConfigError")
        if egress and not self.egress:
            raise InitFailed("%s asks for egress, but this cluster does not enable it "
                             "(set egress.enabled in its config/template.json and restart "
                             "the worker)" % where, "Runtime.ConfigError")
        limits = config.get("limits")
        if limits is None:  # `limits:` with nothing under it
            limits = {}
        if not isinstance(limits, dict):
            raise InitFailed("%s: limits must be a mapping of names to values (limits:, then"
                             " `  mem_mb: 128` on the next line), not %s"
                             % (where, shown(limits)), "Runtime.ConfigError")
        unknown = set(limits) - set(FUNCTION_LIMITS)
        if unknown:
            raise InitFailed("%s: unknown limits %s; known: %s" % (
                where, shown_names(unknown), ", ".join(FUNCTION_LIMITS)),
                "Runtime.ConfigError")
        try:
            check_limits(where, limits)
            check_nofile_within(where, limits.get("nofile", 0),
                                resource.getrlimit(resource.RLIMIT_NOFILE)[1])
        except ConfigError as e:
            raise InitFailed(str(e), "Runtime.ConfigError") from None
        for name, (total, key) in self.totals.items():
            if limits.get(name, 0) > total:
                raise InitFailed("%s: limits.%s (%d) is above what all sandboxes together may "
                                 "have (%d, %s): no sandbox could use it"
                                 % (where, name, limits[name], total, key), "Runtime.ConfigError")
        return dataclasses.replace(self.limits, **limits), egress

    def _watch(self, name, path):
        """Watch one directory of a function's; False if it cannot be."""
        try:
            wd = self.inotify.add_watch(path, WATCH)
            self.watches.setdefault(wd, {})[name] = path
            self.watched.setdefault(name, set()).add(wd)
        except (FileNotFoundError, NotADirectoryError):
            pass  # vanished meanwhile; the parent's watch saw it
        except OSError as e:  # ENOSPC: fs.inotify.max_user_watches reached
            if name not in self.unwatched:
                self.unwatched.add(name)
                log.warning("registry: cannot watch %s: %s; each call to %r now starts a new "
                            "sandbox, so that no edit goes unseen (raise "
                            "fs.inotify.max_user_watches)", path, e.strerror, name)
            return False
        return True

    def _watch_tree(self, name, path, most):
        """Watch a directory of a function's and every one below it but
        __pycache__: True once done; False if one cannot be (inotify's
        limit); None if they are more than `most`, when none is.  Unless
        True, none of the function's directories stays watched: its next
        lookup walks its tree again."""
        tree = _directories(path, most)
        if tree is None or not all(self._watch(name, d) for d in tree):
            self._unwatch(name)
            return None if tree is None else False
        return True

    def _unwatch(self, name, under=None):
        """Stop watching a function's directories (those at or below `under`);
        with none left, its tree is walked again at its next lookup."""
        for wd in list(self.watched.get(name, ())):
            owners = self.watches[wd]
            path = owners[name]
            if under is None or path == under or path.startswith(under + os.sep):
                del owners[name]
                self._forget(name, wd)
                # No other function's, nor the registry's own (a function
                # may be a link to it): the watch goes.
                if not owners and wd != self.root_watch:
                    del self.watches[wd]
                    try:
                        self.inotify.rm_watch(wd)
                    except OSError:
                        pass

    def _forget(self, name, wd):
        """`wd` is no longer one of `name`'s; with none left, its tree is
        walked again at its next lookup."""
        self.watched[name].discard(wd)
        if not self.watched[name]:
            del self.watched[name]

    def drain_changes(self):
        try:
            events = self.inotify.read(timeout=0)
        except BlockingIOError:
            return
        for event in events:
            if event.mask & flags.Q_OVERFLOW:
                # Events were lost, a new directory's among them maybe:
                # every tree is walked again.
                log.warning("registry: inotify's event queue overflowed (more than "
                            "fs.inotify.max_queued_events changes at once): every function's "
                            "sandboxes are retired, as an edit may have gone unseen")
                for name in list(self.watched):
                    self._unwatch(name)
                for name in list(self.cache):
                    self._changed(name)
                if not self._watching(self.root_watch):  # its DELETE_SELF among those lost
                    self._root_gone()
                continue
            if event.wd == self.root_watch and event.mask & (flags.DELETE_SELF | flags.IGNORED):
                self._root_gone()  # IGNORED alone: its file system was unmounted
                continue
            if event.mask & flags.IGNORED:  # its directory is gone
                for name in self.watches.pop(event.wd, {}):
                    self._forget(name, event.wd)
                continue
            if event.name.endswith((".pyc", ".swp")) or "__pycache__" == event.name:
                continue
            if event.wd == self.root_watch:
                # A function's directory came, went or changed hands; its
                # tree is walked at its next lookup.
                self._unwatch(event.name)
                self._changed(event.name)
                continue
            for name, directory in list(self.watches.get(event.wd, {}).items()):
                # (none if its watch went while this was queued: its function was told then)
                if event.mask & flags.ISDIR and event.name:
                    path = os.path.join(directory, event.name)
                    if event.mask & (flags.CREATE | flags.MOVED_TO) and name in self.watched:
                        # Within the function's MAX_DIRS, or not watched at all,
                        # and then refused at its next lookup.
                        self._watch_tree(name, path, MAX_DIRS - len(self.watched[name]))
                    elif event.mask & flags.MOVED_FROM:  # its watches would follow it out
                        self._unwatch(name, under=path)
                self._changed(name)

    def _watching(self, wd):
        """Whether the kernel still has our watch `wd` (the inotify fd's
        fdinfo lists each, its descriptor in hex)."""
        try:
            with open("/proc/self/fdinfo/%d" % self.inotify.fileno()) as f:
                return any(line.startswith("inotify wd:%x " % wd) for line in f)
        except OSError:
            return True  # cannot tell: as before, keep serving

    def _root_gone(self):
        if not self.gone:
            self.gone = True
            self.on_gone()

    def _changed(self, name):
        if self.cache.pop(name, None) is not None or name in self.versions:
            self.versions[name] = self.versions.get(name, 0) + 1
            self.on_change(name)


def _directories(top, most):
    """The directories of the tree at `top` but __pycache__ and those in
    one, top first; None if they are more than `most`, where the walk
    stops."""
    found = []
    for root, dirs, _files in os.walk(top):
        dirs[:] = [d for d in dirs if d != "__pycache__"]
        found.append(root)
        if len(found) > most:
            return None
    return found


# ol.yaml is read by the worker, as root, from a directory that the
# function's authors write.  So it is read only as a regular file of its
# own: never through a symbolic link (to a host file, which an error would
# then quote back to any caller), never a FIFO or a device (which would
# block the worker's loop, or fill its memory), and never more than this.
CONFIG_MAX = 64 << 10


def _not_a_function(name, path):
    """Why `name` is not found: `ls` may show a link by that name."""
    try:
        target = os.readlink(path)
    except OSError:  # no link, or gone meanwhile
        return "no function named %r" % name
    return "function %r is a symbolic link to %r, which is no directory" % (name, target)


def _read_own_file(path, limit):
    """The bytes of the regular file at `path`, if it is one (not through a
    symbolic link) and at most `limit` long; else an OSError saying why."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise OSError(e.errno, "it is a symbolic link; it must be a file of its own") from None
        raise
    with open(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "it is not a regular file")
        data = f.read(limit + 1)
    if len(data) > limit:
        raise OSError(errno.EFBIG, "it is over %d KiB" % (limit >> 10))
    return data


class Refused(yaml.MarkedYAMLError):
    """YAML that ol.yaml may not use, valid as it may be."""


# Deeper than any ol.yaml nests (limits.mem_mb is 2 levels); far below
# where composing it would exhaust Python's recursion (a RecursionError).
MAX_NESTING = 32


class ConfigLoader(yaml.SafeLoader):
    """SafeLoader without anchors and aliases, nesting at most MAX_NESTING
    deep, and with each key of a mapping once.  An alias makes a value its
    anchor's: 441 bytes of anchors, each aliasing the one before ten times,
    make a value of 10^8 strings, whose repr (in an error message) stalled
    the worker for 14 s and went to the caller as 722 MB.  ol.yaml needs
    neither.  A key given twice PyYAML would take the last of, silently:
    YAML forbids it, and one of the two is a mistake."""

    def __init__(self, stream):
        super().__init__(stream)
        self.depth = 0  # of the node being composed

    def compose_node(self, parent, index):
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            raise Refused(problem="anchors and aliases are not supported",
                          problem_mark=event.start_mark)
        self.depth += 1
        try:
            if self.depth > MAX_NESTING:
                raise Refused(problem="nested more than %d deep" % MAX_NESTING,
                              problem_mark=event.start_mark)
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<`: what it brings in, the keys given here override
            key = self.construct_object(key_node)  # kept: SafeLoader reuses it
            try:
                if key in seen:
                    raise Refused(problem="%s is given twice" % shown(key),
                                  problem_mark=key_node.start_mark)
                seen.add(key)
            except TypeError:  # unhashable: SafeLoader refuses it
                pass
        return super().construct_mapping(node, deep)


def _yaml_problem(error):
    """A YAML error on one line: what, and where."""
    problem = getattr(error, "problem", None) or str(error).splitlines()[0]
    mark = getattr(error, "problem_mark", None)
    if mark is not None:
        problem += " (line %d, column %d)" % (mark.line + 1, mark.column + 1)
    return problem
