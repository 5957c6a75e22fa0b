"""Pickle datasets for worker processes: cloudpickle plus reducers for locks and friends.

Under ``spawn`` and ``forkserver`` (Windows, macOS, Linux from Python 3.14) a dataset must be
pickled to reach a worker process, and real datasets hold things plain ``pickle`` refuses:
``TypeError: cannot pickle '_thread.lock' object`` is the classic. This module is the one
place that decides how such objects travel:

* Functions, lambdas, closures and classes defined in ``__main__`` travel by value
  (``cloudpickle`` does this; we subclass its ``Pickler``).
* Synchronization primitives are rebuilt as **fresh, unlocked** equivalents in the receiving
  process. A held lock is never restored as held (dill does, which deadlocks the child the
  first time it takes the lock): the holder's thread does not exist over there.
* Queues keep their items, events keep their set/unset state, semaphores their value,
  barriers their parties; read-only files are reopened at the same path, mode, offset,
  encoding, ``newline=`` and buffer size.
* A ``keras.utils.PyDataset`` subclass sent by value is rebuilt on a Keras-free stand-in base,
  so a worker does not import TensorFlow just for the base class (NOTE [ PyDataset stand-in ]
  in :mod:`compatmp._standin`).
* A class's own ``__reduce_ex__``/``__reduce__``/``__getstate__`` or copyreg entry wins over
  these rules, as it does in pickle and cloudpickle.
* Anything still unpicklable is named by attribute path (:func:`find_unpicklable`, in
  :mod:`compatmp._unpicklable`), so the error says ``dataset.cache._conn: sqlite3.Connection``
  rather than just a type; the error is also an instance of the type cloudpickle raised
  (NOTE [ Errors of both types ] in :mod:`compatmp._exceptions`).

:class:`PickleSafeMixin` (in :mod:`compatmp._mixin`) gives a class the same treatment under
*plain* ``pickle``, so it also works with Keras' own ``use_multiprocessing=True`` and with
``torch.utils.data``.

Imports point one way: the pickler and its reducers are :mod:`compatmp._pickler`, the search
for what cannot be pickled is :mod:`compatmp._unpicklable` (which pickles with that pickler),
and this module, above both, has :func:`dumps` (pickle, and search on failure) and
:func:`loads`; :mod:`compatmp._mixin` is above this one.
"""

from __future__ import annotations

import io
import pickle
import time
from collections.abc import Callable, Iterable
from typing import Any

from ._exceptions import serialization_error
from ._pickler import PROTOCOL, CompatPickler
from ._unpicklable import Unpicklable, find_unpicklable, search

__all__ = ["PROTOCOL", "CompatPickler", "Unpicklable", "dumps", "find_unpicklable", "loads"]


def dumps(
    obj: Any,
    protocol: int | None = None,
    *,
    buffer_callback: Callable[[pickle.PickleBuffer], Any] | None = None,
    local_mp_locks: bool = False,
    root: str = "dataset",
) -> bytes:
    """Pickle ``obj`` for another process: cloudpickle plus compatmp's reducers.

    Args:
        obj (object): anything; usually a ``PyDataset``/``Sequence`` or a dataset-like object.
        protocol (int | None): pickle protocol (default: 5, cloudpickle's default).
        buffer_callback (Callable[[pickle.PickleBuffer], Any] | None): as in
            ``cloudpickle.dumps`` / ``pickle.dumps`` (protocol 5, PEP 574): called with each
            out-of-band buffer (e.g. a NumPy array's data); a falsy return value keeps the
            buffer out of the pickle, to be passed to :func:`loads` as ``buffers`` (default:
            None, every buffer is copied into the pickle).
        local_mp_locks (bool): see :class:`CompatPickler` (default: False).
        root (str): the name used for ``obj`` in error messages (default: ``"dataset"``).

    Returns:
        bytes: a pickle that :func:`loads` (or ``pickle.loads`` with cloudpickle importable)
        reads back, with every lock fresh and unlocked.

    Raises:
        SerializationError: something in ``obj`` still cannot be pickled. The message lists
            each offending attribute path (see :func:`find_unpicklable`) and how to fix it;
            the original exception is the ``__cause__``. The error is *also* an instance of
            the original exception's type (``TypeError``, ``ValueError``, ``RuntimeError``,
            ``pickle.PicklingError``...), so code written for cloudpickle still catches it
            (NOTE [ Errors of both types ]). Finding the paths costs at most about 1 s plus
            3 times the failed pickle (NOTE [ Searching for what cannot be pickled ]).
    """
    buf = io.BytesIO()
    start = time.monotonic()
    try:
        CompatPickler(
            buf, protocol, buffer_callback=buffer_callback, local_mp_locks=local_mp_locks
        ).dump(obj)
    except Exception as exc:  # PicklingError, TypeError, AttributeError, RuntimeError...
        found, complete = search(
            obj,
            root,
            error=exc,
            seconds=time.monotonic() - start,
            local_mp_locks=local_mp_locks,
        )
        message = failure_message(root, exc, found, complete)
        raise serialization_error(type(exc), message, found) from exc
    return buf.getvalue()


def loads(data: bytes, *, buffers: Iterable[Any] | None = None) -> Any:
    """Unpickle bytes made by :func:`dumps` (identical to ``pickle.loads``).

    Args:
        data (bytes): output of :func:`dumps`.
        buffers (Iterable[buffer] | None): the out-of-band buffers that ``dumps``'s
            ``buffer_callback`` kept, in the same order (``pickle.loads``, PEP 574); objects
            rebuilt from them may share their memory (default: None).

    Returns:
        object: the rebuilt object; its locks, conditions and semaphores are new and unlocked.

    Raises:
        pickle.UnpicklingError, AttributeError, ImportError: when the bytes are corrupt or
            refer to a module or class that this process cannot import, or out-of-band
            buffers are missing.
    """
    return pickle.loads(data, buffers=buffers)


def failure_message(root: str, exc: BaseException, found: list, complete: bool = True) -> str:
    """The :class:`compatmp.SerializationError` message for ``root`` failing to pickle.

    Args:
        root (str): what was pickled, as the message names it (e.g. ``"dataset"``).
        exc (BaseException): what the pickler raised.
        found (list[Unpicklable]): what :func:`compatmp._unpicklable.search` found.
        complete (bool): False when the search stopped at one of its limits.
    """
    try:
        text = str(exc)
    except Exception:
        text = "(its message cannot be shown)"
    lines = [f"cannot pickle {root} to send it to worker processes: {type(exc).__name__}: {text}"]
    if found:
        lines.append("These attributes cannot be pickled, even after compatmp's lock rules:")
        lines.extend(f"  {u.path}: {u.type_name} ({u.error})" for u in found)
    if not complete:
        lines.append(
            "(The search for unpicklable attributes stopped at its limit of objects, depth or "
            "time: there may be more; call compatmp.find_unpicklable on a part to see them.)"
        )
    lines.append(
        "How to fix: create such objects lazily inside the worker (e.g. open the connection "
        "on first use in __getitem__), or drop them in __getstate__ and recreate them in "
        "__setstate__; locks, events, queues and read-only files are handled for you. "
        "compatmp.fit falls back to threads when a dataset cannot be pickled."
    )
    return "\n".join(lines)
