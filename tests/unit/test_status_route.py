"""/status says ready only when calls can be served: not while the worker
starts or drains, nor while its zygote is down and cannot be restarted."""
from worker.app import App
from worker.http import Request


class Table:
    def __init__(self, trouble=None):
        self._trouble = trouble

    def trouble(self):
        return self._trouble


def status(app):
    return app.handle_now(Request("GET", "/status", {}, b"", True))


def test_status_is_ready_only_when_sandboxes_can_be_made():
    app = App(Table(), max_body=1024, max_connections=10)
    assert status(app).status == 503  # starting
    app.ready = True
    assert (status(app).status, status(app).body) == (200, b"ready")
    app.table = Table("its zygote could not be restarted: no fds left")
    answer = status(app)
    assert answer.status == 503 and b"could not be restarted: no fds left" in answer.body
