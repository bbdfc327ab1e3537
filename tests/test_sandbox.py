"""The sandbox package on its own: lifecycle and clean destruction."""
import asyncio
import dataclasses
import json
import os
import subprocess
import uuid

import pytest

from conftest import REPO
from sandbox.cgroups import Cgroup
from sandbox.errors import ZygoteBootError
from sandbox.manager import SandboxConfig, SandboxManager
from sandbox.runtime import proto

ROOTFS = os.path.join(REPO, "build", "rootfs")


def code_dir(tmp_path, source):
    """A function's code directory holding `source` as lambda_func.py."""
    code = tmp_path / "code"
    code.mkdir()
    (code / "lambda_func.py").write_text(source)
    return code


def host_mounts():
    with open("/proc/self/mountinfo") as f:
        return sorted(line.split()[4] for line in f)


def open_fds():
    return sorted(os.listdir("/proc/self/fd"))


@pytest.fixture
def manager_config(tmp_path):
    log = os.open(str(tmp_path / "log"), os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
    root = "openlambda/pytest-%s/w1" % uuid.uuid4().hex[:8]
    yield lambda rootfs=ROOTFS: SandboxConfig(rootfs=rootfs, cgroup_root=root, log_fd=log,
                                              hostname="t")
    os.close(log)
    cg = Cgroup(root)
    cg.remove()
    cg.remove_empty_parents()
    assert not [d for d in cg.dirs() if os.path.exists(d)]


async def ask(sandbox, body):
    """One call over the sandbox's channel, with the loop's socket calls:
    they leave no reader behind on a socket the manager closes later."""
    loop = asyncio.get_running_loop()
    if not hasattr(sandbox, "test_unpacker"):
        sandbox.test_unpacker = proto.unpacker()
    await loop.sock_sendall(sandbox.channel, proto.pack({"id": "r", "body": body}))
    while True:
        sandbox.test_unpacker.feed(await loop.sock_recv(sandbox.channel, 65536))
        for msg in sandbox.test_unpacker:
            return msg


def one_call(config, code, settle=0.0):
    """The reply to one call of `code`, in a sandbox of a manager of its
    own, started `settle` seconds before."""
    async def scenario():
        manager = SandboxManager(config)
        try:
            await manager.start()
            await asyncio.sleep(settle)
            sandbox = await manager.create(str(code))
            return await ask(sandbox, b"{}")
        finally:
            await manager.shutdown()
    return asyncio.run(scenario())


def test_destroy_leaves_no_process_cgroup_mount_or_socket(tmp_path, manager_config):
    code = code_dir(tmp_path, "def handler(event):\n    return event\n")
    mounts_before = host_mounts()

    async def scenario():
        fds_before = open_fds()
        manager = SandboxManager(manager_config())
        await manager.start()
        sandbox = await manager.create(str(code), "echo")
        reply = await ask(sandbox, b'{"x": 1}')
        assert reply["status"] == "ok" and reply["body"] == b'{"x": 1}'
        assert reply["load"] > 0 and reply["run"] >= 0  # timings for Server-Timing
        pid = sandbox.host_pid()
        assert pid and os.readlink("/proc/%d/ns/mnt" % pid) != os.readlink("/proc/self/ns/mnt")
        dirs = sandbox.cgroup.dirs()
        assert all(os.path.isdir(d) for d in dirs)
        # Time enough for its zygote's exit report on a loaded host: the
        # default 2 s was once too little with a debootstrap running beside.
        await manager.destroy(sandbox, timeout=30)
        assert not os.path.exists("/proc/%d" % pid)
        # Its cgroup is empty and back in the pool, for the next sandbox.
        assert sandbox.cgroup.pids() == [] and sandbox.cgroup in manager.cgroups.free
        assert sandbox.id not in manager.sandboxes
        await manager.shutdown()
        assert not [d for d in dirs if os.path.exists(d)]
        assert open_fds() == fds_before  # no socket, pidfd or tree fd kept
    asyncio.run(scenario())
    assert host_mounts() == mounts_before  # nothing was ever mounted on the host


def test_many_sandboxes_and_shutdown_removes_them_all(tmp_path, manager_config):
    code = code_dir(tmp_path, "def handler(event):\n    return 1\n")

    async def scenario():
        manager = SandboxManager(manager_config())
        await manager.start()
        boxes = [await manager.create(str(code)) for _ in range(20)]
        replies = await asyncio.gather(*(ask(b, b"{}") for b in boxes))
        assert all(r["status"] == "ok" for r in replies)
        pids = [b.host_pid() for b in boxes]
        await manager.shutdown()
        assert not [p for p in pids if os.path.exists("/proc/%d" % p)]
        assert not os.path.exists(manager.root.dirs()[0])
    asyncio.run(scenario())


@pytest.fixture
def rootfs_without_msgpack(tmp_path):
    """The base rootfs with msgpack whited out, through an overlay."""
    upper, work, merged = (tmp_path / n for n in ("upper", "work", "merged"))
    for d in (upper, work, merged):
        d.mkdir()
    gone = upper / "usr/lib/python3/dist-packages/msgpack"
    gone.parent.mkdir(parents=True)
    os.mknod(str(gone), 0o600 | 0o020000, os.makedev(0, 0))  # an overlayfs whiteout
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o", "lowerdir=%s,upperdir=%s,workdir=%s"
                    % (ROOTFS, upper, work), str(merged)], check=True)
    yield str(merged)
    subprocess.run(["umount", str(merged)], check=True)


def test_a_zygote_that_cannot_import_says_why_once(rootfs_without_msgpack, manager_config):
    async def scenario():
        manager = SandboxManager(manager_config(rootfs_without_msgpack))
        with pytest.raises(ZygoteBootError, match="python3-msgpack"):
            await manager.start()
        await manager.shutdown()
    asyncio.run(scenario())


def test_freeze_stops_a_sandbox_and_thaw_resumes_it(tmp_path, manager_config):
    code = code_dir(tmp_path, "def handler(event):\n    return 'awake'\n")

    async def scenario():
        manager = SandboxManager(manager_config())
        await manager.start()
        sandbox = await manager.create(str(code))
        assert (await ask(sandbox, b"{}"))["status"] == "ok"
        sandbox.cgroup.freeze()
        reply = asyncio.ensure_future(ask(sandbox, b"{}"))
        await asyncio.sleep(0.3)
        assert not reply.done()  # frozen: it cannot answer
        sandbox.cgroup.thaw()
        assert (await asyncio.wait_for(reply, 5))["body"] == b'"awake"'
        await manager.shutdown()
    asyncio.run(scenario())


def test_a_cgroup_frozen_when_its_sandbox_died_is_reused_thawed(tmp_path, manager_config):
    """The worker freezes idle sandboxes; one destroyed while frozen gives
    its cgroup back to the pool, and the shells forked into it after must
    run (a frozen one would never say ready, and the pool would stall)."""
    code = code_dir(tmp_path, "def handler(event):\n    return 'awake'\n")

    async def scenario():
        config = dataclasses.replace(manager_config(), pool_size=2)
        manager = SandboxManager(config)
        await manager.start()
        try:
            for _ in range(4):  # past the pool: every cgroup it had is reused
                sandbox = await asyncio.wait_for(manager.create(str(code)), 5)
                assert (await ask(sandbox, b"{}"))["body"] == b'"awake"'
                sandbox.cgroup.freeze()
                await manager.destroy(sandbox)
                assert sandbox.cgroup in manager.cgroups.free
        finally:
            await manager.shutdown()
    asyncio.run(scenario())


def test_a_shell_never_ready_is_killed_and_its_caller_told(tmp_path, manager_config, monkeypatch):
    """A shell that never says ready (here: forked into a cgroup frozen
    behind the pool's back) would hold its place among those starting for
    good; past READY_DEADLINE it is killed, and its caller gets why."""
    from sandbox import manager as manager_module
    from sandbox.errors import SandboxError
    monkeypatch.setattr(manager_module, "READY_DEADLINE", 0.5)
    code = code_dir(tmp_path, "def handler(event):\n    return 'awake'\n")

    async def scenario():
        manager = SandboxManager(dataclasses.replace(manager_config(), pool_size=0))
        await manager.start()
        try:
            cgroup = manager.cgroups.acquire()
            cgroup.freeze()
            manager.cgroups.free.append(cgroup)
            with pytest.raises(SandboxError, match="not ready after 0.5 s"):
                await asyncio.wait_for(manager.create(str(code)), 5)
            assert manager.starting == 0
            sandbox = await asyncio.wait_for(manager.create(str(code)), 5)
            assert (await ask(sandbox, b"{}"))["body"] == b'"awake"'
        finally:
            await manager.shutdown()
    asyncio.run(scenario())


def test_a_shell_that_cannot_get_fds_says_so_and_gives_its_cgroup_back(tmp_path, manager_config):
    """Out of fds (EMFILE), a shell cannot be made: the caller is told in a
    SandboxError, and the cgroup it had taken goes back to the pool, not
    lost with its uid slot."""
    import resource
    from sandbox.errors import SandboxError

    async def scenario():
        manager = SandboxManager(dataclasses.replace(manager_config(), pool_size=0))
        await manager.start()
        limits = resource.getrlimit(resource.RLIMIT_NOFILE)
        fillers = []
        try:
            free = len(manager.cgroups.free)
            # Every fd number taken.
            resource.setrlimit(resource.RLIMIT_NOFILE, (max(map(int, open_fds())) + 1, limits[1]))
            with pytest.raises(OSError):
                while True:
                    fillers.append(os.open(os.devnull, os.O_RDONLY))
            with pytest.raises(SandboxError, match="fork shell sb-.*Too many open files"):
                manager._new_shell("first")
            assert len(manager.cgroups.free) == free
        finally:
            for fd in fillers:
                os.close(fd)
            resource.setrlimit(resource.RLIMIT_NOFILE, limits)
            await manager.shutdown()
    asyncio.run(scenario())


def test_a_zygote_restart_that_fails_is_retried_and_said(tmp_path, manager_config, monkeypatch):
    """A zygote that dies is restarted; if the new one cannot boot (here:
    twice), the manager says why on every create() meanwhile, and tries
    again until one runs."""
    code = code_dir(tmp_path, "def handler(event):\n    return 'awake'\n")

    async def scenario():
        manager = SandboxManager(manager_config())
        await manager.start()
        try:
            real_start, failures = manager._start_zygote, []

            async def failing_start():
                if len(failures) < 2:
                    failures.append(1)
                    raise SandboxError("start zygote", "-", "no fds left (a test)")
                await real_start()
            monkeypatch.setattr(manager, "_start_zygote", failing_start)
            os.kill(manager.zygote.pid, 9)
            while not manager.zygote_trouble:
                await asyncio.sleep(0.01)
            with pytest.raises(SandboxError, match="could not be restarted: .*no fds left"):
                await manager.create(str(code))
            while manager.zygote_trouble:  # the third attempt, 0.6 s on
                await asyncio.sleep(0.05)
            sandbox = await asyncio.wait_for(manager.create(str(code)), 5)
            assert (await ask(sandbox, b"{}"))["body"] == b'"awake"'
        finally:
            await manager.shutdown()
    from sandbox.errors import SandboxError
    asyncio.run(scenario())


def test_a_load_failure_is_heard_even_when_the_request_cannot_be_sent(tmp_path, manager_config):
    """The shell reports a load failure and exits before the request is
    written: the worker must still get the report, not a broken pipe."""
    from worker.functions import Channel
    code = code_dir(tmp_path, "import no_such_module\n")

    async def scenario():
        manager = SandboxManager(manager_config())
        await manager.start()
        sandbox = await manager.create(str(code), "broken")
        await sandbox.exit_reason()  # it has already failed and exited
        channel = Channel(sandbox.channel)
        reply = await channel.call({"id": "r", "body": b"{}" * 100_000})  # big: EPIPE for sure
        assert reply["status"] == "init_error" and reply["errorType"] == "Runtime.ImportModuleError"
        channel.close()
        await manager.destroy(sandbox)
        await manager.shutdown()
    asyncio.run(scenario())


def test_a_function_sees_nothing_of_the_rehearsals(tmp_path, manager_config):
    """The zygote runs the call path with a throw-away function before it
    forks (warm_up), and a pooled shell once more: the function then loaded
    is the only lambda_func, and only its own directory is on sys.path."""
    code = code_dir(tmp_path, "import sys\n"
                              "def handler(event):\n"
                              "    return [sys.modules['lambda_func'].__file__,\n"
                              "            [p for p in sys.path if 'rehears' in p], sys.path[0]]\n")

    reply = one_call(manager_config(), code, settle=1.5)  # the pool's shells rehearsed
    assert reply["status"] == "ok", reply
    assert json.loads(reply["body"]) == ["/handler/lambda_func.py", [], "/handler"]


def test_common_library_calls_import_nothing_in_the_sandbox(tmp_path, manager_config):
    """The zygote imported what the modules it pre-imports import only on
    first use (an EmailMessage's policy, as_string's generator, strptime's
    parser, ElementTree.tostring's codec): a function using them imports
    nothing in its sandbox, where an import is paid in page faults on the
    cold path (email.policy alone took 4 ms)."""
    code = code_dir(tmp_path, "import sys\n"
                              "def handler(event):\n"
                              "    before = set(sys.modules)\n"
                              "    import asyncio, datetime, decimal, email.message, http.client\n"
                              "    import json, logging, time, xml.etree.ElementTree as ET\n"
                              "    msg = email.message.EmailMessage()\n"
                              "    msg['Subject'] = 'hi'\n"
                              "    msg.as_string()\n"
                              "    datetime.datetime.strptime('2024-01-02', '%Y-%m-%d')\n"
                              "    time.strptime('2024', '%Y')\n"
                              "    logging.getLogger('f').info('x')\n"
                              "    ET.fromstring('<a><b>%s</b></a>' % decimal.Decimal('1.1')).find('b')\n"
                              "    json.dumps([http.client.responses[200], asyncio.iscoroutinefunction(handler)])\n"
                              "    ET.tostring(ET.fromstring('<a/>'))\n"
                              "    return sorted(set(sys.modules) - before)\n")

    reply = one_call(manager_config(), code)
    assert reply["status"] == "ok", reply
    assert json.loads(reply["body"]) == []


async def full_pool(manager):
    """Wait until all of the manager's pool of shells is ready."""
    for _ in range(500):
        if len(manager.pool) == manager.config.pool_size:
            return
        await asyncio.sleep(0.02)
    raise AssertionError("the pool has %d of its %d shells after 10 s"
                         % (len(manager.pool), manager.config.pool_size))


async def started_with_full_pool(config, pool_size):
    manager = SandboxManager(dataclasses.replace(config, pool_size=pool_size))
    await manager.start()
    await full_pool(manager)
    return manager


def test_shells_forked_in_one_batch_are_each_alone(tmp_path, manager_config):
    """The zygote forks a whole batch of shells in one go (the pool's first
    fill is one message): each must still be pid 1 of its own namespaces,
    holding no fd of its siblings'."""
    code = code_dir(tmp_path, "import os\n"
                              "def handler(event):\n"
                              "    return [os.getpid(), os.readlink('/proc/self/ns/pid'),\n"
                              "            os.readlink('/proc/self/ns/net'), os.listdir('/proc/self/fd')]\n")

    async def scenario():
        manager = await started_with_full_pool(manager_config(), 6)
        boxes = [await manager.create(str(code)) for _ in range(6)]
        assert all(b.taken_from_pool for b in boxes)
        replies = [await ask(b, b"{}") for b in boxes]
        await manager.shutdown()
        facts = [json.loads(r["body"]) for r in replies]
        assert [f[0] for f in facts] == [1] * 6
        assert len({f[1] for f in facts}) == 6 and len({f[2] for f in facts}) == 6
        for f in facts:  # stdin, stdout, stderr, its channel, and listdir's own
            assert len(f[3]) == 5, f[3]
    asyncio.run(scenario())


def test_shells_forked_while_calls_wait_skip_the_rehearsal(tmp_path, manager_config):
    """Pooled shells rehearse a call before they say ready; shells forked
    while calls wait for one do not (the CPUs are behind), and serve the
    same.  (That they rehearse later if left unused: tests/unit.)"""
    code = code_dir(tmp_path, "def handler(event):\n    return event\n")

    async def scenario():
        manager = await started_with_full_pool(manager_config(), 2)
        assert (manager.rehearsed, manager.unrehearsed) == (2, 0)
        # A refill while a call waits: the shell goes to that call unrehearsed.
        waiter = asyncio.get_running_loop().create_future()
        manager.waiters.append(waiter)
        manager._fork_shells(1)
        await manager.destroy(await asyncio.wait_for(waiter, 10))
        assert (manager.rehearsed, manager.unrehearsed) == (2, 1)
        # A burst: the calls beyond the pool wait, and their shells (forked
        # for them, which never rehearsed) serve the same.
        boxes = await asyncio.gather(*[manager.create(str(code)) for _ in range(6)])
        replies = [await ask(b, b'{"n": %d}' % i) for i, b in enumerate(boxes)]
        await manager.shutdown()
        assert [json.loads(r["body"]) for r in replies] == [{"n": i} for i in range(6)]
        assert manager.unrehearsed >= 5, (manager.rehearsed, manager.unrehearsed)
    asyncio.run(scenario())


NETWORK_TRACES = '''
import os
import socket
import struct

def counters():
    with open("/proc/net/dev") as f:
        lo = [l for l in f if l.strip().startswith("lo:")][0].split(":")[1].split()
    with open("/proc/net/snmp") as f:
        rows = [l.split() for l in f]
    snmp = {}
    for names, values in zip(rows[::2], rows[1::2]):
        snmp.update({names[0] + k: int(v) for k, v in zip(names[1:], values[1:])})
    with open("/proc/net/ip6_flowlabel") as f:
        flow_labels = len(f.readlines()) - 1
    return {"lo_packets": int(lo[1]) + int(lo[9]), "no_routes": snmp["Ip:OutNoRoutes"],
            "tcp_opens": snmp["Tcp:PassiveOpens"], "flow_labels": flow_labels}

def handler(event):
    seen = counters()
    trace = event.get("trace")
    if trace == "udp":
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.sendto(b"x", ("127.0.0.1", 9))
    elif trace == "no_route":  # no packet at all: only a counter moves
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            try:
                s.sendto(b"x", ("192.0.2.1", 9))
            except OSError:
                pass
    elif trace == "flow_label":  # no packet, no counter: it outlives its socket by a minute
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
            # struct in6_flowlabel_req: get, create, shared with anyone, linger 60 s
            request = struct.pack("16s4sBBHHHI", socket.inet_pton(socket.AF_INET6, "::1"),
                                  struct.pack(">I", 0x12345), 0, 255, 1, 0, 60, 0)
            s.setsockopt(socket.IPPROTO_IPV6, 32, request)  # IPV6_FLOWLABEL_MGR
    elif trace == "tcp":  # a connection, closed: TIME_WAIT
        with socket.socket() as server:
            server.bind(("127.0.0.1", 0))
            server.listen()
            client = socket.create_connection(server.getsockname())
            server.accept()[0].close()
            client.close()
    return [seen, os.readlink("/proc/self/ns/net")]
'''


@pytest.mark.parametrize("trace", [None, "udp", "no_route", "flow_label", "tcp"])
def test_a_used_network_namespace_is_joined_only_without_a_trace(tmp_path, manager_config,
                                                                trace):
    """A sandbox's loopback-only namespace goes to a later shell, which
    joins it only if its last sandbox left nothing in it: every sandbox
    starts with the counters of a namespace just made."""
    code = code_dir(tmp_path, NETWORK_TRACES)

    async def scenario():
        manager = await started_with_full_pool(manager_config(), 1)
        first = await manager.create(str(code))
        _, first_netns = json.loads((await ask(first, json.dumps({"trace": trace}).encode()))["body"])
        await manager.destroy(first)  # its namespace is kept...
        await full_pool(manager)
        await manager.destroy(await manager.create(str(code)))  # ...for the shell forked now
        await full_pool(manager)
        later = await manager.create(str(code))
        seen, later_netns = json.loads((await ask(later, b"{}"))["body"])
        joined, refused = manager.loopback.joined, manager.loopback.refused
        await manager.shutdown()
        assert seen == {"lo_packets": 0, "no_routes": 0, "tcp_opens": 0, "flow_labels": 0}
        # `later` was given `first`'s namespace (a refill may count one more).
        if trace is None:
            assert later_netns == first_netns and joined >= 1 and refused == 0
        else:
            assert later_netns != first_netns and refused == 1
    asyncio.run(scenario())
