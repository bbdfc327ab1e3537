"""Egress networking, end to end: a worker with egress enabled, functions
that ask for it in their ol.yaml, and a test "internet" in a network
namespace of its own, reached only through the worker's NAT."""
import json
import os
import random
import socket
import subprocess
import sys
import time

import pytest

from conftest import admin, free_port

from sandbox import nat

EGRESS_FUNCTION = '''
import errno
import socket
import threading


def _fetch(host, port):
    try:
        with socket.create_connection((host, port), timeout=1.5) as s:
            return {"ok": True, "reply": s.recv(100).decode()}
    except socket.timeout:
        return {"ok": False, "error": "timeout"}
    except OSError as e:
        return {"ok": False, "error": errno.errorcode.get(e.errno, str(e))}


def _serve(port):
    server = socket.socket()
    server.bind(("0.0.0.0", port))
    server.listen()

    def loop():
        while True:
            conn, _ = server.accept()
            conn.sendall(b"sandbox")
            conn.close()
    threading.Thread(target=loop, daemon=True).start()
    return port


def _address():
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect(("192.0.2.1", 9))  # picks the route's source address, sends nothing
        return s.getsockname()[0]


def handler(event):
    op = event["op"]
    if op == "interfaces":
        return sorted(name for _, name in socket.if_nameindex())
    if op == "address":
        return _address()
    if op == "fetch":
        return _fetch(event["host"], event["port"])
    if op == "serve":
        return _serve(event["port"])
    if op == "udp":  # a flow out that the server answers: a conntrack entry
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.settimeout(2)
            s.sendto(b"hello", (event["host"], event["port"]))
            return s.recvfrom(100)[0].decode()
    if op == "arp":  # {address: MAC} of the namespace's ARP cache
        with open("/proc/net/arp") as f:
            return {line.split()[0]: line.split()[3] for line in f.readlines()[1:]}
'''

# The internet's server answers with the address it saw the client come
# from, over TCP and UDP.
INTERNET_SERVER = '''
import socket, sys, threading
udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
udp.bind(("0.0.0.0", int(sys.argv[1])))

def echo():
    while True:
        data, peer = udp.recvfrom(100)
        udp.sendto(peer[0].encode(), peer)
threading.Thread(target=echo, daemon=True).start()
server = socket.socket()
server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
server.bind(("0.0.0.0", int(sys.argv[1])))
server.listen()
print("listening", flush=True)
while True:
    conn, peer = server.accept()
    conn.sendall(peer[0].encode())
    conn.close()
'''
INTERNET_PORT = 8181
METADATA = "169.254.169.254"


def run(*cmd):
    subprocess.run(cmd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def internet():
    """A namespace standing for the internet: the host reaches it through
    a veth of its own, and it has no route to any sandbox subnet, so only
    the worker's NAT lets replies come back.  Yields its address."""
    suffix = "%04x" % random.getrandbits(16)
    ns, host_end = "olinet" + suffix, "olti" + suffix
    net = "198.18.%d" % random.randint(1, 250)
    server = None
    try:
        run("ip", "netns", "add", ns)
        run("ip", "link", "add", host_end, "type", "veth", "peer", "name", "eth0", "netns", ns)
        run("ip", "addr", "add", net + ".1/24", "dev", host_end)
        run("ip", "link", "set", host_end, "up")
        run("ip", "-n", ns, "addr", "add", net + ".2/24", "dev", "eth0")
        run("ip", "-n", ns, "link", "set", "eth0", "up")
        run("ip", "-n", ns, "link", "set", "lo", "up")
        # It also plays a cloud's metadata service (the route goes with the veth).
        run("ip", "-n", ns, "addr", "add", METADATA + "/32", "dev", "eth0")
        run("ip", "route", "add", METADATA + "/32", "dev", host_end)
        server = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-c",
                                   INTERNET_SERVER, str(INTERNET_PORT)],
                                  stdout=subprocess.PIPE, text=True)
        assert server.stdout.readline().strip() == "listening"
        yield {"address": net + ".2", "host_side": net + ".1"}
    finally:
        if server is not None:
            server.kill()
            server.wait()
        subprocess.run(["ip", "link", "del", host_end], capture_output=True)
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


@pytest.fixture(scope="module")
def egress_worker(tmp_path_factory):
    from conftest import start_cluster, stop_cluster
    w = start_cluster(tmp_path_factory.mktemp("egress"), egress={"enabled": True})
    for name in ("out", "out2"):
        d = w.add_function(name, EGRESS_FUNCTION)
        with open(os.path.join(d, "ol.yaml"), "w") as f:
            f.write("egress: true\n")
    w.add_function("closed", EGRESS_FUNCTION)  # no ol.yaml: no egress
    yield w
    stop_cluster(w)
    assert settled_leftovers(w.port) == []


def network_leftovers(port):
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
    found = [line.split(":")[1].strip() for line in links.splitlines()
             if line.split(":")[1].strip().startswith(("olbr%d" % port, "olv%d-" % port))]
    try:
        if nat.detect().installed("ol%d" % port):
            found.append("NAT rules ol%d" % port)
    except nat.NatError:
        pass
    return found


def settled_leftovers(port, seconds=5):
    """What is left once the kernel has had time to delete the namespaces
    the worker let go of (it does so in the background, in batches)."""
    deadline = time.monotonic() + seconds
    while network_leftovers(port) and time.monotonic() < deadline:
        time.sleep(0.1)
    return network_leftovers(port)


def sandboxes(worker):
    _, _, body = worker.request("GET", "/sandboxes")
    return json.loads(body)


def test_egress_function_reaches_the_internet_through_nat(egress_worker, internet):
    _, _, interfaces = egress_worker.call("out", {"op": "interfaces"})
    assert interfaces == ["eth0", "lo"]
    _, _, r = egress_worker.call("out", {"op": "fetch", "host": internet["address"],
                                         "port": INTERNET_PORT})
    # The internet saw the host's address, not the sandbox's: masqueraded.
    assert r == {"ok": True, "reply": internet["host_side"]}


def test_egress_cannot_reach_a_metadata_service(egress_worker, internet):
    # It is there: the host reaches it.
    socket.create_connection((METADATA, INTERNET_PORT), timeout=2).close()
    _, _, r = egress_worker.call("out", {"op": "fetch", "host": METADATA, "port": INTERNET_PORT})
    assert r["ok"] is False, r


def test_functions_without_egress_keep_only_their_loopback(egress_worker, internet):
    _, _, interfaces = egress_worker.call("closed", {"op": "interfaces"})
    assert interfaces == ["lo"]
    _, _, r = egress_worker.call("closed", {"op": "fetch", "host": internet["address"],
                                            "port": INTERNET_PORT})
    assert r["ok"] is False


def test_egress_cannot_reach_the_worker_or_host_services(egress_worker, internet):
    _, _, address = egress_worker.call("out", {"op": "address"})
    gateway = address.rsplit(".", 1)[0] + ".1"
    with socket.socket() as host_service:
        host_service.bind(("0.0.0.0", 0))  # every host address, as a careless service would
        host_service.listen()
        port = host_service.getsockname()[1]
        # The host itself reaches the service at the bridge's address.
        socket.create_connection((gateway, port), timeout=2).close()
        for host, p in ((gateway, port), (gateway, egress_worker.port),
                        (internet["host_side"], port), ("127.0.0.1", egress_worker.port)):
            _, _, r = egress_worker.call("out", {"op": "fetch", "host": host, "port": p})
            assert r["ok"] is False, (host, p, r)


def test_two_egress_sandboxes_cannot_reach_each_other(egress_worker):
    port = 9000 + random.randint(0, 999)
    assert egress_worker.call("out2", {"op": "serve", "port": port})[2] == port
    _, _, target = egress_worker.call("out2", {"op": "address"})
    # The server is up: its own sandbox reaches it at that address.
    _, _, r = egress_worker.call("out2", {"op": "fetch", "host": target, "port": port})
    assert r == {"ok": True, "reply": "sandbox"}
    _, _, r = egress_worker.call("out", {"op": "fetch", "host": target, "port": port})
    assert r["ok"] is False, r


def test_status_shows_each_sandboxs_network(egress_worker):
    egress_worker.call("out", {"op": "address"})
    egress_worker.call("closed", {"op": "interfaces"})
    modes = {s["function"]: s["network"] for s in sandboxes(egress_worker)}
    assert modes["out"].startswith("egress 10.213.")
    assert modes["closed"] == "isolated"
    out = admin("status", "-cluster=" + egress_worker.path).stdout
    assert "network egress 10.213." in out and "network isolated" in out


def test_the_bridge_keeps_its_mac_when_a_port_joins(egress_worker):
    """Sandboxes cache the gateway's MAC: if the bridge's changed whenever a
    veth with a lower MAC joined it (the kernel's default), their frames
    to the old one would be dropped, and egress lost until it expired."""
    mac_file = "/sys/class/net/olbr%d/address" % egress_worker.port
    before = open(mac_file).read().strip()
    port = "oltlow%04x" % random.getrandbits(16)
    try:
        run("ip", "link", "add", port, "address", "00:00:00:00:00:01", "type", "veth",
            "peer", "name", port + "p")
        run("ip", "link", "set", port, "master", "olbr%d" % egress_worker.port)
        assert open(mac_file).read().strip() == before
    finally:
        subprocess.run(["ip", "link", "del", port], capture_output=True)


def test_200_cold_starts_recycle_namespaces_and_leak_nothing(egress_worker, internet):
    path = os.path.join(egress_worker.registry, "out", "lambda_func.py")
    source = open(path).read()
    addresses = set()
    bridge_mac = open("/sys/class/net/olbr%d/address" % egress_worker.port).read().strip()
    for i in range(200):
        # A change to its code retires the old sandbox: the next call is cold.
        with open(path, "w") as f:
            f.write(source + "\n# %d\n" % i)
        status, _, address = egress_worker.call("out", {"op": "address"})
        assert status == 200, address
        addresses.add(address)
    # Namespaces were recycled, not made anew for each sandbox: a handful
    # (the spares, the live sandboxes, those still dying) served all 200.
    assert len(addresses) <= 16, addresses
    _, _, r = egress_worker.call("out", {"op": "fetch", "host": internet["address"],
                                         "port": INTERNET_PORT})
    assert r["ok"] is True, r
    # The bridge kept its MAC while veths joined it: a recycled namespace
    # still has it in its ARP cache (a bridge left to pick its own takes
    # the lowest of its ports', and the cached one goes stale).
    assert open("/sys/class/net/olbr%d/address" % egress_worker.port).read().strip() == bridge_mac
    _, _, arp = egress_worker.call("out", {"op": "arp"})
    assert arp[address.rsplit(".", 1)[0] + ".1"] == bridge_mac
    time.sleep(0.5)
    veths = [name for name in network_leftovers(egress_worker.port) if name.startswith("olv")]
    assert len(veths) <= 12, veths


def flows_from(address):
    """The host's conntrack entries whose original source is `address`."""
    from pyroute2 import Conntrack
    from pyroute2.netlink.nfnetlink.nfctsocket import NFCTAttrTuple
    with Conntrack() as ct:
        return list(ct.dump_entries(tuple_orig=NFCTAttrTuple(saddr=address)))


def test_a_released_address_keeps_no_flow_open_to_the_outside(egress_worker, internet):
    """A flow a sandbox opened is forgotten before its address changes
    hands: else the server it talked to could send into the next sandbox
    with that address (a UDP entry lives as long as the server sends)."""
    path = os.path.join(egress_worker.registry, "out", "lambda_func.py")
    source = open(path).read()
    _, _, address = egress_worker.call("out", {"op": "address"})
    _, _, seen = egress_worker.call("out", {"op": "udp", "host": internet["address"],
                                            "port": INTERNET_PORT})
    assert seen == internet["host_side"]  # masqueraded, and answered
    assert flows_from(address)  # control: the host tracks the flow
    with open(path, "w") as f:
        f.write(source + "\n# retired\n")  # the next call is cold: the sandbox goes
    try:
        assert egress_worker.call("out", {"op": "interfaces"})[0] == 200
        deadline = time.monotonic() + 5
        while flows_from(address) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert flows_from(address) == []
    finally:
        with open(path, "w") as f:
            f.write(source)


def test_a_used_namespace_is_discarded_and_an_unused_one_reused(internet):
    """What a sandbox leaves in a namespace it used (an orphaned socket that
    goes on sending, caches, TCP metrics...) must not reach the next tenant
    of its address: the namespace goes, its veth set down first, then the
    host's conntrack entries of the address, which a new namespace then
    gets.  One that sent nothing is reused, if it still has sent nothing
    when it is handed out."""
    import asyncio
    from sandbox.network import EgressNetwork

    def inside(lease, code):
        return subprocess.run(["nsenter", "--net=/proc/%d/fd/%d" % (os.getpid(), lease.fd),
                               sys.executable, "-c", code],
                              check=True, capture_output=True, text=True).stdout

    def send(lease):
        inside(lease, "import socket\nsocket.socket(socket.AF_INET, socket.SOCK_DGRAM)"
                      ".sendto(b'x', (%r, %d))" % (internet["address"], INTERNET_PORT))

    def veth_state(name):
        try:
            with open("/sys/class/net/%s/operstate" % name) as f:
                return f.read().strip()
        except FileNotFoundError:
            return "gone"

    async def discarded(network, lease):
        while network.discarding:
            await asyncio.sleep(0.01)
        assert veth_state(lease.veth) in ("down", "gone")
        # (pyroute2's own loop cannot run inside this one: a thread)
        assert await asyncio.to_thread(flows_from, lease.address) == []
        assert lease.index in network.unused or any(
            other.index == lease.index and other.veth != lease.veth for other in network.free)

    async def scenario(network):
        await network.start()
        try:
            lease = await network.acquire()
            # No multicast in it: IGMP reports would go out on a timer,
            # after its sandbox is gone.
            assert "ENOBUFS" in inside(lease, (
                "import errno, socket\n"
                "try:\n"
                "    socket.socket(socket.AF_INET, socket.SOCK_DGRAM).setsockopt(\n"
                "        socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP,\n"
                "        socket.inet_aton('239.7.7.7') + socket.inet_aton('0.0.0.0'))\n"
                "except OSError as e:\n"
                "    print(errno.errorcode[e.errno])\n"))
            network.release(lease, reusable=True)
            assert network.discarding == 0 and lease in network.free  # it sent nothing
            lease = await network.acquire()
            send(lease)
            assert await asyncio.to_thread(flows_from, lease.address)
            network.release(lease, reusable=True)
            assert network.discarding == 1 and lease not in network.free
            await discarded(network, lease)
            # One that sends after its release is not handed out either.
            lease = await network.acquire()
            network.release(lease, reusable=True)
            assert lease in network.free
            send(lease)
            assert await network.acquire() is not lease
            await discarded(network, lease)
        finally:
            await network.close()

    port = free_port()
    asyncio.run(scenario(EgressNetwork(port, "10.215.0.0/16", 1)))
    assert settled_leftovers(port) == []


def test_a_namespace_kept_by_an_orphaned_socket_loses_its_veth_at_kill(own_worker, internet):
    """A TCP socket outlives its process (orphaned) and keeps its namespace:
    after a SIGKILL, `admin kill` deletes the veth, so that what it sends
    is not routed out once the bridge and the rules are gone."""
    w = own_worker(egress={"enabled": True})
    d = w.add_function("out", EGRESS_FUNCTION)
    with open(os.path.join(d, "ol.yaml"), "w") as f:
        f.write("egress: true\n")
    w.call("out", {"op": "address"})
    pid = int(open(os.path.join(w.path, "workers", str(w.port), "pid")).read())
    host = os.readlink("/proc/self/ns/net")
    fds = "/proc/%d/fd" % pid
    (held, *_) = [fd for fd in os.listdir(fds)  # an egress namespace the worker holds
                  if os.readlink(os.path.join(fds, fd)).startswith("net:")
                  and os.readlink(os.path.join(fds, fd)) != host]
    # Something else in it keeps it once the worker is gone: a process of
    # ours, standing for the orphaned socket.
    keeper = subprocess.Popen(["nsenter", "--net=%s/%s" % (fds, held), "sleep", "60"])
    try:
        time.sleep(0.2)  # in it
        os.kill(pid, 9)
        while os.path.exists("/proc/%d" % pid) and \
                open("/proc/%d/stat" % pid).read().split()[2] != "Z":
            time.sleep(0.05)
        assert [n for n in network_leftovers(w.port) if n.startswith("olv")]  # kept
        admin("kill", "-cluster=" + w.path)
        assert network_leftovers(w.port) == []  # while the namespace is still there
    finally:
        keeper.kill()
        keeper.wait()


def test_unknown_egress_value_and_egress_on_a_cluster_without_it(worker):
    d = worker.add_function("wants-out", EGRESS_FUNCTION)
    with open(os.path.join(d, "ol.yaml"), "w") as f:
        f.write("egress: yes-please\n")
    status, _, body = worker.call("wants-out", {"op": "interfaces"})
    assert status == 500 and body["errorType"] == "Runtime.ConfigError"
    assert "egress must be true or false" in body["errorMessage"]
    with open(os.path.join(d, "ol.yaml"), "w") as f:
        f.write("egress: true\n")
    status, _, body = worker.call("wants-out", {"op": "interfaces"})
    assert status == 500 and "does not enable it" in body["errorMessage"]


def test_a_subnet_that_clashes_with_a_host_route_is_refused_at_start(tmp_path):
    dummy = "oltclash%04x" % random.getrandbits(16)
    path = str(tmp_path / "clash")
    # A veth pair stands for any host interface with a route in the range.
    run("ip", "link", "add", dummy, "type", "veth", "peer", "name", dummy + "p")
    try:
        run("ip", "addr", "add", "10.214.77.5/24", "dev", dummy)
        run("ip", "link", "set", dummy, "up")
        admin("new", "-cluster", path)
        admin("setconf", "-cluster=" + path,
              json.dumps({"egress": {"enabled": True, "subnet": "10.214.77.0/24"}}))
        port = free_port()
        done = admin("workers", "-cluster=" + path, "-p", port, check=False)
        assert done.returncode == 1
        assert "clashes with the host's route 10.214.77.0/24 dev %s" % dummy in done.stderr
        assert network_leftovers(port) == []
    finally:
        admin("kill", "-cluster=" + path, check=False)
        subprocess.run(["ip", "link", "del", dummy], capture_output=True)


@pytest.mark.parametrize("resolv", ["nameserver 10.214.78.53\n",
                                    "# mine\nnameserver ::1\nnameserver 10.214.78.200\n"])
def test_a_subnet_holding_a_nameserver_is_refused(tmp_path, resolv):
    """A nameserver the host reaches through its default route would be
    cut off by the bridge's route, for the host (its resolv.conf) or the
    sandboxes (the rootfs's)."""
    from pyroute2 import IPRoute
    from sandbox.errors import SandboxError
    from sandbox.network import EgressNetwork
    conf = tmp_path / "resolv.conf"
    conf.write_text(resolv)
    network = EgressNetwork(9999, "10.214.78.0/24", 0, resolv_confs=(str(conf),))
    network.ipr = IPRoute()
    try:
        with pytest.raises(SandboxError, match="clashes with the nameserver 10.214.78"):
            network._check_subnet_is_free()
        conf.write_text("nameserver 10.214.79.53\n")
        network._check_subnet_is_free()  # one outside it is no clash
    finally:
        network.ipr.close()
        network.thread.shutdown()


def test_a_sigkilled_workers_network_is_removed_by_kill(own_worker):
    w = own_worker(egress={"enabled": True})
    d = w.add_function("out", EGRESS_FUNCTION)
    with open(os.path.join(d, "ol.yaml"), "w") as f:
        f.write("egress: true\n")
    assert w.call("out", {"op": "interfaces"})[2] == ["eth0", "lo"]
    with open(os.path.join(w.path, "workers", str(w.port), "pid")) as f:
        pid = int(f.read())
    os.kill(pid, 9)
    while os.path.exists("/proc/%d" % pid) and open("/proc/%d/stat" % pid).read().split()[2] != "Z":
        time.sleep(0.05)
    assert "olbr%d" % w.port in network_leftovers(w.port)  # it had no chance to clean up
    said = admin("kill", "-cluster=" + w.path).stdout
    assert settled_leftovers(w.port) == []
    assert ("removed the egress network the worker on port %d left: " % w.port) in said, said
    assert "the bridge olbr%d, its %s rules, its conntrack entries" % (
        w.port, nat.detect().name) in said, said


def test_a_host_without_nat_tool_is_refused_at_start_and_left_unchanged(monkeypatch):
    import asyncio
    from sandbox.errors import SandboxError
    from sandbox.network import EgressNetwork
    monkeypatch.setattr(nat, "_tool", lambda name: None)  # as if neither were installed
    port = free_port()
    network = EgressNetwork(port, "10.213.0.0/16", 1)

    async def start():
        try:
            await network.start()
        finally:
            await network.close()
    with pytest.raises(SandboxError, match="egress needs nftables or iptables"):
        asyncio.run(start())
    assert network_leftovers(port) == []
