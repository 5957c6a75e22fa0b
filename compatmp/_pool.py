"""OrderedPool: the public facade over the running pool, and its argument checks.

The data flow (indices -> workers -> reorder buffer -> batches), the time limits and the
choice of multiprocessing contexts over loky are described at the top of
:mod:`compatmp._core`, which runs the pool. How a worker starts is in :mod:`compatmp._launch`:
NOTE [ Workers do not re-run __main__ ] and NOTE [ Forkserver preload ].
"""

from __future__ import annotations

import collections
import secrets
import sys
import warnings
import weakref
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from ._args import (
    DEFAULT_MAX_QUEUE_SIZE,
    check_int,
    check_max_queue_size,
    check_seconds,
    check_seed,
    check_worker_init_fn,
    check_workers,
)
from ._core import MAIN_POLL_INTERVAL, _Core, _PoolClosed
from ._exceptions import SerializationError, ThreadFallbackWarning
from ._platform import Decision, decide_start_method
from ._serialize import dumps
from ._settle import settle
from ._shared_data import SHARE_THRESHOLD, DatasetSharer, DatasetUpdate
from ._stall import DEFAULT_STALL_TIMEOUT

__all__ = ["OrderedPool"]


def _check_dataset(dataset: Any) -> None:
    cls = type(dataset)
    missing = [m for m in ("__len__", "__getitem__") if not hasattr(cls, m)]
    if missing:
        raise TypeError(
            "dataset must support len() and indexing (__len__ and __getitem__), like a Keras "
            f"PyDataset, a Sequence or a list; got {cls.__module__}.{cls.__qualname__} "
            f"without {' and '.join(missing)}. Wrap generators with a dataset class, or use "
            "compatmp.threadsafe_generator for generator input."
        )


class OrderedPool:
    """Workers computing ``dataset[i]`` ahead of the consumer, yielding batches in order.

    Processes (fork, forkserver or spawn, chosen by :func:`compatmp.decide_start_method`) or
    threads; workers start once, in the constructor, and serve every epoch until
    :meth:`close`. See :mod:`compatmp._core` for the data flow and the reasons behind it.

    Big NumPy arrays (>= 256 KiB, ``compatmp._batch_blocks.SHM_THRESHOLD``) in batches of worker
    processes travel through shared memory and arrive zero-copy: they are writable views of
    the worker's shared-memory block, valid for as long as you hold them (also after
    :meth:`close`). A block is reused once every array viewing it is garbage, so holding many
    batches holds as many blocks in ``/dev/shm``; when that filesystem is nearly full, batches
    travel through the pipe instead. Build big batches with :func:`compatmp.empty` and they
    are born in the block (no copy at all).

    The dataset's own big buffers (>= 1 MiB, ``compatmp._shared_data.SHARE_THRESHOLD``: NumPy
    arrays and anything else pickle protocol 5 hands out as ``PickleBuffer``) go into shared
    memory owned by this process once, and every worker maps them copy-on-write: a worker
    may write into them (as under fork, where the workers inherit the dataset object) and
    the write stays in that worker. The blocks are unlinked when the pool closes, fails or
    is garbage collected.

    Use as a context manager::

        with OrderedPool(dataset, workers=4) as pool:
            for epoch in range(10):
                for batch in pool.imap(range(len(dataset))):
                    ...
                dataset.on_epoch_end()
                pool.update_dataset(dataset)

    Args:
        dataset (object): anything with ``__len__`` and ``__getitem__(i)``: a Keras
            ``PyDataset``/``Sequence``, a plain class, a list. Pickled with
            :func:`compatmp.dumps` for worker processes; if that fails, threads are used
            (one :class:`ThreadFallbackWarning`).
        workers (int): number of workers, >= 1.
        start_method (str): ``"auto"`` (default), ``"fork"``, ``"forkserver"``, ``"spawn"`` or
            ``"thread"``; see :func:`compatmp.decide_start_method`. ``"ray"``: Ray actors as
            workers, on this machine or a cluster (batch arrays are then read-only); see
            :mod:`compatmp._ray` and the README.
        max_queue_size (int): most batches dispatched but not yet yielded (default: 10).
        timeout (float | None): seconds to wait for the next batch in order before
            :class:`WorkerTimeoutError` (default: None, no limit). The clock starts when the
            consumer asks for the batch, or when the worker holding it has finished starting
            (loading the dataset), whichever is later.
        worker_init_fn (Callable[[int], None] | None): called once in each worker with its id,
            after seeding, before the first batch (default: None).
        seed (int | None): base seed (default: None, a fresh random seed per pool). Each
            worker derives its own from ``(seed, worker id)`` and seeds ``random`` and
            ``numpy.random`` (legacy global RNG) with it in worker processes. With an explicit
            seed, worker processes also reseed both before every batch from
            ``(seed, pass, index)``, so the batch for index ``i`` in pass ``p`` is the same
            whatever the worker count or start method; :func:`compatmp.batch_rng` gives a
            ``numpy.random.Generator`` seeded that way, in threads too. A pass is one
            :meth:`imap` call (see its ``pass_number``); NOTE [ Per-batch seeds ] in
            :mod:`compatmp._seeds`.
        stall_timeout (float | None): seconds without a batch, while one is awaited, before
            a WARNING on the ``"compatmp"`` logger names the worker's pid, the index it is
            computing and its Python stack; repeated every ``stall_timeout`` while the wait
            goes on, which it does (``timeout`` ends it). 0 or None disables it (default:
            60). NOTE [ Stall reports ] in :mod:`compatmp._stall`.

    Raises:
        TypeError: ``dataset`` lacks ``__len__``/``__getitem__``; ``worker_init_fn`` is not
            callable; ``workers``, ``max_queue_size`` or ``seed`` is not an ``int``, or
            ``timeout``/``stall_timeout`` not a number (checks in :mod:`compatmp._args`).
        ValueError: ``workers``, ``max_queue_size``, ``timeout``, ``stall_timeout`` or
            ``seed`` is out of range (durations must be finite; ``timeout`` > 0,
            ``stall_timeout`` >= 0).
        StartMethodError: ``start_method`` is unknown or unavailable on this platform.
    """

    def __init__(
        self,
        dataset: Any,
        *,
        workers: int,
        start_method: str = "auto",
        max_queue_size: int = DEFAULT_MAX_QUEUE_SIZE,
        timeout: float | None = None,
        worker_init_fn: Callable[[int], Any] | None = None,
        seed: int | None = None,
        stall_timeout: float | None = DEFAULT_STALL_TIMEOUT,
    ) -> None:
        _check_dataset(dataset)
        self._workers = check_workers(workers)
        self._max_queue_size = check_max_queue_size(max_queue_size)
        self._timeout = check_seconds(timeout, "timeout")
        stall = check_seconds(stall_timeout, "stall_timeout", allow_zero=True) or None
        check_worker_init_fn(worker_init_fn)
        check_seed(seed)
        self._seed = seed if seed is not None else secrets.randbits(64)

        decision = decide_start_method(start_method)
        if decision.facts.daemonic and decision.method == "thread" and start_method != "thread":
            # NOTE [ Start-method decision ] row 1a: a nested pool in a daemonic worker
            warnings.warn(
                f"compatmp: using {workers} worker thread(s) instead of processes, because "
                f"{decision.reason} Pass start_method='thread' to silence this, or create "
                "the pool in the main process to use processes.",
                ThreadFallbackWarning,
                stacklevel=2,
            )
        settle(dataset)  # NOTE [ Settling a dataset ]: lazy random state drawn here, once
        dataset_payload: Any = dataset
        init_payload: Any = worker_init_fn
        # NOTE [ Shared dataset buffers ] (compatmp._shared_data): big buffers go to shared
        # memory once; under fork the workers inherit the object itself.
        self._sharer: DatasetSharer | None = None
        if decision.uses_processes:
            try:
                # Ray actors may run on other machines, which cannot map this one's shared
                # memory: every buffer stays in the pickle, which Ray's object store holds
                # once per node for all actors there (NOTE [ Ray workers ] in _ray).
                threshold = sys.maxsize if decision.method == "ray" else SHARE_THRESHOLD
                sharer = DatasetSharer(threshold, inherit=decision.method == "fork")
                sharer.check(dataset)
                if worker_init_fn is not None:
                    init_payload = dumps(worker_init_fn, root="worker_init_fn")
            except SerializationError as exc:
                what = "; ".join(f"{u.path}: {u.error}" for u in exc.unpicklable)
                decision = Decision(
                    "thread",
                    "the dataset cannot be pickled for worker processes "
                    f"({what or str(exc).splitlines()[0]}), so threads share it instead.",
                    decision.facts,
                )
                warnings.warn(
                    f"compatmp: using {workers} worker thread(s) instead of processes, because "
                    f"{exc}",
                    ThreadFallbackWarning,
                    stacklevel=2,
                )
                dataset_payload, init_payload = dataset, worker_init_fn
            else:
                self._sharer = sharer
        self._decision = decision
        self._worker_init_fn = worker_init_fn
        self._dataset = None if decision.uses_processes else dataset
        self._active: weakref.ref | None = None
        self._core = _Core(
            decision.method,
            self._workers,
            dataset_payload,
            init_payload,
            self._seed,
            sharer=self._sharer,
            seed_batches=seed is not None,
            stall_timeout=stall,
        )
        self._passes = 0  # imap() calls so far: the default pass number of the next one
        self._finalizer = weakref.finalize(self, self._core.close, "the pool was garbage collected")

    # -- properties ----------------------------------------------------------------------------

    @property
    def decision(self) -> Decision:
        """How the workers run (``method``: fork, forkserver, spawn or thread) and why."""
        return self._decision

    @property
    def workers(self) -> int:
        """Number of workers."""
        return self._workers

    @property
    def closed(self) -> bool:
        """True once :meth:`close` ran (also after an error shut the pool down)."""
        return self._core.closed

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        return f"<OrderedPool method={self._decision.method} workers={self._workers} {state}>"

    # -- context manager and shutdown ----------------------------------------------------------

    def __enter__(self) -> OrderedPool:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop every worker and unlink every shared-memory block; idempotent.

        Workers get 1 s (:data:`compatmp._core.SHUTDOWN_TIMEOUT`) to finish the batch they
        hold, then are terminated, then killed. Results not yet consumed are dropped. Also
        runs when the pool is garbage collected and at interpreter exit. A worker *thread*
        busy in ``dataset[i]`` cannot be stopped: it ends after that batch.
        """
        # A running imap is not closed here: resumed, it raises RuntimeError (it must not end
        # quietly as if complete when another thread closed the pool half-way).
        self._finalizer()

    def _check_open(self) -> None:
        if self._core.closed:
            raise RuntimeError(
                f"this OrderedPool is closed ({self._core.close_reason}); create a new one"
            )

    # -- iteration -----------------------------------------------------------------------------

    def imap(self, indices: Iterable[Any], *, pass_number: int | None = None) -> Iterator[Any]:
        """Yield ``dataset[i]`` for each ``i`` in ``indices``, in that order.

        Up to ``max_queue_size`` batches are computed ahead by the workers. Starting a new
        ``imap`` abandons an unfinished previous one (its pending batches are discarded; it
        ends, as if exhausted, when next resumed). Calling ``imap`` while another thread is
        inside the previous one's ``next()`` is refused (RuntimeError). If the consumer stops
        early, pending batches are discarded and the pool stays usable. If the pool is closed
        (e.g. by another thread) before the iteration is complete, the next ``next()`` raises
        RuntimeError instead of ending quietly.

        Args:
            indices (Iterable): batch indices (small picklable objects, usually ints).
            pass_number (int | None): the pass these batches belong to, for per-batch seeds
                (NOTE [ Per-batch seeds ] in :mod:`compatmp._seeds`), e.g. the epoch
                (default: None, one more than the previous ``imap``'s pass; 0 for the
                first ``imap`` of the pool, so 0, 1, 2, ... for one ``imap`` per epoch).

        Returns:
            Iterator: the batches, in the order of ``indices``.

        Raises:
            RuntimeError: the pool is closed (also when closed during the iteration), or
                another thread is inside a previous ``imap`` of this pool.
            Exception: whatever ``dataset[i]`` raised in a worker, same type, with the
                worker's traceback as ``__cause__`` (a RuntimeError if the type cannot be
                pickled). The pool is shut down first.
            WorkerCrashedError: a worker process died (pid, exit code or signal, index).
            WorkerTimeoutError: a batch took longer than ``timeout`` seconds.
        """
        self._check_open()
        if pass_number is not None:
            check_int(pass_number, "pass_number", 0, "Or pass None to count imap() calls.")
        previous = self._active() if self._active is not None else None
        if previous is not None:
            refusal = RuntimeError(
                "OrderedPool.imap() was called while another imap() of this pool is running "
                "in another thread; one pool serves one stream at a time. Use one pool per "
                "thread, or guard the pool with a lock."
            )
            if previous.gi_running:
                raise refusal
            try:
                previous.close()
            except ValueError as exc:  # "generator already executing": it just started
                raise refusal from exc
        if pass_number is None:
            pass_number = self._passes
        self._passes = max(self._passes, pass_number) + 1
        gen = self._imap(iter(indices), pass_number)
        self._active = weakref.ref(gen)
        return gen

    def _imap(self, it: Iterator[Any], pass_number: int) -> Iterator[Any]:
        core = self._core
        mine: collections.deque[int] = collections.deque()
        exhausted = False
        try:
            while True:
                while (
                    not exhausted
                    and len(mine) + core.in_flight_orphans() < self._max_queue_size
                    and core.can_dispatch()
                ):
                    try:
                        index = next(it)
                    except StopIteration:
                        exhausted = True
                        break
                    try:
                        mine.append(core.dispatch(index, pass_number))
                    except _PoolClosed:
                        self._closed_while_running(len(mine) + 1)
                if not mine:
                    if exhausted:
                        return
                    try:
                        core.pump(MAIN_POLL_INTERVAL)  # every worker is full of orphans
                    except _PoolClosed:
                        self._closed_while_running(0)
                    continue
                try:
                    batch = core.wait_for(mine[0], self._timeout)
                except _PoolClosed:
                    self._closed_while_running(len(mine))
                mine.popleft()
                yield batch
        except GeneratorExit:
            raise
        except BaseException as exc:
            core.close(f"it was shut down after {type(exc).__name__}")
            raise
        finally:
            core.forget(mine)

    def _closed_while_running(self, pending: int) -> None:
        raise RuntimeError(
            f"the OrderedPool was closed while imap() was running ({self._core.close_reason}); "
            f"{pending} requested batch(es) and any later indices were not delivered. Close "
            "the pool only after the iteration, or stop iterating first."
        )

    # -- dataset state -------------------------------------------------------------------------

    def update_dataset(self, dataset: Any) -> DatasetUpdate:
        """Send the dataset's current state to every worker, unless it did not change.

        Call after ``on_epoch_end`` (which may reshuffle or relabel). Waits until every worker
        has the new state, so batches requested afterwards see it, exactly: process workers
        get the small pickle again (skipped when byte-identical) and every big buffer
        (>= 1 MiB, e.g. NumPy arrays, in shared memory) is compared with the copy the
        workers have, byte for byte, so even one element written in place is sent; only the
        changed 256 KiB pieces are copied (NOTE [ Shared dataset buffers ] in
        ``compatmp._shared_data``). The comparison reads every big buffer once (~0.1 s per
        GiB here). Worker threads share the object, so nothing is sent when it is the same
        object.

        Args:
            dataset (object): the dataset, usually the same object mutated in place.

        Returns:
            DatasetUpdate: true when a new state was sent; its fields say how much (pickle
            bytes, big buffers, changed buffers, bytes copied into shared memory).

        Raises:
            RuntimeError: the pool is closed.
            TypeError: ``dataset`` lacks ``__len__``/``__getitem__``.
            SerializationError: (process workers) the dataset can no longer be pickled; the
                pool stays usable with the previous state.
            WorkerCrashedError, WorkerTimeoutError: as in :meth:`imap` (``timeout`` bounds
                the wait for the batches in flight and for the workers' acknowledgement);
                the pool is shut down.
            OSError: the system refused a shared-memory block; the pool is shut down.
        """
        self._check_open()
        _check_dataset(dataset)
        settle(dataset)  # NOTE [ Settling a dataset ]
        if self._sharer is None:
            if dataset is self._dataset:
                return DatasetUpdate(False)
            self._broadcast(dataset)
            self._dataset = dataset
            return DatasetUpdate(True)
        sharer, core = self._sharer, self._core
        try:
            # Blocks are rewritten only once no worker computes a batch (never a mix).
            update = sharer.update(dataset, when_idle=lambda: core.wait_idle(self._timeout))
        except SerializationError:
            raise  # nothing was written: the workers keep the previous state
        except BaseException as exc:
            core.close(f"it was shut down after {type(exc).__name__}")
            raise
        if update is None:
            return DatasetUpdate(False)
        self._broadcast(update.payload)
        sharer.commit(update)
        return update.report

    def _start_new_call(
        self,
        dataset: Any,
        *,
        seed: int | None,
        max_queue_size: int,
        timeout: float | None,
        stall_timeout: float | None,
    ) -> None:
        """Private (the Keras wrappers' pool cache): serve a new call with these workers.

        The workers drop the old dataset, get ``dataset`` as a fresh pool's would (settled,
        pickled again, big buffers in new shared-memory blocks; the old blocks are unlinked),
        are reseeded from the new ``seed`` and run ``worker_init_fn`` again; pass numbers
        restart at 0. NOTE [ Reused workers ] in :mod:`compatmp._reuse`. Process pools that
        own their dataset by value only (spawn, forkserver).

        Args:
            dataset (object): the new call's dataset.
            seed (int | None): the new call's seed (None: a fresh one).
            max_queue_size (int): batches ahead, as in the constructor.
            timeout (float | None): seconds, as in the constructor; also bounds this exchange.
            stall_timeout (float | None): seconds, as in the constructor (0/None: off; only
                on or off as the pool was started).

        Raises:
            RuntimeError: the pool is closed, busy in another thread, or not a spawn or
                forkserver pool.
            SerializationError: ``dataset`` cannot be pickled; the pool is unchanged.
            Exception: a worker failed to load ``dataset`` or died (the pool is closed).
        """
        self._check_open()
        if self._sharer is None or self._decision.method not in ("spawn", "forkserver"):
            raise RuntimeError(f"compatmp: {self!r} cannot be reused for another call")
        _check_dataset(dataset)
        check_seed(seed)
        previous = self._active() if self._active is not None else None
        if previous is not None:
            if previous.gi_running:
                raise RuntimeError("compatmp: a reused pool is still iterated by a thread")
            previous.close()  # its pending batches are dropped
        self._active = None
        settle(dataset)  # NOTE [ Settling a dataset ]
        sharer = DatasetSharer(SHARE_THRESHOLD)
        sharer.check(dataset)  # SerializationError: nothing changed
        init_fn = self._worker_init_fn
        init_payload = dumps(init_fn, root="worker_init_fn") if init_fn is not None else None
        new_seed = seed if seed is not None else secrets.randbits(64)
        core = self._core
        try:
            core.wait_idle(timeout)
            payload = sharer.start(core.shm_prefix, dataset)
            reset = (new_seed, seed is not None, init_payload)
            core.broadcast_dataset(payload, timeout, reset=reset)
        except BaseException as exc:
            sharer.close()
            core.close(f"it was shut down after {type(exc).__name__} while reused")
            raise
        old, self._sharer, core.sharer = self._sharer, sharer, sharer
        old.close()  # the workers dropped the old dataset: its blocks go
        core.seed_batches = seed is not None
        core.stall_timeout = stall_timeout or None
        self._seed = new_seed
        self._passes = 0
        self._max_queue_size = max_queue_size
        self._timeout = timeout

    def _broadcast(self, payload: Any) -> None:
        try:
            self._core.broadcast_dataset(payload, self._timeout)
        except BaseException as exc:
            self._core.close(f"it was shut down after {type(exc).__name__}")
            raise
