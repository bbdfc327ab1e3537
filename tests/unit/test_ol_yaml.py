"""ol.yaml is written by a function's authors and read by the worker, on
its event loop: YAML that would make a huge value (anchors and aliases) or
a deep one is refused, and no error message shows more than a few dozen
characters of a value, whatever it is."""
import time

import pytest

from worker.config import ConfigError, check_limits, from_dict, shown
from worker.errors import InitFailed
from worker.registry import MAX_NESTING, Registry

from test_registry_watch import LIMITS


def alias_bomb(levels=8, width=10):
    """The reviewer's 441 bytes: each anchor aliases the one before `width`
    times, so the value is width ** levels strings."""
    value = '&a0 [%s]' % ", ".join(['"lol"'] * width)
    for i in range(1, levels):
        value = "&a%d [%s, %s]" % (i, value, ", ".join(["*a%d" % (i - 1)] * (width - 1)))
    return "limits:\n  mem_mb: %s\n" % value


def read(tmp_path, text):
    """The function's limits, or the InitFailed its ol.yaml makes."""
    fn = tmp_path / "fn"
    fn.mkdir(exist_ok=True)
    (fn / "lambda_func.py").write_text("def handler(event):\n    return 1\n")
    (fn / "ol.yaml").write_text(text)
    registry = Registry(str(tmp_path), LIMITS)
    try:
        return registry.lookup("fn").limits
    except InitFailed as e:
        assert e.error_type == "Runtime.ConfigError"
        return e
    finally:
        registry.close()


@pytest.mark.parametrize("text", [
    alias_bomb(),
    "limits: &l {mem_mb: 32}\n",
    "base: &b {mem_mb: 32}\nlimits:\n  <<: *b\n",
])
def test_anchors_and_aliases_are_refused_at_once(tmp_path, text):
    started = time.monotonic()
    error = read(tmp_path, text)
    assert time.monotonic() - started < 1
    assert isinstance(error, InitFailed), error
    assert str(error).startswith("ol.yaml of function 'fn': anchors and aliases are not "
                                 "supported (line "), str(error)


@pytest.mark.parametrize("text,message", [
    ("limits: " + "[" * 5000 + "]" * 5000 + "\n",
     "ol.yaml of function 'fn': nested more than %d deep" % MAX_NESTING),
    # Python's int() refuses more than 4300 decimal digits: not a traceback.
    ("limits:\n  mem_mb: %s\n" % ("9" * 5000), "not valid YAML: Exceeds the limit"),
    # A hex literal has no such limit: the value is not shown whole.
    ("limits:\n  mem_mb: 0x%s\n" % ("f" * 20000),
     "limits.mem_mb must be at most 1073741824, not an integer of 80000 bits"),
    ("limits:\n  runtime_sec: %d\n" % 10 ** 23, "limits.runtime_sec must be at most 86400, not 1"),
    ("limits:\n  scratch_mb: %d\n" % (1 << 40), "limits.scratch_mb must be at most 1073741824"),
    ("limits:\n  mem_mb: %s\n" % ("[%s]" % ", ".join(["x" * 1000] * 60)),
     "limits.mem_mb must be a positive integer, not [", ),
    ("egress: %s\n" % ("y" * 50000), "egress must be true or false, not 'yyy"),
])
def test_what_an_error_shows_of_a_value_is_bounded(tmp_path, text, message):
    error = read(tmp_path, text)
    assert isinstance(error, InitFailed), error
    assert message in str(error) and len(str(error)) < 300, str(error)


def test_a_limit_of_its_own_within_bounds_is_taken(tmp_path):
    assert read(tmp_path, "limits:\n  runtime_sec: 86400\n  scratch_mb: 1073741824\n"
                ).runtime_sec == 86400


def test_shown_is_bounded_for_any_value():
    huge = [["lol"] * 10] * 10
    for _ in range(6):
        huge = [huge] * 10  # 10^9 strings, shared, as aliases make them
    for value in (huge, "x" * 10 ** 6, 10 ** 4000, 1 << 100000, {"k" * 1000: [1] * 1000}):
        assert len(shown(value)) <= 100
    assert shown("a\nb") == "'a\\nb'" and shown(7) == "7" and shown(None) == "None"


@pytest.mark.parametrize("key,bound", [("runtime_sec", 86400), ("scratch_mb", 1 << 30),
                                       ("mem_mb", 1 << 30), ("fsize_mb", 1 << 30)])
def test_time_and_size_limits_have_upper_bounds(key, bound):
    check_limits("test", {key: bound})
    with pytest.raises(ConfigError, match="test: limits.%s must be at most %d, not %d"
                                          % (key, bound, bound + 1)):
        check_limits("test", {key: bound + 1})
    with pytest.raises(ConfigError, match="limits.%s must be at most" % key):
        from_dict({"cluster": "/c", "limits": {key: 10 ** 23}}, "test")


def test_sandboxes_mem_mb_has_an_upper_bound():
    config = from_dict({"cluster": "/c", "sandboxes_mem_mb": 1 << 30}, "t")
    assert config.sandboxes_mem_mb == 1 << 30
    with pytest.raises(ConfigError, match="sandboxes_mem_mb must be at most 1073741824"):
        from_dict({"cluster": "/c", "sandboxes_mem_mb": 1 << 44}, "t")
