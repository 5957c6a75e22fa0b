"""The functions cloudpickle's vendored test suite exercises: compatmp's, or cloudpickle's own.

compatmp's own file (not vendored). By default the suite runs with ``cloudpickle.dumps``,
``cloudpickle.dump``, ``cloudpickle.Pickler`` and ``cloudpickle.CloudPickler`` replaced by
:func:`compatmp.dumps` and :class:`compatmp.CompatPickler` (``loads``/``load`` are
``pickle.loads``/``pickle.load`` in both). With ``COMPATMP_CLOUDPICKLE_SUITE=cloudpickle`` in
the environment nothing is replaced, so the same suite measures cloudpickle itself::

    COMPATMP_CLOUDPICKLE_SUITE=cloudpickle python -m pytest tests/vendored_cloudpickle -q

The parent uses :func:`substitutes` through a pytest fixture (``conftest.py``, undone after
each test); child processes started by ``testutils`` call :func:`install`.
"""

from __future__ import annotations

import os
import pickle
from typing import Any

import cloudpickle

ENV = "COMPATMP_CLOUDPICKLE_SUITE"
UNDER_TEST = os.environ.get(ENV, "compatmp")
if UNDER_TEST not in ("compatmp", "cloudpickle"):
    raise ValueError(f"{ENV}={UNDER_TEST!r}: use 'compatmp' (the default) or 'cloudpickle'")


def dump(obj: Any, file: Any, protocol: int | None = None, buffer_callback: Any = None) -> None:
    """``cloudpickle.dump`` with compatmp's pickler: write ``compatmp.dumps(obj)`` to ``file``."""
    import compatmp

    file.write(compatmp.dumps(obj, protocol, buffer_callback=buffer_callback))


def substitutes() -> dict[str, Any]:
    """The ``cloudpickle`` attributes to replace, by name (empty when testing cloudpickle)."""
    if UNDER_TEST == "cloudpickle":
        return {}
    import compatmp

    return {
        "dumps": compatmp.dumps,
        "dump": dump,
        "loads": compatmp.loads,
        "load": pickle.load,
        "Pickler": compatmp.CompatPickler,
        "CloudPickler": compatmp.CompatPickler,
    }


def function(name: str, default: Any) -> Any:
    """The function under test called ``name`` (``default`` when testing cloudpickle)."""
    return substitutes().get(name, default)


def install() -> None:
    """Replace ``cloudpickle``'s functions for the rest of this (child) process."""
    for name, value in substitutes().items():
        setattr(cloudpickle, name, value)
