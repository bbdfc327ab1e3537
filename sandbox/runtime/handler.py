"""A handler process: a shell says "ready" on its channel, waits to be
given a function ("assign", with the fd of its code tree), loads the code
once from /handler, then serves calls until the worker closes the channel.

Requests are msgpack maps {"id", "body"} where body is the JSON event.
Replies are {"status": "ok", "body": JSON}, or {"status": "error" |
"init_error", "errorType", "errorMessage", "stackTrace"} for faults of the
function's code, {"status": "bad_event", "errorMessage"} for a body that
is not JSON, or {"status": "setup_error", "errorMessage"} when the
sandbox itself could not be finished (a platform fault).  Replies carry
timings in seconds: "run" always; on the first, "received" (when the code
arrived, a monotonic stamp), "attach", "drop" (privileges) and "load".
"""
import importlib.machinery
import importlib.util
import inspect
import json
import os
import select
import socket
import sys
import time
import traceback
import types

from . import STARTUP_MODULES, mounts, privileges, proto
from . import syscalls as sc

CODE_DIR = "/handler"
FRESH_CHANNEL_FD = 3
# (file, module, function) in the order they are looked for.
ENTRIES = (("lambda_func.py", "lambda_func", "handler"), ("f.py", "f", "f"))


class LoadError(Exception):
    def __init__(self, error_type, message, stack=()):
        super().__init__(message)
        self.error_type = error_type
        self.stack = list(stack)


class Context:
    """What handler(event, context) receives, named as AWS users expect."""

    def __init__(self, function_name, request_id, deadline):
        self.function_name = function_name
        self.aws_request_id = self.request_id = request_id
        self._deadline = deadline  # monotonic; None if the worker set none

    def get_remaining_time_in_millis(self):
        """Until the worker kills the call (limits.runtime_sec).  Its clock
        started when it sent the request, a little before this one."""
        if self._deadline is None:
            return 0
        return max(0, int((self._deadline - time.monotonic()) * 1000))


def load(code_dir=CODE_DIR):
    """Import the function's entry; returns (callable, wants_context)."""
    for filename, module, attr in ENTRIES:
        path = os.path.join(code_dir, filename)
        try:
            with open(path, "rb") as f:
                source = f.read()
        except FileNotFoundError:
            continue
        except PermissionError:
            # The worker saw the file as root; the handler runs as nobody.
            raise LoadError("Runtime.PermissionDenied",
                            "the function's code is not readable by the sandbox's user (uid %d):"
                            " make its files readable by others, e.g. chmod -R a+rX on its "
                            "directory" % os.getuid()) from None
        if code_dir not in sys.path:
            sys.path.insert(0, code_dir)  # for the modules next to it
        _unshadow(code_dir)
        try:
            mod = _import_source(module, path, source)
        except SyntaxError as e:
            raise LoadError("Runtime.UserCodeSyntaxError",
                            "syntax error in %s, line %s: %s" % (filename, e.lineno, e.msg)) from None
        except Exception as e:
            raise LoadError("Runtime.ImportModuleError",
                            "importing %s raised %s: %s" % (filename, _class_name(e),
                                                            _describe(e)),
                            _stack(e, skip=2)) from None
        fn = getattr(mod, attr, None)
        if not callable(fn):
            raise LoadError("Runtime.HandlerNotFound",
                            "%s defines no function %s(event)" % (filename, attr))
        return fn, _wants_context(fn)
    raise LoadError("Runtime.HandlerNotFound",
                    "no entry file: expected lambda_func.py with handler(event) or f.py with f(event)")


def _unshadow(code_dir):
    """Modules of the function's own (files and packages in its directory)
    named like one the zygote has imported: forgotten, so that its
    `import uuid` gets its uuid.py, as it would in a plain `python3`
    running it, not the zygote's.  Those a plain interpreter imports at
    start (os, sys...) stay, as they do there.  What the zygote's modules
    hold of the forgotten ones is theirs, and stays."""
    try:
        with os.scandir(code_dir) as entries:
            names = [entry.name for entry in entries]
    except OSError:  # a directory its user may enter but not list: so be it
        return
    for entry in names:
        name, dot, rest = entry.partition(".")
        if name not in sys.modules or name in STARTUP_MODULES:
            continue
        # A directory is a package only with an __init__.py: one without
        # (data, say) is a namespace portion, which a standard package of
        # the same name wins over in plain Python too.
        if rest in ("py", "so") or rest.endswith(".so") or (
                not dot and os.path.exists(os.path.join(code_dir, entry, "__init__.py"))):
            for module in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
                del sys.modules[module]


def _import_source(name, path, source):
    """Run `source`, read from `path`, as module `name`, as `import` would
    (spec, loader, __file__, an entry in sys.modules), without the search
    for it.  The import system's finders and loaders are Python code: a
    forked handler running them writes (and so copies) some 200 pages of the
    zygote's memory, ~0.7 ms in a VM; compiling the file directly copies
    about 80."""
    spec = importlib.util.spec_from_loader(
        name, importlib.machinery.SourceFileLoader(name, path), origin=path, is_package=False)
    spec.has_location = True  # so that __file__ is set
    module = importlib.util.module_from_spec(spec)
    code = compile(source, path, "exec", dont_inherit=True)
    sys.modules[name] = module
    try:
        exec(code, module.__dict__)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def _wants_context(fn):
    """Does fn take a second positional argument (or *args)?  Read from its
    code for a plain function: inspect.signature is heavy Python too (see
    _import_source).  It handles the rest (wrapped, partial, callable
    objects), and a function whose signature was set by hand."""
    if type(fn) is types.FunctionType and not vars(fn):
        code = fn.__code__
        return code.co_argcount >= 2 or bool(code.co_flags & inspect.CO_VARARGS)
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(positional) >= 2 or any(p.kind == p.VAR_POSITIONAL for p in params)


# What an error report reads of the function's exceptions, taken from the
# fields the interpreter set, not through attributes the function's classes
# can replace with properties that raise (or answer anything): a class's
# name (a metaclass can override __name__), an exception's traceback, and
# sys.exit()'s code.
_CLASS_NAME = type.__dict__["__name__"]
_TRACEBACK = BaseException.__dict__["__traceback__"]
_EXIT_CODE = SystemExit.__dict__["code"]


def _class_name(obj):
    """The name obj's class was made with (or given since: a str either way)."""
    return _CLASS_NAME.__get__(type(obj))


def _stack(exc, skip=1):
    """exc's stack as text, less the runtime's own frames: users want to
    see their code.  Reading its lines may run the function's code (a
    module's own __loader__), which may raise."""
    try:
        return traceback.format_list(traceback.extract_tb(_TRACEBACK.__get__(exc))[skip:])
    except BaseException as e:  # KeyboardInterrupt and SystemExit too: only a description
        return ["(its stack could not be made: %s)\n" % _class_name(e)]


def _error(exc, error_type=None):
    return {"status": "error", "errorType": error_type or _class_name(exc),
            "errorMessage": proto.clip_message(_describe(exc)),
            "stackTrace": proto.clip_stack(_stack(exc))}


def _describe(obj):
    """str(obj), for an exception or an exit code of the function's: its
    code, which may raise, or return a str subclass whose own methods (len,
    slicing, formatting) would run its code again; so a plain str."""
    try:
        return str.__str__(str(obj))
    except BaseException as e:  # KeyboardInterrupt and SystemExit too: only a description
        return "(its message could not be made: %s.__str__ raised %s)" % (
            _class_name(obj), _class_name(e))


def _exit_code(exc):
    """What sys.exit() in the function's code exits its process with, as
    a plain value (the zygote then exits with it, printing one that is no
    int, as Python does): a code whose own methods raise must not make the
    zygote's code, on the same stack, fail."""
    code = _EXIT_CODE.__get__(exc)
    if code is None or type(code) is int:
        return code
    if issubclass(type(code), int):  # a bool, or an int with methods of its own
        return int.__int__(code)
    return _describe(code)


# NaN and the infinities are not JSON: a reply holding one is refused, as
# any other value that is not.
JSON_ENCODER = json.JSONEncoder(allow_nan=False)


def invoke(fn, wants_context, function_name, request, max_response=None, runtime=None,
           received=None):
    """One call.  `received`: when its time began, if before now (a cold
    start's: the worker's clock runs from when it gave the code)."""
    received = received or time.monotonic()
    try:
        # The worker checked a small body already; a big one only this
        # does (worker/app.py CHECKED_HERE says why).
        event = proto.STRICT_JSON.decode(request["body"].decode()) if request["body"] else {}
    except ValueError as e:  # not JSON, nor UTF-8
        return {"status": "bad_event", "errorMessage": proto.clip_message(str(e))}
    except RecursionError:  # said as the worker's check says it of a small body
        return {"status": "bad_event", "errorMessage": "nested too deeply"}
    start = time.monotonic()
    try:
        if wants_context:
            deadline = received + runtime if runtime else None
            result = fn(event, Context(function_name, request["id"], deadline))
        else:
            result = fn(event)
        if inspect.iscoroutine(result):  # an `async def handler`: run on a loop of its own
            import asyncio  # the zygote's: imported before the fork
            result = asyncio.run(result)
    except SystemExit:
        raise  # sys.exit() in the function: the process exits with its status
    except BaseException as e:  # KeyboardInterrupt and others are the function's errors too
        return dict(_error(e), run=time.monotonic() - start)
    run = time.monotonic() - start
    try:
        body = JSON_ENCODER.encode(result).encode()
    except Exception as e:  # not JSON, too deep (RecursionError), a broken __str__...
        return {"status": "error", "errorType": "Runtime.MarshalError",
                "errorMessage": proto.clip_message("the return value is not JSON: %s"
                                                   % _describe(e)),
                "stackTrace": [], "run": run}
    if max_response is not None and len(body) > max_response:
        return {"status": "too_large", "size": len(body), "run": run}
    return {"status": "ok", "body": body, "run": run}


def serve(channel_fd, setup_times, host_uid, rehearse, ready_fds=()):
    """Say ready (passing `ready_fds` along), wait for a function, load it,
    serve it as `host_uid`.  Returns when the worker closes the channel (or
    drops this shell unused).  Without `rehearse` (the worker's choice when
    calls are waiting for shells) it says ready at once, and rehearses only
    if it is then left waiting (rehearse_if_unused)."""
    channel = socket.socket(fileno=channel_fd)
    # Made now, so that at assignment only the syscalls are left.
    leave_root = privileges.Privileges(host_uid)
    try:
        leave_root.before_assignment()
    except OSError as e:
        report_setup_failure(channel.detach(), e)
        return
    if rehearse:
        rehearsal()
    attach = mounts.CompiledPlan(mounts.code_plan(-1))  # its fd is filled in then
    proto.send_packet(channel, {"op": "ready", "t": setup_times, "rehearsed": rehearse},
                      ready_fds)
    for fd in ready_fds:
        os.close(fd)
    unpacker = proto.unpacker()
    if not rehearse:
        rehearse_if_unused(channel)
    assign, fds = _wait_assign(channel, unpacker)
    if assign is None:
        return
    assigned = time.monotonic()
    try:
        if assign.get("egress"):
            # A namespace the worker prepared, with a route out: it replaces
            # the loopback-only one this shell was built with.
            sc.setns(fds[1], sc.CLONE_NEWNET)
            os.close(fds[1])
        attach.set_fd(0, fds[0])
        attach.apply()
        if assign.get("scratch_mb"):
            mounts.apply(mounts.scratch_plan(assign["scratch_mb"]))
        os.chdir(CODE_DIR)
        mounted = time.monotonic()
        limits = assign.get("process_limits", {})
        privileges.set_rlimits(limits.get("nofile"), limits.get("fsize"))
        leave_root.final()
    except Exception as e:
        report_setup_failure(channel.detach(), e)
        return
    attached = time.monotonic()
    # From here on the function's code runs (its import first).
    try:
        try:
            fn, wants_context = load()
        except LoadError as e:
            channel.sendall(proto.pack({"status": "init_error", "errorType": e.error_type,
                                        "errorMessage": proto.clip_message(str(e)),
                                        "stackTrace": proto.clip_stack(e.stack)}))
            return
        startup = {"received": assigned, "attach": mounted - assigned, "drop": attached - mounted,
                   "load": time.monotonic() - attached}
        name = assign.get("function", "")
        while True:
            for request in unpacker:
                reply = invoke(fn, wants_context, name, request, limits.get("response"),
                               limits.get("runtime"), received=startup and assigned)
                # Whose reply it is: one the function's code wrote itself on the
                # channel would otherwise answer the next call.
                reply["id"] = request["id"]
                if startup:
                    reply.update(startup)
                    startup = None
                for stream in (sys.stdout, sys.stderr):
                    try:
                        stream.flush()
                    except Exception:
                        pass  # the function closed, broke or replaced its own output
                channel.sendall(proto.pack(reply))
            data = channel.recv(1 << 16)
            if not data:
                return
            unpacker.feed(data)
    except SystemExit as e:  # sys.exit() in its code: its process exits, as it asked
        raise SystemExit(_exit_code(e)) from None


# Shipped with the runtime, so a shell writes no file to rehearse.
REHEARSAL_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "rehearsal")


def rehearsal():
    """Run one call of a throw-away function before the real one arrives.

    A forked child pays for the first touch of every page it writes (copy
    on write, and page faults cost several times more in a VM): reading and
    compiling code, the module machinery, json and msgpack.  Paying it
    here, while the shell waits in the pool, takes it off the cold path."""
    try:
        fn, wants_context = load(REHEARSAL_DIR)
        invoke(fn, wants_context, "", {"id": "", "body": b'{"a": [1, 2.5, "x"]}'})
        proto.unpacker().feed(proto.pack({"status": "ok", "body": b"{}", "run": 0.0}))
    finally:
        sys.modules.pop("lambda_func", None)
        sys.path.remove(REHEARSAL_DIR)


# A shell that said ready without its rehearsal, because calls were waiting
# for shells, and that is still unused after this long went to the pool: the
# burst is over, and the next cold start to take it should not pay for the
# rehearsal it skipped.  After a burst of 100 at concurrency 8, the next 16
# cold starts (200 ms apart) took 2.7 ms at the median without it, 2.3 with
# it ("load" 0.68 to 0.30 ms; 3 runs each).  Not sooner: in a steady
# stream of cold starts a shell waits in the pool for tens of ms, and
# rehearsing it then only costs CPU (churn 1-2% slower at 0.1 s).
LATE_REHEARSAL_AFTER = 1.0


def rehearse_if_unused(channel):
    """The rehearsal, once `channel` has stayed silent LATE_REHEARSAL_AFTER."""
    readable, _, _ = select.select([channel], [], [], LATE_REHEARSAL_AFTER)
    if not readable:
        rehearsal()


def _wait_assign(channel, unpacker):
    """The "assign" message and its fds; bytes after it stay in `unpacker`."""
    fds = []
    while True:
        data, fd_list = proto.recv_fds(channel)
        fds += fd_list
        if not data:
            return None, fds
        unpacker.feed(data)
        for msg in unpacker:
            return msg, fds


def report_setup_failure(channel_fd, exc):
    """Tell the worker why this sandbox could not be built, then give up."""
    try:
        with socket.socket(fileno=channel_fd) as channel:
            channel.sendall(proto.pack({"status": "setup_error",
                                        "errorMessage": "sandbox setup failed: %s" % exc}))
    except OSError:
        pass
