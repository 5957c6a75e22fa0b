"""Datasets for the shared-dataset tests (module level: spawn workers import them)."""

from __future__ import annotations

import os

import numpy as np

import compatmp
from compatmp._worker import get_worker_info

BIG = 600_000  # float64 elements: 4.8 MB, above compatmp._shared_data.SHARE_THRESHOLD


def _backing_file(address: int) -> str | None:
    """The file mapped at ``address`` in this process (Linux ``/proc/self/maps``), or None."""
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                parts = line.split()
                lo, hi = (int(v, 16) for v in parts[0].split("-"))
                if lo <= address < hi:
                    return parts[5] if len(parts) > 5 else ""
    except OSError:
        return None
    return None


class BigArrayDataset:
    """Holds one big array and a small permutation; batches report what the worker sees."""

    def __init__(self, n_batches: int = 8) -> None:
        self.x = np.arange(BIG, dtype=np.float64)
        self.order = np.arange(n_batches)

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, i: int) -> dict:
        info = get_worker_info()
        return {
            "worker": info.id if info is not None else None,
            "pid": os.getpid(),
            "value": float(self.x[self.order[i]]),
            "writeable": bool(self.x.flags.writeable),
            "file": _backing_file(self.x.__array_interface__["data"][0]),
        }

    def on_epoch_end(self) -> None:
        self.order = self.order[::-1].copy()


class EmptyBatchDataset:
    """Batches built in ``compatmp.empty`` arrays (19 MB-like, scaled down to 1 MB)."""

    def __len__(self) -> int:
        return 6

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        x = compatmp.empty((32, 64, 64, 2), np.float32)
        x[...] = i
        return x, np.full(3, i)


class CachingDataset:
    """Writes into its own big array in ``__getitem__`` (a decode cache), as users do.

    ``dataset[i]`` marks ``cache[i] = -(i + 1)`` and returns the worker's id and its view of
    ``cache[:n]`` and ``labels[:n]`` after the write.
    """

    def __init__(self, n: int = 8) -> None:
        self.n = n
        self.cache = np.zeros(BIG, dtype=np.float64)  # 4.8 MB: a dataset block
        self.labels = np.zeros(BIG, dtype=np.float64)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[int, list[float], list[float]]:
        info = get_worker_info()
        self.cache[i] = -(i + 1)
        worker = info.id if info is not None else -1
        return worker, self.cache[: self.n].tolist(), self.labels[: self.n].tolist()


class ManyBuffersDataset:
    """Holds ``n`` big arrays; a batch reports how many descriptors its worker has open."""

    def __init__(self, n: int) -> None:
        self.arrays = [np.full(BIG // 4, k, dtype=np.float64) for k in range(n)]

    def __len__(self) -> int:
        return 2

    def __getitem__(self, i: int) -> tuple[int, float]:
        total = float(sum(a[-1] for a in self.arrays))
        return len(os.listdir("/proc/self/fd")), total
