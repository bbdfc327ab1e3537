"""Host-side Linux primitives and the sandbox lifecycle.

Public modules: `sandbox.manager` (SandboxManager, Sandbox, SandboxConfig),
`sandbox.cgroups` (Cgroup, Limits, mode), `sandbox.uids` (the sandboxes'
host uids) and `sandbox.errors`.  This file imports nothing, so that
`bin/admin` can use `sandbox.cgroups` and `sandbox.uids` with any python3
and no third-party packages.
"""
