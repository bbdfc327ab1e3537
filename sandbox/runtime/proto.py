"""Messages between the worker, zygotes and handlers: msgpack maps.

Zygote control channels are SOCK_SEQPACKET (one message per packet, fds
alongside with SCM_RIGHTS).  Handler channels are SOCK_STREAM carrying a
msgpack stream, because bodies can be larger than a packet.
"""
import array
import json
import math
import socket

import msgpack

MAX_PACKET = 64 * 1024
MAX_FDS = 253  # the kernel's SCM_MAX_FD: a zygote gets a batch of shells' fds at once


def _not_json(constant):
    raise ValueError("%s is not JSON" % constant)


def _finite(text):
    """A JSON number as a float, which must be one: 1e999 would become
    inf, which no JSON can hold (and the function's reply, holding it,
    would then fail as if the function were at fault)."""
    number = float(text)
    if math.isinf(number):
        raise ValueError("number %s is out of range" % text[:40])
    return number


# An event as RFC 8259 has it (the worker's check and the handler's parse):
# UTF-8, and without Python's NaN and Infinity, spelt out or overflowed.
# _finite costs a Python call per float (JSON of nothing but floats parses
# 60% slower, 0.4 ms more for the worker's 64 KiB at most); telling which
# texts may overflow without it took a regex slower still.
STRICT_JSON = json.JSONDecoder(parse_constant=_not_json, parse_float=_finite)


# Zygote exit statuses that mean "could not boot": the worker reports them
# once and does not restart the zygote in a loop.
EXIT_BOOT_IMPORT = 3
EXIT_BOOT_SETUP = 4


def pack(msg):
    """msg as msgpack.  A str holding a lone surrogate, which a function's
    error can ("\\ud800"), is no UTF-8, and msgpack refuses it: the message
    is then packed again with it escaped, as the six characters "\\ud800".
    Only then: an error handler slows the packing of every str."""
    try:
        return msgpack.packb(msg, use_bin_type=True)
    except UnicodeEncodeError:
        return msgpack.packb(msg, use_bin_type=True, unicode_errors="backslashreplace")


# The most a channel buffers for one message: a handler cannot make the
# worker hold more than this on its behalf.
MAX_MESSAGE = 64 << 20
BufferFull = msgpack.BufferFull


# An unpacker's first buffer.  msgpack's default is 1 MiB, malloc'd per
# unpacker (one per channel, one per shell's "ready"): glibc then mmaps and
# munmaps it each time, or, once it has raised its mmap threshold, carves it
# from the heap, which fragments and grows the worker's RSS call by call.
# The buffer grows as a message needs, up to max_message.
READ_SIZE = 64 * 1024


# What a reply holds at most: one map (of these few keys) and one list
# (its stack's lines, at most 64 Ki characters of them).
REPLY_KEYS_MAX = 16
REPLY_ITEMS_MAX = 64 << 10
REPLY_CONTAINERS_MAX = 2


def unpacker(max_message=MAX_MESSAGE, container_hook=None):
    """A streaming unpacker.  `container_hook`, if given, sees each map and
    list as it is built, and may refuse it by raising: for what a handler
    sends, whose code may forge it.  msgpack builds a whole message before
    anyone can look at it, and 7 MB of empty arrays are 7 million lists,
    525 MB of the worker's memory; the hook stops that at the first
    container too many, and the lengths keep each container small."""
    if container_hook is None:
        return msgpack.Unpacker(raw=False, max_buffer_size=max_message,
                               read_size=min(READ_SIZE, max_message))
    return msgpack.Unpacker(raw=False, max_buffer_size=max_message,
                           read_size=min(READ_SIZE, max_message),
                           max_map_len=REPLY_KEYS_MAX, max_array_len=REPLY_ITEMS_MAX,
                           object_hook=container_hook, list_hook=container_hook)


# How much of a function's error reaches its caller: a message of up to
# this many characters, and the last lines of its stack that fit in as many.
# The runtime clips what it sends, and the worker what it gets (handler code
# can write its own replies).  JSON may then write a character as six
# bytes, or twelve for one beyond the BMP ("\ud83d\ude00"): an error's
# body stays under 2 MiB.
ERROR_TEXT_MAX = 64 << 10


def clip_message(text):
    if len(text) <= ERROR_TEXT_MAX:
        return text
    return text[:ERROR_TEXT_MAX] + " ... (%d more characters)" % (len(text) - ERROR_TEXT_MAX)


def clip_stack(lines):
    kept, size = [], 0
    for line in reversed(lines):
        size += len(line)
        if size > ERROR_TEXT_MAX:
            return ["... (%d earlier lines)\n" % (len(lines) - len(kept))] + kept[::-1]
        kept.append(line)
    return lines


def send_packet(sock, msg, fds=()):
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
    sock.sendmsg([pack(msg)], anc)


def recv_fds(sock, flags=0):
    """Up to MAX_PACKET bytes and the fds that came with them."""
    fds = array.array("i")
    data, anc, _flags, _addr = sock.recvmsg(MAX_PACKET, socket.CMSG_SPACE(MAX_FDS * fds.itemsize),
                                            flags)
    for level, kind, payload in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
    return data, list(fds)


def recv_packet(sock, flags=0):
    """One message and its fds, or (None, fds) at EOF."""
    data, fds = recv_fds(sock, flags)
    if not data:
        return None, fds
    return msgpack.unpackb(data, raw=False), fds
