"""A worker's configuration: one frozen record, read and checked once at
start-up, then passed explicitly to whatever needs it."""
import ipaddress
import json
import os
import re
import reprlib
from dataclasses import dataclass, fields

from sandbox.cgroups import default_total_mb, default_total_procs
from sandbox.uids import UID_MAX, UID_SLOTS, default_base

from .cluster import Cluster, merge, template_defaults


class ConfigError(Exception):
    pass


@dataclass(frozen=True)
class Limits:
    mem_mb: int
    procs: int
    cpu_percent: int
    scratch_mb: int
    request_kb: int
    runtime_sec: int
    response_kb: int
    nofile: int
    fsize_mb: int
    concurrency: int = None  # most sandboxes of one function at once; None: max_sandboxes


# Where sandbox addresses may come from: RFC 1918 private networks, and the
# shared address space carriers use for NAT (RFC 6598).  Not loopback,
# link-local (metadata services live there) or documentation ranges.
PRIVATE_RANGES = ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10")
# A worker's /24 gives sandboxes .2 to .254 (.1 is its bridge's).
EGRESS_ADDRESSES = 253


@dataclass(frozen=True)
class Egress:
    enabled: bool  # set up the bridge and NAT, so functions may ask for egress
    subnet: str    # a /24 of it per worker (sandbox.network.worker_subnet)
    spare: int     # namespaces kept ready


@dataclass(frozen=True)
class WorkerConfig:
    cluster: str
    port: int
    host: str
    rootfs: str
    max_sandboxes: int
    idle_sec: float        # None: idle sandboxes live until evicted
    sandboxes_mem_mb: int  # None: sandbox.cgroups.default_total_mb
    sandboxes_procs: int   # None: sandbox.cgroups.default_total_procs
    pool_size: int
    max_connections: int  # None: as many as the open-file limit leaves (worker.server)
    zygote: bool
    favor_cgroup_moves: bool
    cpu_wake_latency_us: int  # None: ask nothing of the kernel (worker.cpu_latency)
    network_isolation: bool
    uid_base: int
    egress: Egress
    limits: Limits

    @property
    def registry(self):
        return Cluster(self.cluster).registry

    @property
    def cgroup(self):
        return Cluster(self.cluster).worker_cgroup(self.port)


# What an error message shows of a value it refuses: at most a few
# elements, levels and characters of it.  A config's author may hand us a
# value whose full repr is huge (a YAML alias "bomb" expands to gigabytes)
# or cannot even be made (an int of more than 4300 digits, which a YAML hex
# literal gives): building it would stall the worker and send it all back.
_SHOWN = reprlib.Repr()
_SHOWN.maxlevel = 2
_SHOWN.maxstring = _SHOWN.maxlong = _SHOWN.maxother = 40
_SHOWN.maxlist = _SHOWN.maxtuple = _SHOWN.maxdict = _SHOWN.maxset = 4
SHOWN_MAX = 100


def shown(value):
    """`value` for an error message: at most SHOWN_MAX characters, on one
    line, whatever it is."""
    try:
        text = _SHOWN.repr(value)
    except ValueError:  # an int too long for str(): Python's own limit
        return "an integer of %d bits" % value.bit_length()
    return text if len(text) <= SHOWN_MAX else text[:SHOWN_MAX - 3] + "..."


def shown_names(names):
    """Keys for an error message: the first few, each bounded."""
    names = sorted(shown(n) for n in names)
    return ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")


def _positive_int(where, value):
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError("%s must be a positive integer, not %s" % (where, shown(value)))
    return value


# The totals on all sandboxes together, and what null means for each (on
# this host, where the worker runs).
TOTAL_DEFAULTS = {"sandboxes_mem_mb": (default_total_mb, "three quarters of the host's memory"),
                  "sandboxes_procs": (default_total_procs, "a quarter of kernel.pid_max")}


def _total(source, raw, name, limits, limit):
    """A limit on all sandboxes together (`name`, None for the default),
    which must leave one sandbox its own `limits.<limit>` and has the same
    upper bound."""
    total = raw[name]
    if total is None:
        default, meaning = TOTAL_DEFAULTS[name]
        default = default()
        if limits[limit] > default:
            raise ConfigError("%s: limits.%s (%d) is above what all sandboxes together may "
                              "have (%d: %s is null, %s): no sandbox could use its own limit"
                              % (source, limit, limits[limit], default, name, meaning))
        return None
    _positive_int("%s: %s" % (source, name), total)
    if total > LIMIT_MAX[limit]:
        raise ConfigError("%s: %s must be at most %d, not %s"
                          % (source, name, LIMIT_MAX[limit], shown(total)))
    if total < limits[limit]:
        raise ConfigError("%s: %s (%d) is below limits.%s (%d): no sandbox could use its "
                          "own limit" % (source, name, total, limit, limits[limit]))
    return total


# Upper bounds, where the kernel or the worker has one: a reply is buffered
# by the worker whole (plus up to 1 MiB of error text, below the 64 MiB a
# channel ever buffers); a request goes to the handler as one message, and
# its runtime unpacks at most 64 MiB of one (sandbox/runtime/proto.py
# MAX_MESSAGE), so a bigger body could never reach a handler; RLIMIT_NOFILE
# cannot exceed fs.nr_open; a file size in bytes must fit the kernel's rlimit;
# pids.max refuses more than PID_MAX_LIMIT; a CPU quota above 100% of the
# most CPUs Linux schedules (NR_CPUS 8192) is no limit, and far enough above
# overflows the kernel's quota (EINVAL at every cold start).  Sizes in MiB
# (memory, a tmpfs, a file) become byte counts the kernel parses into 64
# bits, silently wrapping past them (a mem_mb of 2^44 is a memory limit of
# 0): 2^30 MiB, a PiB, is far above any host's memory and far below that.
# A call's time limit goes to the sandbox (msgpack, 64-bit integers) and to
# the event loop's timers; a day is far beyond any FaaS platform's limit
# (AWS Lambda's is 15 minutes) while a call holds its sandbox and its
# client's connection.
MAX_MB = 1 << 30
LIMIT_MAX = {"response_kb": 63 << 10, "request_kb": 63 << 10, "nofile": 1 << 20,
             "fsize_mb": MAX_MB, "mem_mb": MAX_MB, "scratch_mb": MAX_MB,
             "procs": 1 << 22, "cpu_percent": 100 * 8192, "runtime_sec": 24 * 3600}
# Lower bounds, where less cannot work: a handler process has its standard
# streams and its channel open, and its set-up needs a few more; a shell
# already holds a few MB of memory when it is given its function, and below
# what it holds cgroup v1 refuses the limit (EBUSY): every call would fail
# with a platform error.
LIMIT_MIN = {"nofile": 16, "mem_mb": 16}


# Limits that may be null: no limit of their own.
NULLABLE_LIMITS = ("concurrency",)


def check_limits(source, limits):
    """Each given limit must be a positive integer, within LIMIT_MIN and
    LIMIT_MAX (or null, for those in NULLABLE_LIMITS)."""
    for name, value in limits.items():
        if value is None and name in NULLABLE_LIMITS:
            continue
        _positive_int("%s: limits.%s" % (source, name), value)
        if value > LIMIT_MAX.get(name, value):
            raise ConfigError("%s: limits.%s must be at most %d, not %s"
                              % (source, name, LIMIT_MAX[name], shown(value)))
        if value < LIMIT_MIN.get(name, value):
            raise ConfigError("%s: limits.%s must be at least %d, not %d"
                              % (source, name, LIMIT_MIN[name], value))


def check_nofile_within(source, nofile, open_files):
    """A sandbox cannot raise its open-file limit above its worker's own
    (`open_files`, the worker's hard limit): every call would fail in its
    set-up."""
    if nofile > open_files:
        raise ConfigError("%s: limits.nofile is %d, above the worker's open-file limit (%d): "
                          "lower it, or raise the worker's (ulimit -Hn)"
                          % (source, nofile, open_files))


def _count(where, value):
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError("%s must be a whole number, not %s" % (where, shown(value)))
    return value


def _flag(where, value):
    if not isinstance(value, bool):
        raise ConfigError("%s must be true or false, not %s" % (where, shown(value)))
    return value


def _egress(source, raw):
    if not isinstance(raw, dict):
        raise ConfigError("%s: egress must be an object" % source)
    unknown = sorted(set(raw) - {f.name for f in fields(Egress)})
    if unknown:
        raise ConfigError("%s: unknown egress key(s) %s" % (source, shown_names(unknown)))
    subnet = raw["subnet"]
    try:
        if not isinstance(subnet, str):  # IPv4Network(16) would be 0.0.0.16/32
            raise TypeError(subnet)
        net = ipaddress.IPv4Network(subnet)
    except (ValueError, TypeError):
        raise ConfigError("%s: egress.subnet must be an IPv4 network like 10.213.0.0/16, "
                          "not %s" % (source, shown(subnet))) from None
    if net.prefixlen > 24 or not any(net.subnet_of(ipaddress.IPv4Network(r))
                                     for r in PRIVATE_RANGES):
        raise ConfigError("%s: egress.subnet must be a /24 or larger inside %s, not %s"
                          % (source, " or ".join(PRIVATE_RANGES), subnet))
    spare = _count("%s: egress.spare" % source, raw["spare"])
    # Each spare holds one of the worker's addresses: more can never be
    # ready, and asking for them only has the worker build a veth and a
    # namespace for every address it has.
    if spare > EGRESS_ADDRESSES:
        raise ConfigError("%s: egress.spare must be at most %d (a worker's egress addresses), "
                          "not %s" % (source, EGRESS_ADDRESSES, shown(spare)))
    return Egress(_flag("%s: egress.enabled" % source, raw["enabled"]), str(net), spare)


# A wake-up latency of a second is no constraint on any CPU's idle states.
WAKE_US_MAX = 1_000_000


HOST_NAME = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)(\.(?!-)[A-Za-z0-9-]{1,63}(?<!-))*\.?\Z")


def _is_host(host):
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return len(host) <= 253 and bool(HOST_NAME.match(host))


def from_dict(raw, source):
    known = {f.name for f in fields(WorkerConfig)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError("%s: unknown key(s) %s" % (source, shown_names(unknown)))
    raw = merge(template_defaults(), raw)
    raw.setdefault("port", 8080)
    if "cluster" not in raw:
        # A cluster's own template (DIR/config/template.json) names its cluster.
        config_dir = os.path.dirname(os.path.abspath(source))
        if os.path.basename(config_dir) != "config":
            raise ConfigError("%s: missing key 'cluster'" % source)
        raw["cluster"] = os.path.dirname(config_dir)
    limits = raw["limits"]
    if not isinstance(limits, dict):
        raise ConfigError("%s: limits must be an object" % source)
    limit_names = {f.name for f in fields(Limits)}
    unknown = sorted(set(limits) - limit_names)
    if unknown:
        raise ConfigError("%s: unknown limit(s) %s" % (source, shown_names(unknown)))
    check_limits(source, limits)
    for key in ("cluster", "rootfs", "host"):
        if not isinstance(raw[key], str) or not raw[key]:
            raise ConfigError("%s: %s must be a non-empty string" % (source, key))
    if not _is_host(raw["host"]):
        raise ConfigError("%s: host must be an IP address or a host name, not %s"
                          % (source, shown(raw["host"])))
    port = _positive_int("%s: port" % source, raw["port"])
    if port > 65535:
        raise ConfigError("%s: port must be at most 65535, not %s" % (source, shown(port)))
    max_sandboxes = _positive_int("%s: max_sandboxes" % source, raw["max_sandboxes"])
    pool_size = _count("%s: pool_size" % source, raw["pool_size"])
    # Every sandbox alive at once, plus shells and the dying, needs a uid.
    if max_sandboxes + 2 * pool_size >= UID_SLOTS:
        raise ConfigError("%s: max_sandboxes + 2 * pool_size must be below %d"
                          % (source, UID_SLOTS))
    max_connections = raw["max_connections"]
    if max_connections is not None:
        _positive_int("%s: max_connections" % source, max_connections)
    sandboxes_mem_mb = _total(source, raw, "sandboxes_mem_mb", limits, "mem_mb")
    sandboxes_procs = _total(source, raw, "sandboxes_procs", limits, "procs")
    idle_sec = raw["idle_sec"]
    if idle_sec is not None and (isinstance(idle_sec, bool)
                                 or not isinstance(idle_sec, (int, float))
                                 or not 0 < idle_sec <= LIMIT_MAX["runtime_sec"]):
        # The event loop's timers take a float: bounded like runtime_sec.
        raise ConfigError("%s: idle_sec must be null or a number of seconds above 0 and at "
                          "most %d, not %s" % (source, LIMIT_MAX["runtime_sec"], shown(idle_sec)))
    wake_us = raw["cpu_wake_latency_us"]
    if wake_us is not None and (isinstance(wake_us, bool) or not isinstance(wake_us, int)
                                or not 0 <= wake_us <= WAKE_US_MAX):
        raise ConfigError("%s: cpu_wake_latency_us must be null or a whole number of "
                          "microseconds up to %d, not %s" % (source, WAKE_US_MAX, shown(wake_us)))
    uid_base = raw.get("uid_base")
    if uid_base is None:
        uid_base = default_base(port)
    elif isinstance(uid_base, bool) or not isinstance(uid_base, int) \
            or not 65536 <= uid_base <= UID_MAX - UID_SLOTS:
        # Below 65536 live the host's own users: a sandbox must never be one.
        raise ConfigError("%s: uid_base must be null or an integer from 65536 to %d, not %s"
                          % (source, UID_MAX - UID_SLOTS, shown(uid_base)))
    return WorkerConfig(
        cluster=os.path.abspath(raw["cluster"]),
        port=port,
        host=raw["host"],
        rootfs=os.path.abspath(raw["rootfs"]),
        max_sandboxes=max_sandboxes,
        sandboxes_mem_mb=sandboxes_mem_mb,
        sandboxes_procs=sandboxes_procs,
        idle_sec=idle_sec,
        pool_size=pool_size,
        max_connections=max_connections,
        zygote=_flag("%s: zygote" % source, raw["zygote"]),
        favor_cgroup_moves=_flag("%s: favor_cgroup_moves" % source, raw["favor_cgroup_moves"]),
        cpu_wake_latency_us=wake_us,
        network_isolation=_flag("%s: network_isolation" % source, raw["network_isolation"]),
        uid_base=uid_base,
        egress=_egress(source, raw["egress"]),
        limits=Limits(**limits),
    )


def load(path):
    try:
        with open(path) as f:
            raw = json.load(f)
    except OSError as e:
        raise ConfigError("read config %s: %s" % (path, e.strerror)) from None
    except ValueError as e:
        raise ConfigError("config %s is not valid JSON: %s" % (path, e)) from None
    except RecursionError:  # the decoder's own limit, about 1000 levels
        raise ConfigError("config %s is not valid JSON: nested too deeply" % path) from None
    if not isinstance(raw, dict):
        raise ConfigError("config %s must hold a JSON object" % path)
    return from_dict(raw, path)
