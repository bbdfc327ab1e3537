"""A cold start that gets no sandbox within the function's runtime_sec
fails with a clear error, and gives back its place among the sandboxes."""
import asyncio
import types

import pytest

from worker.config import Limits
from worker.errors import SandboxFailed
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


def test_a_cold_start_without_a_sandbox_times_out():
    limits = Limits(mem_mb=64, procs=16, cpu_percent=100, scratch_mb=8, request_kb=64,
                    runtime_sec=1, response_kb=64, nofile=64, fsize_mb=8)
    manager = NoShells()
    table = FunctionTable(manager, registry=types.SimpleNamespace(), max_sandboxes=4)

    async def scenario():
        with pytest.raises(SandboxFailed, match="no sandbox was ready within 1 s"):
            await table._cold_start(Function("f", "/nowhere", 1, limits), b"")
    asyncio.run(scenario())
    assert manager.cancelled  # the attempt did not go on behind the error
    assert table.pending == 0 and not table.instances
