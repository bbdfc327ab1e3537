"""What the worker's two pools (ready shells, egress namespaces) share:
when to replace what a call took, and waiting for the next ready item."""
import asyncio

# How long a taken item waits for its replacement: a cold call takes 2 to
# 3 ms here, and making the replacement (a fork and a shell's set-up, or a
# namespace) while it runs would compete with it for the CPUs.
REFILL_DELAY = 0.01


class Refill:
    """Calls `refill` once the call that took an item is likely answered,
    or soon when fewer than half of the wanted items are ready.  Items
    taken meanwhile share that one call, so their replacements are made
    together: the zygote forks a whole batch of shells more cheaply than
    each alone."""

    def __init__(self, refill):
        self.refill = refill
        self.pending = None  # the asyncio handle of the next call
        self.urgent = False

    def after_take(self, ready, wanted):
        low = 2 * ready < wanted
        if self.pending is not None:
            if self.urgent or not low:
                return
            self.pending.cancel()
        loop = asyncio.get_running_loop()
        self.urgent = low
        # Soon, not now: the caller that took the item goes on first.
        self.pending = loop.call_later(0 if low else REFILL_DELAY, self._run)

    def _run(self):
        self.pending = None
        self.refill()


async def wait_for_item(waiter, waiters, give_back):
    """Await `waiter` (already queued in `waiters`).  If the caller gives up
    (its deadline) just as an item came, the item goes to `give_back`
    instead of being lost; the waiter never stays queued."""
    try:
        return await waiter
    except asyncio.CancelledError:
        if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
            give_back(waiter.result())
        raise
    finally:
        if waiter in waiters:
            waiters.remove(waiter)
