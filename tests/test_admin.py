"""bin/admin end to end: the quickstart, flag forms, bad input, and cleanup
after `kill`, also when the worker was SIGKILLed."""
import concurrent.futures
import json
import os
import re
import resource
import shutil
import signal
import socket
import subprocess
import time

import pytest

from conftest import ADMIN, REPO, Worker, admin, cluster_leftovers, free_port, start_cluster

from sandbox.cgroups import Cgroup
from worker.cluster import Cluster


def port_free(port):
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the worker binds
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def curl(*args):
    return subprocess.run(["curl", "-sS", *args], capture_output=True, text=True, timeout=30)


def worker_pid(w):
    with open(os.path.join(w.path, "workers", str(w.port), "pid")) as f:
        return int(f.read())


def wait_gone(pid, timeout=5):
    """Until `pid` is gone (reaped, by init for a daemon)."""
    deadline = time.monotonic() + timeout
    while os.path.exists("/proc/%d" % pid):
        assert time.monotonic() < deadline, "pid %d still there after %s s" % (pid, timeout)
        time.sleep(0.02)


@pytest.mark.skipif(not port_free(8080), reason="port 8080 is in use on this host")
def test_quickstart_exactly_as_in_the_readme(tmp_path):
    """The README's commands, copied, from a fresh directory."""
    run = lambda cmd: subprocess.run(cmd, shell=True, cwd=tmp_path, capture_output=True,
                                     text=True, timeout=90)
    os.symlink(os.path.join(REPO, "bin"), tmp_path / "bin")
    os.symlink(os.path.join(REPO, "quickstart"), tmp_path / "quickstart")
    try:
        assert run("./bin/admin new -cluster my-cluster").returncode == 0
        assert run("./bin/admin workers -cluster=my-cluster").returncode == 0
        status = run("./bin/admin status -cluster=my-cluster")
        assert status.returncode == 0
        assert status.stdout.startswith(
            "Worker Pings:\n  http://localhost:8080/status => ready [200 OK]\n\n"
            "Cluster containers:\n")
        assert run("cp -r ./quickstart/handlers/hello ./my-cluster/registry/hello").returncode == 0
        hello = run("""curl -X POST localhost:8080/runLambda/hello -d '{"name": "Alice"}'""")
        assert hello.stdout == '"Hello, Alice!"'
        status = run("./bin/admin status -cluster=my-cluster").stdout
        line = status.split("Cluster containers:\n")[1].splitlines()[0].split()
        assert re.fullmatch(r"8080/sb-\d+", line[0]), line
        assert line[1:4] == ["hello", "idle", "pid"] and line[4].isdigit(), line
        assert line[5] == "uid" and int(line[6]) >= 65536, line
        assert line[7:] == ["network", "isolated"], line
    finally:
        killed = run("./bin/admin kill -cluster=my-cluster")
    assert killed.returncode == 0, killed.stderr
    assert cluster_leftovers(tmp_path / "my-cluster") == []


@pytest.mark.parametrize("form", ["-cluster DIR", "-cluster=DIR", "--cluster DIR", "--cluster=DIR"])
def test_cluster_flag_forms_relative_and_absolute(tmp_path, form):
    for path in ("rel", str(tmp_path / "abs")):
        args = form.replace("DIR", path).split()
        done = admin("new", *args, cwd=tmp_path)
        assert os.path.isfile(os.path.join(tmp_path, path, "config", "template.json")), done.stdout


def test_new_makes_the_layout_and_refuses_an_existing_dir(tmp_path):
    d = tmp_path / "c"
    admin("new", "-cluster", d)
    for sub in ("registry", "logs", "workers", "config/template.json"):
        assert (d / sub).exists(), sub
    template = json.loads((d / "config" / "template.json").read_text())
    assert template["limits"]["mem_mb"] > 0 and os.path.isabs(template["rootfs"])
    (d / "registry" / "mine").mkdir()
    done = admin("new", "-cluster", d, check=False)
    assert done.returncode == 1 and "already exists" in done.stderr
    assert (d / "registry" / "mine").is_dir()  # untouched
    other = tmp_path / "file"
    other.write_text("keep me")
    done = admin("new", "-cluster", other, check=False)
    assert done.returncode == 1 and "already exists (as a file, not a cluster)" in done.stderr
    assert other.read_text() == "keep me"
    # The command it suggests can be pasted, spaces and all.
    spaced = tmp_path / "sp ace"
    missing = admin("status", "-cluster", spaced, check=False).stderr
    assert missing.endswith("(create one with: admin new -cluster '%s')\n" % spaced), missing
    line = admin("new", "-cluster", spaced).stdout.splitlines()[-1]
    assert line.endswith(" workers -cluster='%s'" % spaced), line
    # A typo in a parent's name makes no tree of directories.
    done = admin("new", "-cluster", tmp_path / "typo" / "c", check=False)
    assert done.returncode == 1 and "its parent directory %s does not exist" % (
        tmp_path / "typo") in done.stderr
    assert not (tmp_path / "typo").exists()


@pytest.mark.parametrize("command", ["workers", "status", "kill", "setconf"])
def test_missing_or_invalid_cluster_is_one_line_and_status_1(tmp_path, command):
    extra = ['{"a": 1}'] if command == "setconf" else []
    a_file = tmp_path / "file"
    a_file.write_text("")
    for target in (tmp_path / "missing", tmp_path, a_file):  # tmp_path exists but is no cluster
        done = admin(command, "-cluster=%s" % target, *extra, check=False)
        assert done.returncode == 1
        assert done.stderr.count("\n") == 1 and done.stderr.startswith("admin: ")
        assert "Traceback" not in done.stderr
        assert ("not a directory" in done.stderr) == (target == a_file)


def test_invalid_template_is_one_line_and_does_not_stop_kill_or_status(own_worker):
    w = own_worker()
    template = os.path.join(w.path, "config", "template.json")
    with open(template, "w") as f:
        f.write("{not json")
    done = admin("workers", "-cluster", w.path, "-p", free_port(), check=False)
    assert done.returncode == 1 and done.stderr.count("\n") == 1 and "template.json" in done.stderr
    assert "=> ready [200 OK]" in admin("status", "-cluster", w.path).stdout
    admin("kill", "-cluster", w.path)  # the running worker goes, and all it made
    assert cluster_leftovers(w.path) == []


def test_kill_and_status_find_the_workers_of_a_cluster_whose_template_was_deleted(own_worker):
    w = own_worker()
    os.unlink(os.path.join(w.path, "config", "template.json"))
    assert "=> ready [200 OK]" in admin("status", "-cluster", w.path).stdout
    admin("kill", "-cluster", w.path)
    assert cluster_leftovers(w.path) == []


def test_two_workers_commands_racing_for_a_port_start_one_worker(tmp_path):
    d, port = tmp_path / "c", free_port()
    admin("new", "-cluster", d)
    try:
        racers = [subprocess.Popen([ADMIN, "workers", "-cluster", str(d), "-p", str(port)],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                  for _ in range(2)]
        outs = [r.communicate(timeout=60) for r in racers]
        assert [r.returncode for r in racers] == [0, 0], outs
        said = sorted(out for out, _ in outs)
        assert said[0].startswith("worker on port %d is already running (pid " % port), said
        assert said[1].startswith("worker ready on "), said
        assert "=> ready [200 OK]" in admin("status", "-cluster", d).stdout
    finally:
        admin("kill", "-cluster", d)
    assert cluster_leftovers(d) == []


def test_setconf_needs_the_rootfs_only_when_it_changes_it(tmp_path):
    """A cluster made before `make` built the default rootfs can still be
    configured: given another port, say."""
    d = tmp_path / "c"
    admin("new", "-cluster", d)
    template = d / "config" / "template.json"
    missing = str(tmp_path / "not-built-yet")
    _set_rootfs_by_hand(d, missing)
    admin("setconf", "-cluster", d, '{"port": 7391}')
    assert json.loads(template.read_text())["port"] == 7391
    done = admin("setconf", "-cluster", d, json.dumps({"rootfs": missing + "2"}), check=False)
    assert done.returncode == 2 and "does not exist" in done.stderr, done.stderr


def test_a_template_needs_only_the_keys_it_changes(tmp_path):
    d = tmp_path / "c"
    admin("new", "-cluster", d)
    (d / "config" / "template.json").write_text("{}")
    try:
        admin("workers", "-cluster", d, "-p", free_port())
    finally:
        admin("kill", "-cluster", d)
    assert cluster_leftovers(d) == []


def test_new_refuses_a_rootfs_that_is_not_there(tmp_path):
    for rootfs in (tmp_path / "no-such-rootfs", tmp_path / "rootfs.zip"):
        done = admin("new", "-cluster", tmp_path / "c", "-rootfs", rootfs, check=False)
        assert done.returncode == 1 and done.stderr.count("\n") == 1, done.stderr
        assert str(rootfs) in done.stderr and not os.path.exists(tmp_path / "c")


def test_help_on_each_command():
    for command in ("new", "workers", "status", "kill", "setconf", "worker-exec"):
        done = admin(command, "--help")
        assert done.stdout.startswith("usage: admin " + command)
    assert admin("--help").returncode == 0
    assert admin("frobnicate", check=False).returncode == 2


def test_setconf_merges_and_validates(tmp_path):
    d = tmp_path / "c"
    admin("new", "-cluster", d)
    admin("setconf", "-cluster", d, '{"limits": {"mem_mb": 512}, "max_sandboxes": 7}')
    template = json.loads((d / "config" / "template.json").read_text())
    assert template["limits"]["mem_mb"] == 512 and template["limits"]["procs"] == 64
    assert template["max_sandboxes"] == 7
    for bad in ('{"limits": {"mem_mb": -1}}', '{"nonsense": 1}',
                '{"host": "nonsense host"}', '{"rootfs": "/nonexistent"}', '{"port": 70000}',
                '{"cluster": "/etc"}', '{"limits": {"mem_mb": 1}}', '{"egress": {"spare": 1000}}',
                '{"limits": {"request_kb": 10000000}}', '{"rootfs": ""}',
                '{"limits": {"procs": 99999999999}}', '{"limits": {"runtime_sec": %d}}' % 10 ** 23,
                '{"limits": {"scratch_mb": %d}}' % 10 ** 23, '{"max_sandboxes": "many"}'):
        done = admin("setconf", "-cluster", d, bad, check=False)
        # A bad value is a bad argument, as bad JSON is: 2.
        assert done.returncode == 2 and done.stderr.count("\n") == 1, (bad, done.stderr)
        assert done.stderr.endswith("; nothing was changed\n"), done.stderr
    for not_an_object in ("[1]", "{oops"):
        done = admin("setconf", "-cluster", d, not_an_object, check=False)
        assert done.returncode == 2 and done.stderr.count("\n") == 1, not_an_object
    assert json.loads((d / "config" / "template.json").read_text()) == template
    done = admin("setconf", "-cluster", d, '{"limits": {"runtime_sec": %d}}' % 10 ** 23,
                 check=False)
    assert "limits.runtime_sec must be at most 86400, not 1" in done.stderr, done.stderr


def _set_rootfs_by_hand(cluster, rootfs):
    """A template whose rootfs is missing, as setconf would never write it."""
    template = json.loads((cluster / "config" / "template.json").read_text())
    template["rootfs"] = str(rootfs)
    (cluster / "config" / "template.json").write_text(json.dumps(template))


def test_setconf_on_a_template_invalid_before_fails_not_as_a_usage_error(tmp_path):
    d = tmp_path / "c"
    admin("new", "-cluster", d)
    template = d / "config" / "template.json"
    template.write_text(json.dumps(dict(json.loads(template.read_text()), max_sandboxes=0)))
    done = admin("setconf", "-cluster", d, '{"port": 9000}', check=False)
    assert done.returncode == 1 and "max_sandboxes must be a positive integer" in done.stderr
    assert done.stderr.count("\n") == 1


def test_setconf_null_puts_a_key_back_to_its_default(tmp_path):
    d = tmp_path / "c"
    admin("new", "-cluster", d)
    admin("setconf", "-cluster", d, '{"port": 9123, "max_connections": 9, "uid_base": 200000, '
                                    '"limits": {"mem_mb": 512, "procs": 8}}')
    admin("setconf", "-cluster", d, '{"port": null, "max_connections": null, "uid_base": null, '
                                    '"limits": {"mem_mb": null}}')
    template = json.loads((d / "config" / "template.json").read_text())
    assert not {"port", "max_connections", "uid_base"} & set(template), template
    assert template["limits"]["procs"] == 8 and "mem_mb" not in template["limits"]
    assert "null" in admin("setconf", "--help").stdout


def test_setconf_json_nested_too_deeply_is_one_line(tmp_path):
    d = tmp_path / "c"
    admin("new", "-cluster", d)
    for depth in (40, 5000):  # refused by admin, and by the JSON decoder itself
        done = admin("setconf", "-cluster", d, '{"limits": ' * depth + "1" + "}" * depth,
                     check=False)
        assert done.returncode == 2, done.stderr
        assert done.stderr == "admin: setconf: not valid JSON: nested too deeply\n"
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 5000 + "]" * 5000)
    done = admin("worker-exec", "-c", deep, check=False)
    assert done.returncode == 1
    assert done.stderr == "admin: config %s is not valid JSON: nested too deeply\n" % deep
    (d / "config" / "template.json").write_text("[" * 5000 + "]" * 5000)
    done = admin("workers", "-cluster", d, check=False)
    assert done.returncode == 1 and done.stderr.endswith("nested too deeply\n"), done.stderr


def test_too_many_workers_is_a_usage_error_about_n(tmp_path):
    done = admin("workers", "-cluster", tmp_path, "-n", 100000, "-p", 8090, check=False)
    assert done.returncode == 2
    assert done.stderr == "admin: -n must be a number of workers from 1 to 65535, not 100000\n"


def test_a_cluster_path_that_is_not_utf8_is_refused_in_one_line(tmp_path):
    bad = os.fsencode(str(tmp_path)) + b"/bad\xffname"
    shown = str(tmp_path) + "/bad\\xffname"
    run = lambda *args: subprocess.run([ADMIN, *args], capture_output=True, text=True,
                                       timeout=30)
    done = run("new", "-cluster", bad)
    assert done.returncode == 1 and done.stderr == (
        "admin: create cluster %s: a cluster path must be valid UTF-8 (it goes into JSON "
        "configs and cgroup names)\n" % shown)
    assert not os.path.lexists(bad)
    os.makedirs(bad + b"/config")  # as `new` made one before
    with open(bad + b"/config/template.json", "w") as f:
        f.write("{}")
    for args in (["workers", "-p", str(free_port())], ["status"], ["kill"], ["setconf", "{}"]):
        done = run(args[0], "-cluster", bad, *args[1:])
        assert done.returncode == 1 and done.stderr.startswith(
            "admin: open cluster %s: a cluster path must be valid UTF-8" % shown), done.stderr
        assert done.stderr.count("\n") == 1, done.stderr


def test_a_cluster_path_with_a_control_character_is_refused_in_one_line(tmp_path):
    """No worker could start in it (a cgroup's name cannot hold a newline),
    and it would break every message naming it over two lines."""
    bad = str(tmp_path) + "/n\nl"
    done = admin("new", "-cluster", bad, check=False)
    assert done.returncode == 1 and done.stderr == (
        "admin: create cluster %s/n\\nl: a cluster path must not hold control characters (a "
        "newline, a tab...): it names the cluster's cgroups\n" % tmp_path)
    assert not os.path.lexists(bad)


def test_worker_exec_on_a_port_in_use_says_to_set_another_port(tmp_path):
    d = tmp_path / "c"
    admin("new", "-cluster", d)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        admin("setconf", "-cluster", d, json.dumps({"port": taken.getsockname()[1]}))
        done = admin("worker-exec", "-c", d / "config" / "template.json", check=False)
    assert done.returncode == 1 and done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.endswith("is in use by another process (another cluster's worker?); "
                                "set another `port` in %s\n" % (d / "config" / "template.json"))
    assert not os.listdir(d / "workers")


def test_workers_on_a_port_in_use_is_refused_in_one_line(tmp_path):
    """Another process (another cluster's worker) on the port would answer
    the readiness check: the port is refused before anything starts."""
    d = tmp_path / "c"
    admin("new", "-cluster", d)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        done = admin("workers", "-cluster", d, "-p", taken.getsockname()[1], check=False)
    assert done.returncode == 1 and "is in use" in done.stderr, done.stderr
    assert done.stderr.endswith("; pick another with -p\n"), done.stderr
    assert done.stderr.count("\n") == 1 and not os.listdir(d / "workers")


def test_workers_twice_starts_nothing_twice(own_worker):
    w = own_worker()
    pid = open(os.path.join(w.path, "workers", str(w.port), "pid")).read().strip()
    done = admin("workers", "-cluster=" + w.path, "-p", w.port)
    assert "already running" in done.stdout and pid in done.stdout
    assert open(os.path.join(w.path, "workers", str(w.port), "pid")).read().strip() == pid


def test_a_proxy_in_the_environment_is_not_asked_for_the_local_pings(tmp_path):
    d, port = cluster_on_a_free_port(tmp_path)
    with socket.socket() as dead:  # a proxy that never answers: nothing listens
        dead.bind(("127.0.0.1", 0))
        proxy = "http://127.0.0.1:%d" % dead.getsockname()[1]
        env = dict(os.environ, http_proxy=proxy, HTTP_PROXY=proxy)
        run = lambda *args: subprocess.run([ADMIN, *map(str, args)], capture_output=True,
                                           text=True, env=env, timeout=90)
        try:
            started = run("workers", "-cluster", d)
            assert started.returncode == 0, started.stderr
            status = run("status", "-cluster", d)
            assert "/status => ready [200 OK]" in status.stdout, status.stdout + status.stderr
        finally:
            killed = run("kill", "-cluster", d)
    assert killed.returncode == 0, killed.stderr
    assert cluster_leftovers(d) == []


def test_status_says_a_stopped_worker_runs_but_does_not_answer(own_worker):
    w = own_worker()
    pid = worker_pid(w)
    os.kill(pid, signal.SIGSTOP)
    try:
        done = admin("status", "-cluster", w.path, check=False, timeout=30)
    finally:
        os.kill(pid, signal.SIGCONT)
    assert "/status => running (pid %d) but not answering (timed out)" % pid in done.stdout, \
        done.stdout
    assert done.returncode == 1 and done.stderr == "admin: 1 of 1 worker(s) not answering\n"


def test_the_commands_that_find_workers_need_root(own_worker):
    w = own_worker()
    for command in ("status", "kill", "workers"):
        done = subprocess.run(["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups",
                               "/usr/bin/python3", ADMIN, command, "-cluster", w.path],
                              capture_output=True, text=True, timeout=30)
        assert (done.returncode, done.stdout) == (1, ""), done
        assert done.stderr.startswith("admin: %s: run as root (" % command), done.stderr
    assert w.call("hello", {"name": "still"})[2] == "Hello, still!"


def test_several_workers(tmp_path):
    d = str(tmp_path / "multi")
    admin("new", "-cluster", d)
    shutil.copytree(os.path.join(REPO, "quickstart/handlers/hello"), d + "/registry/hello")
    port = free_port()
    while not port_free(port + 1):
        port = free_port()
    admin("setconf", "-cluster", d, json.dumps({"port": port}))
    try:
        admin("workers", "-cluster", d, "-n", 2)  # from the template's port
        for p in (port, port + 1):
            assert curl("-X", "POST", "localhost:%d/run/hello" % p, "-d", '{"name": "N"}'
                        ).stdout == '"Hello, N!"'
        status = admin("status", "-cluster", d).stdout
        assert status.count("=> ready [200 OK]") == 2
    finally:
        admin("kill", "-cluster", d)
    assert cluster_leftovers(d) == []
    admin("setconf", "-cluster", d, json.dumps({"port": 65535}))
    done = admin("workers", "-cluster", d, "-n", 2, check=False)
    assert done.returncode == 1 and "past port 65535" in done.stderr


def test_worker_failing_to_start_is_reported(tmp_path):
    d = tmp_path / "c"
    admin("new", "-cluster", d)
    _set_rootfs_by_hand(d, tmp_path / "no-such-rootfs")
    done = admin("workers", "-cluster", d, "-p", free_port(), check=False)
    assert done.returncode == 1
    assert "no-such-rootfs" in done.stderr and "does not exist" in done.stderr
    assert cluster_leftovers(d) == []


def test_a_registry_that_is_no_directory_stops_the_worker_at_start(tmp_path):
    d = tmp_path / "c"
    admin("new", "-cluster", d)
    (d / "registry").rmdir()
    (d / "registry").write_text("not a directory\n")
    done = admin("workers", "-cluster", d, "-p", free_port(), check=False)
    assert done.returncode == 1 and "registry %s is not a directory" % (d / "registry") \
        in done.stderr, done.stderr
    assert cluster_leftovers(d) == []


def test_kill_cleans_up_after_a_sigkilled_worker(own_worker):
    w = own_worker()
    for name in ("hello", "probe"):
        assert w.call(name, {"op": "echo", "name": "x"})[0] == 200
    pid = worker_pid(w)
    os.kill(pid, signal.SIGKILL)
    wait_gone(pid)
    done = admin("kill", "-cluster=" + w.path)
    assert "removed the record of the worker on port %d, which was not running" % w.port \
        in done.stdout
    assert "no workers, sandboxes, cgroups or networks left" in done.stdout
    assert cluster_leftovers(w.path) == []
    assert os.listdir(os.path.join(w.path, "workers")) == []  # its record and its lock


def test_worker_restart_after_sigkill_takes_over(own_worker):
    w = own_worker()
    assert w.call("hello", {"name": "a"})[0] == 200
    pid = worker_pid(w)
    os.kill(pid, signal.SIGKILL)
    time.sleep(0.2)
    w.conn = None
    admin("workers", "-cluster=" + w.path, "-p", w.port)
    assert w.call("hello", {"name": "b"})[2] == "Hello, b!"


def cluster_on_a_free_port(tmp_path):
    """(a new cluster's directory, the free port its template names)."""
    d = tmp_path / "c"
    admin("new", "-cluster", d)
    port = free_port()
    admin("setconf", "-cluster", d, json.dumps({"port": port}))
    return d, port


def worker_exec(d, **popen):
    """`admin worker-exec` on the cluster's template, its output piped."""
    return subprocess.Popen([ADMIN, "worker-exec", "-c", str(d / "config" / "template.json")],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)


def wait_until_ready(port, proc=None):
    deadline = time.monotonic() + 30
    while curl("-f", "localhost:%d/status" % port).stdout != "ready":
        assert time.monotonic() < deadline and (proc is None or proc.poll() is None)
        time.sleep(0.05)


# SIGHUP: its terminal closed (an ssh session ended, say).
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGHUP])
def test_worker_exec_runs_in_the_foreground_and_stops_on_ctrl_c_or_a_hangup(tmp_path, sig):
    d, port = cluster_on_a_free_port(tmp_path)
    shutil.copytree(os.path.join(REPO, "quickstart/handlers/hello"), d / "registry" / "hello")
    proc = worker_exec(d)
    try:
        wait_until_ready(port, proc)
        assert curl("-X", "POST", "localhost:%d/run/hello" % port, "-d", "{}").stdout == \
            '"Hello, world!"'
        # Recorded as a background worker is: `status` lists it.
        assert "localhost:%d/status => ready [200 OK]" % port in admin("status", "-cluster", d).stdout
    finally:
        proc.send_signal(sig)
        out, _ = proc.communicate(timeout=15)
    assert proc.returncode == 0, out
    assert "stopped" in out and "Traceback" not in out
    assert cluster_leftovers(d) == []
    assert os.listdir(d / "workers") == []  # its record and its lock went


def test_ctrl_c_before_the_worker_has_loaded_stops_it_quietly(tmp_path):
    """`admin worker-exec` execs the worker with SIGINT blocked: one pressed
    while the interpreter starts and the worker's modules load ends it with
    130 and no traceback, as one pressed later does with 0."""
    d, _ = cluster_on_a_free_port(tmp_path)
    proc = subprocess.Popen(
        [os.path.join(REPO, ".venv", "bin", "python"), "-m", "worker", "-c",
         str(d / "config" / "template.json")], cwd=REPO, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True,
        preexec_fn=lambda: signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT}))
    try:
        proc.send_signal(signal.SIGINT)  # pending from its first instruction
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait()
    assert proc.returncode == 130 and out == ""
    assert cluster_leftovers(d) == []


def test_kill_stops_a_foreground_worker_before_it_removes_the_cgroups(tmp_path):
    d, port = cluster_on_a_free_port(tmp_path)
    proc = worker_exec(d)
    try:
        wait_until_ready(port, proc)
        # A second one on its port is refused: the first is recorded.
        again = admin("worker-exec", "-c", d / "config" / "template.json", check=False)
        assert again.returncode == 1 and "already runs on port %d" % port in again.stderr
        assert "stopped worker on port %d" % port in admin("kill", "-cluster", d).stdout
        assert proc.wait(timeout=15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert cluster_leftovers(d) == []


def test_of_two_workers_started_at_once_on_one_port_one_runs_recorded(tmp_path):
    d, port = cluster_on_a_free_port(tmp_path)
    procs = [worker_exec(d, start_new_session=True) for _ in range(2)]
    try:
        wait_until_ready(port)
        status = admin("status", "-cluster", d).stdout
        assert "localhost:%d/status => ready [200 OK]" % port in status
        pid = int(open(d / "workers" / str(port) / "pid").read())
        assert pid in [p.pid for p in procs if p.poll() is None]
        admin("kill", "-cluster", d)
        for p in procs:
            p.wait(timeout=15)
        out = "".join(p.stdout.read() for p in procs)
        # Refused by admin's checks or, if it got past them, by the worker.
        assert "already runs on port %d" % port in out or "is in use" in out, out
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert cluster_leftovers(d) == []


def test_kill_through_a_symlink_to_the_cluster_stops_its_workers(own_worker, tmp_path):
    w = own_worker()
    pid = worker_pid(w)
    link = tmp_path / "link"
    os.symlink(w.path, link)
    assert "stopped worker on port %d" % w.port in admin("kill", "-cluster", link).stdout
    wait_gone(pid)
    assert cluster_leftovers(w.path) == []


def test_a_worker_stopped_from_outside_admin_takes_its_record_with_it(own_worker):
    w = own_worker()
    pid = worker_pid(w)
    os.kill(pid, signal.SIGTERM)
    wait_gone(pid, 15)
    done = admin("status", "-cluster", w.path)  # exit 0: nothing is missing
    assert "(no workers)" in done.stdout
    assert cluster_leftovers(w.path) == []


def test_status_says_when_a_worker_cannot_list_its_sandboxes(own_worker):
    w = own_worker(max_connections=1)
    assert w.call("hello", {"name": "x"})[0] == 200  # its keep-alive connection is the one
    done = admin("status", "-cluster", w.path, check=False)
    assert done.returncode == 1 and "(none)" not in done.stdout, done.stdout
    assert "the worker has its most connections open" in done.stdout
    assert done.stderr == "admin: 1 of 1 worker(s) not ready; 1 of 1 worker(s) not listing " \
        "their sandboxes\n"


def test_without_zygote_each_sandbox_gets_a_fresh_interpreter(own_worker):
    # The comparison mode the benchmarks use: same sandboxes, no zygote.
    w = own_worker(zygote=False)
    status, headers, body = w.call("hello", {"name": "fresh"})
    assert (status, body) == (200, "Hello, fresh!")
    assert "interpreter;dur=" in headers["server-timing"]
    assert w.call("probe", {"op": "facts"})[2]["pid"] == 1


def test_timeout_is_504_kills_the_sandbox_and_the_next_call_works(own_worker):
    w = own_worker(limits={"runtime_sec": 1})
    w.add_function("slow", "import os, time\n"
                           "def handler(event):\n"
                           "    if event.get('fork') and os.fork() == 0:\n"
                           "        os.execv('/bin/sleep', ['sleep', '61.5'])\n"  # would outlive it
                           "    time.sleep(event['seconds'])\n"
                           "    return 'done'\n")
    start = time.monotonic()
    status, headers, body = w.call("slow", {"seconds": 30, "fork": True})
    elapsed = time.monotonic() - start
    assert status == 504 and body["errorType"] == "Sandbox.Timedout"
    assert body["errorMessage"] == "Task timed out after 1.00 seconds"
    assert 1.0 <= elapsed < 2.0  # within the limit + 1 s
    _, _, sandboxes = w.request("GET", "/sandboxes")
    assert "slow" not in sandboxes.decode()
    assert w.call("slow", {"seconds": 0.1})[::2] == (200, "done")
    # Nothing of the timed-out sandbox survives: not its grandchild either.
    survivors = subprocess.run(["pgrep", "-f", "sleep 61.5"], capture_output=True, text=True)
    assert survivors.stdout == ""
    # The operator reads of it in the worker's log, once for a burst of them.
    for _ in range(3):
        assert w.call("slow", {"seconds": 30})[0] == 504
    with open(os.path.join(w.path, "logs", "worker-%d.log" % w.port)) as f:
        said = [line for line in f if "to 'slow': 504 Sandbox.Timedout" in line]
    assert len(said) == 1 and "Task timed out after 1.00 seconds" in said[0], said


def test_network_isolation_off_shares_the_host_network(own_worker):
    # The comparison setting: it shows that the isolation tests can fail.
    w = own_worker(network_isolation=False)
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        _, _, r = w.call("probe", {"op": "connect", "host": "127.0.0.1", "port": port})
    assert r == {"ok": True, "value": "connected"}
    assert len(w.call("probe", {"op": "interfaces"})[2]) > 1


def test_out_of_memory_is_502_and_the_next_call_works(own_worker):
    w = own_worker(limits={"mem_mb": 64})
    w.add_function("hog", "def handler(event):\n"
                          "    hoard = bytearray(event['mb'] << 20)\n"
                          "    return len(hoard)\n")
    status, headers, body = w.call("hog", {"mb": 200})
    assert status == 502 and body["errorType"] == "Runtime.OutOfMemory", body
    assert "64 MB" in body["errorMessage"]
    assert w.call("hog", {"mb": 8})[::2] == (200, 8 << 20)
    assert w.call("hello", {"name": "zygote"})[2] == "Hello, zygote!"  # the zygote lives
    status, _, body = w.call("probe", {"op": "exit", "code": 9})
    assert body["errorType"] == "Runtime.ExitError"  # a plain exit is not an OOM


def test_ol_yaml_limits_override_the_cluster_and_are_reset_after(own_worker):
    w = own_worker()
    hog = "def handler(event):\n    hoard = bytearray(event['mb'] << 20)\n    return len(hoard)\n"
    d = w.add_function("small", hog)
    with open(os.path.join(d, "ol.yaml"), "w") as f:
        f.write("limits:\n  mem_mb: 48\n  runtime_sec: 1\n  scratch_mb: 2\n")
    status, _, body = w.call("small", {"mb": 100})
    assert status == 502 and body["errorType"] == "Runtime.OutOfMemory", body
    assert "48 MB" in body["errorMessage"]
    w.add_function("small2", open(os.path.join(w.registry, "probe", "lambda_func.py")).read())
    with open(os.path.join(w.registry, "small2", "ol.yaml"), "w") as f:
        f.write("limits:\n  runtime_sec: 1\n  scratch_mb: 2\n")
    _, _, r = w.call("small2", {"op": "write", "path": "/tmp/f", "data": "x" * 1024,
                                 "repeat": 3 << 10})
    assert r == {"ok": False, "errno": "ENOSPC"}  # 3 MB into a 2 MB /tmp
    status, _, body = w.call("small2", {"op": "sleep", "seconds": 5})
    assert status == 504 and "1.00 seconds" in body["errorMessage"]
    # Everything else still has the cluster's limits (256 MB), recycled cgroups included.
    for _ in range(3):
        assert w.call("hello", {"name": "x"})[0] == 200
    w.add_function("big", hog)
    assert w.call("big", {"mb": 100})[::2] == (200, 100 << 20)


def test_ol_yaml_is_read_only_as_a_file_of_its_own(worker, tmp_path):
    """The worker reads ol.yaml as root: a symbolic link (to a host file,
    which an error would quote) and a FIFO (which would block the worker)
    are refused, and nothing of the linked file reaches the caller."""
    secret = tmp_path / "secret"
    secret.write_text("root:$6$not-for-callers:19000:0:99999:7:::\n")
    d = worker.add_function("linkyaml", "def handler(event):\n    return 1\n")
    config = os.path.join(d, "ol.yaml")
    os.symlink(str(secret), config)
    status, _, body = worker.call("linkyaml", {})
    assert status == 500 and body["errorType"] == "Runtime.ConfigError", body
    assert "symbolic link" in body["errorMessage"] and "not-for-callers" not in str(body)
    os.unlink(config)
    os.mkfifo(config)
    status, _, body = worker.call("linkyaml", {})
    assert status == 500 and "not a regular file" in body["errorMessage"], body
    os.unlink(config)
    assert worker.call("linkyaml", {})[::2] == (200, 1)


def test_ol_yaml_merge_keys_are_read_and_overridden_by_the_keys_beside_them(worker):
    d = worker.add_function("merged", "import resource\n"
                                      "def handler(event):\n"
                                      "    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]\n")
    with open(os.path.join(d, "ol.yaml"), "w") as f:
        f.write("limits: {<<: {nofile: 64, mem_mb: 64}, nofile: 80}\n")
    assert worker.call("merged", {})[::2] == (200, 80)


@pytest.mark.parametrize("text,words", [
    ("limits:\n  mem_mb: -1\n", "limits.mem_mb"),
    # Below what the shell holds: not a platform error naming host cgroups.
    ("limits:\n  mem_mb: 1\n", "limits.mem_mb must be at least 16, not 1"),
    ("limits:\n  memory: 5\n", "unknown limits"),
    ("limits: {nofile: 64, nofile: 128}\n", "'nofile' is given twice (line 1, column 22)"),
    ("limits:\n  mem_mb: 64\nlimits:\n  mem_mb: 128\n", "'limits' is given twice (line 3, column 1)"),
    ("limits:\n  request_kb: 5\n", "unknown limits"),
    ("flavour: mint\n", "expected only `limits:` and `egress:`"),
    ("limits: [1\n", "not valid YAML: expected ',' or ']'"),
    ("just a string\n", "expected a mapping"),
    ("limits: [1]\n", "limits must be a mapping of names to values"),
    ("limits: 5\n", "limits must be a mapping of names to values"),
    ("limits: false\n", "limits must be a mapping of names to values"),
    # Past what the kernel takes: not a platform error at each cold start.
    ("limits:\n  procs: 99999999999\n", "limits.procs must be at most 4194304"),
    # Past what all sandboxes together may have (a share of the host's pids).
    ("limits:\n  procs: 4194304\n", "limits.procs (4194304) is above what all sandboxes "
     "together may have ("),
    ("limits:\n  cpu_percent: 99999999999\n", "limits.cpu_percent must be at most 819200"),
    ("limits:\n  runtime_sec: %d\n" % 10 ** 23, "limits.runtime_sec must be at most 86400"),
    ("limits:\n  scratch_mb: %d\n" % 10 ** 23, "limits.scratch_mb must be at most 1073741824"),
    # An alias "bomb": 441 bytes whose value is 10^8 strings; its repr in
    # the message stalled the worker for 14 s and made a 722 MB answer.
    ("limits:\n  mem_mb: &a7 [" + "".join("&a%d [" % i for i in range(6, -1, -1))
     + ", ".join(['"lol"'] * 10) + "]"
     + "".join(", *a%d" % i * 9 + "]" for i in range(7)) + "\n",
     "ol.yaml of function 'badyaml': anchors and aliases are not supported"),
    # Above the worker's own open-file limit (which it inherits from us, at
    # most fs.nr_open): no sandbox could set it.
    ("limits:\n  nofile: %d\n" % min(resource.getrlimit(resource.RLIMIT_NOFILE)[1] + 1, 1 << 20),
     "above the worker's open-file limit"),
])
def test_bad_ol_yaml_is_500_saying_what_is_wrong(worker, text, words):
    d = worker.add_function("badyaml", "def handler(event):\n    return 1\n")
    with open(os.path.join(d, "ol.yaml"), "w") as f:
        f.write(text)
    status, _, body = worker.call("badyaml", {})
    assert status == 500 and body["errorType"] == "Runtime.ConfigError", body
    assert words in body["errorMessage"] and "ol.yaml" in body["errorMessage"]
    os.unlink(os.path.join(d, "ol.yaml"))
    assert worker.call("badyaml", {})[::2] == (200, 1)  # fixed: picked up at once


def test_a_zygote_death_is_a_platform_error_and_idle_slots_come_back(own_worker):
    w = own_worker()
    w.call("hello", {})
    (idle,) = [s for s in json.loads(w.request("GET", "/sandboxes")[2]) if s["function"] == "hello"]
    zygote = Cgroup(Cluster(w.path).worker_cgroup(w.port) + "/zygote").pids()[0]
    other = Worker(w.path, w.port)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        slow = pool.submit(other.call, "probe", {"op": "sleep", "seconds": 5})
        time.sleep(0.5)
        os.kill(zygote, signal.SIGKILL)
        status, _, body = slow.result()
    # Not the function's fault: a platform error, not Runtime.ExitError.
    assert status == 500 and body["errorType"] == "Platform.SandboxError", body
    assert "its zygote" in body["errorMessage"]
    # The idle sandbox died with it and gave its slot back at once.
    listed = [s["id"] for s in json.loads(w.request("GET", "/sandboxes")[2])]
    assert idle["id"] not in listed
    assert w.call("hello", {"name": "again"})[2] == "Hello, again!"  # a new zygote serves


def test_an_idle_sandbox_expires_after_idle_sec_and_a_used_one_does_not(own_worker):
    w = own_worker(idle_sec=1.5)

    def listed():
        return {s["function"]: s for s in json.loads(w.request("GET", "/sandboxes")[2])}
    w.call("hello", {})
    w.call("probe", {"op": "echo"})
    sandbox = listed()["hello"]
    for _ in range(4):  # used every 0.5 s: it stays, warm
        time.sleep(0.5)
        assert w.call("probe", {"op": "echo"})[0] == 200
    assert listed().keys() == {"probe"}  # hello's expired meanwhile
    assert not os.path.exists("/proc/%d" % sandbox["pid"]) or \
        open("/proc/%d/stat" % sandbox["pid"]).read().split()[2] == "Z"
    deadline = time.monotonic() + 5
    while listed() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert listed() == {}
    assert w.call("hello", {"name": "again"})[2] == "Hello, again!"  # a cold start, as usual


def test_kill_of_a_moved_cluster_stops_its_worker(own_worker, tmp_path):
    """The worker is known by the lock file it holds, which follows its
    cluster's directory: not by the path it was started with."""
    w = own_worker()
    pid = worker_pid(w)
    moved = str(tmp_path / "moved")
    os.rename(w.path, moved)
    try:
        assert admin("status", "-cluster", moved).returncode == 0
        assert "stopped worker on port %d (pid %d)" % (w.port, pid) in \
            admin("kill", "-cluster", moved).stdout
        wait_gone(pid)
    finally:
        os.rename(moved, w.path)
    assert cluster_leftovers(w.path) == []


def test_a_killed_workers_port_taken_by_another_cluster_stays_theirs(own_worker, tmp_path):
    """`status` and `kill` of a cluster whose worker was SIGKILLed neither
    report nor tear down the worker another cluster now runs on that port:
    its egress bridge and NAT rules included."""
    a = own_worker(egress={"enabled": True})
    pid = worker_pid(a)
    os.kill(pid, signal.SIGKILL)
    wait_gone(pid)
    b = str(tmp_path / "b")
    admin("new", "-cluster", b)
    admin("setconf", "-cluster", b, json.dumps({"egress": {"enabled": True}}))
    try:
        admin("workers", "-cluster", b, "-p", a.port)
        status = admin("status", "-cluster", a.path, check=False)
        assert status.returncode == 1
        assert "not running" in status.stdout and "ready" not in status.stdout
        admin("kill", "-cluster", a.path)
        assert os.path.exists("/sys/class/net/olbr%d" % a.port)
        assert "openlambda_ol%d" % a.port in subprocess.run(
            ["nft", "list", "tables"], capture_output=True, text=True).stdout
        assert curl("localhost:%d/status" % a.port).stdout == "ready"
    finally:
        admin("kill", "-cluster", b)
    assert cluster_leftovers(b) == []
    assert not os.path.exists("/sys/class/net/olbr%d" % a.port)


def test_egress_on_a_port_whose_network_another_worker_has_is_refused(tmp_path):
    """As when another cluster's worker on that port (at another address)
    has its bridge: this one must not start, nor take them away."""
    from sandbox import filelock
    from sandbox.network import LOCK_DIR, network_lock
    port = free_port()
    os.makedirs(LOCK_DIR, exist_ok=True)
    held = filelock.claim(network_lock(port))
    try:
        d = tmp_path / "c"
        admin("new", "-cluster", d)
        admin("setconf", "-cluster", d, json.dumps({"egress": {"enabled": True}}))
        done = admin("workers", "-cluster", d, "-p", port, check=False)
        assert done.returncode == 1
        assert "another running worker on port %d has it" % port in done.stderr
        assert os.path.exists(network_lock(port))  # still the holder's
    finally:
        filelock.release(network_lock(port), held)
    assert cluster_leftovers(d) == []


def _memory_file(w, v1_name, v2_name):
    cgroup = _sandboxes_cgroup(w)
    name = v2_name if cgroup.mode.name == "v2" else v1_name
    with open(os.path.join(cgroup.limit_dirs()["memory"], name)) as f:
        return int(f.read())


def test_the_sandboxes_together_have_a_memory_limit(own_worker):
    """Without one, 128 sandboxes of 256 MB would take the host into its
    own OOM killer; on v1 their socket buffers also stay below the host's
    TCP pressure threshold, which throttles every socket of the host."""
    from sandbox.cgroups import default_total_mb, host_tcp_pressure_bytes
    w = own_worker()
    assert _memory_file(w, "memory.limit_in_bytes", "memory.max") == default_total_mb() << 20
    w = own_worker(sandboxes_mem_mb=300, limits={"mem_mb": 128})
    assert w.call("hello", {"name": "x"})[0] == 200
    assert _memory_file(w, "memory.limit_in_bytes", "memory.max") == 300 << 20
    if Cgroup("x").mode.name != "v2":
        assert _memory_file(w, "memory.kmem.tcp.limit_in_bytes", "") == \
            min(300 << 20, host_tcp_pressure_bytes() // 2)


def test_the_sandboxes_together_have_a_process_limit(own_worker):
    """Without one, a worker's sandboxes could have (max_sandboxes + 2 x
    pool_size) x limits.procs tasks, 9,216 at the defaults: four workers
    would take every pid of a host with kernel.pid_max 32,768.  Threads a
    sandbox keeps count against the others."""
    from sandbox.cgroups import default_total_procs
    w = own_worker()
    with open(os.path.join(_sandboxes_cgroup(w).limit_dirs()["pids"], "pids.max")) as f:
        assert int(f.read()) == default_total_procs()
    w = own_worker(sandboxes_procs=40, limits={"procs": 30})
    hold = ("import threading, time\n"
            "def handler(event):\n"
            "    started = 0\n"
            "    try:\n"
            "        for _ in range(event['threads']):\n"
            "            threading.Thread(target=time.sleep, args=(30,), daemon=True).start()\n"
            "            started += 1\n"
            "    except RuntimeError:\n"
            "        pass  # can't start new thread: a pids limit\n"
            "    return started\n")
    w.add_function("hold", hold)
    w.add_function("hold2", hold)
    status, _, started = w.call("hold", {"threads": 20})
    assert (status, started) == (200, 20)  # under its own 30
    status, _, started = w.call("hold2", {"threads": 20})
    assert status == 200 and started < 20, started  # the other's 20 count against the 40


def _sandboxes_cgroup(w):
    return Cgroup(Cluster(w.path).worker_cgroup(w.port) + "/sandboxes")


def _at_once(w, name, count):
    """The answers to `count` calls of `name` made at once."""
    with concurrent.futures.ThreadPoolExecutor(count) as pool:
        return list(pool.map(lambda _: Worker(w.path, w.port).call(name, {}), range(count)))


def test_an_oom_kill_at_the_sandboxes_total_says_so(own_worker):
    """Two calls that each fit their own limit, but not the total: the one
    the kernel kills is told which limit it met."""
    w = own_worker(sandboxes_mem_mb=300, limits={"mem_mb": 256})
    w.add_function("hog", "import time\n"
                          "def handler(event):\n"
                          "    hoard = bytearray(200 << 20)\n"
                          "    time.sleep(1)\n"
                          "    return len(hoard)\n")
    answers = _at_once(w, "hog", 2)
    killed = [body for status, _, body in answers if status == 502]
    assert killed and all(b["errorType"] == "Runtime.OutOfMemory" for b in killed), answers
    assert all("all sandboxes together reached their 300 MB" in b["errorMessage"]
               for b in killed), killed


def test_memory_held_in_files_never_gets_the_zygote_oom_killed(own_worker):
    """Memory in a memfd is charged to its sandbox but counts in no
    process's size, by which the OOM killer picks: at the sandboxes' total,
    it had picked the zygote, and every sandbox died with it."""
    w = own_worker(sandboxes_mem_mb=300, limits={"mem_mb": 160})
    w.add_function("filehog", "import os, time\n"
                              "def handler(event):\n"
                              "    for i in range(120):  # under limits.fsize_mb per file\n"
                              "        if i % 40 == 0:\n"
                              "            fd = os.memfd_create('hoard')\n"
                              "        os.write(fd, b'x' * (1 << 20))\n"
                              "    time.sleep(1)\n"
                              "    return 'held'\n")
    answers = _at_once(w, "filehog", 3)
    assert not [a for a in answers if "zygote" in str(a[2])], answers
    assert any(status == 502 and body["errorType"] == "Runtime.OutOfMemory"
               for status, _, body in answers), answers
    assert w.call("hello", {"name": "x"})[0] == 200


def test_idle_sandboxes_holding_memory_in_files_make_room_not_a_busy_neighbour(own_worker):
    """Memory in tmpfs counts in no process's size, by which the kernel's
    OOM killer picks: idle sandboxes that filled their /tmp and /dev/shm
    got a busy neighbour's call killed at the sandboxes' total.  The worker
    destroys idle ones first, those holding most first, once all hold over
    90% of the total, down to 80%."""
    w = own_worker(sandboxes_mem_mb=2000, limits={"mem_mb": 700, "scratch_mb": 320,
                                                  "fsize_mb": 160})
    filler = ("def handler(event):\n"
              "    mib = b'x' * (1 << 20)\n"
              "    for path in ('/tmp/a', '/tmp/b', '/dev/shm/a', '/dev/shm/b'):\n"
              "        with open(path, 'wb') as f:\n"
              "            for _ in range(event['mb']):\n"
              "                f.write(mib)\n"
              "    return 'held'\n")
    for i in range(7):
        w.add_function("filler-%d" % i, filler)
    w.add_function("fat", "def handler(event):\n"
                          "    hoard = bytearray(150 << 20)\n"
                          "    return len(hoard)\n")
    # 7 idle sandboxes holding 1808 MB in files, written 1 MiB at a time:
    # over 90% of the total whatever else the sandboxes and shells hold (22
    # MB of memory the watch counts, here), under 100% while that stays
    # under 190 MB.  One holds 608 of them, so that the others are under 80%
    # without it while the rest is under 400 MB.  (With a total of 1000 MB,
    # 910 of them in files and a 32 MB buffer in the handler writing them,
    # a run once lost a second sandbox as well.)
    for i in range(7):
        assert w.call("filler-%d" % i, {"mb": 152 if i == 3 else 50})[0] == 200

    def fillers():
        return sorted(s["function"] for s in json.loads(w.request("GET", "/sandboxes")[2])
                      if s["function"].startswith("filler"))
    deadline = time.monotonic() + 5
    while len(fillers()) == 7 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert fillers() == ["filler-%d" % i for i in range(7) if i != 3]  # the largest went
    status, _, body = w.call("fat", {})
    assert status == 200, body
    with open(os.path.join(w.path, "logs", "worker-%d.log" % w.port)) as f:
        assert "destroyed 1 idle sandbox(es)" in f.read()


def test_kill_of_a_moved_cluster_whose_worker_was_sigkilled_removes_its_cgroups(own_worker,
                                                                               tmp_path):
    w = own_worker()
    assert w.call("hello", {"name": "x"})[0] == 200
    pid, started_at, moved = worker_pid(w), w.path, str(tmp_path / "moved")
    os.rename(w.path, moved)
    try:
        os.kill(pid, signal.SIGKILL)
        wait_gone(pid)
        admin("kill", "-cluster", moved)
        assert cluster_leftovers(started_at) == []  # named from where it started
    finally:
        os.rename(moved, started_at)


def test_kill_keeps_a_record_until_its_network_is_cleaned_up(own_worker):
    """A network that cannot be removed now (its lock cannot be made, here
    under a read-only /run/openlambda) is one error line, and the next
    `kill` still knows the port."""
    from sandbox.network import LOCK_DIR
    w = own_worker(egress={"enabled": True})
    pid = worker_pid(w)
    os.kill(pid, signal.SIGKILL)
    wait_gone(pid)
    done = subprocess.run(
        ["unshare", "-m", "--propagation", "private", "sh", "-c",
         'mount -t tmpfs -o ro tmpfs "$1" && exec "$2" kill -cluster "$3"', "sh",
         LOCK_DIR, ADMIN, w.path], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and done.stderr.count("\n") == 1, done.stderr
    assert "Read-only file system" in done.stderr and "Traceback" not in done.stderr
    assert os.path.exists("/sys/class/net/olbr%d" % w.port)
    assert str(w.port) in os.listdir(os.path.join(w.path, "workers"))
    admin("kill", "-cluster", w.path)
    assert not os.path.exists("/sys/class/net/olbr%d" % w.port)


def test_a_function_tree_over_the_cap_is_one_config_error_until_made_smaller(worker):
    """No walk of, nor watch on, a huge tree: the call says which function
    and what cap, and the function is served once it is within it."""
    from worker.registry import MAX_DIRS
    d = worker.add_function("bigtree", "def handler(event):\n    return 1\n")
    try:
        for i in range(MAX_DIRS - 1):  # with bigtree and lib: one over
            os.makedirs(os.path.join(d, "lib", str(i)))
        status, _, body = worker.call("bigtree", {})
        assert status == 500 and body["errorType"] == "Runtime.ConfigError", body
        assert body["errorMessage"].startswith(
            "function 'bigtree' has more than %d directories" % MAX_DIRS), body
        os.rmdir(os.path.join(d, "lib", "0"))
        assert worker.call("bigtree", {})[::2] == (200, 1)
    finally:
        shutil.rmtree(d)


def test_a_worker_whose_cluster_is_deleted_stops_and_cleans_up(tmp_path):
    """With its cluster go its lock files: no `admin kill` could find it
    any more.  It stops as on SIGTERM, saying why; a moved cluster's
    worker keeps serving."""
    w = start_cluster(tmp_path)
    pid = worker_pid(w)
    log = open(os.path.join(w.path, "logs", "worker-%d.log" % w.port))  # read once deleted
    try:
        assert w.call("hello", {"name": "x"})[0] == 200  # a sandbox holds its code
        moved = str(tmp_path / "moved")
        os.rename(w.path, moved)
        assert w.call("hello", {"name": "y"})[2] == "Hello, y!"
        shutil.rmtree(moved)
        wait_gone(pid, timeout=20)
        lines = log.read().splitlines()
        gone = [line for line in lines if "is gone" in line]
        assert len(gone) == 1 and gone[0].endswith(
            "registry %s/registry is gone (deleted, or its file system unmounted): stopping, "
            "as on SIGTERM" % w.path), lines[-5:]
        assert lines[-1].endswith("stopped; every sandbox, cgroup and network removed")
        assert "Traceback" not in "\n".join(lines)
    finally:
        log.close()
        if os.path.exists("/proc/%d" % pid):
            os.kill(pid, signal.SIGKILL)
            wait_gone(pid)
        if not os.path.exists(w.path):  # a cluster there again, for `kill` to clean up
            admin("new", "-cluster", w.path)
        admin("kill", "-cluster", w.path)
    assert cluster_leftovers(w.path) == []


@pytest.fixture
def full_disk(tmp_path):
    """A directory on a 256 KiB tmpfs, with a cluster in it and then filled;
    unmounted after the test, whatever happens."""
    disk = tmp_path / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(disk)], check=True)
    try:
        admin("new", "-cluster", disk / "c")
        subprocess.run(["dd", "if=/dev/zero", "of=%s" % (disk / "fill"), "bs=4k"],
                       capture_output=True)  # until the disk is full
        yield disk
    finally:
        subprocess.run(["umount", str(disk)], check=True)


def test_a_full_disk_is_one_line_naming_what_and_leaves_nothing_half_written(full_disk):
    d = full_disk / "c"
    template = (d / "config" / "template.json").read_text()
    done = admin("setconf", "-cluster", d, '{"max_sandboxes": 7}', check=False)
    assert done.returncode == 1 and done.stderr == (
        "admin: setconf: write %s/config/template.json: No space left on device; nothing was "
        "changed\n" % d)
    assert os.listdir(d / "config") == ["template.json"]
    assert (d / "config" / "template.json").read_text() == template
    port = free_port()
    done = admin("workers", "-cluster", d, "-p", port, check=False)
    assert done.returncode == 1 and done.stderr == (
        "admin: record the worker on port %d: write %s/workers/%d/config.json: No space left "
        "on device\n" % (port, d, port))
    assert os.listdir(d / "workers") == []
    assert "(no workers)" in admin("status", "-cluster", d).stdout  # no record said killed
    done = admin("new", "-cluster", full_disk / "c2", check=False)
    assert done.returncode == 1 and done.stderr == (
        "admin: create cluster %s/c2: write %s/c2/config/template.json: No space left on device;"
        " what was made of it was removed\n" % (full_disk, full_disk))
    assert not os.path.lexists(full_disk / "c2")
    assert cluster_leftovers(d) == []


def test_an_unexpected_os_error_names_the_command(monkeypatch, capsys):
    """A write's ENOSPC names no file: the line says which command failed."""
    import errno
    import importlib.machinery
    import types
    loader = importlib.machinery.SourceFileLoader("admin_cli", ADMIN)
    cli = types.ModuleType(loader.name)
    cli.__file__ = ADMIN
    loader.exec_module(cli)

    def fails(args):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(cli, "cmd_status", fails)
    assert cli.main(["status", "-cluster", "/nowhere"]) == 1
    assert capsys.readouterr().err == "admin: status: No space left on device\n"
