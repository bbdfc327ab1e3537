"""Egress for the sandboxes whose function asks for it.

Every sandbox has a network namespace of its own with only a loopback (the
shell makes it).  A sandbox with egress instead joins a namespace prepared
here ahead of time:
- a veth pair whose host end is a port of the worker's bridge, isolated
  (bridge port isolation: ports cannot talk to each other, only through the
  host, whose rules drop such traffic);
- an address from the worker's subnet and a default route to the bridge;
- the host masquerades its traffic to the uplink and drops whatever it
  sends to the host itself (sandbox.nat).

A namespace whose sandbox sent nothing is reused; one that sent anything is
deleted, with the host's conntrack entries of its address
(sandbox.conntrack), and its address is given to a new one.

Namespaces are made in the background, kept ready, and recycled when their
sandbox is gone: no namespace or veth is made or deleted on a request.  A
shell joins one with setns when it is given its function.

Everything here that talks netlink runs on one thread of its own: pyroute2
must not run on the worker's event loop, and a thread can enter another
network namespace (unshare, setns) without moving the rest of the process.

    python -m sandbox.network cleanup PORT...   removes what a worker on
                                                PORT left (after SIGKILL)
"""
import asyncio
import collections
import concurrent.futures
import errno
import ipaddress
import os
import socket
import sys
import time
from dataclasses import dataclass

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from . import filelock, nat
from .conntrack import Flows
from .errors import CapacityError, SandboxError
from .pools import Refill, wait_for_item
from .runtime import syscalls as sc

MAIN_TABLE = 254

# A port's bridge and NAT rules are named by the port alone, host-wide.  The
# worker that has them holds this lock while they exist, so that nothing
# else takes them away: not another worker on that port (another cluster's,
# listening on another address), nor `admin kill` of a cluster whose record
# of a killed worker names the port.  In /run: gone with a reboot, as they are.
LOCK_DIR = "/run/openlambda"
# `admin kill` holds it for a moment while it removes a killed worker's
# leftovers: a worker starting on the port then waits this long for it.
LOCK_WAIT = 3.0


def network_lock(port):
    return os.path.join(LOCK_DIR, "egress-%d.lock" % port)


def claim_network(port, wait=0.0):
    """network_lock(port)'s fd, held; None if another process holds it for
    `wait` seconds.  A SandboxError if it cannot be made."""
    path = network_lock(port)
    deadline = time.monotonic() + wait
    try:
        os.makedirs(LOCK_DIR, exist_ok=True)
        while True:
            fd = filelock.claim(path)
            if fd is not None or time.monotonic() >= deadline:
                return fd
            time.sleep(0.05)
    except OSError as e:
        raise SandboxError("lock", path, "%s: it says which worker has port %d's bridge and "
                           "rules" % (e.strerror, port)) from None


def worker_subnet(subnet, port):
    """The /24 a worker uses: `subnet` itself if it is a /24, else the
    (port mod n)th of the n /24s in it, so the workers of one cluster each
    get their own."""
    net = ipaddress.IPv4Network(subnet)
    if net.prefixlen > 24:
        raise ValueError("egress subnet %s is smaller than a /24" % subnet)
    blocks = 1 << (24 - net.prefixlen)
    return ipaddress.IPv4Network((int(net.network_address) + (port % blocks) * 256, 24))


@dataclass
class Lease:
    """A prepared namespace; holding its fd keeps it (and its veth) alive."""
    address: str
    fd: int
    veth: str       # the host's end
    index: int      # of the address in the worker's /24
    sent: int = -1  # packets it had sent when it was made (-1: unknown)


def packets_sent(veth):
    """How many packets the namespace behind `veth` has sent (the host's
    end receives them); -1 if it cannot be read."""
    try:
        with open("/sys/class/net/%s/statistics/rx_packets" % veth) as f:
            return int(f.read())
    except (OSError, ValueError):
        return -1


def nameservers(path):
    """The IPv4 nameservers a resolv.conf names (none if it cannot be read)."""
    found = []
    try:
        with open(path) as f:
            for line in f:
                words = line.split()
                if len(words) >= 2 and words[0] == "nameserver":
                    try:
                        found.append(ipaddress.IPv4Address(words[1]))
                    except ValueError:
                        pass  # IPv6: the subnet is IPv4
    except OSError:
        pass
    return found


class EgressNetwork:
    def __init__(self, port, subnet, spare, log=print, resolv_confs=("/etc/resolv.conf",)):
        self.port = port
        self.resolv_confs = resolv_confs  # whose nameservers the subnet must not hold
        self.bridge = nat.bridge_name(port)
        self.tag = nat.worker_tag(port)
        self.subnet = worker_subnet(subnet, port)
        hosts = list(self.subnet.hosts())
        self.gateway, self.addresses = str(hosts[0]), [str(h) for h in hosts[1:]]
        self.spare = spare
        self.log = log
        self.free = collections.deque()     # leases ready for a sandbox, oldest first
        self.unused = list(range(len(self.addresses)))[::-1]  # address indexes without a namespace
        self.made = collections.Counter()   # namespaces made for each address index
        self.making = 0
        self.discarding = 0                 # used namespaces being deleted
        self.waiters = collections.deque()  # futures of acquire() calls
        self.refill_later = Refill(self._refill)
        self.closing = False
        self.thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="ol-network")
        self.ipr = None       # the thread's netlink socket, in the host's namespace
        self.host_ns = None   # the host's network namespace, for the thread to return to
        self.backend = None   # the host's NAT tool (sandbox.nat)
        self.flows = None     # the thread's conntrack socket, in the host's namespace
        self.lock = None      # network_lock's fd, while the bridge and rules are ours

    def describe(self):
        return "%s on bridge %s" % (self.subnet, self.bridge)

    # -- start and stop ------------------------------------------------------------
    async def start(self):
        await self._in_thread(self._setup)
        self._refill()

    async def _in_thread(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.thread, fn, *args)

    def _setup(self):
        """Bridge and rules, or a SandboxError and nothing changed."""
        self.lock = claim_network(self.port, LOCK_WAIT)
        if self.lock is None:
            raise SandboxError("enable egress", self.bridge,
                               "another running worker on port %d has it (another cluster's,"
                               " on another address?): give this worker another port" % self.port)
        self.host_ns = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        self.ipr = IPRoute()
        try:
            backend = self.backend = nat.detect()
        except nat.NatError as e:
            raise SandboxError("enable egress", self.subnet, str(e)) from None
        self.flows = Flows()
        # A worker on this port that was SIGKILLed left its bridge, rules
        # and flows.
        remove_leftovers(self.ipr, self.port, backend, self.flows)
        self._check_subnet_is_free()
        try:
            # A fixed MAC.  A bridge without one takes the lowest MAC of its
            # ports and changes it whenever a veth with a lower one joins:
            # sandboxes (and recycled namespaces) would keep the old one in
            # their ARP cache for up to a minute, and the host drops frames
            # sent to it, so they lose the internet until it expires.
            self.ipr.link("add", ifname=self.bridge, kind="bridge",
                          address=bridge_mac(self.port))
            index = socket.if_nametoindex(self.bridge)
            # No IPv6 on our links: the host would answer on a link-local
            # address, which no IPv4 rule covers.
            set_sysctl("ipv6/conf/%s/disable_ipv6" % self.bridge, "1")
            # Sandboxes talk only to the gateway; a redirect would point one
            # at a direct path to another, which the bridge refuses anyway.
            set_sysctl("ipv4/conf/%s/send_redirects" % self.bridge, "0")
            self.ipr.addr("add", index=index, address=self.gateway, prefixlen=24)
            self.ipr.link("set", index=index, state="up")
        except (NetlinkError, OSError) as e:
            remove_leftovers(self.ipr, self.port, backend, self.flows)
            raise SandboxError("create bridge", self.bridge, str(e)) from None
        try:
            backend.install(self.tag, self.bridge, str(self.subnet), nat.worker_mark(self.port))
            if nat.enable_forwarding():
                self.log("egress: turned on IPv4 forwarding (net.ipv4.ip_forward) for the whole "
                         "host; it stays on after the worker stops")
        except nat.NatError as e:
            remove_leftovers(self.ipr, self.port, backend, self.flows)
            raise SandboxError("enable egress", self.subnet, str(e)) from None

    def _check_subnet_is_free(self):
        """Refuse a subnet that overlaps one the host already routes, or
        holds an address the host reaches through its default route (its
        gateway, its nameservers or the rootfs's): with the bridge up, their
        traffic (the host's, or its sandboxes') would go the wrong way."""
        for route in self.ipr.get_routes(family=socket.AF_INET):
            if route.get("RTA_TABLE", route["table"]) != MAIN_TABLE:
                continue
            dst, length = route.get("RTA_DST"), route["dst_len"]
            if not dst or not length:  # the default route: its gateway
                gateway = route.get("RTA_GATEWAY")
                if gateway and ipaddress.IPv4Address(gateway) in self.subnet:
                    self._clash("the host's default gateway %s" % gateway)
                continue
            if ipaddress.IPv4Network((dst, length), strict=False).overlaps(self.subnet):
                dev = self.ipr.get_links(route.get("RTA_OIF"))[0].get("IFLA_IFNAME") \
                    if route.get("RTA_OIF") else "?"
                self._clash("the host's route %s/%d dev %s" % (dst, length, dev))
        for path in self.resolv_confs:
            for server in nameservers(path):
                if server in self.subnet:
                    self._clash("the nameserver %s of %s" % (server, path))

    def _clash(self, what):
        raise SandboxError("enable egress", self.subnet,
                           "it clashes with %s: choose another egress.subnet" % what)

    async def close(self):
        """Drop every namespace and remove the bridge and the rules."""
        self.closing = True
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_exception(SandboxError("give egress", self.subnet,
                                                  "the worker is shutting down"))
        for lease in self.free:
            os.close(lease.fd)  # its veth goes with the namespace, or at the teardown
        self.free.clear()
        if self.lock is not None:
            await self._in_thread(self._teardown)
        self.thread.shutdown(wait=True)

    def _teardown(self):
        """What _setup made, all or in part."""
        if self.ipr is not None:
            try:
                remove_leftovers(self.ipr, self.port, self.backend, self.flows)
            except SandboxError as e:
                self.log(str(e))  # the next start, or `admin kill`, tries again
            self.ipr.close()
        if self.flows is not None:
            self.flows.close()
        if self.host_ns is not None:
            os.close(self.host_ns)
        filelock.release(network_lock(self.port), self.lock)

    # -- leases --------------------------------------------------------------------
    async def acquire(self):
        """A prepared namespace for a sandbox: at once if one is ready."""
        if self.closing:
            raise SandboxError("give egress", self.subnet, "the worker is shutting down")
        lease = self._take_free()
        if lease is not None:
            self.refill_later.after_take(len(self.free) + self.making, self.spare)
            return lease
        if not self.unused and not self.making and not self.discarding:
            raise CapacityError("give egress", self.subnet, "all %d addresses are in use"
                                % len(self.addresses))
        waiter = asyncio.get_running_loop().create_future()
        self.waiters.append(waiter)
        self._refill()
        return await wait_for_item(waiter, self.waiters,
                                   lambda lease: self.release(lease, reusable=True))

    def release(self, lease, reusable):
        """Its sandbox is gone.  A namespace that sent nothing since it was
        made is handed out again, oldest first.  Any other is discarded:
        what a sandbox can leave in a namespace it used is more than anyone
        can list and scrub (orphaned TCP sockets that go on sending,
        neighbour and path-MTU caches, TCP metrics, TIME_WAIT sockets), and
        none of it may reach the next tenant of its address."""
        if self.closing:
            os.close(lease.fd)  # the teardown, under way, deletes its veth
        elif reusable and self._unused(lease):
            self.free.append(lease)
            self._give_waiters()
        else:
            self._discard_later(lease)

    @staticmethod
    def _unused(lease):
        return lease.sent >= 0 and packets_sent(lease.veth) == lease.sent

    def _take_free(self):
        """The oldest ready namespace, checked once more: a kernel timer may
        have sent something of a namespace's since its release (IGMP
        reports did, before multicast was turned off in them)."""
        while self.free:
            lease = self.free.popleft()
            if self._unused(lease):
                return lease
            self._discard_later(lease)
        return None

    def _discard_later(self, lease):
        self.discarding += 1
        future = asyncio.get_running_loop().run_in_executor(self.thread, self._discard, lease)
        future.add_done_callback(lambda f, lease=lease: self._discarded(lease, f))

    def _fail_waiters_beyond_capacity(self, error):
        """Say why rather than leave a call waiting, unless a namespace
        still being made or discarded (its address then made anew) can
        serve it."""
        while self.waiters and self.making + self.discarding < len(self.waiters):
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_exception(error)
                break

    def _discard(self, lease):
        """In the thread: set the namespace's veth down, so that nothing left
        in it can send any more (a namespace outlives its last process while
        a socket holds it, and an orphaned TCP socket goes on sending), then
        delete the host's conntrack entries of its address (else a server it
        talked to could go on sending into the next sandbox at that address:
        each packet renews a UDP entry), then let the namespace go.  The
        kernel deletes it and its veth in the background: deleting a veth
        here takes 14 ms, setting it down 0.6."""
        try:
            self.ipr.link("set", index=socket.if_nametoindex(lease.veth), state="down")
        except OSError:
            pass  # gone already (if_nametoindex), with its namespace
        except NetlinkError as e:
            if e.code != errno.ENODEV:
                raise SandboxError("set down", lease.veth, str(e)) from None
        finally:
            os.close(lease.fd)
        self.flows.forget(lease.address)

    def _discarded(self, lease, future):
        self.discarding -= 1
        try:
            future.result()
        except Exception as e:  # the thread's own failures, named or not
            error = e if isinstance(e, SandboxError) else SandboxError(
                "discard egress namespace", lease.address, repr(e))
            self.log("%s; the address is not used again until restart" % error)
            self._fail_waiters_beyond_capacity(error)
            return
        if not self.closing:
            self.unused.insert(0, lease.index)  # made anew last: its entries expire meanwhile
            self._refill()

    def _give_waiters(self):
        while self.free and self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_result(self.free.popleft())

    def _refill(self):
        wanted = self.spare + len(self.waiters)
        while not self.closing and self.unused and len(self.free) + self.making < wanted:
            index = self.unused.pop()
            self.making += 1
            future = asyncio.get_running_loop().run_in_executor(self.thread, self._make, index)
            future.add_done_callback(lambda f, index=index: self._made(index, f))

    def _made(self, index, future):
        self.making -= 1
        try:
            lease = future.result()
        except Exception as e:  # the thread's own failures, named or not
            self.unused.insert(0, index)  # tried again last, not next
            error = e if isinstance(e, SandboxError) else SandboxError(
                "prepare egress namespace", self.addresses[index], repr(e))
            self.log(str(error))
            self._fail_waiters_beyond_capacity(error)
            return
        if self.closing:
            os.close(lease.fd)
            return
        self.free.append(lease)
        self._give_waiters()

    def _make(self, index):
        """In the thread: a namespace with a veth into the bridge, addressed
        and routed.  The thread alone enters it, and always comes back."""
        # A new name each time (15 characters at most): the veth of a
        # discarded namespace lives on, down, until the kernel deletes it.
        veth = "olv%d-%d.%d" % (self.port, index, self.made[index] % 100)
        self.made[index] += 1
        address = self.addresses[index]
        fd = -1
        try:
            try:
                sc.unshare(sc.CLONE_NEWNET)
                fd = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
                # Nothing a namespace sends of its own accord, for one that
                # sent nothing is reused as it is: no IPv6 on the eth0 made
                # below (egress is IPv4 only: router solicitations and the
                # like), and no multicast groups (their IGMP reports go out
                # on a timer, after their sandbox is gone; multicast has no
                # way through NAT anyway).
                set_sysctl("ipv6/conf/default/disable_ipv6", "1")
                set_sysctl("ipv4/igmp_max_memberships", "0")
            finally:
                sc.setns(self.host_ns, sc.CLONE_NEWNET)
            try:
                self.ipr.link("add", ifname=veth, kind="veth",
                              peer={"ifname": "eth0", "net_ns_fd": fd})
            except NetlinkError as e:
                if e.code != errno.EEXIST:
                    raise
                # Left by a worker on this port that just went, or by a
                # namespace of ours discarded 100 generations ago: the
                # kernel deletes namespaces, and their veths, in the background.
                self.ipr.link("del", ifname=veth)
                self.ipr.link("add", ifname=veth, kind="veth",
                              peer={"ifname": "eth0", "net_ns_fd": fd})
            # Names to indexes by ioctl, in the thread's current namespace:
            # a netlink lookup would list every link (hundreds of veths).
            link = socket.if_nametoindex(veth)
            set_sysctl("ipv6/conf/%s/disable_ipv6" % veth, "1")
            self.ipr.link("set", index=link, master=socket.if_nametoindex(self.bridge),
                          state="up")
            # Isolated: frames between two sandboxes' ports are not bridged.
            self.ipr.brport("set", index=link, isolated=1)
            sc.setns(fd, sc.CLONE_NEWNET)
            try:
                with IPRoute() as inside:
                    eth0 = socket.if_nametoindex("eth0")
                    inside.link("set", index=socket.if_nametoindex("lo"), state="up")
                    inside.addr("add", index=eth0, address=address, prefixlen=24)
                    inside.link("set", index=eth0, state="up")
                    inside.route("add", dst="default", gateway=self.gateway)
            finally:
                sc.setns(self.host_ns, sc.CLONE_NEWNET)
        except BaseException as e:
            if fd >= 0:
                os.close(fd)  # the veth goes with the namespace
            if isinstance(e, (NetlinkError, OSError)):
                raise SandboxError("prepare egress namespace", "%s (%s)" % (veth, address),
                                   str(e)) from None
            raise
        return Lease(address, fd, veth, index, packets_sent(veth))


def bridge_mac(port):
    """Locally administered (02:), unicast, and one per worker port."""
    return "02:6f:6c:00:%02x:%02x" % (port >> 8, port & 0xff)


def set_sysctl(name, value):
    """A net sysctl of the thread's current network namespace."""
    try:
        with open("/proc/sys/net/" + name, "w") as f:
            f.write(value)
    except FileNotFoundError:
        pass  # a kernel without IPv6


def detect_nat():
    """The host's NAT tool, or None: a host without one has no rules either."""
    try:
        return nat.detect()
    except nat.NatError:
        return None


def remove_leftovers(ipr, port, backend, flows):
    """What a worker on `port` left, if anything: veths that a namespace
    kept (an orphaned TCP socket holds one after its last process), the
    bridge, the rules (of NAT tool `backend`, if any) and the conntrack
    entries its sandboxes opened (through `flows`, if any).  In that order:
    a veth left without the bridge, or the bridge without the rules, would
    have what a namespace sends routed out as it is."""
    for link in _veths(ipr, port):
        _delete_link(ipr, link["index"], link.get_attr("IFLA_IFNAME"))
    try:
        _delete_link(ipr, socket.if_nametoindex(nat.bridge_name(port)), nat.bridge_name(port))
    except OSError:
        pass  # there was none
    try:
        if backend is not None:
            backend.remove(nat.worker_tag(port))
    except nat.NatError:
        pass  # the tool refused; the next start or kill tries again
    if flows is not None:
        flows.forget_marked(nat.worker_mark(port))


def _veths(ipr, port):
    """The veths of a worker on `port` (every link of the host is listed:
    at start and stop only)."""
    prefix = "olv%d-" % port
    return [link for link in ipr.get_links()
            if link.get_attr("IFLA_IFNAME", "").startswith(prefix)]


def _left_by(ipr, port, backend):
    """What remove_leftovers finds of a worker on `port`, in words."""
    veths = len(_veths(ipr, port))
    found = ["%d veth(s)" % veths] if veths else []
    if os.path.exists("/sys/class/net/" + nat.bridge_name(port)):
        found.append("the bridge " + nat.bridge_name(port))
    try:
        if backend is not None and backend.installed(nat.worker_tag(port)):
            found.append("its %s rules" % backend.name)
    except nat.NatError:
        pass  # remove_leftovers tries anyway
    return found


def _delete_link(ipr, index, name):
    try:
        ipr.link("del", index=index)
    except NetlinkError as e:
        if e.code != errno.ENODEV:  # gone meanwhile
            raise SandboxError("delete link", name, str(e)) from None


def cleanup(ports):
    """Remove what workers on `ports` left, but for a port whose network a
    running worker has (network_lock)."""
    backend = detect_nat()
    flows = Flows()
    try:
        with IPRoute() as ipr:
            for port in ports:
                lock = claim_network(port)
                if lock is None:
                    continue
                try:
                    found = _left_by(ipr, port, backend)
                    remove_leftovers(ipr, port, backend, flows)
                finally:
                    filelock.release(network_lock(port), lock)
                print("removed the egress network the worker on port %d left: %s" % (
                    port, ", ".join(found + ["its conntrack entries"])))
    finally:
        flows.close()


if __name__ == "__main__":
    if len(sys.argv) < 3 or sys.argv[1] != "cleanup" or not all(a.isdigit() for a in sys.argv[2:]):
        sys.exit("usage: python -m sandbox.network cleanup PORT...")
    try:
        cleanup(int(a) for a in sys.argv[2:])
    except SandboxError as e:
        sys.exit("network cleanup: %s" % e)
