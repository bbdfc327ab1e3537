"""Check a rootfs the way a worker uses it: boot a real zygote in a sandbox
built from it (its python3 imports the runtime, msgpack and the cffi
shims), then stop it and remove its cgroup."""
import asyncio
import os
import sys

from sandbox.cgroups import Cgroup
from sandbox.errors import SandboxError
from sandbox.zygote import Zygote


async def _boot(root):
    cgroup = Cgroup("openlambda/rootfs-check-%d" % os.getpid()).create()
    zygote = Zygote(root, cgroup, 2, "rootfs-check", 8, lambda *_: None, lambda *_: None)
    try:
        await zygote.start()
        await zygote.stop()
    finally:
        cgroup.remove()
        cgroup.remove_empty_parents()


def check(root):
    """Raise SandboxError if a zygote cannot boot in `root`."""
    asyncio.run(_boot(root))


if __name__ == "__main__":
    try:
        check(sys.argv[1])
    except SandboxError as e:
        print("rootfs check failed: %s" % e, file=sys.stderr)
        sys.exit(1)
    print("rootfs %s: ok (a zygote booted in it)" % sys.argv[1])
