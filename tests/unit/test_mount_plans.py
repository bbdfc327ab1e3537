"""Mount plans are data: check them without root."""
from sandbox.launch import zygote_root_plan
from sandbox.runtime import mounts as m


def test_zygote_root_plan_shape():
    plan = zygote_root_plan("/r", 16, runtime_dir="/rt")
    assert plan[0] == m.MakePrivate()  # before anything is mounted
    assert plan[1] == m.Bind("/r", "/r", readonly=True)
    assert plan[-1] == m.PivotRoot("/r")
    assert m.Bind("/rt", "/r/ol/lib/olrt", readonly=True) in plan
    assert m.RemountReadonly("/r/ol") in plan and m.RemountReadonly("/r/dev") in plan
    assert m.Tmpfs("/r/tmp", 16, 0o1777) in plan
    assert m.Proc("/r/proc") in plan


def test_everything_the_zygote_mounts_is_under_the_new_root():
    for op in zygote_root_plan("/r", 16, runtime_dir="/rt"):
        for field in ("dst", "path"):
            if hasattr(op, field):
                assert getattr(op, field).startswith("/r/") or getattr(op, field) == "/r"


def test_dev_gets_only_harmless_devices():
    binds = [op.src for op in zygote_root_plan("/r", 16, "/rt") if isinstance(op, m.Bind)]
    devices = {b for b in binds if b.startswith("/dev/")}
    assert devices == {"/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom",
                       "/dev/tty"}


def test_shell_and_code_plans():
    plan = m.shell_plan(32)
    assert m.Proc("/proc") in plan
    assert m.Tmpfs("/tmp", 32, 0o1777) in plan and m.Tmpfs("/dev/shm", 32, 0o1777) in plan
    assert m.code_plan(7) == [m.AttachTree(7, "/handler")]


def test_every_op_has_an_executor():
    ops = {v for v in vars(m).values() if isinstance(v, type) and issubclass(v, tuple)
           and hasattr(v, "_fields")}
    assert ops == set(m._APPLY)
