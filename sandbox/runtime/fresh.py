"""A handler in a freshly exec'd interpreter instead of a zygote's fork.

Only for comparison (the worker's "zygote": false setting): it shows what
the zygote saves.  The shell's setup times, its uid and whether to
rehearse (as the zygote's children do) come in argv; the interpreter's own
start-up shows as the gap to the time recorded here.
"""
import ast
import sys
import time

from . import handler


def main():
    times = ast.literal_eval(sys.argv[1]) + [time.monotonic()]
    sys.stdout.reconfigure(line_buffering=True)  # as a zygote's children have it (zygote.main)
    handler.serve(handler.FRESH_CHANNEL_FD, times, int(sys.argv[2]), rehearse=sys.argv[3] == "1")


if __name__ == "__main__":
    main()
