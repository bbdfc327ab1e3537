"""sandbox.nat against the real kernel: a bridge with two isolated
"sandbox" namespaces, an "internet" namespace behind a veth, and TCP
servers everywhere; each backend's rules must let a sandbox out (NAT) and
keep it away from the host and from the other sandbox.  Every check that
something is blocked is paired with a control showing that, without the
rules, it is not."""
import contextlib
import random
import secrets
import socket
import socketserver
import subprocess
import sys
import threading
import time

import pytest

from conftest import free_port

from sandbox import nat

TIMEOUT = 0.5  # a dropped SYN shows as a connect timeout

SERVER = """
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1])))
s.listen(16)
print("ready", flush=True)
while True:
    c, peer = s.accept()
    c.sendall(peer[0].encode())  # who the server saw: shows NAT
    c.close()
"""

CLIENT = """
import socket, sys
try:
    with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[3])) as c:
        print(c.recv(100).decode())
except OSError:
    pass  # timeout (dropped) or refused: not reached
"""


def run(*argv, input_=None):
    done = subprocess.run(argv, capture_output=True, text=True, timeout=30, input=input_)
    if done.returncode != 0:
        raise AssertionError("%s failed: %s" % (" ".join(argv), done.stderr.strip()))
    return done.stdout


def tool_works(*argv):
    return subprocess.run(argv, capture_output=True).returncode == 0


class PeerHandler(socketserver.BaseRequestHandler):
    def handle(self):
        self.request.sendall(self.client_address[0].encode())


class Net:
    """Names and addresses of the topology, and probes across it."""

    def __init__(self):
        sfx = secrets.token_hex(3)
        self.bridge, self.veth1, self.veth2, self.uplink = (
            "oltb-" + sfx, "oltv1-" + sfx, "oltv2-" + sfx, "olti-" + sfx)
        self.s1, self.s2, self.inet = ("oltest-s1-" + sfx, "oltest-s2-" + sfx,
                                       "oltest-inet-" + sfx)
        # A random third octet, not routed here yet, so that parallel runs
        # (and test_network's 198.18.x) do not clash.
        routes = run("ip", "-4", "route")
        n = random.choice([n for n in range(1, 255)
                           if "10.250.%d." % n not in routes and "198.19.%d." % n not in routes])
        self.subnet = "10.250.%d.0/24" % n
        self.gateway, self.a1, self.a2, self.a2_l2 = ("10.250.%d.%d" % (n, i) for i in (1, 2, 3, 4))
        self.host_inet, self.inet_addr = "198.19.%d.1" % n, "198.19.%d.2" % n
        self.port = free_port()
        self.tags = []

    def reach(self, ns, address, port=None):
        """What the server at `address` saw as our address, or None if the
        connection was dropped or refused."""
        out = run("ip", "netns", "exec", ns, sys.executable, "-c", CLIENT,
                  address, str(port or self.port), str(TIMEOUT))
        return out.strip() or None

    @contextlib.contextmanager
    def published(self):
        """A service published on a host address through DNAT, the way
        Docker publishes a container's port: the host's "internet" address,
        port+1, is the internet server.  Yields that port."""
        table = "oltdnat_" + self.bridge.split("-")[1]
        run("nft", "-f", "-", input_=(
            "table ip %s {\n chain pre {\n  type nat hook prerouting priority dstnat;\n"
            "  ip daddr %s tcp dport %d dnat to %s:%d\n }\n}\n" % (
                table, self.host_inet, self.port + 1, self.inet_addr, self.port)))
        try:
            yield self.port + 1
        finally:
            run("nft", "delete", "table", "ip", table)

    def host_addresses(self):
        """The host's addresses a sandbox might try: its gateway, the
        address on the "internet" veth, and the uplink's, if any."""
        found = [self.gateway, self.host_inet]
        route = subprocess.run(["ip", "-4", "route", "get", "9.9.9.9"],  # sends nothing
                               capture_output=True, text=True).stdout.split()
        if "src" in route:
            found.append(route[route.index("src") + 1])
        return found

    @contextlib.contextmanager
    def isolation_off(self):
        """Sandbox 1's bridge port not isolated: the direct, bridged path to
        sandbox 2 is open, and only br_netfilter plus the rules stop it."""
        run("bridge", "link", "set", "dev", self.veth1, "isolated", "off")
        try:
            yield
        finally:
            run("bridge", "link", "set", "dev", self.veth1, "isolated", "on")

    @contextlib.contextmanager
    def route_back(self):
        """The internet knows the sandboxes' subnet: lets it try to open a
        connection to a sandbox."""
        run("ip", "-n", self.inet, "route", "add", self.subnet, "via", self.host_inet)
        try:
            yield
        finally:
            run("ip", "-n", self.inet, "route", "del", self.subnet)


def leftovers(net):
    """Anything of this run still on the host."""
    found = []
    netns = run("ip", "netns", "list")
    found += [ns for ns in (net.s1, net.s2, net.inet) if ns in netns]
    links = run("ip", "-o", "link")
    found += [dev for dev in (net.bridge, net.veth1, net.veth2, net.uplink) if dev + ":" in links
              or dev + "@" in links]
    rules = ""
    if tool_works("nft", "list", "tables"):
        rules += run("nft", "list", "ruleset")
    if tool_works("iptables-save"):
        rules += run("iptables-save")  # every table, nat too
    found += ["rules of %s" % tag for tag in net.tags if tag in rules]
    return found


def iptables_nft_tables():
    """The iptables-nft tables there are (iptables-nft creates "filter",
    "nat" and "raw" on first use and leaves them, empty, behind)."""
    if not tool_works("nft", "list", "tables"):
        return None
    return set(run("nft", "list", "tables", "ip").split("\n")) & {
        "table ip filter", "table ip nat", "table ip raw"}


def drop_empty_tables(before):
    """Delete the iptables-nft tables this run made, if nothing is in them."""
    if before is None:
        return
    for line in iptables_nft_tables() - before:
        table = line.split()[-1]
        dump = run("iptables-save", "-t", table).splitlines()
        builtin = {":PREROUTING", ":INPUT", ":FORWARD", ":OUTPUT", ":POSTROUTING"}
        if not any(l.startswith("-A") or (l.startswith(":") and l.split()[0] not in builtin)
                   for l in dump):
            run("nft", "delete", "table", "ip", table)


@pytest.fixture(scope="module")
def net():
    """The topology, torn down whatever happens, and checked to be gone."""
    n = Net()
    tables_before = iptables_nft_tables()
    undo = []
    try:
        nat.enable_forwarding()  # the host routes between bridge and "internet"; left on

        run("ip", "link", "add", n.bridge, "type", "bridge")
        undo.append(lambda: run("ip", "link", "del", n.bridge))
        run("ip", "addr", "add", n.gateway + "/24", "dev", n.bridge)
        run("ip", "link", "set", n.bridge, "up")

        for ns, veth, address, other in ((n.s1, n.veth1, n.a1, n.a2), (n.s2, n.veth2, n.a2, n.a1)):
            run("ip", "netns", "add", ns)
            undo.append(lambda ns=ns: run("ip", "netns", "del", ns))
            run("ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
            # Deleted here, not with its namespace: the kernel deletes a
            # namespace's links in the background, after the check below.
            undo.append(lambda veth=veth: run("ip", "link", "del", veth))
            run("ip", "link", "set", veth, "master", n.bridge, "up")
            run("bridge", "link", "set", "dev", veth, "isolated", "on")
            run("ip", "-n", ns, "addr", "add", address + "/24", "dev", "eth0")
            run("ip", "-n", ns, "link", "set", "eth0", "up")
            run("ip", "-n", ns, "link", "set", "lo", "up")
            run("ip", "-n", ns, "route", "add", "default", "via", n.gateway)
            # A hostile sandbox that routes to its neighbour through the
            # host, the way around port isolation.  It ignores the host's
            # ICMP redirects, which would send it back to the isolated path.
            run("ip", "-n", ns, "route", "add", other + "/32", "via", n.gateway)
            run("ip", "netns", "exec", ns, "sysctl", "-qw", "net.ipv4.conf.all.accept_redirects=0")
        # Sandbox 2 has an address sandbox 1 reaches directly, over the bridge.
        run("ip", "-n", n.s2, "addr", "add", n.a2_l2 + "/24", "dev", "eth0")

        run("ip", "netns", "add", n.inet)
        undo.append(lambda: run("ip", "netns", "del", n.inet))
        run("ip", "link", "add", n.uplink, "type", "veth", "peer", "name", "eth0", "netns", n.inet)
        undo.append(lambda: run("ip", "link", "del", n.uplink))
        run("ip", "addr", "add", n.host_inet + "/24", "dev", n.uplink)
        run("ip", "link", "set", n.uplink, "up")
        run("ip", "-n", n.inet, "addr", "add", n.inet_addr + "/24", "dev", "eth0")
        run("ip", "-n", n.inet, "link", "set", "eth0", "up")
        # No route back to the sandboxes' subnet: only NAT makes replies work.

        for ns in (n.s1, n.s2, n.inet):
            server = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-c", SERVER,
                                       str(n.port)], stdout=subprocess.PIPE, text=True)
            undo.append(lambda s=server: (s.kill(), s.wait()))
            assert server.stdout.readline().strip() == "ready"

        # The host's own services, on every address it has (127.0.0.1 and
        # the bridge's too).
        host = socketserver.ThreadingTCPServer(("0.0.0.0", n.port), PeerHandler)
        host.daemon_threads = True
        threading.Thread(target=host.serve_forever, daemon=True).start()
        undo.append(lambda: (host.shutdown(), host.server_close()))

        yield n
    finally:
        errors = []
        for step in reversed(undo):
            try:
                step()
            except Exception as e:  # keep undoing the rest
                errors.append(str(e))
        for tag in n.tags:
            for backend in (nat.Nftables(), nat.Iptables()):
                try:
                    backend.remove(tag)
                except nat.NatError:
                    pass  # that tool is not there: nor are its rules
        drop_empty_tables(tables_before)
        errors += ["left behind: %s" % x for x in leftovers(n)]
        assert not errors, "; ".join(errors)


@pytest.fixture(params=["nftables", "iptables"])
def backend(request, net):
    if request.param == "nftables":
        if not tool_works("nft", "list", "tables"):
            pytest.skip("nft does not work here")
        b = nat.Nftables()
    else:
        if not tool_works("iptables", "-S", "INPUT"):
            pytest.skip("iptables does not work here")
        b = nat.Iptables()
    tag = "olt" + secrets.token_hex(3)
    net.tags.append(tag)
    try:
        yield b, tag
    finally:
        b.remove(tag)


def test_detect_finds_a_working_tool():
    backend = nat.detect()
    if isinstance(backend, nat.Nftables):
        assert tool_works("nft", "list", "tables")
    else:
        assert isinstance(backend, nat.Iptables)
        assert tool_works("iptables", "-S", "INPUT")


def test_forwarding_is_enabled(net):
    nat.enable_forwarding()
    with open("/proc/sys/net/ipv4/ip_forward") as f:
        assert f.read().strip() == "1"


def test_the_host_serves_on_its_own_addresses(net):
    """The host's server is up: when a sandbox cannot reach it, that is the
    rules."""
    for address in ["127.0.0.1", *net.host_addresses()]:
        with socket.create_connection((address, net.port), timeout=2) as s:
            assert s.recv(100)


def test_policy(net, backend):
    b, tag = backend

    # Controls, with no rules of ours: everything a sandbox may not do, it
    # can; and without NAT the internet cannot answer.
    assert not b.installed(tag)
    for address in net.host_addresses():
        assert net.reach(net.s1, address) == net.a1, address
    assert net.reach(net.s1, net.a2) == net.a1
    with net.isolation_off():
        assert net.reach(net.s1, net.a2_l2) == net.a1
    assert net.reach(net.s1, net.inet_addr) is None
    with net.route_back():
        assert net.reach(net.inet, net.a1) == net.inet_addr

    b.install(tag, net.bridge, net.subnet)
    b.install(tag, net.bridge, net.subnet)  # idempotent
    assert b.installed(tag)

    # Out, masqueraded to the host's address on the "internet" side.
    assert net.reach(net.s1, net.inet_addr) == net.host_inet
    # Not the host, on any of its addresses.
    for address in net.host_addresses():
        assert net.reach(net.s1, address) is None, address
    # Not the other sandbox: not routed through the host...
    assert net.reach(net.s1, net.a2) is None
    # ...nor bridged, even with port isolation off (br_netfilter).
    with net.isolation_off():
        assert net.reach(net.s1, net.a2_l2) is None
    # Nothing outside opens a connection to a sandbox.
    with net.route_back():
        assert net.reach(net.inet, net.a1) is None
    # The host itself still reaches its own services.
    with socket.create_connection((net.gateway, net.port), timeout=2) as s:
        assert s.recv(100)


UDP_FLOWS = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
if sys.argv[4] != "-":
    s.bind((sys.argv[4], 0))  # a source address of the caller's choosing
for port in range(int(sys.argv[2]), int(sys.argv[2]) + int(sys.argv[3])):
    s.sendto(b"x", (sys.argv[1], port))  # one conntrack entry each, if forwarded
"""


def udp_flows(ns, address, first_port, count, source="-"):
    run("ip", "netns", "exec", ns, sys.executable, "-c", UDP_FLOWS, address, str(first_port),
        str(count), source)


def flows_from(address):
    """How many conntrack entries the host has from `address`: the packets
    it forwarded (one it drops leaves none)."""
    from pyroute2 import Conntrack
    from pyroute2.netlink.nfnetlink.nfctsocket import NFCTAttrTuple
    with Conntrack() as ct:
        return len(list(ct.dump_entries(tuple_orig=NFCTAttrTuple(saddr=address))))


@pytest.fixture
def no_flows(net):
    """The sandboxes' conntrack entries are forgotten before and after."""
    from sandbox.conntrack import Flows
    flows = Flows()
    spoofed = "10.251.%s.9" % net.subnet.split(".")[2]
    try:
        for address in (net.a1, net.a2, spoofed):
            flows.forget(address)
        yield spoofed
        for address in (net.a1, net.a2, spoofed):
            flows.forget(address)
    finally:
        flows.close()


def test_a_sandbox_and_the_worker_hold_at_most_their_share_of_flows(net, backend, no_flows):
    b, tag = backend
    # Control: with the host's limits, 30 flows pass.  (The host tracks
    # connections only once some rule needs it: ours do.)
    b.install(tag, net.bridge, net.subnet)
    udp_flows(net.s1, net.inet_addr, 20000, 30)
    assert flows_from(net.a1) == 30
    # A new install counts afresh, from the next connection.
    b.install(tag, net.bridge, net.subnet, limits=nat.FlowLimits(
        per_sandbox=10, per_worker=15, new_per_sandbox=100000, new_per_worker=100000))
    udp_flows(net.s1, net.inet_addr, 21000, 30)
    assert flows_from(net.a1) == 30 + 10
    # The other sandbox gets what is left of the worker's share.
    udp_flows(net.s2, net.inet_addr, 21000, 30)
    assert flows_from(net.a2) == 5


@pytest.mark.parametrize("limits", [
    nat.FlowLimits(per_sandbox=40, per_worker=1000, new_per_sandbox=1, new_per_worker=100000),
    nat.FlowLimits(per_sandbox=1000, per_worker=40, new_per_sandbox=100000, new_per_worker=1)],
    ids=["per-sandbox", "per-worker"])
def test_new_connections_a_second_are_limited(net, backend, no_flows, limits):
    """ct count leaves out TCP connections that ended (TIME_WAIT, CLOSE),
    which stay in the table: only a rate bounds them.  After a burst of a
    quarter of the count, one new flow a second."""
    b, tag = backend
    b.install(tag, net.bridge, net.subnet, limits=limits)
    udp_flows(net.s1, net.inet_addr, 23000, 30)
    assert 10 <= flows_from(net.a1) <= 12


REFUSED = """
import errno, socket, sys, time
for port in range(24000, 24008):  # the sandbox's whole count, held 30 s by UDP
    socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b"x", (sys.argv[1], port))
    time.sleep(0.01)  # under the rate (hashlimit refills each jiffy)
for _ in range(10):
    start = time.monotonic()
    try:
        socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=1).close()
        print("connected")
    except socket.timeout:
        print("timeout")
    except OSError as e:
        print(errno.errorcode[e.errno], round(time.monotonic() - start, 2))
"""


def test_a_connection_over_a_limit_is_refused_at_once(net, backend, no_flows):
    """By a TCP reset: ICMP errors would be held to the host's ICMP rate
    limit, and most connections would time out instead."""
    b, tag = backend
    b.install(tag, net.bridge, net.subnet, limits=nat.FlowLimits(
        per_sandbox=8, per_worker=1000, new_per_sandbox=100000, new_per_worker=100000))
    out = run("ip", "netns", "exec", net.s1, sys.executable, "-c", REFUSED, net.inet_addr,
              str(net.port)).split("\n")[:-1]
    assert len(out) == 10 and all(line.startswith("ECONNREFUSED ") for line in out), out
    assert max(float(line.split()[1]) for line in out) < 0.5, out


UDP_COUNTER = """
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", int(sys.argv[1])))
s.settimeout(0.2)
print("ready", flush=True)
seen, deadline = 0, time.monotonic() + float(sys.argv[2])
while time.monotonic() < deadline:
    try:
        s.recv(100)
        seen += 1
    except socket.timeout:
        pass
print(seen, flush=True)
"""

ONE_WAY = """
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for _ in range(300):
    s.sendto(b"metric:1|c", (sys.argv[1], int(sys.argv[2])))
    time.sleep(0.001)
"""


def test_a_flow_without_replies_counts_once_against_the_rate(net, backend, no_flows):
    """Until a reply comes each of its packets is "new" to conntrack: a
    one-way sender (statsd, syslog) must not be held to the new
    connections a second."""
    b, tag = backend
    b.install(tag, net.bridge, net.subnet, ct_mark=0x6f6c0000 | random.randint(1, 0xffff),
              limits=nat.FlowLimits(per_sandbox=40, per_worker=1000, new_per_sandbox=1,
                                    new_per_worker=100000))
    counter = subprocess.Popen(["ip", "netns", "exec", net.inet, sys.executable, "-c",
                                UDP_COUNTER, str(net.port + 2), "2"], stdout=subprocess.PIPE,
                               text=True)
    assert counter.stdout.readline().strip() == "ready"
    run("ip", "netns", "exec", net.s1, sys.executable, "-c", ONE_WAY, net.inet_addr,
        str(net.port + 2))
    assert int(counter.communicate(timeout=10)[0]) == 300  # not the burst of 10


def test_ended_connections_leave_the_table_soon_and_flows_carry_the_mark(net, backend, no_flows):
    from sandbox.conntrack import Flows
    b, tag = backend
    mark = 0x6f6c0000 | random.randint(1, 0xffff)
    b.install(tag, net.bridge, net.subnet, ct_mark=mark)
    assert net.reach(net.s1, net.inet_addr) == net.host_inet  # the server closes at once
    (entry,) = tcp_entries_from(net.a1)
    assert entry["mark"] == mark
    deadline = time.monotonic() + 5
    while entry["state"] != "TIME_WAIT" and time.monotonic() < deadline:
        time.sleep(0.05)
        (entry,) = tcp_entries_from(net.a1)
    assert entry["state"] == "TIME_WAIT"
    closing = nat.Nftables.CLOSING_TIMEOUT if b.name == "nftables" \
        else nat.host_closing_timeout()
    assert entry["timeout"] <= closing
    flows = Flows()
    try:
        flows.forget_marked(mark)  # what a worker's start and stop do
    finally:
        flows.close()
    assert tcp_entries_from(net.a1) == []


def tcp_entries_from(address):
    from pyroute2 import Conntrack
    from pyroute2.netlink.nfnetlink.nfctsocket import NFCTAttrTuple
    with Conntrack() as ct:
        return [{"mark": e.mark, "timeout": e.timeout, "state": e.protoinfo.state_name()}
                for e in ct.dump_entries(tuple_orig=NFCTAttrTuple(saddr=address,
                                                                  proto=socket.IPPROTO_TCP))]


STRAY_SEGMENT = """
import socket, struct, sys
src, dst, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
# A FIN|ACK of no connection conntrack knows: what an orphaned socket sends
# once its connection's entry was deleted.
header = struct.pack("!HHIIBBHHH", 40000, port, 1, 1, 5 << 4, 0x11, 1024, 0, 0)
pseudo = socket.inet_aton(src) + socket.inet_aton(dst) + struct.pack("!BBH", 0, 6, len(header))
total = sum(struct.unpack("!%dH" % ((len(pseudo) + len(header)) // 2), pseudo + header))
while total >> 16:
    total = (total & 0xffff) + (total >> 16)
header = header[:16] + struct.pack("!H", ~total & 0xffff) + header[18:]
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_TCP)
for _ in range(3):
    s.sendto(header, (dst, 0))
"""

SEGMENT_COUNTER = """
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_TCP)
s.settimeout(0.2)
print("ready", flush=True)
seen, deadline = 0, time.monotonic() + float(sys.argv[1])
while time.monotonic() < deadline:
    try:
        data = s.recv(100)
    except socket.timeout:
        continue
    if data[20:22] == (40000).to_bytes(2, "big"):
        seen += 1
print(seen, flush=True)
"""


def stray_segments_out(net):
    """How many of 3 stray TCP segments from sandbox 1 reach the internet."""
    counter = subprocess.Popen(["ip", "netns", "exec", net.inet, sys.executable, "-c",
                                SEGMENT_COUNTER, "1.5"], stdout=subprocess.PIPE, text=True)
    assert counter.stdout.readline().strip() == "ready"
    run("ip", "netns", "exec", net.s1, sys.executable, "-c", STRAY_SEGMENT, net.a1,
        net.inet_addr, "9")
    return int(counter.communicate(timeout=10)[0])


def test_what_conntrack_cannot_place_does_not_leave(net, backend):
    """Such a segment would leave without NAT, with the sandbox's own
    address: conntrack marks it invalid, and masquerading skips it."""
    b, tag = backend
    run("nft", "-f", "-", input_="table ip oltrack {\n chain f {\n  type filter hook "
        "forward priority 0;\n  ct state new accept\n }\n}\n")
    try:
        assert stray_segments_out(net) == 3  # control: conntrack on, nothing drops it
    finally:
        run("nft", "delete", "table", "ip", "oltrack")
    b.install(tag, net.bridge, net.subnet)
    assert stray_segments_out(net) == 0


def test_nothing_leaves_with_a_source_outside_the_subnet(net, backend, no_flows):
    b, tag = backend
    spoofed = no_flows
    run("ip", "-n", net.s1, "addr", "add", spoofed + "/32", "dev", "eth0")
    try:
        # Control: forwarded under rules that do not check the source (the
        # host tracks connections only once some rule needs it).
        run("nft", "-f", "-", input_="table ip oltrack {\n chain f {\n  type filter hook "
            "forward priority 0;\n  ct state new accept\n }\n}\n")
        try:
            udp_flows(net.s1, net.inet_addr, 22000, 1, source=spoofed)
            assert flows_from(spoofed) == 1
        finally:
            run("nft", "delete", "table", "ip", "oltrack")
        b.install(tag, net.bridge, net.subnet)
        udp_flows(net.s1, net.inet_addr, 22001, 1, source=spoofed)
        assert flows_from(spoofed) == 1
        udp_flows(net.s1, net.inet_addr, 22001, 1)
        assert flows_from(net.a1) == 1  # its own address still goes out
    finally:
        run("ip", "-n", net.s1, "addr", "del", spoofed + "/32", "dev", "eth0")


def test_install_twice_leaves_one_set_of_rules(net, backend):
    b, tag = backend
    b.install(tag, net.bridge, net.subnet)
    b.install(tag, net.bridge, net.subnet)
    if b.name == "nftables":
        assert run("nft", "list", "ruleset").count("table ip openlambda_%s " % tag) == 1
    else:
        dump = run("iptables-save")  # every table, nat too
        for chain in ("INPUT", "FORWARD", "POSTROUTING"):
            jumps = [l for l in dump.splitlines() if l.startswith("-A %s " % chain) and tag in l]
            assert len(jumps) == 1, jumps
            assert "-A %s -m comment --comment openlambda-%s " % (chain, tag) in dump


def test_remove_leaves_no_trace(net, backend):
    b, tag = backend
    b.install(tag, net.bridge, net.subnet)
    b.remove(tag)
    assert not b.installed(tag)
    b.remove(tag)  # idempotent
    assert not [x for x in leftovers(net) if tag in x]
    # The sandbox is back to its unfiltered state.
    assert net.reach(net.s1, net.gateway) == net.a1


def test_bad_names_are_refused_in_one_line():
    for args in (("ol 80", "olbr80", "10.1.2.0/24"), ("ol80", "br;drop", "10.1.2.0/24"),
                 ("ol80", "olbr80", "10.1.2.3/24"), ("o" * 22, "olbr80", "10.1.2.0/24")):
        for b in (nat.Nftables(), nat.Iptables()):
            with pytest.raises(nat.NatError) as e:
                b.install(*args)
            assert str(e.value).startswith("install %s rules for %s" % (b.name, args[0]))
            assert "\n" not in str(e.value)


def test_services_published_through_dnat_stay_closed(net, backend):
    if not tool_works("nft", "list", "tables"):
        pytest.skip("the published service is made with nft")
    b, tag = backend
    with net.published() as port, net.route_back():
        # Control: without our rules a sandbox reaches it (DNAT, then forwarded).
        assert net.reach(net.s1, net.host_inet, port) == net.a1
        b.install(tag, net.bridge, net.subnet)
        assert net.reach(net.s1, net.host_inet, port) is None
