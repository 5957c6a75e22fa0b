"""Hostile conditions for ``compatmp.fit`` (issue 6): crashes, Ctrl-C, errors, long life.

Every test runs a real ``compatmp.fit`` on a tiny ``Dense(1)`` model (4 features, a few
batches; tests/hostile_helpers.py) and checks what the user would see - the exception, how
fast it came - and what must not outlive the call: worker processes, worker threads and
shared-memory blocks (``no_leaked_workers`` in conftest.py), and named semaphores
(``no_leaked_semaphores`` below). Leaks that only show at interpreter exit (the resource
tracker's "leaked shared_memory/semaphore objects" warning) are checked in subprocesses.

Start methods come from ``pool_datasets.ALL_METHODS`` (the one list the tests use); crash
tests run over the process methods only (``PROCESS_METHODS``): a thread cannot be SIGKILLed
or segfault alone. Signals, ``/proc`` and ``/dev/shm`` limit some tests to POSIX or Linux
(``RLIMIT_AS`` is not enforced on macOS); each says so in its skip reason.

Two of these found real bugs, now fixed in compatmp/_keras.py (NOTE [ Freeing tf.data after
a failed call ]): ``test_process_exits_after_sigint_while_a_batch_is_loading`` (the
interpreter hung at exit after ``fit`` raised while TensorFlow's tf.data thread was inside the
Python batch generator; plain Keras still does) and ``test_failed_fits_give_back_their_threads``
(a fit that failed in ``dataset[i]`` or with a crashed worker kept its tf.data iterator and
threads).
"""

from __future__ import annotations

import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import gc
import multiprocessing
import signal
import subprocess
import sys
import textwrap
import threading
import time
import warnings
from collections.abc import Callable
from typing import NamedTuple

import psutil
import pytest

keras = pytest.importorskip("keras", minversion="3")

import hostile_helpers as hh  # noqa: E402
from pool_datasets import (  # noqa: E402
    ALL_METHODS,
    PROCESS_METHODS,
    pid_alive,
    shm_entries,
    worker_processes,
)

import compatmp  # noqa: E402
from compatmp import ThreadFallbackWarning, WorkerCrashedError  # noqa: E402
from compatmp._worker import RemoteTraceback  # noqa: E402

pytestmark = [
    pytest.mark.keras,
    pytest.mark.usefixtures("no_leaked_workers", "no_leaked_semaphores"),
]

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS_DIR)

# Seconds from the event (kill, segfault, failed allocation) to the exception leaving
# compatmp.fit: a "no hang" bound, far above normal so that a loaded CI machine does not fail
# it (issue 12 item 6: with three CPU burners beside the suite, 8.6 s were seen against the
# old 5 s). Measured on the shared 2-core box at load 3.9: 0.12-0.43 s over 3 runs x 3
# methods x 3 kinds (detection is immediate through the worker's sentinel; the rest is pool
# shutdown and Keras unwinding). The latency itself is measured by the benchmark:
# ``python -m compatmp.bench.latency``.
CRASH_DEADLINE = 30.0

POSIX_ONLY = pytest.mark.skipif(os.name != "posix", reason="POSIX only: signals, file descriptors")
LINUX_ONLY = pytest.mark.skipif(
    sys.platform != "linux", reason="RLIMIT_AS is enforced on Linux only; /dev/shm, /proc"
)

# Seconds a process-level check may wait for things to settle: workers to be reaped, a
# subprocess's orphans to notice their parent is gone (compatmp._worker.WATCHDOG_INTERVAL
# is 1 s), worker threads to end after their batch.
SETTLE_S = 5.0

SHM_DIR = "/dev/shm"


# --------------------------------------------------------------------------------------------
# Semaphores


def _semaphores() -> set[str]:
    """Named POSIX semaphores that exist now (``/dev/shm/sem.*`` on Linux)."""
    try:
        return {e for e in os.listdir(SHM_DIR) if e.startswith("sem.")}
    except OSError:
        return set()


def _mapped_semaphores(pids: list[int]) -> set[str]:
    """Named semaphores (``sem.*`` entries still linked) that processes ``pids`` have mapped.

    glibc's ``sem_open`` maps a temporary file and links it under the semaphore's name, so
    ``/proc/<pid>/maps`` shows the temporary name (``sem.X32CbP (deleted)``); the inode is
    what identifies the semaphore.
    """
    inodes = set()
    for pid in pids:
        try:
            with open(f"/proc/{pid}/maps") as f:
                lines = f.read().splitlines()
        except OSError:
            continue
        for line in lines:
            fields = line.split(maxsplit=5)  # address perms offset dev inode [path]
            if len(fields) == 6 and fields[5].startswith(f"{SHM_DIR}/sem."):
                inodes.add(int(fields[4]))
    found = set()
    for name in _semaphores():
        try:
            if os.stat(os.path.join(SHM_DIR, name)).st_ino in inodes:
                found.add(name)
        except OSError:
            continue
    return found


def _our_new_semaphores(before: set[str]) -> set[str]:
    """Semaphores created since ``before`` that this process or a descendant still maps.

    Other programs on the machine (other test runs) create semaphores too; only those our
    process tree maps are ours. A semaphore leaked by a process that died is not seen here:
    the subprocess tests catch it through the resource tracker's warning at exit.
    """
    pids = [os.getpid(), *(p.pid for p in psutil.Process().children(recursive=True))]
    return (_semaphores() - before) & _mapped_semaphores(pids)


@pytest.fixture
def no_leaked_semaphores():
    """Fail the test if it leaves a named semaphore of this process tree in ``/dev/shm``."""
    if not os.path.isdir(SHM_DIR):
        yield
        return
    before = _semaphores()
    yield
    # No gc.collect() first: a semaphore that only the collector would unlink (one in a
    # reference cycle) outlived the call that made it, and counts.
    leaked = _our_new_semaphores(before)
    assert not leaked, f"named semaphores left behind: {sorted(leaked)}"


@LINUX_ONLY
def test_semaphore_check_sees_a_live_semaphore_and_its_removal():
    # The checker itself: a spawn-context Lock is a named semaphore, linked until finalized.
    before = _semaphores()
    lock = multiprocessing.get_context("spawn").Lock()
    assert len(_our_new_semaphores(before)) == 1
    del lock
    gc.collect()
    assert _our_new_semaphores(before) == set()


# --------------------------------------------------------------------------------------------
# Crashes: SIGKILL, segfault, memory limit


class KillWorkerAt(keras.callbacks.Callback):
    """At the end of training batch ``batch``, SIGKILL one worker process of this test.

    Args:
        batch (int): the batch after which to kill.
        before (set): ``worker_processes()`` before the fit (not this fit's workers).
    """

    def __init__(self, batch: int, before: set) -> None:
        super().__init__()
        self.batch = batch
        self.before = before
        self.victim: int | None = None
        self.killed_at: float | None = None
        self.blocks: list[str] = []

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        if batch != self.batch or self.victim is not None:
            return
        workers = sorted(worker_processes() - self.before)
        assert len(workers) == 2, workers
        self.victim = workers[0][0]
        self.blocks = shm_entries()
        self.killed_at = time.monotonic()
        os.kill(self.victim, signal.SIGKILL)


def _fit(dataset: object, method: str, model: object = None, **kwargs: object) -> object:
    """``compatmp.fit`` with 2 workers, quietly, on ``model`` (default: a new tiny model)."""
    kwargs = {"workers": 2, "start_method": method, "verbose": 0, **kwargs}
    return compatmp.fit(hh.tiny_model() if model is None else model, dataset, **kwargs)


@POSIX_ONLY
@pytest.mark.timeout(60)
@pytest.mark.parametrize("method", PROCESS_METHODS)
def test_worker_sigkilled_mid_fit_raises_worker_crashed_error(method):
    # 20 batches of 0.05 s on 2 workers: at batch 3 most batches are still to load.
    killer = KillWorkerAt(3, worker_processes())
    with pytest.raises(WorkerCrashedError) as info:
        _fit(hh.TinyDataset(20, hh.BIG_ROWS, delay=0.05), method, epochs=3, callbacks=[killer])
    elapsed = time.monotonic() - killer.killed_at
    assert elapsed < CRASH_DEADLINE
    err = info.value
    assert err.pid == killer.victim
    assert err.exitcode == -signal.SIGKILL
    assert f"pid {killer.victim}" in str(err) and "SIGKILL" in str(err)
    assert killer.blocks, "batches should have travelled through shared memory"
    assert not pid_alive(killer.victim)


@POSIX_ONLY
@pytest.mark.timeout(60)
@pytest.mark.parametrize("method", PROCESS_METHODS)
def test_worker_segfault_raises_worker_crashed_error(method, tmp_path):
    marker = str(tmp_path / "segfault")
    dataset = hh.SegfaultDataset(3, marker, n=12, rows=hh.BIG_ROWS, delay=0.02)
    with pytest.raises(WorkerCrashedError) as info:
        _fit(dataset, method, shuffle=False)
    elapsed = time.monotonic() - hh.read_marker(marker)
    assert elapsed < CRASH_DEADLINE
    err = info.value
    assert err.index == 3 and "index 3" in str(err)
    # SIGSEGV; macOS may report a bad access as SIGBUS.
    assert -err.exitcode in (signal.SIGSEGV, signal.SIGBUS)
    assert signal.Signals(-err.exitcode).name in str(err)
    assert not pid_alive(err.pid)


@LINUX_ONLY
@pytest.mark.timeout(60)
@pytest.mark.parametrize("method", PROCESS_METHODS)
def test_worker_over_its_memory_limit_raises_memory_error(method, tmp_path):
    # RLIMIT_AS makes the allocation fail (malloc returns NULL) instead of killing the
    # worker, so NumPy raises MemoryError, an ordinary exception: compatmp re-raises it with
    # its type and the worker's traceback, like any error in dataset[i]. (A worker the kernel
    # kills for memory - the OOM killer - dies by SIGKILL: the test above.) Measured: the
    # same with a dataset that keeps every MiB it got until the limit (nothing left to
    # format the traceback with): Python still reports MemoryError.
    marker = str(tmp_path / "hog")
    dataset = hh.MemoryLimitDataset(3, marker, n=12, rows=hh.BIG_ROWS, delay=0.02)
    with pytest.raises(MemoryError) as info:
        _fit(dataset, method, shuffle=False)
    elapsed = time.monotonic() - hh.read_marker(marker)
    assert elapsed < CRASH_DEADLINE
    cause = info.value.__cause__
    assert isinstance(cause, RemoteTraceback)
    assert "np.ones(self.hog" in cause.tb and "MemoryError" in cause.tb


_TRACKER_SCRIPT = """
import os, sys, signal, time
sys.path[:0] = [{tests!r}, {root!r}]
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
import keras
import compatmp
import hostile_helpers as hh
from pool_datasets import worker_processes


class Kill(keras.callbacks.Callback):
    def on_train_batch_end(self, batch, logs=None):
        if batch == 3:
            os.kill(min(pid for pid, _ in worker_processes()), signal.SIGKILL)


print("pid", os.getpid(), flush=True)
for method in {methods!r}:
    cases = [
        ("sigkill", hh.TinyDataset(20, hh.BIG_ROWS, delay=0.05), [Kill()]),
        ("segfault", hh.SegfaultDataset(3, {marker!r}, n=12, rows=hh.BIG_ROWS), []),
    ]
    for name, dataset, callbacks in cases:
        try:
            compatmp.fit(hh.tiny_model(), dataset, workers=2, start_method=method, epochs=3,
                         shuffle=False, callbacks=callbacks, verbose=0)
        except compatmp.WorkerCrashedError:
            print("raised", method, name, "WorkerCrashedError", flush=True)
        else:
            print("no error", method, name, flush=True)
"""


@LINUX_ONLY
@pytest.mark.slow
@pytest.mark.timeout(180)
def test_crashes_leave_nothing_for_the_resource_tracker(tmp_path):
    # The resource tracker reports, when the program ends, every shared-memory block and
    # named semaphore still registered ("resource_tracker: There appear to be N leaked ...
    # objects"): blocks of a killed worker, which it could not unlink itself, must have been
    # swept *and* unregistered by the pool. (A MemoryError is an ordinary error in dataset[i]:
    # the worker lives and unlinks its own blocks.)
    script = _TRACKER_SCRIPT.format(
        tests=TESTS_DIR, root=ROOT, methods=PROCESS_METHODS, marker=str(tmp_path / "marker")
    )
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)],
        capture_output=True,
        text=True,
        timeout=170,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    expected = []
    for method in PROCESS_METHODS:
        expected += [
            f"raised {method} sigkill WorkerCrashedError",
            f"raised {method} segfault WorkerCrashedError",
        ]
    pid_line, *lines = proc.stdout.splitlines()
    assert lines == expected, proc.stdout
    assert "resource_tracker" not in proc.stderr, proc.stderr[-3000:]
    assert "leaked" not in proc.stderr, proc.stderr[-3000:]
    assert shm_entries(int(pid_line.split()[1])) == []


# --------------------------------------------------------------------------------------------
# SIGINT (Ctrl-C) during fit, in a subprocess

# Python's SIGINT handler is restored first, as in test_pool's Ctrl-C script: a background job
# of a non-interactive shell inherits SIGINT ignored.
_SIGINT_SCRIPT = """
import os, sys, signal, time, traceback
signal.signal(signal.SIGINT, signal.default_int_handler)
sys.path[:0] = [{tests!r}, {root!r}]
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
import keras
import compatmp
import hostile_helpers as hh
from pool_datasets import worker_processes


class Interrupt(keras.callbacks.Callback):
    def on_train_begin(self, logs=None):
        print("workers", *sorted(pid for pid, _ in worker_processes()), flush=True)

    def on_train_batch_end(self, batch, logs=None):
        if batch == {at_batch}:
            print("interrupting", flush=True)
            if {group}:  # Ctrl-C in a terminal: the whole process group, workers included
                os.killpg(os.getpgrp(), signal.SIGINT)
            else:
                os.kill(os.getpid(), signal.SIGINT)


try:
    compatmp.fit(hh.tiny_model(), hh.TinyDataset(40, {rows}, delay={delay}),
                 workers={workers}, start_method={method!r}, epochs=5, callbacks=[Interrupt()],
                 verbose=0)
except KeyboardInterrupt:
    print("raised KeyboardInterrupt; workers left:", len(worker_processes()), flush=True)
    if {hard_exit}:
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(130)
    raise
print("fit returned", flush=True)
"""


class Interrupted(NamedTuple):
    """What :func:`_run_interrupted` saw."""

    pid: int  # the script's process id
    workers: list[int]  # its worker processes' ids
    code: int  # its exit code
    stdout: str
    stderr: str
    exited: float  # seconds from the interrupt to the exit


def _run_interrupted(
    method: str,
    *,
    group: bool = False,
    workers: int = 2,
    rows: int = hh.BIG_ROWS,
    delay: float = 0.05,
    at_batch: int = 2,
    hard_exit: bool = True,
) -> Interrupted:
    """Run the SIGINT script with these settings and wait for it to exit.

    Raises:
        subprocess.TimeoutExpired: it had not exited 10 s after the interrupt (it is killed).
    """
    script = _SIGINT_SCRIPT.format(
        tests=TESTS_DIR,
        root=ROOT,
        method=method,
        group=group,
        workers=workers,
        rows=rows,
        delay=delay,
        at_batch=at_batch,
        hard_exit=hard_exit,
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(script)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group: killpg cannot reach pytest
    )
    try:
        workers_line = proc.stdout.readline()
        assert workers_line.startswith("workers"), workers_line + proc.stderr.read()[-3000:]
        pids = [int(p) for p in workers_line.split()[1:]]
        assert proc.stdout.readline().strip() == "interrupting"
        interrupted = time.monotonic()
        stdout, stderr = proc.communicate(timeout=2 * CRASH_DEADLINE)
        exited = time.monotonic() - interrupted
        return Interrupted(proc.pid, pids, proc.returncode, stdout, stderr, exited)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()


_SIGINT_CASES = [
    pytest.param(
        method, False, id=f"{method}-self", marks=[] if method == "spawn" else pytest.mark.slow
    )
    for method in ALL_METHODS
] + [
    pytest.param(PROCESS_METHODS[0], True, id=f"{PROCESS_METHODS[0]}-group", marks=pytest.mark.slow)
]


@POSIX_ONLY
@pytest.mark.timeout(90)
@pytest.mark.parametrize(("method", "group"), _SIGINT_CASES)
def test_sigint_during_fit_raises_keyboard_interrupt_and_leaves_no_orphans(method, group):
    # The script leaves with os._exit(130) once compatmp.fit has raised: the normal
    # interpreter exit can hang in TensorFlow (see the next test), which is not what this
    # test is about.
    run = _run_interrupted(method, group=group)
    assert len(run.workers) == (0 if method == "thread" else 2)
    assert "raised KeyboardInterrupt; workers left: 0" in run.stdout, run.stderr[-3000:]
    assert "fit returned" not in run.stdout
    assert run.code == 130
    assert run.stderr.strip().splitlines()[-1] == "KeyboardInterrupt", run.stderr[-3000:]
    assert "Process compatmp-worker" not in run.stderr, run.stderr[-3000:]  # worker traceback
    # The resource tracker outlives the script and reports leaks on the same stderr.
    assert "resource_tracker" not in run.stderr, run.stderr[-3000:]
    assert run.exited < CRASH_DEADLINE
    deadline = time.monotonic() + SETTLE_S
    while any(pid_alive(p) for p in run.workers) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert [p for p in run.workers if pid_alive(p)] == []
    assert shm_entries(run.pid) == []


@POSIX_ONLY
@pytest.mark.slow
@pytest.mark.timeout(90)
def test_process_exits_after_sigint_while_a_batch_is_loading():
    # workers=0: the batch is loaded in TensorFlow's prefetch thread, 1 s per batch, so that
    # thread is inside Python when the main thread's KeyboardInterrupt ends the program.
    # Python's finalization stops threads that want the GIL back; the garbage collector then
    # destroys the tf.data iterator, whose destructor waits forever for that thread. Hangs
    # every time here (6/6), plain model.fit on a PyDataset 10/12 times with 0.05 s
    # batches, compatmp.fit with worker processes ~1/12 (the prefetch thread mostly waits
    # outside Python there).
    run = _run_interrupted("thread", workers=0, rows=8, delay=1.0, at_batch=1, hard_exit=False)
    assert "raised KeyboardInterrupt; workers left: 0" in run.stdout
    assert run.code == -signal.SIGINT  # Python re-raises an uncaught SIGINT on the way out
    assert run.stderr.strip().splitlines()[-1] == "KeyboardInterrupt"


# --------------------------------------------------------------------------------------------
# Exceptions in on_epoch_end and in callbacks


@pytest.mark.timeout(60)
@pytest.mark.parametrize("method", ALL_METHODS)
def test_exception_in_dataset_on_epoch_end_propagates(method):
    # Keras calls on_epoch_end once before the first epoch: call 2 is after epoch 1.
    dataset = hh.EpochEndFailsDataset(2, n=6, rows=hh.BIG_ROWS, delay=0.01, reshuffle=True)
    with pytest.raises(hh.EpochEndError, match="on_epoch_end call 2 failed"):
        _fit(dataset, method, epochs=3)
    assert dataset.epochs_ended == 2


class CallbackError(RuntimeError):
    """Raised by :class:`FailingCallback`."""


class FailingCallback(keras.callbacks.Callback):
    """Raises :class:`CallbackError` at the end of training batch 2 or of epoch 0."""

    def __init__(self, hook: str) -> None:
        super().__init__()
        self.hook = hook
        self.error = CallbackError(f"{hook} failed (on purpose)")

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        if self.hook == "batch" and batch == 2:
            raise self.error

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        if self.hook == "epoch" and epoch == 0:
            raise self.error


@pytest.mark.timeout(60)
@pytest.mark.parametrize("hook", ["batch", "epoch"])
@pytest.mark.parametrize("method", ALL_METHODS)
def test_exception_in_callback_propagates_unchanged(method, hook):
    # Mid-epoch (workers busy loading the rest, batches in shared memory) or between epochs.
    callback = FailingCallback(hook)
    with pytest.raises(CallbackError) as info:
        _fit(hh.TinyDataset(12, hh.BIG_ROWS, delay=0.02), method, epochs=3, callbacks=[callback])
    assert info.value is callback.error


# --------------------------------------------------------------------------------------------
# Long life: 20 fits, 200 epochs


def _threads() -> int:
    """Native threads of this process, except TensorFlow's own pools (Linux), or the Python
    threads where native threads cannot be told apart.

    TensorFlow names its threads ``tf_*`` (``tf_Compute``, ``tf_graph_runner``); tf.data's
    work queue adds a ``tf_Compute`` thread whenever more requests overlap than ever before
    and keeps it idle for reuse (measured: 2 after most fits, sometimes 3 under pytest on the
    loaded box), which says nothing about compatmp. compatmp's own threads are Python threads
    and are counted; so are TensorFlow's unnamed Eigen pool threads, whose number is fixed.
    """
    if sys.platform != "linux":
        return threading.active_count()
    count = 0
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/comm") as f:
                count += not f.read().startswith("tf_")
        except OSError:  # the thread ended meanwhile
            continue
    return count


def _resources() -> dict[str, int]:
    """What a fit must give back: open fds, threads (:func:`_threads`), child processes
    (helpers and zombies included), our /dev/shm blocks, named semaphores we map.

    Collects garbage first: a tf.data iterator sits in a reference cycle, and its threads
    (measured: 2 native, 2 ``tf_Compute`` after a fit that raised) end only when the
    collector frees it; counting before that would blame compatmp for TensorFlow's timing.
    """
    gc.collect()
    me = psutil.Process()
    return {
        "fds": me.num_fds(),
        "threads": _threads(),
        "children": len(me.children(recursive=True)),
        "shm blocks": len(shm_entries()),
        "semaphores": len(_mapped_semaphores([os.getpid()])),
    }


def _settled(expected: dict[str, int], timeout: float = SETTLE_S) -> dict[str, int]:
    """:func:`_resources` once it equals ``expected``, or after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        now = _resources()
        if now == expected or time.monotonic() > deadline:
            return now
        time.sleep(0.05)


def _warm_up(method: str, model: object, **kwargs: object) -> dict[str, int]:
    # Allowances, all by design and all in place before the baseline is taken: TensorFlow
    # starts its thread pools at the first fit and keeps them; multiprocessing's resource
    # tracker (our shared memory registers there) and forkserver process, started by the first
    # pool that needs them, live until the interpreter exits; spawn and forkserver workers
    # kept idle for the next call (NOTE [ Reused workers ]), which later fits reuse.
    _fit(hh.TinyDataset(4, hh.BIG_ROWS, reshuffle=True), method, model, epochs=2, **kwargs)
    return _resources()


@POSIX_ONLY
@pytest.mark.slow
@pytest.mark.timeout(120)
@pytest.mark.parametrize("method", ALL_METHODS)
def test_twenty_fits_give_back_fds_threads_processes_and_shm(method):
    model = hh.tiny_model()  # one model: Keras traces its train step once, not 20 times
    baseline = _warm_up(method, model)
    for _ in range(20):
        dataset = hh.TinyDataset(4, hh.BIG_ROWS, reshuffle=True)
        history = _fit(dataset, method, model)
        assert len(history.history["loss"]) == 1
    # Checked once, at the end (a per-fit leak shows 20 times over): counting runs
    # gc.collect(), ~0.3 s with TensorFlow loaded.
    assert _settled(baseline) == baseline


class ResourceLog(keras.callbacks.Callback):
    """Records :func:`_resources` and the worker pids at the end of epochs ``epochs``."""

    def __init__(self, before: set, epochs: set[int]) -> None:
        super().__init__()
        self.before = before
        self.epochs = epochs
        self.log: list[tuple[dict[str, int], set]] = []

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        if epoch in self.epochs:  # not every epoch: gc.collect() costs ~0.3 s here
            self.log.append((_resources(), worker_processes() - self.before))


# Measured (fork, 2 batches of 256 KiB per epoch, dataset re-sent every epoch): 200 epochs
# take ~7 s of Keras per-epoch overhead, the same with threads; the four methods ~30 s.
LONG_RUN_EPOCHS = 200


@POSIX_ONLY
@pytest.mark.slow
@pytest.mark.timeout(120)
@pytest.mark.parametrize("method", ALL_METHODS)
def test_two_hundred_epochs_on_one_pool_do_not_grow(method):
    model = hh.tiny_model()
    # Workers not kept between calls: this fit's workers are its own (counted below).
    baseline = _warm_up(method, model, idle_timeout=0)
    log = ResourceLog(worker_processes(), {0, LONG_RUN_EPOCHS // 2, LONG_RUN_EPOCHS - 1})
    dataset = hh.TinyDataset(2, hh.BIG_ROWS, reshuffle=True)  # re-sent to workers every epoch
    history = _fit(dataset, method, model, epochs=LONG_RUN_EPOCHS, callbacks=[log], idle_timeout=0)
    assert len(history.history["loss"]) == LONG_RUN_EPOCHS
    assert dataset.offset == LONG_RUN_EPOCHS + 1  # plus Keras' on_epoch_end before epoch 1
    (first, workers), _, (last, _) = log.log
    assert len(workers) == (0 if method == "thread" else 2)
    assert all(w == workers for _, w in log.log)  # the same processes served every epoch
    # During the run: after epoch 1 the pool is warm (workers keep up to MAX_FREE_BLOCKS
    # released blocks for reuse); nothing may grow from there.
    growth = {k: v for k, v in last.items() if v > first[k]}
    assert not growth, f"grew over {LONG_RUN_EPOCHS} epochs: {growth} (after epoch 1: {first})"
    assert _settled(baseline) == baseline


@POSIX_ONLY
@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "method", ["thread", pytest.param(PROCESS_METHODS[0], marks=pytest.mark.slow)]
)
def test_failed_fits_give_back_their_threads(method):
    # A user who catches the error and tries again (fewer workers, another start method)
    # must not pay for the failed attempts. The error is raised in TensorFlow's thread and
    # kept on the feeder (_Feeder.error) so _call_keras can re-raise the original; the
    # feeder is reachable from the batch generator TensorFlow's py_func registry holds, and
    # the error's traceback holds Keras' fit frame, which holds the iterator: measured +4
    # native threads per failed fit, never collected. (A callback's error is not kept there:
    # its fit's iterator is collected.)
    model = hh.tiny_model()

    def failing_fit() -> None:
        with pytest.raises(hh.BatchError):
            _fit(hh.GetitemFailsDataset(3, n=8, rows=8, delay=0.01), method, model, shuffle=False)

    _fit(hh.TinyDataset(4, 8), method, model)
    failing_fit()  # one-time set-up of the error path happens here, before the baseline
    baseline = _resources()
    for _ in range(3):
        failing_fit()
    assert _settled(baseline) == baseline


# --------------------------------------------------------------------------------------------
# Unpicklable datasets fall back to threads


_TYPE_NAMES = {
    "generator": "builtins.generator",
    "socket": "socket.socket",
    "sqlite3": "sqlite3.Connection",
    "write_file": "_io.TextIOWrapper",
}


def _fit_with_resources(kinds: list[str], tmp_path: object, check: Callable[[str], None]) -> None:
    """Fit under spawn on a dataset holding one object of each kind; ``check`` gets the one
    ThreadFallbackWarning's message."""
    resources = {f"my_{kind}": hh.open_unpicklable(kind, str(tmp_path)) for kind in kinds}
    try:
        dataset = hh.HoldsUnpicklable(resources, n=4, rows=8)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            history = _fit(dataset, "spawn", epochs=2)
        fallbacks = [w for w in caught if issubclass(w.category, ThreadFallbackWarning)]
        assert len(fallbacks) == 1, [str(w.message) for w in caught]
        check(str(fallbacks[0].message))
        assert len(history.history["loss"]) == 2
        # Every batch was loaded by compatmp's worker threads in this process.
        assert {pid for pid, _ in dataset.loaded_by} == {os.getpid()}
        names = {name for _, name in dataset.loaded_by}
        assert all(n.startswith("compatmp-worker-") for n in names), names
    finally:
        for obj in resources.values():
            hh.close_unpicklable(obj)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", sorted(_TYPE_NAMES))
def test_unpicklable_attribute_falls_back_to_threads_naming_its_path(kind, tmp_path):
    def check(message: str) -> None:
        assert f"\n  dataset.source.my_{kind}: {_TYPE_NAMES[kind]} (" in message, message
        assert message.count("\n  dataset.") == 1, message  # that attribute, nothing else

    _fit_with_resources([kind], tmp_path, check)


@pytest.mark.timeout(60)
def test_every_unpicklable_attribute_is_named_at_once(tmp_path):
    def check(message: str) -> None:
        for kind, type_name in _TYPE_NAMES.items():
            assert f"\n  dataset.source.my_{kind}: {type_name} (" in message, message
        assert message.count("\n  dataset.") == len(_TYPE_NAMES), message

    _fit_with_resources(sorted(_TYPE_NAMES), tmp_path, check)
