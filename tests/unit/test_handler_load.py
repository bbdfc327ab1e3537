"""Loading a function's code the way the runtime does, without a sandbox."""
import functools
import sys

import pytest

from sandbox.runtime import handler


@pytest.fixture
def code(tmp_path):
    """Write lambda_func.py (and helpers) into a fresh directory; forget
    the modules afterwards, as a new handler process would."""
    def write(source, **others):
        (tmp_path / "lambda_func.py").write_text(source)
        for name, text in others.items():
            (tmp_path / (name + ".py")).write_text(text)
        return str(tmp_path)
    before = set(sys.modules)
    yield write
    for name in set(sys.modules) - before:
        del sys.modules[name]
    if str(tmp_path) in sys.path:
        sys.path.remove(str(tmp_path))


def test_loaded_module_looks_imported(code):
    fn, wants_context = handler.load(code("import helper\n"
                                          "def handler(event):\n"
                                          "    return helper.VALUE, __name__, __file__\n",
                                          helper="VALUE = 7\n"))
    module = sys.modules["lambda_func"]
    assert fn({}) == (7, "lambda_func", module.__file__)
    assert module.__spec__.origin == module.__file__ and module.__loader__ is not None
    assert not wants_context


def test_import_error_stack_starts_in_user_code(code):
    with pytest.raises(handler.LoadError) as caught:
        handler.load(code("x = 1\nraise ValueError('boom')\n"))
    assert caught.value.error_type == "Runtime.ImportModuleError"
    assert "lambda_func.py" in caught.value.stack[0]
    assert "lambda_func" not in sys.modules  # as after a failed import


def test_syntax_error_names_the_line(code):
    with pytest.raises(handler.LoadError) as caught:
        handler.load(code("def handler(event):\n    return (\n"))
    assert caught.value.error_type == "Runtime.UserCodeSyntaxError"


def _wrapped_one_arg(event):
    return event


@functools.wraps(_wrapped_one_arg)
def _wrapper(*args, **kwargs):
    return _wrapped_one_arg(*args, **kwargs)


class _Callable:
    def __call__(self, event, context):
        return event


@pytest.mark.parametrize("fn, expected", [
    (lambda event: 0, False),
    (lambda event, context: 0, True),
    (lambda event, context=None: 0, True),
    (lambda *args: 0, True),
    (lambda event, *, context=None: 0, False),  # keyword-only: not passed
    (_wrapper, False),                          # follows __wrapped__, as inspect does
    (functools.partial(lambda a, event, context: 0, 1), True),
    (_Callable(), True),
])
def test_wants_context(fn, expected):
    assert handler._wants_context(fn) is expected
