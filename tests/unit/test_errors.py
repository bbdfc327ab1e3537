import errno
import json
import signal

from sandbox.runtime.syscalls import CLONE_NEWNS, CLONE_NEWPID, SyscallError, ns_names
from sandbox.zygote import describe_status
from worker import errors


def test_syscall_errors_name_operation_object_and_errno():
    e = SyscallError("mount", "tmpfs on /x/tmp", errno.EPERM)
    assert str(e) == "mount tmpfs on /x/tmp: Operation not permitted (EPERM)"
    assert isinstance(e, OSError) and e.errno == errno.EPERM


def test_namespace_flag_names():
    assert ns_names(CLONE_NEWNS | CLONE_NEWPID) == "mnt+pid"
    assert ns_names(0) == "none"


def test_exit_status_in_words():
    assert describe_status(3 << 8) == "exited with status 3"
    assert describe_status(signal.SIGSEGV) == "was killed by signal 11 (SIGSEGV)"


def test_every_worker_error_has_a_status_and_a_json_body():
    for cls in vars(errors).values():
        if isinstance(cls, type) and issubclass(cls, errors.WorkerError):
            error = cls("msg", b"POST") if cls is errors.MethodNotAllowed else cls("msg")
            body = json.loads(error.body("rid"))
            assert 400 <= cls.status < 600
            assert body["errorMessage"] == "msg" and body["requestId"] == "rid"
            assert body["errorType"]


def test_handler_faults_and_platform_faults_differ():
    assert errors.HandlerRaised.headers and errors.HandlerDied.headers
    assert not errors.SandboxFailed.headers  # no X-Function-Error for our own faults
