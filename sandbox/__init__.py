"""Host-side Linux primitives and the sandbox lifecycle.

Public modules: `sandbox.manager` (SandboxManager, Sandbox, SandboxConfig),
`sandbox.cgroups` (Cgroup, Limits, mode), `sandbox.uids` (the sandboxes'
host uids), `sandbox.filelock` (which running process owns what) and
`sandbox.errors`.  This file imports nothing, so that
`bin/admin` can use `sandbox.cgroups`, `sandbox.uids` and `sandbox.filelock` with any python3
and no third-party packages.
"""
