"""A shell that said ready without its rehearsal rehearses only if it is
left unused (handler.rehearse_if_unused), never while its call waits."""
import socket

from sandbox.runtime import handler


def rehearsals(monkeypatch, after):
    done = []
    monkeypatch.setattr(handler, "rehearsal", lambda: done.append(1))
    monkeypatch.setattr(handler, "LATE_REHEARSAL_AFTER", after)
    return done


def test_an_unused_shell_rehearses(monkeypatch):
    done = rehearsals(monkeypatch, 0.01)
    shell, worker = socket.socketpair()
    with shell, worker:
        handler.rehearse_if_unused(shell)
    assert done == [1]


def test_a_shell_whose_call_has_come_does_not(monkeypatch):
    done = rehearsals(monkeypatch, 5)
    shell, worker = socket.socketpair()
    with shell, worker:
        worker.sendall(b"assign")
        handler.rehearse_if_unused(shell)
        assert shell.recv(16) == b"assign"  # left for the shell to read
    assert done == []


def test_a_shell_dropped_unused_does_not(monkeypatch):
    done = rehearsals(monkeypatch, 5)
    shell, worker = socket.socketpair()
    worker.close()
    with shell:
        handler.rehearse_if_unused(shell)
    assert done == []
