"""The function table: which live handler sandboxes serve which function.

A call takes an idle instance of its function (a warm call) or forks a new
one from the zygote (a cold start).  An instance serves one call at a time
and goes back to its function's idle list afterwards, unless the function's
code changed meanwhile.  The table holds at most `max_sandboxes` instances;
idle ones are evicted, least recently used first, to make room.
"""
import asyncio
import collections
import logging
import math
import os
import time

from sandbox.cgroups import Limits
from sandbox.errors import CapacityError, SandboxError
from sandbox.manager import FIRST_MESSAGE_MAX
from sandbox.runtime import proto

from .errors import (BadRequest, Busy, HandlerDied, HandlerRaised, InitFailed, NotFound,
                     ResponseTooLarge, SandboxFailed, TimedOut, Unavailable)

log = logging.getLogger("worker")

# An instance idle this long is frozen (its cgroup), and thawed when a call
# takes it: a thread or child a handler leaves behind cannot keep running
# between calls.  Not at once: back-to-back calls would pay two cgroup
# writes each.
FREEZE_AFTER = 0.1

# While all sandboxes together hold more than MEMORY_HIGH of their memory
# limit (sandboxes_mem_mb) in memory the kernel cannot reclaim, idle ones
# are destroyed, those that hold most first, down to MEMORY_RELIEVED;
# checked every MEMORY_CHECK s.  Else the kernel's OOM killer makes room at
# the limit, and picks by process size, in which memory held in files
# (tmpfs, memfd) does not count: idle sandboxes that had filled their /tmp
# got a busy neighbour's call killed, every time.
MEMORY_HIGH = 0.9
MEMORY_RELIEVED = 0.8
MEMORY_CHECK = 1.0


# What a reply may hold beyond its body: an error's message and stack.
REPLY_OVERHEAD = 1 << 20


def _gone(function):
    """NotFound if the function's directory went away meanwhile (deleted or
    renamed while its sandbox was given its code), which is no platform
    fault; else None."""
    if not os.path.isdir(function.path):
        return NotFound("no function named %r (it was removed during the call)"
                        % function.name)
    return None


def process_limits(limits):
    """What the handler process enforces on itself, from a function's limits."""
    return {"nofile": limits.nofile, "fsize": limits.fsize_mb << 20,
            "response": limits.response_kb << 10, "runtime": limits.runtime_sec}


# What each kind of reply must hold.
REPLY_FIELDS = {
    "ok": ("body",),
    "error": ("errorType", "errorMessage", "stackTrace"),
    "init_error": ("errorType", "errorMessage", "stackTrace"),
    "setup_error": ("errorMessage",),
    "too_large": ("size",),
    "bad_event": ("errorMessage",),
}
# The type of each field, wherever it comes: a forged reply may carry any.
FIELD_TYPES = {"id": str, "body": bytes, "errorType": str, "errorMessage": str,
               "stackTrace": list, "size": int}
TIMINGS = ("received", "attach", "drop", "load", "run")
# Exception class names are short; one sent as a long one is cut.
ERROR_TYPE_MAX = 256


def well_formed(reply, request_id, first_call):
    """Whether a handler's reply is one the runtime could have sent, in
    answer to request `request_id`: a reply to a request names it; only a
    failure to build the sandbox or load the code, said before its first
    call was read, names none."""
    if not isinstance(reply, dict) or not isinstance(reply.get("status"), str) \
            or reply["status"] not in REPLY_FIELDS:
        return False
    if reply.get("id", None) != request_id and not (
            "id" not in reply and first_call and reply["status"] in ("init_error", "setup_error")):
        return False
    if reply["status"] in ("init_error", "setup_error") and not first_call:
        return False  # the code is loaded, in a sandbox built: a warm handler's forgery
    if not all(key in reply for key in REPLY_FIELDS[reply["status"]]):
        return False
    for key, kind in FIELD_TYPES.items():
        if key in reply and (not isinstance(reply[key], kind) or isinstance(reply[key], bool)):
            return False
    if not all(isinstance(line, str) for line in reply.get("stackTrace", ())):
        return False
    if reply.get("size", 0) < 0:
        return False
    return all(isinstance(reply[key], (int, float)) and not isinstance(reply[key], bool)
               and math.isfinite(reply[key]) and (key == "received" or reply[key] >= 0)
               for key in TIMINGS if key in reply)


class ChannelClosed(Exception):
    pass


class ReplyShape:
    """Counts the maps and lists of the message being unpacked, and refuses
    one more than a reply has (proto.unpacker says why)."""

    def __init__(self):
        self.containers = 0

    def count(self, container):
        self.containers += 1
        if self.containers > proto.REPLY_CONTAINERS_MAX:
            raise ValueError("more maps and lists than a reply has")
        return container


class Channel:
    """The worker's end of a handler's msgpack stream: one call at a time.

    A plain non-blocking socket watched by the event loop: cheaper to set
    up on a cold start than an asyncio transport, and enough for strict
    request-reply traffic.  A message that arrives before the first call
    (a load failure, or the answer to a request sent with the code) is
    kept for it; any other that no call waits for, or
    bytes that are not msgpack, break the protocol: the channel closes."""

    # One read buffer for every channel (the loop reads them one at a time),
    # since the unpacker copies what it is fed: a read allocates nothing.
    READ_BUFFER = bytearray(1 << 18)
    READ_VIEW = memoryview(READ_BUFFER)

    def __init__(self, sock, max_message=proto.MAX_MESSAGE):
        self.sock = sock
        self.loop = asyncio.get_running_loop()
        # The hook is the shape's, not this channel's: a bound method of the
        # channel in its own unpacker would make a cycle, which only the
        # worker's rare full collections free, with the unpacker's buffer.
        self.shape = ReplyShape()
        self.unpacker = proto.unpacker(max_message, self.shape.count)
        self.overflowed = False  # it sent more than a reply may hold
        self.malformed = False   # it sent what no runtime sends
        self.asked = False       # a call was made: from now on it speaks only when asked
        self.on_close = lambda: None
        self.inbox = collections.deque()
        self.waiter = None
        self.closed = False
        self.loop.add_reader(sock.fileno(), self._on_readable)

    def _on_readable(self):
        """Read what is there; False once there is nothing more to read now."""
        try:
            size = self.sock.recv_into(self.READ_BUFFER)
        except BlockingIOError:
            return False
        except OSError:
            size = 0
        if not size:
            self.close()
            return False
        try:
            self.unpacker.feed(self.READ_VIEW[:size])
            for msg in self.unpacker:
                self.shape.containers = 0
                waiter, self.waiter = self.waiter, None
                if waiter is not None and not waiter.done():
                    waiter.set_result(msg)
                elif not self.asked and not self.inbox:
                    self.inbox.append(msg)
                else:  # unasked for: handler code writing to its channel
                    self.malformed = True
                    self.close()
                    return False
        except proto.BufferFull:  # too much: it is not heard again
            self.overflowed = True
            self.close()
            return False
        except Exception:  # not msgpack (FormatError, StackError, ValueError...)
            self.malformed = True
            self.close()
            return False
        return True

    def close(self):
        if not self.closed:
            self.closed = True
            self.loop.remove_reader(self.sock.fileno())
            self.on_close()
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(ChannelClosed())

    async def call(self, msg, already_sent=False):
        """Send `msg` (unless it went with the code) and wait for the answer."""
        self.asked = True
        # Said before it was asked: a load failure, or the answer to a
        # request that went with the code.
        if self.inbox:
            return self.inbox.popleft()
        if self.closed:
            raise ChannelClosed()
        # Waiting before sending: the answer may come while a big body is
        # still being sent.
        waiter = self.waiter = self.loop.create_future()
        if already_sent:
            return await waiter
        data = proto.pack(msg)
        try:
            sent = self.sock.send(data)
            if sent < len(data):  # a big body: let the loop finish it
                await self.loop.sock_sendall(self.sock, data[sent:])
        except OSError:
            # It is gone; first hear what it said before it went.
            while not self.closed and self._on_readable():
                pass
            self.close()
        return await waiter


class Instance:
    def __init__(self, function, sandbox, channel):
        self.function = function
        self.version = function.version
        self.sandbox = sandbox
        self.channel = channel
        self.busy = True
        self.frozen = False
        self.freeze_timer = None    # freezes it, then (idle_sec) expires it
        self.timed_out = False
        self.calls = 0
        self.last_used = time.monotonic()


class FunctionTable:
    def __init__(self, manager, registry, max_sandboxes, idle_sec=None):
        self.manager = manager
        self.registry = registry
        self.max_sandboxes = max_sandboxes
        self.idle_sec = idle_sec  # an idle instance is destroyed after this; None: never
        self.idle = collections.defaultdict(list)   # function name -> [Instance]
        self.instances = {}                          # sandbox id -> Instance
        self.pending = 0                             # cold starts under way
        self.pending_by_name = collections.Counter()  # ...of each function
        self.closing = False
        self.memory_timer = None
        registry.on_change = self._retire_idle

    def trouble(self):
        """Why no cold start can succeed now (its zygote is down), or None."""
        return self.manager.zygote_trouble

    async def invoke(self, function, request_id, body, phases):
        """Run one call of `function` (as the registry's lookup gave it);
        returns the handler's JSON reply as bytes.  Appends (phase, seconds,
        note) to `phases` as they become known."""
        try:
            return await self._call(function, request_id, body, phases)
        except InitFailed:
            # A file rewritten in place can be read half written: if the
            # code changed while it loaded, once more with the code as it is.
            self.registry.drain_changes()
            if self.registry.cache.get(function.name) is function:
                raise
            phases.clear()
            return await self._call(self.registry.lookup(function.name), request_id, body, phases)

    async def _call(self, function, request_id, body, phases):
        name = function.name
        request = {"id": request_id, "body": body}
        instance = self._take_idle(function)
        sent_with_code = False
        if instance is None:
            packed = proto.pack(request)
            sent_with_code = len(packed) <= FIRST_MESSAGE_MAX
            instance = await self._cold_start(function, packed if sent_with_code else b"")
            sandbox = instance.sandbox
            if function.egress:
                phases.append(("egress", sandbox.egress_wait, ""))
            phases.append(("wait", sandbox.waited, ""))
            note = "before the request" if sandbox.taken_from_pool else ""
            phases += [(phase, seconds, note) for phase, seconds in sandbox.setup_phases()]
        # On a cold start the shell began with the code as soon as it got it.
        sent = time.monotonic() if instance.calls else instance.sandbox.assigned_at
        instance.calls += 1
        # Past the deadline the whole sandbox is killed (threads and children
        # too, through its cgroup), which ends the call with a closed channel.
        timeout = function.limits.runtime_sec
        timer = asyncio.get_running_loop().call_later(timeout, self._time_out, instance)
        try:
            reply = await instance.channel.call(request, already_sent=sent_with_code)
        except ChannelClosed:
            if self.closing:
                await self._destroy(instance)
                raise Unavailable("the worker is shutting down") from None
            if instance.channel.overflowed:  # it is still running: no exit to wait for
                await self._destroy(instance)
                raise ResponseTooLarge("the handler of %r sent more than limits.response_kb "
                                       "(%d KiB) allows" % (name, function.limits.response_kb)
                                       ) from None
            if instance.channel.malformed:
                await self._destroy(instance)
                raise HandlerDied("the handler of %r wrote to its channel what no runtime "
                                  "sends" % name, "Runtime.ProtocolError") from None
            reason = await instance.sandbox.exit_reason()
            await self._destroy(instance)
            if instance.timed_out:
                raise TimedOut("Task timed out after %.2f seconds" % timeout) from None
            if instance.sandbox.lost_with_zygote:
                raise SandboxFailed("the sandbox of %r was lost: %s; it is being restarted"
                                    % (name, reason)) from None
            if instance.sandbox.out_of_memory:
                raise HandlerDied("the handler of %r %s" % (name, reason),
                                  "Runtime.OutOfMemory") from None
            raise HandlerDied("the handler of %r %s" % (name, reason)) from None
        finally:
            timer.cancel()
        if not well_formed(reply, request_id, instance.calls == 1):
            # Handler code can write to its channel itself: nothing in a
            # reply is trusted until checked, or a forged one could leave
            # the sandbox busy for good, out of reach of any timeout, or
            # answer another call than its own.
            await self._destroy(instance)
            raise HandlerDied("the handler of %r sent a malformed reply" % name,
                              "Runtime.ProtocolError")
        self._add_timings(phases, reply, sent)
        status = reply["status"]
        if status == "ok":
            if len(reply["body"]) > function.limits.response_kb << 10:
                # The runtime would have said too_large: its code wrote this itself.
                await self._destroy(instance)
                raise ResponseTooLarge("the response of %r is %d bytes, over "
                                       "limits.response_kb (%d KiB)" % (
                                           name, len(reply["body"]), function.limits.response_kb))
            self._release(instance)
            return reply["body"]
        if status == "too_large":
            self._release(instance)
            raise ResponseTooLarge("the response of %r is %d bytes, over limits.response_kb (%d KiB)"
                                   % (name, reply["size"], function.limits.response_kb))
        message = proto.clip_message(reply.get("errorMessage", ""))
        error_type = reply.get("errorType", "")[:ERROR_TYPE_MAX]
        stack = proto.clip_stack(reply.get("stackTrace", []))
        if status == "setup_error":
            await self._destroy(instance)
            raise _gone(function) or SandboxFailed("%s: %s" % (name, message))
        if status == "init_error":
            await self._destroy(instance)
            raise InitFailed("function %r: %s" % (name, message), error_type, stack)
        self._release(instance)
        if status == "bad_event":
            # A body too big for the worker to check (app.CHECKED_HERE), or
            # JSON its check let through but the handler could not parse
            # (nested nearly as deep as Python goes): still the request's
            # fault.  Said by a status of its own, not by an errorType, which
            # a function's exception class could share.
            raise BadRequest("the request body is not valid JSON: %s" % message)
        raise HandlerRaised(message, error_type, stack)

    @staticmethod
    def _add_timings(phases, reply, sent):
        """The sandbox's phases, as its reply gives them, to `phases`; each
        within the time since the request was sent, for a forged reply can
        say anything."""
        elapsed = time.monotonic() - sent
        timings = [(phase, reply[key]) for phase, key in (
            ("attach", "attach"), ("drop", "drop"), ("load", "load"), ("handler", "run"))
            if key in reply]
        if "received" in reply:  # a cold start: how long the shell took to wake up
            timings.insert(0, ("wake", reply["received"] - sent))
        inside = 0.0
        for phase, seconds in timings:
            seconds = min(max(seconds, 0.0), elapsed - inside)
            phases.append((phase, seconds, ""))
            inside += seconds
        phases.append(("ipc", elapsed - inside, ""))

    def _time_out(self, instance):
        instance.timed_out = True
        instance.sandbox.kill()

    def _take_idle(self, function):
        idle = self.idle.get(function.name)
        while idle:
            instance = idle.pop()
            if instance.version == function.version and not instance.channel.closed:
                instance.busy = True
                self._thaw(instance)
                return instance
            self._retire(instance)
        return None

    def _retire(self, instance):
        """Out of the table now; its sandbox is destroyed in the background."""
        if instance.freeze_timer is not None:
            instance.freeze_timer.cancel()
        self._forget(instance)
        asyncio.ensure_future(self._destroy(instance))

    async def _cold_start(self, function, first_request):
        if self.closing:
            raise Unavailable("the worker is shutting down")
        # Cold starts under way count: under a burst they would all pass a
        # check of the live sandboxes alone.
        limits = function.limits
        if limits.concurrency is not None:
            # Called only when none of its sandboxes is idle: all are busy.
            mine = sum(1 for i in self.instances.values() if i.function.name == function.name)
            if mine + self.pending_by_name[function.name] >= limits.concurrency:
                raise Busy("function %r has all the %d sandboxes it may have"
                           " (limits.concurrency) busy" % (function.name, limits.concurrency))
        if len(self.instances) + self.pending >= self.max_sandboxes and not self._evict_one():
            raise Busy("all %d sandboxes are busy" % self.max_sandboxes)
        self.pending += 1
        self.pending_by_name[function.name] += 1
        try:
            # A deadline on this task, not asyncio.wait_for: that runs
            # create() in a task of its own, which costs every cold start
            # three more turns of the event loop.
            async with asyncio.timeout(limits.runtime_sec):
                sandbox = await self.manager.create(
                    function.path, function.name,
                    Limits(limits.mem_mb, limits.procs, limits.cpu_percent), limits.scratch_mb,
                    function.egress, process_limits(limits), first_request)
        except TimeoutError:
            raise SandboxFailed("no sandbox was ready within %d s" % limits.runtime_sec) from None
        except CapacityError as e:
            raise Busy(str(e)) from None
        except SandboxError as e:
            if self.closing:
                raise Unavailable("the worker is shutting down") from None
            raise _gone(function) or SandboxFailed(str(e)) from None
        finally:
            self.pending -= 1
            self.pending_by_name[function.name] -= 1
            if not self.pending_by_name[function.name]:
                del self.pending_by_name[function.name]
        channel = Channel(sandbox.channel, (limits.response_kb << 10) + REPLY_OVERHEAD)
        instance = Instance(function, sandbox, channel)
        # An idle sandbox that died (killed from outside, or its zygote
        # died) gives its slot back now, not when a call next finds it dead.
        channel.on_close = lambda: self._retire_if_idle(instance)
        self.instances[sandbox.id] = instance
        return instance

    def _retire_if_idle(self, instance):
        """Out of its function's idle list and retired, if it is idle there."""
        idle = self.idle.get(instance.function.name, ())
        if not instance.busy and instance in idle:
            idle.remove(instance)
            self._retire(instance)

    def _evict_one(self):
        candidates = [i for i in self.instances.values() if not i.busy]
        if not candidates:
            return False
        self._retire_if_idle(min(candidates, key=lambda i: i.last_used))
        return True

    def _release(self, instance):
        instance.busy = False
        instance.last_used = time.monotonic()
        current = self.registry.cache.get(instance.function.name)
        if self.closing or instance.channel.closed or current is None \
                or current.version != instance.version:
            self._retire(instance)
        else:
            self.idle[instance.function.name].append(instance)
            instance.freeze_timer = asyncio.get_running_loop().call_later(
                FREEZE_AFTER, self._freeze, instance)

    def _freeze(self, instance):
        instance.freeze_timer = None
        if not instance.busy and not instance.frozen and not instance.sandbox.exited.done():
            try:
                instance.sandbox.cgroup.freeze()
                instance.frozen = True
            except SandboxError:
                pass  # no freezer on this host: it stays awake
            if self.idle_sec is not None:
                # Set here, not at each release: back-to-back calls never
                # get this far, so they pay for one timer, not two.
                instance.freeze_timer = asyncio.get_running_loop().call_later(
                    max(self.idle_sec - FREEZE_AFTER, 0), self._expire, instance)

    def _expire(self, instance):
        """Idle for idle_sec: what it holds (memory, files, a uid, a slot)
        goes back to the host, not only when max_sandboxes needs the slot."""
        instance.freeze_timer = None
        self._retire_if_idle(instance)

    def _thaw(self, instance):
        if instance.freeze_timer is not None:
            instance.freeze_timer.cancel()
            instance.freeze_timer = None
        if instance.frozen:
            instance.frozen = False
            instance.sandbox.cgroup.thaw()

    def _retire_idle(self, name):
        """The function's code changed: its idle instances run old code."""
        for instance in self.idle.pop(name, []):
            self._retire(instance)

    def _forget(self, instance):
        self.instances.pop(instance.sandbox.id, None)
        instance.channel.on_close = lambda: None  # its death is expected now

    async def _destroy(self, instance):
        self._forget(instance)
        instance.channel.close()
        await self.manager.destroy(instance.sandbox)

    def describe(self):
        """One record per live sandbox, for `admin status`."""
        out = []
        for instance in list(self.instances.values()):
            out.append({"id": instance.sandbox.id, "function": instance.function.name,
                        "state": "busy" if instance.busy else "idle",
                        "pid": instance.sandbox.host_pid(), "uid": instance.sandbox.uid,
                        "network": instance.sandbox.network})
        return out

    def watch_memory(self):
        """Check every MEMORY_CHECK s, until close(), that the sandboxes
        leave room under their memory limit (see MEMORY_HIGH)."""
        self.memory_timer = asyncio.get_running_loop().call_later(MEMORY_CHECK,
                                                                  self.watch_memory)
        self.relieve_memory()

    def relieve_memory(self):
        limit = self.manager.total_mem_mb << 20
        held = self.manager.all_sandboxes.held_memory()
        if held <= MEMORY_HIGH * limit:
            return
        idle = [i for i in self.instances.values() if not i.busy]
        sizes = {instance: instance.sandbox.cgroup.held_memory() for instance in idle}
        left, destroyed = held, 0
        for instance in sorted(idle, key=sizes.get, reverse=True):
            if left <= MEMORY_RELIEVED * limit or sizes[instance] < 1 << 20:
                break  # enough, or what is left holds next to nothing: busy ones hold it
            self._retire_if_idle(instance)
            left -= sizes[instance]
            destroyed += 1
        if destroyed:
            log.warning("memory: all sandboxes hold %d of their %d MB (sandboxes_mem_mb); "
                        "destroyed %d idle sandbox(es), which held %d MB", held >> 20,
                        limit >> 20, destroyed, (held - left) >> 20)

    async def close(self, drain_seconds=5.0):
        """Let calls in flight finish (for up to `drain_seconds`), then
        destroy every sandbox; calls still running then get 503."""
        self.closing = True
        if self.memory_timer is not None:
            self.memory_timer.cancel()
        for instance in self.instances.values():  # freezes and idle_sec expiries
            if instance.freeze_timer is not None:
                instance.freeze_timer.cancel()
                instance.freeze_timer = None
        self.idle.clear()
        deadline = time.monotonic() + drain_seconds
        while (self.pending or any(i.busy for i in self.instances.values())) \
                and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        await asyncio.gather(*(self._destroy(i) for i in list(self.instances.values())),
                             return_exceptions=True)
