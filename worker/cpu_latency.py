"""Keeping the host's idle CPUs quick to wake while calls come in
(the `cpu_wake_latency_us` setting).

A warm call wakes the worker, its handler, the worker again and then the
client, each perhaps on an idle CPU, and each waits until that CPU is out
of its idle state.  In a VM an idle CPU is halted, and waking it is a trip
through the hypervisor: on this project's test VMs a warm call took
0.39-0.46 ms at the median with halting CPUs, 0.21-0.25 with polling ones.
On bare metal, deep C-states cost the same way, tens to hundreds of µs.

The kernel's PM QoS interface lets a process ask that no CPU take longer
than N µs to wake: the cpuidle governor then uses no deeper state, and at
0 idle CPUs poll instead of halting.  The request lasts while its file is
open, so it ends with the process, however that ends: nothing is left set
on the host.  Polling costs the CPU time spent polling, on every CPU of
the host (the hypervisor's host's, in a VM), so the request is made only
while calls come in, and withdrawn LINGER after the last one began.
"""
import logging
import os
import struct
import time

log = logging.getLogger("worker")

DEVICE = "/dev/cpu_dma_latency"
# What a request of "no constraint" holds (PM_QOS_CPU_LATENCY_DEFAULT_VALUE).
NO_CONSTRAINT = 2 * 10**9
# How long after a call began idle CPUs stay quick to wake.  Long enough
# for a warm call or a cold start (0.2 to 8 ms here), and for the next
# request of a client calling back to back; short, because the CPUs poll
# all that time: with 50 ms, 20 calls a second kept them polling 98% of
# the time, with 10 ms 19% (README).  A longer call's last wake-ups go
# without: they are a small part of it.
LINGER = 0.01


class CpuLatency:
    """This process's PM QoS request: `wake_us` while calls come in (call(),
    or hold() and relax()), no constraint otherwise.  Raises OSError when
    the kernel offers no such request (no device, or no permission)."""

    def __init__(self, wake_us, loop=None):
        self.loop = loop  # for call()'s timer
        self.wake_us = wake_us
        try:
            # Opening makes a request of "no constraint"; writes change it.
            self.fd = os.open(DEVICE, os.O_WRONLY | os.O_CLOEXEC)
        except OSError as e:
            raise OSError(e.errno, "open %s: %s" % (DEVICE, e.strerror)) from None
        self.held = False
        self.last_call = 0.0
        self.timer = None

    def hold(self):
        if not self.held and self.fd >= 0:
            os.write(self.fd, struct.pack("i", self.wake_us))
            self.held = True

    def relax(self):
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.held:
            self.held = False
            os.write(self.fd, struct.pack("i", NO_CONSTRAINT))

    def call(self):
        """A call began: hold, until LINGER after the last one.  On every
        call's path, so only a clock read and an attribute or two unless
        calls start again after a pause (then a write, and one timer per
        LINGER)."""
        self.last_call = time.monotonic()
        if self.held or self.fd < 0:
            return
        try:
            self.hold()
        except OSError as e:  # the call goes on; the request is given up
            log.warning("cpu_wake_latency_us: write %s: %s; idle CPUs are left as they are",
                        DEVICE, e.strerror)
            self.close()
            return
        self.timer = self.loop.call_later(LINGER, self._relax_if_quiet)

    def _relax_if_quiet(self):
        quiet_for = time.monotonic() - self.last_call
        if quiet_for < LINGER:
            self.timer = self.loop.call_later(LINGER - quiet_for, self._relax_if_quiet)
            return
        self.timer = None
        self.relax()

    def close(self):
        """Withdraw the request for good (the kernel drops it with the fd)."""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        self.held = False
