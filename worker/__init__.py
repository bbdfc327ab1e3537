"""The worker daemon: HTTP on uvloop, the function registry, and the table of
live handler sandboxes.  It uses `sandbox` through its public modules only."""
