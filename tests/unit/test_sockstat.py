"""What a recycled network namespace's /proc/net/sockstat must say
(cbits/shell.c: ol_sockstat_clean), on texts as the kernel writes them."""
import pytest

from sandbox.runtime import syscalls as sc

CLEAN = ("sockets: used 0\n"
         "TCP: inuse 0 orphan 3 tw 0 alloc 41 mem 219\n"  # orphan, alloc, mem: the host's
         "UDP: inuse 0 mem 7\n"
         "UDPLITE: inuse 0\n"
         "RAW: inuse 0\n"
         "FRAG: inuse 0 memory 0\n")


def clean(text):
    return bool(sc.lib.ol_sockstat_clean(text.encode()))


def test_a_namespace_without_sockets_is_clean_whatever_the_hosts_counts():
    assert clean(CLEAN)


@pytest.mark.parametrize("trace, old, new", [
    ("a socket open, or in flight", "sockets: used 0\n", "sockets: used 1\n"),
    ("ten sockets", "sockets: used 0\n", "sockets: used 10\n"),
    ("a TIME_WAIT", " tw 0 ", " tw 2 "),
    ("fragments waiting", "FRAG: inuse 0 memory 0\n", "FRAG: inuse 1 memory 1024\n"),
])
def test_any_trace_makes_it_unclean(trace, old, new):
    assert not clean(CLEAN.replace(old, new)), trace


def test_an_unexpected_text_is_unclean():
    assert not clean("")
    assert not clean("sockets: used 0\n")
