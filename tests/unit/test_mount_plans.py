"""Mount plans are data: check them without root."""
from sandbox.launch import zygote_root_plan
from sandbox.runtime import mounts as m


def test_zygote_root_plan_shape():
    plan = zygote_root_plan("/r", 16, runtime_dir="/rt")
    assert plan[0] == m.MakePrivate()  # before anything is mounted
    assert plan[1] == m.Bind("/r", "/r", readonly=True)
    assert plan[-1] == m.PivotRoot("/r")
    assert m.Bind("/rt", "/r/ol/olrt", readonly=True) in plan
    assert m.RemountReadonly("/r/dev", nodev=False) in plan
    # /dev may hold devices (its nodes are made there), but is read-only after.
    dev = plan.index(m.Tmpfs("/r/dev", 1, 0o755, nodev=False))
    assert dev < plan.index(m.RemountReadonly("/r/dev", nodev=False))
    assert m.Tmpfs("/r/tmp", 16, 0o1777) in plan
    assert m.Proc("/r/proc") in plan


def test_everything_the_zygote_mounts_is_under_the_new_root():
    for op in zygote_root_plan("/r", 16, runtime_dir="/rt"):
        for field in ("dst", "path"):
            if hasattr(op, field):
                assert getattr(op, field).startswith("/r/") or getattr(op, field) == "/r"


def test_dev_gets_only_harmless_devices():
    plan = zygote_root_plan("/r", 16, "/rt")
    nodes = {(op.path, op.major, op.minor) for op in plan if isinstance(op, m.DeviceNode)}
    assert nodes == {("/r/dev/null", 1, 3), ("/r/dev/zero", 1, 5), ("/r/dev/full", 1, 7),
                     ("/r/dev/random", 1, 8), ("/r/dev/urandom", 1, 9), ("/r/dev/tty", 5, 0)}
    assert not [op for op in plan if isinstance(op, m.Bind) and op.src.startswith("/dev")]


def test_shell_and_code_plans():
    plan = m.shell_plan(32)
    assert plan[0] == m.Proc("/proc")  # masks go on top of its own /proc
    for path in ("/proc/kcore", "/proc/keys", "/proc/timer_list", "/proc/sched_debug",
                 "/proc/sysrq-trigger", "/proc/acpi", "/proc/scsi"):
        assert m.Mask(path) in plan
    assert m.ReadonlyPath("/proc/sys") in plan
    assert m.Tmpfs("/tmp", 32, 0o1777) in plan and m.Tmpfs("/dev/shm", 32, 0o1777) in plan
    assert m.code_plan(7) == [m.AttachTree(7, "/handler")]


def test_every_op_has_an_executor():
    ops = {v for v in vars(m).values() if isinstance(v, type) and issubclass(v, tuple)
           and hasattr(v, "_fields")}
    assert ops == set(m._C_STEPS)


def test_compiled_plan_holds_every_field():
    plan = m.CompiledPlan([m.Bind("/a", "/b", readonly=True), m.Tmpfs("/t", 8, 0o1777),
                           m.DeviceNode("/dev/null", 1, 3), m.AttachTree(9, "/handler")])
    ffi = m.sc.ffi
    bind, tmpfs, node, tree = plan.array
    assert (ffi.string(bind.src), ffi.string(bind.dst), bind.readonly) == (b"/a", b"/b", 1)
    assert ffi.string(tmpfs.options) == b"size=8m,mode=1777" and tmpfs.nodev == 1
    assert (node.major, node.minor) == (1, 3)
    assert (tree.fd, ffi.string(tree.dst)) == (9, b"/handler")
