"""The throw-away function a shell runs while it waits in the pool
(sandbox/runtime/handler.py: rehearsal)."""


def handler(event):
    return event
