"""Shared pytest fixtures.

``no_leaked_workers``: for tests that start compatmp workers; after the test, checks that no
worker process (multiprocessing's forkserver and resource tracker excepted), no worker
thread and no shared-memory block of this process is left. Use it with
``pytestmark = pytest.mark.usefixtures("no_leaked_workers")``. It counts only what this
process made (its own descendants, its own pid-and-namespace block prefix), never the whole
of ``/dev/shm`` or the machine's processes: another compatmp run may share both. The Keras
wrappers keep their workers idle after a call (NOTE [ Reused workers ] in compatmp._reuse):
``compatmp.shutdown()`` ends those first, and runs after every test, so no test reuses
another's workers (tests/test_reuse.py tests reuse and idle expiry on purpose).
"""

from __future__ import annotations

import threading
import time

import pytest
from pool_datasets import shm_entries, worker_processes

import compatmp

# How long teardown waits for workers to disappear (seconds): close() takes at most
# ~2 s (1 s grace, 1 s after SIGTERM); a worker thread ends after its current batch.
_LEAK_GRACE = 5.0


def _worker_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("compatmp-worker-")]


@pytest.fixture(autouse=True)
def _no_idle_workers_between_tests():
    """Stop the workers a test's Keras calls kept idle, so the next test starts fresh."""
    yield
    compatmp.shutdown()


@pytest.fixture
def no_leaked_workers():
    """Fail the test if it leaves worker processes, worker threads or shm blocks behind
    (after ``compatmp.shutdown()``, which ends workers kept idle for the next call)."""
    before = worker_processes()
    yield
    compatmp.shutdown()
    deadline = time.monotonic() + _LEAK_GRACE
    while True:
        procs = worker_processes() - before
        threads = _worker_threads()
        blocks = shm_entries()
        if not (procs or threads or blocks) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert not procs, f"worker processes left behind: {sorted(procs)}"
    assert not threads, f"worker threads left behind: {threads}"
    assert not blocks, f"shared-memory blocks left behind: {blocks}"
