"""cgroup layout detection from mountinfo, for hosts unlike this one."""
import pytest

from sandbox.cgroups import Cgroup, Mode, detect_mode
from sandbox.errors import CgroupError

LINE = "30 25 0:26 / {point} rw,nosuid - {fstype} {fstype} rw,{opts}\n"


def mountinfo(tmp_path, mounts, v2_controllers=""):
    lines = []
    for fstype, point, opts in mounts:
        if fstype == "cgroup2":
            point = str(tmp_path / "unified")
            (tmp_path / "unified").mkdir(exist_ok=True)
            (tmp_path / "unified" / "cgroup.controllers").write_text(v2_controllers)
        lines.append(LINE.format(point=point, fstype=fstype, opts=opts))
    path = tmp_path / "mountinfo"
    path.write_text("".join(lines))
    return str(path)


def test_pure_v2(tmp_path):
    mode = detect_mode(mountinfo(tmp_path, [("cgroup2", "", "nsdelegate")],
                                 "cpuset cpu io memory pids"))
    assert mode.name == "v2" and mode.v1_roots == {}


def test_hybrid_like_these_machines(tmp_path):
    mode = detect_mode(mountinfo(tmp_path, [
        ("cgroup", "/sys/fs/cgroup/memory", "memory"),
        ("cgroup", "/sys/fs/cgroup/pids", "pids"),
        ("cgroup", "/sys/fs/cgroup/cpu,cpuacct", "cpu,cpuacct"),
        ("cgroup2", "", "")], "hugetlb"))
    assert mode.name == "hybrid"
    assert mode.v1_roots["cpu"] == "/sys/fs/cgroup/cpu,cpuacct"


def test_v1_only(tmp_path):
    mode = detect_mode(mountinfo(tmp_path, [
        ("cgroup", "/c/memory", "memory"), ("cgroup", "/c/pids", "pids"),
        ("cgroup", "/c/cpu", "cpu")]))
    assert mode.name == "v1" and mode.v2_root is None


def test_missing_controller_is_a_clear_error(tmp_path):
    with pytest.raises(CgroupError, match="pids"):
        detect_mode(mountinfo(tmp_path, [("cgroup", "/c/memory", "memory"),
                                         ("cgroup", "/c/cpu", "cpu")]))


def test_paths_per_mode():
    hybrid = Mode("hybrid", "/u", {"memory": "/m", "pids": "/p", "cpu": "/c"})
    cg = Cgroup("openlambda/x/sb-1", hybrid)
    assert cg.limit_dirs()["memory"] == "/m/openlambda/x/sb-1"
    assert cg.dirs() == ["/m/openlambda/x/sb-1", "/p/openlambda/x/sb-1",
                         "/c/openlambda/x/sb-1", "/u/openlambda/x/sb-1"]
    v2 = Cgroup("/a/b/", Mode("v2", "/u"))
    assert v2.dirs() == ["/u/a/b"]
