"""Worker processes kept between ``compatmp.fit`` / ``evaluate`` / ``predict`` calls.

NOTE [ Reused workers ]
Why: starting spawn or forkserver workers costs seconds (each imports the dataset's modules,
often Keras and TensorFlow), and the usual script calls ``fit``, then ``evaluate``, then
``predict``; loky keeps a reusable executor for the same reason. So when a Keras wrapper's call
ends normally, its pool is not closed but parked here, idle; the next call with the same
*key* takes it and sends it the new dataset (:meth:`OrderedPool._start_new_call`).

The key - what the workers were started with and cannot change: the start method, the worker
count, the ``worker_init_fn`` object (compared by identity: what an old one did to the process
cannot be undone), whether stall reports are on (stack files), the batch shared-memory
threshold, and this process's pid. ``seed``, ``max_queue_size``, ``timeout`` and the
``stall_timeout`` value are per call and simply set anew.

What a reused worker starts a call with, as a fresh worker would: the new dataset, pickled
again and unpickled (the old dataset object, and anything it changed in itself, is dropped
first; its shared-memory blocks are unlinked), ``random`` and NumPy's global RNG reseeded from
``(seed, worker id)``, per-batch seeds ``(seed, pass, index)`` with passes counted from 0,
``get_worker_info()`` with the new seed, and ``worker_init_fn`` run again (so keep it
idempotent: it runs once per call in each worker, as with fresh workers). What it keeps: its
process (pid), imported modules and module-level globals (including any a dataset or
``worker_init_fn`` set), other libraries' RNG states unless ``worker_init_fn`` reseeds them,
and its own batch shared-memory blocks (reused for the new batches).
While idle, a pool still holds its last call's dataset: each worker's copy and the main-owned
shared-memory blocks of its big buffers (and, through them, the main's arrays), until the next
call replaces it or the pool ends.

Which pools are kept: spawn and forkserver only. A fork worker is a copy of the main process
as it was at the fork (the dataset object inherited, every global the main had): a fresh fork
sees the main's current state, a reused one would not, and a fork starts in milliseconds
anyway. Threads start in microseconds and share everything. Ray actors are not kept (Ray's
lifetime belongs to the user's ``ray.init``/``ray.shutdown``). A call that ended with any
exception (a dataset error, a crash, a timeout, ``KeyboardInterrupt``) closes its pool: a
possibly broken pool is never reused; a kept pool whose workers died while idle is closed at
the next call, which then starts fresh workers.

Exclusive: taking a pool removes it from the cache under a lock, so two calls at once from
two threads never share one; the second starts its own workers. At most one idle pool per key
is kept (a surplus one is closed at once).

Idle expiry: a daemon thread closes each idle pool ``idle_timeout`` seconds after its call
ended (the call's ``idle_timeout=``, else ``COMPATMP_IDLE_TIMEOUT``, else 60 s; 0: never keep
one). :func:`shutdown` closes every idle pool now, and pools still in use when their call ends;
so do interpreter exit (``atexit``) and the pools' own exit hook (``_core``). In a forked child
the cache starts empty (the parent's workers are not the child's).
"""

from __future__ import annotations

import atexit
import math
import os
import threading
import time
from collections.abc import Callable
from typing import Any

from ._args import check_seconds

__all__ = [
    "DEFAULT_IDLE_TIMEOUT",
    "IDLE_TIMEOUT_ENV",
    "Lease",
    "acquire",
    "idle_pools",
    "resolve_idle_timeout",
    "shutdown",
]

#: Seconds an idle pool is kept for the next call (``COMPATMP_IDLE_TIMEOUT`` overrides it).
DEFAULT_IDLE_TIMEOUT = 60.0
IDLE_TIMEOUT_ENV = "COMPATMP_IDLE_TIMEOUT"
#: Start methods whose pools are kept (NOTE [ Reused workers ]).
REUSED_METHODS = ("spawn", "forkserver")

_lock = threading.Lock()
_wake = threading.Condition(_lock)
_idle: dict[tuple, tuple[Any, float, Any]] = {}  # key -> (pool, expiry (monotonic), init fn)
_generation = 0  # bumped by shutdown(): pools taken before it are closed when released
_reaper_running = False  # the expiry thread runs (set and cleared under _lock)


def resolve_idle_timeout(value: float | None) -> float:
    """The idle timeout in seconds for ``value`` (a call's ``idle_timeout=``).

    Args:
        value (float | None): seconds >= 0 (0: do not keep the workers); None: the
            ``COMPATMP_IDLE_TIMEOUT`` environment variable, else :data:`DEFAULT_IDLE_TIMEOUT`.

    Returns:
        float: seconds, finite, >= 0.

    Raises:
        TypeError, ValueError: ``value`` (or the environment variable) is not a finite number
            >= 0.
    """
    if value is None:
        raw = os.environ.get(IDLE_TIMEOUT_ENV, "").strip()
        if not raw:
            return DEFAULT_IDLE_TIMEOUT
        try:
            value = float(raw)
        except ValueError:
            raise ValueError(
                f"{IDLE_TIMEOUT_ENV}={raw!r} is not a number; set it to the seconds idle "
                "workers are kept (e.g. 60), or 0 to never keep them."
            ) from None
        if not math.isfinite(value) or value < 0:
            raise ValueError(
                f"{IDLE_TIMEOUT_ENV}={raw!r}: expected finite seconds >= 0 (0: never keep "
                "idle workers)."
            )
        return value
    return float(check_seconds(value, "idle_timeout", allow_zero=True) or 0.0)


def _key(method: str, workers: int, worker_init_fn: Any, stall_timeout: float | None) -> tuple:
    from . import _batch_blocks

    return (
        method,
        workers,
        id(worker_init_fn),
        bool(stall_timeout),
        _batch_blocks.SHM_THRESHOLD,
        os.getpid(),
    )


class Lease:
    """One call's exclusive use of a pool from :func:`acquire`.

    Forwards what the Keras feeders use (:meth:`imap`, :meth:`update_dataset`,
    :attr:`decision`, :attr:`workers`) until :meth:`close`, then refuses them, so nothing
    left over from a finished call (e.g. a TensorFlow thread) can touch workers another call
    has taken. :meth:`close` keeps the pool for the next call or closes it.

    Attributes:
        pool (OrderedPool): the pool.
        reused (bool): its workers served an earlier call.
        reusable (bool): set False when the call failed: :meth:`close` then closes the pool.
    """

    def __init__(
        self, pool: Any, key: tuple | None, init_fn: Any, idle_timeout: float, reused: bool
    ) -> None:
        self.pool = pool
        self.reused = reused
        self.reusable = True
        self._key = key
        self._init_fn = init_fn
        self._idle_timeout = idle_timeout
        self._generation = _generation
        self._released = False

    @property
    def decision(self) -> Any:
        """The pool's :class:`~compatmp.Decision`."""
        return self.pool.decision

    @property
    def workers(self) -> int:
        """The pool's worker count."""
        return self.pool.workers

    @property
    def closed(self) -> bool:
        """True once this call let go of the pool (or the pool closed)."""
        return self._released or self.pool.closed

    def _live(self) -> Any:
        if self._released:
            raise RuntimeError(
                "compatmp: this fit/evaluate/predict call has ended; its workers may serve "
                "another call now (NOTE [ Reused workers ] in compatmp._reuse)"
            )
        return self.pool

    def imap(self, indices: Any, *, pass_number: int | None = None) -> Any:
        """:meth:`OrderedPool.imap`."""
        return self._live().imap(indices, pass_number=pass_number)

    def update_dataset(self, dataset: Any) -> Any:
        """:meth:`OrderedPool.update_dataset`."""
        return self._live().update_dataset(dataset)

    def close(self) -> None:
        """Let go of the pool: keep it idle for the next call if it may be, else close it;
        idempotent."""
        if self._released:
            return
        self._released = True
        pool = self.pool
        if self.reusable and self._key is not None and not pool.closed:
            with _lock:
                if self._key not in _idle and self._generation == _generation:
                    expiry = time.monotonic() + self._idle_timeout
                    _idle[self._key] = (pool, expiry, self._init_fn)
                    _start_reaper()
                    _wake.notify_all()
                    return
        pool.close()


def acquire(
    dataset: Any,
    *,
    workers: int,
    start_method: str,
    idle_timeout: float,
    max_queue_size: int,
    timeout: float | None,
    worker_init_fn: Callable[[int], Any] | None,
    seed: int | None,
    stall_timeout: float | None,
) -> Lease:
    """A pool for ``dataset``: an idle one with the same key if there is one, else a new one.

    Args:
        dataset (object): the call's dataset (``__len__``/``__getitem__``).
        workers (int): worker count, >= 1.
        start_method (str): as for :class:`~compatmp.OrderedPool`.
        idle_timeout (float): seconds to keep the pool after the call
            (:func:`resolve_idle_timeout`); 0: always a new pool, closed after the call.
        max_queue_size, timeout, worker_init_fn, seed, stall_timeout: as for
            :class:`~compatmp.OrderedPool`.

    Returns:
        Lease: the pool, exclusively the caller's until :meth:`Lease.close`.

    Raises:
        Exception: whatever :class:`~compatmp.OrderedPool` raises for these arguments.
    """
    from ._platform import decide_start_method
    from ._pool import OrderedPool

    options = {
        "max_queue_size": max_queue_size,
        "timeout": timeout,
        "seed": seed,
        "stall_timeout": stall_timeout,
    }
    key = None
    if idle_timeout > 0:
        method = decide_start_method(start_method).method
        if method in REUSED_METHODS:
            key = _key(method, workers, worker_init_fn, stall_timeout)
            pool = _take(key, worker_init_fn)
            if pool is not None:
                try:
                    pool._start_new_call(dataset, **options)
                except Exception:
                    # Died while idle, or this dataset cannot go this way: fresh workers
                    # raise the right error, or fall back to threads, as without reuse.
                    pool.close()
                else:
                    return Lease(pool, key, worker_init_fn, idle_timeout, reused=True)
    pool = OrderedPool(
        dataset,
        workers=workers,
        start_method=start_method,
        worker_init_fn=worker_init_fn,
        **options,
    )
    if pool.decision.method not in REUSED_METHODS:  # e.g. fell back to threads
        key = None
    return Lease(pool, key, worker_init_fn, idle_timeout, reused=False)


def _take(key: tuple, worker_init_fn: Any) -> Any:
    with _lock:
        entry = _idle.get(key)
        if entry is None or entry[2] is not worker_init_fn:
            return None
        del _idle[key]
    pool = entry[0]
    return None if pool.closed else pool


def _start_reaper() -> None:
    """Start the expiry thread if it is not running (caller holds ``_lock``)."""
    global _reaper_running
    if _reaper_running:
        return
    _reaper_running = True
    threading.Thread(target=_reap, name="compatmp-idle-workers", daemon=True).start()


def _reap() -> None:
    """Close idle pools as they expire; end once none is left."""
    global _reaper_running
    while True:
        with _lock:
            while True:
                if not _idle:
                    _reaper_running = False
                    return
                now = time.monotonic()
                expired = [k for k, (_, at, _fn) in _idle.items() if at <= now]
                if expired:
                    pools = [_idle.pop(k)[0] for k in expired]
                    break
                _wake.wait(min(at for _, at, _fn in _idle.values()) - now)
        for pool in pools:
            pool.close()


def idle_pools() -> int:
    """How many pools are idle in the cache now (for tests and diagnostics)."""
    with _lock:
        return len(_idle)


def shutdown() -> int:
    """Stop every worker compatmp kept for the next call, now.

    After ``fit``/``evaluate``/``predict`` the worker processes (spawn and forkserver) stay
    idle for ``idle_timeout`` seconds (default 60, ``COMPATMP_IDLE_TIMEOUT``) so the next call
    reuses them (NOTE [ Reused workers ] in ``compatmp._reuse``). This ends the idle ones, and
    makes calls running now close their workers when they end. Safe to call any time, from
    any thread, any number of times; also runs at interpreter exit.

    Returns:
        int: how many idle pools were closed.
    """
    global _generation
    with _lock:
        _generation += 1
        pools = [entry[0] for entry in _idle.values()]
        _idle.clear()
        _wake.notify_all()
    for pool in pools:
        pool.close()
    return len(pools)


def _forget_in_child() -> None:
    """In a forked child: the parent's idle workers are not ours (``_core`` forgot them)."""
    global _lock, _wake, _reaper_running
    _idle.clear()
    _lock = threading.Lock()
    _wake = threading.Condition(_lock)
    _reaper_running = False


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_in_child)
atexit.register(shutdown)
