"""Workers kept between calls (NOTE [ Reused workers ] in compatmp/_reuse.py).

Every test compares a reused pool with what fresh workers give, and checks that what a pool
leaves behind (processes, shared-memory blocks) ends at the idle timeout or at
``compatmp.shutdown()``. Counts only this process's workers and blocks (pool_datasets).
"""

from __future__ import annotations

import os
import random
import signal
import time

import pytest
from pool_datasets import PROCESS_METHODS, pid_alive, shm_entries, worker_processes
from reuse_helpers import FailsAt, TaggedDataset, count_init, other_init

import compatmp
from compatmp import OrderedPool, _reuse

pytestmark = pytest.mark.usefixtures("no_leaked_workers")

REUSED = [m for m in _reuse.REUSED_METHODS if m in PROCESS_METHODS]
N = 12


def _acquire(dataset, method, *, seed=None, init=None, idle=30.0, workers=2):
    return _reuse.acquire(
        dataset,
        workers=workers,
        start_method=method,
        idle_timeout=idle,
        max_queue_size=4,
        timeout=60.0,
        worker_init_fn=init,
        seed=seed,
        stall_timeout=60.0,
    )


def _pids(lease) -> set[int]:
    return {h.pid for h in lease.pool._core.handles}


def _run(lease, n=N) -> list[dict]:
    return list(lease.imap(range(n)))


def _wait_until(predicate, seconds=30.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("method", REUSED)
def test_reused_workers_give_what_fresh_workers_give(method):
    dataset = TaggedDataset(N, "first", big=True)
    first = _acquire(dataset, method, seed=7, init=count_init)
    assert not first.reused
    pids = _pids(first)
    batches_first = _run(first)
    first.close()
    assert _reuse.idle_pools() == 1 and not first.pool.closed

    dataset.tag = "second"  # the same object, changed in the main process between calls
    second = _acquire(dataset, method, seed=7, init=count_init)
    assert second.reused and second.pool is first.pool and _pids(second) == pids
    batches_second = _run(second)
    second.close()
    compatmp.shutdown()

    with OrderedPool(
        dataset, workers=2, start_method=method, seed=7, worker_init_fn=count_init
    ) as fresh:
        batches_fresh = list(fresh.imap(range(N)))

    for reused, new, old in zip(batches_second, batches_fresh, batches_first, strict=True):
        # The worker's copy of the dataset is the main's current one, nothing of the last call
        assert reused["tag"] == "second" and set(reused["history"]) == {"second"}
        # Per-batch seeds (seed, pass, index): pass numbers restart at 0 in a new call
        assert reused["random"] == new["random"] == old["random"]
        assert reused["np_random"] == new["np_random"] == old["np_random"]
        assert reused["big"] == new["big"] == float(reused["i"])
        assert reused["pid"] in pids
        # worker_init_fn ran again in the reused worker (once per call, as documented)
        assert reused["init_calls"] == 2 and new["init_calls"] == 1
    assert {b["seed"] for b in batches_second} <= {b["seed"] for b in batches_fresh}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("method", REUSED)
def test_a_reused_worker_is_reseeded_from_the_new_seed(method):
    """Without ``seed=`` each call draws a fresh one; the worker's RNG starts from it."""
    first = _acquire(TaggedDataset(N, "a"), method)
    batches_first = _run(first)
    first.close()
    second = _acquire(TaggedDataset(N, "b"), method)
    assert second.reused
    batches_second = _run(second)
    second.close()
    seeds_first = {b["seed"] for b in batches_first}
    seeds_second = {b["seed"] for b in batches_second}
    assert seeds_first.isdisjoint(seeds_second)
    for batch in batches_second:
        if len(batch["history"]) == 1:  # this worker's first batch of the call
            assert batch["random"] == random.Random(batch["seed"]).random()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("method", REUSED)
def test_only_the_same_settings_reuse_workers(method):
    first = _acquire(TaggedDataset(N, "a"), method, init=count_init)
    first.close()
    for other in (
        _acquire(TaggedDataset(N, "b"), method, init=other_init),
        _acquire(TaggedDataset(N, "b"), method, init=count_init, workers=1),
    ):
        assert not other.reused and other.pool is not first.pool
        assert [b["i"] for b in _run(other)] == list(range(N))
        other.close()
    again = _acquire(TaggedDataset(N, "c"), method, init=count_init)
    assert again.reused and again.pool is first.pool
    again.close()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("method", REUSED)
def test_a_failed_call_never_leaves_its_pool_for_the_next(method):
    lease = _acquire(FailsAt(N, 3), method)
    with pytest.raises(ValueError, match="bad index 3"):
        list(lease.imap(range(N)))
    lease.close()  # the pool shut itself down after the error
    assert lease.pool.closed and _reuse.idle_pools() == 0

    lease = _acquire(TaggedDataset(N, "a"), method)
    _run(lease, 2)
    lease.reusable = False  # what the Keras wrappers do when the call raised
    lease.close()
    assert lease.pool.closed and _reuse.idle_pools() == 0


@pytest.mark.timeout(120)
@pytest.mark.parametrize("method", REUSED)
def test_a_worker_that_died_while_idle_means_fresh_workers(method):
    first = _acquire(TaggedDataset(N, "a"), method)
    _run(first)
    first.close()
    victim = sorted(_pids(first))[0]
    os.kill(victim, signal.SIGKILL)
    assert _wait_until(lambda: not pid_alive(victim))
    second = _acquire(TaggedDataset(N, "b"), method)
    assert not second.reused and first.pool.closed
    assert [b["tag"] for b in _run(second)] == ["b"] * N
    second.close()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("method", REUSED)
def test_idle_workers_and_their_blocks_end_at_the_idle_timeout(method):
    before = worker_processes()
    lease = _acquire(TaggedDataset(N, "a", big=True), method, idle=1.0)
    _run(lease)
    pids = _pids(lease)
    lease.close()
    assert all(pid_alive(p) for p in pids) and shm_entries()  # kept, with the dataset's block
    assert _wait_until(lambda: _reuse.idle_pools() == 0)
    assert _wait_until(lambda: not any(pid_alive(p) for p in pids))
    assert _wait_until(lambda: not shm_entries() and worker_processes() <= before)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("method", REUSED)
def test_shutdown_ends_idle_workers_now_and_running_ones_at_their_end(method):
    idle = _acquire(TaggedDataset(N, "a"), method)
    busy = _acquire(TaggedDataset(N, "b"), method)  # a second call at the same time
    assert busy.pool is not idle.pool  # never shared
    idle.close()
    idle_pids = _pids(idle)
    assert compatmp.shutdown() == 1
    assert idle.pool.closed and not any(pid_alive(p) for p in idle_pids)
    assert [b["tag"] for b in _run(busy)] == ["b"] * N  # a running call is left alone...
    busy.close()
    assert busy.pool.closed and _reuse.idle_pools() == 0  # ...and closes at its end
    assert compatmp.shutdown() == 0


@pytest.mark.timeout(120)
@pytest.mark.parametrize("method", REUSED)
def test_two_calls_at_once_get_two_pools_and_one_is_kept(method):
    one = _acquire(TaggedDataset(N, "a"), method)
    two = _acquire(TaggedDataset(N, "b"), method)
    assert one.pool is not two.pool and not two.reused
    one.close()
    two.close()
    assert _reuse.idle_pools() == 1 and two.pool.closed and not one.pool.closed


@pytest.mark.timeout(120)
@pytest.mark.parametrize("method", [m for m in (*PROCESS_METHODS, "thread") if m not in REUSED])
def test_fork_and_thread_pools_are_never_kept(method):
    lease = _acquire(TaggedDataset(N, "a"), method)
    assert [b["tag"] for b in _run(lease)] == ["a"] * N
    lease.close()
    assert lease.pool.closed and _reuse.idle_pools() == 0


@pytest.mark.timeout(120)
def test_idle_timeout_zero_never_keeps_workers():
    lease = _acquire(TaggedDataset(N, "a"), REUSED[-1], idle=0)
    _run(lease, 2)
    lease.close()
    assert lease.pool.closed and _reuse.idle_pools() == 0


@pytest.mark.timeout(120)
def test_a_finished_calls_lease_refuses_the_workers():
    lease = _acquire(TaggedDataset(N, "a"), REUSED[-1])
    lease.close()
    with pytest.raises(RuntimeError, match="call has ended"):
        lease.imap(range(2))
    with pytest.raises(RuntimeError, match="call has ended"):
        lease.update_dataset(TaggedDataset(N, "b"))


@pytest.mark.timeout(120)
@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_child_does_not_inherit_idle_workers():
    lease = _acquire(TaggedDataset(N, "a"), REUSED[-1])
    lease.close()
    assert _reuse.idle_pools() == 1
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        os._exit(0 if _reuse.idle_pools() == 0 and compatmp.shutdown() == 0 else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert _reuse.idle_pools() == 1 and not lease.pool.closed  # the parent's are untouched


def test_idle_timeout_setting(monkeypatch):
    monkeypatch.delenv(_reuse.IDLE_TIMEOUT_ENV, raising=False)
    assert _reuse.resolve_idle_timeout(None) == _reuse.DEFAULT_IDLE_TIMEOUT == 60.0
    assert _reuse.resolve_idle_timeout(0) == 0.0
    assert _reuse.resolve_idle_timeout(2.5) == 2.5
    monkeypatch.setenv(_reuse.IDLE_TIMEOUT_ENV, "0")
    assert _reuse.resolve_idle_timeout(None) == 0.0
    assert _reuse.resolve_idle_timeout(5) == 5.0  # the argument wins
    for bad in ("soon", "-1", "inf"):
        monkeypatch.setenv(_reuse.IDLE_TIMEOUT_ENV, bad)
        with pytest.raises(ValueError, match="COMPATMP_IDLE_TIMEOUT"):
            _reuse.resolve_idle_timeout(None)
    with pytest.raises(ValueError, match="idle_timeout"):
        _reuse.resolve_idle_timeout(-1)
    with pytest.raises(TypeError, match="idle_timeout"):
        _reuse.resolve_idle_timeout("60")  # type: ignore[arg-type]
