"""The packet filter and NAT rules that give egress sandboxes the network
and nothing else.

A worker's egress sandboxes sit behind a bridge of its own (see
sandbox.network).  The rules, all keyed by a short tag naming the worker:
- NAT: traffic from the worker's subnet that leaves through any other
  interface is masqueraded to the uplink's address;
- forwarding: from the bridge outwards is accepted, towards the bridge only
  replies (conntrack established/related); new connections in are dropped;
- the host is closed: anything from the bridge for one of the host's
  addresses is dropped before DNAT (prerouting), so neither the worker's
  HTTP port nor any service, published through DNAT or not, is reachable;
- so are other sandboxes (this worker's or another's: any bridge named
  BRIDGE_PREFIX...; port isolation stops the direct, bridged path), cloud
  metadata services, and anything a DNAT rule redirected;
- nothing leaves with a source address outside the subnet, nor what
  conntrack cannot place (it would leave without NAT);
- the sandboxes take a bounded share of the host's conntrack table
  (FlowLimits), and their entries carry the worker's mark (worker_mark).

Two backends do the same with the tool the host has: Nftables (a table of
its own, replaced in one transaction) and Iptables (chains of its own,
jumped to from raw PREROUTING, INPUT, FORWARD and nat POSTROUTING).  Both
are IPv4 only: the bridge and the host's ends of the veths must have IPv6
turned off.

Limitation of the Nftables backend: a packet must be accepted by every base
chain on a hook, so if the host's iptables FORWARD policy is DROP (Docker
sets it), our table's accept is not enough and egress traffic is dropped
there.  Use the Iptables backend on such hosts, or accept the bridge's
traffic in that chain.
"""
import ipaddress
import os
import re
import shlex
import shutil
import subprocess
from dataclasses import dataclass

PROC_IP_FORWARD = "/proc/sys/net/ipv4/ip_forward"
PROC_CONNTRACK_MAX = "/proc/sys/net/netfilter/nf_conntrack_max"
PROC_TIME_WAIT = "/proc/sys/net/netfilter/nf_conntrack_tcp_timeout_time_wait"

# The iptables backend names chains "OL-<tag>-FWD": iptables allows 28
# characters, which leaves 21 for the tag.
TAG = re.compile(r"[A-Za-z0-9]{1,21}")
# An interface name (IFNAMSIZ - 1 bytes) that needs no quoting in a rule.
IFNAME = re.compile(r"[A-Za-z0-9_.-]{1,15}")


BRIDGE_PREFIX = "olbr"


def bridge_name(port):
    """The bridge of the worker on `port` (bin/admin looks for it too)."""
    return "%s%d" % (BRIDGE_PREFIX, port)


def worker_tag(port):
    """The tag of the worker on `port`'s rules."""
    return "ol%d" % port


# Cloud metadata services, which hand out the host's credentials: the
# link-local range (AWS, GCP, OpenStack...), Azure's WireServer, Alibaba's.
METADATA = ("169.254.0.0/16", "168.63.129.16/32", "100.100.100.200/32")


@dataclass(frozen=True)
class FlowLimits:
    """What the worker's egress sandboxes may hold of the host's conntrack
    table, which the whole host shares and whose being full drops every new
    connection of the host's.  `ct count` counts open connections and flows
    (at most per_sandbox from one source, per_worker in all), not TCP ones
    that ended (TIME_WAIT, CLOSE): those linger for the backend's closing
    timeout, and only a limit on new connections a second bounds them (one
    sandbox opening and closing 13,000 connections a second filled 84% of
    the table in 40 s).  Over a limit, a new connection is refused at once
    (ICMP admin-prohibited), not left to time out."""
    per_sandbox: int
    per_worker: int
    new_per_sandbox: int  # a second, after a burst of per_sandbox // 4
    new_per_worker: int   # a second, after a burst of per_worker // 4

    @classmethod
    def for_host(cls, closing_timeout):
        """An eighth of the host's table for the worker's open connections,
        a sixteenth of that for one sandbox's (32,768 and 2,048 for the
        usual 262,144), and as many closed ones over `closing_timeout`
        seconds: all told, under 30% of the table for one worker."""
        try:
            with open(PROC_CONNTRACK_MAX) as f:
                size = int(f.read())
        except (OSError, ValueError):
            size = 65536  # the kernel's smallest default
        per_worker = max(size // 8, 64)
        per_sandbox = max(per_worker // 16, 16)
        return cls(per_sandbox, per_worker, max(per_sandbox // closing_timeout, 1),
                   max(per_worker // closing_timeout, 1))

    @property
    def burst_per_sandbox(self):
        return max(self.per_sandbox // 4, 1)

    @property
    def burst_per_worker(self):
        return max(self.per_worker // 4, 1)


def worker_mark(port):
    """The conntrack mark of the flows of the worker on `port`'s sandboxes,
    by which the kernel finds them all (a flush at start and stop): "ol"
    and the port."""
    return 0x6f6c0000 | port


class NatError(Exception):
    """A NAT tool is missing or refused our rules; one line naming the
    operation and the object."""


def _tool(name):
    # Root's PATH has /usr/sbin, but a worker may be started with less.
    return shutil.which(name, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")


def _run(what, argv, stdin=None):
    """Run a tool; its stdout, or a NatError naming `what` with the first
    line the tool said."""
    path = _tool(argv[0])
    if path is None:
        raise NatError("%s: %s is not installed" % (what, argv[0]))
    try:
        done = subprocess.run([path, *argv[1:]], input=stdin, capture_output=True,
                              text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise NatError("%s: %s" % (what, e)) from None
    if done.returncode != 0:
        lines = [line.strip() for line in done.stderr.splitlines() if line.strip()]
        raise NatError("%s: %s" % (what, lines[0] if lines else
                                   "%s exited with status %d" % (argv[0], done.returncode)))
    return done.stdout


def _works(argv):
    try:
        _run("probe", argv)
        return True
    except NatError:
        return False


def _check(what, tag, bridge=None, subnet=None):
    """Refuse names that would not be safe to paste into a rule; the subnet
    in its normal form."""
    if not TAG.fullmatch(tag):
        raise NatError("%s: tag %r must be 1 to 21 letters or digits" % (what, tag))
    if bridge is not None and not IFNAME.fullmatch(bridge):
        raise NatError("%s: %r is not an interface name" % (what, bridge))
    if subnet is not None:
        try:
            return str(ipaddress.IPv4Network(subnet))
        except ValueError as e:
            raise NatError("%s: %s" % (what, e)) from None


class Nftables:
    name = "nftables"

    @staticmethod
    def table(tag):
        return "openlambda_%s" % tag

    # How long the sandboxes' TCP entries stay in TIME_WAIT or CLOSE (a
    # timeout policy of our own; the host's TIME_WAIT is 120 s): the
    # shorter, the more new connections a second FlowLimits can allow.  A
    # late segment of such a connection then finds no entry: from outside,
    # the host's own stack answers it; from the bridge, it is dropped.
    CLOSING_TIMEOUT = 10

    def install(self, tag, bridge, subnet, ct_mark=None, limits=None):
        """The rules; `ct_mark` (if any) marks the sandboxes' flows."""
        what = "install nftables rules for %s (bridge %s, %s)" % (tag, bridge, subnet)
        subnet = _check(what, tag, bridge, subnet)
        limits = limits or FlowLimits.for_host(self.CLOSING_TIMEOUT)
        table = self.table(tag)
        refuse = "goto refuse"
        # A flow that has its mark was counted at its first packet: until a
        # reply comes, each of its packets is "new" again, and must not use
        # up the limits a second (a one-way UDP sender would be held to them).
        counted, marking = ("", "") if ct_mark is None else (
            'iifname "%s" ct mark 0x%08x accept' % (bridge, ct_mark),
            'iifname "%s" ct state new ct mark set 0x%08x' % (bridge, ct_mark))
        closing = self.CLOSING_TIMEOUT
        # One `nft -f` is one transaction: the old table (declared first so
        # that deleting it cannot fail) goes and the new one comes at once.
        metadata = ", ".join(METADATA)
        script = f"""\
table ip {table} {{}}
delete table ip {table}
table ip {table} {{
    # Connections counted (ct count) and new ones a second, by source,
    # for FlowLimits.
    set sandbox_flows {{ type ipv4_addr; size 65535; flags dynamic; }}
    set worker_flows {{ type ifname; size 16; flags dynamic; }}
    set sandbox_new {{ type ipv4_addr; size 65535; flags dynamic; }}
    ct timeout closing {{
        protocol tcp;
        l3proto ip;
        policy = {{ time_wait: {closing}, close: {closing} }}
    }}
    chain refuse {{
        # At once, so that a connection over a limit fails rather than
        # times out: a TCP reset (an ICMP error would be held to the host's
        # ICMP rate limit, a few a second), an ICMP error for the rest.
        meta l4proto tcp reject with tcp reset
        reject with icmp type admin-prohibited
    }}
    chain prerouting {{
        type filter hook prerouting priority raw; policy accept;
        # Sandboxes must not reach the host: none of its addresses, and
        # no service published on one through DNAT (Docker, kube-proxy).
        # Here, before any DNAT, the destination is still the host's.
        iifname "{bridge}" fib daddr type local drop
    }}
    chain input {{
        type filter hook input priority filter; policy accept;
        # The same, for whatever came past prerouting: not the worker's
        # HTTP port, nor any other service, on any of the host's addresses.
        iifname "{bridge}" drop
    }}
    chain forward {{
        type filter hook forward priority filter; policy accept;
        # A sandbox cannot forge its source address (no raw sockets, no
        # IP_TRANSPARENT); if it ever could, it would not leave with one.
        iifname "{bridge}" ip saddr != {subnet} drop
        # Nor with what conntrack cannot place, such as a segment an
        # orphaned socket sends once its connection's entry is deleted:
        # it would leave without NAT, with the sandbox's own address.
        iifname "{bridge}" ct state invalid drop
        # Sandboxes must not reach each other through the host, nor the
        # sandboxes of another worker.  With br_netfilter, bridged traffic
        # between ports also comes here with the bridge as both interfaces.
        iifname "{bridge}" oifname "{bridge}" drop
        iifname "{bridge}" oifname "{BRIDGE_PREFIX}*" drop
        # Nor a metadata service: it would hand them the host's credentials.
        iifname "{bridge}" ip daddr {{ {metadata} }} drop
        # Nor anything a DNAT rule redirected.
        iifname "{bridge}" ct status dnat drop
        {counted}
        # Nor take more than their share of the host's conntrack table.
        iifname "{bridge}" ct state new add @sandbox_flows {{ ip saddr ct count over {limits.per_sandbox} }} {refuse}
        iifname "{bridge}" ct state new add @worker_flows {{ iifname ct count over {limits.per_worker} }} {refuse}
        iifname "{bridge}" ct state new add @sandbox_new {{ ip saddr limit rate over {limits.new_per_sandbox}/second burst {limits.burst_per_sandbox} packets }} {refuse}
        iifname "{bridge}" ct state new limit rate over {limits.new_per_worker}/second burst {limits.burst_per_worker} packets {refuse}
        iifname "{bridge}" ct state new ct timeout set "closing"
        {marking}
        # Sandboxes may go out...
        iifname "{bridge}" accept
        # ...and get the replies...
        oifname "{bridge}" ct state established,related accept
        # ...but nothing outside may open a connection to a sandbox.
        oifname "{bridge}" drop
    }}
    chain postrouting {{
        type nat hook postrouting priority srcnat; policy accept;
        # The subnet is private: what leaves the host must carry the
        # uplink's address, so that replies find their way back.
        ip saddr {subnet} oifname != "{bridge}" masquerade
    }}
}}
"""
        _run(what, ["nft", "-f", "-"], stdin=script)

    def remove(self, tag):
        what = "remove nftables rules for %s" % tag
        _check(what, tag)
        table = self.table(tag)
        # Declaring the table first makes the delete a no-op when it is gone.
        _run(what, ["nft", "-f", "-"], stdin="table ip %s {}\ndelete table ip %s\n" % (table, table))

    def installed(self, tag):
        what = "list nftables rules for %s" % tag
        _check(what, tag)
        tables = _run(what, ["nft", "list", "tables", "ip"]).split("\n")
        return "table ip %s" % self.table(tag) in tables


class Iptables:
    name = "iptables"

    # Our chains (by suffix), by table.
    CHAINS = {"raw": ("PRE",), "filter": ("IN", "FWD", "REF"), "nat": ("NAT",)}

    @staticmethod
    def chain(tag, suffix):
        return "OL-%s-%s" % (tag, suffix)

    @staticmethod
    def mark(tag):
        """The comment on our jump rules, by which remove finds them."""
        return "openlambda-%s" % tag

    def install(self, tag, bridge, subnet, ct_mark=None, limits=None):
        """The rules; `ct_mark` (if any) marks the sandboxes' flows.  No
        timeout policy of our own here (iptables needs the nfct tool to
        make one): FlowLimits allows fewer new connections a second."""
        what = "install iptables rules for %s (bridge %s, %s)" % (tag, bridge, subnet)
        subnet = _check(what, tag, bridge, subnet)
        limits = limits or FlowLimits.for_host(host_closing_timeout())
        # The jumps of an earlier install, to delete (iptables-restore skips
        # the blank line there is when there are none).
        found = self._found(what, tag)
        old_raw, old_filter, old_nat = ("\n".join(found[t][0]) for t in ("raw", "filter", "nat"))
        PRE, IN, FWD, REF, NAT = (self.chain(tag, s) for s in ("PRE", "IN", "FWD", "REF", "NAT"))
        metadata = "\n".join("-A %s -i %s -d %s -j DROP" % (FWD, bridge, net) for net in METADATA)
        jump = "-m comment --comment %s -j" % self.mark(tag)
        new = "-m conntrack --ctstate NEW"
        count = new + " -m connlimit --connlimit-saddr --connlimit-above"
        rate = new + " -m hashlimit --hashlimit-above"
        refuse = REF
        # A flow that has its mark was counted at its first packet (see
        # Nftables.install).
        counted, marking = ("", "") if ct_mark is None else (
            "-A %s -i %s -m connmark --mark 0x%08x -j ACCEPT" % (FWD, bridge, ct_mark),
            "-A %s -i %s %s -j CONNMARK --set-xmark 0x%08x/0xffffffff" % (
                FWD, bridge, new, ct_mark))

        # --noflush leaves everything else alone, and each table is
        # committed whole or not at all: declaring a chain that exists
        # empties it, and the old jumps are deleted, in the same commit
        # that adds the new rules, so a reinstall leaves no moment without
        # them.  The jumps go first in the built-in chains: an earlier
        # ACCEPT (or Docker's DROP policy and rules in FORWARD) must not
        # decide our packets.
        script = f"""\
*raw
:{PRE} - [0:0]
{old_raw}
# Sandboxes must not reach the host: none of its addresses, and no service
# published on one through DNAT (Docker, kube-proxy).  Here, before any
# DNAT, the destination is still the host's.
-A {PRE} -i {bridge} -m addrtype --dst-type LOCAL -j DROP
-I PREROUTING 1 {jump} {PRE}
COMMIT
*filter
:{IN} - [0:0]
:{FWD} - [0:0]
:{REF} - [0:0]
{old_filter}
# At once, so that a connection over a limit fails rather than times out: a
# TCP reset (an ICMP error would be held to the host's ICMP rate limit, a
# few a second), an ICMP error for the rest.
-A {REF} -p tcp -j REJECT --reject-with tcp-reset
-A {REF} -j REJECT --reject-with icmp-admin-prohibited
# The same, for whatever came past prerouting: not the worker's HTTP port,
# nor any other service, on any of the host's addresses.
-A {IN} -i {bridge} -j DROP
# A sandbox cannot forge its source address (no raw sockets, no
# IP_TRANSPARENT); if it ever could, it would not leave with one.
-A {FWD} -i {bridge} ! -s {subnet} -j DROP
# Nor with what conntrack cannot place, such as a segment an orphaned socket
# sends once its connection's entry is deleted: it would leave without NAT,
# with the sandbox's own address.
-A {FWD} -i {bridge} -m conntrack --ctstate INVALID -j DROP
# Sandboxes must not reach each other through the host, nor the sandboxes
# of another worker.  With br_netfilter, bridged traffic between ports also
# comes here with the bridge as both interfaces.
-A {FWD} -i {bridge} -o {bridge} -j DROP
-A {FWD} -i {bridge} -o {BRIDGE_PREFIX}+ -j DROP
# Nor a metadata service: it would hand them the host's credentials.
{metadata}
# Nor anything a DNAT rule redirected.
-A {FWD} -i {bridge} -m conntrack --ctstate DNAT -j DROP
# Nor take more than their share of the host's conntrack table (mask 32:
# counted by source; mask 0: all together), nor open more new connections
# a second than it has room for once they end.
{counted}
-A {FWD} -i {bridge} {count} {limits.per_sandbox} --connlimit-mask 32 -j {refuse}
-A {FWD} -i {bridge} {count} {limits.per_worker} --connlimit-mask 0 -j {refuse}
-A {FWD} -i {bridge} {rate} {limits.new_per_sandbox}/sec --hashlimit-burst {limits.burst_per_sandbox} --hashlimit-mode srcip --hashlimit-name {FWD}-s -j {refuse}
-A {FWD} -i {bridge} {rate} {limits.new_per_worker}/sec --hashlimit-burst {limits.burst_per_worker} --hashlimit-name {FWD}-w -j {refuse}
{marking}
# Sandboxes may go out...
-A {FWD} -i {bridge} -j ACCEPT
# ...and get the replies...
-A {FWD} -o {bridge} -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
# ...but nothing outside may open a connection to a sandbox.
-A {FWD} -o {bridge} -j DROP
-I INPUT 1 {jump} {IN}
-I FORWARD 1 {jump} {FWD}
COMMIT
*nat
:{NAT} - [0:0]
{old_nat}
# The subnet is private: what leaves the host must carry the uplink's
# address, so that replies find their way back.
-A {NAT} -s {subnet} ! -o {bridge} -j MASQUERADE
-I POSTROUTING 1 {jump} {NAT}
COMMIT
"""
        _run(what, ["iptables-restore", "-w", "10", "--noflush"], stdin=script)

    def _found(self, what, tag):
        """{table: (iptables-restore lines deleting our jumps, our chains)}
        for the tables we use, as they are now."""
        found = {}
        for table, suffixes in self.CHAINS.items():
            dump = _run(what, ["iptables-save", "-t", table]).splitlines()
            # The same rule as iptables-save wrote it, to delete.
            jumps = ["-D" + line[2:] for line in dump
                     if line.startswith("-A ") and self._marked(line, tag)]
            chains = [chain for chain in (self.chain(tag, s) for s in suffixes)
                      if any(line.startswith(":%s " % chain) for line in dump)]
            found[table] = (jumps, chains)
        return found

    def _marked(self, line, tag):
        """Whether a rule carries our comment exactly (not one of a tag
        that merely starts like ours)."""
        if self.mark(tag) not in line:
            return False  # most rules: no need to parse them
        words = shlex.split(line)
        return any(a == "--comment" and b == self.mark(tag) for a, b in zip(words, words[1:]))

    def remove(self, tag):
        what = "remove iptables rules for %s" % tag
        _check(what, tag)
        script = ""
        for table, (jumps, chains) in self._found(what, tag).items():
            # Jumps go before the chains they lead to, in one commit per table.
            lines = jumps + ["-F %s" % c for c in chains] + ["-X %s" % c for c in chains]
            if lines:
                script += "*%s\n%s\nCOMMIT\n" % (table, "\n".join(lines))
        if script:
            _run(what, ["iptables-restore", "-w", "10", "--noflush"], stdin=script)

    def installed(self, tag):
        """Whether any chain or jump of `tag` is there (a partial set too,
        so that leftovers show)."""
        what = "list iptables rules for %s" % tag
        _check(what, tag)
        return any(jumps or chains for jumps, chains in self._found(what, tag).values())


def host_closing_timeout():
    """How long the host keeps a TCP entry in TIME_WAIT (CLOSE is shorter)."""
    try:
        with open(PROC_TIME_WAIT) as f:
            return max(int(f.read()), 1)
    except (OSError, ValueError):
        return 120  # the kernel's default


def detect():
    """The NAT tool this host has: an Nftables() if `nft` works, else an
    Iptables() if `iptables` works, else a NatError."""
    if _works(["nft", "list", "tables"]):
        return Nftables()
    if _works(["iptables", "-w", "10", "-S", "INPUT"]):
        return Iptables()
    raise NatError("egress needs nftables or iptables, and this host has neither: install "
                   "one (apt-get install nftables) or turn egress off (egress.enabled false)")


def enable_forwarding():
    """Let the host route between the bridge and its uplink.  This turns on
    IPv4 forwarding for every interface: the rules above decide what the
    bridge may send, not what other interfaces may.  True if it was off."""
    try:
        with open(PROC_IP_FORWARD) as f:
            if f.read().strip() == "1":
                return False
        with open(PROC_IP_FORWARD, "w") as f:
            f.write("1")
        return True
    except OSError as e:
        raise NatError("enable IPv4 forwarding (%s): %s" % (PROC_IP_FORWARD, e.strerror)) from None
