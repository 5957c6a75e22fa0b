"""Datasets and helpers for tests/test_pool_edges.py (importable by spawn workers)."""

from __future__ import annotations

import time
from typing import Any

import numpy as np


class SlowShared:
    """8 batches of ``delay`` seconds each (batch 0: ``first``), over a 4.8 MB array (shared
    with workers). ``dataset[i]`` is ``x[i % 4, :8] + i``: a batch shows which state made it.
    """

    def __init__(self, delay: float, first: float | None = None) -> None:
        self.delay = delay
        self.first = delay if first is None else first
        self.x = np.zeros((4, 300_000), np.float32)
        self.computed: list[int] = []  # by worker threads (process workers have their copy)

    def __len__(self) -> int:
        return 8

    def __getitem__(self, i: int) -> Any:
        self.computed.append(i)
        time.sleep(self.first if i == 0 else self.delay)
        return self.x[i % 4, :8] + i


class Small:
    """``dataset[i]`` is ``[i, i, i]`` (int64); the first index sleeps ``first_delay`` s."""

    def __init__(self, first_delay: float = 0.0) -> None:
        self.first_delay = first_delay

    def __len__(self) -> int:
        return 4

    def __getitem__(self, i: int) -> Any:
        if i == 0:
            time.sleep(self.first_delay)
        return np.full(3, i, np.int64)


def nested_pool(start_method: str) -> tuple:
    """Run a pool in this (daemonic) process; what happened, as picklable values."""
    import warnings

    import compatmp

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            with compatmp.OrderedPool(Small(), workers=2, start_method=start_method) as pool:
                got = [int(b[0]) for b in pool.imap(range(4))]
                method = pool.decision.method
        except Exception as exc:
            return ("error", type(exc).__name__, str(exc))
    return ("ok", method, got, [f"{w.category.__name__}: {w.message}" for w in caught])


class SlowRegression:
    """8 ``(x, y)`` batches of 8 rows, ``delay`` seconds each, over a 1 MiB ``x`` (shared
    with process workers); ``on_epoch_end`` writes one element in place (an update to send).
    """

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.x = np.zeros((64, 4096), np.float32)
        self.y = np.zeros((64, 1), np.float32)

    def __len__(self) -> int:
        return 8

    def __getitem__(self, i: int) -> Any:
        time.sleep(self.delay)
        return self.x[i * 8 : (i + 1) * 8], self.y[i * 8 : (i + 1) * 8]

    def on_epoch_end(self) -> None:
        self.x[0, 0] += 1.0


class LoggedShared:
    """``n`` batches of ``delay`` seconds each over a 4.8 MB array (shared with workers);
    (batch 0: ``first``); ``dataset[i]`` is ``x[i % 4, :8] + i`` and first appends ``i`` to
    the file ``log_dir/<pid>`` (so a batch shows which state made it, and the log which
    indices each worker process, or the threads' process, started).
    """

    def __init__(self, delay: float, log_dir: str, n: int = 16, first: float | None = None) -> None:
        self.delay = delay
        self.first = delay if first is None else first
        self.log_dir = log_dir
        self.n = n
        self.x = np.zeros((4, 300_000), np.float32)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> Any:
        import os

        with open(os.path.join(self.log_dir, str(os.getpid())), "a") as f:
            f.write(f"{i}\n")
        time.sleep(self.first if i == 0 else self.delay)
        return self.x[i % 4, :8] + i


def computed_indices(log_dir: str) -> list[int]:
    """Every index a :class:`LoggedShared` computed, over all processes, in no set order."""
    import os

    out: list[int] = []
    for name in os.listdir(log_dir):
        with open(os.path.join(log_dir, name)) as f:
            out.extend(int(line) for line in f if line.strip())
    return out
