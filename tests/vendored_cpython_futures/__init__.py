"""CPython's concurrent.futures process-pool tests, run with compatmp.get_context().

compatmp's own file (not vendored); conftest.py says what runs. The shims below run whenever
a module of this package is imported, in the test process and in every worker process that
imports a test module to find a task function by name.
"""

from __future__ import annotations

import contextlib
import functools
import sys
import types

try:  # Python's own test package; some distributions ship Python without it
    from test import support
    from test.support import warnings_helper
except ImportError:  # conftest.py then collects nothing here
    support = None


def _identity_decorator(*_args, **_kwargs):
    return lambda func: func


# test.support names newer than some supported Pythons (3.13: Py_GIL_DISABLED,
# requires_gil_enabled; 3.14: ignore_fork_in_thread_deprecation_warnings, check_sanitizer's
# thread=). On a GIL build they change nothing.
if support is not None and not hasattr(support, "Py_GIL_DISABLED"):
    support.Py_GIL_DISABLED = False
if support is not None and not hasattr(support, "requires_gil_enabled"):
    support.requires_gil_enabled = _identity_decorator
if support is not None and not hasattr(
    warnings_helper, "ignore_fork_in_thread_deprecation_warnings"
):
    warnings_helper.ignore_fork_in_thread_deprecation_warnings = _identity_decorator
try:
    if support is not None:
        support.check_sanitizer(thread=True)
except TypeError:
    _check_sanitizer = support.check_sanitizer

    def _check_sanitizer_thread(*, thread=False, **kwargs):
        # thread=True alone asks about TSAN, which this check_sanitizer cannot tell: no.
        return _check_sanitizer(**kwargs) if any(kwargs.values()) else False

    support.check_sanitizer = _check_sanitizer_thread


def _parameterize(*args_set):
    """test.test_importlib.metadata.fixtures.parameterize (not installed with Python)."""

    def wrapper(func):
        @functools.wraps(func)
        def _inner(self):
            for args in args_set:
                with self.subTest(**args):
                    func(self, **args)

        return _inner

    return wrapper


if support is not None and "test.test_importlib.metadata.fixtures" not in sys.modules:
    with contextlib.suppress(ImportError):
        import test.test_importlib.metadata.fixtures  # noqa: F401
    if support is not None and "test.test_importlib.metadata.fixtures" not in sys.modules:
        fixtures = types.ModuleType("test.test_importlib.metadata.fixtures")
        fixtures.parameterize = _parameterize
        sys.modules["test.test_importlib.metadata.fixtures"] = fixtures
