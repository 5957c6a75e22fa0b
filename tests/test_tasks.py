"""The pool's task records (compatmp/_tasks.py, NOTE [ Task records ]) and their invariants.

Three layers:

1. The record table alone, driven by a hypothesis state machine against a plain reference
   model: dispatch, answers (with and without shared-memory blocks, errors), the consumer
   taking, forgetting and dropping batches, releases arriving from finalizers, a crash that
   clears the table. After every step ``TaskTable.check()`` must hold and the table must
   agree with the model on what was delivered, dropped and released.
2. The real running pool (``OrderedPool`` over ``compatmp._core``) on a scripted in-memory
   transport (NOTE [ Worker transports ]): hypothesis chooses which worker answers when,
   when the consumer stops early, when the dataset is updated and which worker dies. Every
   batch must be the right one of the right dataset version, in order, never twice; a death
   must raise ``WorkerCrashedError`` naming the index its worker held.
3. Real pools (thread, fork/forkserver, spawn): after full and abandoned iterations with
   shared-memory batches, the records satisfy the invariants and every block is released.
"""

from __future__ import annotations

import collections
import gc
import time
from typing import Any
from unittest import mock

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from pool_datasets import PROCESS_METHODS

from compatmp import OrderedPool, WorkerCrashedError, _core, _tasks, _worker
from compatmp._tasks import DONE, LEASED, ORPHANED, RUNNING, TaskTable
from compatmp._transport import Transport, WorkerHandle

# ---------------------------------------------------------------------------------------------
# 1. The table against a reference model
# ---------------------------------------------------------------------------------------------


def test_a_task_goes_queued_running_done_leased_released():
    table = TaskTable()
    a = table.add(0, "a", 0, worker=0)
    b = table.add(1, "b", 0, worker=0)
    assert (a.state, b.state) == (RUNNING, _tasks.QUEUED)
    assert table.load(0) == 2 and table.head(0) is a
    assert table.complete(0, ["blk"], lambda: "batch a") is False
    assert (a.state, b.state) == (DONE, RUNNING)  # the next one is now computed
    assert table.take(0) == "batch a"
    assert a.state == LEASED and table.get(0) is a  # blocks still mapped
    with pytest.raises(KeyError):
        table.take(0)  # delivered once
    assert table.release(0) is a and table.get(0) is None
    assert table.release(0) is None  # released once
    table.check()


def test_an_orphans_result_is_dropped_and_its_blocks_released_at_once():
    table = TaskTable()
    table.add(0, "a", 0, worker=1)
    table.forget([0])
    assert table.get(0).state == ORPHANED and table.orphans() == 1
    made = []
    assert table.complete(0, ["blk"], lambda: made.append(1)) is True  # release now
    assert made == [] and table.orphans() == 0  # never viewed
    assert table.get(0).state == LEASED
    table.release(0)
    assert len(table) == 0 and table.counts["dropped"] == 1
    table.check()


def test_check_names_a_broken_invariant():
    table = TaskTable()
    table.add(0, "a", 0, worker=0)
    table.complete(0, [], lambda: "x")
    table.counts["delivered"] += 1  # as if a batch had been handed out twice
    with pytest.raises(AssertionError, match="delivered or dropped twice"):
        table.check()
    table = TaskTable()
    table.add(0, "a", 0, worker=0)
    table.get(0).state = DONE  # a result without leaving its worker
    with pytest.raises(AssertionError, match="position 0"):
        table.check()


class TableMachine(RuleBasedStateMachine):
    """Random interleavings of everything that touches the records."""

    WORKERS = 3

    def __init__(self) -> None:
        super().__init__()
        self._reset()

    def _reset(self) -> None:
        self.table = TaskTable()
        self.next = 0
        self.at_worker: dict[int, list[int]] = {w: [] for w in range(self.WORKERS)}
        self.wanted: set[int] = set()  # the consumer will read these
        self.done: dict[int, str] = {}  # stored, not yet taken
        self.mapped: set[int] = set()  # results that arrived with blocks, not released
        self.viewed: set[int] = set()  # batches whose views the consumer (or buffer) holds
        self.delivered: list[int] = []
        self.released: list[int] = []
        self.to_release: list[int] = []  # finalizers fired, release not yet sent

    @rule(worker=st.integers(0, WORKERS - 1))
    def dispatch(self, worker: int) -> None:
        send_idx = self.next
        self.next += 1
        self.table.add(send_idx, f"index {send_idx}", 0, worker)
        self.at_worker[worker].append(send_idx)
        self.wanted.add(send_idx)

    @precondition(lambda self: any(self.at_worker.values()))
    @rule(data=st.data(), blocks=st.booleans())
    def worker_answers(self, data: Any, blocks: bool) -> None:
        worker = data.draw(st.sampled_from([w for w, q in self.at_worker.items() if q]))
        send_idx = self.at_worker[worker].pop(0)  # a worker answers in send order
        names = [f"blk{send_idx}"] if blocks else []
        release_now = self.table.complete(send_idx, names, lambda: f"batch {send_idx}")
        if blocks:
            self.mapped.add(send_idx)
        if send_idx in self.wanted:
            assert not release_now
            self.done[send_idx] = f"batch {send_idx}"
            if blocks:
                self.viewed.add(send_idx)
        else:
            assert release_now == blocks  # an orphan's blocks go back unviewed
            if blocks:
                self.to_release.append(send_idx)

    @precondition(
        lambda self: any(i not in self.wanted for q in self.at_worker.values() for i in q)
    )
    @rule(data=st.data())
    def worker_skips_an_orphan(self, data: Any) -> None:
        # ("skip", ...) answered by ("skipped", ...), or a thread's task taken back: any
        # orphan the worker had not started, even its oldest (read ahead before starting it).
        orphans = sorted(i for q in self.at_worker.values() for i in q if i not in self.wanted)
        send_idx = data.draw(st.sampled_from(orphans))
        skipped_before = self.table.counts["skipped"]
        assert self.table.skip(send_idx) is True
        assert self.table.skip(send_idx) is False  # a second answer is ignored
        assert self.table.counts["skipped"] == skipped_before + 1
        for queue in self.at_worker.values():
            if send_idx in queue:
                queue.remove(send_idx)
        assert self.table.get(send_idx) is None  # never computed: nothing to release

    @precondition(lambda self: any(i in self.wanted for q in self.at_worker.values() for i in q))
    @rule(data=st.data())
    def skipping_a_wanted_task_is_refused(self, data: Any) -> None:
        wanted = sorted(i for q in self.at_worker.values() for i in q if i in self.wanted)
        send_idx = data.draw(st.sampled_from(wanted))
        with pytest.raises(ValueError, match="still wants it"):
            self.table.skip(send_idx)

    @precondition(lambda self: bool(self.done))
    @rule(data=st.data())
    def consumer_takes(self, data: Any) -> None:
        send_idx = data.draw(st.sampled_from(sorted(self.done)))
        assert self.table.take(send_idx) == self.done.pop(send_idx)
        self.wanted.discard(send_idx)
        self.delivered.append(send_idx)

    @precondition(lambda self: bool(self.wanted))
    @rule(data=st.data())
    def consumer_forgets(self, data: Any) -> None:
        gone = data.draw(st.sets(st.sampled_from(sorted(self.wanted)), min_size=1))
        self.table.forget(gone)
        for send_idx in gone:
            self.wanted.discard(send_idx)
            self.done.pop(send_idx, None)  # its views die with the stored result
            if send_idx in self.viewed:
                self.viewed.discard(send_idx)
                self.to_release.append(send_idx)

    @precondition(lambda self: bool(self.viewed - set(self.done)))
    @rule(data=st.data())
    def consumer_drops_a_batch(self, data: Any) -> None:
        send_idx = data.draw(st.sampled_from(sorted(self.viewed - set(self.done))))
        self.viewed.discard(send_idx)
        self.to_release.append(send_idx)  # the last view's finalizer

    @precondition(lambda self: bool(self.to_release))
    @rule(data=st.data())
    def pump_sends_a_release(self, data: Any) -> None:
        send_idx = self.to_release.pop(data.draw(st.integers(0, len(self.to_release) - 1)))
        task = self.table.release(send_idx)
        assert task is not None and task.send_idx == send_idx
        assert self.table.release(send_idx) is None  # a second release is ignored
        self.mapped.discard(send_idx)
        self.released.append(send_idx)

    @rule()
    def a_worker_crashes(self) -> None:
        # The pool closes: records are cleared, late answers are ignored, nothing delivered.
        pending = [i for q in self.at_worker.values() for i in q]
        self.table.clear()
        for send_idx in pending:
            assert self.table.complete(send_idx, ["x"], lambda: "late") is False
        assert len(self.table) == 0 and self.table.orphans() == 0
        self._reset()  # a new pool

    @invariant()
    def records_agree(self) -> None:
        self.table.check()
        assert len(self.delivered) == len(set(self.delivered))
        assert len(self.released) == len(set(self.released))
        for worker, queue in self.at_worker.items():
            assert self.table.load(worker) == len(queue)
            head = self.table.head(worker)
            assert (head.send_idx if head else None) == (queue[0] if queue else None)
        orphans = sum(i not in self.wanted for q in self.at_worker.values() for i in q)
        assert self.table.orphans() == orphans
        for send_idx in self.done:
            assert self.table.get(send_idx).state == DONE
        for send_idx in self.mapped:
            assert self.table.get(send_idx).blocks  # still leased


TableMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
test_table_under_random_interleavings = TableMachine.TestCase


# ---------------------------------------------------------------------------------------------
# 2. The real pool on a scripted transport
# ---------------------------------------------------------------------------------------------


class Versioned:
    """``ds[i] == (i, version)``: a stale batch is visible."""

    def __init__(self, n: int, version: int) -> None:
        self.n = n
        self.version = version

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> tuple[int, int]:
        return (index, self.version)


class _ScriptedChannel:
    def __init__(self) -> None:
        self.outbox: collections.deque = collections.deque()

    def poll(self, timeout: float) -> bool:
        return bool(self.outbox)

    def recv(self) -> tuple:
        return self.outbox.popleft()

    def send(self, msg: tuple) -> None:  # pragma: no cover - the handle sends
        raise AssertionError

    def close(self) -> None:
        pass


class _ScriptedHandle(WorkerHandle):
    """A worker the test runs one message at a time, in the main thread."""

    def __init__(self, config: _worker.WorkerConfig) -> None:
        super().__init__(config.worker_id, _ScriptedChannel())
        self.dataset = config.dataset
        self.inbox: collections.deque = collections.deque()
        self.alive = True
        self.channel.outbox.append((_worker.READY, self.id, None))

    def send(self, msg: tuple) -> None:
        if not self.alive:
            raise EOFError("the scripted worker is gone")
        self.inbox.append(msg)

    def step(self) -> None:
        msg = self.inbox.popleft()
        if msg[0] == _worker.TASK and any(m[0] == _worker.SKIP for m in self.inbox):
            # A process worker reads ahead before starting a task (NOTE [ Worker protocol ]):
            # the skips behind it apply first, maybe to this very task.
            self.inbox.appendleft(msg)
            skips = [m for m in self.inbox if m[0] == _worker.SKIP]
            for m in skips:
                self.inbox.remove(m)
            for m in skips:
                self._skip(m[1])
        elif msg[0] == _worker.SKIP:  # reached in order: its tasks were computed already
            self._skip(msg[1])
        elif msg[0] == _worker.TASK:
            self.channel.outbox.append((_worker.OK, msg[1], self.dataset[msg[2]], []))
        elif msg[0] == _worker.DATASET:
            self.dataset = msg[2]
            self.channel.outbox.append((_worker.UPDATED, msg[1]))

    def _skip(self, send_idxs: tuple) -> None:
        names = set(send_idxs)
        dropped = tuple(m[1] for m in self.inbox if m[0] == _worker.TASK and m[1] in names)
        for m in [m for m in self.inbox if m[0] == _worker.TASK and m[1] in names]:
            self.inbox.remove(m)
        if dropped:
            self.channel.outbox.append((_worker.SKIPPED, dropped))

    def is_alive(self) -> bool:
        return self.alive


class ScriptedTransport(Transport):
    """Workers whose every step is chosen by hypothesis; one of them may die."""

    def __init__(
        self, method: str, stall_timeout: float | None, data: Any, crash: Any, skips: bool
    ) -> None:
        super().__init__(method, stall_timeout)
        self.skips_orphans = skips  # the core sends ("skip", ...) for orphans
        self.data = data
        self.crash_at = crash  # (wait number, worker) or None
        self.waits = 0

    def start(self, configs: list[_worker.WorkerConfig]) -> None:
        self.handles.extend(_ScriptedHandle(c) for c in configs)

    def wait(self, handles: list, timeout: float) -> tuple[list, list]:
        self.waits += 1
        if self.crash_at is not None and self.waits >= self.crash_at[0]:
            self.handles[self.crash_at[1]].alive = False
            self.crash_at = None
        busy = [h for h in handles if h.alive and h.inbox]
        if busy:
            h = self.data.draw(st.sampled_from(busy), label="worker steps")
            for _ in range(self.data.draw(st.integers(1, len(h.inbox)), label="messages")):
                if not h.inbox or h.inbox[0][0] == _worker.STOP:  # a skip may empty it
                    break
                h.step()
        readable = [h for h in handles if h.channel.outbox]
        dead = [h for h in handles if not h.alive]
        return readable, dead

    def rebuild_exception(self, msg: tuple) -> BaseException:
        return _worker.rebuild_exception(msg, by_reference=True)

    def shutdown(self, deadline: float, drain: Any) -> None:
        for h in self.handles:
            drain(h)


@pytest.mark.timeout(300)
@settings(
    max_examples=120,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    data=st.data(),
    passes=st.lists(
        st.tuples(
            st.lists(st.integers(0, 19), min_size=1, max_size=25),  # indices of one imap
            st.integers(1, 30),  # how many batches the consumer takes before it stops
            st.booleans(),  # update the dataset after this pass
        ),
        min_size=1,
        max_size=4,
    ),
    workers=st.integers(1, 3),
    queue=st.integers(1, 6),
    crash=st.none() | st.tuples(st.integers(1, 40), st.integers(0, 2)),
    skips=st.booleans(),  # workers skip orphans they have not started (processes)
)
def test_pool_delivers_each_batch_once_in_order_under_crashes_and_updates(
    data, passes, workers, queue, crash, skips
):
    if crash is not None:
        crash = (crash[0], crash[1] % workers)

    def make(method: str, stall: float | None) -> ScriptedTransport:
        return ScriptedTransport(method, stall, data, crash, skips)

    version = 0
    seen: set[int] = set()
    with mock.patch.dict(_core.TRANSPORTS, {"thread": make}):
        pool = OrderedPool(
            Versioned(20, version),
            workers=workers,
            start_method="thread",
            max_queue_size=queue,
            stall_timeout=0,
        )
    core = pool._core
    try:
        for indices, take, update in passes:
            seen.update(indices)
            got = []
            try:
                for batch in pool.imap(indices):
                    got.append(batch)
                    core.tasks.check()
                    if len(got) >= take:
                        break
            except WorkerCrashedError as exc:
                assert crash is not None and core.closed
                assert exc.index is None or exc.index in seen  # orphans of a pass count
                assert got == [(i, version) for i in indices[: len(got)]]
                return
            assert got == [(i, version) for i in indices[: min(take, len(indices))]]
            core.tasks.check()
            assert core.tasks.in_flight() - core.tasks.orphans() == 0  # nothing awaited
            if update:
                version += 1
                try:
                    assert pool.update_dataset(Versioned(20, version)).sent is True
                except WorkerCrashedError:
                    assert crash is not None and core.closed
                    return
                assert all(core.tasks.load(h.id) == 0 for h in core.handles)
                assert all(h.dataset.version == version for h in core.handles)
    finally:
        pool.close()
        assert len(core.tasks) == 0


# ---------------------------------------------------------------------------------------------
# 3. Real pools
# ---------------------------------------------------------------------------------------------


class BigBatches:
    """Batches of 2 MiB (above the shared-memory threshold), tagged with their index."""

    def __len__(self) -> int:
        return 12

    def __getitem__(self, index: int) -> np.ndarray:
        return np.full(512 * 1024, index, dtype=np.float32)


def _settle(core: Any) -> None:
    """Let finalizers run and the pump send the releases they queued."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        gc.collect()
        core.pump(0.05)
        if not any(t.state == LEASED for t in core.tasks):
            return


@pytest.mark.timeout(120)
@pytest.mark.parametrize("method", [*PROCESS_METHODS, "thread"])
def test_real_pool_records_hold_the_invariants_and_release_every_block(method):
    with OrderedPool(BigBatches(), workers=2, start_method=method, max_queue_size=4) as pool:
        core = pool._core
        kept = []
        for i, batch in enumerate(pool.imap(range(12))):
            assert batch[0] == i
            core.tasks.check()
            if i % 3 == 0:
                kept.append(batch)  # some batches outlive the loop
        # An abandoned pass: its orphans are dropped, never delivered.
        it = pool.imap(range(12))
        assert next(it)[0] == 0
        it.close()
        core.tasks.check()
        leased_before = core.tasks.counts["leased"]
        del kept, batch
        _settle(core)
        core.tasks.check()
        assert not any(t.state == LEASED for t in core.tasks)
        # Every batch that arrived naming blocks (processes) had them released exactly once.
        assert core.tasks.counts["released"] == core.tasks.counts["leased"]
        if method == "thread":
            assert leased_before == 0  # threads pass arrays by reference: no blocks
        else:
            assert leased_before > 0
        # Nothing is left at a worker once the orphans' answers arrived.
        deadline = time.monotonic() + 30
        while core.tasks.orphans() and time.monotonic() < deadline:
            core.pump(0.05)
        assert core.tasks.orphans() == 0
        assert [b[0] for b in pool.imap([5, 3])] == [5, 3]
    assert len(core.tasks) == 0
