"""Errors raised by the sandbox package.  Each names the operation and the
object it acted on; no bare OSError leaves the package."""

class SandboxError(Exception):
    """An operation on a sandbox, a zygote or a cgroup failed."""

    def __init__(self, op, obj, reason):
        super().__init__("%s %s: %s" % (op, obj, reason))
        self.op = op
        self.obj = obj
        self.reason = reason


class CapacityError(SandboxError):
    """Everything of some kind is in use: try again later."""


class CgroupError(SandboxError):
    pass


class ZygoteBootError(SandboxError):
    """The zygote could not start; restarting it would fail the same way."""
