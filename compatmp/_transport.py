"""The worker-transport interface: what the running pool needs from any kind of worker.

The running pool (:mod:`compatmp._core`) drives its workers only through the two classes
here, so it never asks which kind of worker it has. Three implementations, one module each:

- :mod:`compatmp._processes`: worker processes (fork, forkserver, spawn) over duplex pipes,
  batches through shared memory; started by :mod:`compatmp._launch`.
- :mod:`compatmp._threads`: worker threads of the main process over in-memory mailboxes.
- :mod:`compatmp._ray`: Ray actors, one Ray call per message.

NOTE [ Worker transports ]
A transport carries NOTE [ Worker protocol ] messages between the main side and each worker
and knows how its workers start, live, die and stop. Its six jobs, and the methods doing
them:

1. start: :meth:`Transport.start` (completes each :class:`compatmp._worker.WorkerConfig`
   with what only this transport knows: ``in_process``, ``shm_prefix``, ``stack_file``);
2. send: :meth:`WorkerHandle.send` (``EOFError``/``OSError`` when the worker is gone);
3. wait for the next event: :meth:`Transport.wait` (which workers have messages, which died)
   and :meth:`WorkerHandle.receive` (the messages that can be read now);
4. request a stack: :meth:`WorkerHandle.stack` (NOTE [ Stall reports ] in
   :mod:`compatmp._stall`);
5. describe a death: :meth:`WorkerHandle.describe_death`;
6. shut down: :meth:`Transport.shutdown`, after the core sent every worker ``("stop",)``,
   and :meth:`Transport.sweep` once the dataset's own blocks are gone too. Shutdown also
   follows a failed start-up, so it copes with workers that never started, and runs each
   step through :func:`shutdown_step`: one failing step is logged and the others still run.

Plus what differs in how a message's contents arrive: :meth:`Transport.blocks_of` (which
shared-memory blocks a batch names; none for threads) and :meth:`Transport.rebuild_exception`
(a pickled exception, or the object itself); and :meth:`Transport.withdraw`, taking back
tasks a worker has not started (orphans before a dataset update; threads and Ray can), and
:attr:`Transport.skips_orphans`: its workers read ahead and answer ``("skip", send_idxs)``
(processes), so the core asks them to skip the orphans it could not take back.
Everything else (dispatch, the reorder buffer, the task records of :mod:`compatmp._tasks`,
timeouts, stall policy, errors) is the core's, the same code for every transport. A new
kind of worker (a subinterpreter, a context of another library) is one more module
implementing these two classes.
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Callable, Iterator
from typing import Any

from . import _worker

__all__ = [
    "MAIN_POLL_INTERVAL",
    "Transport",
    "WorkerHandle",
    "describe_exit",
    "shutdown_step",
    "take_back_tasks",
]

# How long the main side waits for a message before re-checking deadlines and thread
# liveness (seconds): the core's pump and the process transport's shutdown drain alike.
# Messages and process deaths (sentinels) wake the wait immediately; this only bounds how
# late a per-batch ``timeout`` or a vanished worker *thread* is noticed.
MAIN_POLL_INTERVAL = 0.1

_log = logging.getLogger("compatmp")


def shutdown_step(what: str, step: Callable[[], object]) -> bool:
    """Run one step of a shutdown; a failure is logged, never raised, so the next steps run.

    Every step of closing a pool (stop each worker, join it, close its pipe and stack file,
    unlink the dataset's blocks, sweep) is independent: one that fails (an ``OSError`` from a
    pipe, a process that never started) must not leave the others undone, nor hide the error
    that made the pool close (a failed start-up re-raises its own cause).

    Args:
        what (str): the step, for the log, e.g. ``"joining worker 1 (pid 1234)"``.
        step (Callable[[], object]): does it; its return value is ignored.

    Returns:
        bool: True if the step ran without an exception.
    """
    try:
        step()
    except Exception:
        _log.warning(
            "compatmp: %s failed while shutting the pool down; the other steps ran",
            what,
            exc_info=True,
        )
        return False
    return True


def take_back_tasks(queue: Any, send_idxs: set[int]) -> list[int]:
    """Remove the ``("task", send_idx, ...)`` messages of ``send_idxs`` from ``queue``.

    What :meth:`Transport.withdraw` does where the transport still holds the messages a
    worker has not received (threads: the worker's mailbox; Ray: the calls not yet submitted).

    Args:
        queue (collections.deque | list): NOTE [ Worker protocol ] messages, oldest first;
            changed in place, the other messages kept in order. The caller holds whatever
            lock guards it.
        send_idxs (set[int]): the tasks to take back.

    Returns:
        list[int]: the send_idxs removed, in queue order.
    """
    taken = [m[1] for m in queue if m[0] == _worker.TASK and m[1] in send_idxs]
    if taken:
        kept = [m for m in queue if not (m[0] == _worker.TASK and m[1] in send_idxs)]
        queue.clear()
        queue.extend(kept)
    return taken


def describe_exit(code: int | None) -> str:
    """How a worker process ended, for an error message.

    Args:
        code (int | None): the exit code; negative: killed by that signal (as
            ``multiprocessing.Process.exitcode``); None: unknown.

    Returns:
        str: e.g. ``"was killed by SIGKILL (exit code -9) (often the out-of-memory killer: ...)"``.
    """
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


class WorkerHandle:
    """The main side's view of one worker, whatever runs it.

    Attributes:
        id (int): the worker's index, ``0 <= id < workers``.
        channel (compatmp._worker.Channel): the main side's end of the worker's channel.
        pid (int | None): the worker's process id when it has its own process (None for a
            thread, or a Ray actor before it reported).
        ready (bool): the worker sent ``("ready", ...)``: dataset loaded, seeds set.
        stopping (bool): the core sent ``("stop",)`` (its death is then expected).
        version (int): the last dataset version the worker acknowledged.
    """

    def __init__(self, worker_id: int, channel: Any) -> None:
        self.id = worker_id
        self.channel = channel
        self.pid: int | None = None
        self.ready = False
        self.stopping = False
        self.version = 0

    # -- sending and receiving -----------------------------------------------------------------

    def send(self, msg: tuple) -> None:
        """Send one message of NOTE [ Worker protocol ].

        Raises:
            EOFError, OSError: the worker is gone.
            Exception: ``msg`` cannot be pickled (processes, Ray): nothing was sent.
        """
        self.channel.send(msg)

    def receive(self) -> Iterator[tuple]:
        """The messages that can be read now, oldest first, without blocking.

        Stops quietly when the worker is gone (its death is reported by :meth:`Transport.wait`).
        """
        ch = self.channel
        while True:
            try:
                if not ch.poll(0):
                    return
                msg = ch.recv()
            except (EOFError, OSError):
                return
            yield msg

    # -- life and death ------------------------------------------------------------------------

    def is_alive(self) -> bool:
        """True while the worker runs."""
        raise NotImplementedError

    def wait_for_exit(self, timeout: float) -> None:
        """After a failed send: give a dying worker up to ``timeout`` seconds to end."""

    def exitcode(self, wait: float) -> int | None:
        """The exit code (negative: killed by that signal), after reaping up to ``wait`` s."""
        return None

    def describe_death(self, code: int | None) -> tuple[str, str]:
        """``(who, how)`` for :class:`compatmp.WorkerCrashedError`'s message.

        Args:
            code (int | None): what :meth:`exitcode` returned.
        """
        return self.label(), describe_exit(code)

    def label(self) -> str:
        """The worker as error messages name it, e.g. ``"worker 1 (pid 1234)"``."""
        return f"worker {self.id}" + (f" (pid {self.pid})" if self.pid is not None else "")

    def on_ready(self) -> None:
        """The worker reported ready (called once, by the core)."""

    # -- stall reports -------------------------------------------------------------------------

    def stall_label(self) -> str:
        """The worker as a stall report names it (NOTE [ Stall reports ])."""
        return self.label()

    def stack(self) -> str:
        """The worker's Python stack now, or a sentence saying why there is none."""
        return "(no stack: this kind of worker cannot report its stack)"


class Transport:
    """One pool's workers of one kind: starts them, waits on them, stops them.

    Subclasses implement :meth:`start`, :meth:`wait` and :meth:`shutdown`; the rest has
    defaults that fit workers in processes.

    Args:
        method (str): the start method the pool resolved (``"fork"``, ``"thread"``, ...).
        stall_timeout (float | None): the pool's stall timeout in seconds (None or 0: no
            stall reports, so no stack files are prepared).

    Attributes:
        handles (list[WorkerHandle]): one per worker, index = worker id; filled by
            :meth:`start` as the workers start (so a failed start can be shut down).
        shm_prefix (str | None): name prefix of the workers' shared-memory blocks (None: the
            transport sends batches some other way).
    """

    # True when the workers' channel reads ahead of the current task (NOTE [ Worker
    # protocol ]): the core then sends ("skip", send_idxs) for orphans not taken back.
    skips_orphans = False

    def __init__(self, method: str, stall_timeout: float | None) -> None:
        self.method = method
        self.stall_timeout = stall_timeout
        self.handles: list[WorkerHandle] = []
        self.shm_prefix: str | None = None

    def start(self, configs: list[_worker.WorkerConfig]) -> None:
        """Start one worker per config, appending a handle to :attr:`handles` for each.

        Raises:
            Exception: whatever starting a worker raised; the workers started so far are in
                :attr:`handles`, for :meth:`shutdown`.
        """
        raise NotImplementedError

    def wait(
        self, handles: list[WorkerHandle], timeout: float
    ) -> tuple[list[WorkerHandle], list[WorkerHandle]]:
        """Wait up to ``timeout`` seconds for the next event of any of ``handles``.

        Returns:
            tuple[list, list]: handles with messages to :meth:`WorkerHandle.receive`, and
            handles whose worker is gone.
        """
        raise NotImplementedError

    def withdraw(self, handle: WorkerHandle, send_idxs: set[int]) -> list[int]:
        """Take back tasks of ``send_idxs`` that ``handle``'s worker has not started.

        Orphaned prefetches before a dataset update need not be computed: where the transport
        can still reach the queued message (threads: the worker's mailbox), it removes it.

        Args:
            handle (WorkerHandle): the worker.
            send_idxs (set[int]): the tasks the core would like back (its orphans).

        Returns:
            list[int]: those taken back; the worker will never see them. Default: none (a
            message in a pipe cannot be taken back).
        """
        return []

    def blocks_of(self, batch: Any) -> list[str]:
        """Names of the shared-memory blocks a received batch views (none: nothing to lease)."""
        return []

    def rebuild_exception(self, msg: tuple) -> BaseException:
        """The exception of an ``("err", ...)`` message (:func:`_worker.rebuild_exception`)."""
        return _worker.rebuild_exception(msg, by_reference=False)

    def shutdown(self, deadline: float, drain: Callable[[WorkerHandle], None]) -> None:
        """End every worker (the core has sent each ``("stop",)``) and free what they hold.

        Args:
            deadline (float): ``time.monotonic()`` until which workers may finish their batch.
            drain (Callable[[WorkerHandle], None]): receives and discards what a worker sent
                (so none blocks sending a batch, and its blocks are unlinked); never raises.
        """
        raise NotImplementedError

    def sweep(self) -> None:
        """After :meth:`shutdown` and the dataset's blocks: free what dead workers left."""

    def forget_in_child(self) -> None:
        """In a forked child: close inherited main-side ends, never touch the workers."""
