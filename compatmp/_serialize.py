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
  barriers their parties; read-only files are reopened at the same path, mode and offset.
* A ``keras.utils.PyDataset`` subclass sent by value is rebuilt on a Keras-free stand-in base,
  so a worker does not import TensorFlow just for the base class (NOTE [ PyDataset stand-in ]
  in :mod:`compatmp._standin`).
* Anything still unpicklable is named by attribute path (:func:`find_unpicklable`), so the
  error says ``dataset.cache._conn: sqlite3.Connection`` rather than just a type.

:class:`PickleSafeMixin` gives a class the same treatment under *plain* ``pickle``, so it
also works with Keras' own ``use_multiprocessing=True`` and with ``torch.utils.data``.
"""

from __future__ import annotations

import copyreg
import io
import multiprocessing.synchronize as mp_sync
import os
import pickle
import queue
import threading
import types
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import cloudpickle

from ._exceptions import SerializationError
from ._keras_image import image_iterator_reduce
from ._standin import PyDatasetStandIn, keras_pydataset

__all__ = [
    "CompatPickler",
    "PickleSafeMixin",
    "Unpicklable",
    "dumps",
    "find_unpicklable",
    "loads",
]

# The protocol every dump uses: 5 gives out-of-band buffers and is the cloudpickle default.
PROTOCOL = cloudpickle.DEFAULT_PROTOCOL

_LockType = type(threading.Lock())
_RLockTypes = tuple({type(threading.RLock()), threading._PyRLock})  # C and pure-Python RLock
_SimpleQueueTypes = tuple({queue.SimpleQueue, getattr(queue, "_PySimpleQueue", queue.SimpleQueue)})


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


# Read-only files are reopened by path, mode and offset in the receiving process (cloudpickle
# alone would read the whole file into a StringIO). Files open for writing, sockets and the
# like are refused: two processes appending to one handle is not something to do silently.


def _make_file(
    path: str, mode: str, offset: int, encoding: str | None, errors: str | None
) -> io.IOBase:
    if "b" in mode:
        f = open(path, mode)  # the receiver owns the reopened file
    else:
        f = open(path, mode, encoding=encoding, errors=errors)
    f.seek(offset)
    return f


def _file_reduce(obj: io.IOBase) -> tuple:
    import sys

    if obj is sys.stdout or obj is sys.stderr or obj is sys.stdin:
        return NotImplemented  # cloudpickle's own rule (stdout/stderr by name; stdin refused)
    name = getattr(obj, "name", None)
    mode = getattr(obj, "mode", None)
    if not isinstance(name, (str, bytes, os.PathLike)) or not isinstance(mode, str):
        raise pickle.PicklingError(
            f"cannot pickle file object {obj!r}: it has no path to reopen in the worker "
            "(open it inside __getitem__, or keep the path and open lazily)"
        )
    if obj.closed:
        raise pickle.PicklingError(f"cannot pickle closed file {name!r}")
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
    return _make_file, (os.fsdecode(name), mode, offset, encoding, errors)


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


def _reduce_by_type(obj: Any) -> Any:
    """Return our reduction for ``obj``, or NotImplemented when none of our rules applies."""
    t = type(obj)
    if t is _LockType:
        return _lock_reduce(obj)
    if isinstance(obj, _RLockTypes):
        return _rlock_reduce(obj)
    if isinstance(obj, threading.Condition):
        return _condition_reduce(obj)
    if isinstance(obj, threading.Semaphore):
        return _semaphore_reduce(obj)
    if isinstance(obj, threading.Event):
        return _event_reduce(obj)
    if isinstance(obj, threading.Barrier):
        return _barrier_reduce(obj)
    if isinstance(obj, queue.Queue):
        return _queue_reduce(obj)
    if isinstance(obj, _SimpleQueueTypes):
        return _simple_queue_reduce(obj)
    if isinstance(obj, _FILE_TYPES):
        return _file_reduce(obj)
    # Keras' ImageDataGenerator iterators, without their unused generator attribute.
    return image_iterator_reduce(obj)


class CompatPickler(cloudpickle.Pickler):
    """cloudpickle's ``Pickler`` with compatmp's reducers for locks, queues and files.

    Use it like ``pickle.Pickler``; :func:`dumps` is the convenient form. Output is read back
    with plain ``pickle.loads`` (or :func:`loads`) in a process that can import cloudpickle.

    Args:
        file (binary file): where the pickle is written.
        protocol (int | None): pickle protocol (default: cloudpickle's default, 5).
        buffer_callback (Callable | None): out-of-band buffers, as for :func:`dumps`
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
        :class:`compatmp._standin.PyDatasetStandIn` (NOTE [ PyDataset stand-in ]).

        Raises:
            pickle.PicklingError: for files open for writing or without a path.
        """
        rv = _reduce_by_type(obj)
        if rv is not NotImplemented:
            return rv
        if self._local_mp_locks and isinstance(
            obj, (mp_sync.SemLock, mp_sync.Condition, mp_sync.Event)
        ):
            return _mp_lock_reduce(obj)
        if isinstance(obj, PickleSafeMixin):
            # This pickler already knows every rule the mixin applies: pickle the object's
            # natural state here, so objects shared inside and outside it keep one identity.
            return _natural_reduce(obj, self.proto)
        rv = super().reducer_override(obj)
        if rv is not NotImplemented and isinstance(obj, type):
            rv = _swap_keras_base(obj, rv)  # NOTE [ PyDataset stand-in ] in _standin
        return rv


def _swap_keras_base(cls: type, rv: Any) -> Any:
    """In cloudpickle's by-value reduction of ``cls``, replace a ``keras.utils.PyDataset`` base.

    ``rv`` is what ``cloudpickle.Pickler.reducer_override`` returned for a class it sends by
    value: ``(_make_skeleton_class, (metaclass, name, bases, type_kwargs, tracker_id, None),
    state, ...)`` in cloudpickle 1.x to 3.x. Anything else is returned unchanged, so a future
    cloudpickle only loses the optimization, never correctness.
    """
    pydataset = keras_pydataset()
    if pydataset is None or pydataset not in cls.__bases__:
        return rv
    try:
        make, args, *rest = rv
        if getattr(make, "__name__", "") != "_make_skeleton_class" or pydataset not in args[2]:
            return rv
    except (TypeError, ValueError, IndexError):
        return rv
    bases = tuple(PyDatasetStandIn if b is pydataset else b for b in args[2])
    return (make, (*args[:2], bases, *args[3:]), *rest)


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
            the original exception is the ``__cause__``.
    """
    buf = io.BytesIO()
    try:
        CompatPickler(
            buf, protocol, buffer_callback=buffer_callback, local_mp_locks=local_mp_locks
        ).dump(obj)
    except Exception as exc:  # PicklingError, TypeError, AttributeError, RuntimeError...
        found = find_unpicklable(obj, root=root, local_mp_locks=local_mp_locks)
        raise SerializationError(_failure_message(root, exc, found), found) from exc
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


def _failure_message(root: str, exc: BaseException, found: list[Unpicklable]) -> str:
    lines = [f"cannot pickle {root} to send it to worker processes: {type(exc).__name__}: {exc}"]
    if found:
        lines.append("These attributes cannot be pickled, even after compatmp's lock rules:")
        lines.extend(f"  {u.path}: {u.type_name} ({u.error})" for u in found)
    lines.append(
        "How to fix: create such objects lazily inside the worker (e.g. open the connection "
        "on first use in __getitem__), or drop them in __getstate__ and recreate them in "
        "__setstate__; locks, events, queues and read-only files are handled for you. "
        "compatmp.fit falls back to threads when a dataset cannot be pickled."
    )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Finding what cannot be pickled, by attribute path
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Unpicklable:
    """One object that cannot be pickled, and where it sits.

    Attributes:
        path (str): attribute path from the root, e.g. ``"dataset.cache._conn"``; dict entries
            appear as ``["key"]``, sequence items as ``[3]``, closure variables as
            ``.<closure name>``, globals used by a function as ``.<global name>``, default
            arguments as ``.<default name>`` and items of sets and SimpleQueues as
            ``.<item i>``.
        type_name (str): qualified type of the object, e.g. ``"sqlite3.Connection"``.
        error (str): the error pickling it raised, as ``"TypeError: cannot pickle ..."``.
    """

    path: str
    type_name: str
    error: str


# Limits of the search: datasets can be large graphs; we only descend into parts that fail,
# but bound the cost anyway so an error message never takes longer than the failure.
_MAX_DEPTH = 50
_MAX_CHILDREN = 10_000


def find_unpicklable(
    obj: Any, *, root: str = "dataset", local_mp_locks: bool = False
) -> list[Unpicklable]:
    """List every part of ``obj`` that cannot be pickled, even after compatmp's rules.

    The search pickles ``obj``; on failure it descends into the attributes (as given by the
    object's ``__reduce_ex__``/``__getstate__``, so custom state is respected), dict entries,
    sequence items and function closures that fail too, and reports the deepest failing
    objects. Locks, queues, events and read-only files are *not* reported: :func:`dumps`
    rebuilds them.

    Args:
        obj (object): the object to inspect.
        root (str): the name of ``obj`` at the start of each path (default: ``"dataset"``).
        local_mp_locks (bool): as in :func:`dumps` (default: False).

    Returns:
        list[Unpicklable]: empty when ``obj`` pickles; otherwise one entry per offending object
        (generators, sockets, sqlite3 connections, files open for writing, ...), in
        attribute order.
    """
    found: list[Unpicklable] = []
    _search(obj, root, found, set(), 0, local_mp_locks)
    return found


def _pickle_error(obj: Any, local_mp_locks: bool) -> BaseException | None:
    try:
        CompatPickler(io.BytesIO(), local_mp_locks=local_mp_locks).dump(obj)
    except Exception as exc:
        return exc
    return None


def _search(
    obj: Any, path: str, found: list[Unpicklable], seen: set[int], depth: int, local_mp_locks: bool
) -> bool:
    """Record the failing leaves under ``obj``; return True if ``obj`` fails to pickle."""
    if id(obj) in seen:
        return False
    seen.add(id(obj))
    error = _pickle_error(obj, local_mp_locks)
    if error is None:
        return False
    failing_child = False
    if depth < _MAX_DEPTH:
        for child_path, child in _children(obj, path):
            if _search(child, child_path, found, seen, depth + 1, local_mp_locks):
                failing_child = True
    if not failing_child:
        t = type(obj)
        found.append(
            Unpicklable(
                path, f"{t.__module__}.{t.__qualname__}", f"{type(error).__name__}: {error}"
            )
        )
    return True


def _children(obj: Any, path: str) -> list[tuple[str, Any]]:
    """The named parts of ``obj`` that pickle would visit, as ``(path, value)`` pairs."""
    out: list[tuple[str, Any]] = []
    if isinstance(obj, dict):
        out = [(f"{path}[{k!r}]", v) for k, v in obj.items()]
        out += [(f"{path}.<key {k!r}>", k) for k in obj]
    elif isinstance(obj, (list, tuple)):
        out = [(f"{path}[{i}]", v) for i, v in enumerate(obj)]
    elif isinstance(obj, (set, frozenset)):
        out = [(f"{path}.<item {i}>", v) for i, v in enumerate(obj)]
    elif isinstance(obj, _SimpleQueueTypes):
        # Its __reduce_ex__ refuses, but dumps sends its items (_simple_queue_reduce).
        items = _simple_queue_reduce(obj)[1][0]
        out = [(f"{path}.<item {i}>", v) for i, v in enumerate(items)]
    elif isinstance(obj, types.FunctionType):
        if obj.__closure__:
            for name, cell in zip(obj.__code__.co_freevars, obj.__closure__, strict=True):
                try:
                    out.append((f"{path}.<closure {name}>", cell.cell_contents))
                except ValueError:  # empty cell
                    pass
        for name in obj.__code__.co_names:
            if name in obj.__globals__:
                out.append((f"{path}.<global {name}>", obj.__globals__[name]))
        if obj.__defaults__:
            code = obj.__code__
            names = code.co_varnames[: code.co_argcount][-len(obj.__defaults__) :]
            out += [
                (f"{path}.<default {n}>", v) for n, v in zip(names, obj.__defaults__, strict=True)
            ]
        for name, value in (obj.__kwdefaults__ or {}).items():
            out.append((f"{path}.<default {name}>", value))
    elif isinstance(obj, types.MethodType):
        out = [(f"{path}.__self__", obj.__self__), (f"{path}.__func__", obj.__func__)]
    elif not isinstance(obj, type):
        out = _state_children(obj, path)
    return out[:_MAX_CHILDREN]


def _state_children(obj: Any, path: str) -> list[tuple[str, Any]]:
    try:
        rv = obj.__reduce_ex__(PROTOCOL)
    except Exception:
        return []  # the object itself refuses to be reduced: it is the leaf
    if not isinstance(rv, tuple):
        return []
    out: list[tuple[str, Any]] = []
    args = rv[1] if len(rv) > 1 else ()
    state = rv[2] if len(rv) > 2 else None
    if (
        isinstance(state, tuple)
        and len(state) == 2
        and (state[0] is None or isinstance(state[0], dict))
        and isinstance(state[1], dict)
    ):
        state = {**(state[0] or {}), **state[1]}  # (__dict__, __slots__ values)
    if isinstance(state, dict):
        out += [
            (f"{path}.{k}" if isinstance(k, str) else f"{path}[{k!r}]", v) for k, v in state.items()
        ]
    elif state is not None:
        out.append((f"{path}.<state>", state))
    if isinstance(args, tuple):
        # copyreg.__newobj__'s first argument is the class itself: not an attribute
        skip_cls = rv[0] is copyreg.__newobj__ and args and args[0] is type(obj)
        out += [(f"{path}.<arg {i}>", a) for i, a in enumerate(args) if not (skip_cls and i == 0)]
    if len(rv) > 3 and rv[3] is not None:
        out += [(f"{path}[{i}]", v) for i, v in enumerate(list(rv[3])[:_MAX_CHILDREN])]
    if len(rv) > 4 and rv[4] is not None:
        out += [(f"{path}[{k!r}]", v) for k, v in list(rv[4])[:_MAX_CHILDREN]]
    return out


# ---------------------------------------------------------------------------------------------
# PickleSafeMixin: the same rules under plain pickle
# ---------------------------------------------------------------------------------------------
#
# The mixin overrides __reduce_ex__ rather than __getstate__, so that it composes with a
# subclass's own __getstate__/__setstate__: the subclass decides *what* its state is, the
# mixin makes that state picklable (at any depth: a lock inside a dict inside a helper object)
# by pickling it with CompatPickler, and hands the rebuilt state to the subclass's
# __setstate__ (or to the default __dict__ update). A reference back to the object itself
# inside its state is kept as a reference (persistent id), not pickled twice.

_SELF_PID = "compatmp:self"


class _StatePickler(CompatPickler):
    def __init__(self, file: Any, owner: Any) -> None:
        super().__init__(file)
        self._owner = owner

    def persistent_id(self, obj: Any) -> str | None:
        return _SELF_PID if obj is self._owner else None


class _StateUnpickler(pickle.Unpickler):
    def __init__(self, file: Any, owner: Any) -> None:
        super().__init__(file)
        self._owner = owner

    def persistent_load(self, pid: Any) -> Any:
        if pid == _SELF_PID:
            return self._owner
        raise pickle.UnpicklingError(f"unknown persistent id {pid!r}")


def _natural_reduce(obj: Any, protocol: int) -> tuple:
    """The reduction ``object.__reduce_ex__`` gives, i.e. ignoring PickleSafeMixin's."""
    return object.__reduce_ex__(obj, protocol)


def _make_pickle_safe(func: Any, args: tuple, blob: bytes) -> Any:
    obj = func(*args)
    state, listitems, dictitems = _StateUnpickler(io.BytesIO(blob), obj).load()
    if state is not None:
        setstate = getattr(obj, "__setstate__", None)
        if setstate is not None:
            setstate(state)
        else:  # Python 3.10: object has no default __setstate__
            if isinstance(state, tuple) and len(state) == 2:
                state, slotstate = state
            else:
                slotstate = None
            if state:
                obj.__dict__.update(state)
            if slotstate:
                for key, value in slotstate.items():
                    setattr(obj, key, value)
    if listitems:
        obj.extend(listitems)
    if dictitems:
        for key, value in dictitems:
            obj[key] = value
    return obj


class PickleSafeMixin:
    """Make a class picklable with plain ``pickle``, locks and all, at any depth.

    Inherit it (first, or anywhere in the bases) and instances pickle with ``pickle.dumps``,
    Keras' own ``use_multiprocessing=True`` workers and ``torch.utils.data.DataLoader``
    under ``spawn``, even when they hold ``threading`` locks, conditions, semaphores, events,
    barriers, queues, read-only files or lambdas - directly or deep inside helper objects and
    containers. In the unpickled copy, every lock is new and unlocked, events keep their
    state, queues their items, files their path and offset.

    It composes with your own ``__getstate__``/``__setstate__``: whatever ``__getstate__``
    returns is what gets made safe, and ``__setstate__`` receives it with fresh locks. It
    works with ``keras.utils.PyDataset`` as a base too::

        class Images(compatmp.PickleSafeMixin, keras.utils.PyDataset):
            def __init__(self, paths, **kwargs):
                super().__init__(**kwargs)
                self._lock = threading.Lock()
                ...

    ``copy.copy`` stays a plain shallow copy; ``copy.deepcopy`` goes through pickling and
    therefore also gets fresh locks. Unpickling needs ``cloudpickle`` importable (the state is
    written with :class:`CompatPickler`).

    Raises:
        SerializationError: on pickling, when something in the state still cannot be pickled
            (e.g. a generator or an sqlite3 connection); the message names its path.
    """

    __slots__ = ()

    def __reduce_ex__(self, protocol: int) -> tuple:
        rv = _natural_reduce(self, protocol)
        func, args = rv[0], rv[1]
        state = rv[2] if len(rv) > 2 else None
        listitems = list(rv[3]) if len(rv) > 3 and rv[3] is not None else None
        dictitems = list(rv[4]) if len(rv) > 4 and rv[4] is not None else None
        buf = io.BytesIO()
        try:
            _StatePickler(buf, self).dump((state, listitems, dictitems))
        except Exception as exc:
            root = type(self).__name__
            if isinstance(state, dict):
                found = [
                    u
                    for key, value in state.items()
                    for u in find_unpicklable(value, root=f"{root}.{key}")
                ]
            else:
                found = find_unpicklable(state, root=f"{root}.<state>")
            raise SerializationError(_failure_message(root, exc, found), found) from exc
        return _make_pickle_safe, (func, args, buf.getvalue())

    def __copy__(self) -> Any:
        cls = type(self)
        new = cls.__new__(cls)
        if hasattr(self, "__dict__"):
            new.__dict__.update(self.__dict__)
        for klass in cls.__mro__:
            for name in getattr(klass, "__slots__", ()):
                if name not in ("__dict__", "__weakref__") and hasattr(self, name):
                    setattr(new, name, getattr(self, name))
        return new
