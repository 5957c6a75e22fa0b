"""The running pool's task records: one record per dispatched task, and its invariants.

NOTE [ Task records ]
Every task the pool sends a worker (``("task", send_idx, index, pass)``) has one
:class:`Task` record in the pool's :class:`TaskTable`, keyed by ``send_idx``, from dispatch
until nothing of it is left: its result delivered or dropped, its shared-memory blocks
released. A record's ``state`` is one of::

    queued    at its worker, behind another task          --+
    running   at its worker, the oldest one there             |  "at the worker"
    orphaned  at its worker; the consumer will not read it  --+  (counted by load())
    done      its result (batch or failure) is here, waiting for the consumer
    leased    the result is gone (delivered or dropped) but the batch's blocks are still
              mapped: waiting for ("release", send_idx) to go to its worker

    dispatch -> queued/running --result--> done --taken--> leased --blocks released--> (gone)
                     |                       |                 (no blocks: gone at once)
                     +--forget--> orphaned --result--> leased / gone (result dropped)
                                      orphaned --skipped--> gone (never computed)
                                             done --forget--> leased / gone

"Released" is the end: the record is removed and counted. Each invariant of the pool is
one function over the records (:meth:`TaskTable.check`): every index is delivered at most
once, and exactly once unless the consumer forgot it; an orphan's result is dropped, never
stored; every block is released exactly once; a worker's tasks are in send order with the
oldest one running. An orphan its worker had not started may be skipped (a worker thread's
task taken back from its mailbox, or a process worker's answer to ``("skip", send_idxs)``:
NOTE [ Worker protocol ]): it is dropped as if its result had arrived, and counted
``skipped`` too. The pool (:mod:`compatmp._core`) changes records only through the
methods here, all called with its I/O lock held; the table itself is not thread-safe.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterable
from typing import Any

__all__ = [
    "AT_WORKER",
    "DONE",
    "LEASED",
    "ORPHANED",
    "QUEUED",
    "RUNNING",
    "Task",
    "TaskTable",
]

QUEUED = "queued"
RUNNING = "running"
ORPHANED = "orphaned"
DONE = "done"
LEASED = "leased"
AT_WORKER = frozenset({QUEUED, RUNNING, ORPHANED})


class Task:
    """One dispatched task (see NOTE [ Task records ]).

    Attributes:
        send_idx (int): the pool-wide sequence number of the task (its key).
        index (object): the batch index the consumer asked for.
        pass_number (int): the pass (``imap`` call) it belongs to.
        worker (int): the id of the worker it was sent to.
        state (str): :data:`QUEUED`, :data:`RUNNING`, :data:`ORPHANED`, :data:`DONE` or
            :data:`LEASED`.
        result (object): the batch, or the core's failure wrapper, while :data:`DONE`;
            None otherwise.
        blocks (tuple[str, ...]): names of the worker's shared-memory blocks the batch views,
            until they are released (empty for threads, Ray, small batches).
    """

    __slots__ = ("blocks", "index", "pass_number", "result", "send_idx", "state", "worker")

    def __init__(self, send_idx: int, index: Any, pass_number: int, worker: int) -> None:
        self.send_idx = send_idx
        self.index = index
        self.pass_number = pass_number
        self.worker = worker
        self.state = QUEUED
        self.result: Any = None
        self.blocks: tuple[str, ...] = ()

    def __repr__(self) -> str:
        return (
            f"Task(send_idx={self.send_idx}, index={self.index!r}, worker={self.worker}, "
            f"state={self.state}, blocks={len(self.blocks)})"
        )


class TaskTable:
    """Every task record of one pool, and the counts that make its invariants checkable.

    Attributes:
        counts (collections.Counter[str]): ``dispatched``, ``delivered`` (taken by the
            consumer), ``dropped`` (results nobody reads, orphans skipped included),
            ``skipped`` (orphans a worker never computed), ``leased`` (results that arrived
            naming blocks), ``released`` (those whose blocks were released).
    """

    def __init__(self) -> None:
        self._records: dict[int, Task] = {}
        self._queues: dict[int, collections.deque[int]] = {}  # worker -> send_idx, in order
        self._orphans = 0
        self.counts: collections.Counter[str] = collections.Counter()

    # -- reading -------------------------------------------------------------------------------

    def __len__(self) -> int:
        """Records alive: at a worker, done, or leased."""
        return len(self._records)

    def __iter__(self) -> Any:
        return iter(list(self._records.values()))

    def get(self, send_idx: int) -> Task | None:
        """The record of ``send_idx``, or None when it is gone (or was never made)."""
        return self._records.get(send_idx)

    def load(self, worker: int) -> int:
        """How many tasks are at ``worker`` (queued, running or orphaned)."""
        queue = self._queues.get(worker)
        return len(queue) if queue else 0

    def head(self, worker: int) -> Task | None:
        """The task ``worker`` is computing (its oldest), or None when it has none."""
        queue = self._queues.get(worker)
        return self._records[queue[0]] if queue else None

    def orphans(self) -> int:
        """How many tasks are orphaned (still at a worker, result to be dropped)."""
        return self._orphans

    def in_flight(self) -> int:
        """Tasks dispatched and not yet delivered or dropped: at a worker, or done."""
        return sum(r.state != LEASED for r in self._records.values())

    # -- changing ------------------------------------------------------------------------------

    def add(self, send_idx: int, index: Any, pass_number: int, worker: int) -> Task:
        """Record a task just sent to ``worker``.

        Raises:
            ValueError: ``send_idx`` already has a record (a send index is used once).
        """
        if send_idx in self._records:
            raise ValueError(f"compatmp: send index {send_idx} was already dispatched")
        task = Task(send_idx, index, pass_number, worker)
        queue = self._queues.setdefault(worker, collections.deque())
        if not queue:
            task.state = RUNNING
        queue.append(send_idx)
        self._records[send_idx] = task
        self.counts["dispatched"] += 1
        return task

    def complete(
        self, send_idx: int, blocks: Iterable[str], make_result: Callable[[], Any]
    ) -> bool:
        """The worker sent the task's result: store it, or drop it if the task is orphaned.

        Args:
            send_idx (int): the task.
            blocks (Iterable[str]): the shared-memory blocks the batch names.
            make_result (Callable[[], object]): builds the stored result (the zero-copy view
                of the batch, or the failure); not called for an orphan.

        Returns:
            bool: True when the caller must release the blocks now (an orphan's result,
            dropped without being viewed).

        Raises:
            Exception: what ``make_result`` raised (the record is then left without result:
                the caller stores a failure with :meth:`fail`).
        """
        task = self._records.get(send_idx)
        if task is None or task.state not in AT_WORKER:
            return False  # unknown (the pool was cleared) or answered twice: ignore
        self._leave_worker(task)
        task.blocks = tuple(blocks)
        if task.blocks:
            self.counts["leased"] += 1
        if task.state == ORPHANED:
            self._orphans -= 1
            self.counts["dropped"] += 1
            self._settle(task)
            return bool(task.blocks)
        task.state = DONE
        task.result = make_result()
        return False

    def skip(self, send_idx: int) -> bool:
        """The worker will never compute this orphan (taken back, or skipped): drop it.

        Args:
            send_idx (int): the task; it must be :data:`ORPHANED` (only orphans are ever
                withdrawn or named in a ``("skip", ...)`` message).

        Returns:
            bool: True if the record was an orphan and is now gone; False when there was
            nothing to skip (the pool was cleared, or the task already answered).

        Raises:
            ValueError: the task is at its worker but not orphaned (a protocol bug: the
                consumer still waits for it, so skipping it would lose a batch).
        """
        task = self._records.get(send_idx)
        if task is None or task.state not in AT_WORKER:
            return False
        if task.state != ORPHANED:
            raise ValueError(
                f"compatmp: {task} was skipped by its worker but the consumer still wants it"
            )
        self._leave_worker(task)
        self._orphans -= 1
        self.counts["dropped"] += 1
        self.counts["skipped"] += 1
        del self._records[send_idx]
        return True

    def discard(self, send_idx: int) -> None:
        """The worker answered while the pool shuts down: forget the task, keep nothing."""
        task = self._records.get(send_idx)
        if task is not None and task.state in AT_WORKER:
            self._leave_worker(task)
            if task.state == ORPHANED:
                self._orphans -= 1
            self.counts["dropped"] += 1
            del self._records[send_idx]

    def take(self, send_idx: int) -> Any:
        """Hand the result of a :data:`DONE` task to the consumer (once).

        Raises:
            KeyError: the task is not done (no result, or it was taken already).
        """
        task = self._records.get(send_idx)
        if task is None or task.state != DONE:
            raise KeyError(f"compatmp: the result of send index {send_idx} is not here")
        result = task.result
        task.result = None
        self.counts["delivered"] += 1
        self._settle(task)
        return result

    def forget(self, send_idxs: Iterable[int]) -> None:
        """The consumer will not read these: drop stored results, orphan pending tasks."""
        for send_idx in send_idxs:
            task = self._records.get(send_idx)
            if task is None:
                continue
            if task.state == DONE:
                task.result = None  # its views die: their finalizer queues the release
                self.counts["dropped"] += 1
                self._settle(task)
            elif task.state in (QUEUED, RUNNING):
                task.state = ORPHANED
                self._orphans += 1

    def release(self, send_idx: int) -> Task | None:
        """The consumer let go of the task's blocks: mark them released (once).

        Returns:
            Task | None: the record (its ``worker`` gets the release message), or None when
            there was nothing to release (no blocks, or released already).
        """
        task = self._records.get(send_idx)
        if task is None or not task.blocks:
            return None
        task.blocks = ()
        self.counts["released"] += 1
        if task.state == LEASED:
            del self._records[send_idx]
        return task

    def clear(self) -> None:
        """Forget every record (the pool is closed; its workers and blocks are gone)."""
        self._records.clear()
        self._queues.clear()
        self._orphans = 0
        self.counts.clear()

    def _leave_worker(self, task: Task) -> None:
        queue = self._queues[task.worker]
        if queue and queue[0] == task.send_idx:
            queue.popleft()
        else:
            queue.remove(task.send_idx)
        if queue:
            nxt = self._records[queue[0]]
            if nxt.state == QUEUED:
                nxt.state = RUNNING

    def _settle(self, task: Task) -> None:
        """The result is gone: keep the record while blocks are mapped, else remove it."""
        if task.blocks:
            task.state = LEASED
        else:
            del self._records[task.send_idx]

    # -- invariants ----------------------------------------------------------------------------

    def check(self) -> None:
        """Assert every invariant of NOTE [ Task records ] over the records.

        Raises:
            AssertionError: naming the invariant that does not hold, and the records.
        """
        queued = 0
        for worker, queue in self._queues.items():
            order = list(queue)
            assert order == sorted(set(order)), f"worker {worker}'s tasks out of order: {order}"
            for pos, send_idx in enumerate(order):
                task = self._records.get(send_idx)
                assert task is not None, f"worker {worker} holds unknown task {send_idx}"
                assert task.worker == worker, f"{task} is queued at worker {worker}"
                allowed = (RUNNING, ORPHANED) if pos == 0 else (QUEUED, ORPHANED)
                assert task.state in allowed, f"{task} at position {pos} of worker {worker}"
            queued += len(order)
        at_worker = [t for t in self._records.values() if t.state in AT_WORKER]
        assert len(at_worker) == queued, f"tasks at a worker but in no queue: {at_worker}"
        orphaned = sum(t.state == ORPHANED for t in self._records.values())
        assert orphaned == self._orphans, f"{orphaned} orphans, counted {self._orphans}"
        for task in self._records.values():
            if task.state != DONE:
                assert task.result is None, f"{task} keeps a result it may not"
            if task.state == LEASED:
                assert task.blocks, f"{task} is leased without blocks"
            if task.state in AT_WORKER:
                assert not task.blocks, f"{task} has blocks before its result arrived"
        unresolved = sum(t.state != LEASED for t in self._records.values())
        c = self.counts
        assert c["dispatched"] == c["delivered"] + c["dropped"] + unresolved, (
            f"a task was delivered or dropped twice, or lost: {dict(c)}, {unresolved} unresolved"
        )
        mapped = sum(bool(t.blocks) for t in self._records.values())
        assert c["leased"] == c["released"] + mapped, (
            f"a batch's blocks were released twice, or lost: {dict(c)}, {mapped} still mapped"
        )
