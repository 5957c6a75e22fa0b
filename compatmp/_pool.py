"""OrderedPool: the main side of compatmp's workers - prefetch, order, failures, shutdown.

Data flow (one pool, ``workers=3``; ``imap`` runs in the consumer's thread, no helper thread)::

                             main process                          |   worker processes
                                                                   |   (or worker threads)
  indices ---> imap() --dispatch--> least-loaded worker            |
     (at most max_queue_size        ("task", send_idx, index) ---------> worker_main loop 0
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
worker's sentinel together), and skipping ``__main__`` takes one small hook (NOTE [ Workers do
not re-run __main__ ]). The stdlib also keeps the process layer free of a pinned third-party
backend. The worker protocol (compatmp._worker, NOTE [ Worker protocol ]) has nothing
multiprocessing-specific, so a Ray transport can implement it later.

NOTE [ Workers do not re-run __main__ ]
A spawn or forkserver child normally re-imports the user's script as ``__mp_main__``
(``multiprocessing.spawn.get_preparation_data`` puts ``init_main_from_path`` or
``init_main_from_name`` in the data the child prepares from); a training script that imports
TensorFlow at the top then pays ~3 s and ~570 MB per worker before doing anything. compatmp's
workers need nothing from ``__main__``: the dataset travels by cloudpickle, which sends
``__main__`` code by value. loky solves this with its own ``Popen`` classes
(``loky/backend/popen_loky_posix.py``, ``init_main_module=False``). We keep the stdlib's Popen
classes and wrap ``multiprocessing.spawn.get_preparation_data`` (looked up at call time by
``popen_spawn_posix``, ``popen_spawn_win32``, ``popen_forkserver`` and ``forkserver``, 3.8 to
3.14): while *this module* starts a worker (a thread-local flag), the two ``init_main_*`` keys
are dropped; every other process start in the program is untouched. ``sys_path`` and the
working directory are still sent, so the dataset's own modules import as usual.

NOTE [ Forkserver preload ]
The forkserver process is started once per program; workers fork from it. By default it
imports ``__main__`` (the user's script) first. compatmp sets its preload list, before the
server starts, to ``compatmp._worker`` plus the top-level packages the dataset's pickle refers
to that the main process has already imported (e.g. ``numpy``, ``PIL``, ``tensorflow``):
they are imported once in the server instead of once per worker. Measured: 2 workers ready
after 275 ms (first pool) and 28 ms (second) with the preload, 468 ms and 385 ms without.
``__main__`` is left out (see above). The list only matters when the server starts; it is
process-wide, so it also applies to other forkserver users in the program (who then import
``__main__`` per child, as spawn does).

NOTE [ Time limits ]
Every wait is bounded; see the interval constants below. A batch error, crash or timeout
shuts the pool down (all workers gone, all shared memory unlinked) before the error is raised.
"""

from __future__ import annotations

import atexit
import collections
import hashlib
import multiprocessing
import os
import pickletools
import secrets
import signal
import sys
import threading
import time
import warnings
import weakref
from collections.abc import Callable, Iterable, Iterator
from multiprocessing.connection import wait as _mp_wait
from typing import Any

from . import _shm, _worker
from ._exceptions import (
    SerializationError,
    ThreadFallbackWarning,
    WorkerCrashedError,
    WorkerTimeoutError,
)
from ._platform import Decision, decide_start_method
from ._serialize import dumps

__all__ = ["OrderedPool"]

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

# Top-level modules never worth preloading in the forkserver (see NOTE [ Forkserver preload ]).
_NOT_PRELOADED = frozenset({"__main__", "__builtin__", "builtins", "copyreg", "_codecs"})

_DEFAULT_MAX_QUEUE_SIZE = 10

_MISSING = object()


# ---------------------------------------------------------------------------------------------
# NOTE [ Workers do not re-run __main__ ]: the preparation-data hook
# ---------------------------------------------------------------------------------------------

_launching = threading.local()
_hook_lock = threading.Lock()


def _install_preparation_hook() -> None:
    from multiprocessing import spawn

    with _hook_lock:
        if getattr(spawn.get_preparation_data, "_compatmp_hook", False):
            return
        original = spawn.get_preparation_data

        def get_preparation_data(name: str) -> dict:
            data = original(name)
            if getattr(_launching, "active", False):
                data.pop("init_main_from_path", None)
                data.pop("init_main_from_name", None)
            return data

        get_preparation_data._compatmp_hook = True  # type: ignore[attr-defined]
        spawn.get_preparation_data = get_preparation_data


def _start_without_main(proc: Any, method: str) -> None:
    _launching.active = True
    try:
        with _sigint_blocked(method):
            proc.start()
    finally:
        _launching.active = False


class _sigint_blocked:
    """Block SIGINT in this thread while a fork or spawn worker starts.

    A child inherits the signal mask across ``fork()`` and ``exec()``, so the worker is born
    with SIGINT blocked: a Ctrl-C while it still imports NumPy (spawn: ~0.3 s) stays pending
    instead of killing it, and is discarded when the worker ignores SIGINT
    (``_worker.worker_main``, which then unblocks it). Here the signal is not lost: another
    thread takes it, or it is delivered when the mask is restored. Skipped for forkserver
    (its children inherit the *server's* mask; blocking here while the server starts would
    leak into every later child of other users), which leaves its children a window of a few
    milliseconds (fork in the server to ``worker_main``), and where ``pthread_sigmask`` is
    missing (Windows).
    """

    def __init__(self, method: str) -> None:
        self.active = method in ("fork", "spawn") and hasattr(signal, "pthread_sigmask")
        self.old: Any = None

    def __enter__(self) -> None:
        if self.active:
            self.old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})

    def __exit__(self, *exc: object) -> None:
        if self.active:
            signal.pthread_sigmask(signal.SIG_SETMASK, self.old)


def _pickled_modules(data: bytes) -> set[str]:
    """Top-level packages, already imported here, that unpickling ``data`` will import.

    Any string in the pickle that is a key of ``sys.modules`` counts: module names of
    ``GLOBAL``/``STACK_GLOBAL`` opcodes, and modules cloudpickle imports by name for code it
    sends by value (``subimport("numpy")``). A data string that happens to equal a module
    name only adds a harmless preload. A class referred to by name also brings the packages
    of its base classes (a ``keras.utils.PyDataset`` subclass defined in the user's module
    makes the worker import Keras, hence TensorFlow): :func:`_global_bases`.
    """
    found: set[str] = set()
    memo: dict[int, Any] = {}
    pushed: list[Any] = []  # recent values pushed by string and memo-get opcodes
    try:
        for op, arg, _pos in pickletools.genops(data):
            name = op.name
            if isinstance(arg, str):
                module = arg.split(" ")[0]  # GLOBAL's arg is "module qualname"
                if module in sys.modules:
                    found.add(module.split(".")[0])
                if name == "GLOBAL" and " " in arg:
                    found |= _global_bases(*arg.split(" ", 1))
                pushed.append(arg)
            elif name in ("BINGET", "LONG_BINGET", "GET"):
                pushed.append(memo.get(arg))
            elif name == "MEMOIZE":
                memo[len(memo)] = pushed[-1] if pushed else None
            elif name in ("BINPUT", "LONG_BINPUT", "PUT"):
                memo[arg] = pushed[-1] if pushed else None
            elif name == "STACK_GLOBAL" and len(pushed) >= 2:
                module, qualname = pushed[-2], pushed[-1]
                if isinstance(module, str) and isinstance(qualname, str):
                    found |= _global_bases(module, qualname)
            else:
                pushed.append(None)
            del pushed[:-2]
    except Exception:  # a truncated or odd pickle: preload what we found so far
        pass
    return found


def _global_bases(module: str, qualname: str) -> set[str]:
    """Top-level packages of the base classes of ``module.qualname``, if it is a class.

    Looked up without importing anything and without triggering a module ``__getattr__``
    (only ``vars()``), so it is safe on any pickle.
    """
    obj: Any = sys.modules.get(module)
    for part in qualname.split("."):
        if obj is None:
            return set()
        try:
            obj = vars(obj).get(part)
        except TypeError:  # no __dict__
            return set()
    if not isinstance(obj, type):
        return set()
    return {
        base.__module__.split(".")[0]
        for base in obj.__mro__
        if isinstance(getattr(base, "__module__", None), str) and base.__module__ in sys.modules
    }


def _forkserver_preload(ctx: Any, payloads: list[bytes]) -> list[str]:
    modules = set()
    for payload in payloads:
        modules |= _pickled_modules(payload)
    heavy = sorted(m for m in modules if m in sys.modules and m not in _NOT_PRELOADED)
    preload = ["compatmp._worker", *heavy]
    ctx.set_forkserver_preload(preload)
    return preload


# ---------------------------------------------------------------------------------------------
# Worker handles and transports (main side)
# ---------------------------------------------------------------------------------------------


class _Handle:
    """The main side's view of one worker."""

    def __init__(self, worker_id: int, channel: Any) -> None:
        self.id = worker_id
        self.channel = channel
        self.outstanding: collections.deque[int] = collections.deque()
        self.stopping = False
        self.ready = False
        self.version = 0
        self.pid: int | None = None

    def is_alive(self) -> bool:
        raise NotImplementedError

    def exitcode(self) -> int | None:
        return None


class _ProcessHandle(_Handle):
    def __init__(self, worker_id: int, channel: Any, proc: Any) -> None:
        super().__init__(worker_id, channel)
        self.proc = proc

    def is_alive(self) -> bool:
        return self.proc.is_alive()

    def exitcode(self) -> int | None:
        self.proc.join(timeout=MAIN_POLL_INTERVAL)  # a zombie is reaped at once
        return self.proc.exitcode


class _ThreadHandle(_Handle):
    def __init__(self, worker_id: int, channel: Any, thread: threading.Thread) -> None:
        super().__init__(worker_id, channel)
        self.thread = thread

    def is_alive(self) -> bool:
        return self.thread.is_alive()


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
    def __init__(
        self,
        decision: Decision,
        workers: int,
        dataset_payload: Any,
        init_payload: Any,
        base_seed: int,
    ) -> None:
        self.method = decision.method
        self.in_process = decision.uses_processes
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
        self.start_time = time.monotonic()
        self.ready_times: dict[int, float] = {}
        self.preload: list[str] = []
        # Held while talking to the workers (pump, dispatch, close): close() may come from
        # another thread while a consumer thread waits for a batch; it then waits for that
        # thread's current wait to end (<= MAIN_POLL_INTERVAL) instead of racing on the pipes.
        self.io_lock = threading.RLock()
        _live_cores.add(self)
        if self.in_process:
            facts = decision.facts
            if facts is None or facts.os != "windows":  # Windows has no resource tracker
                _shm.ensure_tracker()
            self.shm_prefix = _shm.block_prefix(os.getpid(), secrets.token_hex(2))
            self._start_processes(dataset_payload, init_payload, base_seed)
        else:
            self._start_threads(dataset_payload, init_payload, base_seed)

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
        )

    def _start_processes(self, dataset: bytes, init_fn: bytes | None, base_seed: int) -> None:
        ctx = multiprocessing.get_context(self.method)
        if self.method != "fork":
            _install_preparation_hook()
        if self.method == "forkserver":
            self.preload = _forkserver_preload(ctx, [p for p in (dataset, init_fn) if p])
        try:
            for i in range(self.num_workers):
                main_conn, child_conn = ctx.Pipe(duplex=True)
                proc = ctx.Process(
                    target=_worker.process_entry,
                    args=(child_conn, self._config(i, dataset, init_fn, base_seed)),
                    name=f"compatmp-worker-{i}",
                    daemon=True,
                )
                # Registered before the fork, so a forked child closes this end (at-fork hook).
                handle = _ProcessHandle(i, _worker.ConnectionChannel(main_conn), proc)
                self.handles.append(handle)
                try:
                    _start_without_main(proc, self.method)
                finally:
                    child_conn.close()
                handle.pid = proc.pid
        except BaseException:
            self.close("start-up failed")
            raise

    def _start_threads(self, dataset: Any, init_fn: Any, base_seed: int) -> None:
        try:
            for i in range(self.num_workers):
                main_end, worker_end = _worker.thread_channel_pair(self.cond)
                thread = threading.Thread(
                    target=_worker.worker_main,
                    args=(worker_end, self._config(i, dataset, init_fn, base_seed)),
                    name=f"compatmp-worker-{i}",
                    daemon=True,
                )
                thread.start()
                self.handles.append(_ThreadHandle(i, main_end, thread))
        except BaseException:
            self.close("start-up failed")
            raise

    # -- dispatch ------------------------------------------------------------------------------

    def can_dispatch(self) -> bool:
        return any(len(h.outstanding) < MAX_TASKS_PER_WORKER for h in self.handles)

    def dispatch(self, index: Any) -> int:
        with self.io_lock:
            if self.closed:
                raise _PoolClosed
            return self._dispatch(index)

    def _dispatch(self, index: Any) -> int:
        n = len(self.handles)
        order = [self.handles[(self.rr + k) % n] for k in range(n)]
        handle = min(order, key=lambda h: len(h.outstanding))
        self.rr = (handle.id + 1) % n
        send_idx = self.next_send_idx
        self.next_send_idx += 1
        try:
            handle.channel.send((_worker.TASK, send_idx, index))
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
            self.ready_times[handle.id] = time.monotonic() - self.start_time
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
            code = h.exitcode()
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
            raise WorkerCrashedError(
                f"compatmp {who} {_describe_exit(code)} {holding}. The pool has been shut "
                "down; create a new one to continue. If dataset[i] crashes in native code or "
                "runs out of memory, try it in the main process (workers=1, "
                "start_method='thread') to see the error.",
                pid=h.pid,
                exitcode=code,
                index=index,
            )

    # -- waiting for one result ----------------------------------------------------------------

    def wait_for(self, send_idx: int, timeout: float | None) -> Any:
        deadline = None if timeout is None else time.monotonic() + timeout
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
                self.pump(wait)

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

    def _shutdown(self) -> None:
        for h in self.handles:
            h.stopping = True
            try:
                h.channel.send((_worker.STOP,))
            except Exception:
                pass
        deadline = time.monotonic() + SHUTDOWN_TIMEOUT
        if self.in_process:
            self._join_processes(deadline)
        else:
            for h in self.handles:
                h.channel.close()  # a worker busy in dataset[i] ends after its batch
            for h in self.handles:
                h.thread.join(max(0.0, deadline - time.monotonic()))
            return
        for h in self.handles:
            self._drain_quietly(h)
            h.channel.close()
        self.attachments.close()  # arrays the consumer still holds stay valid
        self.leased.clear()
        self.released.clear()
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


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------


def _check_dataset(dataset: Any, name: str = "dataset") -> None:
    cls = type(dataset)
    missing = [m for m in ("__len__", "__getitem__") if not hasattr(cls, m)]
    if missing:
        raise TypeError(
            f"{name} must support len() and indexing (__len__ and __getitem__), like a Keras "
            f"PyDataset, a Sequence or a list; got {cls.__module__}.{cls.__qualname__} "
            f"without {' and '.join(missing)}. Wrap generators with a dataset class, or use "
            "compatmp.threadsafe_generator for generator input."
        )


def _check_int(value: Any, name: str, minimum: int, hint: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}; {hint}")
    return value


class OrderedPool:
    """Workers computing ``dataset[i]`` ahead of the consumer, yielding batches in order.

    Processes (fork, forkserver or spawn, chosen by :func:`compatmp.decide_start_method`) or
    threads; workers start once, in the constructor, and serve every epoch until
    :meth:`close`. See the module docstring for the data flow and the reasons behind it.

    Big NumPy arrays (>= 256 KiB, ``compatmp._shm.SHM_THRESHOLD``) in batches of worker
    processes travel through shared memory and arrive zero-copy: they are writable views of
    the worker's shared-memory block, valid for as long as you hold them (also after
    :meth:`close`). A block is reused once every array viewing it is garbage, so holding many
    batches holds as many blocks in ``/dev/shm``; when that filesystem is nearly full, batches
    travel through the pipe instead.

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
            ``"thread"``; see :func:`compatmp.decide_start_method`.
        max_queue_size (int): most batches dispatched but not yet yielded (default: 10).
        timeout (float | None): seconds to wait for the next batch in order before
            :class:`WorkerTimeoutError` (default: None, no limit). The clock starts when the
            consumer asks for the batch, or when the worker holding it has finished starting
            (loading the dataset), whichever is later.
        worker_init_fn (Callable[[int], None] | None): called once in each worker with its id,
            after seeding, before the first batch (default: None).
        seed (int | None): base seed; each worker derives its own from ``(seed, worker id)``
            and seeds ``random`` and ``numpy.random`` (legacy global RNG) with it in worker
            processes (default: None, a fresh random seed per pool).

    Raises:
        TypeError: ``dataset`` lacks ``__len__``/``__getitem__``, or ``worker_init_fn`` is not
            callable.
        ValueError: ``workers``, ``max_queue_size``, ``timeout`` or ``seed`` is out of range.
        StartMethodError: ``start_method`` is unknown or unavailable on this platform.
    """

    def __init__(
        self,
        dataset: Any,
        *,
        workers: int,
        start_method: str = "auto",
        max_queue_size: int = _DEFAULT_MAX_QUEUE_SIZE,
        timeout: float | None = None,
        worker_init_fn: Callable[[int], Any] | None = None,
        seed: int | None = None,
    ) -> None:
        _check_dataset(dataset)
        self._workers = _check_int(
            workers, "workers", 1, "use workers=1 for a single background worker."
        )
        self._max_queue_size = _check_int(
            max_queue_size, "max_queue_size", 1, "it bounds the batches computed ahead."
        )
        if timeout is not None and (
            isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0
        ):
            raise ValueError(
                f"timeout must be None (no limit) or a number of seconds > 0, got {timeout!r}"
            )
        self._timeout = None if timeout is None else float(timeout)
        if worker_init_fn is not None and not callable(worker_init_fn):
            raise TypeError(
                f"worker_init_fn must be a callable taking the worker id, or None; got "
                f"{type(worker_init_fn).__name__}"
            )
        if seed is not None:
            _check_int(seed, "seed", 0, "or pass seed=None for a random seed.")
        self._seed = seed if seed is not None else secrets.randbits(64)

        decision = decide_start_method(start_method)
        dataset_payload: Any = dataset
        init_payload: Any = worker_init_fn
        self._digest: bytes | None = None
        if decision.uses_processes:
            try:
                dataset_payload = dumps(dataset, root="dataset")
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
                self._digest = hashlib.blake2b(dataset_payload).digest()
        self._decision = decision
        self._dataset = None if decision.uses_processes else dataset
        self._active: weakref.ref | None = None
        self._core = _Core(decision, self._workers, dataset_payload, init_payload, self._seed)
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

        Workers get 1 s (:data:`SHUTDOWN_TIMEOUT`) to finish the batch they hold, then are
        terminated, then killed. Results not yet consumed are dropped. Also runs when the pool
        is garbage collected and at interpreter exit. A worker *thread* busy in
        ``dataset[i]`` cannot be stopped: it ends after that batch.
        """
        active = self._active() if self._active is not None else None
        if active is not None:
            try:
                active.close()
            except ValueError:  # close() called from inside the iteration
                pass
        self._finalizer()

    def _check_open(self) -> None:
        if self._core.closed:
            raise RuntimeError(
                f"this OrderedPool is closed ({self._core.close_reason}); create a new one"
            )

    # -- iteration -----------------------------------------------------------------------------

    def imap(self, indices: Iterable[Any]) -> Iterator[Any]:
        """Yield ``dataset[i]`` for each ``i`` in ``indices``, in that order.

        Up to ``max_queue_size`` batches are computed ahead by the workers. Starting a new
        ``imap`` abandons an unfinished previous one (its pending batches are discarded). If
        the consumer stops early, pending batches are discarded and the pool stays usable.

        Args:
            indices (Iterable): batch indices (small picklable objects, usually ints).

        Returns:
            Iterator: the batches, in the order of ``indices``.

        Raises:
            RuntimeError: the pool is closed.
            Exception: whatever ``dataset[i]`` raised in a worker, same type, with the
                worker's traceback as ``__cause__`` (a RuntimeError if the type cannot be
                pickled). The pool is shut down first.
            WorkerCrashedError: a worker process died (pid, exit code or signal, index).
            WorkerTimeoutError: a batch took longer than ``timeout`` seconds.
        """
        self._check_open()
        previous = self._active() if self._active is not None else None
        if previous is not None:
            previous.close()
        gen = self._imap(iter(indices))
        self._active = weakref.ref(gen)
        return gen

    def _imap(self, it: Iterator[Any]) -> Iterator[Any]:
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
                        mine.append(core.dispatch(index))
                    except _PoolClosed:
                        return
                if not mine:
                    if exhausted:
                        return
                    try:
                        core.pump(MAIN_POLL_INTERVAL)  # every worker is full of orphans
                    except _PoolClosed:
                        return
                    continue
                try:
                    batch = core.wait_for(mine[0], self._timeout)
                except _PoolClosed:
                    return  # close() from another thread ends the stream
                mine.popleft()
                yield batch
        except GeneratorExit:
            raise
        except BaseException as exc:
            core.close(f"it was shut down after {type(exc).__name__}")
            raise
        finally:
            core.forget(mine)

    # -- dataset state -------------------------------------------------------------------------

    def update_dataset(self, dataset: Any) -> bool:
        """Send the dataset's current state to every worker, unless it did not change.

        Call after ``on_epoch_end`` (which may reshuffle). Waits until every worker has the
        new state, so batches requested afterwards see it. Process workers get the pickled
        dataset, and nothing is sent when the pickle is byte-identical to the last one sent;
        worker threads share the object, so nothing is sent when it is the same object.

        Args:
            dataset (object): the dataset, usually the same object mutated in place.

        Returns:
            bool: True if the state was sent, False if it was unchanged.

        Raises:
            RuntimeError: the pool is closed.
            TypeError: ``dataset`` lacks ``__len__``/``__getitem__``.
            SerializationError: (process workers) the dataset can no longer be pickled.
            WorkerCrashedError, WorkerTimeoutError: as in :meth:`imap`; the pool is shut down.
        """
        self._check_open()
        _check_dataset(dataset)
        if self._decision.uses_processes:
            payload: Any = dumps(dataset, root="dataset")
            digest = hashlib.blake2b(payload).digest()
            if digest == self._digest:
                return False
        else:
            if dataset is self._dataset:
                return False
            payload, digest = dataset, None
        try:
            self._core.broadcast_dataset(payload, self._timeout)
        except BaseException as exc:
            self._core.close(f"it was shut down after {type(exc).__name__}")
            raise
        self._digest = digest
        if not self._decision.uses_processes:
            self._dataset = dataset
        return True
