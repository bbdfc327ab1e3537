"""Each function's output to the log has a budget: bursts of 4 MiB, 256 KiB
a second on average; the log says where it dropped some, and how much."""
from sandbox.manager import OutputBudget, escape_line


def test_a_burst_then_a_rate_then_a_count_of_what_was_dropped(monkeypatch):
    clock = [0.0]
    monkeypatch.setattr("sandbox.manager.time.monotonic", lambda: clock[0])
    budget = OutputBudget()
    assert budget.take("fn", 4 << 20) == (True, None)
    assert budget.take("other", 1 << 20) == (True, None)  # its own budget
    allowed, notice = budget.take("fn", 1000)
    assert not allowed and notice.endswith(b"over 256 KiB/s: dropped from here]")
    assert budget.take("fn", 2000) == (False, None)  # said once
    clock[0] += 1.0
    assert budget.take("fn", 100 << 10) == (True, b"[3000 bytes of output were dropped]")
    assert budget.take("fn", 100 << 10) == (True, None)


def test_escapes_are_charged_after_what_was_let_through(monkeypatch):
    clock = [0.0]
    monkeypatch.setattr("sandbox.manager.time.monotonic", lambda: clock[0])
    budget = OutputBudget()
    assert budget.take("fn", 1 << 20) == (True, None)
    budget.charge("fn", 3 << 20)  # what its escapes added: the burst is spent
    assert budget.take("fn", 1)[0] is False


def test_what_reaches_the_log_escaped():
    assert escape_line(b"a\x1b[31m\rb\x7f") == b"a\\x1b[31m\\x0db\\x7f"
    assert escape_line("\u202e\u0085 caf\u00e9".encode()) == "\\u202e\\x85 caf\u00e9".encode()
    assert escape_line(b"\xff\xc3\ttab") == b"\\xff\\xc3\ttab"  # not UTF-8; a tab stays
