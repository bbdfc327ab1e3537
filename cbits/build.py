"""cffi builder for the syscall shims (declared in setup.py's cffi_modules).

Out-of-line ABI mode on purpose: the generated module is plain Python that
dlopens libolsys.so, so the same two files work in the host's interpreter
(the worker) and in the rootfs's python3 (zygotes and handlers), even when
their Python versions differ.  An API-mode extension is tied to one
interpreter's ABI.
"""
import pathlib

import cffi

HERE = pathlib.Path(__file__).resolve().parent

ffibuilder = cffi.FFI()
ffibuilder.cdef(HERE.joinpath("olsys.h").read_text().split("*/", 1)[1])
ffibuilder.set_source("sandbox.runtime._olsys", None)

if __name__ == "__main__":
    ffibuilder.emit_python_code(str(HERE.parent / "sandbox" / "runtime" / "_olsys.py"))
