"""``compatmp.get_context()``: a ``multiprocessing`` context that pickles with compatmp's rules.

Libraries that start processes take a ``multiprocessing`` context: torch's ``DataLoader``
(``multiprocessing_context=``), ``concurrent.futures.ProcessPoolExecutor`` (``mp_context=``),
``multiprocessing.pool.Pool`` (``context=``). Under spawn and forkserver they pickle with the
stdlib's ``ForkingPickler``, which refuses locks, lambdas and ``__main__`` closures and names
no attribute path. The context returned here is a real
``multiprocessing.context.BaseContext`` (torch checks ``isinstance``) whose processes,
queues and pools carry their objects through compatmp's serializer instead.

NOTE [ A per-context pickler without a global swap ]
CPython has no per-context pickler: ``BaseContext.reducer`` reads and *writes* a global of
``multiprocessing/context.py``, and ``popen_spawn_posix``, ``popen_forkserver``,
``popen_spawn_win32``, ``queues`` and ``connection`` all call the module-level
``reduction.ForkingPickler`` (CPython 3.10-3.14, ``Lib/multiprocessing``). loky replaces all
of them with its own ``Popen``, ``Queue`` and ``SimpleQueue`` copies (``loky/backend/
reduction.py``, ``set_loky_pickler``; ``queues.py``). compatmp keeps the stdlib classes and
changes only what *its* objects hand to the global pickler:

* a process object reduces itself (``_CompatProcess.__reduce__``) to one compatmp pickle of
  its class and ``__dict__`` (target, args, kwargs, name, config). The stdlib ``Popen`` pickles
  the process inside its spawning window, so ``multiprocessing`` locks, queues, connections
  and torch tensors in the arguments still use their own reducers (``ForkingPickler``'s
  ``_extra_reducers`` are in the dispatch table of :class:`_TransferPickler`);
* ``Queue.put``/``JoinableQueue.put`` pickle the item with compatmp at once and enqueue the
  bytes in a :class:`_Pickled` box that the stdlib feeder thread pickles as
  ``(pickle.loads, (data,))``; ``SimpleQueue.put`` and the ``send`` of its write end (what
  ``multiprocessing.pool.Pool`` uses for tasks) pickle with compatmp directly. The receiving
  side is the stdlib's ``get``/``recv``: plain ``pickle.loads`` reads compatmp's pickles;
* ``ProcessPoolExecutor`` builds its call queue itself (``_SafeQueue(ctx=mp_context)``, not
  ``mp_context.Queue()``), so a process of this context that receives such a queue in its
  arguments gives *that instance* compatmp's ``put`` (its class and every other queue stay as
  they are); a call item that cannot be pickled fails its future, as the stdlib feeder does.

Nothing global changes: no ``set_start_method``, no ``ForkingPickler`` or ``copyreg``
registration, and another context in the same program keeps plain pickle. Costs: each queue
item is pickled twice (compatmp's bytes, then the box: one extra copy of the bytes per side);
a pickling error is raised by ``put`` itself instead of being printed by the feeder thread
(the item used to be dropped silently). Spawned and forkserver children do not re-run
``__main__`` (NOTE [ Workers do not re-run __main__ ] in :mod:`compatmp._launch`, whose hook
this module reuses): what they need from it arrives by value.
"""

from __future__ import annotations

import collections
import copyreg
import io
import logging
import multiprocessing
import multiprocessing.context as mp_context
import multiprocessing.queues as mp_queues
import multiprocessing.reduction as mp_reduction
import pickle
import sys
import time
import types
from typing import Any

import cloudpickle

from . import _launch
from ._exceptions import serialization_error
from ._platform import Decision, PlatformFacts, decide_start_method, python_default_method
from ._serialize import PROTOCOL, CompatPickler, failure_message

__all__ = ["CompatContext", "close_dataloader", "dataloader_with_context", "get_context"]

_log = logging.getLogger("compatmp")

#: Start methods a multiprocessing context can have (threads and Ray are no processes here).
CONTEXT_METHODS = ("fork", "forkserver", "spawn")

_SELF = "compatmp.process"  # persistent id of the process object inside its own pickle
_NOTHING = object()


# ---------------------------------------------------------------------------------------------
# The pickler: compatmp's rules plus multiprocessing's own reducers
# ---------------------------------------------------------------------------------------------


def _method_reduce(method: types.MethodType) -> tuple:
    """A bound method by name on its object, as ``ForkingPickler`` sends it, when that name
    gives the method back; else cloudpickle's reduction (the function by value if need be).

    cloudpickle sends the function of a bound *classmethod* by value (its qualified name does
    not lead back to the function), so a worker's traceback showed ``<dynamic-code>``
    instead of the source line: CPython's ``test_traceback`` (tests/vendored_cpython_futures)
    found it.
    """
    owner, name = method.__self__, method.__func__.__name__
    try:
        same = getattr(owner, name) == method
    except Exception:
        same = False
    if same:
        return getattr, (owner, name)
    return types.MethodType, (method.__func__, owner)


_OWN_REDUCERS = {types.MethodType: _method_reduce}


def _dispatch_table() -> collections.ChainMap:
    # Bound methods as the stdlib sends them where it can (_method_reduce); then cloudpickle's
    # reducers, ForkingPickler's registry as it is *now* (Connection, socket, torch tensors
    # and storages registered by torch.multiprocessing), then copyreg, as ForkingPickler has it.
    return collections.ChainMap(
        _OWN_REDUCERS,
        getattr(cloudpickle.Pickler, "_dispatch_table", {}),
        mp_reduction.ForkingPickler._extra_reducers,
        copyreg.dispatch_table,
    )


class _TransferPickler(CompatPickler):
    """:class:`compatmp.CompatPickler` that also knows ``multiprocessing``'s reducers."""

    def __init__(self, file: Any) -> None:
        super().__init__(file, PROTOCOL)
        table = _dispatch_table()
        # The C Pickler reads its dispatch table from a slot, set here through the member
        # descriptor (cloudpickle's class-level attribute would hide an instance attribute;
        # the same trick as loky's CustomizablePickler._set_dispatch_table).
        for klass in type(self).__mro__:
            member = vars(klass).get("dispatch_table")
            if isinstance(member, types.MemberDescriptorType):
                member.__set__(self, table)
                break
        self.dispatch_table = table


class _ProcessPickler(_TransferPickler):
    """Pickles a process's state; the process itself becomes a persistent id (a pickler with
    ``persistent_id`` pays a Python call per object, so queue items use the one above)."""

    def __init__(self, file: Any, owner: Any) -> None:
        super().__init__(file)
        self._owner = owner

    def persistent_id(self, obj: Any) -> str | None:
        return _SELF if obj is self._owner else None


def _transfer_dumps(obj: Any, root: str, *, owner: Any = None, first: Any = _NOTHING) -> bytes:
    """Pickle ``obj`` with :class:`_TransferPickler`; failures name the attribute path.

    Args:
        obj (object): what to pickle.
        root (str): its name in error messages (``"queue item"``, ``"process"``...).
        owner (object | None): pickled as a persistent id (the process itself).
        first (object): pickled before ``obj`` by the same pickler, so that both share one
            memo (default: nothing). Each object ``multiprocessing`` sends by file
            descriptor must be reduced once per process start: a second reduction would
            hand the child the same descriptor twice (``fds_to_keep`` refuses that).

    Raises:
        SerializationError: also of the original error's type (NOTE [ Errors of both types ]).
    """
    buf = io.BytesIO()
    start = time.monotonic()
    pickler = _TransferPickler(buf) if owner is None else _ProcessPickler(buf, owner)
    failing, failing_root = obj, root
    try:
        if first is not _NOTHING:
            failing, failing_root = first, f"{root} class"
            pickler.dump(first)
            failing, failing_root = obj, root
        pickler.dump(obj)
    except Exception as exc:
        from ._unpicklable import search

        found, complete = search(failing, failing_root, error=exc, seconds=time.monotonic() - start)
        message = failure_message(failing_root, exc, found, complete)
        message = message.replace(
            "to send it to worker processes", "to send it to another process", 1
        ).replace(" compatmp.fit falls back to threads when a dataset cannot be pickled.", "")
        raise serialization_error(type(exc), message, found) from exc
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------
# Processes
# ---------------------------------------------------------------------------------------------


class _SelfUnpickler(pickle.Unpickler):
    def __init__(self, file: Any, obj: Any) -> None:
        super().__init__(file)
        self._obj = obj

    def persistent_load(self, pid: Any) -> Any:
        if pid == _SELF:
            return self._obj
        raise pickle.UnpicklingError(f"unknown persistent id {pid!r}")


def _rebuild_process(data: bytes) -> Any:
    unpickler = _SelfUnpickler(io.BytesIO(data), None)
    cls = unpickler.load()
    unpickler._obj = obj = cls.__new__(cls)
    obj.__dict__.update(unpickler.load())  # the same unpickler: one memo for both
    return obj


class _CompatProcess:
    """Mixin for the stdlib's process classes: compatmp pickling, no ``__main__`` re-run."""

    _start_method: str | None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        for arg in self._args:  # type: ignore[attr-defined]
            _adopt_executor_queue(arg)

    def start(self) -> None:
        """Start the process; spawn and forkserver children skip ``__main__``."""
        if self._start_method == "fork":
            super().start()  # type: ignore[misc]
            return
        # NOTE [ Workers do not re-run __main__ ] in compatmp/_launch.py: its hook, its flag.
        with _launch.without_main():
            super().start()  # type: ignore[misc]

    def __reduce__(self) -> tuple:
        # The class (by value when defined in __main__), then the state, by one pickler into
        # one stream, so that the object exists before its state is read (a target that is a
        # bound method of the process itself refers back to it: persistent id).
        data = _transfer_dumps(dict(self.__dict__), "process", owner=self, first=type(self))
        return _rebuild_process, (data,)


class CompatSpawnProcess(_CompatProcess, mp_context.SpawnProcess):
    """A spawn process whose target and arguments travel through compatmp's serializer."""


_PROCESS_CLASSES: dict[str, type] = {"spawn": CompatSpawnProcess}

if sys.platform != "win32":

    class CompatForkProcess(_CompatProcess, mp_context.ForkProcess):
        """A fork process (nothing is pickled to start it; its queues use compatmp)."""

    class CompatForkServerProcess(_CompatProcess, mp_context.ForkServerProcess):
        """A forkserver process whose target and arguments travel through compatmp."""

    _PROCESS_CLASSES["fork"] = CompatForkProcess
    _PROCESS_CLASSES["forkserver"] = CompatForkServerProcess


# ---------------------------------------------------------------------------------------------
# Queues
# ---------------------------------------------------------------------------------------------


class _Pickled:
    """Bytes of a compatmp pickle, which the stdlib's pickler sends as ``pickle.loads(data)``."""

    __slots__ = ("data",)

    def __init__(self, data: bytes) -> None:
        self.data = data

    def __reduce__(self) -> tuple:
        return pickle.loads, (self.data,)


def _check_open(q: Any) -> None:
    if getattr(q, "_closed", False):
        raise ValueError(f"Queue {q!r} is closed")


class CompatQueue(mp_queues.Queue):
    """``multiprocessing.Queue`` whose items are pickled by compatmp when ``put``.

    ``put`` raises :class:`compatmp.SerializationError` (also of the original error's type)
    naming the attribute path when an item cannot be pickled; the stdlib queue would print the
    error in its feeder thread and drop the item.
    """

    def put(self, obj: Any, block: bool = True, timeout: float | None = None) -> None:
        _check_open(self)
        super().put(_Pickled(_transfer_dumps(obj, "queue item")), block, timeout)


class CompatJoinableQueue(mp_queues.JoinableQueue):
    """``multiprocessing.JoinableQueue`` whose items are pickled by compatmp (see CompatQueue)."""

    def put(self, obj: Any, block: bool = True, timeout: float | None = None) -> None:
        _check_open(self)
        super().put(_Pickled(_transfer_dumps(obj, "queue item")), block, timeout)


class _CompatWriter:
    """The write end of a :class:`CompatSimpleQueue`: ``send`` pickles with compatmp.

    ``multiprocessing.pool.Pool`` sends its tasks with ``inqueue._writer.send`` directly.
    Everything else is the wrapped ``Connection``'s; pickled, it is that connection again
    (reduced by ``multiprocessing``'s own reducer) wrapped on arrival.
    """

    def __init__(self, conn: Any) -> None:
        self._conn = conn

    def send(self, obj: Any) -> None:
        self._conn.send_bytes(_transfer_dumps(obj, "queue item"))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)

    def __reduce__(self) -> tuple:
        return _CompatWriter, (self._conn,)


class CompatSimpleQueue(mp_queues.SimpleQueue):
    """``multiprocessing.SimpleQueue`` whose items are pickled by compatmp."""

    def __init__(self, *, ctx: Any) -> None:
        super().__init__(ctx=ctx)
        self._writer = _CompatWriter(self._writer)

    def put(self, obj: Any) -> None:
        data = _transfer_dumps(obj, "queue item")  # before taking the lock, as the stdlib
        if self._wlock is None:
            self._writer.send_bytes(data)  # writes to a win32 message pipe are atomic
        else:
            with self._wlock:
                self._writer.send_bytes(data)


def _adopt_executor_queue(obj: Any) -> None:
    """Give a ``ProcessPoolExecutor``'s call queue compatmp's ``put`` (NOTE at the top)."""
    futures = sys.modules.get("concurrent.futures.process")
    safe_queue = getattr(futures, "_SafeQueue", None)
    if not isinstance(safe_queue, type) or type(obj) is not safe_queue:
        return
    if "put" in vars(obj):
        return  # adopted by an earlier process of the same executor
    stdlib_put = obj.put

    def put(item: Any, block: bool = True, timeout: float | None = None) -> None:
        try:
            data = _transfer_dumps(item, "call")
        except Exception as exc:
            # What the stdlib feeder thread does with an item it cannot pickle: the
            # executor's queue fails the item's future (_SafeQueue._on_queue_feeder_error).
            obj._on_queue_feeder_error(exc, item)
            return
        stdlib_put(_Pickled(data), block, timeout)

    obj.put = put


# ---------------------------------------------------------------------------------------------
# The context
# ---------------------------------------------------------------------------------------------


class CompatContext(mp_context.BaseContext):
    """A ``multiprocessing`` context whose processes and queues use compatmp's serializer.

    Get one with :func:`compatmp.get_context`. Everything not listed here is the stdlib's
    ``BaseContext`` (``Lock``, ``Event``, ``Manager``, ``Pipe``, ``Value``...), bound to this
    context. ``Pool()`` uses this context's processes and queues, so tasks and results may be
    lambdas and closures.

    Attributes:
        decision (compatmp.Decision): how the start method was chosen, and why.
        Process (type): the process class (a subclass of the stdlib's for this method).
    """

    def __init__(self, method: str, decision: Decision) -> None:
        self._name = method
        self.decision = decision
        self.Process = _PROCESS_CLASSES[method]  # type: ignore[misc]

    def __repr__(self) -> str:
        return f"<compatmp context {self._name!r}>"

    def Queue(self, maxsize: int = 0) -> CompatQueue:
        """A queue whose items are pickled by compatmp (``maxsize`` <= 0: unbounded)."""
        return CompatQueue(maxsize, ctx=self)

    def JoinableQueue(self, maxsize: int = 0) -> CompatJoinableQueue:
        """A joinable queue whose items are pickled by compatmp."""
        return CompatJoinableQueue(maxsize, ctx=self)

    def SimpleQueue(self) -> CompatSimpleQueue:
        """A simple queue whose items are pickled by compatmp."""
        return CompatSimpleQueue(ctx=self)

    def get_context(self, method: str | None = None) -> Any:
        """This context (``method=None``), or compatmp's context for ``method``."""
        return self if method is None else get_context(method)

    def get_start_method(self, allow_none: bool = False) -> str:
        """``"fork"``, ``"forkserver"`` or ``"spawn"``."""
        return self._name

    def set_start_method(self, method: str | None, force: bool = False) -> None:
        """Refused, as for the stdlib's concrete contexts (this one's method is fixed)."""
        raise ValueError(
            f"cannot set the start method of compatmp's {self._name!r} context; call "
            "compatmp.get_context(method) for another one."
        )

    @property  # type: ignore[override]
    def reducer(self) -> Any:
        """The stdlib's ``multiprocessing.reduction`` module (read-only here)."""
        return mp_reduction

    @reducer.setter
    def reducer(self, reduction: Any) -> None:
        raise AttributeError(
            "compatmp's context does not set multiprocessing's reducer: it is global "
            "(BaseContext.reducer writes a global of multiprocessing.context) and would "
            "change every other context in the program."
        )

    def _check_available(self) -> None:
        multiprocessing.get_context(self._name)


def get_context(method: str = "auto") -> CompatContext:
    """A ``multiprocessing`` context that pickles with compatmp's rules.

    Pass it wherever a library takes a context: ``torch.utils.data.DataLoader(...,
    multiprocessing_context=compatmp.get_context())``,
    ``concurrent.futures.ProcessPoolExecutor(mp_context=compatmp.get_context())``,
    ``compatmp.get_context().Pool()``. Its processes receive their target and arguments
    through compatmp's serializer (locks rebuilt unlocked, lambdas and ``__main__`` classes
    by value, the attribute path of anything unpicklable in the error), its spawn and
    forkserver children do not re-run ``__main__``, and its ``Queue``, ``JoinableQueue``,
    ``SimpleQueue`` and ``Pool`` carry lambdas and closures as tasks and results. Nothing
    global changes (NOTE [ A per-context pickler without a global swap ]).

    Args:
        method (str): ``"auto"`` (default): compatmp's decision
            (:func:`compatmp.decide_start_method`, also ``COMPATMP_START_METHOD`` and
            ``multiprocessing.set_start_method``); when that decision is threads (free-threaded
            Python, frozen executable) the process method the rest of the table gives.
            Or ``"fork"``, ``"forkserver"``, ``"spawn"``.

    Returns:
        CompatContext: a ``multiprocessing.context.BaseContext``; ``ctx.decision`` says why.

    Raises:
        compatmp.StartMethodError: ``method`` is unknown or unavailable here, or is
            ``"thread"``/``"ray"`` (no multiprocessing context has them).
    """
    from ._exceptions import StartMethodError

    if method in ("thread", "ray"):
        raise StartMethodError(
            f"get_context(method={method!r}): a multiprocessing context starts processes; "
            f"pass one of {['auto', *CONTEXT_METHODS]}."
        )
    decision = decide_start_method(method)
    if decision.method not in CONTEXT_METHODS:
        # Threads were decided (free-threaded Python, a frozen executable) or
        # COMPATMP_START_METHOD names threads or Ray: a context needs processes.
        facts = decision.facts or PlatformFacts.current()
        chosen = _process_method(facts)
        decision = Decision(
            chosen,
            f"compatmp would use {decision.method!r} ({decision.reason}), which is not a "
            f"process start method; {chosen!r} is {_why(chosen, facts)}.",
            facts,
        )
    return CompatContext(decision.method, decision)


def _process_method(facts: PlatformFacts) -> str:
    """The process start method when compatmp's own choice is threads or Ray."""
    if facts.program_start_method in CONTEXT_METHODS:
        return facts.program_start_method
    method = python_default_method(facts)
    risky = facts.tf_eager_initialized or facts.torch_cuda_initialized or facts.other_threads
    if method == "fork" and risky:
        method = "forkserver" if "forkserver" in facts.available_methods else "spawn"
    return method


def _why(method: str, facts: PlatformFacts) -> str:
    if facts.program_start_method == method:
        return "the program's choice (multiprocessing.set_start_method)"
    if method == python_default_method(facts):
        return "Python's default here"
    return "safe with the threads this process runs"


# ---------------------------------------------------------------------------------------------
# torch DataLoader objects given to compatmp.fit / evaluate / predict
# ---------------------------------------------------------------------------------------------


def _is_torch_dataloader(obj: object) -> bool:
    torch_data = sys.modules.get("torch.utils.data")
    loader = getattr(torch_data, "DataLoader", None)
    return isinstance(loader, type) and isinstance(obj, loader)


def dataloader_with_context(loader: Any, start_method: str = "auto") -> tuple[Any, Any]:
    """A copy of a torch ``DataLoader`` that starts its workers with compatmp's context.

    NOTE [ torch DataLoader in compatmp.fit ]
    Keras 3 iterates a torch ``DataLoader`` itself (``TorchDataLoaderAdapter``), so its worker
    processes are torch's, started with the loader's ``multiprocessing_context`` - by default
    the program's start method, where a dataset holding a lock or a ``__main__`` lambda fails
    under spawn (pytorch/pytorch#51836). compatmp.fit/evaluate/predict hand Keras a shallow
    ``copy.copy`` of a loader that has ``num_workers > 0`` and no context of its own, with
    ``multiprocessing_context=compatmp.get_context(start_method)``: the same decision as
    compatmp's own workers. The user's object is not changed (its dataset, sampler and
    ``collate_fn`` are shared, not copied; its ``_iterator`` is not), and persistent workers
    the copy started are shut down when the call ends. A loader with its own context, or
    ``num_workers=0``, or ``start_method`` "thread"/"ray", is passed on as it is.

    Args:
        loader (torch.utils.data.DataLoader | object): anything; only a ``DataLoader`` with
            workers and no context is copied.
        start_method (str): as for :func:`compatmp.fit` (default: ``"auto"``).

    Returns:
        tuple[object, CompatContext | None]: ``(copy, context)``, or ``(loader, None)`` when
        it is left alone.

    Raises:
        compatmp.StartMethodError: ``start_method`` is unknown or unavailable here.
    """
    import copy

    if not _is_torch_dataloader(loader) or start_method in ("thread", "ray"):
        return loader, None
    if not loader.num_workers or loader.multiprocessing_context is not None:
        return loader, None
    ctx = get_context(start_method)
    clone = copy.copy(loader)
    clone._iterator = None  # the original's persistent workers stay the original's
    clone.multiprocessing_context = ctx  # torch's setter checks isinstance(BaseContext)
    return clone, ctx


def close_dataloader(loader: Any) -> None:
    """Shut down the persistent workers of a loader made by :func:`dataloader_with_context`."""
    iterator = getattr(loader, "_iterator", None)
    loader._iterator = None
    shutdown = getattr(iterator, "_shutdown_workers", None)
    if shutdown is not None:
        shutdown()
