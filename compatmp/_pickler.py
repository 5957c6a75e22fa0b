"""The pickler under :func:`compatmp.dumps`: cloudpickle plus reducers for locks and friends.

:class:`CompatPickler` and its reducers are the rules listed in :mod:`compatmp._serialize`
(locks rebuilt unlocked, queues with their items, read-only files reopened, the ``PyDataset``
stand-in base, a class's own reduction first). They live in their own module, below both
:mod:`compatmp._serialize` (``dumps``, which searches for what cannot be pickled when pickling
fails) and :mod:`compatmp._unpicklable` (that search, which pickles parts with this pickler),
so imports point one way. An object whose class defines ``__compatmp_reduce__(protocol)``
(:class:`compatmp.PickleSafeMixin` does) is reduced by that method: the pickler asks the
object, rather than knowing the mixin's class.
"""

from __future__ import annotations

import copyreg
import gc
import io
import multiprocessing.synchronize as mp_sync
import os
import pickle
import queue
import sys
import threading
from collections.abc import Callable
from typing import Any

import cloudpickle

from ._keras_image import image_iterator_reduce
from ._standin import keras_dataset_bases

__all__ = ["PROTOCOL", "CompatPickler"]

# The protocol every dump uses: 5 gives out-of-band buffers and is the cloudpickle default.
PROTOCOL = cloudpickle.DEFAULT_PROTOCOL

_LockType = type(threading.Lock())
_RLockTypes = tuple({type(threading.RLock()), threading._PyRLock})  # C and pure-Python RLock
_SimpleQueueTypes = tuple({queue.SimpleQueue, getattr(queue, "_PySimpleQueue", queue.SimpleQueue)})
_MISSING = object()


# ---------------------------------------------------------------------------------------------
# Reducers: pairs of ``_<type>_reduce`` (runs in the sending process) and ``_make_<type>``
# (runs in the receiving process). The ``_make_*`` functions are module-level so that plain
# ``pickle`` can reference them by name (PickleSafeMixin relies on that).
# ---------------------------------------------------------------------------------------------

# Locks. Always rebuilt unlocked: the thread that held the original does not exist in the
# receiving process, so a held copy could never be released there.


def _make_lock() -> Any:
    return threading.Lock()


def _make_rlock() -> Any:
    return threading.RLock()


def _lock_reduce(obj: Any) -> tuple:
    return _make_lock, ()


def _rlock_reduce(obj: Any) -> tuple:
    return _make_rlock, ()


# Condition variables wrap a lock; the lock itself goes through the pickler, so a Condition
# and another attribute sharing its lock still share one lock after unpickling (pickle memo).


def _make_condition(lock: Any) -> threading.Condition:
    return threading.Condition(lock)


def _condition_reduce(obj: threading.Condition) -> tuple:
    return _make_condition, (obj._lock,)


# Semaphores. A BoundedSemaphore knows its initial value and comes back fully released, like
# a lock comes back unlocked. A plain Semaphore only knows its current value, which it keeps.


def _make_semaphore(value: int) -> threading.Semaphore:
    return threading.Semaphore(value)


def _make_bounded_semaphore(value: int) -> threading.BoundedSemaphore:
    return threading.BoundedSemaphore(value)


def _semaphore_reduce(obj: threading.Semaphore) -> tuple:
    if isinstance(obj, threading.BoundedSemaphore):
        return _make_bounded_semaphore, (obj._initial_value,)
    return _make_semaphore, (obj._value,)


# Events keep their flag; barriers their parties, action and timeout (a barrier comes back
# with no thread waiting, i.e. reset).


def _make_event(is_set: bool) -> threading.Event:
    event = threading.Event()
    if is_set:
        event.set()
    return event


def _event_reduce(obj: threading.Event) -> tuple:
    return _make_event, (obj.is_set(),)


def _make_barrier(parties: int, action: Any, timeout: float | None) -> threading.Barrier:
    return threading.Barrier(parties, action, timeout)


def _barrier_reduce(obj: threading.Barrier) -> tuple:
    return _make_barrier, (obj.parties, obj._action, obj._timeout)


# Queues keep their items (and maxsize, and for a user subclass of Queue its class). A
# SimpleQueue has no way to look at its items, so they are taken out and put back in order;
# that is not atomic with respect to other threads using the queue while it is pickled.


def _make_queue(cls: type, maxsize: int, items: list, unfinished_tasks: int) -> queue.Queue:
    q = cls(maxsize)
    q.queue.extend(items)  # deque for Queue, list (already a heap) for Lifo/PriorityQueue
    q.unfinished_tasks = unfinished_tasks
    return q


def _queue_reduce(obj: queue.Queue) -> tuple:
    with obj.mutex:
        items = list(obj.queue)
        unfinished = obj.unfinished_tasks
    return _make_queue, (type(obj), obj.maxsize, items, unfinished)


def _make_simple_queue(items: list) -> queue.SimpleQueue:
    q = queue.SimpleQueue()
    for item in items:
        q.put(item)
    return q


def _simple_queue_reduce(obj: queue.SimpleQueue) -> tuple:
    items = []
    while True:
        try:
            items.append(obj.get_nowait())
        except queue.Empty:
            break
    for item in items:
        obj.put(item)
    return _make_simple_queue, (items,)


# Read-only files are reopened by path, mode, offset, encoding, errors, newline and buffer size
# in the receiving process (cloudpickle alone would read the whole file into a StringIO).
# Files open for writing, sockets and the like are refused: writes made in a worker would go
# to a copy (cloudpickle) or race the parent's handle, and neither should happen silently.
# Python exposes neither a text file's ``newline=`` nor a buffer's size, so both are read back
# from CPython's objects (_text_newline, _buffer_size); where that fails, the defaults apply.


def _make_file(
    path: str,
    mode: str,
    offset: int,
    encoding: str | None,
    errors: str | None,
    newline: str | None = None,
    buffering: int = -1,
    line_buffering: bool = False,
) -> io.IOBase:
    if "b" in mode:
        f = open(path, mode, buffering)  # the receiver owns the reopened file
    else:
        f = open(path, mode, buffering, encoding=encoding, errors=errors, newline=newline)
        if line_buffering and not f.line_buffering:
            f.reconfigure(line_buffering=True)
    f.seek(offset)
    return f


def _buffer_size(obj: Any) -> int:
    """The buffer size of a buffered file (``buffering=`` of ``open``), or -1 if unknown."""
    if isinstance(obj, io.FileIO):
        return 0  # unbuffered: open(..., buffering=0)
    size = getattr(obj, "buffer_size", None)  # _pyio's buffered classes
    if isinstance(size, int):
        return size
    try:  # CPython's Buffered.__sizeof__ is the object plus its buffer (Modules/_io/bufferedio.c)
        size = type(obj).__sizeof__(obj) - type(obj).__basicsize__
    except Exception:
        return -1
    return size if size > 1 else -1


def _text_newline(obj: io.TextIOWrapper) -> str | None:
    """The ``newline=`` a text file was opened with (None when it cannot be told)."""
    readnl = getattr(obj, "_readnl", _MISSING)  # _pyio.TextIOWrapper
    if readnl is not _MISSING:
        return readnl
    try:
        # CPython's TextIOWrapper traverses buffer, encoding, encoder, decoder, readnl, ...
        # (textiowrapper_traverse in Modules/_io/textio.c, 3.8 to 3.14); readnl is NULL (not
        # visited) for newline=None and the newline string otherwise.
        refs = gc.get_referents(obj)
        at = next(i for i, r in enumerate(refs) if hasattr(r, "decode") and hasattr(r, "getstate"))
        decoder = refs[at]
        if isinstance(decoder, io.IncrementalNewlineDecoder):  # newline None or "": universal
            return None if _translates(decoder, obj.encoding) else ""
        after = refs[at + 1] if at + 1 < len(refs) else None
        return after if after in ("\n", "\r", "\r\n") else None
    except Exception:
        return None


def _translates(decoder: io.IncrementalNewlineDecoder, encoding: str) -> bool:
    """Whether a universal-newline decoder turns "\\r" into "\\n" (newline=None, not "")."""
    saved = decoder.getstate()
    seen = decoder.newlines
    try:
        decoder.reset()
        return decoder.decode("\r".encode(encoding), True) == "\n"
    finally:  # put back the decoder's state and the newline kinds it has seen (f.newlines)
        decoder.reset()
        for kind in (seen,) if isinstance(seen, str) else seen or ():
            decoder.decode(kind.encode(encoding), True)
        decoder.setstate(saved)


def _file_reduce(obj: io.IOBase) -> tuple:
    if obj is sys.stdout or obj is sys.stderr or obj is sys.stdin:
        return NotImplemented  # cloudpickle's own rule (stdout/stderr by name; stdin refused)
    name = getattr(obj, "name", None)
    mode = getattr(obj, "mode", None)
    if not isinstance(name, (str, bytes, os.PathLike)) or not isinstance(mode, str):
        raise pickle.PicklingError(
            f"cannot pickle file object {obj!r}: it has no path to reopen in the worker "
            "(open it inside __getitem__, or keep the path and open lazily)"
        )
    if obj.closed:  # cloudpickle's wording, which callers match
        raise pickle.PicklingError(f"Cannot pickle closed files: {name!r} is closed")
    if obj.writable() or any(c in mode for c in "wax+"):
        raise pickle.PicklingError(
            f"cannot pickle file {name!r} opened for writing (mode {mode!r}): only read-only "
            "files are reopened in workers; keep the path and open the file in the worker"
        )
    try:
        offset = obj.tell()
    except OSError as exc:
        raise pickle.PicklingError(
            f"cannot pickle file {name!r}: its position cannot be read ({exc}); text files "
            "iterated with next() refuse tell() - use readline() or keep the path"
        ) from exc
    encoding = getattr(obj, "encoding", None)
    errors = getattr(obj, "errors", None)
    if isinstance(obj, io.TextIOWrapper):
        extra = (_text_newline(obj), _buffer_size(obj.buffer), bool(obj.line_buffering))
    else:
        extra = (None, _buffer_size(obj), False)
    return _make_file, (os.fsdecode(name), mode, offset, encoding, errors, *extra)


# multiprocessing locks: pickling them outside process start raises RuntimeError ("Lock
# objects should only be shared between processes through inheritance"). When the caller asks
# (``local_mp_locks=True``), they become local threading equivalents in the worker: each worker
# then has its own lock, which protects nothing across processes. Hence opt-in only.


def _mp_lock_reduce(obj: Any) -> tuple:
    if isinstance(obj, mp_sync.RLock):
        return _make_rlock, ()
    if isinstance(obj, mp_sync.Lock):
        return _make_lock, ()
    if isinstance(obj, mp_sync.BoundedSemaphore):
        return _make_bounded_semaphore, (obj._semlock.maxvalue,)
    if isinstance(obj, mp_sync.Semaphore):
        try:
            value = obj.get_value()
        except NotImplementedError as exc:  # sem_getvalue() does not exist on macOS
            raise pickle.PicklingError(
                "cannot read the value of a multiprocessing.Semaphore on this platform "
                "(sem_getvalue is missing on macOS); use threading.Semaphore instead"
            ) from exc
        return _make_semaphore, (value,)
    if isinstance(obj, mp_sync.Event):
        return _make_event, (obj.is_set(),)
    if isinstance(obj, mp_sync.Condition):
        return _make_condition, (threading.RLock(),)
    return NotImplemented


_FILE_TYPES = (io.TextIOWrapper, io.BufferedReader, io.BufferedWriter, io.BufferedRandom, io.FileIO)


# A class's own reduction wins over these rules: a subclass of Queue, Event, Lock... that
# defines __reduce_ex__, __reduce__ or __getstate__ (or has a copyreg entry) is pickled the
# way it says, like pickle and cloudpickle do. Only the stdlib classes themselves and
# subclasses that add nothing to pickling get the rules.

_RULE_MODULES = frozenset(
    {"threading", "queue", "_thread", "_queue", "io", "_io", "_pyio", "multiprocessing.synchronize"}
)
_REDUCTION_METHODS = ("__reduce_ex__", "__reduce__", "__getstate__")


def _has_own_reduction(cls: type) -> bool:
    """Whether ``cls`` (a subclass of a class a rule is for) says how to pickle itself."""
    if cls in copyreg.dispatch_table:
        return True
    for klass in cls.__mro__:
        if klass.__module__ in _RULE_MODULES:
            return False  # reached the stdlib class the rule is written for
        if any(name in vars(klass) for name in _REDUCTION_METHODS):
            return True
    return False


def _rule_for(obj: Any) -> Callable[[Any], Any] | None:
    """Our reducer for ``obj``'s type, or None when none of our rules applies."""
    if type(obj) is _LockType:
        return _lock_reduce
    if isinstance(obj, _RLockTypes):
        return _rlock_reduce
    if isinstance(obj, threading.Condition):
        return _condition_reduce
    if isinstance(obj, threading.Semaphore):
        return _semaphore_reduce
    if isinstance(obj, threading.Event):
        return _event_reduce
    if isinstance(obj, threading.Barrier):
        return _barrier_reduce
    if isinstance(obj, queue.Queue):
        return _queue_reduce
    if isinstance(obj, _SimpleQueueTypes):
        return _simple_queue_reduce
    if isinstance(obj, _FILE_TYPES):
        return _file_reduce
    return None


def _reduce_by_type(obj: Any) -> Any:
    """Return our reduction for ``obj``, or NotImplemented when none of our rules applies."""
    reducer = _rule_for(obj)
    if reducer is not None:
        return NotImplemented if _has_own_reduction(type(obj)) else reducer(obj)
    # Keras' ImageDataGenerator iterators, without their unused generator attribute (NOTE
    # [ ImageDataGenerator iterators ] in _keras_image); NotImplemented for anything else.
    # No own-reduction check here: Keras' PyDataset base defines its own pickling hooks, and
    # this rule exists precisely for these classes.
    return image_iterator_reduce(obj)


class CompatPickler(cloudpickle.Pickler):
    """cloudpickle's ``Pickler`` with compatmp's reducers for locks, queues and files.

    Use it like ``pickle.Pickler``; :func:`compatmp.dumps` is the convenient form. Output is
    read back with plain ``pickle.loads`` (or :func:`compatmp.loads`) in a process that can
    import cloudpickle.

    Args:
        file (binary file): where the pickle is written.
        protocol (int | None): pickle protocol (default: cloudpickle's default, 5).
        buffer_callback (Callable | None): out-of-band buffers, as for :func:`compatmp.dumps`
            (default: None).
        local_mp_locks (bool): rebuild ``multiprocessing`` locks, semaphores, conditions and
            events as *local* ``threading`` ones instead of failing (default: False). Each
            receiver then has its own lock, which synchronizes nothing across processes.
    """

    def __init__(
        self,
        file: Any,
        protocol: int | None = None,
        *,
        buffer_callback: Callable[[pickle.PickleBuffer], Any] | None = None,
        local_mp_locks: bool = False,
    ) -> None:
        super().__init__(file, protocol=protocol, buffer_callback=buffer_callback)
        self._local_mp_locks = local_mp_locks

    def reducer_override(self, obj: Any) -> Any:
        """Reduce locks, queues, files and PickleSafeMixin objects; defer the rest to cloudpickle.

        Classes cloudpickle sends by value lose a direct ``keras.utils.PyDataset`` base to
        :class:`compatmp._standin.PyDatasetStandIn`, and a Keras 2 ``Sequence`` base to
        :class:`compatmp._standin.SequenceStandIn` (NOTE [ PyDataset stand-in ]). A subclass
        of a lock, queue, event... or file type that defines ``__reduce_ex__``, ``__reduce__``
        or ``__getstate__``, or has a ``copyreg`` entry, is left to its own reduction.

        Raises:
            pickle.PicklingError: for files open for writing or without a path.
        """
        rv = _reduce_by_type(obj)
        if rv is not NotImplemented:
            return rv
        if (
            self._local_mp_locks
            and isinstance(obj, (mp_sync.SemLock, mp_sync.Condition, mp_sync.Event))
            and not _has_own_reduction(type(obj))
        ):
            return _mp_lock_reduce(obj)
        own = getattr(type(obj), "__compatmp_reduce__", None)
        if own is not None:
            # PickleSafeMixin: this pickler already knows every rule the mixin applies, so the
            # object gives its natural reduction here, and objects shared inside and outside
            # it keep one identity.
            return own(obj, self.proto)
        rv = super().reducer_override(obj)
        if rv is not NotImplemented and isinstance(obj, type):
            rv = _swap_keras_base(obj, rv)  # NOTE [ PyDataset stand-in ] in _standin
        return rv


def _swap_keras_base(cls: type, rv: Any) -> Any:
    """In cloudpickle's by-value reduction of ``cls``, replace a Keras dataset base class.

    The bases replaced are those of :func:`compatmp._standin.keras_dataset_bases`: Keras 3's
    ``PyDataset`` and Keras 2's ``Sequence``, each by its Keras-free stand-in.

    ``rv`` is what ``cloudpickle.Pickler.reducer_override`` returned for a class it sends by
    value: ``(_make_skeleton_class, (metaclass, name, bases, type_kwargs, tracker_id, None),
    state, ...)`` in cloudpickle 1.x to 3.x. Anything else is returned unchanged, so a future
    cloudpickle only loses the optimization, never correctness.
    """
    swaps = keras_dataset_bases()
    if not swaps or not any(b in swaps for b in cls.__bases__):
        return rv
    try:
        make, args, *rest = rv
        if getattr(make, "__name__", "") != "_make_skeleton_class" or not any(
            b in swaps for b in args[2]
        ):
            return rv
    except (TypeError, ValueError, IndexError):
        return rv
    bases = tuple(swaps.get(b, b) for b in args[2])
    return (make, (*args[:2], bases, *args[3:]), *rest)
