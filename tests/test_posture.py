"""Sandbox posture, read from the host (after gVisor's posture test): the
state of a live handler process compared with one expected record, so that
a regression anywhere in the hardening shows up here."""
import json
import os

import pytest

# As the zygote was started (/proc/PID/environ): LD_BIND_NOW is gone from
# a handler's own environment (see test_isolation), but not from that record.
EXPECTED_ENV = {"PATH", "PYTHONPATH", "LANG", "HOME", "LD_BIND_NOW"}


def proc(pid, name):
    with open("/proc/%d/%s" % (pid, name)) as f:
        return f.read()


@pytest.fixture(scope="module")
def handler(worker):
    """(host pid, host uid) of a live handler."""
    # A handler with a second thread alive, so that every thread is checked.
    worker.add_function("posture", "import threading, time\n"
                                   "threading.Thread(target=time.sleep, args=(3600,),"
                                   " daemon=True).start()\n"
                                   "def handler(event):\n    return 'ok'\n")
    assert worker.call("posture", {})[2] == "ok"
    _, _, body = worker.request("GET", "/sandboxes")
    (sandbox,) = [s for s in json.loads(body) if s["function"] == "posture"]
    return sandbox["pid"], sandbox["uid"]


@pytest.fixture(scope="module")
def handler_pid(handler):
    return handler[0]


def test_every_thread_is_unprivileged_and_filtered(handler):
    handler_pid, uid = handler
    threads = os.listdir("/proc/%d/task" % handler_pid)
    assert len(threads) == 2
    for tid in threads:
        status = dict(line.split(":\t", 1) for line in
                      proc(handler_pid, "task/%s/status" % tid).splitlines() if ":\t" in line)
        for caps in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
            assert int(status[caps], 16) == 0, (tid, caps)
        assert status["NoNewPrivs"].strip() == "1"
        assert status["Seccomp"].strip() == "2"
        # As the host sees it: the sandbox's own uid, no host user's.
        assert status["Uid"].split() == [str(uid)] * 4
        assert status["Gid"].split() == [str(uid)] * 4
        assert status["Groups"].strip() == ""


def test_its_user_namespace_maps_only_its_own_uid(handler):
    handler_pid, uid = handler
    assert uid >= 65536  # never root, never one of the host's users
    assert proc(handler_pid, "uid_map").split() == ["65534", str(uid), "1"]
    assert proc(handler_pid, "gid_map").split() == ["65534", str(uid), "1"]
    assert proc(handler_pid, "setgroups").strip() == "deny"


def test_files_it_writes_in_scratch_belong_to_its_uid_on_the_host(worker, handler):
    handler_pid, uid = handler
    worker.add_function("scratch-owner", "import os\n"
                                          "def handler(event):\n"
                                          "    with open('/tmp/mine', 'w') as f:\n"
                                          "        f.write('x')\n"
                                          "    return os.getuid()\n")
    assert worker.call("scratch-owner", {})[2] == 65534  # "nobody" as it sees itself
    _, _, body = worker.request("GET", "/sandboxes")
    (sandbox,) = [s for s in json.loads(body) if s["function"] == "scratch-owner"]
    st = os.stat("/proc/%d/root/tmp/mine" % sandbox["pid"])
    assert (st.st_uid, st.st_gid) == (sandbox["uid"], sandbox["uid"])
    assert sandbox["uid"] != uid  # every live sandbox has a uid of its own


def test_namespaces_all_differ_from_the_hosts(handler_pid):
    for ns in ("mnt", "pid", "ipc", "uts", "net", "cgroup", "user"):
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
    assert limits["Max core file size"][:2] == ["1", "1"]  # 1 byte: no core file, no pipe helper
    assert limits["Max open files"][:2] == ["1024", "1024"]  # limits.nofile
    assert limits["Max file size"][:2] == [str(64 << 20)] * 2  # limits.fsize_mb
    assert proc(handler_pid, "cgroup").count("/cg-") >= 1  # in its own cgroup
