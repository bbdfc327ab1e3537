"""A handler in a freshly exec'd interpreter instead of a zygote's fork.

Only for comparison (the worker's "zygote": false setting): it shows what
the zygote saves.  The shell's setup times and its uid come in argv; the
interpreter's own start-up shows as the gap to the time recorded here.
"""
import ast
import sys
import time

from . import handler


def main():
    times = ast.literal_eval(sys.argv[1]) + [time.monotonic()]
    handler.serve(handler.FRESH_CHANNEL_FD, times, int(sys.argv[2]))


if __name__ == "__main__":
    main()
