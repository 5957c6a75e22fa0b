"""Name what cannot be pickled, by attribute path: ``dataset.cache._conn: sqlite3.Connection``.

NOTE [ Searching for what cannot be pickled ]
:func:`compatmp.dumps` has just failed on ``obj``; the error must say *where* the culprit
sits, and finding out must cost at most a few times the failed pickle, and never raise. The
search walks down from ``obj`` along the parts pickle would visit (attributes from the
object's own ``__reduce_ex__``/``__getstate__``, dict entries, sequence items, closure
variables...) and, at each level, test-pickles only what may contain the culprit:

* The root's error is the one ``dumps`` caught: it is not pickled again.
* Siblings are tested in groups of ``_GROUP`` (one pickle of a tuple of 64 items instead of
  64 picklers); only a failing group is split into single tests. 20,000 records with one bad
  record cost ~313 group pickles and 64 single ones, not 20,000 pickles. Up to ``_FEW``
  siblings (a typical object's attributes) are tested one by one: their parent fails, so a
  group test would fail too and only cost one more pickle of all of them.
* Test pickles write to a sink that throws the bytes away and keep protocol-5 buffers out of
  band (``buffer_callback`` returns a false value), so a NumPy array costs nothing to test.
* An object seen once is not searched again (shared objects, cycles). Successive tests share
  one pickler (and its memo) until one fails, so a class defined in ``__main__``, which
  cloudpickle sends by value with its methods, is not serialized again for every test.
* Bounds: at most ``_MAX_FOUND`` culprits, ``_MAX_DEPTH`` levels, and a time budget (from
  :func:`compatmp.dumps`: ``_BUDGET_FLOOR`` seconds plus ``_BUDGET_FACTOR`` times the failed
  pickle). Past a bound the deepest failing object reached so far is reported and the message
  says the list may be incomplete.
* Every step that touches the user's object (``__reduce_ex__``, iteration, ``str`` of
  an error) is guarded: an object whose ``__getattribute__`` recurses forever, or whose
  properties raise, is reported as the culprit instead of breaking the search.

Measured (a dataset with a 61 MB uint8 image array, a label array, 20,000 record objects of
a class defined in ``__main__``, a dict indexing them, a lock, a lambda and an ``sqlite3``
connection two levels down; best of 3, 2-core machine under load): ``dumps`` raising took
576-652 ms against 181-184 ms for the failing pickle before (3.2-3.5x), 267-328 ms after
(1.5-1.7x). With every 100th record also holding a generator: 1.35-1.45 s against 68-69 ms
before (20-21x, 102 culprits listed), 62-79 ms against 39-41 ms after (1.5-2.0x, the first
20 listed).
"""

from __future__ import annotations

import copyreg
import time
import types
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from ._pickler import PROTOCOL, CompatPickler, _simple_queue_reduce, _SimpleQueueTypes

__all__ = ["Unpicklable", "find_unpicklable", "search"]

_MAX_DEPTH = 50  # levels below the root
_MAX_FOUND = 20  # culprits listed; beyond that the message says there are more
_MAX_CHILDREN = 1_000_000  # parts of one object looked at
_GROUP = 64  # siblings tested in one pickle
_FEW = 8  # up to this many siblings are tested one by one
_BUDGET_FLOOR = 1.0  # seconds the search may always take (a loaded machine stalls)
_BUDGET_FACTOR = 3.0  # ... plus this many times the failed pickle


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


def find_unpicklable(
    obj: Any, *, root: str = "dataset", local_mp_locks: bool = False
) -> list[Unpicklable]:
    """List the parts of ``obj`` that cannot be pickled, even after compatmp's rules.

    The search pickles ``obj``; on failure it descends into the attributes (as given by the
    object's ``__reduce_ex__``/``__getstate__``, so custom state is respected), dict entries,
    sequence items and function closures that fail too, and reports the deepest failing
    objects. Locks, queues, events and read-only files are *not* reported: :func:`dumps`
    rebuilds them. It never raises (an object that breaks the search is itself reported) and
    is bounded: at most 20 entries, 50 levels, and about 1 s plus 3 times one pickle of
    ``obj`` (NOTE [ Searching for what cannot be pickled ]).

    Args:
        obj (object): the object to inspect.
        root (str): the name of ``obj`` at the start of each path (default: ``"dataset"``).
        local_mp_locks (bool): as in :func:`dumps` (default: False).

    Returns:
        list[Unpicklable]: empty when ``obj`` pickles; otherwise one entry per offending object
        (generators, sockets, sqlite3 connections, files open for writing, ...), in
        attribute order.
    """
    return search(obj, root, local_mp_locks=local_mp_locks)[0]


def search(
    obj: Any,
    root: str,
    *,
    error: BaseException | None = None,
    seconds: float | None = None,
    local_mp_locks: bool = False,
) -> tuple[list[Unpicklable], bool]:
    """The search behind :func:`find_unpicklable`; also says whether it was complete.

    Args:
        obj (object): the object to inspect.
        root (str): its name at the start of each path.
        error (BaseException | None): the error pickling ``obj`` already raised, if known
            (then ``obj`` is not pickled again).
        seconds (float | None): the time pickling ``obj`` took, if known; sets the budget.
        local_mp_locks (bool): as in :func:`compatmp.dumps`.

    Returns:
        tuple[list[Unpicklable], bool]: the culprits, and False when a bound (count, depth,
        time) stopped the search early, so that more culprits may exist.
    """
    s = _Search(local_mp_locks)
    try:
        if error is None:
            start = time.monotonic()
            error = s.error_of(obj)
            seconds = time.monotonic() - start
            if error is None:
                return [], True
        s.deadline = time.monotonic() + _BUDGET_FLOOR + _BUDGET_FACTOR * (seconds or 0.0)
        s.visit(obj, root, 0, error)
    except Exception:  # RecursionError, MemoryError... in our own walk: keep what we have
        s.complete = False
    if not s.found:
        s.found.append(_entry(obj, root, error))
    return s.found, s.complete


class _Sink:
    """A binary file that forgets what is written to it."""

    write = staticmethod(len)


def _out_of_band(buffer: Any) -> None:
    return None  # a false value: the buffer is not written into the pickle (PEP 574)


class _Search:
    def __init__(self, local_mp_locks: bool) -> None:
        self.local_mp_locks = local_mp_locks
        self.found: list[Unpicklable] = []
        self.seen: set[int] = set()
        self.complete = True
        self.deadline = float("inf")
        # One pickler for successive tests while they succeed: its memo then holds only
        # objects that pickled, and a class sent by value is not sent again for every test.
        self.pickler: CompatPickler | None = None

    def stopped(self) -> bool:
        if len(self.found) >= _MAX_FOUND or time.monotonic() > self.deadline:
            self.complete = False
            return True
        return False

    def error_of(self, obj: Any) -> BaseException | None:
        if self.pickler is None:
            self.pickler = CompatPickler(
                _Sink(), PROTOCOL, buffer_callback=_out_of_band, local_mp_locks=self.local_mp_locks
            )
        try:
            self.pickler.dump(obj)
        except Exception as exc:
            self.pickler = None  # its memo may hold objects whose pickling failed half-way
            return exc
        return None

    def visit(self, obj: Any, path: str, depth: int, error: BaseException) -> None:
        """``obj`` failed with ``error``: record its failing parts, or ``obj`` itself."""
        self.seen.add(id(obj))
        before = len(self.found)
        if depth >= _MAX_DEPTH:
            self.complete = False
        elif not self.stopped():
            for child_path, child, child_error in self.failing(_children(obj, path)):
                self.visit(child, child_path, depth + 1, child_error)
                if self.stopped():
                    break
        if len(self.found) == before:  # no part fails on its own: obj is the culprit
            self.found.append(_entry(obj, path, error))

    def failing(
        self, children: Iterator[tuple[str, Any, Any]]
    ) -> Iterator[tuple[str, Any, BaseException]]:
        """The children that fail to pickle, as ``(path, child, error)``, in order."""
        group: list[tuple[str, Any, Any]] = []
        for n, child in enumerate(children):
            if n >= _MAX_CHILDREN:
                self.complete = False
                break
            if id(child[2]) not in self.seen:
                group.append(child)
            if len(group) == _GROUP:
                yield from self._failing_in(group)
                group = []
                if self.stopped():
                    return
        yield from self._failing_in(group)

    def _failing_in(
        self, group: list[tuple[str, Any, Any]]
    ) -> Iterator[tuple[str, Any, BaseException]]:
        # A few siblings are tested one by one: their parent fails, so a group test would
        # almost surely fail too and only add one more pickle of all of them.
        if len(group) > _FEW and self.error_of(tuple(c[2] for c in group)) is None:
            return
        for template, key, child in group:
            if id(child) in self.seen or self.stopped():
                continue
            error = self.error_of(child)
            if error is not None:
                yield template.format(key), child, error


def _entry(obj: Any, path: str, error: BaseException) -> Unpicklable:
    t = type(obj)  # type() does not run the object's own __getattribute__ or __class__
    try:
        text = f"{type(error).__name__}: {error}"
    except Exception:
        text = type(error).__name__
    return Unpicklable(path, f"{t.__module__}.{t.__qualname__}", text)


def _children(obj: Any, path: str) -> Iterator[tuple[str, Any, Any]]:
    """The parts of ``obj`` pickle would visit, as ``(path template, key, value)``.

    ``template.format(key)`` is the child's path; it is only built for failing children.
    Anything the object raises while being looked at ends the listing: the object is then
    reported itself.
    """
    esc = path.replace("{", "{{").replace("}", "}}")
    try:
        t = type(obj)
        # Containers are iterated in place (no copy of a huge one); one that changes size
        # meanwhile raises, which ends the listing like any other error.
        if issubclass(t, dict):
            for k, v in obj.items():
                yield esc + "[{!r}]", k, v
            for k in obj:
                yield esc + ".<key {!r}>", k, k
        elif issubclass(t, (list, tuple)):
            for i, v in enumerate(obj):
                yield esc + "[{}]", i, v
        elif issubclass(t, (set, frozenset)):
            for i, v in enumerate(obj):
                yield esc + ".<item {}>", i, v
        elif issubclass(t, _SimpleQueueTypes):
            # Its __reduce_ex__ refuses, but dumps sends its items (_simple_queue_reduce).
            for i, v in enumerate(_simple_queue_reduce(obj)[1][0]):
                yield esc + ".<item {}>", i, v
        elif issubclass(t, types.FunctionType):
            yield from _function_children(obj, esc)
        elif issubclass(t, types.MethodType):
            yield esc + ".{}", "__self__", obj.__self__
            yield esc + ".{}", "__func__", obj.__func__
        elif not issubclass(t, type):
            yield from _state_children(obj, esc)
    except Exception:
        return


def _function_children(fn: types.FunctionType, esc: str) -> Iterator[tuple[str, Any, Any]]:
    code = fn.__code__
    if fn.__closure__:
        for name, cell in zip(code.co_freevars, fn.__closure__, strict=True):
            try:
                value = cell.cell_contents
            except ValueError:  # empty cell
                continue
            yield esc + ".<closure {}>", name, value
    for name in code.co_names:
        if name in fn.__globals__:
            yield esc + ".<global {}>", name, fn.__globals__[name]
    if fn.__defaults__:
        names = code.co_varnames[: code.co_argcount][-len(fn.__defaults__) :]
        for name, value in zip(names, fn.__defaults__, strict=True):
            yield esc + ".<default {}>", name, value
    for name, value in (fn.__kwdefaults__ or {}).items():
        yield esc + ".<default {}>", name, value


def _state_children(obj: Any, esc: str) -> Iterator[tuple[str, Any, Any]]:
    reduce_ex = getattr(type(obj), "__reduce_ex__", None)
    if reduce_ex is None:
        return
    rv = reduce_ex(obj, PROTOCOL)
    if not isinstance(rv, tuple):
        return
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
        for k, v in state.items():
            if isinstance(k, str):
                yield esc + ".{}", k, v
            else:
                yield esc + "[{!r}]", k, v
    elif state is not None:
        yield esc + ".{}", "<state>", state
    if isinstance(args, tuple):
        # copyreg.__newobj__'s first argument is the class itself: not an attribute
        skip_cls = rv[0] is copyreg.__newobj__ and args and args[0] is type(obj)
        for i, a in enumerate(args):
            if not (skip_cls and i == 0):
                yield esc + ".<arg {}>", i, a
    if len(rv) > 3 and rv[3] is not None:
        for i, v in enumerate(rv[3]):
            yield esc + "[{}]", i, v
    if len(rv) > 4 and rv[4] is not None:
        for k, v in rv[4]:
            yield esc + "[{!r}]", k, v
