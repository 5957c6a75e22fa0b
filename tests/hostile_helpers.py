"""Datasets and helpers for tests/test_hostile.py (workers that crash, leak, or cannot travel).

Everything that crosses the process boundary is defined here, at module level, so spawn and
forkserver workers import it by reference (the tests directory is on ``sys.path`` and
multiprocessing hands ``sys.path`` to its children). Only NumPy is imported at the top, so a
spawned worker starts in well under a second; Keras is imported inside :func:`tiny_model`,
which only the main process (or a test's subprocess) calls.

Batches are ``(x, y)`` with ``x`` of shape ``(rows, 4)`` float32 and ``y = x @ w``: a
``Dense(1)`` model on 4 features trains on them in a few milliseconds per step.
``rows=BIG_ROWS`` makes ``x`` exactly :data:`compatmp._batch_blocks.SHM_THRESHOLD` bytes, so batches
travel through shared memory and the tests can check that no block is left behind.
"""

from __future__ import annotations

import ctypes
import faulthandler
import os
import socket
import sqlite3
import threading
import time
from typing import Any

import numpy as np

N_FEATURES = 4
_WEIGHTS = np.array([[0.5], [-1.0], [2.0], [0.25]], dtype=np.float32)

#: Rows per batch that make ``x`` (float32, 4 features) 256 KiB, the shared-memory threshold
#: of ``compatmp._batch_blocks`` (arrays of at least that many bytes go through shared memory).
BIG_ROWS = 16384


def tiny_model(seed: int = 1) -> Any:
    """A compiled ``Dense(1)`` regression model on 4 features (imports Keras).

    Args:
        seed (int): passed to ``keras.utils.set_random_seed`` (default: 1).

    Returns:
        keras.Model: the model, compiled with SGD and MSE.
    """
    import keras

    keras.utils.set_random_seed(seed)
    model = keras.Sequential([keras.Input((N_FEATURES,)), keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.SGD(0.01), loss="mse")
    return model


def write_marker(path: str) -> None:
    """Write ``time.monotonic()`` to ``path`` (``CLOCK_MONOTONIC``: one clock for every
    process on Linux, so the test can time an event that happened in a worker)."""
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        f.write(repr(time.monotonic()))
    os.replace(tmp, path)


def read_marker(path: str) -> float:
    """The ``time.monotonic()`` value :func:`write_marker` wrote."""
    with open(path) as f:
        return float(f.read())


class TinyDataset:
    """``n`` batches of ``(x, y)``; each takes ``delay`` seconds; optional reshuffle.

    Args:
        n (int): number of batches (default: 8).
        rows (int): rows per batch (default: 8; :data:`BIG_ROWS` for shared memory).
        delay (float): seconds each ``__getitem__`` sleeps (default: 0).
        reshuffle (bool): ``on_epoch_end`` changes ``self.offset``, so the dataset's pickle
            changes and compatmp re-sends it to every worker each epoch (default: False).
    """

    def __init__(
        self, n: int = 8, rows: int = 8, delay: float = 0.0, *, reshuffle: bool = False
    ) -> None:
        self.n = n
        self.rows = rows
        self.delay = delay
        self.reshuffle = reshuffle
        self.offset = 0
        self.epochs_ended = 0

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        if not 0 <= index < self.n:
            raise IndexError(index)
        if self.delay:
            time.sleep(self.delay)
        rng = np.random.default_rng(index + 1000 * self.offset)
        x = rng.standard_normal((self.rows, N_FEATURES), dtype=np.float32)
        return x, x @ _WEIGHTS

    def on_epoch_end(self) -> None:
        self.epochs_ended += 1
        if self.reshuffle:
            self.offset += 1


class SegfaultDataset(TinyDataset):
    """Batch ``crash_at`` writes a marker (see :func:`write_marker`), then dereferences NULL
    (``ctypes.string_at(0)``): the worker dies with SIGSEGV."""

    def __init__(self, crash_at: int, marker: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.crash_at = crash_at
        self.marker = marker

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        if index == self.crash_at:
            # A forked worker inherits pytest's faulthandler, which would dump every thread's
            # stack and the list of loaded extension modules into the test output.
            faulthandler.disable()
            write_marker(self.marker)
            ctypes.string_at(0)
        return super().__getitem__(index)


class MemoryLimitDataset(TinyDataset):
    """Batch ``hog_at`` caps the worker's address space, then allocates past the cap.

    The cap is ``RLIMIT_AS`` = the worker's current virtual size + ``headroom`` bytes (set
    inside the worker, like a container or ``ulimit -v`` limit); the allocation is ``hog``
    bytes (``numpy.ones``, so every page is touched). A marker is written just before the
    allocation.

    Args:
        hog_at (int): the batch that allocates.
        marker (str): the marker file.
        headroom (int): bytes of address space left to the worker (default: 64 MiB).
        hog (int): bytes to allocate (default: 1 GiB).
    """

    def __init__(
        self,
        hog_at: int,
        marker: str,
        headroom: int = 64 << 20,
        hog: int = 1 << 30,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.hog_at = hog_at
        self.marker = marker
        self.headroom = headroom
        self.hog = hog

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        if index == self.hog_at:
            import resource

            import psutil

            vms = psutil.Process().memory_info().vms
            _soft, hard = resource.getrlimit(resource.RLIMIT_AS)
            resource.setrlimit(resource.RLIMIT_AS, (vms + self.headroom, hard))
            write_marker(self.marker)
            np.ones(self.hog, dtype=np.uint8)
        return super().__getitem__(index)


class BatchError(KeyError):
    """Raised by :class:`GetitemFailsDataset`."""


class GetitemFailsDataset(TinyDataset):
    """``dataset[fail_at]`` raises :class:`BatchError` (an ordinary error in user code)."""

    def __init__(self, fail_at: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.fail_at = fail_at

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        if index == self.fail_at:
            raise BatchError(f"no batch {index} (raised on purpose)")
        return super().__getitem__(index)


class EpochEndError(RuntimeError):
    """Raised by :class:`EpochEndFailsDataset`."""


class EpochEndFailsDataset(TinyDataset):
    """``on_epoch_end`` raises :class:`EpochEndError` on its ``fail_on``-th call.

    Keras calls ``on_epoch_end`` once before the first epoch (``EpochIterator.reset``), so
    ``fail_on=2`` fails after the first epoch.
    """

    def __init__(self, fail_on: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.fail_on = fail_on

    def on_epoch_end(self) -> None:
        super().on_epoch_end()
        if self.epochs_ended == self.fail_on:
            raise EpochEndError(f"on_epoch_end call {self.epochs_ended} failed (on purpose)")


class Holder:
    """A plain attribute bag, so the unpicklable object sits one level down:
    ``dataset.source.<name>``."""

    def __init__(self, **attrs: Any) -> None:
        self.__dict__.update(attrs)


def open_unpicklable(kind: str, directory: str) -> Any:
    """Make one object of an unpicklable ``kind``: ``generator``, ``socket``, ``sqlite3``
    or ``write_file`` (a file in ``directory`` opened for writing)."""
    if kind == "generator":
        return (i for i in range(3))
    if kind == "socket":
        return socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if kind == "sqlite3":
        return sqlite3.connect(":memory:", check_same_thread=False)
    if kind == "write_file":
        return open(os.path.join(directory, "log.txt"), "w")  # closed by close_unpicklable
    raise ValueError(f"unknown kind {kind!r}; use generator, socket, sqlite3 or write_file")


def close_unpicklable(obj: Any) -> None:
    """Close what :func:`open_unpicklable` made (generators need nothing)."""
    close = getattr(obj, "close", None)
    if close is not None:
        close()


class HoldsUnpicklable(TinyDataset):
    """Holds unpicklable objects at ``dataset.source.<name>``; records who loads batches.

    ``loaded_by`` collects ``(pid, thread name)`` of every ``__getitem__`` call: after a
    thread fallback it holds this process's pid and compatmp's worker thread names.

    Args:
        resources (dict[str, object]): attribute name -> the object.
    """

    def __init__(self, resources: dict[str, Any], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.source = Holder(**resources)
        self.loaded_by: set[tuple[int, str]] = set()
        self._lock = threading.Lock()

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        with self._lock:
            self.loaded_by.add((os.getpid(), threading.current_thread().name))
        return super().__getitem__(index)
