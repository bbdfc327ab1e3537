"""The worker's memory back to the host.  glibc keeps what the worker frees
for its own next allocations: after a burst (thousands of uploads, answers
no client reads) that is hundreds of MB the host cannot use, though the
worker holds none of it."""
import ctypes

# mallopt's option: the size from which an allocation gets pages of its own.
M_MMAP_THRESHOLD = -3
# Once this much of request bodies and unread answers was let go with their
# connections, the heap's free pages go back to the host (malloc_trim),
# TRIM_DELAY s later, when the burst is likely over: 3,000 uploads of 61 KB
# left the worker at 216 MB after they had all closed.  Not for less: each
# page given back is a page fault when the worker needs it again.
TRIM_AFTER = 32 << 20
TRIM_DELAY = 1.0


try:
    LIBC = ctypes.CDLL(None)
except OSError:
    LIBC = None


def give_back_big_buffers():
    """glibc serves an allocation over its mmap threshold (128 KiB) with
    pages of its own and returns them when it is freed; but each such
    block freed raises the threshold to its size (up to 32 MiB), and big
    buffers then come from its heap, whose memory stays with the process
    when they are freed.  A burst of 6 MiB answers left the worker at
    896 MB after every connection had closed.  A fixed threshold keeps it
    where it is.  (A no-op where the C library has no mallopt.)"""
    try:
        LIBC.mallopt(M_MMAP_THRESHOLD, 256 << 10)
    except AttributeError:  # no C library, or one without mallopt
        pass


class GiveBack:
    """Counts what closed connections let go, and trims the heap after a
    burst of it (TRIM_AFTER)."""

    def __init__(self):
        self.let_go = 0
        self.pending = None  # the timer of the next trim

    def note(self, size, loop):
        self.let_go += size
        if self.let_go >= TRIM_AFTER and self.pending is None:
            self.pending = loop.call_later(TRIM_DELAY, self._trim)

    def _trim(self):
        self.pending = None
        self.let_go = 0
        try:
            LIBC.malloc_trim(0)
        except AttributeError:  # no C library, or one without malloc_trim
            pass
