"""Each function's output to the log has a budget: bursts of 4 MiB, 256 KiB
a second on average; the log says where it dropped some, and how much."""
from sandbox.manager import OutputBudget


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
