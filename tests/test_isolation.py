"""Isolation facts, seen from inside a handler running in a real sandbox."""
import json
import os
import socket
import uuid

import pytest

from sandbox.cgroups import Cgroup


@pytest.fixture(scope="module")
def facts(worker):
    status, _, body = worker.call("probe", {"op": "facts"})
    assert status == 200, body
    return body


def test_handler_is_pid_1_of_its_own_pid_namespace(facts):
    assert facts["pid"] == 1
    assert facts["ppid"] == 0  # its parent lives outside the namespace
    assert facts["proc_pids"] == [1]  # /proc is its own: nothing else is visible


def test_hostname_is_its_own(facts):
    assert facts["hostname"] != socket.gethostname()
    assert facts["hostname"].startswith("sb-")


def test_no_host_path_is_visible(worker, facts, tmp_path):
    marker = tmp_path / ("host-only-%s" % uuid.uuid4().hex)
    marker.write_text("secret")
    _, _, seen = worker.call("probe", {"op": "exists", "path": str(marker)})
    assert seen is False
    for path in (worker.path, worker.registry, os.path.dirname(os.path.abspath(__file__))):
        _, _, seen = worker.call("probe", {"op": "exists", "path": path})
        assert seen is False, path
    # The root is the rootfs: no trace of the host's top-level directories
    # beyond what a Debian rootfs has, plus our mount points.
    assert "work" not in facts["root"]
    targets = [line.split()[4] for line in facts["mountinfo"]]
    assert "/sys" not in targets  # no sysfs at all
    # The old root was detached after pivot_root: only the sandbox's own
    # mounts remain, all under the rootfs bind at "/".
    assert set(targets) <= {"/", "/ol/olrt", "/proc", "/dev", "/tmp", "/handler"} | {
        t for t in targets if t.startswith(("/dev/", "/proc/"))}


def test_root_is_read_only(worker):
    for path in ("/etc/passwd-new", "/usr/bin/evil", "/handler/lambda_func.py", "/ol/olrt/x",
                 "/dev/evil"):
        _, _, r = worker.call("probe", {"op": "write", "path": path})
        assert r == {"ok": False, "errno": "EROFS"}, path


def test_tmp_is_writable_and_private(worker, own_worker):
    name = "private-%s" % uuid.uuid4().hex
    _, _, r = worker.call("probe", {"op": "write", "path": "/tmp/" + name, "data": "mine"})
    assert r["ok"] is True
    _, _, r = worker.call("probe", {"op": "read", "path": "/tmp/" + name})
    assert r == {"ok": True, "value": "mine"}  # warm: the same sandbox
    assert not os.path.exists("/tmp/" + name)  # not the host's /tmp
    # Another function's sandbox does not see it.
    worker.add_function("probe2", open(os.path.join(worker.registry, "probe",
                                                    "lambda_func.py")).read())
    _, _, r = worker.call("probe2", {"op": "exists", "path": "/tmp/" + name})
    assert r is False


def test_tmp_has_a_size_cap(worker):
    _, _, r = worker.call("probe", {"op": "write", "path": "/tmp/big", "data": "x" * 1024,
                                     "repeat": 80 << 10})
    assert r == {"ok": False, "errno": "ENOSPC"}
    worker.call("probe", {"op": "write", "path": "/tmp/big", "data": ""})


def test_mount_propagation_is_private(facts):
    assert not [line for line in facts["mountinfo"] if "shared:" in line or "master:" in line]


def test_minimal_dev(facts):
    assert set(facts["dev"]) <= {"null", "zero", "full", "random", "urandom", "tty", "pts",
                                 "ptmx", "shm", "fd", "stdin", "stdout", "stderr"}
    assert "null" in facts["dev"] and "sda" not in facts["dev"] and "vda" not in facts["dev"]


def test_code_is_read_only_at_handler(facts):
    handler = [line for line in facts["mountinfo"] if line.split()[4] == "/handler"]
    assert handler and handler[0].split()[5].startswith("ro")
    assert facts["cwd"] == "/handler"


def test_own_cgroup_namespace(facts):
    # In its own cgroup namespace the sandbox sees its cgroup as the root.
    assert all(line.endswith(":/") for line in facts["cgroup"]), facts["cgroup"]


def test_cgroup_limits_apply_to_the_handler(worker):
    worker.call("probe", {"op": "echo"})
    _, _, body = worker.request("GET", "/sandboxes")
    live = [s for s in json.loads(body) if s["function"] == "probe"]
    assert live and live[0]["pid"], body
    with open("/proc/%d/cgroup" % live[0]["pid"]) as f:
        paths = dict(line.split(":", 2)[1:] for line in f.read().splitlines())
    cgroup = Cgroup(paths.get("memory") or paths[""])
    assert "/w%d/sandboxes/cg-" % worker.port in "/" + cgroup.path
    memory = cgroup.limit_dirs()["memory"]
    name = "memory.max" if cgroup.mode.name == "v2" else "memory.limit_in_bytes"
    with open(os.path.join(memory, name)) as f:
        assert int(f.read()) == 256 << 20
    with open(os.path.join(cgroup.limit_dirs()["pids"], "pids.max")) as f:
        assert f.read().strip() == "64"


def test_fd_table_is_small(facts):
    # stdin, stdout, stderr, its channel and the fd listdir itself opened;
    # nothing of the zygote's (control socket, wakeup pipe, namespace fds).
    assert len(facts["fds"]) <= 6, facts["fds"]


@pytest.fixture
def host_server():
    """A TCP server on the host's loopback, as a local service would be."""
    with socket.socket() as server:
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("127.0.0.1", 0))
        server.listen()
        yield server.getsockname()[1]


def test_network_is_only_its_own_loopback(worker):
    _, _, interfaces = worker.call("probe", {"op": "interfaces"})
    assert interfaces == ["lo"]
    _, _, r = worker.call("probe", {"op": "loopback"})
    assert r == {"ok": True, "value": "connected"}  # lo is up


def test_cannot_reach_the_worker_or_host_loopback_services(worker, host_server):
    # The host end is really listening: the host itself can connect.
    socket.create_connection(("127.0.0.1", host_server), timeout=2).close()
    for port in (worker.port, host_server):
        _, _, r = worker.call("probe", {"op": "connect", "host": "127.0.0.1", "port": port})
        assert r["ok"] is False, port
    # Nor any other host address.
    host_ip = socket.gethostbyname(socket.gethostname())
    if not host_ip.startswith("127."):
        _, _, r = worker.call("probe", {"op": "connect", "host": host_ip, "port": worker.port})
        assert r["ok"] is False


def test_handler_code_runs_unprivileged(worker, facts):
    assert facts["uid"] == 65534
    _, _, status = worker.call("probe", {"op": "status"})
    for caps in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        assert int(status[caps], 16) == 0, (caps, status[caps])
    assert status["NoNewPrivs"] == "1"
    assert status["Seccomp"] == "2"  # filter mode
    assert status["Uid"].split() == ["65534"] * 4 and status["Gid"].split() == ["65534"] * 4
    assert status["Groups"].strip() == ""


def test_privileged_attacks_fail(worker):
    _, _, results = worker.call("probe", {"op": "attacks"})
    assert not [name for name, result in results.items() if result == "succeeded"], results
    assert results["mount"] == "EPERM"
    # Root does not exist in its user namespace: there is no uid 0 to become.
    assert results["setuid0"] == "EINVAL"
    # Refused by the seccomp filter even where nobody could otherwise do them:
    for name in ("unshare_user", "clone_newuser", "keyctl", "bpf", "ptrace_traceme",
                 "userfaultfd", "perf_event_open", "io_uring_setup"):
        assert results[name] == "EPERM", (name, results[name])


def test_everyday_things_still_work(worker):
    _, _, out = worker.call("probe", {"op": "everyday"})
    assert out == ["thread", "fork exit 7", "subprocess", "urandom 8", "pool [1, 2]",
                   "executor [3]", "asyncio"]


def test_proc_is_masked_and_sys_is_absent(worker):
    _, _, facts = worker.call("probe", {"op": "facts"})
    targets = {line.split()[4]: line.split()[5] for line in facts["mountinfo"]}
    for path in ("/proc/kcore", "/proc/keys", "/proc/timer_list", "/proc/sched_debug"):
        _, _, r = worker.call("probe", {"op": "read", "path": path})
        if r.get("errno") == "ENOENT":
            continue  # this kernel has no such file
        assert r == {"ok": True, "value": ""}, (path, r)  # /dev/null behind it
        assert path in targets
    # Masked by /dev/null: a write goes nowhere (and as nobody it is refused anyway).
    _, _, r = worker.call("probe", {"op": "write", "path": "/proc/sysrq-trigger", "data": "h"})
    assert r in ({"ok": True, "value": 1}, {"ok": False, "errno": "EACCES"},
                 {"ok": False, "errno": "ENOENT"}), r  # ENOENT: a kernel without SysRq
    _, _, r = worker.call("probe", {"op": "listdir", "path": "/proc/acpi"})
    assert r["ok"] is False or r["value"] == []
    assert targets["/proc/sys"].startswith("ro")
    _, _, r = worker.call("probe", {"op": "exists", "path": "/sys/kernel"})
    assert r is False


@pytest.mark.parametrize("module, draw", [
    # Shells are forked without Python's after-fork hooks, and reseeded.
    ("random", "random.random()"),
    # OpenSSL notices a fork by a change of pid, and every sandbox is pid 1
    # like its zygote: built there, its generator would be everyone's.
    ("ssl", "ssl.RAND_bytes(16).hex()"),
])
def test_each_sandbox_draws_its_own_random_numbers(worker, module, draw):
    source = "import %s\ndef handler(event):\n    return %s\n" % (module, draw)
    draws = set()
    for suffix in "abc":
        name = "rand-%s-%s" % (module, suffix)
        worker.add_function(name, source)
        draws.add(worker.call(name, {})[2])
    assert len(draws) == 3


def test_a_handler_and_its_children_see_only_the_platforms_environment(worker):
    # The zygote's LD_BIND_NOW would make every program a handler starts
    # bind all its symbols at load.
    source = ("import os, subprocess\n"
              "def handler(event):\n"
              "    child = subprocess.run(['/usr/bin/env'], capture_output=True, text=True)\n"
              "    return [sorted(os.environ), sorted(v.split('=')[0] for v in child.stdout.split())]\n")
    worker.add_function("environment", source)
    own, child = worker.call("environment", {})[2]
    assert own == ["HOME", "LANG", "PATH", "PYTHONPATH"]
    assert child == own
