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
The pool's ``timeout`` is per batch: waiting for one batch (:meth:`_Core.wait_for`), the
clock starts when the worker holding it is ready; waiting for several workers (the batches
in flight before a dataset update, the acknowledgements: :class:`_ProgressClock`) it bounds
the time *without progress*, restarting whenever a batch finishes, a worker acknowledges or
reports ready. A whole-wait deadline failed an update behind three prefetched 1 s batches
with ``timeout=2.5`` (issue 17). Prefetched batches orphaned (the consumer stopped early, as
before an update) that a worker has not started are not waited for: a worker thread's are
taken back (``Transport.withdraw``), a process worker skips them (``("skip", send_idxs)``,
read ahead of its current task: NOTE [ Worker protocol ]), and a Ray actor's not yet
submitted are taken back (at most two calls per actor are in Ray: NOTE [ Ray workers ]);
only those already submitted are computed, and their results dropped. The
dataset's blocks are patched only once no batch is in flight (NOTE [ Shared dataset
buffers ]). Shutdown runs
each step through :func:`compatmp._transport.shutdown_step`: one failing step is logged and
the next still run, so a failed start-up raises its own cause and leaves nothing behind.
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

from . import _batch_blocks, _stall, _tasks, _worker
from ._exceptions import WorkerCrashedError, WorkerTimeoutError
from ._processes import KILL_TIMEOUT, TERMINATE_TIMEOUT, ProcessTransport
from ._ray import RayTransport
from ._threads import ThreadTransport
from ._transport import MAIN_POLL_INTERVAL, Transport, WorkerHandle, shutdown_step

__all__ = [
    "KILL_TIMEOUT",
    "MAIN_POLL_INTERVAL",
    "MAX_TASKS_PER_WORKER",
    "SHUTDOWN_TIMEOUT",
    "TERMINATE_TIMEOUT",
]


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


class _ProgressClock:
    """The timeout of a wait for several workers: ``timeout`` seconds *without progress*.

    Progress is any change of what the wait is for: a worker finished (or dropped) a batch,
    acknowledged a dataset update, or reported ready. Waiting for ``n`` prefetched batches of
    ``t`` seconds each so takes ``n * t`` seconds without failing a ``timeout > t`` (issue 17:
    a whole-wait deadline failed 1 s batches with ``timeout=2.5`` after 3 s). While a worker
    is still starting, the clock does not run (as for one batch, :meth:`_Core.wait_for`).

    Args:
        core (_Core): the pool.
        timeout (float | None): seconds; None: no limit.
    """

    def __init__(self, core: _Core, timeout: float | None) -> None:
        self.core = core
        self.timeout = timeout
        self.state = self._state()
        self.deadline = None if timeout is None else time.monotonic() + timeout

    def _state(self) -> tuple[int, int, int]:
        handles = self.core.handles
        return (
            sum(self.core.tasks.load(h.id) for h in handles),
            sum(h.version for h in handles),
            sum(1 for h in handles if h.ready),
        )

    def pump(self, what: str) -> None:
        """Pump once (at most :data:`MAIN_POLL_INTERVAL`), after checking the deadline.

        Args:
            what (str): what the wait is for, ending "workers made no progress for ... s".

        Raises:
            WorkerTimeoutError: no progress for ``timeout`` seconds (the pool is then closed
                by the caller).
        """
        wait = MAIN_POLL_INTERVAL
        if self.deadline is not None:
            state = self._state()
            now = time.monotonic()
            if state != self.state or not all(h.ready for h in self.core.handles):
                self.state = state
                self.deadline = now + self.timeout  # type: ignore[operator]
            left = self.deadline - now
            if left <= 0:
                raise WorkerTimeoutError(
                    f"workers made no progress for timeout={self.timeout} s {what} (no batch "
                    "finished, no acknowledgement). The pool has been shut down. Raise "
                    "timeout=, or pass timeout=None to wait without limit.",
                    timeout=self.timeout,
                )
            wait = min(wait, left)
        self.core.pump(wait)


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
        self.skip_sent: set[int] = set()  # orphans named in a ("skip", ...) already
        self.closed = False
        self.close_reason: str | None = None
        self.version = 0
        self.rr = 0
        # Zero-copy batches: views of the workers' blocks, released when the consumer drops
        # them. Finalizers run in any thread and only append to the deque; the pump turns
        # them into releases (NOTE [ Shared-memory ownership ] in _batch_blocks).
        self.released: collections.deque[int] = collections.deque()
        self.attachments = _batch_blocks.Attachments(self.released.append)
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
                # read now: benchmarks and tests patch it
                shm_threshold=_batch_blocks.SHM_THRESHOLD,
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
            # Releases first: a worker reads its messages in order, and a task ahead of the
            # releases of the batches the consumer already dropped (the previous epoch's tail)
            # would make it create blocks it has free (issue 18 item 3).
            self._send_releases()
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
        elif kind == _worker.SKIPPED:  # orphans dropped unstarted (NOTE [ Worker protocol ])
            for send_idx in msg[1]:
                if self.closed:
                    self.tasks.discard(send_idx)
                else:
                    self.tasks.skip(send_idx)
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
        """The consumer will not read these: drop buffered results, orphan pending ones,
        and have the workers skip the orphans they have not started (the next pass or a
        dataset update need not wait for them). Never raises for a dead worker: its death
        is reported by the next wait, whose error is the one raised."""
        self.tasks.forget(send_idxs)
        # Not blocking: a generator's finalizer may run in a worker thread (GC) while
        # close() holds the lock and joins that thread; the next update withdraws then.
        if not self.io_lock.acquire(blocking=False):
            return
        try:
            self._withdraw_orphans()
        except Exception:
            pass
        finally:
            self.io_lock.release()

    def in_flight_orphans(self) -> int:
        return self.tasks.orphans()

    # -- dataset updates -----------------------------------------------------------------------

    def wait_idle(self, timeout: float | None) -> None:
        """Wait until no worker holds a task (orphans included), e.g. before the dataset's
        blocks are rewritten (NOTE [ Shared dataset buffers ] in _shared_data).

        Args:
            timeout (float | None): seconds without progress (NOTE [ Time limits ]: the
                clock restarts whenever a worker finishes a batch), None: no limit.

        Raises:
            WorkerTimeoutError: no worker finished a batch for ``timeout`` seconds.
            WorkerCrashedError: a worker died meanwhile.
        """
        self._withdraw_orphans()
        clock = _ProgressClock(self, timeout)
        while any(self.tasks.load(h.id) for h in self.handles):
            clock.pump("to finish their batches before the dataset update")

    def broadcast_dataset(self, payload: Any, timeout: float | None, reset: tuple = ()) -> None:
        """Send ``payload`` (the dataset's new state) to every worker and wait for each
        worker's acknowledgement.

        Args:
            payload (object): what the transport carries (pickled bytes with big buffers in
                shared memory, or the object itself for threads).
            timeout (float | None): seconds without progress, as in :meth:`wait_idle`; an
                acknowledgement counts as progress.
            reset (tuple): empty, or ``(base_seed, seed_batches, init_payload)`` for reused
                workers starting a new call (NOTE [ Reused workers ] in _reuse).

        Raises:
            WorkerTimeoutError, WorkerCrashedError: as in :meth:`wait_idle`.
        """
        self.version += 1
        version = self.version
        self._withdraw_orphans()
        clock = _ProgressClock(self, timeout)
        for h in self.handles:
            # A busy worker may be blocked sending a big result; let it finish first, so our
            # (possibly big) send cannot deadlock against it.
            while self.tasks.load(h.id):
                clock.pump("to finish its batches before the dataset update")
            self._send(h, (_worker.DATASET, version, payload, *reset))
        while any(h.version < version for h in self.handles):
            clock.pump("to acknowledge the dataset update")

    def _withdraw_orphans(self) -> None:
        """Orphaned prefetches a worker has not started are not computed: taken back where
        the transport can (:meth:`Transport.withdraw`: threads, and Ray for the calls it has
        not submitted yet), else, where its workers read ahead
        (:attr:`Transport.skips_orphans`: processes), named in a ``("skip", ...)`` message
        the worker answers with ``("skipped", ...)`` (NOTE [ Worker protocol ]). The rest
        (a Ray call already submitted) are computed and their results dropped.
        """
        with self.io_lock:
            if self.closed:
                return
            orphans: dict[int, set[int]] = {}
            for t in self.tasks:
                if t.state == _tasks.ORPHANED:
                    orphans.setdefault(t.worker, set()).add(t.send_idx)
            for worker, send_idxs in orphans.items():
                h = self.handles[worker]
                for send_idx in self.transport.withdraw(h, send_idxs):
                    self.tasks.skip(send_idx)
                rest = {i for i in send_idxs if self.tasks.get(i) is not None}
                rest -= self.skip_sent
                if rest and self.transport.skips_orphans and not h.stopping:
                    self._send(h, (_worker.SKIP, tuple(sorted(rest))))
                    self.skip_sent |= rest
            self.skip_sent &= {t.send_idx for t in self.tasks if t.state == _tasks.ORPHANED}

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
        # Every step runs, whatever an earlier one raised (shutdown_step logs it): a failed
        # start-up closes the pool too, and its own error is the one the caller sees.
        for h in self.handles:
            h.stopping = True
            try:
                h.send((_worker.STOP,))
            except Exception:
                pass  # gone, or never started
        shutdown_step(
            "stopping the workers",
            lambda: self.transport.shutdown(
                time.monotonic() + SHUTDOWN_TIMEOUT, self._drain_quietly
            ),
        )
        # Arrays the consumer still holds stay valid.
        shutdown_step("closing the batches' shared-memory maps", self.attachments.close)
        self.released.clear()
        if self.sharer is not None:  # Ray too: the sharer's bookkeeping, no blocks there
            # The dataset's blocks: workers are gone.
            shutdown_step("unlinking the dataset's shared memory", self.sharer.close)
        # What workers killed mid-batch left behind.
        shutdown_step("sweeping the workers' shared memory", self.transport.sweep)

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
