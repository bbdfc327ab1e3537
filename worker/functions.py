"""The function table: which live handler sandboxes serve which function.

A call takes an idle instance of its function (a warm call) or forks a new
one from the zygote (a cold start).  An instance serves one call at a time
and goes back to its function's idle list afterwards, unless the function's
code changed meanwhile.  The table holds at most `max_sandboxes` instances;
idle ones are evicted, least recently used first, to make room.
"""
import asyncio
import collections
import time

from sandbox.errors import SandboxError
from sandbox.runtime import proto

from .errors import Busy, HandlerDied, HandlerRaised, InitFailed, SandboxFailed, Unavailable


class ChannelClosed(Exception):
    pass


class Channel(asyncio.Protocol):
    """The worker's end of a handler's msgpack stream: one call at a time."""

    def __init__(self):
        self.unpacker = proto.unpacker()
        self.transport = None
        self.waiter = None
        self.closed = False

    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        self.unpacker.feed(data)
        for msg in self.unpacker:
            waiter, self.waiter = self.waiter, None
            if waiter is not None and not waiter.done():
                waiter.set_result(msg)

    def connection_lost(self, exc):
        self.closed = True
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(ChannelClosed())

    async def call(self, msg):
        if self.closed:
            raise ChannelClosed()
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(proto.pack(msg))
        return await self.waiter


class Instance:
    def __init__(self, function, sandbox, channel):
        self.function = function
        self.version = function.version
        self.sandbox = sandbox
        self.channel = channel
        self.busy = True
        self.last_used = time.monotonic()


class FunctionTable:
    def __init__(self, manager, registry, max_sandboxes):
        self.manager = manager
        self.registry = registry
        self.max_sandboxes = max_sandboxes
        self.idle = collections.defaultdict(list)   # function name -> [Instance]
        self.instances = {}                          # sandbox id -> Instance
        self.closing = False
        registry.on_change = self._retire_idle

    async def invoke(self, name, request_id, body):
        """Run one call; returns the handler's JSON reply as bytes."""
        function = self.registry.lookup(name)
        instance = self._take_idle(function)
        if instance is None:
            instance = await self._cold_start(function)
        try:
            reply = await instance.channel.call({"id": request_id, "body": body})
        except ChannelClosed:
            reason = await instance.sandbox.exit_reason()
            await self._destroy(instance)
            raise HandlerDied("the handler of %r %s" % (name, reason)) from None
        status = reply.get("status")
        if status == "setup_error":
            await self._destroy(instance)
            raise SandboxFailed("%s: %s" % (name, reply["errorMessage"]))
        if status == "init_error":
            await self._destroy(instance)
            raise InitFailed("%s: %s" % (name, reply["errorMessage"]), reply["errorType"],
                             reply.get("stackTrace", ()))
        self._release(instance)
        if status == "ok":
            return reply["body"]
        raise HandlerRaised(reply["errorMessage"], reply["errorType"], reply.get("stackTrace", ()))

    def _take_idle(self, function):
        idle = self.idle.get(function.name)
        while idle:
            instance = idle.pop()
            if instance.version == function.version and not instance.channel.closed:
                instance.busy = True
                return instance
            asyncio.ensure_future(self._destroy(instance))
        return None

    async def _cold_start(self, function):
        if self.closing:
            raise Unavailable("the worker is shutting down")
        if len(self.instances) >= self.max_sandboxes and not self._evict_one():
            raise Busy("all %d sandboxes are busy" % self.max_sandboxes)
        try:
            sandbox = await self.manager.create(function.path, function.name)
        except SandboxError as e:
            raise SandboxFailed(str(e)) from None
        loop = asyncio.get_running_loop()
        _, channel = await loop.create_unix_connection(Channel, sock=sandbox.channel)
        instance = Instance(function, sandbox, channel)
        self.instances[sandbox.id] = instance
        return instance

    def _evict_one(self):
        candidates = [i for i in self.instances.values() if not i.busy]
        if not candidates:
            return False
        victim = min(candidates, key=lambda i: i.last_used)
        self.idle[victim.function.name].remove(victim)
        asyncio.ensure_future(self._destroy(victim))
        self._forget(victim)
        return True

    def _release(self, instance):
        instance.busy = False
        instance.last_used = time.monotonic()
        current = self.registry.cache.get(instance.function.name)
        if self.closing or instance.channel.closed or current is None \
                or current.version != instance.version:
            asyncio.ensure_future(self._destroy(instance))
        else:
            self.idle[instance.function.name].append(instance)

    def _retire_idle(self, name):
        """The function's code changed: its idle instances run old code."""
        for instance in self.idle.pop(name, []):
            asyncio.ensure_future(self._destroy(instance))

    def _forget(self, instance):
        self.instances.pop(instance.sandbox.id, None)

    async def _destroy(self, instance):
        self._forget(instance)
        if instance.channel.transport is not None:
            instance.channel.transport.close()
        await self.manager.destroy(instance.sandbox)

    def describe(self):
        """One record per live sandbox, for `admin status`."""
        out = []
        for instance in list(self.instances.values()):
            out.append({"id": instance.sandbox.id, "function": instance.function.name,
                        "state": "busy" if instance.busy else "idle",
                        "pid": instance.sandbox.host_pid()})
        return out

    async def close(self):
        self.closing = True
        await asyncio.gather(*(self._destroy(i) for i in list(self.instances.values())),
                             return_exceptions=True)
