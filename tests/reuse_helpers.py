"""Datasets for tests/test_reuse.py, at module level so spawn and forkserver workers import
them by reference (the tests directory is on ``sys.path``)."""

from __future__ import annotations

import os
import random
from typing import Any

import numpy as np

from compatmp import get_worker_info

# Worker-side: how many times worker_init_fn ran in this process (kept by reused workers).
INIT_CALLS = 0
# Worker-side: the tags of every dataset that ran here (a module global: kept, as documented).
SEEN_TAGS: list[str] = []


def count_init(worker_id: int) -> None:
    """A ``worker_init_fn`` counting its calls in this worker process."""
    global INIT_CALLS
    INIT_CALLS += 1


def other_init(worker_id: int) -> None:
    """Another ``worker_init_fn`` (a different object: workers are not reused for it)."""


class TaggedDataset:
    """``dataset[i]`` reports what the worker holds: see :meth:`__getitem__`.

    Args:
        n (int): number of batches.
        tag (str): set in the main process; must be what the worker sees.
        big (bool): hold a 2 MiB array (shared memory, NOTE [ Shared dataset buffers ]).
    """

    def __init__(self, n: int, tag: str, big: bool = False) -> None:
        self.n = n
        self.tag = tag
        self.history: list[str] = []  # appended to in the worker: must never carry over
        self.big = np.arange(2**18, dtype=np.float64) if big else None

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, Any]:
        self.history.append(self.tag)
        SEEN_TAGS.append(self.tag)
        info = get_worker_info()
        return {
            "i": i,
            "tag": self.tag,
            "history": tuple(self.history),
            "pid": os.getpid(),
            "seed": None if info is None else info.seed,
            "random": random.random(),
            "np_random": float(np.random.rand()),
            "init_calls": INIT_CALLS,
            "big": None if self.big is None else float(self.big[i]),
        }


class FailsAt:
    """``dataset[i]`` raises ``ValueError`` at index ``bad``."""

    def __init__(self, n: int, bad: int) -> None:
        self.n = n
        self.bad = bad

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        if i == self.bad:
            raise ValueError(f"bad index {i}")
        return i
