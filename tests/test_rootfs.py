"""Another rootfs for a cluster: a tarball (like `docker export` output)."""
import os
import subprocess

import pytest

from conftest import REPO, start_cluster, stop_cluster
from rootfs.prepare import RootfsError, check_dir, prepare


def test_a_cluster_runs_on_a_rootfs_tarball(tmp_path):
    tarball = tmp_path / "exported.tar"
    subprocess.run(["tar", "-cf", str(tarball), "-C", os.path.join(REPO, "build", "rootfs"),
                    "--exclude=./ol", "--exclude=./handler", "."], check=True)
    w = start_cluster(tmp_path, rootfs=str(tarball))
    try:
        assert w.call("hello", {"name": "tar"})[2] == "Hello, tar!"
        extracted = os.listdir(os.path.join(w.path, "rootfs"))
        assert [d for d in extracted if not d.startswith(".")], extracted
    finally:
        stop_cluster(w)


def test_prepare_errors_name_the_path(tmp_path):
    with pytest.raises(RootfsError, match="does not exist"):
        prepare(str(tmp_path / "nope"), str(tmp_path / "cache"))
    (tmp_path / "f.txt").write_text("x")
    with pytest.raises(RootfsError, match="neither a directory nor a tarball"):
        prepare(str(tmp_path / "f.txt"), str(tmp_path / "cache"))
    with pytest.raises(RootfsError, match="no /usr/bin/python3"):
        check_dir(str(tmp_path))
    (tmp_path / "bad.tar").write_text("not a tarball")
    with pytest.raises(RootfsError, match="extract"):
        prepare(str(tmp_path / "bad.tar"), str(tmp_path / "cache"))


def test_a_corrupt_tarball_is_one_line_with_tars_cause(tmp_path):
    (tmp_path / "bad.tar.gz").write_text("not a tarball")
    with pytest.raises(RootfsError) as raised:
        prepare(str(tmp_path / "bad.tar.gz"), str(tmp_path / "cache"))
    message = str(raised.value)
    # Not a Python list of tar's last line, which only says that it gave up.
    assert message.startswith("extract %s: tar: " % (tmp_path / "bad.tar.gz")), message
    assert message.endswith("; gzip: stdin: not in gzip format"), message
    assert "\n" not in message and "not recoverable" not in message


def test_rootfs_build_is_cached():
    done = subprocess.run([os.path.join(REPO, ".venv/bin/python"), "-m", "rootfs.build"],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "up to date" in done.stdout
