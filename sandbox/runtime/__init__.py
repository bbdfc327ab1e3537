"""The part of the sandbox package that also runs *inside* sandboxes.

It is imported by the host's Python and, bind-mounted at /ol/olrt, by the
rootfs's own python3.  So it uses only the standard library, msgpack and the
cffi backend, and imports its siblings relatively.
"""
