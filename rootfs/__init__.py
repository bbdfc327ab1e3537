"""How the base root filesystem is built (build.py), checked (check.py) and
made ready for a cluster, from a directory or a tarball (prepare.py)."""
