"""Issue 12: nothing leaks after a kill, nothing hangs on a stuck worker, nothing surprises."""

from __future__ import annotations

import threading
import time

import pytest
from hardening_helpers import ClosesItsPool, RandomDataset
from pool_datasets import PROCESS_METHODS, SlowDataset

import compatmp
from compatmp._pool import OrderedPool
from compatmp._worker import batch_seed_sequence

pytestmark = pytest.mark.usefixtures("no_leaked_workers")


# ---------------------------------------------------------------------------------------------
# Item 3: per-batch seeds
# ---------------------------------------------------------------------------------------------


def _two_passes(method: str, workers: int, seed: int) -> list[list[tuple]]:
    ds = RandomDataset()
    with OrderedPool(ds, workers=workers, start_method=method, seed=seed) as pool:
        return [list(pool.imap(range(len(ds)))) for _ in range(2)]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("method", PROCESS_METHODS)
def test_same_seed_same_batches_whatever_the_worker_count(method):
    runs = {w: _two_passes(method, w, seed=1234) for w in (1, 2, 3)}
    assert runs[1] == runs[2] == runs[3]
    first, second = runs[1]
    assert [b[0] for b in first] == list(range(24))
    # Passes differ, and every RNG (random, numpy global, batch_rng) is reseeded per batch.
    for k in (1, 2, 3):
        assert [b[k] for b in first] != [b[k] for b in second]
        assert len({b[k] for b in first}) == 24


@pytest.mark.timeout(300)
def test_same_seed_same_batches_whatever_the_start_method():
    runs = [_two_passes(m, 2, seed=99) for m in PROCESS_METHODS]
    assert all(r == runs[0] for r in runs)
    assert _two_passes(PROCESS_METHODS[0], 2, seed=100) != runs[0]


@pytest.mark.timeout(120)
def test_threads_get_the_same_batch_rng_numbers_as_processes():
    procs = _two_passes(PROCESS_METHODS[0], 2, seed=5)
    threads = _two_passes("thread", 3, seed=5)
    for p, t in zip(procs, threads, strict=True):
        assert [b[3] for b in p] == [b[3] for b in t]


def test_batch_rng_outside_workers_follows_numpy_global_seed():
    import numpy as np

    np.random.seed(3)
    a = compatmp.batch_rng().random()
    np.random.seed(3)
    assert compatmp.batch_rng().random() == a


def test_batch_seed_sequence_depends_on_seed_pass_and_index_only():
    def state(*args):
        return tuple(batch_seed_sequence(*args).generate_state(2))

    assert state(1, 0, 5) == state(1, 0, 5)
    assert len({state(1, 0, 5), state(2, 0, 5), state(1, 1, 5), state(1, 0, 6)}) == 4
    assert state(1, 0, (0, 5)) != state(1, 0, (1, 5))  # Keras feeder keys (part, index)
    assert state(1, 0, "a") == state(1, 0, "a")


@pytest.mark.timeout(120)
def test_explicit_pass_number_gives_the_same_batches_again():
    with OrderedPool(RandomDataset(), workers=2, start_method="thread", seed=8) as pool:
        a = list(pool.imap(range(6), pass_number=4))
        b = list(pool.imap(range(6)))  # pass 5
        c = list(pool.imap(range(6), pass_number=4))

    def rng(batches):  # threads: only batch_rng() is seeded per batch
        return [x[3] for x in batches]

    assert rng(a) == rng(c)
    assert rng(a) != rng(b)
    with pytest.raises(ValueError, match="pass_number must be >= 0"):
        OrderedPool(RandomDataset(), workers=1, start_method="thread").imap([0], pass_number=-1)


# ---------------------------------------------------------------------------------------------
# Item 4: pool edges
# ---------------------------------------------------------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("method", [PROCESS_METHODS[0], "thread"])
def test_close_from_another_thread_between_batches_makes_imap_raise(method):
    with OrderedPool(RandomDataset(50), workers=2, start_method=method) as pool:
        it = pool.imap(range(50))
        got = [next(it) for _ in range(5)]
        closer = threading.Thread(target=pool.close)
        closer.start()
        closer.join(30)
        with pytest.raises(RuntimeError, match="closed while imap"):
            got.extend(it)
    assert len(got) == 5


@pytest.mark.timeout(60)
def test_concurrent_imap_from_another_thread_is_refused_clearly():
    with OrderedPool(SlowDataset(4, slow=0, seconds=2.0), workers=1, start_method="thread") as pool:
        consumer = threading.Thread(target=lambda: list(pool.imap(range(4))))
        consumer.start()
        time.sleep(0.5)  # the consumer waits inside next() for batch 0
        with pytest.raises(RuntimeError, match="another imap"):
            pool.imap(range(4))
        consumer.join(30)


@pytest.mark.timeout(60)
def test_closing_a_thread_pool_from_its_own_worker_thread_does_not_join_itself():
    ds = ClosesItsPool()
    pool = OrderedPool(ds, workers=2, start_method="thread")
    ds.pool = pool
    with pytest.raises(RuntimeError, match="closed while imap"):
        list(pool.imap(range(4)))
    assert ds.errors == []
    assert pool.closed
