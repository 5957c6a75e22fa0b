"""OrderedPool: order, errors, crashes, timeouts, Ctrl-C, epochs, dataset updates, seeding."""

from __future__ import annotations

import gc
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import threading
import time
import warnings

import psutil
import pytest
from pool_datasets import (
    ALL_METHODS,
    PROCESS_METHODS,
    BadIndexError,
    BigArrayDataset,
    ExitDataset,
    FailsToLoadInWorker,
    HoldsGenerator,
    InfoDataset,
    LoadError,
    NamespaceDataset,
    PidThenSleepDataset,
    RaisingDataset,
    RangeDataset,
    RecordingDataset,
    SlowDataset,
    StateDataset,
    failing_init,
    pid_alive,
    record_init,
    shm_entries,
    worker_processes,
)

from compatmp import (
    StartMethodError,
    ThreadFallbackWarning,
    WorkerCrashedError,
    WorkerTimeoutError,
    _launch,
    dumps,
)
from compatmp import _worker as _worker_mod
from compatmp._batch_blocks import MAX_FREE_BLOCKS
from compatmp._pool import OrderedPool
from compatmp._worker import RemoteTraceback, get_worker_info

pytestmark = pytest.mark.usefixtures("no_leaked_workers")

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS_DIR)

# "No hang" bound on crash detection and orphan exit, in seconds: far above normal (well under
# a second) so that load on a shared CI machine cannot fail it; the latency is measured by
# ``python -m compatmp.bench.latency``.
CRASH_DEADLINE = 30.0


# ---------------------------------------------------------------------------------------------
# Arguments
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"workers": 0}, ValueError, "workers must be >= 1; received 0"),
        ({"workers": "2"}, TypeError, "workers must be an int >= 1; received '2' of type str"),
        ({"workers": True}, TypeError, "workers must be an int"),
        ({"workers": 1, "max_queue_size": 0}, ValueError, "max_queue_size must be >= 1"),
        ({"workers": 1, "max_queue_size": 2.0}, TypeError, "max_queue_size must be an int"),
        ({"workers": 1, "timeout": 0}, ValueError, "timeout must be None"),
        ({"workers": 1, "timeout": -1.5}, ValueError, "timeout must be None"),
        ({"workers": 1, "timeout": float("nan")}, ValueError, "timeout must be None"),
        ({"workers": 1, "timeout": "5"}, TypeError, "timeout must be None or a number"),
        ({"workers": 1, "seed": -1}, ValueError, "seed must be >= 0"),
        ({"workers": 1, "seed": "1"}, TypeError, "seed must be an int"),
        ({"workers": 1, "worker_init_fn": 3}, TypeError, "worker_init_fn must be a callable"),
        ({"workers": 1, "start_method": "fork-please"}, StartMethodError, "must be one of"),
    ],
)
def test_bad_arguments_are_rejected_before_any_worker_starts(kwargs, error, match):
    before = worker_processes()
    with pytest.raises(error, match=match):
        OrderedPool(RangeDataset(3), **kwargs)
    assert worker_processes() == before


def test_workers_of_the_wrong_type_is_a_type_error_and_out_of_range_a_value_error():
    # The same checks (compatmp._args) as compatmp.fit(workers=...).
    with pytest.raises(TypeError, match="workers must be an int"):
        OrderedPool(RangeDataset(3), workers="2")
    with pytest.raises(ValueError, match="workers must be >= 1"):
        OrderedPool(RangeDataset(3), workers=0)


def test_dataset_without_len_or_getitem_is_rejected():
    with pytest.raises(TypeError, match=r"__len__ and __getitem__.*got builtins\.generator"):
        OrderedPool((x for x in range(3)), workers=1)


# ---------------------------------------------------------------------------------------------
# Order and completeness
# ---------------------------------------------------------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("method", ALL_METHODS)
def test_order_kept_with_random_delays(method):
    ds = RangeDataset(40, max_delay=0.02)
    with OrderedPool(ds, workers=3, start_method=method, max_queue_size=6) as pool:
        assert pool.decision.method == method
        out = list(pool.imap(range(40)))
        assert [i for i, _ in out] == list(range(40))
        pids = {pid for _, pid in out}
        if method == "thread":
            assert pids == {os.getpid()}
        else:
            assert len(pids) == 3 and os.getpid() not in pids
        # Any order of indices, repeated indices included, is honoured.
        order = [5, 1, 1, 39, 0, 20]
        assert [i for i, _ in pool.imap(order)] == order


@pytest.mark.timeout(60)
@pytest.mark.parametrize("method", ALL_METHODS)
def test_at_most_max_queue_size_batches_in_flight(method):
    with OrderedPool(
        RangeDataset(30, 0.01), workers=2, start_method=method, max_queue_size=3
    ) as pool:
        core = pool._core
        seen = []
        for _ in pool.imap(range(30)):
            time.sleep(0.02)  # a slow consumer: workers would run ahead if allowed
            seen.append(core.tasks.in_flight())
        assert max(seen) <= 3
        assert max(seen) >= 2  # and they do work ahead


@pytest.mark.timeout(60)
@pytest.mark.parametrize("method", ALL_METHODS)
def test_every_index_computed_exactly_once(method, tmp_path):
    ds = RecordingDataset(50, str(tmp_path))
    with OrderedPool(ds, workers=2, start_method=method, max_queue_size=7) as pool:
        assert list(pool.imap(range(50))) == list(range(50))
    counts: dict[int, int] = {}
    for name in os.listdir(tmp_path):
        i = int(name.split("_")[0])
        counts[i] = counts.get(i, 0) + 1
    assert counts == dict.fromkeys(range(50), 1)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("method", ALL_METHODS)
def test_stopping_early_discards_pending_batches_and_pool_stays_usable(method):
    with OrderedPool(RangeDataset(30, 0.01), workers=2, start_method=method) as pool:
        for k, _ in enumerate(pool.imap(range(30))):
            if k == 3:
                break
        assert [i for i, _ in pool.imap(range(10, 15))] == list(range(10, 15))
        unfinished = pool.imap(range(20))
        next(unfinished)
        # A new imap abandons the unfinished one.
        assert [i for i, _ in pool.imap([7, 8])] == [7, 8]
        with pytest.raises(StopIteration):
            next(unfinished)


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("method", ALL_METHODS)
def test_exception_reraised_with_same_type_and_worker_traceback(method):
    pool = OrderedPool(RaisingDataset(20, bad=5), workers=2, start_method=method)
    got = []
    with pytest.raises(BadIndexError, match="bad index 5") as info:
        for batch in pool.imap(range(20)):
            got.append(batch)
    assert got == [0, 1, 2, 3, 4]  # batches before the failing one still arrive, in order
    cause = info.value.__cause__
    assert isinstance(cause, RemoteTraceback)
    assert "_fail_here" in str(cause) and "__getitem__" in str(cause)
    assert "BadIndexError: bad index 5" in str(cause)
    assert pool.closed
    with pytest.raises(RuntimeError, match=r"closed.*BadIndexError"):
        pool.imap(range(3))
    pool.close()  # idempotent


@pytest.mark.timeout(60)
@pytest.mark.parametrize("method", PROCESS_METHODS)
def test_exception_that_cannot_be_pickled_becomes_runtime_error(method):
    with OrderedPool(
        RaisingDataset(4, bad=1, unpicklable=True), workers=1, start_method=method
    ) as pool:
        with pytest.raises(RuntimeError, match="NeedsTwoArgsError: needs two args: 1 x") as info:
            list(pool.imap(range(4)))
    assert isinstance(info.value.__cause__, RemoteTraceback)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("method", PROCESS_METHODS)
def test_dataset_that_fails_to_load_in_worker_raises_its_error(method):
    if method == "fork":  # forked workers inherit the object: nothing is unpickled
        with OrderedPool(FailsToLoadInWorker(), workers=2, start_method=method) as pool:
            assert len(list(pool.imap(range(4)))) == 4
        return
    with OrderedPool(FailsToLoadInWorker(), workers=2, start_method=method) as pool:
        with pytest.raises(LoadError, match="cannot load this dataset in a worker") as info:
            list(pool.imap(range(4)))
        assert "_load_or_fail" in str(info.value.__cause__)
        assert pool.closed


@pytest.mark.timeout(60)
@pytest.mark.parametrize("method", PROCESS_METHODS)
def test_worker_os_exit_raises_worker_crashed_error(method):
    with OrderedPool(
        ExitDataset(20, bad=3, code=7, delay=0.05), workers=2, start_method=method
    ) as pool:
        start = time.monotonic()
        with pytest.raises(WorkerCrashedError) as info:
            list(pool.imap(range(20)))
        assert time.monotonic() - start < CRASH_DEADLINE
    err = info.value
    assert err.exitcode == 7 and err.index == 3
    assert f"pid {err.pid}" in str(err) and "exited with code 7" in str(err)
    assert "index 3" in str(err)
    assert not pid_alive(err.pid)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("method", PROCESS_METHODS)
def test_worker_killed_from_outside_raises_within_seconds(method):
    with OrderedPool(PidThenSleepDataset(10, delay=30), workers=2, start_method=method) as pool:
        it = pool.imap(range(10))
        victim = next(it)
        os.kill(victim, signal.SIGKILL)
        start = time.monotonic()
        with pytest.raises(WorkerCrashedError) as info:
            next(it)
        assert time.monotonic() - start < CRASH_DEADLINE
    err = info.value
    assert err.pid == victim and err.exitcode == -signal.SIGKILL
    assert f"pid {victim}" in str(err) and "SIGKILL" in str(err)
    assert err.index == 2  # the worker that computed index 0 got index 2 next


@pytest.mark.timeout(60)
@pytest.mark.parametrize("method", ALL_METHODS)
def test_slow_batch_raises_worker_timeout_error(method):
    with OrderedPool(
        SlowDataset(10, slow=2, seconds=2.0), workers=2, start_method=method, timeout=0.5
    ) as pool:
        it = pool.imap(range(10))
        assert [next(it), next(it)] == [0, 1]
        start = time.monotonic()
        with pytest.raises(
            WorkerTimeoutError, match=r"index 2 took longer than timeout=0.5 s"
        ) as info:
            next(it)
        # 0.5 s timeout, then close(): up to SHUTDOWN_TIMEOUT for the busy worker, SIGTERM.
        # Not before the timeout; the upper bound is a "no hang" bound (load-proof).
        assert 0.4 < time.monotonic() - start < 30
        assert info.value.index == 2 and info.value.timeout == 0.5
        assert pool.closed


@pytest.mark.timeout(60)
@pytest.mark.parametrize("method", ALL_METHODS)
def test_exception_in_consumer_then_close_leaves_nothing(method):
    # The no_leaked_workers fixture checks processes, threads and shared memory afterwards.
    with pytest.raises(KeyError):
        with OrderedPool(
            BigArrayDataset(40, (512, 512), 0.01), workers=2, start_method=method
        ) as pool:
            for k, _ in enumerate(pool.imap(range(40))):
                if k == 2:
                    raise KeyError("consumer failed")
    assert pool.closed


@pytest.mark.timeout(60)
@pytest.mark.parametrize("method", ALL_METHODS)
def test_garbage_collection_closes_the_pool(method):
    pool = OrderedPool(RangeDataset(10), workers=2, start_method=method)
    it = pool.imap(range(10))
    next(it)
    core = pool._core
    del pool, it
    gc.collect()
    assert core.closed


# The scripts restore Python's SIGINT handler first: a program started from a background job
# of a non-interactive shell (nohup, some CI runners) inherits SIGINT ignored, and Python then
# leaves it ignored; a terminal program, which these tests model, has the default.
_CTRL_C_SCRIPT = """
import signal, sys, time
signal.signal(signal.SIGINT, signal.default_int_handler)
sys.path[:0] = [{tests!r}, {root!r}]
import psutil
from pool_datasets import BigArrayDataset, worker_processes
from compatmp._pool import OrderedPool

pool = OrderedPool(BigArrayDataset(10_000, (256, 1024), delay=0.05), workers=2,
                   start_method={method!r})
print("workers", *sorted(pid for pid, _ in worker_processes()), flush=True)
for k, batch in enumerate(pool.imap(range(10_000))):
    if k == 2:
        print("iterating", flush=True)
"""


@pytest.mark.slow
@pytest.mark.timeout(60)
@pytest.mark.parametrize("method", ALL_METHODS)
def test_ctrl_c_while_iterating_leaves_no_orphans(method):
    script = _CTRL_C_SCRIPT.format(tests=TESTS_DIR, root=ROOT, method=method)
    proc = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(script)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        workers = [int(p) for p in proc.stdout.readline().split()[1:]]
        assert proc.stdout.readline().strip() == "iterating"
        assert len(workers) == (0 if method == "thread" else 2)
        # Like Ctrl-C in a terminal: SIGINT to the whole process group, workers included.
        os.killpg(proc.pid, signal.SIGINT)
        _, stderr = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode != 0
    assert "KeyboardInterrupt" in stderr
    assert stderr.count("Traceback") == 1, stderr  # the main's only: workers ignore SIGINT
    assert "resource_tracker" not in stderr, stderr
    deadline = time.monotonic() + CRASH_DEADLINE
    while any(pid_alive(p) for p in workers) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not [p for p in workers if pid_alive(p)]
    assert shm_entries(proc.pid) == []


# ---------------------------------------------------------------------------------------------
# Long life: epochs, dataset updates
# ---------------------------------------------------------------------------------------------


def _resources() -> tuple[int, int, int]:
    me = psutil.Process()
    return me.num_fds(), me.num_threads(), len(worker_processes())


@pytest.mark.slow
@pytest.mark.timeout(120)
@pytest.mark.parametrize("method", ALL_METHODS)
def test_hundred_epochs_on_one_pool_do_not_grow_fds_threads_or_processes(method):
    with OrderedPool(BigArrayDataset(8, (300, 300)), workers=2, start_method=method) as pool:
        pids = None
        for epoch in range(100):
            out = list(pool.imap(range(8)))
            assert [int(b[0, 0]) for b in out] == list(range(8))
            if epoch == 2:
                # Steady state from here: the epoch held in `out`, the one before it (whose
                # release goes out with the next epoch's first message) and the free lists.
                first = _resources()
                pids = worker_processes()
        assert _resources() == first
        assert worker_processes() == pids  # workers started once, not once per epoch
        # Blocks, and the main process's handles (fds) to them, stay bounded: unlinked on close.
        assert len(shm_entries()) <= 8 + 8 + pool.workers * MAX_FREE_BLOCKS


@pytest.mark.timeout(60)
@pytest.mark.parametrize("method", ALL_METHODS)
def test_update_dataset_reaches_every_worker(method):
    ds = StateDataset(12, state=0)
    with OrderedPool(ds, workers=3, start_method=method) as pool:
        out = list(pool.imap(range(12)))
        assert {s for s, _ in out} == {0} and {w for _, w in out} == {0, 1, 2}
        ds.state = 1
        # Process workers need the new pickle; threads already share the mutated object.
        assert pool.update_dataset(ds).sent is (method != "thread")
        out = list(pool.imap(range(12)))
        assert {s for s, _ in out} == {1} and {w for _, w in out} == {0, 1, 2}
        assert pool.update_dataset(ds).sent is False  # unchanged: nothing sent
        replacement = StateDataset(12, state=2)
        assert pool.update_dataset(replacement).sent is True
        out = list(pool.imap(range(3)))
        assert {s for s, _ in out} == {2} and {w for _, w in out} == {0, 1, 2}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("method", PROCESS_METHODS)
def test_update_dataset_while_an_epoch_is_half_consumed(method):
    ds = StateDataset(12, state=0)
    with OrderedPool(ds, workers=2, start_method=method, max_queue_size=6) as pool:
        it = pool.imap(range(12))
        first = [next(it) for _ in range(3)]
        ds.state = 5
        assert pool.update_dataset(ds).sent is True
        rest = list(it)
        states = [s for s, _ in first + rest]
        assert len(states) == 12 and states[:3] == [0, 0, 0] and states[-1] == 5
        assert states == sorted(states)  # batches asked for after the update see it


# ---------------------------------------------------------------------------------------------
# Worker info and seeding
# ---------------------------------------------------------------------------------------------


def _first_per_worker(batches):
    first = {}
    for info, r, n, pid, init in batches:
        first.setdefault(info.id, (info, r, n, pid, init))
    return first


@pytest.mark.timeout(60)
@pytest.mark.parametrize("method", ALL_METHODS)
def test_worker_info_ids_and_distinct_random_streams(method):
    assert get_worker_info() is None
    with OrderedPool(
        InfoDataset(), workers=3, start_method=method, seed=123, worker_init_fn=record_init
    ) as pool:
        first = _first_per_worker(pool.imap(range(9)))
    assert sorted(first) == [0, 1, 2]
    assert {info.num_workers for info, *_ in first.values()} == {3}
    assert len({info.seed for info, *_ in first.values()}) == 3
    assert len({r for _, r, _, _, _ in first.values()}) == 3
    assert len({n for _, _, n, _, _ in first.values()}) == 3
    assert all(init == wid for wid, (*_, init) in first.items())
    assert get_worker_info() is None


@pytest.mark.timeout(60)
@pytest.mark.parametrize("method", PROCESS_METHODS)
def test_same_seed_same_worker_random_numbers(method):
    def run(seed):
        with OrderedPool(InfoDataset(), workers=2, start_method=method, seed=seed) as pool:
            first = _first_per_worker(pool.imap(range(4)))
        return {wid: (info.seed, r, n) for wid, (info, r, n, _, _) in first.items()}

    a, b, c = run(7), run(7), run(8)
    assert a == b
    assert a != c


# ---------------------------------------------------------------------------------------------
# Thread fallback
# ---------------------------------------------------------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("method", ["auto", *PROCESS_METHODS])
def test_unpicklable_dataset_falls_back_to_threads_with_one_warning(method):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pool = OrderedPool(HoldsGenerator(6), workers=2, start_method=method)
    with pool:
        fallbacks = [w for w in caught if issubclass(w.category, ThreadFallbackWarning)]
        assert len(fallbacks) == 1
        text = str(fallbacks[0].message)
        assert "dataset.gen" in text and "generator" in text
        assert fallbacks[0].filename == __file__  # points at the caller
        assert pool.decision.method == "thread"
        assert "cannot be pickled" in pool.decision.reason
        assert "dataset.gen" in pool.decision.reason
        assert list(pool.imap(range(6))) == [0, 2, 4, 6, 8, 10]
        assert threading.active_count() >= 3  # two worker threads run


# ---------------------------------------------------------------------------------------------
# Orphaned workers
# ---------------------------------------------------------------------------------------------

_ORPHAN_SCRIPT = """
import sys, os
sys.path[:0] = [{tests!r}, {root!r}]
from pool_datasets import SlowDataset, worker_processes
from compatmp._pool import OrderedPool

pool = OrderedPool(SlowDataset(4, slow=-1, seconds=0), workers=2, start_method={method!r})
list(pool.imap(range(4)))
print("workers", *sorted(pid for pid, _ in worker_processes()), flush=True)
os._exit(0)  # the main process vanishes without closing the pool
"""


@pytest.mark.slow
@pytest.mark.timeout(60)
@pytest.mark.parametrize("method", PROCESS_METHODS)
def test_workers_exit_when_the_main_process_dies(method):
    script = _ORPHAN_SCRIPT.format(tests=TESTS_DIR, root=ROOT, method=method)
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True, timeout=30
    ).stdout
    workers = [int(p) for p in out.split()[1:]]
    assert len(workers) == 2
    deadline = time.monotonic() + CRASH_DEADLINE
    while any(pid_alive(p) for p in workers) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not [p for p in workers if pid_alive(p)]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("method", ALL_METHODS)
def test_failing_worker_init_fn_is_raised(method):
    with OrderedPool(
        RangeDataset(4), workers=2, start_method=method, worker_init_fn=failing_init
    ) as pool:
        with pytest.raises(BadIndexError, match="init failed in worker") as info:
            list(pool.imap(range(4)))
        assert "failing_init" in str(info.value.__cause__)
        assert pool.closed


@pytest.mark.timeout(60)
@pytest.mark.parametrize("method", ALL_METHODS)
def test_close_from_another_thread_makes_a_waiting_imap_raise(method):
    # Issue 12 item 4: the stream must not end quietly, as if complete.
    pool = OrderedPool(SlowDataset(5, slow=0, seconds=1.5), workers=1, start_method=method)
    got: list = []

    def consume():
        try:
            got.append(list(pool.imap(range(5))))
        except RuntimeError as exc:
            got.append(exc)

    consumer = threading.Thread(target=consume)
    consumer.start()
    time.sleep(0.3)  # the consumer now waits for batch 0
    pool.close()
    consumer.join(timeout=30)
    assert not consumer.is_alive()
    assert len(got) == 1 and isinstance(got[0], RuntimeError), got
    assert "closed while imap() was running" in str(got[0])
    assert pool.closed


_MAIN_SCRIPT = """
import sys
sys.path[:0] = [{tests!r}, {root!r}]
print("main module ran as", __name__, file=sys.stderr, flush=True)
if __name__ == "__main__":
    from pool_datasets import RangeDataset
    from compatmp._pool import OrderedPool

    with OrderedPool(RangeDataset(6), workers=2, start_method={method!r}) as pool:
        print(len({{pid for _, pid in pool.imap(range(6))}}), "workers answered")
"""


@pytest.mark.timeout(60)
@pytest.mark.parametrize("method", [m for m in PROCESS_METHODS if m != "fork"])
def test_spawned_workers_do_not_rerun_the_main_script(method, tmp_path):
    script = tmp_path / "train.py"
    script.write_text(
        textwrap.dedent(_MAIN_SCRIPT.format(tests=TESTS_DIR, root=ROOT, method=method))
    )
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=50)
    assert proc.returncode == 0, proc.stderr
    assert "2 workers answered" in proc.stdout
    # Only the real run: stdlib spawn would also print "... as __mp_main__" once per worker.
    assert proc.stderr.count("main module ran as") == 1, proc.stderr


@pytest.mark.timeout(60)
@pytest.mark.parametrize("method", PROCESS_METHODS)
def test_workers_ignore_sigint(method):
    before = worker_processes()
    with OrderedPool(RangeDataset(20, max_delay=0.05), workers=2, start_method=method) as pool:
        it = pool.imap(range(20))
        assert next(it)[0] == 0
        deadline = time.monotonic() + 10
        while not all(h.ready for h in pool._core.handles) and time.monotonic() < deadline:
            pool._core.pump(0.05)  # both workers past start-up: this test is about running ones
        workers = [pid for pid, _ in worker_processes() - before]
        assert len(workers) == 2
        for pid in workers:
            os.kill(pid, signal.SIGINT)  # Ctrl-C is for the main process
        assert [i for i, _ in it] == list(range(1, 20))
        assert all(pid_alive(pid) for pid in workers)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("method", [m for m in PROCESS_METHODS if m != "forkserver"])
def test_workers_still_starting_survive_sigint(method):
    # Spawn workers import NumPy and compatmp for ~0.3 s before they can ignore SIGINT; they
    # are born with SIGINT blocked, so a Ctrl-C then does not kill them. (Forkserver children
    # inherit the server's mask; their window of a few ms is left open: _launch._sigint_blocked.)
    before = worker_processes()
    with OrderedPool(RangeDataset(6), workers=2, start_method=method) as pool:
        workers = [pid for pid, _ in worker_processes() - before]
        assert len(workers) == 2
        for pid in workers:
            os.kill(pid, signal.SIGINT)
        assert [i for i, _ in pool.imap(range(6))] == list(range(6))
        assert all(pid_alive(pid) for pid in workers)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("method", PROCESS_METHODS)
def test_unpicklable_index_is_a_clear_type_error(method):
    with OrderedPool(RangeDataset(4), workers=1, start_method=method) as pool:
        with pytest.raises(TypeError, match=r"batch index .* cannot be sent to worker processes"):
            list(pool.imap([0, lambda: 1]))


def test_forkserver_preload_includes_packages_of_base_classes():
    # The pickle names only "pool_datasets"; unpickling also imports argparse, the base's
    # package (for a PyDataset subclass: keras, i.e. TensorFlow, ~3 s per worker).
    payload = dumps(NamespaceDataset())
    modules = _launch._pickled_modules(payload)
    assert {"pool_datasets", "argparse"} <= modules
    # Protocol 0 pickles use GLOBAL "module qualname" instead of STACK_GLOBAL.
    assert "argparse" in _launch._pickled_modules(pickle.dumps(NamespaceDataset(), protocol=0))
    # Names are looked up, never imported or resolved through a module __getattr__.
    assert _launch._global_bases("no_such_module_xyz", "Thing") == set()
    assert _launch._global_bases("argparse", "no_such_name") == set()


@pytest.mark.skipif(not _worker_mod.FdPoll.supported(), reason="select.poll is POSIX only")
@pytest.mark.timeout(60)
def test_fd_poll_sees_data_eof_and_waits_out_its_timeout():
    # FdPoll replaces multiprocessing.connection.wait on the pool's per-batch path: it must
    # report a readable pipe, a closed writer (so recv raises EOFError) and nothing else.
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    a, b = ctx.Pipe()
    chan = _worker_mod.ConnectionChannel(a)
    poll = _worker_mod.FdPoll([a.fileno()])
    t0 = time.monotonic()
    assert poll.ready(0.05) == [] and chan.poll(0) is False
    assert time.monotonic() - t0 >= 0.04  # waited, did not spin
    b.send(("x", 1))
    assert poll.ready(0) == [a.fileno()] and chan.poll(0) is True
    assert chan.recv() == ("x", 1) and chan.poll(0) is False
    b.close()
    assert poll.ready(None) == [a.fileno()] and chan.poll(0) is True  # EOF counts as ready
    with pytest.raises(EOFError):
        chan.recv()
    chan.close()
    with pytest.raises(OSError, match="closed"):
        chan.poll(0)


@pytest.mark.skipif(not _worker_mod.FdPoll.supported(), reason="select.poll is POSIX only")
@pytest.mark.timeout(60)
def test_worker_channel_raises_eof_when_its_parent_sentinel_fires():
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    a, b = ctx.Pipe()
    r, w = os.pipe()  # stands in for the parent's sentinel: readable once the parent is gone
    try:
        chan = _worker_mod.ConnectionChannel(a, parent_sentinel=r)
        assert chan.poll(0) is False
        b.send(("task",))
        assert chan.poll(0) is True  # a message first, even when the parent is gone
        chan.recv()
        os.close(w)
        w = None
        with pytest.raises(EOFError, match="main process is gone"):
            chan.poll(1.0)
    finally:
        os.close(r)
        if w is not None:
            os.close(w)
        a.close()
        b.close()
