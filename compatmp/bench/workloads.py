"""The benchmark's workloads: the datasets each configuration loads, and how a child builds one.

Every class here is at module level, and this module imports neither Keras nor TensorFlow:
worker processes (spawn, forkserver) import it to unpickle a dataset by reference
(``compatmp.bench.workloads.GilDataset``). The ``Keras*`` variants (the same classes with
``keras.utils.PyDataset`` mixed in) are built on first attribute access (PEP 562).

NOTE [ Benchmark datasets ]
* ``gil``: :class:`GilDataset`, ~25 ms of pure-Python arithmetic per batch of 32 (the GIL is
  held throughout), 32x16 float32 out; ``on_epoch_end`` reshuffles the batch order, so
  compatmp re-sends the dataset each epoch as it would for real data.
* ``bigbatch``: :class:`BigBatchDataset`, 32x224x224x3 float32 (19.3 MB) per batch, built by
  gathering uint8 images, scaling and normalizing them (~4 ms): measures transport.
* ``images``: the demo's pipeline (``compatmp._demo.DigitsDataset``: PNG decode with Pillow,
  random rotation/shift/noise in Python), at 128 px by default (``--image-size``; the demo
  trains at 28 px, where a batch takes ~1.6 ms and start-up costs dominate everything).
Keras needs a ``keras.utils.PyDataset`` subclass (``model.fit`` rejects anything else), so
Keras rows use ``Keras<Name>`` (the same class with ``PyDataset`` mixed in) and their workers
import Keras; compatmp and torch rows use the plain class, whose workers never import
TensorFlow; ``fit`` rows use the Keras class for every loader. Keras' and torch's spawn
workers need a plain-picklable dataset: for ``images`` (whose ``DigitsDataset`` holds a lock
and a lambda, like real user code) they get ``PicklableDigitsDataset`` (the same class with
:class:`compatmp.PickleSafeMixin`), and the ``lock`` section reports the unmodified dataset
failing there. torch rows use ``persistent_workers=True`` (so state changed by
``on_epoch_end`` in the main process does not reach its workers) and a ``prefetch_factor``
giving the same ~10 batches in flight as Keras' and compatmp's ``max_queue_size=10``.
"""

from __future__ import annotations

import random
import sys
import threading
from typing import Any

import numpy as np

__all__ = ["BigBatchDataset", "GilDataset", "LockedGilDataset"]

# ---------------------------------------------------------------------------------------------
# Sizes (each interval says why its value)
# ---------------------------------------------------------------------------------------------

#: Samples per batch in every workload (Keras' and torch's usual default).
BATCH_SIZE = 32

#: Iterations of :func:`_python_work` per sample: 32 samples take ~25 ms on the 2-core box
#: this was calibrated on (0.09 us per iteration when idle).
GIL_ITERS_PER_SAMPLE = 8_500

#: Per-sample feature count of the ``gil`` batches (small arrays: transport is negligible).
GIL_FEATURES = 16

#: Image shape of the ``bigbatch`` workload: 32 x 224 x 224 x 3 float32 = 19.3 MB per batch.
BIG_SHAPE = (224, 224, 3)

#: Distinct source images ``BigBatchDataset`` gathers from (kept small: a real dataset holds
#: file paths, not pixels, and the dataset is re-sent to every worker each epoch).
BIG_DISTINCT = 8

#: Default image side for the ``images`` workload, in pixels (see NOTE [ Benchmark datasets ]).
IMAGES_DEFAULT_SIZE = 128

#: Default batches per epoch: long enough that the serial epoch (~1-2 s) dwarfs fork start-up.
DEFAULT_BATCHES = {"gil": 60, "bigbatch": 100, "images": 56}

#: ``--quick``: batches per epoch, and the smaller sizes used (CI smoke runs, no timing value).
QUICK_BATCHES = 3
QUICK_GIL_ITERS = 300
QUICK_BIG_SHAPE = (32, 32, 3)
QUICK_IMAGE_SIZE = 28

#: Queue depth of every loader (Keras' and compatmp's ``max_queue_size`` default).
QUEUE_DEPTH = 10

WORKLOADS = ("gil", "bigbatch", "images")

# ---------------------------------------------------------------------------------------------
# Datasets (module level: worker processes import them by reference)
# ---------------------------------------------------------------------------------------------


def _python_work(seed: int, iterations: int) -> int:
    """Pure-Python integer arithmetic (a linear congruential generator); holds the GIL."""
    x = seed & 0x7FFFFFFF
    acc = 0
    for _ in range(iterations):
        x = (x * 1103515245 + 12345) & 0x7FFFFFFF
        acc += x >> 16
    return acc


class GilDataset:
    """Batches whose cost is pure-Python work under the GIL (the ``gil`` workload).

    Args:
        n_batches (int): batches per epoch.
        batch_size (int): samples per batch (default: 32).
        iterations (int): :func:`_python_work` iterations per sample (default:
            :data:`GIL_ITERS_PER_SAMPLE`, ~25 ms per batch of 32).
        seed (int): seed of the per-epoch shuffle of the batch order (default: 0).

    ``dataset[i]`` returns ``(x, y)``: ``x`` float32 ``(batch_size, 16)``, ``y`` int32
    ``(batch_size,)`` in 0..9. ``on_epoch_end`` reshuffles the batch order.
    """

    def __init__(
        self,
        n_batches: int,
        batch_size: int = BATCH_SIZE,
        iterations: int = GIL_ITERS_PER_SAMPLE,
        seed: int = 0,
    ) -> None:
        self.n_batches = int(n_batches)
        self.batch_size = int(batch_size)
        self.iterations = int(iterations)
        self.order = list(range(self.n_batches))
        self._shuffle = random.Random(seed)

    def __len__(self) -> int:
        return self.n_batches

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        if not 0 <= index < self.n_batches:
            raise IndexError(f"batch index {index} out of range [0, {self.n_batches})")
        first = self.order[index] * self.batch_size
        rows = []
        for sample in range(first, first + self.batch_size):
            acc = _python_work(sample, self.iterations)
            rows.append([((acc >> k) & 0xFF) / 255.0 for k in range(GIL_FEATURES)])
        x = np.asarray(rows, dtype=np.float32)
        y = np.arange(first, first + self.batch_size, dtype=np.int32) % 10
        return x, y

    def on_epoch_end(self) -> None:
        self._shuffle.shuffle(self.order)


class LockedGilDataset(GilDataset):
    """:class:`GilDataset` that counts loads per batch in a dict guarded by a ``threading.Lock``.

    The pattern of real datasets with a cache or statistics shared by loader threads; plain
    ``pickle`` refuses it (``cannot pickle '_thread.lock' object``), so it cannot reach
    ``spawn`` workers of Keras or torch. Same arguments as :class:`GilDataset`.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._lock = threading.Lock()
        self.loads: dict[int, int] = {}

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        with self._lock:
            self.loads[index] = self.loads.get(index, 0) + 1
        return super().__getitem__(index)


_IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
_IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


class BigBatchDataset:
    """Big float32 batches with light compute (the ``bigbatch`` workload): measures transport.

    Args:
        n_batches (int): batches per epoch.
        batch_size (int): images per batch (default: 32).
        shape (tuple[int, int, int]): image shape (default: 224 x 224 x 3, so 19.3 MB per
            batch).
        seed (int): seed of the source pixels and of the per-epoch shuffle (default: 0).

    ``dataset[i]`` gathers ``batch_size`` of :data:`BIG_DISTINCT` uint8 source images,
    scales them to float32 into a :func:`compatmp.empty` array (born in the worker's shared
    memory, so compatmp sends it without a copy; ``numpy.empty`` for the other loaders) and
    normalizes each channel (ImageNet mean and standard deviation; ~4 ms per batch); returns
    ``(x, y)`` with ``y`` int32 labels. ``on_epoch_end`` reshuffles the batch order.
    """

    def __init__(
        self,
        n_batches: int,
        batch_size: int = BATCH_SIZE,
        shape: tuple[int, ...] = BIG_SHAPE,
        seed: int = 0,
    ) -> None:
        rng = np.random.default_rng(seed)
        self.n_batches = int(n_batches)
        self.batch_size = int(batch_size)
        self.images = rng.integers(0, 256, size=(BIG_DISTINCT, *shape), dtype=np.uint8)
        self.labels = rng.integers(0, 10, size=BIG_DISTINCT, dtype=np.int32)
        self.order = np.arange(self.n_batches)
        self._shuffle = np.random.default_rng(seed + 1)

    def __len__(self) -> int:
        return self.n_batches

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        if not 0 <= index < self.n_batches:
            raise IndexError(f"batch index {index} out of range [0, {self.n_batches})")
        from .. import empty

        first = int(self.order[index]) * self.batch_size
        rows = np.arange(first, first + self.batch_size) % BIG_DISTINCT
        x = empty((self.batch_size, *self.images.shape[1:]), np.float32)  # no copy in a worker
        np.multiply(self.images[rows], np.float32(1.0 / 255.0), out=x)
        x -= _IMAGENET_MEAN  # per-channel normalization, as image pipelines do
        x /= _IMAGENET_STD
        return x, self.labels[rows]

    def on_epoch_end(self) -> None:
        self._shuffle.shuffle(self.order)


# Keras variants, built on first attribute access (PEP 562) so that importing this module -
# which every spawn child does - never imports Keras; the cached class is what pickling by
# reference (module + qualname) finds again in a worker.
_KERAS_BASES = {
    "KerasGilDataset": "GilDataset",
    "KerasLockedGilDataset": "LockedGilDataset",
    "KerasBigBatchDataset": "BigBatchDataset",
}
_CLASS_LOCK = threading.Lock()


def _make_keras_variant(name: str) -> type:
    import keras

    base = globals()[_KERAS_BASES[name]]
    pydataset = keras.utils.PyDataset

    def __init__(
        self: Any,
        *args: Any,
        workers: int = 1,
        use_multiprocessing: bool = False,
        max_queue_size: int = QUEUE_DEPTH,
        **kwargs: Any,
    ) -> None:
        base.__init__(self, *args, **kwargs)
        pydataset.__init__(
            self,
            workers=workers,
            use_multiprocessing=use_multiprocessing,
            max_queue_size=max_queue_size,
        )

    doc = f"{base.__name__} as a ``keras.utils.PyDataset`` (what ``model.fit`` accepts)."
    namespace = {"__init__": __init__, "__module__": __name__, "__qualname__": name, "__doc__": doc}
    return type(name, (base, pydataset), namespace)


def _make_picklable_digits(name: str) -> type:
    from .. import PickleSafeMixin, _demo

    doc = (
        "``compatmp._demo.DigitsDataset`` with ``compatmp.PickleSafeMixin``: plain ``pickle`` "
        "(Keras' and torch's spawn workers) can ship it, lock and lambda included."
    )
    namespace = {"__module__": __name__, "__qualname__": name, "__doc__": doc}
    return type(name, (PickleSafeMixin, _demo.DigitsDataset), namespace)


def _make_script_variant(name: str) -> type:
    """``KerasGilDataset`` as if defined in the user's training script (``__main__``).

    cloudpickle sends such a class by value, so compatmp's workers get it on the Keras-free
    stand-in base (NOTE [ PyDataset stand-in ] in ``compatmp._standin``). Nothing in it
    refers to Keras but its base: ``super()`` reaches ``PyDataset.__init__``.
    """
    import keras

    class ScriptKerasGilDataset(GilDataset, keras.utils.PyDataset):
        def __init__(
            self,
            *args: Any,
            workers: int = 1,
            use_multiprocessing: bool = False,
            max_queue_size: int = QUEUE_DEPTH,
            **kwargs: Any,
        ) -> None:
            GilDataset.__init__(self, *args, **kwargs)
            super(GilDataset, self).__init__(  # the next base: Keras' PyDataset
                workers=workers,
                use_multiprocessing=use_multiprocessing,
                max_queue_size=max_queue_size,
            )

    ScriptKerasGilDataset.__module__ = "__main__"  # not importable by name: sent by value
    return ScriptKerasGilDataset


def __getattr__(name: str) -> Any:
    builders = {"PicklableDigitsDataset": _make_picklable_digits}
    builders["ScriptKerasGilDataset"] = _make_script_variant
    if name in _KERAS_BASES or name in builders:
        with _CLASS_LOCK:
            cls = globals().get(name)
            if cls is None:
                cls = builders.get(name, _make_keras_variant)(name)
                globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _make_dataset(spec: dict[str, Any], n_batches: int) -> Any:
    """Build the configuration's dataset with ``n_batches`` batches (outside any timing)."""
    name = spec["dataset"]
    quick = spec["quick"]
    keras_kwargs: dict[str, Any] = {}
    if spec["library"] == "keras":  # Keras' own workers are configured on the PyDataset
        keras_kwargs = {"workers": spec["workers"], "use_multiprocessing": spec["processes"]}
    if name in ("DigitsDataset", "PicklableDigitsDataset"):
        from .. import _demo

        paths, labels = _demo.prepare_images(image_size=spec["image_size"])
        n = min(len(paths), n_batches * BATCH_SIZE)
        cls = _demo.DigitsDataset if name == "DigitsDataset" else __getattr__(name)
        return cls(
            paths[:n], labels[:n], BATCH_SIZE, augment=True, shuffle=True, seed=0, **keras_kwargs
        )
    cls = getattr(sys.modules[__name__], name)
    if "Gil" in name:
        iterations = QUICK_GIL_ITERS if quick else GIL_ITERS_PER_SAMPLE
        return cls(n_batches, BATCH_SIZE, iterations, **keras_kwargs)
    shape = QUICK_BIG_SHAPE if quick else BIG_SHAPE
    return cls(n_batches, BATCH_SIZE, shape, **keras_kwargs)
