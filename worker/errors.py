"""The worker's errors and, in one table, the HTTP status of each.

Handler faults (the function raised, exited, failed to load) and platform
faults (no such function, overload, the sandbox could not be built) are
distinct classes, so they are never confused in a response."""
import json


class WorkerError(Exception):
    status = 500
    error_type = "Platform.Error"
    headers = ()

    def __init__(self, message, error_type=None, stack=()):
        super().__init__(message)
        if error_type:
            self.error_type = error_type
        self.stack = list(stack)

    def body(self, request_id):
        out = {"errorType": self.error_type, "errorMessage": str(self), "requestId": request_id}
        if self.stack:
            out["stackTrace"] = self.stack
        return json.dumps(out).encode()


class BadRequest(WorkerError):
    status = 400
    error_type = "Runtime.UnmarshalError"


class NotFound(WorkerError):
    status = 404
    error_type = "Function.NotFound"


class MethodNotAllowed(WorkerError):
    status = 405
    error_type = "Http.MethodNotAllowed"

    def __init__(self, message, allow):
        super().__init__(message)
        self.headers = ((b"Allow", allow),)


class TooLarge(WorkerError):
    status = 413
    error_type = "Http.RequestTooLarge"


class Busy(WorkerError):
    status = 429
    error_type = "Worker.TooManyRequests"
    headers = ((b"Retry-After", b"1"),)


class Unavailable(WorkerError):
    status = 503
    error_type = "Worker.Unavailable"


class FunctionFault(WorkerError):
    """The function's own doing: its answers say so, as AWS Lambda's do."""
    headers = ((b"X-Function-Error", b"Unhandled"),)


class HandlerRaised(FunctionFault):
    """The function raised: its own exception type, message and stack."""
    status = 500


class InitFailed(FunctionFault):
    """The function's code could not be loaded (no entry, syntax error...)."""
    status = 500


class HandlerDied(FunctionFault):
    status = 502
    error_type = "Runtime.ExitError"


class ResponseTooLarge(FunctionFault):
    """The function returned more than limits.response_kb."""
    status = 502
    error_type = "Runtime.ResponseTooLarge"


class TimedOut(FunctionFault):
    """The call ran past limits.runtime_sec; its sandbox was killed."""
    status = 504
    error_type = "Sandbox.Timedout"


class SandboxFailed(WorkerError):
    """The platform could not build a sandbox: not the function's fault."""
    status = 500
    error_type = "Platform.SandboxError"
