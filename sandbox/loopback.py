"""Used loopback-only network namespaces, kept for new shells.

Every sandbox has a network namespace of its own with only a loopback.
Making one costs ~0.4 ms of CPU in the shell, and tearing it down as much
again in the kernel's workers: a fifth of a sandbox's whole cost.  So when
a sandbox is gone (no process can be left in it), the worker keeps its
namespace and gives it to a new shell.  The shell joins it only if the
last sandbox left no trace in it that a later one could see: its C set-up
checks, before any function's code runs (cbits/shell.c: netns_untouched
says what it checks and why that is enough).  Otherwise the shell makes a
namespace of its own, and the used one is dropped.
"""
import collections
import os


class LoopbackPool:
    def __init__(self, keep):
        self.keep = keep                  # the most namespaces kept
        self.fds = collections.deque()    # oldest first
        self.joined = 0                   # given to a shell, which found it untouched
        self.refused = 0                  # ...which found a trace in it, and made its own

    def take(self):
        """A used namespace's fd (the caller owns it), or None."""
        return self.fds.popleft() if self.fds else None

    def give_back(self, fd):
        """The namespace of a sandbox whose processes are all gone."""
        if len(self.fds) < self.keep:
            self.fds.append(fd)
        else:
            os.close(fd)

    def close(self):
        while self.fds:
            os.close(self.fds.popleft())
