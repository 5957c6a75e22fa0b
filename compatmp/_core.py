"""The running pool: dispatch, reorder, failures, shutdown (the main side of the workers).

:class:`compatmp.OrderedPool` (:mod:`compatmp._pool`) is a thin facade over :class:`_Core`.
The core drives its workers through one interface, NOTE [ Worker transports ]
(:mod:`compatmp._transport`), implemented by :mod:`compatmp._processes`, :mod:`compatmp._threads`
and :mod:`compatmp._ray`; it never asks which one it has. It keeps one record per task
(NOTE [ Task records ], :mod:`compatmp._tasks`). What a worker does is :mod:`compatmp._worker`'s.

Data flow (one pool, ``workers=3``; ``imap`` runs in the consumer's thread, no helper thread)::

                             main process                          |   worker processes
                                                                   |   (or worker threads)
  indices ---> imap() --dispatch--> least-loaded worker            |
                  (a task record per send_idx: _tasks.TaskTable)   |
     (at most max_queue_size        ("task", send_idx, index, pass) ---> worker_main loop 0
      dispatched and not yet                                       |     dataset[index]
      yielded)                                                     |     big arrays -> its
                                                                   |      SharedMemory blocks
                  +-- transport.wait(0.1 s)  <-------------------------- ("ok", send_idx, batch,
                  |   (processes: pipes + sentinels; threads: one  |      dropped), ("err", ...)
                  |    condition; Ray: ray.wait on replies)        |
                  |     message  -> view each block (zero-copy)    |
                  |                 record: done, with its blocks; |
                  |     consumer dropped the batch's arrays:       |
                  |                 ("release", send_idx) ---------->  blocks reusable
                  |     sentinel -> WorkerCrashedError (pid, code, |   worker_main loop 1
                  |                 index it held)                 |   worker_main loop 2
                  |     nothing  -> timeout? WorkerTimeoutError    |
                  v                                                |
         reorder buffer: the done records --> yield batches        |
                                             in the given order    |
  update_dataset(ds) --("dataset", version, bytes) to EVERY worker --> replace dataset,
                      (skipped when the pickled bytes are unchanged) |  ("updated", version)
  close() --("stop",)--> transport.shutdown: processes: join 1 s -->  |   unlink own blocks, exit
          SIGTERM, 1 s --> SIGKILL, sweep /dev/shm for the pool's prefix; threads: join;
          Ray: kill the actors

Measured on the shared 2-core Linux box this was written on (Python 3.11, median of 40), one
worker, a 32x224x224x3 float32 batch (19.3 MB) the dataset already holds in memory:
threads 0.03-0.08 ms per batch (nothing is copied), processes through shared memory 4-5 ms
(fork 4.9, forkserver 4.1, spawn 4.4), processes through the pipe 31-49 ms. Start-up until
every worker is ready, 2 workers: threads 2-12 ms, fork 30-70 ms, forkserver 275 ms for the
first pool (the server starts) and 28 ms after, spawn 450-680 ms (each worker imports NumPy and
compatmp). With a main script that imports TensorFlow at the top, spawn workers took 5.5-6.1 s
before NOTE [ Workers do not re-run __main__ ] and 0.45-0.49 s after.

NOTE [ Why multiprocessing contexts, not loky ]
loky (joblib's executor) brings cloudpickle, crash detection and spawn workers that skip
``__main__``. But an executor hands each task to *some* worker, and compatmp must reach *every*
worker with new dataset state after ``on_epoch_end`` (a reshuffle): with an executor that means
pickling the dataset into every task or re-creating the executor every epoch, which is what
Keras does and what makes it slow. A pool with one duplex pipe per worker (this module) can
address each worker; crash detection is loky's own technique (wait on the pipes and every
worker's sentinel together), and skipping ``__main__`` takes one small hook
(NOTE [ Workers do not re-run __main__ ] in :mod:`compatmp._launch`). The stdlib also keeps
the process layer free of a pinned third-party backend. The worker protocol (compatmp._worker,
NOTE [ Worker protocol ]) has nothing multiprocessing-specific: the Ray transport
(compatmp._ray) carries it unchanged.

NOTE [ Time limits ]
Every wait is bounded; see the interval constants below. A batch error, crash or timeout
shuts the pool down (all workers gone, all shared memory unlinked) before the error is raised.
"""

from __future__ import annotations

import atexit
import collections
import os
import threading
import time
import weakref
from collections.abc import Iterable
from typing import Any

from . import _shm, _stall, _tasks, _worker
from ._exceptions import WorkerCrashedError, WorkerTimeoutError
from ._processes import KILL_TIMEOUT, TERMINATE_TIMEOUT, ProcessTransport
from ._ray import RayTransport
from ._threads import ThreadTransport
from ._transport import Transport, WorkerHandle

__all__ = [
    "KILL_TIMEOUT",
    "MAIN_POLL_INTERVAL",
    "MAX_TASKS_PER_WORKER",
    "SHUTDOWN_TIMEOUT",
    "TERMINATE_TIMEOUT",
]

# How long the main side waits for a message before re-checking deadlines and thread
# liveness (seconds). Messages and process deaths (sentinels) wake the wait immediately; this
# only bounds how late a per-batch ``timeout`` or a vanished worker *thread* is noticed.
MAIN_POLL_INTERVAL = 0.1

# After "stop", how long close() lets workers finish the batch they are computing (seconds)
# before SIGTERM. Long enough for an ordinary batch and to drain the pipes, short enough that
# Ctrl-C feels immediate; torch's equivalent (MP_STATUS_CHECK_INTERVAL) is 5 s.
SHUTDOWN_TIMEOUT = 1.0

# Most tasks one worker may have queued. A task message is ~50 bytes; 64 of them stay far
# below the smallest socketpair buffer we know (8 KiB on macOS), so sending a task never blocks
# on a worker that is itself blocked sending a big result back (a deadlock otherwise).
MAX_TASKS_PER_WORKER = 64

# The transport of each start method (NOTE [ Worker transports ] in compatmp._transport). Ray
# is only imported when a Ray transport starts.
TRANSPORTS: dict[str, type[Transport]] = {
    "fork": ProcessTransport,
    "forkserver": ProcessTransport,
    "spawn": ProcessTransport,
    "thread": ThreadTransport,
    "ray": RayTransport,
}


class _PoolClosed(Exception):
    """The pool was closed (by another thread, or by GC) while we were using it."""


class _Failure:
    """An error to raise when the consumer reaches this position."""

    __slots__ = ("exc",)

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


# ---------------------------------------------------------------------------------------------
# The core: everything close() needs, with no reference back to the OrderedPool facade, so
# the facade can be garbage collected (weakref.finalize) while the core shuts down.
# ---------------------------------------------------------------------------------------------

_live_cores: weakref.WeakSet = weakref.WeakSet()


class _Core:
    """One pool's workers and everything in flight; the constructor starts the workers.

    Args:
        method (str): a start method (``"fork"``, ``"forkserver"``, ``"spawn"``), ``"thread"``
            or ``"ray"``: picks the transport (:data:`TRANSPORTS`).
        workers (int): how many workers.
        dataset_payload (object): the dataset as the transport carries it: what
            :mod:`compatmp._shared_data` made of it for processes and Ray (pickled bytes with
            big buffers in shared memory), the object itself for threads.
        init_payload (object): ``worker_init_fn`` in the same form, or None.
        base_seed (int): the pool's seed (:func:`compatmp._worker.derive_seed`).
        sharer (compatmp._shared_data.DatasetSharer | None): the dataset's main-owned blocks.
        seed_batches (bool): reseed global RNGs per batch (NOTE [ Per-batch seeds ]).
        stall_timeout (float | None): seconds without a batch before a stall report.

    Raises:
        ValueError: ``method`` names no transport.
        Exception: whatever starting the workers raised; the pool is closed first.
    """

    def __init__(
        self,
        method: str,
        workers: int,
        dataset_payload: Any,
        init_payload: Any,
        base_seed: int,
        *,
        sharer: Any = None,
        seed_batches: bool = False,
        stall_timeout: float | None = None,
    ) -> None:
        try:
            transport_class = TRANSPORTS[method]
        except KeyError:
            raise ValueError(
                f"compatmp: no worker transport for start method {method!r}; valid: "
                f"{sorted(TRANSPORTS)}"
            ) from None
        self.method = method
        self.sharer = sharer  # _shared_data.DatasetSharer: the dataset's blocks (main-owned)
        self.seed_batches = seed_batches
        self.stall_timeout = stall_timeout
        self.num_workers = workers
        self.tasks = _tasks.TaskTable()  # NOTE [ Task records ]
        self.next_send_idx = 0
        self.closed = False
        self.close_reason: str | None = None
        self.version = 0
        self.rr = 0
        # Zero-copy batches: views of the workers' blocks, released when the consumer drops
        # them. Finalizers run in any thread and only append to the deque; the pump turns
        # them into releases (NOTE [ Shared-memory ownership ] in _shm).
        self.released: collections.deque[int] = collections.deque()
        self.attachments = _shm.Attachments(self.released.append)
        # Held while talking to the workers (pump, dispatch, close): close() may come from
        # another thread while a consumer thread waits for a batch; it then waits for that
        # thread's current wait to end (<= MAIN_POLL_INTERVAL) instead of racing on the pipes.
        self.io_lock = threading.RLock()
        self.transport: Transport = transport_class(method, stall_timeout)
        _live_cores.add(self)
        try:
            if sharer is not None:  # NOTE [ Shared dataset buffers ] in _shared_data
                dataset_payload = sharer.start(self.transport.shm_prefix, dataset_payload)
        except BaseException:
            self.close("start-up failed")
            raise
        self._start(dataset_payload, init_payload, base_seed)

    @property
    def handles(self) -> list[WorkerHandle]:
        """One handle per worker (index = worker id)."""
        return self.transport.handles

    @property
    def shm_prefix(self) -> str | None:
        """Name prefix of the workers' shared-memory blocks (None: the transport has none)."""
        return self.transport.shm_prefix

    # -- start-up ------------------------------------------------------------------------------

    def _start(self, dataset: Any, init_fn: Any, base_seed: int) -> None:
        configs = [
            _worker.WorkerConfig(
                worker_id=i,
                num_workers=self.num_workers,
                base_seed=base_seed,
                dataset=dataset,
                init_fn=init_fn,
                main_pid=os.getpid(),
                shm_threshold=_shm.SHM_THRESHOLD,  # read now: benchmarks and tests patch it
                seed_batches=self.seed_batches,
            )
            for i in range(self.num_workers)
        ]
        try:
            self.transport.start(configs)
        except BaseException:
            self.close("start-up failed")
            raise

    # -- dispatch ------------------------------------------------------------------------------

    def can_dispatch(self) -> bool:
        return any(self.tasks.load(h.id) < MAX_TASKS_PER_WORKER for h in self.handles)

    def dispatch(self, index: Any, pass_number: int = 0) -> int:
        with self.io_lock:
            if self.closed:
                raise _PoolClosed
            return self._dispatch(index, pass_number)

    def _dispatch(self, index: Any, pass_number: int = 0) -> int:
        handles = self.handles
        n = len(handles)
        order = [handles[(self.rr + k) % n] for k in range(n)]
        handle = min(order, key=lambda h: self.tasks.load(h.id))
        self.rr = (handle.id + 1) % n
        send_idx = self.next_send_idx
        self.next_send_idx += 1
        try:
            handle.send((_worker.TASK, send_idx, index, pass_number))
        except (EOFError, OSError):
            self._send_failed(handle)
            raise
        except Exception as exc:  # nothing was written: the index cannot be pickled
            raise TypeError(
                f"batch index {index!r} cannot be sent to worker processes "
                f"({type(exc).__name__}: {exc}); use small picklable indices such as ints"
            ) from exc
        self.tasks.add(send_idx, index, pass_number, handle.id)
        return send_idx

    def _send(self, handle: WorkerHandle, msg: tuple) -> None:
        try:
            handle.send(msg)
        except (EOFError, OSError):
            self._send_failed(handle)
            raise

    def _send_failed(self, handle: WorkerHandle) -> None:
        # The worker is gone or going: report how it died if it did.
        handle.wait_for_exit(SHUTDOWN_TIMEOUT)
        self._raise_if_dead([handle])

    # -- receiving -----------------------------------------------------------------------------

    def pump(self, timeout: float) -> None:
        """Receive what arrives within ``timeout`` seconds; raise on crash or fatal error."""
        with self.io_lock:
            if self.closed:
                raise _PoolClosed
            self._send_releases()
            live = [h for h in self.handles if not h.stopping]
            readable, dead = self.transport.wait(live, timeout)
            for h in readable:
                self._drain(h)
            if dead:
                self._raise_if_dead(dead)

    def _send_releases(self) -> None:
        """Tell workers which batches the consumer has let go of (their blocks are free)."""
        while self.released:
            task = self.tasks.release(self.released.popleft())
            if task is None:
                continue
            handle = self.handles[task.worker]
            if handle.stopping:
                continue
            try:
                handle.send((_worker.RELEASE, task.send_idx))
            except (EOFError, OSError):
                pass  # the worker is gone; its death is reported by the transport's wait

    def _drain(self, handle: WorkerHandle) -> None:
        for msg in handle.receive():
            self._on_message(handle, msg)

    def _on_message(self, handle: WorkerHandle, msg: tuple) -> None:
        kind = msg[0]
        if kind == _worker.OK:
            send_idx, batch, dropped = msg[1], msg[2], msg[3]
            if dropped:
                self.attachments.drop(dropped)  # before any later block of this worker
            if self.closed:
                self.tasks.discard(send_idx)  # the worker unlinks its blocks as it exits
                return
            # NOTE [ Shared-memory ownership ]: the batch's blocks stay the worker's; they are
            # released when the consumer has dropped every array viewing them.
            blocks = self.transport.blocks_of(batch)
            make = (lambda: self._view(batch, send_idx)) if blocks else (lambda: batch)
            if self.tasks.complete(send_idx, blocks, make):
                self.released.append(send_idx)  # an orphan's blocks: never viewed
        elif kind == _worker.ERR:
            send_idx = msg[1]
            exc = self.transport.rebuild_exception(msg)
            if send_idx is None:  # start-up or dataset update failed: the pool is unusable
                if self.closed:
                    return
                raise exc
            if self.closed:
                self.tasks.discard(send_idx)
                return
            self.tasks.complete(send_idx, (), lambda: _Failure(exc))
        elif kind == _worker.READY:
            handle.ready = True
            handle.on_ready()
        elif kind == _worker.UPDATED:
            handle.version = max(handle.version, msg[1])
        else:  # pragma: no cover - protocol bug
            raise RuntimeError(f"compatmp: unknown message from worker {handle.id}: {kind!r}")

    def _view(self, batch: Any, send_idx: int) -> Any:
        try:
            return self.attachments.view(batch, send_idx)
        except Exception as exc:
            return _Failure(exc)

    def _raise_if_dead(self, handles: list[WorkerHandle]) -> None:
        for h in handles:
            if h.stopping or h.is_alive():
                continue
            self._drain(h)  # what it sent before dying is valid
            code = h.exitcode(MAIN_POLL_INTERVAL)
            task = self.tasks.head(h.id)
            index = task.index if task is not None else None
            if task is not None:
                holding = f"while computing the batch at index {index!r}"
            elif not h.ready:
                holding = (
                    "while starting, before it could load the dataset (its traceback, if any, "
                    "is on stderr above; often a module the dataset needs cannot be imported "
                    "in a fresh process)"
                )
            else:
                holding = "while idle (holding no batch)"
            who, how = h.describe_death(code)
            raise WorkerCrashedError(
                f"compatmp {who} {how} {holding}. The pool has been shut "
                "down; create a new one to continue. If dataset[i] crashes in native code or "
                "runs out of memory, try it in the main process (workers=1, "
                "start_method='thread') to see the error.",
                pid=h.pid,
                exitcode=code,
                index=index,
            )

    # -- waiting for one result ----------------------------------------------------------------

    def wait_for(self, send_idx: int, timeout: float | None) -> Any:
        started = time.monotonic()
        deadline = None if timeout is None else started + timeout
        stall_at = started + self.stall_timeout if self.stall_timeout else None
        while True:
            with self.io_lock:
                if self.closed:
                    raise _PoolClosed
                task = self.tasks.get(send_idx)
                if task is not None and task.state == _tasks.DONE:
                    result = self.tasks.take(send_idx)
                    if isinstance(result, _Failure):
                        raise result.exc
                    return result
                wait = MAIN_POLL_INTERVAL
                if deadline is not None and not self.handles[task.worker].ready:
                    # The per-batch timeout starts once the worker holding the batch is ready:
                    # a spawn worker's start-up (~0.5 s, more on a loaded machine) is not the
                    # batch being slow. A worker that dies while starting is caught by the
                    # transport's wait, not by this clock.
                    deadline = time.monotonic() + timeout
                if deadline is not None:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise self._timeout_error(send_idx, timeout)
                    wait = min(wait, left)
                if stall_at is not None and time.monotonic() >= stall_at:
                    self._report_stall(send_idx, time.monotonic() - started)
                    stall_at = time.monotonic() + self.stall_timeout
                self.pump(wait)

    def _report_stall(self, send_idx: int, waited: float) -> None:
        """Log who holds the awaited batch and where it is stuck (NOTE [ Stall reports ])."""
        task = self.tasks.get(send_idx)
        handle = self.handles[task.worker]
        head = self.tasks.head(handle.id)
        holding = head.index if head is not None else task.index
        _stall.report(handle.stall_label(), waited, task.index, holding, handle.stack())

    def _timeout_error(self, send_idx: int, timeout: float | None) -> WorkerTimeoutError:
        task = self.tasks.get(send_idx)
        who = self.handles[task.worker].label()
        return WorkerTimeoutError(
            f"the batch at index {task.index!r} took longer than timeout={timeout} s ({who}). "
            "The pool has been shut down. Raise timeout=, or pass timeout=None to wait without "
            "limit.",
            index=task.index,
            timeout=timeout,
        )

    def forget(self, send_idxs: Iterable[int]) -> None:
        """The consumer will not read these: drop buffered results, orphan pending ones."""
        self.tasks.forget(send_idxs)

    def in_flight_orphans(self) -> int:
        return self.tasks.orphans()

    # -- dataset updates -----------------------------------------------------------------------

    def wait_idle(self, timeout: float | None) -> None:
        """Wait until no worker holds a task (orphans included), e.g. before the dataset's
        blocks are rewritten (NOTE [ Shared dataset buffers ] in _shared_data).

        Raises:
            WorkerTimeoutError: still busy after ``timeout`` seconds (None: no limit).
            WorkerCrashedError: a worker died meanwhile.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while any(self.tasks.load(h.id) for h in self.handles):
            self._pump_until(deadline, "to finish their batches before the dataset update")

    def broadcast_dataset(self, payload: Any, timeout: float | None, reset: tuple = ()) -> None:
        """Send every worker ``payload`` as its dataset and wait for all acknowledgements.

        Args:
            payload (object): the dataset as the transport carries it.
            timeout (float | None): seconds for the whole exchange (None: no limit).
            reset (tuple): empty, or ``(base_seed, seed_batches, init_payload)`` for reused
                workers starting a new call (NOTE [ Reused workers ] in _reuse).
        """
        self.version += 1
        version = self.version
        deadline = None if timeout is None else time.monotonic() + timeout
        for h in self.handles:
            # A busy worker may be blocked sending a big result; let it finish first, so our
            # (possibly big) send cannot deadlock against it.
            while self.tasks.load(h.id):
                self._pump_until(deadline, "to finish its batches before the dataset update")
            self._send(h, (_worker.DATASET, version, payload, *reset))
        while any(h.version < version for h in self.handles):
            self._pump_until(deadline, "to acknowledge the dataset update")

    def _pump_until(self, deadline: float | None, what: str) -> None:
        wait = MAIN_POLL_INTERVAL
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise WorkerTimeoutError(
                    f"workers took longer than the pool's timeout {what}. The pool has been "
                    "shut down.",
                    timeout=None,
                )
            wait = min(wait, left)
        self.pump(wait)

    # -- shutdown ------------------------------------------------------------------------------

    def close(self, reason: str = "close() was called") -> None:
        with self.io_lock:
            if self.closed:
                return
            self.closed = True
            self.close_reason = reason
            _live_cores.discard(self)
            try:
                self._shutdown()
            finally:
                self.tasks.clear()

    def _shutdown(self) -> None:
        for h in self.handles:
            h.stopping = True
            try:
                h.send((_worker.STOP,))
            except Exception:
                pass
        self.transport.shutdown(time.monotonic() + SHUTDOWN_TIMEOUT, self._drain_quietly)
        self.attachments.close()  # arrays the consumer still holds stay valid
        self.released.clear()
        if self.sharer is not None:  # Ray too: the sharer's bookkeeping, no blocks there
            self.sharer.close()  # the dataset's blocks: workers are gone
        self.transport.sweep()  # what workers killed mid-batch left behind

    def _drain_quietly(self, handle: WorkerHandle) -> None:
        """Receive and discard (unlinking shared memory) whatever ``handle`` sent."""
        try:
            self._drain(handle)
        except Exception:
            pass

    def forget_in_child(self) -> None:
        """In a forked child: close inherited main-side pipe ends, never touch the workers."""
        self.closed = True
        self.transport.forget_in_child()


def _after_fork_in_child() -> None:
    # NOTE: a forked worker must not keep the main side of its siblings' pipes open, or a
    # sibling would never see EOF when the main process dies.
    for core in list(_live_cores):
        core.forget_in_child()
    _live_cores.clear()


def _close_all_at_exit() -> None:
    for core in list(_live_cores):
        core.close("the interpreter is exiting")


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
# Registered after multiprocessing.util's own exit hook (imported above), so it runs first:
# our workers are stopped and their shared memory unlinked before multiprocessing terminates
# daemonic children.
atexit.register(_close_all_at_exit)
