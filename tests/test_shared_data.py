"""Big dataset buffers shared by all workers (issue 11): NOTE [ Shared dataset buffers ]."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from pool_datasets import PROCESS_METHODS, shm_entries
from shared_data_helpers import BIG, BigArrayDataset, EmptyBatchDataset, ManyBuffersDataset

import compatmp
from compatmp import _batch_blocks, _shm, _shm_names
from compatmp._pool import OrderedPool
from compatmp._shared_data import CHUNK, DatasetSharer

pytestmark = pytest.mark.usefixtures("no_leaked_workers")

LINUX = sys.platform.startswith("linux")


def _by_worker(pool: OrderedPool, n: int) -> dict[int, list[dict]]:
    seen: dict[int, list[dict]] = {}
    for batch in pool.imap(range(n)):
        seen.setdefault(batch["worker"], []).append(batch)
    return seen


@pytest.mark.timeout(120)
@pytest.mark.parametrize("method", [m for m in PROCESS_METHODS if m != "fork"])
def test_workers_see_private_writable_views_of_one_shared_block(method):
    ds = BigArrayDataset()
    with OrderedPool(ds, workers=2, start_method=method) as pool:
        names = pool._sharer.block_names()
        assert len(names) == 1  # the 4.8 MB array; the 64-byte permutation stays in the pickle
        assert names[0].startswith(pool._core.shm_prefix)  # the pool's sweep finds it
        seen = _by_worker(pool, 8)
        assert len(seen) == 2
        for batches in seen.values():
            for b in batches:
                assert b["writeable"] is True  # as in the main process (and under fork)
                if LINUX:  # the array's memory is the block itself, in every worker
                    assert b["file"] == f"/dev/shm/{names[0]}"
        assert ds.x.flags.writeable  # the main process's array is untouched
    assert shm_entries() == []  # unlinked on close


@pytest.mark.timeout(120)
@pytest.mark.parametrize("method", PROCESS_METHODS)
def test_changed_big_array_reaches_every_worker_and_unchanged_is_not_resent(method, monkeypatch):
    ds = BigArrayDataset()
    with OrderedPool(ds, workers=2, start_method=method) as pool:
        _by_worker(pool, 8)
        assert not pool.update_dataset(ds)  # nothing changed: nothing sent
        ds.on_epoch_end()  # small change only
        report = pool.update_dataset(ds)
        assert report.sent and report.bytes_copied == 0 and report.changed_buffers == 0
        blocks = pool._sharer.block_names()
        seen = _by_worker(pool, 8)
        assert all(b["value"] == 7.0 for b in next(iter(seen.values()))[:1])
        ds.on_epoch_end()
        report = pool.update_dataset(ds)
        assert report.bytes_copied == 0 and pool._sharer.block_names() == blocks

        ds.x = ds.x + 1000  # a new array: sent once, reaches every worker
        report = pool.update_dataset(ds)
        assert report.bytes_copied == BIG * 8 and report.changed_buffers == 1
        seen = _by_worker(pool, 8)
        assert len(seen) == 2
        for batches in seen.values():
            assert all(b["value"] >= 1000 for b in batches)
        assert pool._sharer.block_names() != blocks
        if LINUX:  # the replaced block is gone already
            assert not set(blocks) & set(os.listdir("/dev/shm"))

        ds.x *= 2  # an in-place write over the whole array: every piece copied again
        report = pool.update_dataset(ds)
        assert report.bytes_copied == BIG * 8
        for batches in _by_worker(pool, 8).values():
            assert all(b["value"] >= 2000 for b in batches)

        ds.x[5] = -1.0  # one element, written in place: exactly one piece is copied
        report = pool.update_dataset(ds)
        assert report.changed_buffers == 1 and report.bytes_copied == CHUNK
        values = {b["value"] for bs in _by_worker(pool, 8).values() for b in bs}
        assert -1.0 in values


@pytest.mark.timeout(120)
@pytest.mark.parametrize("method", PROCESS_METHODS)
def test_a_workers_write_stays_in_that_worker_under_every_start_method(method):
    """issue 17.2: writable arrays in every worker, as under fork; writes stay private."""
    from shared_data_helpers import CachingDataset

    ds = CachingDataset()
    with OrderedPool(ds, workers=2, start_method=method) as pool:
        out = list(pool.imap(range(8)))
        for i, (worker, cache, _) in enumerate(out):
            assert cache[i] == -(i + 1)  # its own write, no "read-only" ValueError
            for j, (other, _, _) in enumerate(out):
                if other != worker:
                    assert cache[j] == 0.0  # never another worker's write
        assert not ds.cache.any()  # nor the main process's array, nor the block

        ds.labels[3] = 9.0  # the main changes labels only: cache is unchanged, not re-sent
        report = pool.update_dataset(ds)
        assert report.changed_buffers == 1
        for i, (_, cache, labels) in enumerate(pool.imap(range(8))):
            assert labels[3] == 9.0
            assert cache[i] == -(i + 1)

        ds.cache[0] = 0.5  # now cache changed in the main: re-sent, the workers' writes go
        pool.update_dataset(ds)
        out = list(pool.imap([7]))
        _, cache, _ = out[0]
        assert cache[0] == 0.5 and cache[7] == -8.0
        assert all(v == 0.0 for v in cache[1:7])  # earlier writes of this worker are gone


@pytest.mark.timeout(120)
@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts descriptors in /proc")
@pytest.mark.parametrize("method", [m for m in PROCESS_METHODS if m != "fork"])
def test_a_worker_holds_no_descriptor_per_dataset_block(method):
    """Issue 17.4: the dataset's blocks are mapped, then their descriptors closed, so a
    dataset of many big arrays cannot exhaust ``ulimit -n`` in a worker (macOS: 256)."""
    counts = {}
    for n in (0, 60):
        ds = ManyBuffersDataset(n)
        with compatmp.OrderedPool(ds, workers=1, start_method=method) as pool:
            (fds, total), _ = list(pool.imap(range(2)))
        assert total == sum(range(n))  # the workers saw every array
        counts[n] = fds
    assert counts[60] - counts[0] < 10, counts


@pytest.mark.timeout(60)
def test_fork_workers_inherit_the_dataset_and_the_main_keeps_a_copy_to_compare():
    """Fork: the workers use their inherited pages; the block is the main process's copy."""
    if "fork" not in PROCESS_METHODS:
        pytest.skip("no fork here")
    ds = BigArrayDataset()
    with OrderedPool(ds, workers=2, start_method="fork") as pool:
        assert len(pool._sharer.block_names()) == 1  # x as it was at the fork
        assert shm_entries() == pool._sharer.block_names()
        batches = [b for bs in _by_worker(pool, 8).values() for b in bs]
        assert all(b["writeable"] for b in batches)  # the inherited (copy-on-write) array
        assert all(not (b["file"] or "").startswith("/dev/shm") for b in batches)
        ds.on_epoch_end()  # a small change: the big array is referenced, not sent
        assert pool.update_dataset(ds).bytes_copied == 0
        assert len(pool._sharer.block_names()) == 1
        seen = _by_worker(pool, 8)
        assert len(seen) == 2
        for batches in seen.values():
            for b in batches:
                assert b["writeable"] is True  # a view of its inherited copy-on-write pages
                assert not (b["file"] or "").startswith("/dev/shm")  # private, not a block
        assert sorted(b["value"] for bs in seen.values() for b in bs) == [
            float(v) for v in range(8)
        ]
        ds.x.setflags(write=False)  # only the flag: the workers re-map, as a spawn worker does
        report = pool.update_dataset(ds)
        assert report.sent and report.bytes_copied == 0
        for batches in _by_worker(pool, 8).values():
            for b in batches:
                assert b["writeable"] is False and (b["file"] or "").startswith("/dev/shm")


@pytest.mark.timeout(90)
def test_fork_a_sparse_write_after_the_fork_is_seen_by_every_worker():
    """issue 17.1 under fork: pages the main process wrote after the fork are not in the
    workers' copies; the update finds each one-element write and patches only its piece."""
    if "fork" not in PROCESS_METHODS:
        pytest.skip("no fork here")
    ds = BigArrayDataset(n_batches=8)
    ds.order = np.array([0, 3, BIG // 2, BIG - 1, 1, 2, 4, 5])
    expected = ds.x.copy()
    with OrderedPool(ds, workers=2, start_method="fork") as pool:
        list(pool.imap(range(8)))  # the workers run and hold the inherited pages
        for position, value in [(3, -5.0), (BIG - 1, -7.0), (BIG // 2, 0.25), (3, 1e9)]:
            ds.x[position] = value  # one element, written in place after the fork
            expected[position] = value
            report = pool.update_dataset(ds)
            assert report.sent and report.changed_buffers == 1
            assert 0 < report.bytes_copied <= CHUNK  # the piece, not the 4.8 MB buffer
            seen = _by_worker(pool, 8)
            assert len(seen) == 2  # both workers answered
            for batches in seen.values():
                for b in batches:
                    assert (b["file"] or "").startswith("/dev/shm")  # the block, remapped
            got = sorted(b["value"] for bs in seen.values() for b in bs)
            assert got == sorted(float(v) for v in expected[ds.order])
            assert not pool.update_dataset(ds).sent  # the same again: nothing to send


def test_small_arrays_stay_in_the_pickle_and_shared_payload_round_trips():
    sharer = DatasetSharer()
    small = {"a": np.arange(10), "big": np.ones(BIG)}
    sharer.check(small)
    sharer.prefix = _shm_names.block_prefix(os.getpid(), "t000")
    try:
        payload = sharer.start(sharer.prefix, small)
        assert len(payload.buffers) == 1 and payload.buffers[0].nbytes == BIG * 8
        assert "numpy" in payload.modules
        back = payload.load()
        assert back["big"].flags.writeable and back["a"].flags.writeable
        np.testing.assert_array_equal(back["big"], small["big"])
    finally:
        sharer.close()
    assert shm_entries() == []


def test_read_only_array_is_compared_too_and_stays_read_only_in_workers():
    x = np.ones(BIG)
    x.setflags(write=False)
    sharer = DatasetSharer()
    sharer.check([x])
    try:
        payload = sharer.start(_shm_names.block_prefix(os.getpid(), "t003"), [x])
        assert payload.load()[0].flags.writeable is False  # as in the main process
        assert sharer.update([x]) is None
        x.setflags(write=True)
        x[7] = 3.0  # flipped, written, flipped back: still found (nothing is trusted)
        x.setflags(write=False)
        update = sharer.update([x])
        assert update is not None and update.report.bytes_copied == CHUNK
        sharer.commit(update)
        back = update.payload.load()[0]
        assert back[7] == 3.0 and back.flags.writeable is False
    finally:
        sharer.close()
    assert shm_entries() == []


@pytest.mark.timeout(60)
@pytest.mark.parametrize("method", [*PROCESS_METHODS, "thread"])
def test_empty_batches_arrive_intact(method):
    with OrderedPool(EmptyBatchDataset(), workers=2, start_method=method) as pool:
        for i, (x, y) in enumerate(pool.imap(range(6))):
            assert x.shape == (32, 64, 64, 2) and x.dtype == np.float32
            assert (x == i).all() and (y == i).all()


def test_empty_outside_workers_is_numpy_empty():
    a = compatmp.empty((3, 4), np.float32, order="F")
    assert type(a) is np.ndarray and a.shape == (3, 4) and a.flags.f_contiguous
    assert compatmp.empty(5).dtype == np.float64
    with pytest.raises(ValueError, match="order must be"):
        compatmp.empty(3, order="K")
    with pytest.raises(ValueError, match="negative"):
        compatmp.empty((-1, 2))


def test_block_pool_sends_an_allocated_array_without_copying():
    blocks = _batch_blocks.BlockPool(_shm_names.block_prefix(os.getpid(), "t001"), threshold=1024)
    try:
        x = blocks.allocate((256, 4), np.float64)
        x[...] = 7
        address = x.__array_interface__["data"][0]
        encoded = blocks.encode((x, 1), key=0)
        (shm,) = blocks.in_use[0]
        assert encoded[0].name == shm.name
        view = np.ndarray((256, 4), np.float64, buffer=shm.buf)
        assert view.__array_interface__["data"][0] == address and (view == 7).all()
        del view, x
        unused = blocks.allocate((512,), np.float64)  # not returned in the batch
        blocks.encode(np.zeros(3), key=1)
        assert blocks.allocated == {} and len(blocks.free) == 1  # taken back for reuse
        del unused
    finally:
        blocks.close()
    assert shm_entries() == []


SPAWN_SCRIPT = textwrap.dedent(
    """
    import sys, warnings
    sys.path.insert(0, {tests!r})
    import tensorflow  # the parent initialised TensorFlow, as a training script does
    import compatmp
    from lazy_keras_datasets import (
        KerasUsingSequence, NumpyOnlyPyDataset, NumpyOnlyTfSequence)
    warnings.simplefilter("ignore")
    for cls in (NumpyOnlyPyDataset, NumpyOnlyTfSequence):
        with compatmp.OrderedPool(cls(), workers=1, start_method="spawn") as pool:
            batches = list(pool.imap(range(4)))
        assert [float(b[0][0]) for b in batches] == [0.0, 3.0, 6.0, 9.0], batches
        assert all(b[1] == (False, False) for b in batches), (cls, batches)
    with compatmp.OrderedPool(KerasUsingSequence(), workers=1, start_method="spawn") as pool:
        batches = list(pool.imap(range(3)))
    assert [b[0].tolist() for b in batches] == [[0, 0], [1, 1], [2, 2]], batches
    assert [b[1].tolist() for b in batches] == [[0, 0], [1, 1], [2, 2]], batches
    print("OK")
    """
)


@pytest.mark.timeout(300)
def test_module_defined_keras_datasets_under_spawn():
    pytest.importorskip("keras")
    pytest.importorskip("tensorflow")
    if "spawn" not in PROCESS_METHODS:
        pytest.skip("no spawn here")
    tests = os.path.dirname(os.path.abspath(__file__))
    proc = subprocess.run(
        [sys.executable, "-c", SPAWN_SCRIPT.format(tests=tests)],
        capture_output=True,
        text=True,
        timeout=280,
    )
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-4000:]


@pytest.mark.timeout(300)
def test_bigdata_bench_smoke(capsys):
    from compatmp.bench import cli

    methods = "spawn" if "spawn" in PROCESS_METHODS else PROCESS_METHODS[0]
    code = cli.main(
        ["--workload", "bigdata", "--megabytes", "8", "--workers", "1", "--methods", methods]
    )
    out = capsys.readouterr().out
    assert code == 0, out
    assert f"| compatmp-{methods} | 8 | 1 |" in out and "update s" in out


@pytest.mark.timeout(60)
@pytest.mark.parametrize("method", [m for m in PROCESS_METHODS if m != "fork"])
def test_dataset_blocks_are_unlinked_after_a_batch_error_and_on_garbage_collection(method):
    import gc

    from pool_datasets import RaisingDataset

    ds = RaisingDataset(4, bad=1)
    ds.big = np.ones(BIG)
    pool = OrderedPool(ds, workers=1, start_method=method)
    names = pool._sharer.block_names()
    assert len(names) == 1 and names[0] in shm_entries()
    with pytest.raises(Exception, match="bad index 1"):
        list(pool.imap(range(4)))
    assert pool.closed and shm_entries() == []

    pool = OrderedPool(BigArrayDataset(), workers=1, start_method=method)
    assert len(shm_entries()) == 1
    del pool
    gc.collect()
    assert shm_entries() == []


def test_by_value_failure_falls_back_to_by_reference(monkeypatch):
    from compatmp import _by_value

    calls = []

    def flaky(obj, callback, by_value, image=False):
        calls.append(list(by_value))
        if by_value:
            raise TypeError("cannot pickle this module's state")
        return b"ok", ()

    monkeypatch.setattr(_by_value, "_by_value_modules", lambda obj: [np])
    monkeypatch.setattr(_by_value, "_dump_once", flaky)
    assert _by_value.dump_dataset(object(), None) == (b"ok", ())
    assert calls == [[np], []]


def test_forkserver_preload_uses_the_modules_noted_while_pickling(monkeypatch):
    from compatmp import _launch

    def no_walk(data):
        raise AssertionError("the dataset pickle must not be walked")

    monkeypatch.setattr(_launch, "_pickled_modules", no_walk)
    sharer = DatasetSharer()
    ds = BigArrayDataset()
    sharer.check(ds)
    try:
        payload = sharer.start(_shm_names.block_prefix(os.getpid(), "t002"), ds)
        assert "numpy" in payload.modules and "shared_data_helpers" in payload.modules

        class Ctx:
            preload: list[str] = []

            def set_forkserver_preload(self, modules):
                Ctx.preload = modules

        _launch._forkserver_preload(Ctx(), [payload])
        assert Ctx.preload[0] == "compatmp._worker" and "numpy" in Ctx.preload
    finally:
        sharer.close()


@pytest.mark.parametrize("inherit", [False, True])
def test_buffers_that_do_not_fit_in_dev_shm_go_in_band_and_stay_exact(monkeypatch, inherit):
    """No room for a block (Docker's 64 MB /dev/shm): the buffer travels in the pickle."""
    x = np.zeros(BIG)
    sharer = DatasetSharer(inherit=inherit)
    monkeypatch.setattr(_shm, "room", lambda headroom=0: 0)  # no room from the start
    sharer.check([x])
    try:
        first = sharer.start(_shm_names.block_prefix(os.getpid(), "t004"), [x])
        if inherit:  # forked workers inherit it; no copy at the fork: a SHA-256 instead
            assert first[0] is x and sharer.block_names() == []
        else:
            assert first.buffers == () and len(first.data) > BIG * 8
        x[123] = 4.0  # a sparse write (fork: after the fork)
        update = sharer.update([x])
        assert update is not None and update.payload.buffers == ()  # in-band
        assert len(update.payload.data) > BIG * 8
        sharer.commit(update)
        assert sharer.block_names() == [] and shm_entries() == []
        np.testing.assert_array_equal(update.payload.load()[0], x)
        assert sharer.update([x]) is None  # exact in-band: unchanged is not re-sent
    finally:
        sharer.close()
    assert shm_entries() == []


def test_fork_without_memory_for_the_copy_hashes_and_still_finds_a_sparse_write(monkeypatch):
    """Fork, the copy over the memory budget: a SHA-256 at the fork; a one-element write
    after it still sends the buffer (whole, into a new block), and exactly once."""
    from compatmp import _shared_data

    monkeypatch.setattr(_shared_data, "_copy_budget", lambda: BIG * 8 - 1)  # one byte short
    x = np.zeros(BIG)
    sharer = DatasetSharer(inherit=True)
    sharer.check([x])
    try:
        assert sharer.start(_shm_names.block_prefix(os.getpid(), "t005"), [x])[0] is x
        assert sharer.block_names() == []  # hashed, not copied
        assert sharer.update([x]) is None  # unchanged: the digest matches
        x[BIG - 1] = 2.0  # the last element, written after the fork
        update = sharer.update([x])
        assert update is not None and update.report.changed_buffers == 1
        assert update.report.bytes_copied == BIG * 8  # no copy of the old pages: all of it
        (ref,) = update.payload.buffers
        assert ref.name in sharer.block_names()  # the workers now map the block
        sharer.commit(update)
        np.testing.assert_array_equal(update.payload.load()[0], x)
        assert sharer.update([x]) is None
    finally:
        sharer.close()
    assert shm_entries() == []


def test_the_worker_loads_any_worker_payload_by_its_load_method():
    from compatmp._preload import WorkerPayload
    from compatmp._worker import _materialize

    class Payload(WorkerPayload):
        def load(self):
            return "loaded"

        def preload_modules(self):
            return ("numpy",)

    assert _materialize(Payload(), True) == "loaded"
    assert isinstance(_materialize(Payload(), False), Payload)  # threads get the object
