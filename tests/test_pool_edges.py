"""Issue 17, item 5: the edges of the running pool.

Time limits of a dataset update, start-up failures, nested pools in daemonic processes, and
a worker thread that ends on a protocol error. Each test failed (or hung) before its fix.
"""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.process
import time

import pytest
from edge_helpers import (
    LoggedShared,
    SlowRegression,
    SlowShared,
    Small,
    computed_indices,
    nested_pool,
)
from pool_datasets import PROCESS_METHODS

import compatmp
from compatmp import StartMethodError, WorkerCrashedError, WorkerTimeoutError
from compatmp._platform import PlatformFacts, decide_start_method
from compatmp._pool import OrderedPool

pytestmark = pytest.mark.usefixtures("no_leaked_workers")

LINUX = PlatformFacts(
    os="linux", python_version=(3, 12, 4), available_methods=("fork", "forkserver", "spawn")
)


# ---------------------------------------------------------------------------------------------
# a. the timeout of update_dataset: no progress for `timeout` seconds, not the whole wait
# ---------------------------------------------------------------------------------------------


@pytest.mark.timeout(120)
@pytest.mark.parametrize("method", [*PROCESS_METHODS, "thread"])
def test_update_waits_for_prefetched_batches_longer_than_timeout_while_they_finish(method):
    # 3 prefetched batches of 0.8 s each (2.4 s in all) with timeout=1.6: the update
    # succeeds (it failed after 1.6 s before issue 17); the orphans no worker started are
    # skipped (the next tests), so it waits only for the batch being computed.
    dataset = SlowShared(delay=0.8)
    with OrderedPool(dataset, workers=1, start_method=method, timeout=1.6, max_queue_size=4) as p:
        it = p.imap(range(8))
        assert float(next(it)[0]) == 0.0  # the worker now holds 3 prefetched batches
        del it
        dataset.x[0, 0] = 100.0
        if method == "thread":
            dataset = SlowShared(delay=0.8)  # a new object: the threads get it sent
            dataset.x[0, 0] = 100.0
        assert p.update_dataset(dataset)
        p._core.tasks.check()
        got = [float(b[0]) for b in p.imap(range(2))]
        assert got == [100.0, 1.0]  # the new state, no stale prefetched batch


@pytest.mark.timeout(60)
def test_update_takes_back_the_orphaned_prefetches_a_worker_thread_has_not_started():
    old = SlowShared(delay=0.8, first=0.0)
    with OrderedPool(old, workers=1, start_method="thread", max_queue_size=4) as p:
        it = p.imap(range(8))
        assert float(next(it)[0]) == 0.0  # 1 is computing (or queued), 2 and 3 are queued
        del it
        new = SlowShared(delay=0.0)
        new.x[:, 0] = 7.0
        assert p.update_dataset(new)
        assert set(old.computed) <= {0, 1}  # 2 and 3 were never computed
        assert [float(b[0]) for b in p.imap(range(4))] == [7.0, 8.0, 9.0, 10.0]
        assert new.computed == [0, 1, 2, 3]
        p._core.tasks.check()  # NOTE [ Task records ]: every invariant holds


@pytest.mark.timeout(120)
@pytest.mark.parametrize("method", [*PROCESS_METHODS, "thread"])
def test_update_skips_the_orphaned_prefetches_no_worker_started(method, tmp_path):
    # The brief's case: 2 workers, max_queue_size=8, stop after 2 batches, update. Before
    # issue 17's last part, process workers computed every orphan queued in their pipe (here
    # 8 of them, 4 per worker: ~4 s of 1 s batches) before the update could run.
    log = str(tmp_path)
    dataset = LoggedShared(delay=1.0, log_dir=log)
    with OrderedPool(dataset, workers=2, start_method=method, max_queue_size=8) as p:
        it = p.imap(range(16))
        assert [float(next(it)[0]) for _ in range(2)] == [0.0, 1.0]
        del it  # indices 2..9 dispatched and orphaned; 2 and 3 (at most) being computed
        counts = p._core.tasks.counts
        dataset.x[:, 0] = 50.0
        if method == "thread":  # threads share the object: send a new one
            dataset = LoggedShared(delay=1.0, log_dir=log)
            dataset.x[:, 0] = 50.0
        assert p.update_dataset(dataset)
        p._core.tasks.check()  # NOTE [ Task records ]: every invariant holds
        old = computed_indices(log)
        assert len(old) == len(set(old)), f"an index was computed twice: {sorted(old)}"
        # Every dispatched task was computed once or skipped once, never both, never lost.
        assert counts["dispatched"] in (9, 10)  # 0..7, then one more per batch taken
        assert len(old) + counts["skipped"] == counts["dispatched"], (sorted(old), counts)
        assert not set(old) & set(range(6, 10)), f"orphans were computed: {sorted(old)}"
        assert counts["skipped"] >= 4
        for f in tmp_path.iterdir():
            f.unlink()
        # After the update: exactly the new dataset's batches, every index computed once.
        got = [b.tolist() for b in p.imap(range(6))]
        expected = [(dataset.x[i % 4, :8] + i).tolist() for i in range(6)]
        assert got == expected
        assert sorted(computed_indices(log)) == list(range(6))
        p._core.tasks.check()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("method", [*PROCESS_METHODS, "thread"])
def test_a_pass_stopped_early_lets_the_next_pass_start_without_its_orphans(method, tmp_path):
    # forget() (the consumer stopped iterating) already has the orphans skipped: the next
    # pass's batches are the only ones computed after it, each once.
    log = str(tmp_path)
    dataset = LoggedShared(delay=0.3, log_dir=log)
    with OrderedPool(dataset, workers=2, start_method=method, max_queue_size=8) as p:
        it = p.imap(range(16))
        assert float(next(it)[0]) == 0.0
        del it
        got = [float(b[0]) for b in p.imap(range(100, 104))]
        assert got == [100.0, 101.0, 102.0, 103.0]
        done = computed_indices(log)
        assert len(done) == len(set(done)), sorted(done)
        counts = p._core.tasks.counts
        assert len(done) + counts["skipped"] == counts["dispatched"], (sorted(done), counts)
        p._core.tasks.check()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("method", [PROCESS_METHODS[0], "spawn", "thread"])
def test_update_still_times_out_when_no_batch_finishes(method, tmp_path):
    dataset = LoggedShared(delay=3.0, log_dir=str(tmp_path), first=0.0)
    with OrderedPool(dataset, workers=1, start_method=method, timeout=1.0, max_queue_size=2) as p:
        it = p.imap(range(8))
        assert float(next(it)[0]) == 0.0
        deadline = time.monotonic() + 30
        while 1 not in computed_indices(str(tmp_path)) and time.monotonic() < deadline:
            time.sleep(0.01)  # batch 1 has started: it is not skipped, it is waited for
        del it
        dataset.x[0, 0] = 1.0
        if method == "thread":
            dataset = LoggedShared(delay=3.0, log_dir=str(tmp_path), first=0.0)
        started = time.monotonic()
        with pytest.raises(WorkerTimeoutError, match=r"no progress for timeout=1.0 s"):
            p.update_dataset(dataset)
        assert time.monotonic() - started < 2.9  # not after the 3 s batch
        assert p.closed


@pytest.mark.keras
@pytest.mark.timeout(180)
@pytest.mark.parametrize("method", [PROCESS_METHODS[0], "spawn"])
def test_fit_with_steps_per_epoch_and_a_timeout_longer_than_one_batch(method):
    # The case: fit(steps_per_epoch=3, timeout=2) failed at the first epoch's end,
    # waiting for the prefetched batches of the next steps under one 2 s deadline.
    keras = pytest.importorskip("keras", minversion="3")
    model = keras.Sequential([keras.Input((4096,)), keras.layers.Dense(1)])
    model.compile("sgd", "mse")
    history = compatmp.fit(
        model,
        SlowRegression(delay=0.6),
        epochs=2,
        steps_per_epoch=3,
        workers=1,
        start_method=method,
        timeout=1.5,
        verbose=0,
    )
    assert len(history.history["loss"]) == 2


# ---------------------------------------------------------------------------------------------
# b. a pool that cannot start raises the cause and shuts down completely
# ---------------------------------------------------------------------------------------------


@pytest.mark.timeout(120)
@pytest.mark.parametrize("method", PROCESS_METHODS)
def test_a_failed_fork_raises_its_own_error_and_leaves_nothing(method, monkeypatch, caplog):
    original = multiprocessing.process.BaseProcess.start
    calls = []

    def start(self):
        calls.append(self.name)
        if len(calls) == 2:  # the second worker: the first one runs already
            raise OSError(11, "Resource temporarily unavailable (simulated fork failure)")
        return original(self)

    monkeypatch.setattr(multiprocessing.process.BaseProcess, "start", start)
    with caplog.at_level(logging.WARNING, logger="compatmp"):
        with pytest.raises(OSError, match="simulated fork failure"):
            OrderedPool(Small(), workers=3, start_method=method)
    assert len(calls) == 2
    assert "can only join" not in caplog.text  # no shutdown step failed on the unstarted one
    # no_leaked_workers: the first worker, its blocks and stack files are gone


@pytest.mark.timeout(60)
def test_every_shutdown_step_runs_when_one_fails(monkeypatch, caplog):
    pool = OrderedPool(Small(), workers=2, start_method=PROCESS_METHODS[0])
    core = pool._core
    swept = []

    def broken_close():
        raise OSError("simulated: the dataset's blocks cannot be unlinked")

    monkeypatch.setattr(core.attachments, "close", broken_close)
    original_sweep = core.transport.sweep
    monkeypatch.setattr(core.transport, "sweep", lambda: (swept.append(1), original_sweep()))
    with caplog.at_level(logging.WARNING, logger="compatmp"):
        pool.close()  # does not raise
    assert swept == [1]  # the step after the failing one ran
    assert "closing the batches' shared-memory maps failed" in caplog.text
    assert "simulated" in caplog.text
    for h in core.handles:
        assert h.pid is not None and not compatmp_pid_alive(h.pid)


def compatmp_pid_alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


# ---------------------------------------------------------------------------------------------
# c. nested pools in a daemonic process
# ---------------------------------------------------------------------------------------------


def test_a_daemonic_process_gets_threads_and_refuses_processes_by_name(monkeypatch):
    monkeypatch.setenv("COMPATMP_START_METHOD", "spawn")  # children inherit it
    facts = LINUX.with_(daemonic=True)
    decision = decide_start_method("auto", facts=facts)
    assert decision.method == "thread"
    assert "daemonic" in decision.reason and "COMPATMP_START_METHOD=spawn" in decision.reason
    for method in ("fork", "forkserver", "spawn"):
        with pytest.raises(StartMethodError, match=r"daemonic process.*start_method='thread'"):
            decide_start_method(method, facts=facts)
    assert decide_start_method("thread", facts=facts).method == "thread"
    assert decide_start_method("auto", facts=LINUX).method != "thread"


@pytest.mark.timeout(120)
@pytest.mark.parametrize("outer", ["spawn", PROCESS_METHODS[0]])
def test_a_pool_inside_a_multiprocessing_pool_worker_runs_as_threads(outer):
    ctx = multiprocessing.get_context(outer)
    with ctx.Pool(1) as outer_pool:
        auto, forced = outer_pool.map(nested_pool, ["auto", "spawn"])
    assert auto[:3] == ("ok", "thread", [0, 1, 2, 3])
    assert any("ThreadFallbackWarning" in w and "daemonic" in w for w in auto[3])
    assert forced[:2] == ("error", "StartMethodError")
    assert "start_method='thread'" in forced[2]


class NestedInWorker:
    """A dataset whose batches come from a pool made inside the (daemonic) worker."""

    def __len__(self) -> int:
        return 2

    def __getitem__(self, i: int):
        return nested_pool("auto")[:3]


@pytest.mark.timeout(120)
def test_a_pool_inside_a_compatmp_worker_process_runs_as_threads():
    with OrderedPool(NestedInWorker(), workers=1, start_method="spawn") as pool:
        got = list(pool.imap(range(2)))
    assert got == [("ok", "thread", [0, 1, 2, 3])] * 2


# ---------------------------------------------------------------------------------------------
# d. a worker that ends on a protocol error is reported, naming the worker and the index
# ---------------------------------------------------------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
@pytest.mark.parametrize("method", ["thread", PROCESS_METHODS[0]])
def test_a_worker_ending_on_a_protocol_error_is_reported(method):
    with OrderedPool(Small(first_delay=0.5), workers=1, start_method=method) as pool:
        core = pool._core
        first = core.dispatch(0)
        core.handles[0].send(("not-a-message-kind",))  # read after batch 0, before batch 1
        second = core.dispatch(1)
        with pytest.raises(WorkerCrashedError, match=r"worker (thread )?0\b.*index 1") as info:
            core.wait_for(first, None)
            core.wait_for(second, None)
        assert info.value.index == 1
        if method == "thread":
            assert "unknown message kind 'not-a-message-kind'" in str(info.value)
