"""The part of the sandbox package that also runs *inside* sandboxes.

It is imported by the host's Python and, bind-mounted at /ol/olrt, by the
rootfs's own python3.  So it uses only the standard library, msgpack and the
cffi backend, and imports its siblings relatively.
"""
import sys

# What the interpreter had imported before any of the runtime: in a plain
# `python3` these are there before a script runs, and a file of the same
# name next to the script does not replace them either (handler.load).
STARTUP_MODULES = frozenset(sys.modules)
