"""Which context the vendored CPython tests get (compatmp's own file, not vendored).

``COMPATMP_FUTURES_SUITE=stdlib`` runs the suite against ``multiprocessing.get_context``
instead, to tell a compatmp difference from a test that needs a newer Python.
"""

from __future__ import annotations

import multiprocessing
import os

import compatmp

UNDER_TEST = os.environ.get("COMPATMP_FUTURES_SUITE", "compatmp")


def get_context(method: str):
    if UNDER_TEST == "stdlib":
        return multiprocessing.get_context(method)
    return compatmp.get_context(method)
