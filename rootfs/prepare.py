"""Turn a cluster's `rootfs` setting into an unpacked directory a zygote can
use: a directory as it is, or a tarball (e.g. `docker export` output)
extracted once into the cluster's cache."""
import fcntl
import hashlib
import logging
import os
import shutil
import subprocess
import time

# Where a sandbox mounts things; each must be a directory in the rootfs.
MOUNT_POINTS = ("ol", "ol/olrt", "handler", "proc", "dev", "tmp")
TARBALL_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.xz", ".txz", ".tar.bz2", ".tar.zst")
STAMP = ".ol-extracted"
# What tar says after the cause, whatever it was: no help on its own.
TAR_EPILOGUES = ("tar: Child returned status", "tar: Error is not recoverable",
                 "tar: Exiting with failure status")

log = logging.getLogger("rootfs")


class RootfsError(Exception):
    pass


def check_exists(path):
    """A RootfsError unless `path` is a directory or a tarball."""
    if os.path.isfile(path) and not path.endswith(TARBALL_SUFFIXES):
        raise RootfsError("rootfs %s is neither a directory nor a tarball (%s)"
                          % (path, ", ".join(TARBALL_SUFFIXES)))
    if not os.path.exists(path):
        raise RootfsError("rootfs %s does not exist (build the default one with `make rootfs`, "
                          "or point the cluster's `rootfs` key at another one)" % path)


def prepare(path, cache_dir):
    check_exists(path)
    if os.path.isdir(path):
        return check_dir(path)
    return check_dir(extract(path, cache_dir))


def check_dir(root):
    if not os.path.lexists(os.path.join(root, "usr/bin/python3")):
        raise RootfsError("rootfs %s has no /usr/bin/python3" % root)
    for name in MOUNT_POINTS:
        point = os.path.join(root, name)
        if not os.path.isdir(point):
            try:
                os.mkdir(point, 0o755)  # an empty mount point; documented in the README
            except OSError as e:
                raise RootfsError("create mount point %s: %s" % (point, e.strerror)) from None
    return root


def extract(tarball, cache_dir):
    st = os.stat(tarball)
    key = hashlib.sha1(("%s:%d:%d" % (os.path.realpath(tarball), st.st_size, st.st_mtime_ns))
                       .encode()).hexdigest()[:12]
    dest = os.path.join(cache_dir, key)
    os.makedirs(cache_dir, exist_ok=True)
    # Workers of one cluster may start together: one extracts, the others wait.
    with open(os.path.join(cache_dir, ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if os.path.exists(os.path.join(dest, STAMP)):
            return dest
        tmp = dest + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        log.info("extracting rootfs %s into %s", tarball, dest)
        start = time.monotonic()
        done = subprocess.run(["tar", "-xf", tarball, "-C", tmp, "--numeric-owner"],
                              stderr=subprocess.PIPE, text=True, errors="replace")
        if done.returncode != 0:
            shutil.rmtree(tmp, ignore_errors=True)
            raise RootfsError("extract %s: %s" % (tarball, tar_error(done)))
        open(os.path.join(tmp, STAMP), "w").close()
        shutil.rmtree(dest, ignore_errors=True)
        os.rename(tmp, dest)
        log.info("extracted rootfs in %.1f s", time.monotonic() - start)
    return dest


def tar_error(done):
    """A failed tar's cause on one line: the first few lines of its stderr
    (and of its decompressor's, like "gzip: stdin: not in gzip format"),
    without the lines that only say it failed."""
    lines = []
    for line in done.stderr.splitlines():
        line = line.strip()
        if line and not line.startswith(TAR_EPILOGUES) and line not in lines:
            lines.append(line)
    return "; ".join(lines[:3]) or "tar exited with status %d" % done.returncode
