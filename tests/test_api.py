"""The public surface: exactly these names, each documented, and no TensorFlow on import."""

from __future__ import annotations

import subprocess
import sys

import pytest

import compatmp

PUBLIC = {
    "CompatContext",
    "CompatMPError",
    "CompatPickler",
    "DatasetUpdate",
    "Decision",
    "OrderedPool",
    "PickleSafeMixin",
    "PlatformFacts",
    "SerializationError",
    "StartMethodError",
    "ThreadFallbackWarning",
    "Unpicklable",
    "UnsupportedInputError",
    "WorkerCrashedError",
    "WorkerInfo",
    "WorkerTimeoutError",
    "available_methods",
    "batch_rng",
    "decide_start_method",
    "diagnose",
    "dumps",
    "empty",
    "evaluate",
    "find_unpicklable",
    "fit",
    "get_context",
    "get_worker_info",
    "loads",
    "predict",
    "shutdown",
    "threadsafe_generator",
    "threadsafe_iter",
}


def test_all_is_exactly_the_public_api_and_sorted():
    assert set(compatmp.__all__) == PUBLIC
    assert compatmp.__all__ == sorted(compatmp.__all__)


def test_every_public_name_resolves_and_has_a_docstring():
    for name in compatmp.__all__:
        if name in compatmp._LAZY:
            continue  # needs Keras: checked below
        obj = getattr(compatmp, name)
        assert obj.__doc__ and len(obj.__doc__.strip()) > 20, name


def test_keras_entry_points_resolve_lazily_and_are_documented():
    pytest.importorskip("keras")
    for name in sorted(compatmp._LAZY):
        obj = getattr(compatmp, name)
        assert callable(obj) and "Args:" in obj.__doc__, name


def test_exception_hierarchy_matches_stdlib_types():
    import pickle

    assert issubclass(compatmp.StartMethodError, (compatmp.CompatMPError, ValueError))
    assert issubclass(compatmp.SerializationError, pickle.PicklingError)
    assert issubclass(compatmp.WorkerCrashedError, RuntimeError)
    assert issubclass(compatmp.WorkerTimeoutError, TimeoutError)
    assert issubclass(compatmp.UnsupportedInputError, TypeError)  # compatmp's type before
    assert issubclass(compatmp.UnsupportedInputError, ValueError)  # Keras' type
    for exc in (
        "StartMethodError",
        "UnsupportedInputError",
        "SerializationError",
        "WorkerCrashedError",
        "WorkerTimeoutError",
    ):
        assert issubclass(getattr(compatmp, exc), compatmp.CompatMPError)
    assert issubclass(compatmp.ThreadFallbackWarning, UserWarning)


def test_import_does_not_import_tensorflow_or_keras():
    code = (
        "import sys, compatmp; print(sorted(m for m in ('tensorflow', 'keras', 'torch') "
        "if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    ).stdout.strip()
    assert out == "[]"


def test_py_typed_is_shipped():
    import pathlib

    assert (pathlib.Path(compatmp.__file__).parent / "py.typed").exists()
