"""The registry sees every edit of a function's tree with inotify, walking
the tree once, not at each edit.  A function it cannot watch (inotify's
per-user limit reached) is never served from a sandbox that may hold old
code: each lookup is a new version, and the operator is told once."""
import errno
import logging
import shutil

import pytest

from worker.config import Limits
from worker.registry import Registry

LIMITS = Limits(mem_mb=64, procs=16, cpu_percent=100, scratch_mb=8, request_kb=64,
                runtime_sec=1, response_kb=64, nofile=64, fsize_mb=8)


def test_an_unwatchable_function_gets_a_new_version_each_lookup(tmp_path, caplog):
    (tmp_path / "fn" / "lib").mkdir(parents=True)
    (tmp_path / "fn" / "lambda_func.py").write_text("def handler(event):\n    return 1\n")
    registry = Registry(str(tmp_path), LIMITS)
    try:
        def no_watches_left(path, mask):
            raise OSError(errno.ENOSPC, "No space left on device")
        registry.inotify.add_watch = no_watches_left
        with caplog.at_level(logging.WARNING, logger="worker"):
            versions = {registry.lookup("fn").version for _ in range(3)}
        assert len(versions) == 3 and "fn" not in registry.cache
        warnings = [r.getMessage() for r in caplog.records if "cannot watch" in r.getMessage()]
        assert len(warnings) == 1 and "max_user_watches" in warnings[0]
    finally:
        registry.close()


def test_a_watched_function_keeps_its_version(tmp_path):
    (tmp_path / "fn").mkdir()
    (tmp_path / "fn" / "lambda_func.py").write_text("def handler(event):\n    return 1\n")
    registry = Registry(str(tmp_path), LIMITS)
    try:
        assert registry.lookup("fn") is registry.lookup("fn")
    finally:
        registry.close()


def counting_walks(registry):
    """A list that grows by one for each directory the registry starts watching."""
    added = []
    add_watch = registry.inotify.add_watch

    def counted(path, mask):
        added.append(path)
        return add_watch(path, mask)
    registry.inotify.add_watch = counted
    return added


def test_an_edit_is_seen_without_walking_the_tree_again(tmp_path):
    for i in range(20):
        (tmp_path / "fn" / "lib" / ("pkg%d" % i)).mkdir(parents=True)
    entry = tmp_path / "fn" / "lambda_func.py"
    entry.write_text("def handler(event):\n    return 1\n")
    registry = Registry(str(tmp_path), LIMITS)
    try:
        added = counting_walks(registry)
        first = registry.lookup("fn").version
        assert len(added) == 22  # fn, lib and its 20
        entry.write_text("def handler(event):\n    return 2\n")
        (tmp_path / "fn" / "lib" / "pkg7" / "mod.py").write_text("x = 1\n")
        assert registry.lookup("fn").version > first and len(added) == 22
    finally:
        registry.close()


def test_a_directory_made_or_moved_in_later_is_watched_and_one_moved_out_is_not(tmp_path):
    (tmp_path / "fn").mkdir()
    (tmp_path / "fn" / "lambda_func.py").write_text("def handler(event):\n    return 1\n")
    (tmp_path / "elsewhere" / "pkg").mkdir(parents=True)
    registry = Registry(str(tmp_path), LIMITS)
    try:
        registry.lookup("fn")
        (tmp_path / "fn" / "new" / "deep").mkdir(parents=True)
        version = registry.lookup("fn").version
        (tmp_path / "fn" / "new" / "deep" / "mod.py").write_text("x = 1\n")
        assert registry.lookup("fn").version > version  # seen though made after the walk
        (tmp_path / "elsewhere" / "pkg").rename(tmp_path / "fn" / "pkg")
        version = registry.lookup("fn").version
        (tmp_path / "fn" / "pkg" / "mod.py").write_text("x = 1\n")
        assert registry.lookup("fn").version > version  # moved in: watched too
        (tmp_path / "fn" / "new").rename(tmp_path / "elsewhere" / "new")
        version = registry.lookup("fn").version
        (tmp_path / "elsewhere" / "new" / "deep" / "mod.py").write_text("x = 2\n")
        assert registry.lookup("fn").version == version  # moved out: no longer its code
    finally:
        registry.close()


def registry_of_one(tmp_path):
    """A registry at tmp_path/reg with one function, fn."""
    (tmp_path / "reg" / "fn").mkdir(parents=True)
    (tmp_path / "reg" / "fn" / "lambda_func.py").write_text("def handler(event):\n    return 1\n")
    return Registry(str(tmp_path / "reg"), LIMITS)


def test_a_function_directory_replaced_is_walked_again(tmp_path):
    registry = registry_of_one(tmp_path)
    try:
        registry.lookup("fn")
        (tmp_path / "reg" / "fn").rename(tmp_path / "old")
        (tmp_path / "reg" / "fn" / "lib").mkdir(parents=True)
        (tmp_path / "reg" / "fn" / "lambda_func.py").write_text("def handler(event):\n    return 2\n")
        version = registry.lookup("fn").version
        (tmp_path / "old" / "lambda_func.py").write_text("# not its code any more\n")
        assert registry.lookup("fn").version == version
        (tmp_path / "reg" / "fn" / "lib" / "mod.py").write_text("x = 1\n")
        assert registry.lookup("fn").version > version
    finally:
        registry.close()


def test_events_queued_for_a_tree_no_longer_watched_touch_no_other_function(tmp_path):
    # "fn" has a directory named like the function "lib": once fn's watches
    # are gone, what is still queued for them must not be read as news of lib.
    for name in ("fn", "lib"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "lambda_func.py").write_text("def handler(event):\n    return 1\n")
    (tmp_path / "fn" / "lib").mkdir()
    registry = Registry(str(tmp_path), LIMITS)
    try:
        registry.lookup("fn")
        lib = registry.lookup("lib")
        (tmp_path / "fn").rename(tmp_path / "gone")  # fn's watches go as this is read...
        (tmp_path / "gone" / "lib").chmod(0o700)     # ...with this queued behind it
        assert registry.lookup("lib") is lib
        (tmp_path / "lib" / "lambda_func.py").write_text("def handler(event):\n    return 2\n")
        assert registry.lookup("lib").version > lib.version  # still watched
    finally:
        registry.close()


def write_atomically(path, text):
    path.with_suffix(".new").write_text(text)
    path.with_suffix(".new").rename(path)


def test_a_linked_functions_tree_made_anew_is_watched_again(tmp_path):
    (tmp_path / "reg").mkdir()
    (tmp_path / "app").mkdir()
    (tmp_path / "app" / "lambda_func.py").write_text("def handler(event):\n    return 1\n")
    (tmp_path / "reg" / "linked").symlink_to(tmp_path / "app")
    registry = Registry(str(tmp_path / "reg"), LIMITS)
    try:
        first = registry.lookup("linked").version
        shutil.rmtree(tmp_path / "app")
        (tmp_path / "app").mkdir()
        (tmp_path / "app" / "lambda_func.py").write_text("def handler(event):\n    return 2\n")
        second = registry.lookup("linked").version
        assert second > first
        write_atomically(tmp_path / "app" / "lambda_func.py", "def handler(event):\n    return 3\n")
        assert registry.lookup("linked").version > second  # its new tree is watched
    finally:
        registry.close()


def test_two_names_for_one_directory_share_its_watches(tmp_path):
    (tmp_path / "al").mkdir()
    (tmp_path / "al" / "lambda_func.py").write_text("def handler(event):\n    return 1\n")
    (tmp_path / "al2").symlink_to(tmp_path / "al")
    registry = Registry(str(tmp_path), LIMITS)
    try:
        al, al2 = registry.lookup("al"), registry.lookup("al2")
        write_atomically(tmp_path / "al" / "lambda_func.py", "def handler(event):\n    return 2\n")
        assert registry.lookup("al").version > al.version
        assert registry.lookup("al2").version > al2.version  # an edit of both
        (tmp_path / "al2").unlink()
        (tmp_path / "al2").mkdir()
        (tmp_path / "al2" / "lambda_func.py").write_text("def handler(event):\n    return 9\n")
        al, al2 = registry.lookup("al"), registry.lookup("al2")
        write_atomically(tmp_path / "al" / "lambda_func.py", "def handler(event):\n    return 3\n")
        assert registry.lookup("al").version > al.version  # al still watched
        assert registry.lookup("al2") is al2  # no longer the same code
        write_atomically(tmp_path / "al2" / "lambda_func.py", "def handler(event):\n    return 8\n")
        assert registry.lookup("al2").version > al2.version  # its own tree is watched
    finally:
        registry.close()


def test_a_tree_over_the_cap_is_refused_without_a_watch_and_a_smaller_one_is_served(tmp_path):
    """A function of more than MAX_DIRS directories is one ConfigError line
    naming it and the cap; its walk stops there, and no watch is left."""
    from worker.errors import InitFailed
    from worker.registry import MAX_DIRS
    fn = tmp_path / "reg" / "big"
    for i in range(MAX_DIRS - 1):  # with fn and lib: one over
        (fn / "lib" / str(i)).mkdir(parents=True, exist_ok=True)
    (fn / "lib" / "0" / "__pycache__").mkdir()  # not counted
    (fn / "lambda_func.py").write_text("def handler(event):\n    return 1\n")
    registry = Registry(str(tmp_path / "reg"), LIMITS)
    try:
        added = counting_walks(registry)
        with pytest.raises(InitFailed) as refused:
            registry.lookup("big")
        assert refused.value.error_type == "Runtime.ConfigError"
        assert str(refused.value) == (
            "function 'big' has more than %d directories (not counting __pycache__): the "
            "worker watches each for edits, and at most %d of one function's"
            % (MAX_DIRS, MAX_DIRS))
        assert added == [] and registry.watches == {} and "big" not in registry.watched
        shutil.rmtree(fn / "lib" / "1")  # now exactly at the cap
        assert registry.lookup("big").version == 0 and len(added) == MAX_DIRS
    finally:
        registry.close()


def test_a_tree_grown_past_the_cap_is_unwatched_and_then_refused(tmp_path):
    from worker.errors import InitFailed
    from worker.registry import MAX_DIRS
    (tmp_path / "fn").mkdir()
    (tmp_path / "fn" / "lambda_func.py").write_text("def handler(event):\n    return 1\n")
    (tmp_path / "elsewhere").mkdir()
    for i in range(MAX_DIRS):
        (tmp_path / "elsewhere" / str(i)).mkdir()
    registry = Registry(str(tmp_path), LIMITS)
    try:
        registry.lookup("fn")
        (tmp_path / "elsewhere").rename(tmp_path / "fn" / "lib")  # one move: no walk of it all
        registry.drain_changes()
        assert "fn" not in registry.watched and registry.watches == {}
        with pytest.raises(InitFailed, match="more than %d directories" % MAX_DIRS):
            registry.lookup("fn")
    finally:
        registry.close()


def test_an_overflowed_queue_is_logged_and_retires_every_function(tmp_path, caplog):
    from inotify_simple import Event, flags
    (tmp_path / "fn").mkdir()
    (tmp_path / "fn" / "lambda_func.py").write_text("def handler(event):\n    return 1\n")
    registry = Registry(str(tmp_path), LIMITS)
    try:
        changed, gone = [], []
        registry.on_change, registry.on_gone = changed.append, lambda: gone.append(1)
        first = registry.lookup("fn")
        registry.inotify.read = lambda timeout: [Event(-1, flags.Q_OVERFLOW, 0, "")]
        with caplog.at_level(logging.WARNING, logger="worker"):
            registry.drain_changes()
        assert changed == ["fn"] and not gone  # its registry is still there
        (warning,) = [r.getMessage() for r in caplog.records]
        assert "event queue overflowed" in warning and "max_queued_events" in warning
        del registry.inotify.read
        assert registry.lookup("fn").version > first.version
    finally:
        registry.close()


def test_a_deleted_registry_is_told_once_and_a_moved_one_is_not(tmp_path):
    registry = registry_of_one(tmp_path)
    try:
        gone = []
        registry.on_gone = lambda: gone.append(1)
        registry.lookup("fn")
        (tmp_path / "reg").rename(tmp_path / "moved")
        registry.drain_changes()
        assert not gone
        shutil.rmtree(tmp_path / "moved")
        registry.drain_changes()
        assert gone == [1] and registry.gone  # DELETE_SELF, then IGNORED: told once
    finally:
        registry.close()


def test_a_deleted_registry_whose_events_an_overflow_lost_is_told(tmp_path):
    """Its DELETE_SELF may be among the events a full queue dropped: that
    the kernel no longer has its watch says it is gone."""
    from inotify_simple import Event, flags
    (tmp_path / "reg").mkdir()
    registry = Registry(str(tmp_path / "reg"), LIMITS)
    try:
        gone = []
        registry.on_gone = lambda: gone.append(1)
        (tmp_path / "reg").rename(tmp_path / "moved")
        registry.inotify.read = lambda timeout: [Event(-1, flags.Q_OVERFLOW, 0, "")]
        registry.drain_changes()
        assert not gone  # moved: still watched
        shutil.rmtree(tmp_path / "moved")
        registry.drain_changes()  # its own events "lost": only the overflow is read
        assert gone == [1]
    finally:
        registry.close()
