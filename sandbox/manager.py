"""Handler sandboxes as the worker sees them: create one from a code
directory, talk to it over its channel, destroy it.  Nothing here knows HTTP,
registries or functions; a sandbox gets a code directory and a label."""
import asyncio
import os
import socket
import time
from dataclasses import dataclass

from .cgroups import Cgroup, Limits
from .errors import SandboxError
from .runtime import syscalls as sc
from .zygote import Zygote, describe_status


@dataclass(frozen=True)
class SandboxConfig:
    rootfs: str          # an unpacked root filesystem directory
    cgroup_root: str     # this worker's cgroup, relative to each hierarchy
    log_fd: int          # where zygote and handler output goes
    hostname: str
    limits: Limits = Limits()
    scratch_mb: int = 64


class Sandbox:
    """One handler process in its own sandbox.  `channel` is the worker's end
    of its stream socket."""

    def __init__(self, sandbox_id, label, cgroup, channel):
        self.id = sandbox_id
        self.label = label
        self.cgroup = cgroup
        self.channel = channel
        self.created = time.time()
        self.exited = asyncio.get_running_loop().create_future()  # -> description

    def host_pid(self):
        """The host pid of the sandbox's pid 1, or None once it is gone."""
        pids = self.cgroup.pids()
        return pids[0] if pids else None

    async def exit_reason(self, timeout=2.0):
        """Why the sandbox ended, e.g. "exited with status 3"."""
        try:
            return await asyncio.wait_for(asyncio.shield(self.exited), timeout)
        except asyncio.TimeoutError:
            return "closed its channel but is still running"

    def kill(self):
        self.cgroup.kill()


class SandboxManager:
    def __init__(self, config):
        self.config = config
        self.root = Cgroup(config.cgroup_root)
        self.sandboxes = {}
        self.zygote = None
        self._serial = 0
        self._restarting = None

    async def start(self):
        # A worker that was SIGKILLed leaves cgroups behind; take them over.
        self.root.remove()
        self.root.create()
        await self._start_zygote()

    async def _start_zygote(self):
        cgroup = Cgroup(self.config.cgroup_root + "/zygote").create()
        self.zygote = Zygote(self.config.rootfs, cgroup, self.config.log_fd,
                             self.config.hostname, self.config.scratch_mb,
                             self._on_child_exit, self._on_zygote_death)
        await self.zygote.start()

    def _on_zygote_death(self, zygote, reason):
        # Its children died with it (it was pid 1 of their parent namespace).
        os.write(self.config.log_fd, ("zygote %s; restarting it\n" % reason).encode())
        for sandbox_id in list(self.sandboxes):
            self._on_child_exit(sandbox_id, None, "its zygote " + reason)
        self._restarting = asyncio.ensure_future(self._start_zygote())

    def _on_child_exit(self, sandbox_id, status, error=None):
        sandbox = self.sandboxes.pop(sandbox_id, None)
        if sandbox is None:
            return
        try:
            sandbox.cgroup.remove()
        except SandboxError as e:
            os.write(self.config.log_fd, ("%s\n" % e).encode())
        if not sandbox.exited.done():
            sandbox.exited.set_result(error or describe_status(status))

    async def create(self, code_dir, label=""):
        """Fork a new handler sandbox that serves the code in `code_dir`."""
        if self._restarting is not None and not self._restarting.done():
            await self._restarting
        self._serial += 1
        sandbox_id = "sb-%d" % self._serial
        cgroup = Cgroup("%s/%s" % (self.config.cgroup_root, sandbox_id))
        cgroup.create(self.config.limits)
        fds = []
        try:
            fds.append(self._code_tree(code_dir))
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            fds.append(theirs.detach())
            fds += cgroup.open_procs()
            self.zygote.fork(sandbox_id, fds[1], fds[0], fds[2:], self.config.scratch_mb, label)
        except OSError as e:  # SyscallError included: it names the operation
            cgroup.remove()
            raise SandboxError("create sandbox", sandbox_id, str(e)) from None
        except BaseException:
            cgroup.remove()
            raise
        finally:
            for fd in fds:
                os.close(fd)
        sandbox = Sandbox(sandbox_id, label, cgroup, ours)
        self.sandboxes[sandbox_id] = sandbox
        return sandbox

    @staticmethod
    def _code_tree(code_dir):
        """A detached, read-only copy of the mount at `code_dir`, which the
        sandbox attaches at /handler.  Passing it as an fd means the zygote
        never needs to see any host path."""
        fd = sc.open_tree(code_dir, sc.OPEN_TREE_CLONE | sc.OPEN_TREE_CLOEXEC | sc.AT_RECURSIVE)
        try:
            sc.mount_setattr(fd, sc.MOUNT_ATTR_RDONLY | sc.MOUNT_ATTR_NOSUID | sc.MOUNT_ATTR_NODEV)
        except BaseException:
            os.close(fd)
            raise
        return fd

    async def destroy(self, sandbox, timeout=2.0):
        """Kill a sandbox and wait until it and its cgroup are gone."""
        sandbox.channel.close()
        if sandbox.id in self.sandboxes:
            sandbox.kill()
            await sandbox.exit_reason(timeout)

    async def shutdown(self):
        for sandbox in list(self.sandboxes.values()):
            sandbox.kill()
        if self._restarting is not None:
            self._restarting.cancel()
        if self.zygote is not None:
            await self.zygote.stop()
        for sandbox_id in list(self.sandboxes):
            self._on_child_exit(sandbox_id, None, "the worker shut down")
        self.root.remove()
        self.root.remove_empty_parents()
