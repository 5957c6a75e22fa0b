"""Datasets for tests/test_hardening.py (importable by spawned workers)."""

from __future__ import annotations

import os
import random
import threading
import time
from typing import Any

import numpy as np

import compatmp


class RandomDataset:
    """``dataset[i]``: (i, random.random(), numpy.random.rand(), batch_rng().random()).

    Index ``slow`` sleeps a little, so the least-loaded dispatch and the timing differ
    between runs and between worker counts.
    """

    def __init__(self, n: int = 24) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[int, float, float, float]:
        time.sleep(0.002 * (i % 3))
        rng = compatmp.batch_rng()
        first = float(rng.random())
        assert compatmp.batch_rng() is rng  # one Generator per batch: draws continue
        return i, random.random(), float(np.random.rand()), first


class ClosesItsPool:
    """Thread mode: ``dataset[i]`` closes the pool from inside its own worker thread."""

    def __init__(self) -> None:
        self.pool: Any = None
        self.errors: list[BaseException] = []

    def __len__(self) -> int:
        return 4

    def __getitem__(self, i: int) -> int:
        if i == 1:
            try:
                self.pool._core.close("closed from a worker thread (as GC may)")
            except BaseException as exc:  # the bug: RuntimeError: cannot join current thread
                self.errors.append(exc)
        return i


class StuckAt:
    """``dataset[stuck]`` blocks in :func:`stuck_here` for ``seconds``; others return at once."""

    def __init__(self, n: int, stuck: int, seconds: float) -> None:
        self.n = n
        self.stuck = stuck
        self.seconds = seconds

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        if i == self.stuck:
            stuck_here(self.seconds)
        return i


def stuck_here(seconds: float) -> None:
    """The frame a stall report must show (a dead NFS mount, a deadlocked library)."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        time.sleep(0.05)


class BigBatches:
    """``dataset[i]``: a 1 MiB float32 array (travels through shared memory) and the pid."""

    def __len__(self) -> int:
        return 1000

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        return np.full((512, 512), i, dtype=np.float32), os.getpid()


def current_thread_name() -> str:
    return threading.current_thread().name


class StuckBatches(StuckAt):
    """Keras batches ``(x, y)`` of 4 features; ``dataset[stuck]`` blocks in :func:`stuck_here`."""

    def __getitem__(self, i: int) -> tuple:
        import numpy as np

        value = super().__getitem__(i)
        return np.full((4, 4), value, dtype="float32"), np.zeros((4, 1), dtype="float32")
