"""Exceptions and warnings raised by compatmp.

The whole hierarchy; each class is also a stdlib type callers already catch::

    Exception
     +-- CompatMPError                       root of every compatmp error
          +-- StartMethodError               (also ValueError)
          +-- SerializationError             (also pickle.PicklingError)
          +-- WorkerCrashedError             (also RuntimeError)
          +-- WorkerTimeoutError             (also TimeoutError)

    Warning
     +-- UserWarning
          +-- ThreadFallbackWarning          processes were unsafe; threads are used
"""

from __future__ import annotations

import pickle

__all__ = [
    "CompatMPError",
    "SerializationError",
    "StartMethodError",
    "ThreadFallbackWarning",
    "WorkerCrashedError",
    "WorkerTimeoutError",
]


class CompatMPError(Exception):
    """Root of every error compatmp raises; catch it to catch them all."""


class StartMethodError(CompatMPError, ValueError):
    """A start method was requested that does not exist or is unavailable here.

    Raised by :func:`compatmp.decide_start_method` (and everything that calls it) when the
    ``start_method`` argument or the ``COMPATMP_START_METHOD`` environment variable names a
    method this platform lacks, e.g. ``"fork"`` on Windows. The message lists the methods
    available on this platform.
    """


class SerializationError(CompatMPError, pickle.PicklingError):
    """An object could not be pickled, even after compatmp's lock reducers ran.

    Raised by :func:`compatmp.dumps`. The message names the attribute path of each offending
    object (as found by :func:`compatmp.find_unpicklable`, e.g.
    ``dataset.cache._conn: sqlite3.Connection``) and how to fix it. The original error is
    chained as ``__cause__``.

    Attributes:
        unpicklable (list[Unpicklable]): what :func:`compatmp.find_unpicklable` found; may be
            empty when the walk found nothing more precise than the original error.
    """

    def __init__(self, message: str, unpicklable: list | None = None) -> None:
        super().__init__(message)
        self.unpicklable = list(unpicklable or [])


class WorkerCrashedError(CompatMPError, RuntimeError):
    """A worker process died while the pool needed it (OOM kill, segfault, ``os._exit``...).

    The message names the worker's pid, its exit code or signal, and the batch index it held.
    Keras 3 waits forever in this situation (python/cpython#96062); compatmp raises this
    instead, within seconds.

    Attributes:
        pid (int | None): process id of the dead worker.
        exitcode (int | None): ``Process.exitcode``; negative values are ``-signal``.
        index (object | None): the batch index the worker was computing, if any.
    """

    def __init__(
        self,
        message: str,
        *,
        pid: int | None = None,
        exitcode: int | None = None,
        index: object | None = None,
    ) -> None:
        super().__init__(message)
        self.pid = pid
        self.exitcode = exitcode
        self.index = index


class WorkerTimeoutError(CompatMPError, TimeoutError):
    """A batch took longer than the pool's ``timeout`` (seconds) to arrive.

    Attributes:
        index (object | None): the batch index that was late.
        timeout (float | None): the limit that was exceeded, in seconds.
    """

    def __init__(
        self, message: str, *, index: object | None = None, timeout: float | None = None
    ) -> None:
        super().__init__(message)
        self.index = index
        self.timeout = timeout


class ThreadFallbackWarning(UserWarning):
    """Worker processes were unsafe or impossible here, so compatmp used threads instead.

    The text says why: e.g. the dataset holds an object that cannot be pickled (with its
    attribute path and the original error), the dataset is a generator, or the interpreter
    is a frozen executable without ``multiprocessing.freeze_support()``.
    """
