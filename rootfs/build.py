"""Build the base root filesystem with debootstrap, once.

    python -m rootfs.build [--out DIR] [--mirror URL]

Debian minbase plus python3 and what the in-sandbox runtime imports
(msgpack, the cffi backend).  The result is cached: a second run with the
same recipe does nothing.  It is checked by booting a real zygote in it.
"""
import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time

from sandbox.errors import SandboxError

from .check import check
from .prepare import MOUNT_POINTS

SUITE = "bookworm"
PACKAGES = ("python3", "python3-msgpack", "python3-cffi-backend")
DEFAULT_OUT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                           "build", "rootfs")
DEFAULT_MIRROR = "http://deb.debian.org/debian"
STAMP = ".ol-rootfs.json"


def recipe(mirror):
    return {"suite": SUITE, "variant": "minbase", "packages": list(PACKAGES), "mirror": mirror}


def host_mirror():
    """The Debian mirror the host's apt already uses, if it is a Debian host."""
    for path in ("/etc/apt/sources.list.d/debian.sources", "/etc/apt/sources.list"):
        try:
            with open(path) as f:
                for line in f:
                    words = line.split()
                    if words[:1] in (["URIs:"], ["deb"]) and len(words) > 1 \
                            and words[1].rstrip("/").endswith("/debian"):
                        return words[1]
        except OSError:
            continue
    return DEFAULT_MIRROR


def up_to_date(out, want):
    try:
        with open(os.path.join(out, STAMP)) as f:
            return json.load(f) == want
    except (OSError, ValueError):
        return False


def debootstrap(target, mirror):
    cmd = ["debootstrap", "--variant=minbase", "--include=" + ",".join(PACKAGES),
           SUITE, target, mirror]
    start = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        # Progress: one line per debootstrap step, with the time so far.
        print("  [%5.1fs] %s" % (time.monotonic() - start, line.rstrip()), flush=True)
    if proc.wait() != 0:
        raise SystemExit("rootfs: debootstrap failed with status %d (see above)" % proc.returncode)


def build(out, mirror):
    want = recipe(mirror)
    if up_to_date(out, want):
        os.utime(os.path.join(out, STAMP))  # so make sees it as newer than its inputs
        print("rootfs %s is up to date" % out)
        return
    if shutil.which("debootstrap") is None:
        raise SystemExit("rootfs: debootstrap is not installed (apt-get install debootstrap)")
    tmp = out + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    print("building rootfs %s: debootstrap %s with %s (about a minute)"
          % (out, SUITE, ", ".join(PACKAGES)), flush=True)
    debootstrap(tmp, mirror)
    for name in MOUNT_POINTS:
        os.makedirs(os.path.join(tmp, name), mode=0o755, exist_ok=True)
    print("checking rootfs: booting a zygote in it", flush=True)
    try:
        check(tmp)
    except SandboxError as e:
        raise SystemExit("rootfs: check failed: %s" % e) from None
    with open(os.path.join(tmp, STAMP), "w") as f:
        json.dump(want, f)
    shutil.rmtree(out, ignore_errors=True)
    os.rename(tmp, out)
    print("rootfs %s is ready (%s)" % (out, _size(out)))


def _size(path):
    done = subprocess.run(["du", "-sh", path], stdout=subprocess.PIPE, text=True)
    return done.stdout.split()[0] if done.returncode == 0 else "?"


def main(argv=None):
    parser = argparse.ArgumentParser(prog="rootfs.build", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=DEFAULT_OUT, help="where to put it (%(default)s)")
    parser.add_argument("--mirror", default=None, help="Debian mirror (default: the host's)")
    args = parser.parse_args(argv)
    build(os.path.abspath(args.out), args.mirror or host_mirror())
    return 0


if __name__ == "__main__":
    sys.exit(main())
