"""Attacks made from inside a real sandbox by a hostile handler
(tests/handlers/attacker): each test fails if its attack works.

test_isolation and test_hostile already cover the probe's privileged calls
(mount, unshare, setns, pivot_root...), the fork bomb, floods, the CPU
spinner, the worker's port and the host's loopback, signalling the worker,
writing the rootfs and code, /proc masking and mknod.  These are the rest:
other processes' memory, chroot, other functions' secrets, the worker's
environment, signals, vsock, limits and identities, kernel modules, and
processes left behind after a reply or a timeout."""
import concurrent.futures
import json
import os
import socket
import subprocess
import time
import uuid

import pytest

from conftest import Worker
from sandbox.cgroups import Cgroup
from sandbox.launch import ZYGOTE_ENV


def attack(worker, op, function="attacker", **event):
    status, _, body = worker.call(function, dict(event, op=op))
    assert status == 200, body
    return body


def add_attacker(worker, name, ol_yaml=None):
    """A function of its own running the attacker's code, so that what an
    attack leaves behind stays out of the shared "attacker" sandbox."""
    with open(os.path.join(worker.registry, "attacker", "lambda_func.py")) as f:
        source = f.read()
    d = os.path.join(worker.registry, name)
    os.makedirs(d, exist_ok=True)
    if ol_yaml:
        with open(os.path.join(d, "ol.yaml"), "w") as f:
            f.write(ol_yaml)
    worker.add_function(name, source)


def live_sandboxes(worker, function):
    """The /sandboxes records of the function's live sandboxes."""
    _, _, body = worker.request("GET", "/sandboxes")
    return [s for s in json.loads(body) if s["function"] == function]


def start_time(pid):
    """A process's start time, which tells a pid's reuse apart; None once gone."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except FileNotFoundError:
        return None


@pytest.fixture
def host_process():
    """A process of the host that no sandbox may signal."""
    process = subprocess.Popen(["sleep", "60"])
    yield process
    process.kill()
    process.wait()


def test_ptrace_and_other_processes_memory_are_out_of_reach(worker):
    results = attack(worker, "trace_others")
    # The seccomp filter refuses ptrace and process_vm_* outright.
    for name in ("attach child", "seize child", "traceme", "attach pid 1",
                 "read child memory", "write child memory", "read pid 1 memory"):
        assert results[name] == "EPERM", (name, results)
    # Handlers are not dumpable, so /proc/<pid>/mem of another stays shut,
    # and no fd (pid 1's channel) can be copied out of another.
    assert results["open child /proc/pid/mem"] == "EACCES", results
    assert results["open pid 1 /proc/pid/mem"] == "EACCES", results
    assert results["steal pid 1 channel fd"] == "EPERM", results


def test_chroot_escape_fails_and_the_root_stays_the_sandbox(worker):
    host_paths = [worker.path, worker.registry, os.path.dirname(os.path.abspath(__file__))]
    results = attack(worker, "chroot_escape", host_paths=host_paths)
    assert results["chroot x"] == "EPERM" and results["chroot ."] == "EPERM", results
    # Climbing ".." ends at the sandbox's root, which is its rootfs.
    assert results["cwd"] == "/" and results["olrt"] is True
    assert "ol" in results["root"] and "handler" in results["root"]
    assert "work" not in results["root"]
    assert results["host paths seen"] == []


KEEPER = """import os
CODE_SECRET = %r
def handler(event):
    for scratch in ("/tmp", "/dev/shm"):
        with open(os.path.join(scratch, event["secret"]), "w") as f:
            f.write(event["secret"])
    return "kept"
"""


def test_another_functions_code_and_scratch_cannot_be_found(worker):
    code_secret, scratch_secret = ("secret-%s" % uuid.uuid4().hex for _ in range(2))
    keeper = "keeper-%s" % uuid.uuid4().hex[:8]
    keeper_dir = worker.add_function(keeper, KEEPER % code_secret)
    assert worker.call(keeper, {"secret": scratch_secret})[::2] == (200, "kept")
    # The keeper's sandbox is alive, with its secret in its /tmp.
    (sandbox,) = live_sandboxes(worker, keeper)
    pid = sandbox["pid"]
    with open("/proc/%d/root/tmp/%s" % (pid, scratch_secret)) as f:
        assert f.read() == scratch_secret
    # A string of its own code, as a control: the search does read contents.
    control = "def handler(event):"
    results = attack(worker, "search", secrets=[code_secret, scratch_secret, control],
                     paths=[keeper_dir, worker.registry])
    assert results["hits"][code_secret] == [] and results["hits"][scratch_secret] == [], \
        results["hits"]
    assert "/handler/lambda_func.py" in results["hits"][control]
    assert results["paths seen"] == []


def test_the_workers_environment_does_not_reach_handlers(own_worker):
    name, secret = "OL_ATTACK_SECRET", "olsecret%s" % uuid.uuid4().hex
    # The worker inherits the environment of `admin workers`, so of this process.
    os.environ[name] = secret
    try:
        w = own_worker()
    finally:
        del os.environ[name]
    with open(os.path.join(w.path, "workers", str(w.port), "pid")) as f:
        worker_pid = int(f.read())
    with open("/proc/%d/environ" % worker_pid) as f:
        assert secret in f.read()  # the worker has it: the test means something
    results = attack(w, "environments",
                     patterns=["olsecret[0-9a-f]{32}", "PYTHONPATH=/o[l]"])
    # The zygote's own, less what only its dynamic linker needed.
    assert results["environ"] == {k: v for k, v in ZYGOTE_ENV.items() if k != "LD_BIND_NOW"}
    for path, text in results["files"].items():
        assert secret not in text and name not in text, path
    assert "/proc/1/environ" in results["files"]
    # Nor anywhere in its memory, which the zygote's exec left clean; the
    # environment the handler does have is found, so the scan works.
    assert results["memory"]["olsecret[0-9a-f]{32}"] == []
    assert results["memory"]["PYTHONPATH=/o[l]"] == ["PYTHONPATH=/ol"]


def test_killing_pid_1_from_a_child_does_not_stop_the_call(worker):
    add_attacker(worker, "attacker-pid1")
    first = attack(worker, "kill_pid_1", function="attacker-pid1")
    # kill() says yes, but pid 1 of a namespace ignores SIGKILL sent from inside it.
    assert first["kill"] == "succeeded"
    again = attack(worker, "kill_pid_1", function="attacker-pid1")
    assert again["hostname"] == first["hostname"]  # the same sandbox, still alive


def test_kill_minus_1_reaches_only_the_sandbox(worker, host_process):
    marker = "neighbour-%s" % uuid.uuid4().hex
    _, _, r = worker.call("probe", {"op": "write", "path": "/tmp/" + marker, "data": "alive"})
    assert r["ok"] is True
    add_attacker(worker, "attacker-killall")
    results = attack(worker, "kill_everyone", function="attacker-killall")
    # It did kill what it could: its sibling in the sandbox, not pid 1.
    assert results["kill"] == "succeeded" and results["sleeper"] == 9, results
    assert attack(worker, "kill_pid_1", function="attacker-killall")["hostname"] \
        == results["hostname"]
    # Nothing outside: the host, the worker, another function's sandbox.
    assert host_process.poll() is None
    assert worker.request("GET", "/status")[0] == 200
    _, _, r = worker.call("probe", {"op": "read", "path": "/tmp/" + marker})
    assert r == {"ok": True, "value": "alive"}
    assert worker.call("hello", {"name": "after"})[2] == "Hello, after!"


def test_signals_cannot_reach_a_host_process(worker, host_process):
    results = attack(worker, "signal_outside", pid=host_process.pid)
    # Not in the sandbox's pid namespace: for the handler it does not exist.
    assert results == {"visible": False, "signal 0": "ESRCH", "SIGKILL": "ESRCH",
                       "pidfd_open": "ESRCH"}
    assert host_process.poll() is None


@pytest.fixture
def host_vsock_port():
    """A vsock port that a host process holds."""
    try:
        sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
    except (AttributeError, OSError):
        pytest.skip("this host has no vsock")
    with sock:
        sock.bind((socket.VMADDR_CID_ANY, socket.VMADDR_PORT_ANY))
        yield sock.getsockname()[1]


def test_vsock_does_not_lead_out_of_the_sandbox(worker, host_vsock_port):
    # vsock is not part of the network namespace (one port space per
    # machine, unless the kernel says otherwise): a sandbox that shares it
    # can talk to the hypervisor (CID 2) and to this machine's vsock
    # services, whatever its network.  Refusing the socket, or a port
    # space of its own, closes that way out.
    results = attack(worker, "vsock", port=host_vsock_port)
    refused = results["socket"] in ("EPERM", "EAFNOSUPPORT", "EACCES")
    assert refused or results["bind"] == "succeeded", results  # its own port space


def test_limits_cannot_be_raised(worker):
    results = attack(worker, "raise_limits")
    assert results and all(result == "EPERM" for result in results.values()), results
    assert "RLIMIT_CORE above hard" in results  # its hard limit is 1, so it was tried


def test_cannot_become_root_or_anyone_else(worker):
    results = attack(worker, "become_someone_else")
    # In its user namespace only its own uid and gid exist: any other is
    # invalid there, root included.
    for name in ("setuid 0", "setgid 0", "setresuid 0", "seteuid 0", "setuid 1000"):
        assert results[name] == "EINVAL", (name, results)
    # Its user namespace denies setgroups; capabilities cannot be raised.
    for name in ("setgroups [0]", "setgroups []", "capset all"):
        assert results[name] == "EPERM", (name, results)


def test_kernel_modules_cannot_be_loaded_or_removed(worker):
    assert attack(worker, "load_modules") == {
        "init_module": "EPERM", "finit_module": "EPERM", "delete_module": "EPERM"}


def test_threads_and_grandchildren_stop_between_calls(worker):
    add_attacker(worker, "attacker-linger")
    left = attack(worker, "leave_behind", function="attacker-linger")
    replied = time.time()
    time.sleep(1.0)  # idle: frozen after 100 ms
    asked = time.time()
    trail = attack(worker, "read_trail", function="attacker-linger")
    assert trail["hostname"] == left["hostname"]  # warm: the same sandbox
    writers = {who for who, _ in trail["stamps"]}
    assert writers == {"thread", "grandchild"}  # both ran after the call...
    # ...but nothing ran while the sandbox was idle.  (Thawed for the
    # second call, they go on: anything from `asked` on is theirs.)
    idle = [(who, t - replied) for who, t in trail["stamps"] if replied + 0.5 < t < asked]
    assert idle == []


def cgroup_of(pid):
    with open("/proc/%d/cgroup" % pid) as f:
        paths = dict(line.split(":", 2)[1:] for line in f.read().splitlines())
    return Cgroup(paths.get("memory") or paths[""])


def processes_while_hanging(watcher, function):
    """(host pid, start time) of every process in the function's sandbox,
    once its "hang" call has left its grandchild behind."""
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        for sandbox in live_sandboxes(watcher, function):  # none until its cold start
            if sandbox["pid"] and os.path.exists("/proc/%d/root/tmp/hanging" % sandbox["pid"]):
                return {(pid, start_time(pid)) for pid in cgroup_of(sandbox["pid"]).pids()}
        time.sleep(0.02)
    raise AssertionError("%s never got to hang" % function)


def test_a_timeout_leaves_no_process_of_the_sandbox_behind(worker):
    add_attacker(worker, "attacker-hang", ol_yaml="limits: {runtime_sec: 1}\n")
    watcher = Worker(worker.path, worker.port)  # the call holds the other connection
    try:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            call = pool.submit(worker.call, "attacker-hang", {"op": "hang"})
            processes = processes_while_hanging(watcher, "attacker-hang")
            status, _, body = call.result(timeout=10)
    finally:
        watcher.conn.close()
    assert status == 504 and body["errorType"] == "Sandbox.Timedout", body
    assert len(processes) == 2  # the handler and its grandchild (its child has exited)
    deadline = time.monotonic() + 2  # killed at once; reaped a moment later
    while time.monotonic() < deadline and any(start_time(pid) == started
                                              for pid, started in processes):
        time.sleep(0.02)
    survivors = [pid for pid, started in processes if start_time(pid) == started]
    assert survivors == []
