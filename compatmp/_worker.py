"""The worker side: one module-level loop shared by worker processes and worker threads.

The loop only does what it is told (torch's ``_utils/worker.py`` is the model): receive a
message, compute ``dataset[index]``, send the batch or a wrapped exception back. Ordering,
prefetch, failure detection and shutdown belong to the main side (:mod:`compatmp._core`).

NOTE [ Worker protocol ]
Messages are plain tuples whose first item names the kind. Nothing in them is specific to
``multiprocessing``, so another transport (e.g. Ray actors) can carry them unchanged.

main -> worker::

    ("task", send_idx, index, pass)    compute dataset[index]; pass (int) is the pool's pass
                                       number, for NOTE [ Per-batch seeds ] (_seeds)
    ("dataset", version, payload)      replace the dataset (as WorkerConfig.dataset: what
                                       _shared_data prepared for processes and Ray, the
                                       object in thread mode), then answer ("updated", version)
    ("dataset", version, payload, base_seed, seed_batches, init_fn)
                                       a reused worker's new call (NOTE [ Reused workers ] in
                                       _reuse): reseed as at start-up from base_seed, drop
                                       the old dataset, load payload, run init_fn (as
                                       WorkerConfig.init_fn) again, then answer "updated"
    ("skip", send_idxs)                the consumer will not read these tasks (orphaned
                                       prefetches, NOTE [ Task records ] in _tasks): drop
                                       those not started, answer ("skipped", dropped). Sent
                                       only to workers whose channel reads ahead (below)
    ("release", send_idx)              the main process no longer uses that batch's
                                       shared-memory blocks (its last view is garbage):
                                       they may be reused
    ("stop",)                          leave the loop and exit

worker -> main::

    ("ready", worker_id, pid)          dataset loaded, worker_init_fn ran, seeds set
    ("ok", send_idx, batch, dropped)   the batch, big arrays replaced by _batch_blocks.ShmArray;
                                       dropped: names of the blocks this worker unlinked
                                       since its last "ok" (the main closes its handles)
    ("updated", version)               the new dataset is in place
    ("skipped", send_idxs)             these tasks were dropped unstarted (never computed,
                                       no "ok" or "err" follows for them)
    ("err", send_idx, exc_payload, type_name, message, traceback_text)
                                       dataset[index] (send_idx), or start-up / dataset update
                                       (send_idx None) raised; exc_payload is the pickled
                                       exception (process mode; None if it cannot round-trip
                                       through pickle) or the exception itself (thread mode)

Messages are handled in the order sent, except ``("skip", ...)``: before starting each task,
a worker whose channel has ``read_ahead`` (:class:`ConnectionChannel`: worker processes)
reads every message already readable, without blocking, into its own queue, and handles a
skip at once, dropping the named tasks still queued. So orphaned prefetches behind the task
it computes are not computed (issue 17: with 1 s batches and ``max_queue_size=10`` an epoch
boundary cost each process worker up to ~10 s). Worker threads need no read-ahead: the main
side takes their queued tasks back from the mailbox (``Transport.withdraw``). A Ray actor
gets one message per ``step`` call and each call returns only once the loop is idle (NOTE
[ Ray workers ]), so there is nothing to read ahead: its orphans are computed and dropped.

A :class:`Channel` carries the messages: :class:`ConnectionChannel` wraps one end of a
``multiprocessing`` duplex pipe (no ``mp.Queue``: no feeder thread, no semaphore to leak),
:class:`QueueChannel` a pair of in-memory mailboxes for worker threads.

NOTE [ Workers never hang ]
A worker waits for messages with :data:`WORKER_POLL_INTERVAL` timeouts. The process channel
also wakes when the parent's sentinel (``multiprocessing.parent_process().sentinel``) fires,
and every :data:`WATCHDOG_INTERVAL` seconds the worker checks with psutil that the main
process (pid *and* creation time, so a recycled pid does not fool it) still exists; either
way an orphaned worker exits on its own within seconds. Worker processes ignore SIGINT, as
torch's do: Ctrl-C in a terminal reaches the whole process group, and the main process, which
gets ``KeyboardInterrupt``, shuts the workers down in order instead of having them die
mid-send. SIGTERM (sent by ``close()`` to a worker still busy after the grace period) unwinds
the worker so that it unlinks its shared-memory blocks before exiting.
"""

from __future__ import annotations

import collections
import math
import os
import random
import select
import signal
import threading
import time
import traceback
from dataclasses import dataclass, replace
from typing import Any, Protocol

from . import _batch_blocks, _seeds, _stall
from ._preload import WorkerPayload

__all__ = [
    "WATCHDOG_INTERVAL",
    "WORKER_POLL_INTERVAL",
    "Channel",
    "ConnectionChannel",
    "QueueChannel",
    "RemoteTraceback",
    "WorkerConfig",
    "WorkerInfo",
    "derive_seed",
    "get_worker_info",
    "process_entry",
    "rebuild_exception",
    "thread_channel_pair",
    "worker_main",
]

# How long a worker waits for a message before looking at its watchdog (seconds). The wait
# wakes at once for a message or, in a process, when the parent's sentinel fires; the timeout
# only bounds how late the psutil check below runs, so it can be long-ish.
WORKER_POLL_INTERVAL = 0.5

# How often an idle worker checks with psutil that the main process still exists (seconds).
# The parent sentinel catches the usual cases immediately; this is the fallback (a forkserver
# child's parent is the server, a forked sibling may hold the sentinel's write end). One
# psutil call costs ~20 us, so 1 s is free and keeps orphan lifetime to about a second.
WATCHDOG_INTERVAL = 1.0

# Message kinds, see NOTE [ Worker protocol ].
TASK = "task"
DATASET = "dataset"
RELEASE = "release"
STOP = "stop"
READY = "ready"
OK = "ok"
UPDATED = "updated"
ERR = "err"
SKIP = "skip"
SKIPPED = "skipped"


# ---------------------------------------------------------------------------------------------
# Worker information and seeding
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WorkerInfo:
    """What ``dataset[i]`` can learn about the worker running it.

    Attributes:
        id (int): the worker's index, ``0 <= id < num_workers``.
        num_workers (int): how many workers the pool has.
        seed (int): this worker's seed (a 64-bit integer derived from the pool's seed and
            ``id``); ``random`` and NumPy's legacy global RNG were seeded from it in worker
            processes. Use it to seed your own generators, e.g.
            ``numpy.random.default_rng(info.seed)``.
    """

    id: int
    num_workers: int
    seed: int


_process_info: WorkerInfo | None = None  # set once in a worker process
_process_blocks: _batch_blocks.BlockPool | None = None  # this worker process's batch blocks
_thread_info = threading.local()  # set in each worker thread


def get_worker_info() -> WorkerInfo | None:
    """Information about the current worker, or None in the main process.

    Call it inside ``dataset[i]`` (or ``worker_init_fn``) to shard work or seed per worker,
    like ``torch.utils.data.get_worker_info()``.

    Returns:
        WorkerInfo | None: ``id``, ``num_workers`` and ``seed`` of the worker process or
        thread running the caller; None when called from the main process (outside workers).
    """
    info = getattr(_thread_info, "info", None)
    return info if info is not None else _process_info


def derive_seed(base_seed: int, worker_id: int) -> tuple[int, list[int]]:
    """Derive a worker's seeds from the pool's seed, independent for every worker.

    Uses ``numpy.random.SeedSequence(base_seed, spawn_key=(worker_id,))``, NumPy's recommended
    way to make statistically independent streams (unlike ``base_seed + worker_id``).

    Args:
        base_seed (int): the pool's seed (non-negative).
        worker_id (int): the worker's index.

    Returns:
        tuple[int, list[int]]: a 64-bit integer (for ``random.seed`` and
        :attr:`WorkerInfo.seed`) and four 32-bit words (for ``numpy.random.seed``, which only
        accepts values below 2**32 or arrays of them).
    """
    import numpy as np

    words = np.random.SeedSequence(base_seed, spawn_key=(worker_id,)).generate_state(4)
    seed64 = int(words[0]) | (int(words[1]) << 32)
    return seed64, [int(w) for w in words]


def _seed_globals(seed64: int, words: list[int]) -> None:
    import numpy as np

    random.seed(seed64)
    np.random.seed(words)


def _enter_batch(config: WorkerConfig, pass_number: int, index: Any) -> None:
    """Set up the batch context (and, with ``seed=``, reseed a process's globals)."""
    ctx = _seeds.enter_batch(config.base_seed, pass_number, index, not config.in_process)
    if config.in_process and config.seed_batches:
        words = ctx.seed_sequence().generate_state(4)
        _seed_globals(int(words[0]) | (int(words[1]) << 32), [int(w) for w in words])


# ---------------------------------------------------------------------------------------------
# Channels
# ---------------------------------------------------------------------------------------------


class Channel(Protocol):
    """One end of a bidirectional message link between the main side and one worker.

    ``send`` never blocks for long (the peer is always reading or about to); ``recv`` blocks
    until a message arrives, so call it after ``poll`` returned True. Both raise ``EOFError``
    or ``OSError`` when the peer is gone.
    """

    def send(self, msg: tuple) -> None:
        """Send one message."""

    def recv(self) -> tuple:
        """Receive one message (blocks until one is there)."""

    def poll(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for a message; True if one can be received."""

    def close(self) -> None:
        """Close this end; the peer's ``recv``/``poll`` then raise ``EOFError``."""


class FdPoll:
    """Readiness of a fixed set of file descriptors, through one ``select.poll`` object.

    ``multiprocessing.connection.wait`` (which ``Connection.poll`` calls) builds a
    ``selectors.PollSelector`` and registers every object on each call: measured 15-36 us
    per call on this 2-core machine against 3-7 us for a ``poll`` object made once, and the
    main process calls it two or three times per batch (issue 18 item 4). Same semantics as
    ``PollSelector`` for reading: any event on a descriptor - ``POLLIN``, ``POLLHUP`` (the
    writer closed), ``POLLERR``, ``POLLNVAL`` (closed here) - makes it ready, so the caller's
    ``recv`` then reads the message or raises ``EOFError``/``OSError`` as before. A ``poll``
    object is plain user-space state (no kernel object, unlike ``epoll``), so a fork child
    may use an inherited one. POSIX only (:meth:`supported`); Windows keeps
    ``multiprocessing.connection.wait``, which waits on pipe and process handles there.

    Args:
        fds (list[int]): the descriptors, open for as long as this object is used.
    """

    __slots__ = ("_poll",)

    def __init__(self, fds: list[int]) -> None:
        self._poll = select.poll()
        for fd in fds:
            self._poll.register(fd, select.POLLIN)

    @staticmethod
    def supported() -> bool:
        """True where ``select.poll`` exists (POSIX; not Windows)."""
        return hasattr(select, "poll")

    def ready(self, timeout: float | None) -> list[int]:
        """The descriptors with an event, waiting up to ``timeout`` seconds (None: no limit).

        The timeout is rounded up to whole milliseconds, as ``selectors.PollSelector`` does,
        so a short positive timeout waits instead of spinning. ``EINTR`` is retried by
        Python (PEP 475).

        Returns:
            list[int]: the ready descriptors; empty when the timeout passed.
        """
        ms = -1 if timeout is None else max(0, math.ceil(timeout * 1e3))
        return [fd for fd, _ in self._poll.poll(ms)]


class ConnectionChannel:
    """A :class:`Channel` over one end of a ``multiprocessing`` duplex pipe.

    Args:
        conn (multiprocessing.connection.Connection): this end of ``ctx.Pipe(duplex=True)``.
        parent_sentinel (int | None): in a worker process, the parent's sentinel
            (``multiprocessing.parent_process().sentinel``): :meth:`poll` then raises
            ``EOFError`` as soon as the main process is gone (default: None).
    """

    # The worker loop reads ahead of its current task (NOTE [ Worker protocol ]).
    read_ahead = True

    def __init__(self, conn: Any, parent_sentinel: int | None = None) -> None:
        self.conn = conn
        self._parent_sentinel = parent_sentinel
        self._poller: FdPoll | None = None  # made on first poll (POSIX)

    def send(self, msg: tuple) -> None:
        """Pickle and send ``msg`` (nothing is written if pickling fails)."""
        self.conn.send(msg)

    def recv(self) -> tuple:
        """Receive one message; raises ``EOFError`` when the other end is closed."""
        return self.conn.recv()

    def poll(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for a message.

        Raises:
            EOFError: the parent's sentinel fired (the main process is gone).
        """
        if FdPoll.supported():
            if self.conn.closed:
                raise OSError("handle is closed")  # as Connection.poll says it
            if self._poller is None:
                fds = [self.conn.fileno()]
                if self._parent_sentinel is not None:
                    fds.append(self._parent_sentinel)
                self._poller = FdPoll(fds)
            ready = self._poller.ready(timeout)
            if self.conn.fileno() in ready:
                return True
            if ready:
                raise EOFError("the main process is gone (parent sentinel fired)")
            return False
        if self._parent_sentinel is None:
            return self.conn.poll(timeout)
        from multiprocessing.connection import wait

        ready = wait([self.conn, self._parent_sentinel], timeout)
        if self.conn in ready:
            return True
        if ready:
            raise EOFError("the main process is gone (parent sentinel fired)")
        return False

    def close(self) -> None:
        """Close this end of the pipe (idempotent)."""
        self.conn.close()


class _Mailbox:
    """A deque of messages plus the condition that announces new ones."""

    def __init__(self, cond: threading.Condition) -> None:
        self.cond = cond
        self.items: collections.deque = collections.deque()
        self.closed = False

    def put(self, msg: tuple) -> None:
        with self.cond:
            if self.closed:
                raise EOFError("the channel is closed")
            self.items.append(msg)
            self.cond.notify_all()

    def close(self) -> None:
        with self.cond:
            self.closed = True
            self.cond.notify_all()

    def ready(self) -> bool:
        return bool(self.items) or self.closed


class QueueChannel:
    """A :class:`Channel` between two threads of one process: objects pass by reference.

    Make pairs with :func:`thread_channel_pair`.

    Args:
        inbox (_Mailbox): where this end receives.
        outbox (_Mailbox): where this end sends (the peer's inbox).
    """

    def __init__(self, inbox: _Mailbox, outbox: _Mailbox) -> None:
        self.inbox = inbox
        self.outbox = outbox

    def send(self, msg: tuple) -> None:
        """Append ``msg`` to the peer's inbox; ``EOFError`` if the peer closed."""
        self.outbox.put(msg)

    def recv(self) -> tuple:
        """Take the oldest message, waiting for one; ``EOFError`` once closed and empty."""
        with self.inbox.cond:
            self.inbox.cond.wait_for(self.inbox.ready)
            if self.inbox.items:
                return self.inbox.items.popleft()
            raise EOFError("the channel is closed")

    def poll(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for a message (True also when closed: recv raises)."""
        with self.inbox.cond:
            return self.inbox.cond.wait_for(self.inbox.ready, timeout)

    def ready(self) -> bool:
        """True if :meth:`recv` would not block (call with ``inbox.cond`` held)."""
        return self.inbox.ready()

    def close(self) -> None:
        """Close both directions: the peer's ``recv`` raises ``EOFError`` once drained."""
        self.outbox.close()
        self.inbox.close()


def thread_channel_pair(main_cond: threading.Condition) -> tuple[QueueChannel, QueueChannel]:
    """Make the two ends of a channel between the main thread and one worker thread.

    Args:
        main_cond (threading.Condition): shared by the main ends of all of a pool's channels,
            so the main side can wait for a message from any worker at once.

    Returns:
        tuple[QueueChannel, QueueChannel]: ``(main_end, worker_end)``.
    """
    to_main = _Mailbox(main_cond)
    to_worker = _Mailbox(threading.Condition(threading.Lock()))
    return QueueChannel(to_main, to_worker), QueueChannel(to_worker, to_main)


# ---------------------------------------------------------------------------------------------
# Exceptions across the boundary
# ---------------------------------------------------------------------------------------------


class RemoteTraceback(Exception):
    """The formatted traceback of an exception raised in a worker, shown as ``__cause__``.

    Same idea as ``concurrent.futures.process._RemoteTraceback``.

    Args:
        tb (str): the worker's formatted traceback.
    """

    def __init__(self, tb: str) -> None:
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return f'\n"""\n{self.tb}"""'


def _pack_exception(exc: BaseException, send_idx: int | None, by_reference: bool) -> tuple:
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    type_name = f"{type(exc).__module__}.{type(exc).__qualname__}"
    if by_reference:
        payload: Any = exc
    else:
        from ._serialize import dumps, loads

        try:
            payload = dumps(exc, root="exception")
            loads(payload)  # catches the classic: an __init__ that needs more arguments
        except Exception:
            payload = None
    return (ERR, send_idx, payload, type_name, _safe_str(exc), tb)


def _safe_str(exc: BaseException) -> str:
    try:
        return str(exc)
    except Exception:  # a broken __str__ must not hide the original error
        return f"<{type(exc).__name__} with unprintable message>"


def rebuild_exception(msg: tuple, by_reference: bool) -> BaseException:
    """Turn an ``("err", ...)`` message back into an exception to raise in the main process.

    Args:
        msg (tuple): ``("err", send_idx, exc_payload, type_name, message, traceback_text)``.
        by_reference (bool): True in thread mode, where ``exc_payload`` is the exception.

    Returns:
        BaseException: the worker's exception, of the same type when it could be pickled
        (otherwise a ``RuntimeError`` naming the original type and message), with a
        :class:`RemoteTraceback` holding the worker's traceback as ``__cause__``.
    """
    _, _, payload, type_name, message, tb = msg
    exc: BaseException | None = None
    if by_reference:
        exc = payload
    elif payload is not None:
        from ._serialize import loads

        try:
            exc = loads(payload)
        except Exception:
            exc = None
    if not isinstance(exc, BaseException):
        exc = RuntimeError(
            f"{type_name}: {message} (raised in a worker; the exception could not be pickled "
            "back to the main process, so it is re-raised as RuntimeError)"
        )
    exc.__cause__ = RemoteTraceback(tb)
    return exc


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WorkerConfig:
    """Everything one worker needs; pickled (by value) to a spawned worker process.

    Attributes:
        worker_id (int): this worker's index.
        num_workers (int): size of the pool.
        base_seed (int): the pool's seed; see :func:`derive_seed`.
        dataset (object): process workers and Ray actors: the dataset as bytes from
            :func:`compatmp._serialize.dumps` or a :class:`compatmp._preload.WorkerPayload`
            (the worker calls its ``load()``); worker threads and fork: the object itself.
        init_fn (object): ``worker_init_fn`` as bytes (process mode), the callable (thread
            mode), or None.
        in_process (bool): True for worker processes: exceptions are pickled, globals seeded,
            SIGINT ignored, the parent watched.
        main_pid (int): process id of the main process (for the watchdog); 0: nothing to
            watch (Ray actors: Ray ends an actor whose owner is gone).
        shm_prefix (str | None): block name prefix; None disables shared memory.
        shm_threshold (int): arrays of at least this many bytes use shared memory.
        seed_batches (bool): reseed ``random`` and NumPy's global RNG before every batch
            (process workers; NOTE [ Per-batch seeds ]); True when the pool got ``seed=``.
        stack_file (str | None): where to dump this worker's stack on SIGUSR1 (process
            workers; NOTE [ Stall reports ] in :mod:`compatmp._stall`); None: no dumps.
    """

    worker_id: int
    num_workers: int
    base_seed: int
    dataset: Any
    init_fn: Any = None
    in_process: bool = True
    main_pid: int = 0
    shm_prefix: str | None = None
    shm_threshold: int = _batch_blocks.SHM_THRESHOLD
    seed_batches: bool = False
    stack_file: str | None = None


class _MainGone(Exception):
    """The main side closed its end: leave the loop quietly."""


class _Terminated(BaseException):
    """SIGTERM arrived: unwind (unlinking shared memory on the way) and exit."""


def _on_sigterm(signum: int, frame: Any) -> None:
    raise _Terminated


def _parent_watchdog(main_pid: int) -> Any:
    """A callable returning False once the main process is gone (pid and creation time)."""
    import psutil

    try:
        proc = psutil.Process(main_pid)
    except psutil.Error:
        return lambda: False
    return proc.is_running


def _materialize(obj: Any, in_process: bool) -> Any:
    if in_process and isinstance(obj, bytes):
        from ._serialize import loads

        return loads(obj)
    if in_process and isinstance(obj, WorkerPayload):
        return obj.load()  # e.g. NOTE [ Shared dataset buffers ] in compatmp._shared_data
    return obj


def worker_main(channel: Channel, config: WorkerConfig) -> None:
    """Run one worker until told to stop or until the main side is gone.

    The target of worker processes and worker threads alike; see NOTE [ Worker protocol ].

    Args:
        channel (Channel): this worker's end of its channel to the main side.
        config (WorkerConfig): the worker's settings and dataset.
    """
    global _process_info
    # Signal handlers need the main thread; a Ray actor runs this loop in a thread of its own
    # and Ray handles the actor process's signals (NOTE [ Ray workers ] in compatmp._ray).
    if config.in_process and threading.current_thread() is threading.main_thread():
        # NOTE [ Workers never hang ]: Ctrl-C is for the main process; SIGTERM unwinds.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        if hasattr(signal, "pthread_sigmask"):  # born blocked (_launch._sigint_blocked)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
        signal.signal(signal.SIGTERM, _on_sigterm)
        if config.stack_file is not None:
            _stall.install_in_worker(config.stack_file)
    seed64, words = derive_seed(config.base_seed, config.worker_id)
    info = WorkerInfo(config.worker_id, config.num_workers, seed64)
    if config.in_process:
        _process_info = info
        _seed_globals(seed64, words)  # threads share the main's RNGs: leave them alone
    else:
        _thread_info.info = info
    blocks = None
    if config.shm_prefix is not None:
        blocks = _batch_blocks.BlockPool(config.shm_prefix, config.shm_threshold)
    if config.in_process:
        global _process_blocks
        _process_blocks = blocks  # for compatmp.empty() (compatmp._alloc)
    try:
        try:
            dataset = _materialize(config.dataset, config.in_process)
            init_fn = _materialize(config.init_fn, config.in_process)
            if init_fn is not None:
                init_fn(config.worker_id)
        except _Terminated:
            raise
        except BaseException as exc:
            _send(channel, _pack_exception(exc, None, not config.in_process))
            return
        _send(channel, (READY, config.worker_id, os.getpid()))
        _loop(channel, config, dataset, blocks)
    except (_MainGone, _Terminated):
        pass
    finally:
        if blocks is not None:
            blocks.close()  # NOTE [ Shared-memory ownership ], rule 3
        if not config.in_process:
            _thread_info.info = None
            _seeds.leave_thread()
        channel.close()


def _reset(config: WorkerConfig, base_seed: int, seed_batches: bool) -> WorkerConfig:
    """A reused worker's new call: seeds and :func:`get_worker_info` as in a fresh worker."""
    global _process_info
    config = replace(config, base_seed=base_seed, seed_batches=seed_batches)
    seed64, words = derive_seed(base_seed, config.worker_id)
    info = WorkerInfo(config.worker_id, config.num_workers, seed64)
    if config.in_process:
        _process_info = info
        _seed_globals(seed64, words)
    else:
        _thread_info.info = info
    return config


def _send(channel: Channel, msg: tuple) -> None:
    try:
        channel.send(msg)
    except (EOFError, OSError) as exc:
        raise _MainGone from exc


def _loop(
    channel: Channel, config: WorkerConfig, dataset: Any, blocks: _batch_blocks.BlockPool | None
) -> None:
    alive = _parent_watchdog(config.main_pid) if config.in_process and config.main_pid else None
    next_check = time.monotonic() + WATCHDOG_INTERVAL
    read_ahead = getattr(channel, "read_ahead", False)
    pending: collections.deque[tuple] = collections.deque()  # read, not yet handled
    while True:
        if not pending:
            try:
                if not channel.poll(WORKER_POLL_INTERVAL):
                    if alive is not None and time.monotonic() >= next_check:
                        if not alive():
                            return
                        next_check = time.monotonic() + WATCHDOG_INTERVAL
                    continue
                pending.append(channel.recv())
            except (EOFError, OSError):
                return
        if read_ahead and pending[0][0] == TASK:  # a skip behind it may drop it
            if not _read_ahead(channel, pending):
                return
            if not pending:
                continue
        msg = pending.popleft()
        kind = msg[0]
        if kind == SKIP:  # read in order (a channel without read-ahead)
            _skip(channel, pending, msg[1])
        elif kind == TASK:
            _run_task(channel, config, dataset, msg[1], msg[2], blocks, msg[3])
        elif kind == DATASET:
            try:
                if len(msg) > 3:  # a reused worker's new call: NOTE [ Reused workers ]
                    dataset = None  # the old dataset goes first, whatever follows
                    config = _reset(config, msg[3], msg[4])
                dataset = _materialize(msg[2], config.in_process)
                init_fn = _materialize(msg[5], config.in_process) if len(msg) > 3 else None
                if init_fn is not None:
                    init_fn(config.worker_id)
            except _Terminated:
                raise
            except BaseException as exc:
                _send(channel, _pack_exception(exc, None, not config.in_process))
            else:
                _send(channel, (UPDATED, msg[1]))
        elif kind == RELEASE:
            if blocks is not None:
                blocks.release(msg[1])
        elif kind == STOP:
            return
        else:  # pragma: no cover - protocol bug
            raise RuntimeError(f"compatmp worker got an unknown message kind {kind!r}")


def _read_ahead(channel: Channel, pending: collections.deque) -> bool:
    """Move every message readable now into ``pending``, handling skips at once.

    Called before starting a task (NOTE [ Worker protocol ]): the tasks a ``("skip", ...)``
    names were sent before it, so they are all in ``pending`` by the time it is read.

    Returns:
        bool: False when the main side is gone (the loop ends).
    """
    try:
        while channel.poll(0):
            msg = channel.recv()
            if msg[0] == SKIP:
                _skip(channel, pending, msg[1])
            else:
                pending.append(msg)
    except (EOFError, OSError):
        return False
    return True


def _skip(channel: Channel, pending: collections.deque, send_idxs: Any) -> None:
    """Drop the queued tasks of ``send_idxs`` and say which (``("skipped", ...)``).

    Tasks of ``send_idxs`` not in ``pending`` were computed already: their results are on
    their way, and the main side drops them.
    """
    wanted = set(send_idxs)
    dropped = tuple(m[1] for m in pending if m[0] == TASK and m[1] in wanted)
    if dropped:
        kept = [m for m in pending if not (m[0] == TASK and m[1] in wanted)]
        pending.clear()
        pending.extend(kept)
        _send(channel, (SKIPPED, dropped))


def _run_task(
    channel: Channel,
    config: WorkerConfig,
    dataset: Any,
    send_idx: int,
    index: Any,
    blocks: _batch_blocks.BlockPool | None,
    pass_number: int = 0,
) -> None:
    by_reference = not config.in_process
    try:
        _enter_batch(config, pass_number, index)
        batch = dataset[index]
        if blocks is not None:
            batch = blocks.encode(batch, send_idx)
    except _Terminated:
        raise
    except BaseException as exc:
        _send(channel, _pack_exception(exc, send_idx, by_reference))
        return
    try:
        dropped = blocks.take_dropped() if blocks is not None else []
        channel.send((OK, send_idx, batch, dropped))
    except _Terminated:
        raise
    except (EOFError, OSError) as exc:
        raise _MainGone from exc  # blocks are unlinked on the way out
    except BaseException as exc:  # the batch cannot be pickled
        if blocks is not None:
            blocks.dropped[:0] = dropped  # not sent either: say it with the next batch
            blocks.release(send_idx)  # never sent: ours to reuse at once
        _send(channel, _pack_exception(exc, send_idx, by_reference))


def process_entry(conn: Any, config: WorkerConfig) -> None:
    """Entry point of a worker process: wrap the pipe end, then run :func:`worker_main`.

    Args:
        conn (multiprocessing.connection.Connection): the worker's end of its duplex pipe.
        config (WorkerConfig): the worker's settings and dataset.
    """
    import multiprocessing

    parent = multiprocessing.parent_process()
    sentinel = parent.sentinel if parent is not None else None
    worker_main(ConnectionChannel(conn, parent_sentinel=sentinel), config)
