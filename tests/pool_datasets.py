"""Datasets and helpers for the pool and shared-memory tests.

Everything here is at module level so that worker processes (spawn, forkserver) import it by
reference: the tests directory is on ``sys.path`` in the main process, and multiprocessing
hands ``sys.path`` to its children.
"""

from __future__ import annotations

import argparse
import os
import random
import threading
import time
import uuid
from collections import namedtuple
from typing import Any

import numpy as np
import psutil

from compatmp import _shm_names
from compatmp._platform import available_methods
from compatmp._worker import get_worker_info
from compatmp.bench.runner import _is_helper

# The one source of start methods the pool tests run over (house rule 7).
PROCESS_METHODS = available_methods()
ALL_METHODS = [*PROCESS_METHODS, "thread"]

# Where Linux lists shared-memory blocks as files.
SHM_DIR = "/dev/shm"


def shm_entries(pid: int | None = None) -> list[str]:
    """Shared-memory blocks in ``/dev/shm`` made for pools of process ``pid`` (default: us).

    Only names that start with that process's own prefix (its pid *and* PID namespace,
    ``_shm_names.owner_prefix``): other compatmp runs on the machine share ``/dev/shm``, and
    their blocks are not ours to count (``pid`` must be in this process's PID namespace).
    """
    prefix = _shm_names.owner_prefix(os.getpid() if pid is None else pid)
    try:
        return sorted(e for e in os.listdir(SHM_DIR) if e.startswith(prefix))
    except OSError:
        return []


def worker_processes(root: int | None = None) -> set[tuple[int, float]]:
    """(pid, create_time) of live descendants of ``root`` (default: us), helpers excluded."""
    out = set()
    for p in psutil.Process(root).children(recursive=True):
        try:
            if p.status() == psutil.STATUS_ZOMBIE or _is_helper(p):
                continue
            out.add((p.pid, p.create_time()))
        except psutil.Error:
            continue
    return out


def pid_alive(pid: int) -> bool:
    """True if ``pid`` runs and is not a zombie."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


class RangeDataset:
    """``dataset[i] -> (i, pid)``, optionally after a random per-index delay (seconds)."""

    def __init__(self, n: int, max_delay: float = 0.0) -> None:
        self.n = n
        self.max_delay = max_delay

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[int, int]:
        if self.max_delay:
            time.sleep(random.Random(i).uniform(0, self.max_delay))
        return i, os.getpid()


class RecordingDataset:
    """Writes a file per computed index into ``directory``, to count computations."""

    def __init__(self, n: int, directory: str) -> None:
        self.n = n
        self.directory = directory

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        time.sleep(random.Random(i).uniform(0, 0.005))
        path = os.path.join(self.directory, f"{i}_{uuid.uuid4().hex}")
        with open(path, "w"):
            pass
        return i


class BadIndexError(ValueError):
    """Raised by :class:`RaisingDataset`."""


class NeedsTwoArgsError(Exception):
    """An exception whose pickle cannot be loaded (its __init__ needs two arguments)."""

    def __init__(self, a: object, b: object) -> None:
        super().__init__(f"needs two args: {a} {b}")


class RaisingDataset:
    """Raises at ``bad``: :class:`BadIndexError`, or an unpicklable one if ``unpicklable``."""

    def __init__(self, n: int, bad: int, unpicklable: bool = False) -> None:
        self.n = n
        self.bad = bad
        self.unpicklable = unpicklable

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        if i == self.bad:
            _fail_here(i, self.unpicklable)
        return i


def _fail_here(i: int, unpicklable: bool) -> None:
    if unpicklable:
        raise NeedsTwoArgsError(i, "x")
    raise BadIndexError(f"bad index {i}")


class ExitDataset:
    """Calls ``os._exit(code)`` at index ``bad``; other indices sleep ``delay`` seconds."""

    def __init__(self, n: int, bad: int, code: int = 7, delay: float = 0.0) -> None:
        self.n = n
        self.bad = bad
        self.code = code
        self.delay = delay

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        if i == self.bad:
            os._exit(self.code)
        time.sleep(self.delay)
        return i


class PidThenSleepDataset:
    """Index 0 returns the worker pid at once; every other index sleeps ``delay`` seconds."""

    def __init__(self, n: int, delay: float) -> None:
        self.n = n
        self.delay = delay

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        if i:
            time.sleep(self.delay)
        return os.getpid()


class SlowDataset:
    """Index ``slow`` sleeps ``seconds``; others return at once."""

    def __init__(self, n: int, slow: int, seconds: float) -> None:
        self.n = n
        self.slow = slow
        self.seconds = seconds

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        if i == self.slow:
            time.sleep(self.seconds)
        return i


class InfoDataset:
    """Returns (worker info, random.random(), numpy.random.rand(), pid, init marker)."""

    def __len__(self) -> int:
        return 1000

    def __getitem__(self, i: int) -> tuple[Any, float, float, int, Any]:
        time.sleep(0.01)  # so that every worker gets a share
        init = _INIT.get((os.getpid(), threading.get_ident()))
        return get_worker_info(), random.random(), float(np.random.rand()), os.getpid(), init


# (pid, thread id) -> the worker id record_init was called with there
_INIT: dict[tuple[int, int], int] = {}


def failing_init(worker_id: int) -> None:
    """A ``worker_init_fn`` that always fails."""
    raise BadIndexError(f"init failed in worker {worker_id}")


def record_init(worker_id: int) -> None:
    """A ``worker_init_fn``: remembers the id it was called with, in this worker."""
    _INIT[(os.getpid(), threading.get_ident())] = worker_id


class StateDataset:
    """Returns (state, worker id) after a short sleep, so every worker gets a batch."""

    def __init__(self, n: int, state: int = 0) -> None:
        self.n = n
        self.state = state

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[int, int | None]:
        time.sleep(0.02)
        info = get_worker_info()
        return self.state, None if info is None else info.id


class HoldsGenerator:
    """Cannot be pickled: holds a generator."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.gen = (x for x in range(3))

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        return i * 2


class FailsToLoadInWorker:
    """Pickles fine, but unpickling raises inside a worker (not in the main process)."""

    def __len__(self) -> int:
        return 4

    def __getitem__(self, i: int) -> int:
        return i

    def __reduce__(self) -> tuple:
        return (_load_or_fail, ())


class LoadError(RuntimeError):
    """Raised when :class:`FailsToLoadInWorker` is unpickled in a worker."""


def _load_or_fail() -> FailsToLoadInWorker:
    if get_worker_info() is not None:
        raise LoadError("cannot load this dataset in a worker")
    return FailsToLoadInWorker()


Point = namedtuple("Point", ["x", "y"])


def sample_batch(seed: int = 0) -> Any:
    """A batch with every shape of content the shared-memory path must keep intact."""
    rng = np.random.default_rng(seed)
    big = rng.standard_normal((64, 64, 32)).astype(np.float32)  # 512 KiB
    return (
        big,
        big[::2, ::3, 1:],  # non-contiguous
        np.asfortranarray(rng.standard_normal((300, 200))),  # F-ordered, 480 KB
        np.array(3.5, dtype=np.float64),  # 0-d
        rng.integers(0, 10, size=(8,), dtype=np.int64),  # small
        {
            "image": rng.integers(0, 255, size=(128, 128, 16), dtype=np.uint8),  # 256 KiB
            "mask": np.zeros((512, 512), dtype=bool),
            "label": 3,
            "names": ["a", "b"],
        },
        [np.arange(70_000, dtype=np.int32), None, "text"],
        Point(np.ones((300, 300), dtype=np.float32), np.float32(2.5)),
        np.array([1, "x", None], dtype=object),  # object dtype: never shared memory
        np.zeros((0, 5), dtype=np.float32),  # empty
    )


class ArrayDataset:
    """``dataset[i]`` is :func:`sample_batch(i)`."""

    def __len__(self) -> int:
        return 6

    def __getitem__(self, i: int) -> Any:
        return sample_batch(i)


class BigArrayDataset:
    """``dataset[i]`` is a float32 array of ``shape`` filled with ``i``, after ``delay`` s."""

    def __init__(self, n: int, shape: tuple[int, ...], delay: float = 0.0) -> None:
        self.n = n
        self.shape = shape
        self.delay = delay

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> np.ndarray:
        time.sleep(self.delay)
        return np.full(self.shape, i, dtype=np.float32)


class EmptyFillDataset:
    """``dataset[i]`` is a ``compatmp.empty`` float32 array of ``shape`` filled with ``i``.

    Built in place, as the big-batch benchmark's trivial fill does: in a worker process the
    array is born in one of the worker's reusable shared-memory blocks.
    """

    def __init__(self, n: int, shape: tuple[int, ...]) -> None:
        self.n = n
        self.shape = shape

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> np.ndarray:
        import compatmp

        x = compatmp.empty(self.shape, np.float32)
        x[...] = i
        return x


class BusyAfterDataset:
    """A 1 MiB array per index; indices >= ``busy_from`` first sleep ``seconds``."""

    def __init__(self, n: int, busy_from: int, seconds: float) -> None:
        self.n = n
        self.busy_from = busy_from
        self.seconds = seconds

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> np.ndarray:
        if i >= self.busy_from:
            time.sleep(self.seconds)
        return np.full((512, 512), i, dtype=np.float32)


class ExitWhilePickled:
    """Kills the worker while it pickles the batch, i.e. after its blocks were created."""

    def __reduce__(self) -> tuple:
        os._exit(3)


class DiesAfterBlocksDataset:
    """Index ``bad`` returns a big array plus an object that kills the worker when pickled."""

    def __init__(self, n: int, bad: int) -> None:
        self.n = n
        self.bad = bad

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> Any:
        arr = np.full((512, 512), i, dtype=np.float32)  # 1 MiB: goes to shared memory
        if i == self.bad:
            return arr, ExitWhilePickled()
        return arr, None


def assert_batches_equal(got: Any, expected: Any) -> None:
    """Same structure, types, dtypes, shapes and values (NaN-free data)."""
    assert type(got) is type(expected), (type(got), type(expected))
    if isinstance(expected, np.ndarray):
        assert got.dtype == expected.dtype
        assert got.shape == expected.shape
        if expected.dtype.hasobject:
            assert list(got.ravel()) == list(expected.ravel())
        else:
            np.testing.assert_array_equal(got, expected)
    elif isinstance(expected, dict):
        assert list(got) == list(expected)
        for k in expected:
            assert_batches_equal(got[k], expected[k])
    elif isinstance(expected, (tuple, list)):
        assert len(got) == len(expected)
        for g, e in zip(got, expected, strict=True):
            assert_batches_equal(g, e)
    else:
        assert got == expected


class NamespaceDataset(argparse.Namespace):
    """A dataset whose base class lives in another package (as a ``PyDataset`` subclass's)."""

    def __len__(self) -> int:
        return 3

    def __getitem__(self, i: int) -> int:
        return i
