"""Module-level pieces for test_serialize_properties.py: a user class, closures, canonical().

They live at module level so that a spawn child can import them by reference: the child
unpickles a graph that names ``property_helpers.Box`` and runs :func:`canonical_of_blob`.

:func:`canonical` maps an object graph to plain, comparable data (tuples, lists, ints,
strings), so that "``loads(dumps(x))`` keeps structure and values" becomes an ``==`` between
two canonical forms, computed in this process or in a child:

* ``canonical(x, expected=True)`` describes what the rebuilt graph must look like: the
  values of ``x`` with every lock, condition and bounded semaphore free, as documented in
  ``compatmp/_serialize.py``.
* ``canonical(y)`` *probes* a rebuilt graph ``y``: it takes each lock from another thread
  (with a timeout), counts each semaphore by acquiring it, calls each function at
  :data:`PROBES`. Every probe leaves the object as it found it.

Shared objects appear once in full and afterwards as ``("ref", n)``, ``n`` being the order
of first visit, so a lock that appears twice in ``x`` and comes back as two different locks
makes the two forms differ.
"""

from __future__ import annotations

import os
import queue
import reprlib
import sys
import threading
import types
from typing import Any

import numpy as np

from compatmp import loads

# How long a probe waits to take a lock or condition that should be free (seconds). Nothing
# else touches these objects, so a free lock is taken at once; the wait only runs out when
# the lock came back held (the bug under test). Kept short because hypothesis replays a
# failing example many times while shrinking it.
LOCK_PROBE_TIMEOUT = 0.5
# How long to wait for a probe thread (seconds): it waits at most LOCK_PROBE_TIMEOUT once,
# plus a few non-blocking calls; the margin is for a loaded 2-core machine.
PROBE_JOIN_TIMEOUT = 10.0
# Inputs at which the functions in a graph are evaluated.
PROBES = (0, 1, -3, 7)
# Counting a semaphore stops here; generated semaphores hold at most 3.
SEMAPHORE_COUNT_CAP = 1000

_LockType = type(threading.Lock())
_RLockTypes = tuple({type(threading.RLock()), threading._PyRLock})
_QueueTypes = (queue.Queue, queue.LifoQueue, queue.PriorityQueue)


class Box:
    """A plain user class: its instance attributes hold parts of the graph."""

    def __init__(self, **attrs: Any) -> None:
        self.__dict__.update(attrs)

    @reprlib.recursive_repr()
    def __repr__(self) -> str:
        inner = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"Box({inner})"


def make_affine(a: int, b: int) -> Any:
    """A lambda closing over two ints: ``x -> a * x + b``."""
    return lambda x: a * x + b


def make_guarded(k: int, guard: Any) -> Any:
    """A closure over an int and another object of the graph (a lock, an event...).

    It does not use ``guard`` in a blocking way (the original may be held by this thread),
    it only has to carry it along, so the pickle must keep ``guard``'s identity.
    """
    return lambda x: (x + k, type(guard).__name__)


def make_capturing(captured: Any) -> Any:
    """A closure whose only free variable, ``captured``, holds ``captured``."""

    def read() -> Any:
        return captured

    return read


# ---------------------------------------------------------------------------------------------
# Probes: run in a separate thread, so that a lock held by *this* thread (an RLock would let
# this thread in again) still counts as held.
# ---------------------------------------------------------------------------------------------


def _in_thread(func: Any) -> Any:
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = func()
        except BaseException as exc:  # reported in the calling thread
            box["error"] = exc

    t = threading.Thread(target=run, name="property-probe", daemon=True)
    t.start()
    t.join(PROBE_JOIN_TIMEOUT)
    if t.is_alive():
        raise AssertionError(f"probe thread still blocked after {PROBE_JOIN_TIMEOUT} s")
    if "error" in box:
        raise box["error"]
    return box["value"]


def probe_lock(lock: Any) -> tuple[bool, bool | None]:
    """Return ``(free, reentrant)`` for a Lock or RLock, as seen from another thread.

    ``free``: the lock could be taken within LOCK_PROBE_TIMEOUT seconds. ``reentrant``: the
    taking thread could take it a second time without blocking (None when not free). The
    lock is released as often as it was taken.
    """

    def run() -> tuple[bool, bool | None]:
        if not lock.acquire(timeout=LOCK_PROBE_TIMEOUT):
            return False, None
        again = lock.acquire(blocking=False)
        if again:
            lock.release()
        lock.release()
        return True, again

    return _in_thread(run)


def probe_condition(cond: threading.Condition) -> bool:
    """True when another thread can enter ``cond`` and ``wait`` on it (which times out)."""

    def run() -> bool:
        if not cond.acquire(timeout=LOCK_PROBE_TIMEOUT):
            return False
        try:
            notified = cond.wait(timeout=0.001)
            cond.notify_all()
        finally:
            cond.release()
        return notified is False

    return _in_thread(run)


def count_semaphore(sem: threading.Semaphore) -> int:
    """How many times ``sem`` can be acquired without blocking (it is released again)."""
    n = 0
    while n < SEMAPHORE_COUNT_CAP and sem.acquire(blocking=False):
        n += 1
    for _ in range(n):
        sem.release()
    return n


def is_bounded(sem: threading.BoundedSemaphore) -> bool:
    """True when one more ``release`` raises ValueError, i.e. ``sem`` is full and bounded."""
    try:
        sem.release()
    except ValueError:
        return True
    sem.acquire(blocking=False)  # undo the release that should not have worked
    return False


def drain_simple_queue(q: queue.SimpleQueue) -> list:
    """The items of a SimpleQueue in get order; they are put back in the same order."""
    items = []
    while True:
        try:
            items.append(q.get_nowait())
        except queue.Empty:
            break
    for item in items:
        q.put(item)
    return items


def queue_items_in_get_order(q: queue.Queue) -> list:
    """The items ``q.get()`` would return, in order, without taking them out."""
    with q.mutex:
        items = list(q.queue)
    if isinstance(q, queue.PriorityQueue):
        return sorted(items)
    if isinstance(q, queue.LifoQueue):
        return items[::-1]
    return items


# ---------------------------------------------------------------------------------------------
# canonical()
# ---------------------------------------------------------------------------------------------


class _Canon:
    """One walk over a graph; ``sync_refs`` records the memo index of every sync object seen."""

    def __init__(self, expected: bool) -> None:
        self.expected = expected
        self.memo: dict[int, int] = {}
        self.sync_refs: list[int] = []
        self.sync_objects: dict[int, Any] = {}  # memo index -> object

    def of(self, obj: Any) -> Any:
        if obj is None or isinstance(obj, (str, bytes)):
            return obj
        if isinstance(obj, (bool, int, float)):
            return (type(obj).__name__, obj)
        if isinstance(obj, tuple):  # not identity-tracked: immutable
            return ("tuple", [self.of(v) for v in obj])
        if isinstance(obj, frozenset):
            return ("frozenset", sorted((self.of(v) for v in obj), key=repr))
        key = id(obj)
        sync = _is_sync(obj)
        if key in self.memo:
            if sync:
                self.sync_refs.append(self.memo[key])
            return ("ref", self.memo[key])
        self.memo[key] = len(self.memo)
        if sync:
            self.sync_refs.append(self.memo[key])
            self.sync_objects[self.memo[key]] = obj
        return self._fresh(obj)

    def _fresh(self, obj: Any) -> Any:
        exp = self.expected
        if isinstance(obj, list):
            return ("list", [self.of(v) for v in obj])
        if isinstance(obj, dict):
            return ("dict", [(self.of(k), self.of(v)) for k, v in obj.items()])
        if isinstance(obj, set):
            return ("set", sorted((self.of(v) for v in obj), key=repr))
        if isinstance(obj, np.ndarray):
            return ("ndarray", obj.dtype.str, obj.shape, obj.tolist())
        if isinstance(obj, Box):
            return ("Box", [(k, self.of(v)) for k, v in vars(obj).items()])
        if type(obj) is _LockType:
            return ("Lock", *((True, False) if exp else probe_lock(obj)))
        if isinstance(obj, _RLockTypes):
            return ("RLock", *((True, True) if exp else probe_lock(obj)))
        if isinstance(obj, threading.Condition):
            lock = self.of(obj._lock)
            return ("Condition", lock, True if exp else probe_condition(obj))
        if isinstance(obj, threading.BoundedSemaphore):
            if exp:  # comes back fully released
                return ("BoundedSemaphore", obj._initial_value, True)
            return ("BoundedSemaphore", count_semaphore(obj), is_bounded(obj))
        if isinstance(obj, threading.Semaphore):  # keeps its current value
            return ("Semaphore", obj._value if exp else count_semaphore(obj))
        if isinstance(obj, threading.Event):
            return ("Event", obj.is_set())
        if isinstance(obj, threading.Barrier):
            if exp:  # comes back reset: nobody waiting, not broken
                return ("Barrier", obj.parties, obj._timeout, 0, False)
            return ("Barrier", obj.parties, obj._timeout, obj.n_waiting, obj.broken)
        if isinstance(obj, _QueueTypes):
            items = [self.of(v) for v in queue_items_in_get_order(obj)]
            mutex_free = True if exp else probe_lock(obj.mutex)[0]
            return (type(obj).__name__, obj.maxsize, items, obj.unfinished_tasks, mutex_free)
        if isinstance(obj, queue.SimpleQueue):
            return ("SimpleQueue", [self.of(v) for v in drain_simple_queue(obj)])
        if isinstance(obj, types.FunctionType):
            cells = [self.of(c.cell_contents) for c in obj.__closure__ or ()]
            return ("function", [self.of(obj(p)) for p in PROBES], cells)
        raise TypeError(f"canonical() does not know {type(obj).__qualname__}: {obj!r}")


def _is_sync(obj: Any) -> bool:
    return isinstance(
        obj,
        (
            _LockType,
            *_RLockTypes,
            threading.Condition,
            threading.Semaphore,
            threading.Event,
            threading.Barrier,
            *_QueueTypes,
            queue.SimpleQueue,
        ),
    )


def canonical(obj: Any, *, expected: bool = False) -> Any:
    """Plain comparable data describing ``obj`` (see the module docstring).

    Args:
        obj (object): a graph built from containers, scalars, numpy arrays, :class:`Box`,
            functions, threading primitives and queues.
        expected (bool): describe what a faithful rebuild of ``obj`` must look like (every
            lock free) instead of probing ``obj`` itself (default: False).

    Returns:
        object: nested tuples/lists of str, int, float, bytes, bool and None.

    Raises:
        TypeError: ``obj`` holds a type this function does not know.
        AssertionError: a probe thread stayed blocked for PROBE_JOIN_TIMEOUT seconds.
    """
    return _Canon(expected).of(obj)


def sync_identities(obj: Any) -> list[int]:
    """For each occurrence of a lock, event, queue... in walk order, the index of its object.

    Two graphs with equal lists share their synchronization objects in the same places.
    """
    walker = _Canon(expected=True)
    walker.of(obj)
    return walker.sync_refs


def shared_held_lock(obj: Any) -> bool:
    """True when a held ``threading.Lock`` appears at least twice in ``obj`` (no probing)."""
    walker = _Canon(expected=True)
    walker.of(obj)
    return any(
        walker.sync_refs.count(i) > 1 and type(o) is _LockType and o.locked()
        for i, o in walker.sync_objects.items()
    )


def canonical_of_blob(blob: bytes) -> tuple[Any, list[int]]:
    """Child-process entry point: ``loads`` the blob, return its canonical form and identities."""
    obj = loads(blob)
    walker = _Canon(expected=False)
    return walker.of(obj), walker.sync_refs


def child_facts() -> tuple[int, bool]:
    """Child-process entry point: ``(pid, whether the test module is imported here)``.

    A spawned child imports only what unpickling needs, so the test module is absent; a
    forked child would have inherited it.
    """
    return os.getpid(), "test_serialize_properties" in sys.modules
