"""Calls that failed for other reasons than the function's exceptions go to
the worker's log, a line per function and kind at most every 10 s."""
import logging

from worker.app import FailureLog
from worker.errors import Busy, HandlerDied, HandlerRaised, NotFound, TimedOut


def lines(caplog):
    return [r.getMessage() for r in caplog.records]


def test_a_burst_is_one_line_then_a_count(caplog, monkeypatch):
    failures = FailureLog()
    clock = [100.0]
    monkeypatch.setattr("worker.app.time.monotonic", lambda: clock[0])
    with caplog.at_level(logging.WARNING, logger="worker"):
        for _ in range(5):
            failures.note("fn", "r1", TimedOut("Task timed out after 1.00 seconds"))
        failures.note("other", "r2", TimedOut("Task timed out after 1.00 seconds"))
        failures.note("fn", "r3", HandlerDied("the handler of 'fn' exited with status 1"))
        clock[0] += 11
        failures.note("fn", "r4", TimedOut("Task timed out after 1.00 seconds"))
    said = lines(caplog)
    assert len(said) == 4, said
    assert said[0] == ("call r1 to 'fn': 504 Sandbox.Timedout: Task timed out after 1.00 "
                       "seconds")
    assert said[3].endswith("(and 4 more like it in the last 11 s)")


def test_the_functions_own_errors_and_the_callers_are_not_logged_but_busy_is(caplog):
    failures = FailureLog()
    with caplog.at_level(logging.WARNING, logger="worker"):
        failures.note("fn", "r1", HandlerRaised("boom", "ValueError"))
        failures.note("fn", "r2", NotFound("no function named 'fn'"))
        failures.note("fn", "r3", Busy("all 128 sandboxes are busy"))
    assert [line.split(":")[1] for line in lines(caplog)] == [" 429 Worker.TooManyRequests"]


def test_what_the_function_wrote_is_escaped(caplog):
    with caplog.at_level(logging.WARNING, logger="worker"):
        FailureLog().note("fn", "r1", HandlerDied("setup: \r\x1b[2Kforged"))
    assert lines(caplog)[0].endswith("setup: \\x0d\\x1b[2Kforged")
