"""What a handler sends its channel is unpacked with its shape held to a
reply's (one map, one list at most), so that forged msgpack cannot make the
worker build millions of objects before it can refuse them."""
import asyncio
import gc
import socket
import tracemalloc
import weakref

import msgpack
import pytest

from worker.functions import Channel


def _read_all(data):
    """(the channel's state after reading `data`, peak bytes allocated)."""
    async def read():
        ours, theirs = socket.socketpair()
        ours.setblocking(False)
        theirs.setblocking(False)
        channel = Channel(ours)
        sending = asyncio.ensure_future(asyncio.get_running_loop().sock_sendall(theirs, data))
        sending.add_done_callback(lambda _: theirs.shutdown(socket.SHUT_WR))
        while not channel.closed:
            await asyncio.sleep(0.01)
        ours.close()  # it stops reading as soon as it has seen enough
        await asyncio.gather(sending, return_exceptions=True)
        theirs.close()
        return channel
    tracemalloc.start()
    try:
        channel = asyncio.run(read())
        return channel, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("message", [
    b"\xdd" + (2_000_000).to_bytes(4, "big") + b"\x90" * 2_000_000,  # one list, 2 M items
    b"\xdc\x00\x20" + (b"\xdc\x00\xff" + b"\x90" * 255) * 32,          # lists of lists
    b"\xde\x00\x30" + b"".join(msgpack.packb(i) + b"\xc0" for i in range(48)),  # a big map
], ids=["long-list", "nested-lists", "big-map"])
def test_a_message_shaped_as_no_reply_is_refused_as_it_is_read(message):
    channel, peak = _read_all(message)
    assert channel.malformed
    assert peak < 8 << 20, peak  # 2 M empty lists alone would be 100 MB


def test_a_reply_with_its_stack_is_read():
    reply = {"status": "error", "id": "x", "errorType": "E", "errorMessage": "m",
             "stackTrace": ["line %d" % i for i in range(5000)]}
    channel, _ = _read_all(msgpack.packb(reply))
    assert not channel.malformed
    assert list(channel.inbox) == [reply]


def test_a_closed_channel_is_freed_without_the_garbage_collector():
    # The worker collects cycles rarely (server.py): one through the
    # unpacker's hook kept every sandbox's channel and its buffer (the soak's
    # worker grew by 2 MB a second).
    async def make_and_drop():
        ours, theirs = socket.socketpair()
        ours.setblocking(False)
        channel = Channel(ours)
        channel.close()
        ours.close()
        theirs.close()
        return weakref.ref(channel)
    gc.disable()
    try:
        assert asyncio.run(make_and_drop())() is None
    finally:
        gc.enable()
