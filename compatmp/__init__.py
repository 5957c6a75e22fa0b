"""compatmp: Keras/TensorFlow data loading with worker processes, the same on every OS.

One call, ``compatmp.fit(model, dataset, workers=4)``, picks a safe start method for this
platform (fork, forkserver, spawn or threads, with the reason), ships the dataset to the
workers intact (locks, lambdas and ``__main__`` classes included), returns batches in order
through shared memory, and never hangs when a worker dies.

``compatmp.get_context()`` offers the same pickling to anything that takes a
``multiprocessing`` context: torch's ``DataLoader``, ``ProcessPoolExecutor``, ``Pool``.

``import compatmp`` never imports TensorFlow or Keras: ``fit``, ``evaluate`` and ``predict``
load them on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._alloc import empty
from ._context import CompatContext, get_context
from ._exceptions import (
    CompatMPError,
    SerializationError,
    StartMethodError,
    ThreadFallbackWarning,
    UnsupportedInputError,
    WorkerCrashedError,
    WorkerTimeoutError,
)
from ._mixin import PickleSafeMixin
from ._platform import (
    Decision,
    PlatformFacts,
    available_methods,
    decide_start_method,
    diagnose,
)
from ._pool import OrderedPool
from ._reuse import shutdown
from ._seeds import batch_rng
from ._serialize import CompatPickler, dumps, loads
from ._shared_data import DatasetUpdate
from ._threadsafe import threadsafe_generator, threadsafe_iter
from ._unpicklable import Unpicklable, find_unpicklable
from ._worker import WorkerInfo, get_worker_info

if TYPE_CHECKING:  # pragma: no cover - for type checkers; at run time see __getattr__
    from ._keras import evaluate, fit, predict

__version__ = "0.1.0"

# Names whose module imports Keras: resolved on first attribute access (PEP 562).
_LAZY = {"evaluate": "._keras", "fit": "._keras", "predict": "._keras"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'compatmp' has no attribute {name!r}")


__all__ = [
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
]
