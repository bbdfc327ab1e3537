"""A function the registry cannot watch (inotify's per-user limit reached)
is never served from a sandbox that may hold old code: each lookup is a new
version, and the operator is told once."""
import errno
import logging

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
