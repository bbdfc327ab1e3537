"""A worker's life: check the rootfs, bind the port, start the zygote, serve,
and on SIGTERM, SIGINT or SIGHUP, or once its registry is deleted, drain
and remove every sandbox and cgroup."""
import asyncio
import gc
import logging
import os
import resource
import signal

from sandbox.cgroups import Limits, favor_moves
from sandbox.errors import SandboxError
from sandbox.manager import SandboxConfig, SandboxManager

from rootfs.prepare import RootfsError, prepare

from .app import App
from .cluster import Cluster
from .config import EGRESS_ADDRESSES, ConfigError, check_nofile_within
from .cpu_latency import CpuLatency
from .functions import FunctionTable
from .heap import give_back_big_buffers
from .http import HttpProtocol
from .registry import Registry

log = logging.getLogger("worker")


class StartError(Exception):
    pass


# fds the worker holds besides its sandboxes': its log, the registry's
# watch, the zygote's channel, egress's sockets, a code tree being handed
# over, and the like.
OWN_FDS = 64


# fds per sandbox slot (there are max_sandboxes + 2 * pool_size: every
# sandbox alive, ready and dying has one, as it has a uid): its channel, its
# output pipe and its network namespace, plus, while a shell is forked, the
# other ends of the first two and its cgroup.procs files.  Measured under
# churn with evictions: 3.6 a slot at the peak.
FDS_PER_SLOT = 5


def fds_for_sandboxes(config):
    """The most fds sandboxes can hold at once in this worker: FDS_PER_SLOT
    for each of its slots; the pool of used network namespaces; with
    egress, a namespace for each of the worker's addresses (its /24)."""
    return (FDS_PER_SLOT * (config.max_sandboxes + 2 * config.pool_size) + 2 * config.pool_size
            + (EGRESS_ADDRESSES if config.egress.enabled else 0) + OWN_FDS)


def reserve_fds(count):
    """Raise the soft limit on open files to the hard one, and grow this
    process's fd table to `count` entries now, while it has one thread.
    The kernel grows the table by doubling as fds are opened, and in a
    process with threads (asyncio's resolver, the egress thread) each
    growth waits for an RCU grace period: 10-20 ms here, with the event
    loop stalled.  A table never shrinks, so this is paid once.  Returns
    the limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    top = min(count, hard) - 1
    fd = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if fd < top:
            os.dup2(fd, top)
            os.close(top)
    finally:
        os.close(fd)
    return hard


def connection_cap(config, open_files):
    """How many client connections may be open at once: what the open-file
    limit leaves once every sandbox can have its fds, so that idle
    connections can never make a cold start fail for want of one; lower if
    the config says so."""
    left = open_files - fds_for_sandboxes(config)
    if left < 1:
        # The worker raises its soft limit to the hard one itself
        # (reserve_fds): only the hard limit is the operator's to raise.
        raise StartError("the open-file limit (%d) leaves no fd for connections next to "
                         "max_sandboxes %d and pool_size %d: raise the hard limit (ulimit -Hn) "
                         "or lower them" % (open_files, config.max_sandboxes, config.pool_size))
    return min(left, config.max_connections or left)


def wake_latency_request(wake_us, loop):
    """The worker's CpuLatency for `wake_us` (None: none asked), or None
    where the kernel offers no such request: said once, and the worker
    serves on without it."""
    if wake_us is None:
        return None
    try:
        return CpuLatency(wake_us, loop)
    except OSError as e:
        log.warning("cpu_wake_latency_us: cannot ask the kernel to keep idle CPUs quick to wake "
                    "(%s): they idle as deep as they like", e.strerror)
        return None


async def run(config):
    loop = asyncio.get_running_loop()
    give_back_big_buffers()
    open_files = reserve_fds(fds_for_sandboxes(config) + 256)
    try:
        check_nofile_within("the worker's config", config.limits.nofile, open_files)
    except ConfigError as e:
        raise StartError(str(e)) from None
    max_connections = connection_cap(config, open_files)
    if not os.path.isdir(config.registry):
        # Every call would be a 404 from a worker that says it is ready.
        raise StartError("registry %s is not a directory" % config.registry)
    try:
        rootfs = prepare(config.rootfs, cache_dir=Cluster(config.cluster).path + "/rootfs")
    except RootfsError as e:
        raise StartError(str(e)) from None
    limits = config.limits
    network = None
    if config.egress.enabled:
        # Imported only when used: pyroute2 is a big import for a worker
        # that never needs it.
        from sandbox.network import EgressNetwork
        network = EgressNetwork(config.port, config.egress.subnet, config.egress.spare,
                                log=log.warning, resolv_confs=(
                                    "/etc/resolv.conf", os.path.join(rootfs, "etc/resolv.conf")))
    manager = SandboxManager(SandboxConfig(
        rootfs=rootfs, cgroup_root=config.cgroup, log_fd=2, hostname="ol-%d" % config.port,
        limits=Limits(limits.mem_mb, limits.procs, limits.cpu_percent),
        scratch_mb=limits.scratch_mb, pool_size=config.pool_size, max_live=config.max_sandboxes,
        fresh=not config.zygote, netns=config.network_isolation, uid_base=config.uid_base,
        total_mem_mb=config.sandboxes_mem_mb, total_procs=config.sandboxes_procs),
        network)
    try:
        registry = Registry(config.registry, config.limits, egress=network is not None,
                            # Functions' own limits are checked against what
                            # all sandboxes together may have.
                            totals={"mem_mb": (manager.total_mem_mb, "sandboxes_mem_mb"),
                                    "procs": (manager.total_procs, "sandboxes_procs")})
    except OSError as e:
        raise StartError("watch registry %s: %s" % (config.registry, e.strerror)) from None
    table = FunctionTable(manager, registry, config.max_sandboxes, config.idle_sec)
    stop = asyncio.Event()

    def registry_gone():
        # Its cluster was deleted, most likely: its lock files with it, so
        # `admin kill` could no longer find this worker, and every call
        # would be a 404 from a worker that says it is ready.
        log.warning("registry %s is gone (deleted, or its file system unmounted): stopping, "
                    "as on SIGTERM", config.registry)
        stop.set()
    registry.on_gone = registry_gone
    # Changes are applied as they come too, not only at the next lookup: a
    # deleted or edited function's idle sandboxes go at once.
    loop.add_reader(registry.inotify.fileno(), registry.drain_changes)
    app = App(table, limits.request_kb * 1024, max_connections)
    try:
        server = await loop.create_server(lambda: HttpProtocol(app), config.host, config.port,
                                          reuse_address=True, backlog=1024, start_serving=False)
    except OSError as e:
        raise StartError("listen on %s:%d: %s" % (config.host, config.port, e.strerror)) from None

    # SIGHUP too: a worker-exec's terminal closed.  Its default would end
    # the worker with nothing cleaned up.
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        loop.add_signal_handler(sig, stop.set)
    if config.favor_cgroup_moves:
        log.info(favor_moves())
    try:
        if network is not None:
            await network.start()
            log.info("egress: %s", network.describe())
        await manager.start()
        table.watch_memory()
        await server.start_serving()
        # A full collection walks every live object, and a busy worker holds
        # many (sandboxes, channels, futures): collect rarely, and never walk
        # what start-up made.
        gc.freeze()
        gc.set_threshold(50_000, 50, 1000)
        app.cpu_latency = wake_latency_request(config.cpu_wake_latency_us, loop)
        app.ready = True
        log.info("ready on http://%s:%d (rootfs %s, cgroups %s, at most %d connections%s)",
                 config.host, config.port, rootfs, manager.root.mode.name, max_connections,
                 "" if app.cpu_latency is None else ", idle CPUs within %d us of waking while "
                 "calls come in" % config.cpu_wake_latency_us)
        await stop.wait()
        log.info("stopping")
    except SandboxError as e:
        raise StartError(str(e)) from None
    finally:
        app.ready = False
        server.close()
        await table.close()
        await manager.shutdown()
        if network is not None:
            await network.close()
        loop.remove_reader(registry.inotify.fileno())
        registry.close()
        if app.cpu_latency is not None:
            app.cpu_latency.close()
    log.info("stopped; every sandbox, cgroup and network removed")
