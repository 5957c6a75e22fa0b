"""Exceptions and warnings raised by compatmp.

The whole hierarchy; each class is also a stdlib type callers already catch::

    Exception
     +-- CompatMPError                       root of every compatmp error
          +-- StartMethodError               (also ValueError)
          +-- SerializationError             (also pickle.PicklingError; raised by dumps
                                              as a subclass that is also the original
                                              error's type, see serialization_error)
          +-- WorkerCrashedError             (also RuntimeError)
          +-- WorkerTimeoutError             (also TimeoutError)
          +-- UnsupportedInputError          (also TypeError and ValueError)

    Warning
     +-- UserWarning
          +-- ThreadFallbackWarning          processes were unsafe; threads are used
"""

from __future__ import annotations

import pickle
import threading

__all__ = [
    "CompatMPError",
    "SerializationError",
    "StartMethodError",
    "ThreadFallbackWarning",
    "UnsupportedInputError",
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
    chained as ``__cause__``, and the raised error is an instance of a subclass named e.g.
    ``SerializationError[TypeError]`` that is also the original error's type, so
    ``except TypeError`` written for cloudpickle still catches it (NOTE [ Errors of both
    types ]; ``type(err).original_type`` is that type).

    Attributes:
        unpicklable (list[Unpicklable]): what :func:`compatmp.find_unpicklable` found; may be
            empty when the walk found nothing more precise than the original error.
    """

    def __init__(self, message: str, unpicklable: list | None = None) -> None:
        super().__init__(message)
        self.unpicklable = list(unpicklable or [])


# NOTE [ Errors of both types ]
# cloudpickle raises what the failing object raised: TypeError for a lock, RuntimeError for a
# multiprocessing lock outside process start, ValueError or anything else from a user's
# __reduce__, PicklingError for deep recursion. Code written against cloudpickle catches those
# types; compatmp adds the attribute paths and a fix, so its error must be both. dumps raises
# an instance of a subclass of SerializationError *and* the original exception's type, made
# once per original type and cached (the way Python's own OSError picks a subclass by errno,
# and numpy.exceptions.AxisError is both ValueError and IndexError, but built on demand since
# the original type can be any user class). Such a class takes one message argument whatever
# the original type's constructor wants (BaseException.__init__, not the original's), prints
# the message as BaseException does (KeyError would print its repr), and pickles as a call
# that rebuilds the same dual type in the receiving process. When Python refuses the
# combination (an exception type with an incompatible C layout, or a final class), the error
# is a plain SerializationError with the original as __cause__, as before.

_DUAL_TYPES: dict[type, type] = {}
_DUAL_TYPES_LOCK = threading.Lock()


def _dual_type(original: type) -> type:
    """The cached subclass of ``SerializationError`` and ``original`` (or SerializationError)."""
    if issubclass(original, SerializationError):
        return original
    if issubclass(SerializationError, original) or not issubclass(original, Exception):
        return SerializationError  # PicklingError, Exception: SerializationError already is one
    with _DUAL_TYPES_LOCK:
        cls = _DUAL_TYPES.get(original)
        if cls is None:
            try:
                cls = type(
                    f"SerializationError[{original.__qualname__}]",
                    (SerializationError, original),
                    {
                        "__module__": SerializationError.__module__,
                        "__init__": _dual_init,
                        "__str__": BaseException.__str__,
                        "__reduce__": _dual_reduce,
                        "__doc__": f"SerializationError that is also {original.__qualname__}.",
                        "original_type": original,
                    },
                )
            except TypeError:  # layout conflict, final class, metaclass conflict
                cls = SerializationError
            _DUAL_TYPES[original] = cls
    return cls


def _dual_init(self: SerializationError, message: str, unpicklable: list | None = None) -> None:
    BaseException.__init__(self, message)
    self.unpicklable = list(unpicklable or [])


def _dual_reduce(self: SerializationError) -> tuple:
    return _rebuild_serialization_error, (type(self).original_type, str(self), self.unpicklable)


def _rebuild_serialization_error(
    original: type, message: str, unpicklable: list
) -> SerializationError:
    return serialization_error(original, message, unpicklable)


def serialization_error(
    original: type, message: str, unpicklable: list | None = None
) -> SerializationError:
    """A ``SerializationError`` that is also an ``original``; NOTE [ Errors of both types ].

    Args:
        original (type): the type of the exception pickling raised, e.g. ``TypeError``.
        message (str): the full message.
        unpicklable (list[Unpicklable] | None): what ``find_unpicklable`` found (default: None).

    Returns:
        SerializationError: an instance of ``SerializationError`` and, unless Python refuses
        the combination, of ``original``; ``type(err).original_type`` is ``original`` then.
    """
    cls = _dual_type(original)
    try:
        return cls(message, unpicklable)
    except Exception:  # an original type whose __new__ insists on its own arguments
        return SerializationError(message, unpicklable)


class UnsupportedInputError(CompatMPError, TypeError, ValueError):
    """``x`` or ``validation_data`` of ``compatmp.fit``/``evaluate``/``predict`` is nothing
    compatmp or Keras can load (an ``int``, a generator *function*, ...).

    Raised before any worker starts. The message starts with the message Keras itself raises
    for that input in the model's Keras flavour (Keras 3: ``Unrecognized data type: x=...``,
    ``keras/src/trainers/data_adapters/__init__.py``; Keras 2: ``Failed to find data adapter
    that can handle input: ...``, ``tf_keras/src/engine/data_adapter.py``) and goes on with
    what compatmp accepts. Both a ``ValueError`` - the type Keras raises - and a
    ``TypeError`` - the type compatmp raised for it before - so code catching either works.
    """


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
