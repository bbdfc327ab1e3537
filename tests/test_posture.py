"""Sandbox posture, read from the host (after gVisor's posture test): the
state of a live handler process compared with one expected record, so that
a regression anywhere in the hardening shows up here."""
import json
import os

import pytest

EXPECTED_ENV = {"PATH", "PYTHONPATH", "LANG", "HOME"}


def proc(pid, name):
    with open("/proc/%d/%s" % (pid, name)) as f:
        return f.read()


@pytest.fixture(scope="module")
def handler_pid(worker):
    # A handler with a second thread alive, so that every thread is checked.
    worker.add_function("posture", "import threading, time\n"
                                   "threading.Thread(target=time.sleep, args=(3600,),"
                                   " daemon=True).start()\n"
                                   "def handler(event):\n    return 'ok'\n")
    assert worker.call("posture", {})[2] == "ok"
    _, _, body = worker.request("GET", "/sandboxes")
    (sandbox,) = [s for s in json.loads(body) if s["function"] == "posture"]
    return sandbox["pid"]


def test_every_thread_is_unprivileged_and_filtered(handler_pid):
    threads = os.listdir("/proc/%d/task" % handler_pid)
    assert len(threads) == 2
    for tid in threads:
        status = dict(line.split(":\t", 1) for line in
                      proc(handler_pid, "task/%s/status" % tid).splitlines() if ":\t" in line)
        for caps in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
            assert int(status[caps], 16) == 0, (tid, caps)
        assert status["NoNewPrivs"].strip() == "1"
        assert status["Seccomp"].strip() == "2"
        assert status["Uid"].split() == ["65534"] * 4
        assert status["Gid"].split() == ["65534"] * 4


def test_namespaces_all_differ_from_the_hosts(handler_pid):
    for ns in ("mnt", "pid", "ipc", "uts", "net", "cgroup"):
        ours = os.readlink("/proc/%d/ns/%s" % (handler_pid, ns))
        assert ours != os.readlink("/proc/self/ns/%s" % ns), ns


def test_fd_table_holds_only_its_own(handler_pid):
    fds = {int(fd): os.readlink("/proc/%d/fd/%s" % (handler_pid, fd))
           for fd in os.listdir("/proc/%d/fd" % handler_pid)}
    assert len(fds) == 4 and sorted(fds)[:3] == [0, 1, 2], fds
    assert fds[0] == "/dev/null"
    assert fds[1].startswith("pipe:") and fds[1] == fds[2]
    channel = [target for fd, target in fds.items() if fd > 2]
    assert channel[0].startswith("socket:")  # its channel, and nothing else


def test_mounts_are_private(handler_pid):
    mountinfo = proc(handler_pid, "mountinfo").splitlines()
    assert not [line for line in mountinfo if "shared:" in line or "master:" in line]
    targets = [line.split()[4] for line in mountinfo]
    assert "/sys" not in targets and "/handler" in targets


def test_environment_is_only_the_platforms(handler_pid):
    names = {var.split("=", 1)[0] for var in proc(handler_pid, "environ").split("\0") if var}
    assert names == EXPECTED_ENV


def test_limits(handler_pid):
    limits = {line[:26].strip(): line[26:].split() for line in
              proc(handler_pid, "limits").splitlines()[1:]}
    assert limits["Max core file size"][:2] == ["0", "0"]
    assert proc(handler_pid, "cgroup").count("/cg-") >= 1  # in its own cgroup
