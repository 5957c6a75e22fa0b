"""Datasets for tests/test_keras.py, at module level so worker processes can import them.

Most are plain classes (``__len__``/``__getitem__``, optional ``on_epoch_end``), which
``compatmp.fit`` accepts like a ``keras.utils.PyDataset``; they import only NumPy, so a spawned
worker starts in well under a second. :func:`pydataset_class` builds a real
``keras.utils.PyDataset`` subclass on demand (a worker that unpickles it imports Keras and
TensorFlow, ~5 s on the test machine), for the tests that need one.

Batches carry the sample ids so tests can see which rows arrived, in which order, from which
process: ``x[:, 0]`` is the sample id and ``y`` a linear function of the features.
"""

from __future__ import annotations

import os
import threading
from typing import Any

import numpy as np

N_FEATURES = 3
_WEIGHTS = np.array([0.5, -1.0, 2.0], dtype=np.float32)


def assert_same_history(got: Any, expected: Any) -> None:
    """Two ``History`` objects (Keras 3 or 2) recorded the same epochs and metric values."""
    assert got.history.keys() == expected.history.keys()
    assert got.epoch == expected.epoch
    for key, values in expected.history.items():
        np.testing.assert_allclose(got.history[key], values, rtol=1e-5, err_msg=key)


def assert_rejected_with_keras_message(
    make_model: Any, fn: str, x: Any, kwargs: dict, monkeypatch: Any
) -> BaseException:
    """``compatmp.<fn>`` rejects ``x`` as ``model.<fn>`` does (Keras 3 or 2, from the model):
    the same exception type, a message that starts with Keras' own and goes on with compatmp's
    explanation, and no pool started. Returns compatmp's exception."""
    import pytest

    import compatmp

    with pytest.raises(Exception) as keras_raised:
        getattr(make_model(), fn)(x, verbose=0, **kwargs)
    monkeypatch.setattr("compatmp._keras._open_pool", lambda *a, **k: pytest.fail("pool"))
    with pytest.raises(type(keras_raised.value)) as ours:
        getattr(compatmp, fn)(make_model(), x, verbose=0, workers=2, **kwargs)
    keras_said = str(keras_raised.value)
    assert str(ours.value).startswith(keras_said), (str(ours.value), keras_said)
    assert "compatmp" in str(ours.value)[len(keras_said) :]  # and our explanation
    return ours.value


def make_arrays(n_samples: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Features (n, 3) float32 with the sample id in column 0 (scaled), and targets (n, 1)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n_samples, N_FEATURES)).astype(np.float32)
    x[:, 0] = np.arange(n_samples, dtype=np.float32) / n_samples
    y = (x @ _WEIGHTS)[:, None].astype(np.float32) + 0.1
    return x, y


def ids_of(x: np.ndarray, n_samples: int) -> np.ndarray:
    """Recover sample ids from a batch's features (inverse of ``make_arrays`` column 0)."""
    return np.rint(np.asarray(x)[:, 0] * n_samples).astype(np.int64)


class ArrayDataset:
    """``(x, y)`` batches of a fixed regression problem; ``on_epoch_end`` may reshuffle rows.

    Args:
        n_samples (int): rows (default: 48).
        batch_size (int): rows per batch; the last batch may be smaller (default: 8).
        reshuffle (bool): permute the rows in ``on_epoch_end`` with a seeded generator kept on
            the dataset, so the main process decides every epoch's order (default: False).
        seed (int): data and shuffle seed (default: 0).
    """

    def __init__(
        self, n_samples: int = 48, batch_size: int = 8, *, reshuffle: bool = False, seed: int = 0
    ) -> None:
        self.n_samples = n_samples
        self.batch_size = batch_size
        self.reshuffle = reshuffle
        self.x, self.y = make_arrays(n_samples, seed)
        self.order = np.arange(n_samples)
        self.rng = np.random.default_rng(seed + 1)
        self.epochs_ended = 0

    def __len__(self) -> int:
        return -(-self.n_samples // self.batch_size)

    def rows(self, index: int) -> np.ndarray:
        return self.order[index * self.batch_size : (index + 1) * self.batch_size]

    def __getitem__(self, index: int) -> Any:
        if not 0 <= index < len(self):
            raise IndexError(index)
        rows = self.rows(index)
        return self.x[rows], self.y[rows]

    def on_epoch_end(self) -> None:
        self.epochs_ended += 1
        if self.reshuffle:
            self.rng.shuffle(self.order)


class InputsOnlyDataset(ArrayDataset):
    """``(x,)`` batches (for predict)."""

    def __getitem__(self, index: int) -> Any:
        return (super().__getitem__(index)[0],)


class PidDataset(ArrayDataset):
    """``(x,)`` batches whose column 1 is the pid of the process that built the batch."""

    def __getitem__(self, index: int) -> Any:
        x = super().__getitem__(index)[0].copy()
        x[:, 1] = os.getpid()
        return (x,)


class LockLambdaDataset(PidDataset):
    """Like user code: a ``threading.Lock``-guarded cache and a lambda transform.

    Plain ``pickle`` rejects both (``cannot pickle '_thread.lock' object``, ``Can't pickle
    <function <lambda>>``); compatmp's serializer ships them.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lock = threading.Lock()
        self.cache: dict[int, np.ndarray] = {}
        self.transform = lambda a: a * 1.0

    def __getitem__(self, index: int) -> Any:
        with self.lock:
            if index not in self.cache:
                self.cache[index] = super().__getitem__(index)[0]
            x = self.cache[index]
        return (self.transform(x),)


class SqliteDataset(PidDataset):
    """Holds an open ``sqlite3.Connection``, which no serializer can ship to a process."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        import sqlite3

        super().__init__(*args, **kwargs)
        self.conn = sqlite3.connect(":memory:", check_same_thread=False)


class WeightedDataset(ArrayDataset):
    """``(x, y, sample_weight)`` batches from a plain object (not a PyDataset)."""

    def __getitem__(self, index: int) -> Any:
        x, y = super().__getitem__(index)
        return x, y, np.ones(len(x), dtype=np.float32)


class CrashDataset(ArrayDataset):
    """A worker process computing batch ``crash_at`` dies at once (``os._exit(7)``)."""

    def __init__(self, *args: Any, crash_at: int = 3, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.crash_at = crash_at

    def __getitem__(self, index: int) -> Any:
        if index == self.crash_at:
            os._exit(7)
        return super().__getitem__(index)


class FailingDataset(ArrayDataset):
    """``dataset[fail_at]`` raises ``KeyError`` (an ordinary exception in user code)."""

    def __init__(self, *args: Any, fail_at: int = 2, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fail_at = fail_at

    def __getitem__(self, index: int) -> Any:
        if index == self.fail_at:
            raise KeyError(f"no batch {index} (raised on purpose)")
        return super().__getitem__(index)


class ChangingStructureDataset(ArrayDataset):
    """Batch ``change_at`` returns ``(x,)`` where the others return ``(x, y)``."""

    def __init__(self, *args: Any, change_at: int = 3, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.change_at = change_at

    def __getitem__(self, index: int) -> Any:
        x, y = super().__getitem__(index)
        return (x,) if index == self.change_at else (x, y)


class MainProcessForbidden(ArrayDataset):
    """Raises ``RuntimeError`` when a batch is loaded in process ``main_pid``."""

    def __init__(self, main_pid: int, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.main_pid = main_pid

    def __getitem__(self, index: int) -> Any:
        if os.getpid() == self.main_pid:
            raise RuntimeError(f"batch {index} was loaded in the main process")
        return super().__getitem__(index)


class EmptyDataset:
    """A dataset with no batches."""

    def __len__(self) -> int:
        return 0

    def __getitem__(self, index: int) -> Any:
        raise IndexError(index)


class SlowDataset(ArrayDataset):
    """Every batch takes ``delay`` seconds (for interrupt tests)."""

    def __init__(self, *args: Any, delay: float = 0.2, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.delay = delay

    def __getitem__(self, index: int) -> Any:
        import time

        time.sleep(self.delay)
        return super().__getitem__(index)


def batch_generator(n_batches: int, batch_size: int = 8, seed: int = 0) -> Any:
    """Yield ``n_batches`` ``(x, y)`` batches of the ArrayDataset problem, then stop."""
    x, y = make_arrays(n_batches * batch_size, seed)
    for i in range(n_batches):
        yield x[i * batch_size : (i + 1) * batch_size], y[i * batch_size : (i + 1) * batch_size]


_PYDATASET: dict[str, type] = {}
_PYDATASET_LOCK = threading.Lock()


def pydataset_class() -> type:
    """``KerasArrayDataset``: ArrayDataset as a real ``keras.utils.PyDataset`` (imports Keras)."""
    return __getattr__("KerasArrayDataset")


def __getattr__(name: str) -> Any:
    # PEP 562: build the Keras subclass on first use and cache it, so that pickling by
    # reference (module + qualname) finds the same class in workers.
    if name != "KerasArrayDataset":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    with _PYDATASET_LOCK:
        cls = globals().get(name)
        if cls is None:
            import keras

            # ArrayDataset first, so its __getitem__/on_epoch_end win over PyDataset's stubs.
            class KerasArrayDataset(ArrayDataset, keras.utils.PyDataset):
                def __init__(
                    self,
                    *args: Any,
                    workers: int = 1,
                    use_multiprocessing: bool = False,
                    max_queue_size: int = 10,
                    **kwargs: Any,
                ) -> None:
                    keras.utils.PyDataset.__init__(
                        self,
                        workers=workers,
                        use_multiprocessing=use_multiprocessing,
                        max_queue_size=max_queue_size,
                    )
                    ArrayDataset.__init__(self, *args, **kwargs)

            KerasArrayDataset.__module__ = __name__
            KerasArrayDataset.__qualname__ = name
            cls = globals()[name] = KerasArrayDataset
    return cls


class AugmentedDataset(ArrayDataset):
    """:class:`ArrayDataset` with random augmentation from ``compatmp.batch_rng()``.

    Column 0 (the sample id, :func:`ids_of`) is kept; the other features get noise drawn from
    the batch's own generator, so a batch depends on (seed, pass, index) (NOTE [ Per-batch
    seeds ] in compatmp/_seeds.py).
    """

    def __getitem__(self, index: int) -> Any:
        import compatmp

        x, y = super().__getitem__(index)
        x = x.copy()
        x[:, 1:] += compatmp.batch_rng().normal(0, 0.01, size=x[:, 1:].shape)
        return x, y
