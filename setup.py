"""OpenLambda in Python.  `make` runs `setup.py build_ext --inplace`, which
builds cbits/ into sandbox/runtime: libolsys.so and its cffi module."""
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


class BuildPlainLibrary(build_ext):
    """libolsys.so is a plain C library that cffi dlopens, not a CPython
    extension, so it keeps a plain name (no ABI tag) and works for any
    Python version, in the host and in the rootfs alike."""

    def get_ext_filename(self, fullname):
        return fullname.replace(".", "/") + ".so"

    def get_export_symbols(self, ext):
        return []


setup(
    name="openlambda-py",
    version="0.1.0",
    license="Apache-2.0",
    packages=["sandbox", "sandbox.runtime", "worker", "rootfs"],
    python_requires=">=3.11",
    setup_requires=["cffi>=1.15"],
    install_requires=["cffi>=1.15", "msgpack>=1.0", "uvloop>=0.18", "httptools>=0.5",
                      "inotify_simple>=1.3", "PyYAML>=6"],
    cffi_modules=["cbits/build.py:ffibuilder"],
    ext_modules=[Extension("sandbox.runtime.libolsys", ["cbits/olsys.c", "cbits/shell.c"],
                           include_dirs=["cbits"], extra_compile_args=["-Wall"])],
    cmdclass={"build_ext": BuildPlainLibrary},
)
