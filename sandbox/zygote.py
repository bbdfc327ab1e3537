"""The worker's side of a root zygote: starts it in its own sandbox, sends it
fork requests, and hears of every child's exit."""
import asyncio
import json
import os
import signal
import socket
import sys

from .errors import SandboxError, ZygoteBootError
from .runtime import proto
from .runtime import syscalls as sc

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ZYGOTE_NS = sc.CLONE_NEWNS | sc.CLONE_NEWPID | sc.CLONE_NEWIPC | sc.CLONE_NEWUTS
BOOT_FAILURES = {
    proto.EXIT_BOOT_IMPORT: "its python3 cannot import the runtime (does the rootfs have "
                            "python3-msgpack and python3-cffi-backend?)",
    proto.EXIT_BOOT_SETUP: "its sandbox could not be built",
}


# How long a zygote whose channel closed has to become reapable.
EXIT_GRACE = 2.0


def _reap(pidfd, block=False):
    """The wait status of our child behind `pidfd`, or None while it runs."""
    info = os.waitid(os.P_PIDFD, pidfd, os.WEXITED | (0 if block else os.WNOHANG))
    if info is None:
        return None
    if info.si_code == os.CLD_EXITED:
        return info.si_status << 8
    return info.si_status  # the signal number, as in a waitpid status


def describe_status(status):
    """A wait status in words, e.g. "exited with status 3", to follow a subject."""
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = "signal %d" % sig
        return "was killed by signal %d (%s)" % (sig, name)
    return "exited with status %d" % os.WEXITSTATUS(status)


class Zygote:
    def __init__(self, rootfs, cgroup, log_fd, hostname, scratch_mb, on_child_exit, on_death):
        self.rootfs = rootfs
        self.cgroup = cgroup
        self.log_fd = log_fd
        self.hostname = hostname
        self.scratch_mb = scratch_mb
        self.on_child_exit = on_child_exit  # (sandbox id, wait status)
        self.on_death = on_death            # (zygote, description)
        self.pid = None
        self.control = None
        self.pidfd = None
        self.alive = False

    async def start(self, timeout=30.0):
        loop = asyncio.get_running_loop()
        control, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        spec = json.dumps({"rootfs": self.rootfs, "hostname": self.hostname,
                           "scratch_mb": self.scratch_mb})
        # Not `-m sandbox.launch`: that finds the package through the
        # working directory first, so a worker started from another checkout
        # (or any directory holding a "sandbox" package) would run its code.
        argv = [sys.executable, "-s", "-c", "import sys; sys.path[0] = %r; "
                "from sandbox.launch import main; main()" % REPO_ROOT, spec]
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}
        devnull = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
        cgroup_fd = self.cgroup.open_dir()
        try:
            self.pid, self.pidfd = sc.spawn(argv, env, [devnull, self.log_fd, self.log_fd,
                                                        child_end.fileno()],
                                            ZYGOTE_NS, cgroup_fd)
        except sc.SyscallError as e:
            raise ZygoteBootError("start zygote", self.rootfs, str(e)) from None
        finally:
            os.close(devnull)
            child_end.close()
            if cgroup_fd >= 0:
                os.close(cgroup_fd)
        if self.cgroup.mode.name != "v2":  # clone3 put it in its v2 cgroup only
            for fd in self.cgroup.open_procs():
                os.write(fd, str(self.pid).encode())
                os.close(fd)
        self.control = control
        control.setblocking(False)

        ready = loop.create_future()
        loop.add_reader(self.pidfd, lambda: ready.done() or ready.set_result(False))
        loop.add_reader(control.fileno(), lambda: ready.done() or ready.set_result(True))
        try:
            booted = await asyncio.wait_for(ready, timeout)
        except asyncio.TimeoutError:
            booted = False
        except BaseException:  # cancelled (shutdown while booting): leave nothing
            loop.remove_reader(control.fileno())
            loop.remove_reader(self.pidfd)
            signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)
            _reap(self.pidfd, block=True)
            self._close()
            raise
        loop.remove_reader(control.fileno())
        loop.remove_reader(self.pidfd)
        msg = None
        if booted:
            try:
                msg, _ = proto.recv_packet(control)
            except OSError:
                pass
        if booted and msg is None:
            # Its channel closed: it is exiting, but a process closes its
            # files a moment before it can be reaped, and the reason is in
            # its exit status.
            exited = loop.create_future()
            loop.add_reader(self.pidfd, lambda: exited.done() or exited.set_result(None))
            try:
                await asyncio.wait_for(exited, EXIT_GRACE)
            except asyncio.TimeoutError:
                pass  # _boot_failure kills it
            finally:
                loop.remove_reader(self.pidfd)
        if not msg or msg.get("op") != "ready":
            raise ZygoteBootError("start zygote", self.rootfs, self._boot_failure(timeout))
        self.alive = True
        loop.add_reader(control.fileno(), self._on_control)
        loop.add_reader(self.pidfd, self._on_pidfd)

    def _boot_failure(self, timeout):
        status = _reap(self.pidfd)
        if status is None:
            signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)
            _reap(self.pidfd, block=True)
            self._close()
            return "no answer within %.0f s" % timeout
        self._close()
        code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else None
        return "%s; its own message is in the worker's log just before" % (
            BOOT_FAILURES.get(code) or describe_status(status))

    def fork(self, shells, scratch_mb, fresh=False, netns=True, rehearse=False):
        """Ask for shells, in one message: `shells` holds (sandbox_id, uid,
        pooled, netns_given, fds) for each, where uid is the host uid its
        code will run as, pooled says it will wait in the pool (others are
        wanted at once), and fds are its channel, its output pipe, if
        netns_given a network namespace to join, then its cgroup.procs
        files.  At most proto.MAX_FDS fds in all.  With `rehearse`, each
        runs a throw-away call before it says ready (handler.rehearsal)."""
        ids = ", ".join(shell[0] for shell in shells)
        if not self.alive:
            raise SandboxError("fork sandbox", ids, "the zygote is not running")
        msg = {"op": "fork", "scratch_mb": scratch_mb, "fresh": fresh, "netns": netns,
               "rehearse": rehearse,
               "shells": [{"id": sandbox_id, "hostname": sandbox_id, "uid": uid,
                           "pooled": pooled, "netns_given": netns_given, "nfds": len(fds)}
                          for sandbox_id, uid, pooled, netns_given, fds in shells]}
        try:
            proto.send_packet(self.control, msg, [fd for shell in shells for fd in shell[-1]])
        except BlockingIOError:
            raise SandboxError("fork sandbox", ids, "the zygote's queue is full") from None
        except OSError as e:
            raise SandboxError("fork sandbox", ids, "zygote channel: %s" % e.strerror) from None

    def _on_control(self):
        while True:
            try:
                msg, fds = proto.recv_packet(self.control)
            except BlockingIOError:
                return
            except OSError:
                msg, fds = None, []
            for fd in fds:
                os.close(fd)
            if msg is None:
                return  # EOF: the pidfd tells us how it died
            if msg.get("op") == "exit":
                self.on_child_exit(msg["id"], msg["status"])
            elif msg.get("op") == "fork_failed":
                self.on_child_exit(msg["id"], None, msg.get("error"))

    def _on_pidfd(self):
        status = _reap(self.pidfd)
        self._close()
        self.on_death(self, describe_status(status or 0))

    def _close(self):
        loop = asyncio.get_event_loop()
        self.alive = False
        if self.control is not None:
            loop.remove_reader(self.control.fileno())
            self.control.close()
            self.control = None
        if self.pidfd is not None:
            loop.remove_reader(self.pidfd)
            os.close(self.pidfd)
            self.pidfd = None

    async def stop(self, timeout=5.0):
        """Close its channel (it exits, taking its sandboxes along), and
        SIGKILL it if it has not gone within `timeout`."""
        if self.pidfd is None:
            return
        loop = asyncio.get_running_loop()
        pidfd = self.pidfd
        loop.remove_reader(pidfd)
        gone = loop.create_future()
        loop.add_reader(pidfd, lambda: gone.done() or gone.set_result(None))
        loop.remove_reader(self.control.fileno())
        self.control.close()
        self.control = None
        try:
            await asyncio.wait_for(gone, timeout)
        except asyncio.TimeoutError:
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
            await gone
        loop.remove_reader(pidfd)
        _reap(pidfd, block=True)
        os.close(pidfd)
        self.pidfd = None
        self.alive = False
