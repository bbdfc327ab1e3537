"""The worker's request that idle CPUs stay quick to wake (PM QoS,
cpu_wake_latency_us), read back from the kernel: made while calls come in,
withdrawn soon after, and gone with the worker however it ends."""
import asyncio
import os
import signal
import struct
import time

import pytest

from worker.cpu_latency import DEVICE, LINGER, NO_CONSTRAINT, CpuLatency

from conftest import admin


def in_force():
    """The host's effective constraint, in µs: the least of every request."""
    fd = os.open(DEVICE, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return struct.unpack("i", os.read(fd, 4))[0]
    finally:
        os.close(fd)


@pytest.fixture
def quiet_host():
    if not os.path.exists(DEVICE):
        pytest.skip("no %s on this host" % DEVICE)
    if in_force() != NO_CONSTRAINT:
        pytest.skip("another process holds a CPU latency request: ours cannot be told apart")


def wait_for(value, timeout=5.0):
    end = time.monotonic() + timeout
    while in_force() != value and time.monotonic() < end:
        time.sleep(0.01)
    return in_force()


def test_the_request_holds_while_calls_come_in_and_not_after(quiet_host, own_worker):
    worker = own_worker(cpu_wake_latency_us=7)
    worker.add_function("hello", "def handler(event):\n    return 'hi'\n")
    assert in_force() == NO_CONSTRAINT  # started, but no call yet
    for _ in range(3):
        assert worker.call("hello", {})[0] == 200
        assert in_force() == 7
    assert wait_for(NO_CONSTRAINT) == NO_CONSTRAINT
    time.sleep(LINGER)
    assert in_force() == NO_CONSTRAINT
    # Calls again after the pause: the request again.
    assert worker.call("hello", {})[0] == 200
    assert in_force() == 7


def test_null_asks_nothing(quiet_host, own_worker):
    worker = own_worker(cpu_wake_latency_us=None)
    worker.add_function("hello", "def handler(event):\n    return 'hi'\n")
    assert worker.call("hello", {})[0] == 200
    assert in_force() == NO_CONSTRAINT


def test_the_request_ends_with_a_killed_worker(quiet_host, own_worker):
    worker = own_worker()  # the default: 0, idle CPUs poll
    worker.add_function("hello", "def handler(event):\n    return 'hi'\n")
    assert worker.call("hello", {})[0] == 200
    assert in_force() == 0
    with open(os.path.join(worker.path, "workers", str(worker.port), "pid")) as f:
        os.kill(int(f.read()), signal.SIGKILL)
    assert wait_for(NO_CONSTRAINT) == NO_CONSTRAINT
    admin("kill", "-cluster", worker.path)  # its sandboxes, cgroups and records


def test_a_closed_request_stays_withdrawn(quiet_host, tmp_path):
    """After close() (the worker's shutdown), a late call writes nothing,
    not even to a file that took the fd's number, and sets no timer."""
    loop = asyncio.new_event_loop()
    try:
        latency = CpuLatency(3, loop)
        its_fd = latency.fd
        latency.call()
        assert in_force() == 3 and latency.timer is not None
        latency.close()
        assert in_force() == NO_CONSTRAINT and latency.timer is None
        with open(tmp_path / "taker", "wb") as taker:
            assert taker.fileno() == its_fd  # the lowest free number: the one it had
            latency.call()
            latency.relax()
        assert (tmp_path / "taker").read_bytes() == b""
        assert latency.timer is None and not latency.held
        latency.close()  # twice is fine
        assert in_force() == NO_CONSTRAINT
    finally:
        loop.close()
