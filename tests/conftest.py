"""Fixtures that build real clusters, workers and sandboxes, and tear them
down even when a test fails, checking that nothing was left behind."""
import http.client
import json
import os
import re
import shutil
import socket
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from sandbox.cgroups import Cgroup  # noqa: E402
from worker.cluster import Cluster  # noqa: E402

ADMIN = os.path.join(REPO, "bin", "admin")
HANDLER_DIRS = [os.path.join(REPO, "tests", "handlers"),
                os.path.join(REPO, "quickstart", "handlers")]


def pytest_collection_modifyitems(config, items):
    if os.geteuid() != 0:
        pytest.exit("the tests build real sandboxes: run them as root (make test)", 1)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def admin(*args, check=True, cwd=None, timeout=90):
    done = subprocess.run([ADMIN, *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=timeout)
    if check and done.returncode != 0:
        raise AssertionError("admin %s failed (%d):\n%s%s" % (
            " ".join(map(str, args)), done.returncode, done.stdout, done.stderr))
    return done


class Worker:
    """A running worker of a test cluster, and an HTTP client for it."""

    def __init__(self, path, port):
        self.path = str(path)
        self.port = port
        self.registry = os.path.join(self.path, "registry")
        self.conn = None

    def request(self, method, url, body=b"", headers=None):
        """(status, headers, body bytes); reuses one keep-alive connection."""
        for attempt in (1, 2):
            if self.conn is None:
                self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
            try:
                self.conn.request(method, url, body=body, headers=headers or {})
                r = self.conn.getresponse()
                data = r.read()
                if r.getheader("Connection", "").lower() == "close":
                    self.conn.close()
                    self.conn = None
                return r.status, {k.lower(): v for k, v in r.getheaders()}, data
            except (ConnectionError, http.client.RemoteDisconnected):
                self.conn.close()
                self.conn = None
                if attempt == 2:
                    raise

    def call(self, name, event=None, body=None, prefix="/run/"):
        """Run a function; returns (status, headers, decoded JSON body)."""
        if body is None:
            body = json.dumps(event if event is not None else {}).encode()
        status, headers, data = self.request("POST", prefix + name, body)
        return status, headers, json.loads(data)

    def add_function(self, name, source, entry="lambda_func.py"):
        d = os.path.join(self.registry, name)
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, entry), "w") as f:
            f.write(source)
        return d


def cluster_leftovers(path):
    """Cgroups and processes a cluster left behind: should be empty.  A
    process in another root is the cluster's if it is in its cgroups, and
    anyone's leak if it is in no cluster's; those of other clusters running
    on this machine are theirs."""
    name = Cluster(str(path)).cgroup
    cgroup = Cgroup(name)
    found = [d for d in cgroup.dirs() if os.path.exists(d)]
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            if os.readlink("/proc/%s/root" % pid) == "/":
                continue
            with open("/proc/%s/cgroup" % pid) as f:
                cgroups = f.read()
        except OSError:
            continue  # gone meanwhile
        if re.search("/%s(/|$)" % re.escape(name), cgroups, re.M) or "/openlambda/" not in cgroups:
            found.append("process %s in another root" % pid)
    return found


def start_cluster(base, name="cluster", **template):
    path = os.path.join(str(base), name)
    admin("new", "-cluster", path)
    if template:
        admin("setconf", "-cluster=" + path, json.dumps(template))
    for handlers in HANDLER_DIRS:
        for fn in os.listdir(handlers):
            shutil.copytree(os.path.join(handlers, fn), os.path.join(path, "registry", fn))
    port = free_port()
    try:
        admin("workers", "-cluster=" + path, "-p", port)
    except BaseException:
        admin("kill", "-cluster=" + path, check=False)
        raise
    return Worker(path, port)


def stop_cluster(worker):
    if worker.conn is not None:
        worker.conn.close()
    admin("kill", "-cluster=" + worker.path)
    assert cluster_leftovers(worker.path) == []


@pytest.fixture(scope="session")
def worker(tmp_path_factory):
    """One worker shared by the tests that do not stop or break it."""
    w = start_cluster(tmp_path_factory.mktemp("shared"))
    yield w
    stop_cluster(w)


@pytest.fixture
def own_worker(tmp_path):
    """A worker of its own, for tests that kill, reconfigure or break it."""
    started = []

    def start(**template):
        w = start_cluster(tmp_path, "c%d" % len(started), **template)
        started.append(w)
        return w
    yield start
    for w in started:
        stop_cluster(w)
