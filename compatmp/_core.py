"""The running pool: dispatch, reorder, failures, shutdown (the main side of the workers).

:class:`compatmp.OrderedPool` (:mod:`compatmp._pool`) is a thin facade over :class:`_Core`;
starting a worker is :mod:`compatmp._launch`'s job, what a worker does is
:mod:`compatmp._worker`'s.

Data flow (one pool, ``workers=3``; ``imap`` runs in the consumer's thread, no helper thread)::

                             main process                          |   worker processes
                                                                   |   (or worker threads)
  indices ---> imap() --dispatch--> least-loaded worker            |
     (at most max_queue_size        ("task", send_idx, index, pass) ---> worker_main loop 0
      dispatched and not yet                                       |     dataset[index]
      yielded)                                                     |     big arrays -> its
                                                                   |      SharedMemory blocks
                  +-- wait(pipes + process sentinels, 0.1 s) <--------- ("ok", send_idx, batch,
                  |     message  -> view each block (zero-copy)    |      dropped), ("err", ...)
                  |                 store the batch by send_idx;   |
                  |     consumer dropped the batch's arrays:       |
                  |                 ("release", send_idx) ---------->  blocks reusable
                  |     sentinel -> WorkerCrashedError (pid, code, |   worker_main loop 1
                  |                 index it held)                 |   worker_main loop 2
                  |     nothing  -> timeout? WorkerTimeoutError    |
                  v                                                |
         reorder buffer {send_idx: batch} --> yield batches        |
                                             in the given order    |
  update_dataset(ds) --("dataset", version, bytes) to EVERY worker --> replace dataset,
                      (skipped when the pickled bytes are unchanged) |  ("updated", version)
  close() --("stop",)--> join 1 s --> SIGTERM, 1 s --> SIGKILL     |   unlink own blocks, exit
          then sweep /dev/shm for the pool's prefix (blocks of SIGKILLed workers)

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
NOTE [ Worker protocol ]) has nothing multiprocessing-specific, so a Ray transport can
implement it later.

NOTE [ Time limits ]
Every wait is bounded; see the interval constants below. A batch error, crash or timeout
shuts the pool down (all workers gone, all shared memory unlinked) before the error is raised.
"""

from __future__ import annotations

import atexit
import collections
import os
import signal
import threading
import time
import weakref
from collections.abc import Iterable
from multiprocessing.connection import wait as _mp_wait
from typing import Any

from . import _shm, _stall, _worker
from ._exceptions import WorkerCrashedError, WorkerTimeoutError
from ._launch import _Handle, _ProcessHandle, start_processes, start_threads

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

# After SIGTERM, how long to wait before SIGKILL (seconds). SIGTERM's default action ends a
# Python process at once unless it installed a handler, so this is rarely used in full.
TERMINATE_TIMEOUT = 1.0

# After SIGKILL, the bound on waiting for the kernel to reap the process (seconds).
KILL_TIMEOUT = 5.0

# Most tasks one worker may have queued. A task message is ~50 bytes; 64 of them stay far
# below the smallest socketpair buffer we know (8 KiB on macOS), so sending a task never blocks
# on a worker that is itself blocked sending a big result back (a deadlock otherwise).
MAX_TASKS_PER_WORKER = 64

_MISSING = object()


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "is gone (its exit status is unknown)"
    if code < 0:
        try:
            sig = signal.Signals(-code).name
        except ValueError:
            sig = f"signal {-code}"
        hint = ""
        if sig == "SIGKILL":
            hint = " (often the out-of-memory killer: check `dmesg` or lower batch size/workers)"
        elif sig in ("SIGSEGV", "SIGBUS", "SIGABRT", "SIGILL", "SIGFPE"):
            hint = " (a crash in native code called by the dataset)"
        return f"was killed by {sig} (exit code {code}){hint}"
    return f"exited with code {code}"


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

    ``method`` is a start method (``"fork"``, ``"forkserver"``, ``"spawn"``) or ``"thread"``;
    ``dataset_payload`` and ``init_payload`` are pickled bytes for processes, the objects
    themselves for threads.
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
        self.method = method
        self.sharer = sharer  # _shared_data.DatasetSharer: the dataset's blocks (main-owned)
        self.seed_batches = seed_batches
        self.stall_timeout = stall_timeout
        self.stack_files: dict[int, _stall.StackFile] = {}  # worker id -> its stack dumps
        self.in_process = method != "thread"
        self.num_workers = workers
        self.handles: list[_Handle] = []
        self.tasks: dict[int, tuple[Any, _Handle]] = {}  # send_idx -> (index, handle)
        self.results: dict[int, Any] = {}  # send_idx -> batch or _Failure
        self.orphans: set[int] = set()  # send_idx whose result nobody will read
        self.next_send_idx = 0
        self.closed = False
        self.close_reason: str | None = None
        self.version = 0
        self.rr = 0
        self.cond = threading.Condition(threading.Lock())  # thread mode: "a message arrived"
        self.shm_prefix: str | None = None
        # Zero-copy batches (process mode): views of the workers' blocks, released when the
        # consumer drops them. Finalizers run in any thread and only append to the deque;
        # the pump sends the releases (NOTE [ Shared-memory ownership ] in _shm).
        self.released: collections.deque[int] = collections.deque()
        self.leased: dict[int, _Handle] = {}  # send_idx -> worker whose blocks it views
        self.attachments = _shm.Attachments(self.released.append)
        # Held while talking to the workers (pump, dispatch, close): close() may come from
        # another thread while a consumer thread waits for a batch; it then waits for that
        # thread's current wait to end (<= MAIN_POLL_INTERVAL) instead of racing on the pipes.
        self.io_lock = threading.RLock()
        _live_cores.add(self)
        if self.in_process and method != "ray":  # Ray: batches through its object store
            if os.name != "nt":  # Windows has no resource tracker
                _shm.ensure_tracker()
            self.shm_prefix = _shm.block_prefix(os.getpid(), _shm.pool_token())
            _shm.sweep_dead_owners()  # NOTE [ Shared-memory ownership ], rule 5
        try:
            if sharer is not None:  # NOTE [ Shared dataset buffers ] in _shared_data
                dataset_payload = sharer.start(self.shm_prefix, dataset_payload)
        except BaseException:
            self.close("start-up failed")
            raise
        self._start(dataset_payload, init_payload, base_seed)

    # -- start-up ------------------------------------------------------------------------------

    def _config(self, i: int, dataset: Any, init_fn: Any, base_seed: int) -> _worker.WorkerConfig:
        return _worker.WorkerConfig(
            worker_id=i,
            num_workers=self.num_workers,
            base_seed=base_seed,
            dataset=dataset,
            init_fn=init_fn,
            in_process=self.in_process,
            main_pid=os.getpid(),
            shm_prefix=self.shm_prefix,
            shm_threshold=_shm.SHM_THRESHOLD,  # read now: benchmarks and tests may patch it
            seed_batches=self.seed_batches,
            stack_file=self._stack_file(i),
        )

    def _stack_file(self, i: int) -> str | None:
        # Ray actors may run on other machines: no local stack file, no signal to their pid.
        if not (self.in_process and self.method != "ray" and self.stall_timeout):
            return None
        if not _stall.supported():
            return None
        self.stack_files[i] = _stall.StackFile()
        return self.stack_files[i].path

    def _start(self, dataset: Any, init_fn: Any, base_seed: int) -> None:
        configs = [self._config(i, dataset, init_fn, base_seed) for i in range(self.num_workers)]
        try:
            if self.method == "ray":  # NOTE [ Ray workers ] in compatmp._ray
                from . import _ray

                _ray.start_actors(configs, self.handles)
            elif self.in_process:
                start_processes(self.method, configs, self.handles)
            else:
                start_threads(configs, self.cond, self.handles)
        except BaseException:
            self.close("start-up failed")
            raise

    # -- dispatch ------------------------------------------------------------------------------

    def can_dispatch(self) -> bool:
        return any(len(h.outstanding) < MAX_TASKS_PER_WORKER for h in self.handles)

    def dispatch(self, index: Any, pass_number: int = 0) -> int:
        with self.io_lock:
            if self.closed:
                raise _PoolClosed
            return self._dispatch(index, pass_number)

    def _dispatch(self, index: Any, pass_number: int = 0) -> int:
        n = len(self.handles)
        order = [self.handles[(self.rr + k) % n] for k in range(n)]
        handle = min(order, key=lambda h: len(h.outstanding))
        self.rr = (handle.id + 1) % n
        send_idx = self.next_send_idx
        self.next_send_idx += 1
        try:
            handle.channel.send((_worker.TASK, send_idx, index, pass_number))
        except (EOFError, OSError):
            self._send_failed(handle)
            raise
        except Exception as exc:  # nothing was written: the index cannot be pickled
            raise TypeError(
                f"batch index {index!r} cannot be sent to worker processes "
                f"({type(exc).__name__}: {exc}); use small picklable indices such as ints"
            ) from exc
        self.tasks[send_idx] = (index, handle)
        handle.outstanding.append(send_idx)
        return send_idx

    def _send(self, handle: _Handle, msg: tuple) -> None:
        try:
            handle.channel.send(msg)
        except (EOFError, OSError):
            self._send_failed(handle)
            raise

    def _send_failed(self, handle: _Handle) -> None:
        # The worker is gone or going: report how it died if it did.
        if isinstance(handle, _ProcessHandle):
            handle.proc.join(SHUTDOWN_TIMEOUT)
        self._raise_if_dead([handle])

    # -- receiving -----------------------------------------------------------------------------

    def _wait(self, timeout: float) -> tuple[list[_Handle], list[_Handle]]:
        """Wait for messages; returns (handles with messages, handles that died)."""
        live = [h for h in self.handles if not h.stopping]
        if self.method == "ray":
            from . import _ray

            return _ray.wait(live, timeout)
        if self.in_process:
            waitables: dict[Any, tuple[_Handle, bool]] = {}
            for h in live:
                waitables[h.channel.conn] = (h, False)
                waitables[h.proc.sentinel] = (h, True)
            ready = _mp_wait(list(waitables), timeout)
            readable = [waitables[r][0] for r in ready if not waitables[r][1]]
            dead = [waitables[r][0] for r in ready if waitables[r][1]]
            return readable, dead
        with self.cond:
            self.cond.wait_for(lambda: any(h.channel.ready() for h in live), timeout)
            readable = [h for h in live if h.channel.ready()]
        dead = [h for h in live if not h.is_alive() and h not in readable]
        return readable, dead

    def pump(self, timeout: float) -> None:
        """Receive what arrives within ``timeout`` seconds; raise on crash or fatal error."""
        with self.io_lock:
            if self.closed:
                raise _PoolClosed
            self._send_releases()
            readable, dead = self._wait(timeout)
            for h in readable:
                self._drain(h)
            if dead:
                self._raise_if_dead(dead)

    def _send_releases(self) -> None:
        """Tell workers which batches the consumer has let go of (their blocks are free)."""
        while self.released:
            send_idx = self.released.popleft()
            handle = self.leased.pop(send_idx, None)
            if handle is None or handle.stopping:
                continue
            try:
                handle.channel.send((_worker.RELEASE, send_idx))
            except (EOFError, OSError):
                pass  # the worker is gone; its sentinel reports it

    def _drain(self, handle: _Handle) -> None:
        ch = handle.channel
        while True:
            try:
                if not ch.poll(0):
                    return
                msg = ch.recv()
            except (EOFError, OSError):
                return  # the worker is gone; its sentinel reports it
            self._on_message(handle, msg)

    def _on_message(self, handle: _Handle, msg: tuple) -> None:
        kind = msg[0]
        if kind == _worker.OK:
            send_idx, batch, dropped = msg[1], msg[2], msg[3]
            self._task_done(handle, send_idx)
            if dropped:
                self.attachments.drop(dropped)  # before any later block of this worker
            if self.closed:
                return  # the worker unlinks its blocks as it exits
            if not self.in_process:
                if send_idx in self.orphans:
                    self.orphans.discard(send_idx)
                else:
                    self.results[send_idx] = batch
                return
            # NOTE [ Shared-memory ownership ]: the batch's blocks stay the worker's; they are
            # released when the consumer has dropped every array viewing them.
            if _shm.names(batch):
                self.leased[send_idx] = handle
            if send_idx in self.orphans:
                self.orphans.discard(send_idx)
                self.released.append(send_idx)
                return
            try:
                self.results[send_idx] = self.attachments.view(batch, send_idx)
            except Exception as exc:
                self.results[send_idx] = _Failure(exc)
        elif kind == _worker.ERR:
            send_idx = msg[1]
            exc = _worker.rebuild_exception(msg, by_reference=not self.in_process)
            if send_idx is None:  # start-up or dataset update failed: the pool is unusable
                if self.closed:
                    return
                raise exc
            self._task_done(handle, send_idx)
            if send_idx in self.orphans:
                self.orphans.discard(send_idx)
            elif not self.closed:
                self.results[send_idx] = _Failure(exc)
        elif kind == _worker.READY:
            handle.ready = True
            if handle.id in self.stack_files:  # the worker has it open: drop the name
                self.stack_files[handle.id].unlink()
        elif kind == _worker.UPDATED:
            handle.version = max(handle.version, msg[1])
        else:  # pragma: no cover - protocol bug
            raise RuntimeError(f"compatmp: unknown message from worker {handle.id}: {kind!r}")

    def _task_done(self, handle: _Handle, send_idx: int) -> None:
        self.tasks.pop(send_idx, None)
        try:
            handle.outstanding.remove(send_idx)
        except ValueError:
            pass

    def _raise_if_dead(self, handles: list[_Handle]) -> None:
        for h in handles:
            if h.stopping or h.is_alive():
                continue
            self._drain(h)  # what it sent before dying is valid
            code = h.exitcode(MAIN_POLL_INTERVAL)
            index = self.tasks[h.outstanding[0]][0] if h.outstanding else None
            if h.outstanding:
                holding = f"while computing the batch at index {index!r}"
            elif not h.ready:
                holding = (
                    "while starting, before it could load the dataset (its traceback, if any, "
                    "is on stderr above; often a module the dataset needs cannot be imported "
                    "in a fresh process)"
                )
            else:
                holding = "while idle (holding no batch)"
            who = f"worker {h.id} (pid {h.pid})" if h.pid is not None else f"worker thread {h.id}"
            how = _describe_exit(code)
            if hasattr(h, "describe_death"):  # a Ray actor (compatmp._ray)
                who, how = h.describe_death()
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
                if send_idx in self.results:
                    result = self.results.pop(send_idx)
                    if isinstance(result, _Failure):
                        raise result.exc
                    return result
                wait = MAIN_POLL_INTERVAL
                if deadline is not None and not self.tasks[send_idx][1].ready:
                    # The per-batch timeout starts once the worker holding the batch is ready:
                    # a spawn worker's start-up (~0.5 s, more on a loaded machine) is not the
                    # batch being slow. A worker that dies while starting is caught by its
                    # sentinel, not by this clock.
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
        index, handle = self.tasks[send_idx]
        holding = self.tasks[handle.outstanding[0]][0] if handle.outstanding else index
        _stall.report_worker(handle, self.stack_files.get(handle.id), waited, index, holding)

    def _timeout_error(self, send_idx: int, timeout: float | None) -> WorkerTimeoutError:
        index, handle = self.tasks[send_idx]
        who = f"worker {handle.id}" + (f" (pid {handle.pid})" if handle.pid is not None else "")
        return WorkerTimeoutError(
            f"the batch at index {index!r} took longer than timeout={timeout} s ({who}). The "
            "pool has been shut down. Raise timeout=, or pass timeout=None to wait without "
            "limit.",
            index=index,
            timeout=timeout,
        )

    def forget(self, send_idxs: Iterable[int]) -> None:
        """The consumer will not read these: drop buffered results, orphan pending ones."""
        for send_idx in send_idxs:
            if self.results.pop(send_idx, _MISSING) is _MISSING and send_idx in self.tasks:
                self.orphans.add(send_idx)

    def in_flight_orphans(self) -> int:
        return len(self.orphans)

    # -- dataset updates -----------------------------------------------------------------------

    def wait_idle(self, timeout: float | None) -> None:
        """Wait until no worker holds a task (orphans included), e.g. before the dataset's
        blocks are rewritten (NOTE [ Shared dataset buffers ] in _shared_data).

        Raises:
            WorkerTimeoutError: still busy after ``timeout`` seconds (None: no limit).
            WorkerCrashedError: a worker died meanwhile.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while any(h.outstanding for h in self.handles):
            self._pump_until(deadline, "to finish their batches before the dataset update")

    def broadcast_dataset(self, payload: Any, timeout: float | None) -> None:
        self.version += 1
        version = self.version
        deadline = None if timeout is None else time.monotonic() + timeout
        for h in self.handles:
            # A busy worker may be blocked sending a big result; let it finish first, so our
            # (possibly big) send cannot deadlock against it.
            while h.outstanding:
                self._pump_until(deadline, "to finish its batches before the dataset update")
            self._send(h, (_worker.DATASET, version, payload))
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
                self.results.clear()
                self.tasks.clear()
                self.orphans.clear()
                for stack_file in self.stack_files.values():
                    stack_file.close()

    def _shutdown(self) -> None:
        for h in self.handles:
            h.stopping = True
            try:
                h.channel.send((_worker.STOP,))
            except Exception:
                pass
        deadline = time.monotonic() + SHUTDOWN_TIMEOUT
        if not self.in_process:
            for h in self.handles:
                h.channel.close()  # a worker busy in dataset[i] ends after its batch
            me = threading.current_thread()
            for h in self.handles:
                if h.thread is not me:  # GC may run this finalizer in a worker thread
                    h.thread.join(max(0.0, deadline - time.monotonic()))
            return
        if self.method == "ray":  # kill the actors, free their objects, release Ray
            from . import _ray

            _ray.shutdown(self.handles)
        else:
            self._join_processes(deadline)
            for h in self.handles:
                self._drain_quietly(h)
                h.channel.close()
        self.attachments.close()  # arrays the consumer still holds stay valid
        self.leased.clear()
        self.released.clear()
        if self.sharer is not None:  # Ray too: the sharer's bookkeeping, no blocks there
            self.sharer.close()  # the dataset's blocks: workers are gone
        if self.shm_prefix is not None:
            _shm.sweep(self.shm_prefix)

    def _join_processes(self, deadline: float) -> None:
        procs = [h for h in self.handles]
        # Drain while they finish their current batch, so none blocks sending it.
        while time.monotonic() < deadline and any(h.proc.is_alive() for h in procs):
            conns = [h.channel.conn for h in procs if not h.channel.conn.closed]
            sentinels = [h.proc.sentinel for h in procs if h.proc.is_alive()]
            ready = _mp_wait(
                conns + sentinels, min(MAIN_POLL_INTERVAL, deadline - time.monotonic())
            )
            for h in procs:
                if h.channel.conn in ready:
                    self._drain_quietly(h)
        for h in procs:
            if h.proc.is_alive():
                h.proc.terminate()
        deadline = time.monotonic() + TERMINATE_TIMEOUT
        for h in procs:
            h.proc.join(max(0.0, deadline - time.monotonic()))
        for h in procs:
            if h.proc.is_alive():
                h.proc.kill()
                h.proc.join(KILL_TIMEOUT)
        for h in procs:
            if not h.proc.is_alive():
                h.proc.close()

    def _drain_quietly(self, handle: _Handle) -> None:
        """Receive and discard (unlinking shared memory) whatever ``handle`` sent."""
        try:
            self._drain(handle)
        except Exception:
            pass

    def forget_in_child(self) -> None:
        """In a forked child: close inherited main-side pipe ends, never touch the workers."""
        self.closed = True
        for h in self.handles:
            if isinstance(h, _ProcessHandle):
                try:
                    h.channel.close()
                except OSError:
                    pass


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
