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
on the host.  Polling costs the CPU time spent polling (the host's, in a
VM), so the request is made only while calls come in, and withdrawn
LINGER after the last one began.
"""
import os
import struct
import time

DEVICE = "/dev/cpu_dma_latency"
# What a request of "no constraint" holds (PM_QOS_CPU_LATENCY_DEFAULT_VALUE).
NO_CONSTRAINT = 2 * 10**9
# How long after a call began idle CPUs stay quick to wake: long enough
# that the calls of a burst (back to back, or a keep-alive client's) find
# them so; short enough that a host with a call now and then spends next
# to nothing on it.
LINGER = 0.05


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
        if not self.held:
            self.held = True
            os.write(self.fd, struct.pack("i", self.wake_us))

    def relax(self):
        if self.held:
            self.held = False
            os.write(self.fd, struct.pack("i", NO_CONSTRAINT))

    def call(self):
        """A call began: hold, until LINGER after the last one.  On every
        call's path, so only an attribute or two unless calls start again
        after a pause (one write, and one timer per LINGER)."""
        self.last_call = time.monotonic()
        if not self.held:
            self.hold()
            self.timer = self.loop.call_later(LINGER, self._relax_if_quiet)

    def _relax_if_quiet(self):
        quiet_for = time.monotonic() - self.last_call
        if quiet_for < LINGER:
            self.timer = self.loop.call_later(LINGER - quiet_for, self._relax_if_quiet)
            return
        self.timer = None
        self.relax()

    def close(self):
        if self.timer is not None:
            self.timer.cancel()
        os.close(self.fd)  # the request ends with it

