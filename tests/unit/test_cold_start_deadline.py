"""A cold start that gets no sandbox within the function's runtime_sec
fails with a clear error, and gives back its place among the sandboxes; one
whose function was removed meanwhile is a 404, not a platform fault."""
import asyncio
import types

import pytest

from worker.config import Limits
from sandbox.errors import SandboxError
from worker.errors import NotFound, SandboxFailed
from worker.functions import FunctionTable
from worker.registry import Function


class NoShells:
    """A sandbox manager whose shells never come."""

    def __init__(self):
        self.cancelled = False

    async def create(self, *args):
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            self.cancelled = True
            raise


LIMITS = Limits(mem_mb=64, procs=16, cpu_percent=100, scratch_mb=8, request_kb=64,
                runtime_sec=1, response_kb=64, nofile=64, fsize_mb=8)


class CodeGone:
    """A sandbox manager that finds the function's code gone."""

    async def create(self, code_dir, *args):
        raise SandboxError("give code to sandbox", code_dir, "open_tree: ENOENT")


def test_a_cold_start_without_a_sandbox_times_out():
    limits = LIMITS
    manager = NoShells()
    table = FunctionTable(manager, registry=types.SimpleNamespace(), max_sandboxes=4)

    async def scenario():
        with pytest.raises(SandboxFailed, match="no sandbox was ready within 1 s"):
            await table._cold_start(Function("f", "/nowhere", 1, limits), b"")
    asyncio.run(scenario())
    assert manager.cancelled  # the attempt did not go on behind the error
    assert table.pending == 0 and not table.instances


def test_a_function_removed_during_its_cold_start_is_not_found(tmp_path):
    table = FunctionTable(CodeGone(), registry=types.SimpleNamespace(), max_sandboxes=4)

    async def scenario(path):
        await table._cold_start(Function("f", path, 1, LIMITS), b"")
    with pytest.raises(NotFound, match="removed during the call"):
        asyncio.run(scenario(str(tmp_path / "gone")))
    with pytest.raises(SandboxFailed):  # still there: the platform's fault
        asyncio.run(scenario(str(tmp_path)))
