"""The import rules between packages (DESIGN.md, "Boundaries")."""
import ast
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STDLIB = set(sys.stdlib_module_names)


def imports(path):
    """(absolute module, level) for each import in a file."""
    tree = ast.parse(open(path).read(), path)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, 0
        elif isinstance(node, ast.ImportFrom):
            yield node.module or "", node.level


def py_files(*parts):
    d = os.path.join(REPO, *parts)
    return [os.path.join(d, f) for f in sorted(os.listdir(d)) if f.endswith(".py")]


def test_runtime_uses_only_stdlib_msgpack_and_its_siblings():
    # It runs inside sandboxes with the rootfs's own python3.
    for path in py_files("sandbox", "runtime"):
        for module, level in imports(path):
            top = module.split(".")[0]
            assert level > 0 or top in STDLIB or top in ("msgpack", "_cffi_backend"), \
                "%s imports %s" % (path, module)


def test_sandbox_knows_nothing_of_the_worker():
    for path in py_files("sandbox") + py_files("sandbox", "runtime"):
        for module, _ in imports(path):
            assert module.split(".")[0] not in ("worker", "rootfs"), (path, module)


def test_worker_uses_sandbox_through_its_public_modules():
    public = {"sandbox.manager", "sandbox.cgroups", "sandbox.errors", "sandbox.runtime",
              "sandbox.uids", "sandbox.network", "sandbox.filelock"}
    for path in py_files("worker"):
        for module, _ in imports(path):
            if module.startswith("sandbox"):
                assert module in public, "%s imports %s" % (path, module)


def test_admin_and_what_it_imports_need_only_the_stdlib():
    # bin/admin runs with any python3, before or without the virtualenv.
    allowed = {"sandbox.cgroups", "sandbox.errors", "sandbox.uids", "sandbox.nat",
               "sandbox.filelock",
               "worker.cluster", "worker.config", "rootfs.prepare"}
    files = [os.path.join(REPO, "bin", "admin")] + [
        os.path.join(REPO, *m.split(".")) + ".py" for m in allowed]
    for path in files:
        for module, level in imports(path):
            if level:
                module = os.path.basename(os.path.dirname(path)) + "." + module
            assert module.split(".")[0] in STDLIB or module in allowed, (path, module)
