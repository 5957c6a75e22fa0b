"""``python -m compatmp bench``: compatmp against Keras' own workers and PyTorch's DataLoader.

Every configuration runs in its own fresh Python process, so no loader inherits another's
imports, forkserver or leaked workers; the parent only starts children and compares::

    parent: main()                                 child: python <launcher.py> '<spec JSON>'
      for each round (--repeats, default 3)          (launcher.py stands in for a user's
        for each workload (gil, bigbatch, images)     training script; for the first-batch
          for each section (loader, fit, lock)        runs it does `import tensorflow` at
            for each configuration  -- spec -->       the top, as such scripts do)
              (subprocess, own session, timeout)   child_main(): build the dataset, warm up
                                                   once (a short epoch through a loader),
                                   <-- one JSON --  then time one fresh loader for two
                                       line         epochs; a sampler *process* records the
      per-round ratios to that round's serial row;  worker processes' peak RSS (psutil)
      medians; Markdown table, JSON, PNG, verdicts

Sections: ``loader`` iterates batches through each loader with nothing else running;
``fit`` drives ``model.fit`` (a trivial model) through Keras' workers and through
:func:`compatmp.fit`; ``lock`` shows which loaders can ship a dataset that holds a
``threading.Lock`` to ``spawn`` workers (one round); ``first_batch`` times the first batch
of the first loader in a fresh process whose script imported TensorFlow at the top (one
discarded warm-up process, then one process per round).

NOTE [ Timing on a shared machine ]
The load of a shared machine drifts within minutes, and with it the CPU time a batch costs
(the same pure-Python batch took 25 ms or 44 ms of CPU an hour apart on the 2-vCPU VM this was
written on). So the configurations run in *rounds*: each round runs every configuration once,
each ``x serial`` ratio is taken between runs of the same round, and the table shows the
median over rounds (times: median over rounds too). The load average at the start and end of
the run, and of every child, is in the JSON. "cold first batch" is the first loader of a fresh
process (imports, forkserver start-up and all); "first batch" is the timed loader's, after the
warm-up in the same process.

NOTE [ How Keras 3 runs PyDataset workers ]
Read in ``keras/src/trainers/data_adapters/py_dataset_adapter.py`` (Keras 3.15):
``PyDatasetAdapter`` starts an ``OrderedEnqueuer`` when ``workers > 1`` or
``use_multiprocessing``. ``on_epoch_begin`` calls ``enqueuer.start()``, whose thread creates a
**new** ``multiprocessing.Pool(workers, initializer=init_pool_generator,
initargs=(_SHARED_SEQUENCES, None, worker_id_queue))`` every epoch, from the *global default*
context (so ``multiprocessing.set_start_method`` picks fork or spawn), and
``on_epoch_end`` stops it (``closing(pool)``: ``close()``, never joined). Under spawn the
whole ``_SHARED_SEQUENCES`` dict - every PyDataset of this process's enqueuers - is pickled
with plain ``pickle`` for each worker at every epoch, and each worker re-runs the user's
``__main__`` (spawn's ``init_main_from_path``) before unpickling it; a ``PyDataset`` subclass
also imports Keras, hence TensorFlow, in every worker. Each batch is one
``pool.apply_async(get_index, (uid, i))``; its result comes back pickled through the pool's
result pipe (a 19 MB batch is pickled, written, read and unpickled). With threads
(``multiprocessing.dummy.Pool``) nothing is copied. The loader section drives exactly this
class (``PyDatasetAdapter``) with ``on_epoch_begin``/``get_numpy_iterator``/``on_epoch_end``,
the calls ``model.fit`` makes.

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

import argparse
import contextlib
import json
import math
import multiprocessing
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "BigBatchDataset",
    "GilDataset",
    "LockedGilDataset",
    "child_main",
    "main",
]

# ---------------------------------------------------------------------------------------------
# Constants (each interval says why its value)
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

#: Batches of the ``lock`` section's runs: enough for every worker to load a few.
LOCK_BATCHES = 8

#: How often the sampler process reads the worker processes' memory (seconds). Workers live for
#: an epoch or more and their RSS plateaus after loading the dataset, so 0.1 s sees the peak;
#: faster sampling would spend a visible share of a shared 2-core machine on /proc reads.
RSS_SAMPLE_INTERVAL = 0.1

#: How long the memory sampler process may take to start or to stop (seconds): it imports
#: psutil and NumPy (~0.3 s idle, a few seconds on a loaded machine).
SAMPLER_START_TIMEOUT = 20.0

#: Longest a single configuration's child process may run (seconds; ``--timeout``). Keras'
#: spawn rows restart TensorFlow-importing workers every epoch (~5-10 s each on 2 busy cores)
#: for a warm-up epoch and 2 timed epochs, plus TensorFlow in the child: ~60 s; 600 s is 10x
#: that, and a hang ends as "timeout" instead of stalling the run.
DEFAULT_CHILD_TIMEOUT = 600.0

#: How long to wait for a killed child's pipes to close after a timeout (seconds).
KILL_GRACE = 10.0

#: Queue depth of every loader (Keras' and compatmp's ``max_queue_size`` default).
QUEUE_DEPTH = 10

#: Epochs per lifecycle: the second one shows whether workers persist (no restart cost).
EPOCHS = 2

#: Tolerance of the "epoch 2 no slower than epoch 1" verdict: 5 % covers timer and load noise.
EPOCH_TOLERANCE = 1.05

#: Prefix of the one stdout line a child prints with its result.
RESULT_MARKER = "COMPATMP_BENCH_RESULT "

WORKLOADS = ("gil", "bigbatch", "images")
SECTIONS = ("loader", "fit", "lock", "first_batch")

MB = 1e6

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
    scales them to float32 and normalizes each channel (ImageNet mean and standard
    deviation; ~4 ms per batch); returns ``(x, y)`` with ``y`` int32 labels.
    ``on_epoch_end`` reshuffles the batch order.
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
        first = int(self.order[index]) * self.batch_size
        rows = np.arange(first, first + self.batch_size) % BIG_DISTINCT
        x = self.images[rows].astype(np.float32)
        x *= np.float32(1.0 / 255.0)
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
    from . import _demo
    from ._serialize import PickleSafeMixin

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


# ---------------------------------------------------------------------------------------------
# Configurations
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Config:
    """One row: which library loads the batches, how, and with which dataset class."""

    section: str  # loader | fit | lock | first_batch
    name: str
    library: str  # serial | keras | torch | compatmp
    method: str | None  # start method (None: serial or Keras threads)
    processes: bool


def _installed(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def _configs(section: str, workload: str, methods: list[str], have: dict[str, bool]) -> list:
    """The configurations of one section, in table order."""
    c = _Config
    rows: list[_Config] = []
    keras_mp = [m for m in ("fork", "spawn") if m in methods]
    if section == "loader":
        rows.append(c(section, "serial", "serial", None, False))
        if have["keras"]:
            rows.append(c(section, "keras-threads", "keras", None, False))
            rows += [c(section, f"keras-mp-{m}", "keras", m, True) for m in keras_mp]
        if have["torch"]:
            rows += [c(section, f"torch-{m}", "torch", m, True) for m in keras_mp]
        rows += [c(section, f"compatmp-{m}", "compatmp", m, True) for m in methods]
        rows.append(c(section, "compatmp-thread", "compatmp", "thread", False))
        rows.append(c(section, "compatmp-auto", "compatmp", "auto", True))
    elif section == "fit" and have["keras"]:
        rows.append(c(section, "fit-serial", "serial", None, False))
        rows.append(c(section, "fit-keras-threads", "keras", None, False))
        rows += [c(section, f"fit-keras-mp-{m}", "keras", m, True) for m in keras_mp]
        rows.append(c(section, "fit-compatmp-auto", "compatmp", "auto", True))
        if workload != "images":  # the demo's dataset has no plain (non-Keras) class
            rows.append(c(section, "fit-compatmp-auto-plain", "compatmp", "auto", True))
        if "spawn" in methods:
            rows.append(c(section, "fit-compatmp-spawn", "compatmp", "spawn", True))
        rows.append(c(section, "fit-compatmp-thread", "compatmp", "thread", False))
    elif section == "lock" and workload in ("gil", "images"):
        if have["keras"]:
            rows += [c(section, f"lock-keras-mp-{m}", "keras", m, True) for m in keras_mp]
        if have["torch"] and "spawn" in methods:
            rows.append(c(section, "lock-torch-spawn", "torch", "spawn", True))
        if "spawn" in methods:
            rows.append(c(section, "lock-compatmp-spawn", "compatmp", "spawn", True))
        rows.append(c(section, "lock-compatmp-auto", "compatmp", "auto", True))
    elif section == "first_batch" and workload == "gil":
        spawnlike = [m for m in ("spawn", "forkserver") if m in methods]
        rows += [c(section, f"first-compatmp-{m}", "compatmp", m, True) for m in spawnlike]
        rows.append(c(section, "first-compatmp-auto", "compatmp", "auto", True))
        if have["keras"]:
            rows += [
                c(section, f"first-compatmp-{m}-pydataset", "compatmp", m, True) for m in spawnlike
            ]
            rows += [
                c(section, f"first-compatmp-{m}-pydataset-script", "compatmp", m, True)
                for m in spawnlike
            ]
            if "spawn" in methods:
                rows.append(c(section, "first-keras-mp-spawn", "keras", "spawn", True))
        if have["torch"] and "spawn" in methods:
            rows.append(c(section, "first-torch-spawn", "torch", "spawn", True))
    return rows


def _dataset_class_name(cfg: _Config, workload: str) -> str:
    """Which dataset class a configuration gets (see NOTE [ Benchmark datasets ])."""
    if cfg.name.endswith("-pydataset-script"):
        return "ScriptKerasGilDataset"
    keras_class = cfg.library == "keras" or cfg.name.endswith("-pydataset")
    keras_class |= cfg.section == "fit" and not cfg.name.endswith("-plain")
    if workload == "images":
        if cfg.section != "lock" and cfg.method == "spawn" and cfg.library in ("keras", "torch"):
            return "PicklableDigitsDataset"
        return "DigitsDataset"
    base = {"gil": "GilDataset", "bigbatch": "BigBatchDataset"}[workload]
    if cfg.section == "lock":
        base = "LockedGilDataset"
    return f"Keras{base}" if keras_class else base


# ---------------------------------------------------------------------------------------------
# Child side: one configuration in a fresh process
# ---------------------------------------------------------------------------------------------


def _now() -> float:
    return time.perf_counter()


def _loadavg() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (AttributeError, OSError):  # not offered on every OS
        return None


def _make_dataset(spec: dict[str, Any], n_batches: int) -> Any:
    """Build the configuration's dataset with ``n_batches`` batches (outside any timing)."""
    name = spec["dataset"]
    quick = spec["quick"]
    keras_kwargs: dict[str, Any] = {}
    if spec["library"] == "keras":  # Keras' own workers are configured on the PyDataset
        keras_kwargs = {"workers": spec["workers"], "use_multiprocessing": spec["processes"]}
    if name in ("DigitsDataset", "PicklableDigitsDataset"):
        from . import _demo

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


class _Lifecycle:
    """Timestamps of one loader lifecycle: start, first batch, end of each epoch, close."""

    def __init__(self) -> None:
        self.t0 = _now()
        self.first: float | None = None
        self.ends: list[float] = []
        self.counts: list[int] = []
        self._count = 0
        self.closed: float | None = None
        self.decision: dict[str, str] | None = None

    def batch(self) -> None:
        if self.first is None:
            self.first = _now()
        self._count += 1

    def epoch_end(self) -> None:
        self.ends.append(_now())
        self.counts.append(self._count)
        self._count = 0

    def result(self) -> dict[str, Any]:
        starts = [self.t0, *self.ends[:-1]]
        return {
            "first_batch_s": None if self.first is None else self.first - self.t0,
            "epochs_s": [end - start for start, end in zip(starts, self.ends, strict=True)],
            "close_s": self.closed - self.ends[-1] if self.closed and self.ends else None,
            "batches": self.counts,
            "decision": self.decision,
        }


def _run_serial(ds: Any, epochs: int, first_only: bool) -> dict[str, Any]:
    life = _Lifecycle()
    for epoch in range(epochs):
        if epoch:
            ds.on_epoch_end()
        for i in range(len(ds)):
            ds[i]
            life.batch()
            if first_only:
                break
        life.epoch_end()
    ds.on_epoch_end()
    life.closed = _now()
    return life.result()


def _run_compatmp(ds: Any, workers: int, method: str, epochs: int, first_only: bool) -> dict:
    from ._pool import OrderedPool

    life = _Lifecycle()
    pool = OrderedPool(ds, workers=workers, start_method=method, max_queue_size=QUEUE_DEPTH)
    try:
        life.decision = {"method": pool.decision.method, "reason": pool.decision.reason}
        for epoch in range(epochs):
            if epoch:
                ds.on_epoch_end()
                pool.update_dataset(ds)
            for _batch in pool.imap(range(len(ds))):
                life.batch()
                if first_only:
                    break
            life.epoch_end()
        ds.on_epoch_end()
    finally:
        pool.close()
    life.closed = _now()
    return life.result()


def _run_keras(ds: Any, epochs: int, first_only: bool) -> dict[str, Any]:
    # The adapter model.fit builds for a PyDataset (NOTE [ How Keras 3 runs PyDataset workers ]).
    from keras.src.trainers.data_adapters.py_dataset_adapter import PyDatasetAdapter

    life = _Lifecycle()
    adapter = PyDatasetAdapter(ds, shuffle=False)
    began = False
    try:
        for epoch in range(epochs):
            if epoch:
                adapter.on_epoch_end()
                began = False
            adapter.on_epoch_begin()
            began = True
            for _batch in adapter.get_numpy_iterator():
                life.batch()
                if first_only:
                    break
            life.epoch_end()
    finally:
        if began:
            adapter.on_epoch_end()
    life.closed = _now()
    return life.result()


def _run_torch(ds: Any, workers: int, method: str, epochs: int, first_only: bool) -> dict:
    from torch.utils.data import DataLoader

    life = _Lifecycle()
    loader = DataLoader(
        ds,
        batch_size=None,  # the dataset returns whole batches
        shuffle=False,
        num_workers=workers,
        multiprocessing_context=method,
        persistent_workers=True,
        prefetch_factor=max(2, math.ceil(QUEUE_DEPTH / workers)),
    )
    try:
        for epoch in range(epochs):
            if epoch:
                ds.on_epoch_end()  # reaches the main copy only: workers persist
            for _batch in loader:
                life.batch()
                if first_only:
                    break
            life.epoch_end()
        ds.on_epoch_end()
    finally:
        iterator = getattr(loader, "_iterator", None)
        if iterator is not None and hasattr(iterator, "_shutdown_workers"):
            iterator._shutdown_workers()
    life.closed = _now()
    return life.result()


def _trivial_model(workload: str, spec: dict[str, Any]) -> Any:
    """A compiled model whose step costs far less than loading a batch."""
    import keras

    if workload == "gil":
        shape: tuple[int, ...] = (GIL_FEATURES,)
    elif workload == "bigbatch":
        shape = QUICK_BIG_SHAPE if spec["quick"] else BIG_SHAPE
    else:
        shape = (spec["image_size"], spec["image_size"], 1)
    inputs = keras.Input(shape)
    pooled = keras.layers.GlobalAveragePooling2D()(inputs) if len(shape) == 3 else inputs
    outputs = keras.layers.Dense(10)(pooled)
    model = keras.Model(inputs, outputs)
    model.compile(
        optimizer="sgd", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    )
    return model


def _fit_runner(spec: dict[str, Any]) -> Any:
    import logging

    import keras

    model = _trivial_model(spec["workload"], spec)
    messages: list[str] = []

    class _Capture(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            messages.append(record.getMessage())

    log = logging.getLogger("compatmp")
    log.addHandler(_Capture(logging.INFO))
    log.setLevel(logging.INFO)

    def run(ds: Any, epochs: int, first_only: bool) -> dict[str, Any]:
        life = _Lifecycle()

        class _Clock(keras.callbacks.Callback):
            def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
                life.batch()

            def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
                life.epoch_end()

        del messages[:]
        if spec["library"] == "compatmp":
            from ._keras import fit

            fit(
                model,
                ds,
                workers=spec["workers"],
                start_method=spec["method"],
                max_queue_size=QUEUE_DEPTH,
                epochs=epochs,
                verbose=0,
                callbacks=[_Clock()],
            )
            if messages:
                life.decision = {"method": _method_from_log(messages[-1]), "reason": messages[-1]}
        else:
            model.fit(ds, epochs=epochs, verbose=0, callbacks=[_Clock()])
        life.closed = _now()
        life.first = None  # Keras pulls the first batch inside its first step: not comparable
        return life.result()

    return run


def _method_from_log(message: str) -> str:
    if "worker thread" in message:
        return "thread"
    marker = "started with "
    if marker in message:
        return message.split(marker, 1)[1].split(";")[0].strip()
    return "?"


def _runner(spec: dict[str, Any]) -> Any:
    """``run(dataset, epochs, first_only) -> lifecycle dict`` for the configuration."""
    if spec["section"] == "fit":
        return _fit_runner(spec)
    library, workers, method = spec["library"], spec["workers"], spec["method"]
    if library == "serial":
        return _run_serial
    if library == "keras":
        return _run_keras
    if library == "torch":
        return lambda ds, epochs, first_only: _run_torch(ds, workers, method, epochs, first_only)
    return lambda ds, epochs, first_only: _run_compatmp(ds, workers, method, epochs, first_only)


class _RssSampler:
    """Peak memory of this process's worker processes, read by a separate sampler process.

    A process, not a thread: a sampler thread would make this process multi-threaded, which
    changes the very decision ``start_method="auto"`` makes (fork becomes forkserver) and
    risks forking while that thread holds a lock (an import lock held at fork time deadlocked
    a forked worker in the first version of this benchmark). Use as a context manager; the
    peaks are in :attr:`peak_rss`, :attr:`peak_uss` and :attr:`peak_own` (RSS without
    shared-memory pages) in bytes by pid after it exits.
    """

    def __init__(self, interval: float = RSS_SAMPLE_INTERVAL) -> None:
        self.interval = interval
        self.peak_rss: dict[int, int] = {}
        self.peak_uss: dict[int, int] = {}
        self.peak_own: dict[int, int] = {}
        self._dir: tempfile.TemporaryDirectory | None = None
        self._proc: subprocess.Popen | None = None

    def __enter__(self) -> _RssSampler:
        self._dir = tempfile.TemporaryDirectory(prefix="compatmp-bench-rss-")
        base = Path(self._dir.name)
        code = "from compatmp._bench import _sampler_main; _sampler_main()"
        args = [str(os.getpid()), str(self.interval), str(base / "stop"), str(base / "out.json")]
        self._proc = subprocess.Popen(
            [sys.executable, "-c", code, *args], stdin=subprocess.DEVNULL, env=_child_env()
        )
        deadline = _now() + SAMPLER_START_TIMEOUT
        while not (base / "ready").exists() and _now() < deadline:
            if self._proc.poll() is not None:
                break  # it failed to start: no peaks, the benchmark goes on
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._dir is not None and self._proc is not None
        base = Path(self._dir.name)
        (base / "stop").touch()
        try:
            self._proc.wait(timeout=SAMPLER_START_TIMEOUT)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait(timeout=KILL_GRACE)
        with contextlib.suppress(OSError, ValueError):
            data = json.loads((base / "out.json").read_text(encoding="utf-8"))
            self.peak_rss = {int(k): v for k, v in data["rss"].items()}
            self.peak_uss = {int(k): v for k, v in data["uss"].items()}
            self.peak_own = {int(k): v for k, v in data.get("own", {}).items()}
        self._dir.cleanup()


def _sampler_main(argv: list[str] | None = None) -> None:
    """Sampler process: record peak RSS/USS of ``root``'s worker processes until told to stop.

    Args:
        argv (list[str] | None): ``root_pid interval_s stop_path out_path`` (default: None,
            meaning ``sys.argv[1:]``). Stops when ``stop_path`` exists or ``root_pid`` is
            gone; writes ``{"rss": {pid: bytes}, "uss": {pid: bytes}}`` to ``out_path``.
    """
    import psutil

    root_pid, interval, stop_path, out_path = (sys.argv[1:] if argv is None else argv)[:4]
    root = psutil.Process(int(root_pid))
    me = os.getpid()
    rss: dict[int, int] = {}
    uss: dict[int, int] = {}
    own: dict[int, int] = {}  # RSS without shared-memory pages (compatmp's batch blocks)
    Path(out_path).with_name("ready").touch()
    while not os.path.exists(stop_path) and root.is_running():
        try:
            children = root.children(recursive=True)
        except psutil.Error:
            children = []
        for proc in children:
            try:
                if proc.pid == me or _is_helper(proc):
                    continue
                info = proc.memory_full_info()
            except (psutil.Error, OSError):
                continue
            rss[proc.pid] = max(rss.get(proc.pid, 0), info.rss)
            uss[proc.pid] = max(uss.get(proc.pid, 0), getattr(info, "uss", 0))
            own[proc.pid] = max(own.get(proc.pid, 0), info.rss - _rss_shmem(proc.pid))
        time.sleep(float(interval))
    tmp = out_path + ".tmp"
    Path(tmp).write_text(json.dumps({"rss": rss, "uss": uss, "own": own}), encoding="utf-8")
    os.replace(tmp, out_path)


def _rss_shmem(pid: int) -> int:
    """Resident shared-memory pages of ``pid`` in bytes (``RssShmem``, Linux >= 4.5), else 0.

    compatmp's workers hand batches over in shared-memory blocks; those pages count in the
    RSS of the worker *and* of the main process. RSS minus this is the worker's own memory.
    """
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("RssShmem:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _cmdline(proc: Any) -> str:
    import psutil

    try:
        return " ".join(proc.cmdline()) if proc is not None else ""
    except psutil.Error:
        return ""


def _is_helper(proc: Any) -> bool:
    """multiprocessing's forkserver and resource tracker, which are not workers.

    Workers forked by the forkserver share its command line; they are told apart by their
    parent, the forkserver itself.
    """
    cmd = _cmdline(proc)
    if "multiprocessing.resource_tracker" in cmd:
        return True
    if "multiprocessing.forkserver" in cmd:
        return "multiprocessing.forkserver" not in _cmdline(proc.parent())
    return False


def _error_text(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip().splitlines()
    line = text[0] if text else type(exc).__name__
    return line[:300]


def _run_spec(spec: dict[str, Any]) -> dict[str, Any]:
    """Run one configuration as ``spec`` describes; never raises for a loader's failure."""
    if spec["library"] == "keras" and spec["method"] is not None:
        # Keras' Pool comes from the global default context (NOTE [ How Keras 3 runs ... ]).
        multiprocessing.set_start_method(spec["method"], force=True)
    out: dict[str, Any] = {"status": "ok", "error": None, "runs": [], "warmup": None}
    try:
        run = _runner(spec)
        batches = spec["batches"]
        if spec["section"] == "first_batch":
            ds = _make_dataset(spec, batches)
            out["runs"].append(run(ds, 1, True))
            return out
        if spec["warmup"]:
            warm = _make_dataset(spec, min(batches, max(2, 2 * spec["workers"])))
            out["warmup"] = run(warm, 1, False)
        with _RssSampler() as sampler:
            for _ in range(spec["repeats"]):
                ds = _make_dataset(spec, batches)
                result = run(ds, spec["epochs"], False)
                if any(n != len(ds) for n in result["batches"]):
                    raise RuntimeError(
                        f"expected {len(ds)} batches per epoch, got {result['batches']}"
                    )
                out["runs"].append(result)
        out["peak_rss_bytes"] = max(sampler.peak_rss.values(), default=None)
        out["peak_uss_bytes"] = max(sampler.peak_uss.values(), default=None)
        out["peak_own_bytes"] = max(sampler.peak_own.values(), default=None)
        out["worker_pids_seen"] = len(sampler.peak_rss)
    except Exception as exc:
        out["status"] = "fails"
        out["error"] = _error_text(exc)
    return out


def child_main(argv: list[str] | None = None) -> int:
    """Entry point of a benchmark child process: run one configuration, print its result.

    Args:
        argv (list[str] | None): one argument, the configuration as JSON (the parent writes
            it; keys ``section``, ``workload``, ``config``, ``library``, ``method``,
            ``processes``, ``dataset``, ``workers``, ``repeats``, ``batches``, ``epochs``,
            ``warmup``, ``quick``, ``image_size``) (default: None, meaning ``sys.argv[1:]``).

    Returns:
        int: 0; a loader that fails is reported in the result (``"status": "fails"``), and
        the one line starting with :data:`RESULT_MARKER` on stdout holds the JSON result.

    Raises:
        ValueError: ``argv`` is not exactly one JSON object.
    """
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        raise ValueError(f"child_main takes one JSON argument, got {len(argv)}: {argv!r}")
    spec = json.loads(argv[0])
    if not isinstance(spec, dict):
        raise ValueError(f"child_main needs a JSON object, got {type(spec).__name__}")
    start_load = _loadavg()
    started = _now()
    result = _run_spec(spec)
    result["child_wall_s"] = _now() - started
    result["loadavg_start"] = start_load
    result["loadavg_end"] = _loadavg()
    result["tensorflow_in_parent"] = "tensorflow" in sys.modules
    sys.stdout.write(RESULT_MARKER + json.dumps(result) + "\n")
    sys.stdout.flush()
    return 0


# ---------------------------------------------------------------------------------------------
# Parent side: start children, aggregate, report
# ---------------------------------------------------------------------------------------------

_LAUNCHER = '''"""Stand-in for a user's training script (spawn workers re-run it as __mp_main__)."""
{tf_import}import sys

from compatmp._bench import child_main

if __name__ == "__main__":
    sys.exit(child_main())
'''


def _write_launchers(directory: Path) -> dict[bool, Path]:
    """Launcher scripts: ``{False: plain, True: imports TensorFlow at the top}``."""
    out = {}
    for with_tf in (False, True):
        path = directory / ("train_tf.py" if with_tf else "train.py")
        tf_import = "import tensorflow  # noqa: F401 - as training scripts do\n" if with_tf else ""
        path.write_text(_LAUNCHER.format(tf_import=tf_import), encoding="utf-8")
        out[with_tf] = path
    return out


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("COMPATMP_START_METHOD", None)  # each row names its method; auto must mean auto
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    package_root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
    return env


def _kill_tree(proc: subprocess.Popen) -> None:
    """Kill a timed-out child and the workers it started (its own session)."""
    if hasattr(os, "killpg"):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, 9)  # SIGKILL; the child leads its own process group
    proc.kill()


def _run_child(launcher: Path, spec: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Run one configuration in a fresh interpreter; the result dict, or a failure record."""
    cmd = [sys.executable, str(launcher), json.dumps(spec)]
    proc = subprocess.Popen(
        cmd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=_child_env(),
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_tree(proc)
        try:
            proc.communicate(timeout=KILL_GRACE)
        except subprocess.TimeoutExpired:
            pass
        return {"status": "timeout", "error": f"no result within {timeout:.0f} s (killed)"}
    for line in stdout.splitlines():
        if line.startswith(RESULT_MARKER):
            return json.loads(line[len(RESULT_MARKER) :])
    tail = " | ".join(stderr.strip().splitlines()[-3:])[:300]
    return {"status": "error", "error": f"child exited with code {proc.returncode}: {tail}"}


def _median(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def _summarize(cfg: _Config, spec: dict[str, Any], result: dict[str, Any]) -> dict[str, Any]:
    """One table row from a configuration's merged results (medians over the rounds)."""
    runs = result.get("runs") or []
    row: dict[str, Any] = {
        "section": cfg.section,
        "config": cfg.name,
        "library": cfg.library,
        "method": cfg.method,
        "method_used": None,
        "workers": spec["workers"] if cfg.library != "serial" else None,
        "dataset": spec["dataset"],
        "status": result.get("status", "error"),
        "error": result.get("error"),
        "repeats": len(runs),
        "epoch1_s": None,
        "epoch2_s": None,
        "total_s": None,
        "first_batch_s": _median([r.get("first_batch_s") for r in runs]),
        "first_batch_all_s": [r.get("first_batch_s") for r in runs],
        "cold_first_batch_s": (result.get("warmup") or {}).get("first_batch_s"),
        "close_s": _median([r.get("close_s") for r in runs]),
        "peak_rss_mb": None,
        "peak_uss_mb": None,
        "peak_own_mb": None,
        "loadavg_start": result.get("loadavg_start"),
        "loadavg_end": result.get("loadavg_end"),
        "tensorflow_in_parent": result.get("tensorflow_in_parent"),
        "runs": runs,
    }
    epochs = [r["epochs_s"] for r in runs if r.get("epochs_s")]
    if epochs and len(epochs[0]) >= 2:
        row["epoch1_s"] = _median([e[0] for e in epochs])
        row["epoch2_s"] = _median([e[1] for e in epochs])
        row["total_s"] = _median([sum(e) for e in epochs])
    decisions = [r["decision"] for r in runs if r.get("decision")]
    if decisions:
        row["method_used"] = decisions[-1]["method"]
        row["decision_reason"] = decisions[-1]["reason"]
    elif cfg.library in ("keras", "torch"):
        row["method_used"] = cfg.method or "thread"
    if cfg.processes and result.get("peak_rss_bytes"):
        row["peak_rss_mb"] = result["peak_rss_bytes"] / MB
        row["peak_uss_mb"] = (result.get("peak_uss_bytes") or 0) / MB or None
        row["peak_own_mb"] = (result.get("peak_own_bytes") or 0) / MB or None
    return row


def _per_round(row: dict[str, Any], key: str) -> dict[int, float]:
    """``{round: seconds}`` of one metric (epoch1, epoch2 or total) of a row's runs."""
    out = {}
    for run in row.get("runs") or []:
        epochs = run.get("epochs_s") or []
        if len(epochs) >= 2:
            value = {"epoch1": epochs[0], "epoch2": epochs[1], "total": sum(epochs)}[key]
            out[run.get("round", 0)] = value
    return out


def _add_ratios(rows: list[dict[str, Any]]) -> None:
    """``x serial`` columns and efficiency, against the serial row of the same section.

    Each ratio is the median over rounds of ``serial time / this time`` within the same round,
    so a load change between rounds moves both sides of a ratio alike.
    """
    serial = next((r for r in rows if r["library"] == "serial" and r["status"] == "ok"), None)
    for row in rows:
        for key in ("epoch1", "epoch2", "total"):
            ratio = None
            if serial is not None and row["status"] == "ok":
                base, own = _per_round(serial, key), _per_round(row, key)
                common = [rnd for rnd in own if rnd in base and own[rnd] > 0]
                if common:
                    ratio = statistics.median(base[rnd] / own[rnd] for rnd in common)
            row[f"speedup_{key}"] = ratio
        workers = row["workers"] or 1
        total = row["speedup_total"]
        row["efficiency"] = None if total is None else total / workers


def _row_by(rows: list[dict[str, Any]], name: str) -> dict[str, Any] | None:
    return next((r for r in rows if r["config"] == name and r["status"] == "ok"), None)


def _time_ratio(slow: dict[str, Any], fast: dict[str, Any]) -> float | None:
    """Median over shared rounds of ``slow total / fast total`` (> 1: ``fast`` is faster)."""
    a, b = _per_round(slow, "total"), _per_round(fast, "total")
    common = [rnd for rnd in a if rnd in b and b[rnd] > 0]
    return statistics.median(a[rnd] / b[rnd] for rnd in common) if common else None


def _evaluate_targets(results: dict[str, Any], workers: int) -> list[dict[str, Any]]:
    """The issue's targets, each with the measured value and MET / NOT MET / not measured."""
    targets: list[dict[str, Any]] = []

    def add(name: str, measured: float | None, threshold: str, met: bool | None, detail: str):
        verdict = "not measured" if met is None else ("MET" if met else "NOT MET")
        targets.append(
            {
                "target": name,
                "measured": measured,
                "threshold": threshold,
                "verdict": verdict,
                "detail": detail,
            }
        )

    wl = results["workloads"]
    ours_rows = (
        ("loader", "compatmp-auto"),
        ("fit", "fit-compatmp-auto"),
        ("fit", "fit-compatmp-auto-plain"),
    )
    for section, name in ours_rows:
        rows = wl.get("gil", {}).get(section, [])
        ours = _row_by(rows, name)
        speed = ours and ours["speedup_total"]
        add(
            f"gil, {workers} workers: {name} vs serial",
            speed,
            ">= 1.7x",
            None if speed is None else speed >= 1.7,
            "two-epoch total, start-up included",
        )
        keras = [r for r in rows if r["library"] == "keras" and r["status"] == "ok"]
        best = min(keras, key=lambda r: r["total_s"], default=None)
        ratio = _time_ratio(best, ours) if best and ours else None
        add(
            f"gil: {name} vs Keras' best",
            ratio,
            ">= 1.5x",
            None if ratio is None else ratio >= 1.5,
            f"Keras' best: {best['config']}" if best else "no Keras row ran",
        )
    for section, name in ours_rows:
        prefix = "fit-" if section == "fit" else ""
        rows = wl.get("bigbatch", {}).get(section, [])
        ours = _row_by(rows, name)
        procs = [r for r in rows if r["library"] == "keras" and r["method"] and r["status"] == "ok"]
        best = min(procs, key=lambda r: r["total_s"], default=None)
        ratio = _time_ratio(best, ours) if best and ours else None
        add(
            f"bigbatch: {name} vs Keras' process workers",
            ratio,
            ">= 5x faster",
            None if ratio is None else ratio >= 5.0,
            f"Keras' fastest process row: {best['config']}" if best else "no Keras process row",
        )
        threads = _row_by(rows, f"{prefix}keras-threads")
        ratio = _time_ratio(ours, threads) if ours and threads else None
        add(
            f"bigbatch: {name} time / Keras threads time",
            ratio,
            "<= 1.3",
            None if ratio is None else ratio <= 1.3,
            "two-epoch totals",
        )
    slower = []
    checked = 0
    for name, sections in wl.items():
        for section in ("loader", "fit"):
            for r in sections.get(section, []):
                if r["library"] == "compatmp" and r["status"] == "ok" and r["epoch2_s"]:
                    checked += 1
                    if r["epoch2_s"] > r["epoch1_s"] * EPOCH_TOLERANCE:
                        slower.append(
                            f"{name}/{r['config']} ({r['epoch2_s']:.3f} s > {r['epoch1_s']:.3f} s)"
                        )
    add(
        "epoch 2 no slower than epoch 1 (every compatmp row)",
        float(checked - len(slower)) if checked else None,
        f"all {checked} rows, 5 % tolerance",
        None if not checked else not slower,
        "slower: " + "; ".join(slower) if slower else "rows passing shown as measured",
    )
    fb = results.get("first_batch", [])
    row = _row_by(fb, "first-compatmp-spawn")
    value = row and row["first_batch_s"]
    add(
        "first batch, spawn, TensorFlow imported in the parent",
        value,
        "<= 0.5 s",
        None if value is None else value <= 0.5,
        "median of fresh processes; plain (non-Keras) dataset class",
    )
    for key, title, note in (
        (
            "peak_rss_mb",
            "peak RSS per worker, dataset without TensorFlow (gil, bigbatch)",
            "; includes batches in shared-memory blocks, also counted in the main process",
        ),
        ("peak_own_mb", "same, without shared-memory batch blocks (RSS - RssShmem)", ""),
    ):
        over, peak = [], None
        for name in ("gil", "bigbatch"):
            for r in wl.get(name, {}).get("loader", []):
                mb = r.get(key)
                if r["library"] == "compatmp" and mb is not None:
                    peak = max(peak or 0.0, mb)
                    if mb > 200:
                        over.append(f"{name}/{r['config']} ({mb:.0f} MB)")
        add(
            title,
            peak,
            "<= 200 MB",
            None if peak is None else not over,
            ("over: " + "; ".join(over) if over else "largest compatmp worker shown") + note,
        )
    return targets


# -- rendering --------------------------------------------------------------------------------


def _fmt(value: Any, kind: str = "s") -> str:
    if value is None:
        return "n/a"
    if kind == "x":
        return f"{value:.2f}x"
    if kind == "mb":
        return f"{value:.0f}"
    if kind == "eff":
        return f"{value:.2f}"
    return f"{value:.3f}"


def _status(row: dict[str, Any]) -> str:
    if row["status"] == "ok":
        return "ok"
    return f"{row['status']}: {row['error']}".replace("|", "\\|")


def _method_cell(row: dict[str, Any]) -> str:
    method = row["method"]
    used = row.get("method_used")
    if method is None:
        return "thread" if row["library"] != "serial" else "main process"
    if method == "auto" and used:
        return f"auto -> {used}"
    if used and used != method:
        return f"{method} -> {used}"
    return method


def _table(headers: list[str], lines: list[list[str]]) -> str:
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(cells) + " |" for cells in lines]
    return "\n".join(out)


TIMING_COLUMNS = [
    "configuration",
    "dataset",
    "method",
    "workers",
    "epoch 1 (s)",
    "epoch 2 (s)",
    "x serial (epoch 1)",
    "x serial (epoch 2)",
    "x serial (total)",
    "efficiency",
    "first batch (s)",
    "cold first batch (s)",
    "peak RSS/worker (MB)",
    "without shm (MB)",
    "status",
]


def _timing_table(rows: list[dict[str, Any]]) -> str:
    lines = []
    for r in rows:
        lines.append(
            [
                r["config"],
                r["dataset"],
                _method_cell(r),
                "-" if r["workers"] is None else str(r["workers"]),
                _fmt(r["epoch1_s"]),
                _fmt(r["epoch2_s"]),
                _fmt(r.get("speedup_epoch1"), "x"),
                _fmt(r.get("speedup_epoch2"), "x"),
                _fmt(r.get("speedup_total"), "x"),
                _fmt(r.get("efficiency"), "eff"),
                _fmt(r["first_batch_s"]),
                _fmt(r["cold_first_batch_s"]),
                _fmt(r["peak_rss_mb"], "mb") if r["method_used"] != "thread" else "n/a",
                _fmt(r.get("peak_own_mb"), "mb") if r["method_used"] != "thread" else "n/a",
                _status(r),
            ]
        )
    return _table(TIMING_COLUMNS, lines)


def _lock_table(rows: list[dict[str, Any]]) -> str:
    headers = ["configuration", "dataset", "method", "total, 2 epochs (s)", "status"]
    lines = [
        [r["config"], r["dataset"], _method_cell(r), _fmt(r["total_s"]), _status(r)] for r in rows
    ]
    return _table(headers, lines)


def _first_batch_table(rows: list[dict[str, Any]]) -> str:
    headers = ["configuration", "dataset", "method", "median (s)", "min (s)", "max (s)", "status"]
    lines = []
    for r in rows:
        values = [v for v in r["first_batch_all_s"] if v is not None]
        lines.append(
            [
                r["config"],
                r["dataset"],
                _method_cell(r),
                _fmt(r["first_batch_s"]),
                _fmt(min(values) if values else None),
                _fmt(max(values) if values else None),
                _status(r),
            ]
        )
    return _table(headers, lines)


def _targets_table(targets: list[dict[str, Any]]) -> str:
    headers = ["target", "measured", "threshold", "verdict", "detail"]
    lines = []
    for t in targets:
        value = t["measured"]
        lines.append(
            [
                t["target"],
                "n/a" if value is None else f"{value:.3g}",
                t["threshold"],
                t["verdict"],
                t["detail"].replace("|", "\\|"),
            ]
        )
    return _table(headers, lines)


_SECTION_TITLES = {
    "loader": "loader only (two epochs through the loader)",
    "fit": "model.fit with a trivial model (two epochs)",
    "lock": "dataset holding a threading.Lock",
}


def _render(report: dict[str, Any]) -> str:
    meta = report["meta"]
    parts = [
        "## compatmp benchmark",
        "",
        f"Command: `{meta['command']}`  ",
        f"Python {meta['python']} on {meta['platform']}, {meta['cpu_count']} CPUs; "
        f"load average {meta['loadavg_start']} at start, {meta['loadavg_end']} at end; "
        f"{meta['repeats']} round(s), one fresh process per configuration per round, each "
        f"timing one loader after a warm-up; medians of per-round ratios to serial; "
        f"{meta['wall_s']:.0f} s.",
    ]
    for name, sections in report["workloads"].items():
        for section, rows in sections.items():
            if not rows:
                continue
            parts += ["", f"### {name}: {_SECTION_TITLES[section]}", ""]
            parts.append(_lock_table(rows) if section == "lock" else _timing_table(rows))
    if report["first_batch"]:
        parts += ["", "### Time to first batch, TensorFlow imported in the parent", ""]
        parts.append(_first_batch_table(report["first_batch"]))
    parts += ["", "### Targets", "", _targets_table(report["targets"]), ""]
    return "\n".join(parts)


def _plot(report: dict[str, Any], path: str) -> None:
    try:
        import matplotlib
    except ImportError as exc:
        raise SystemExit(
            "--plot needs matplotlib, which is not installed; install it with "
            "`pip install compatmp[bench]` (or `pip install matplotlib`), or drop --plot."
        ) from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        (name, section, rows)
        for name, sections in report["workloads"].items()
        for section, rows in sections.items()
        if section in ("loader", "fit") and rows
    ]
    if not panels:
        raise SystemExit("--plot: no timed rows to plot (the loader and fit sections did not run)")
    fig, axes = plt.subplots(len(panels), 1, figsize=(8, 0.35 * sum(len(p[2]) for p in panels) + 2))
    axes = np.atleast_1d(axes)
    for ax, (name, section, rows) in zip(axes, panels, strict=True):
        labels = [r["config"] for r in rows]
        values = [r.get("speedup_total") or 0.0 for r in rows]
        colors = [
            {"compatmp": "tab:green", "keras": "tab:orange", "torch": "tab:blue"}.get(
                r["library"], "tab:gray"
            )
            for r in rows
        ]
        ax.barh(labels, values, color=colors)
        ax.axvline(1.0, color="black", linewidth=0.8)
        ax.invert_yaxis()
        ax.set_title(f"{name}: {section} (x serial, two-epoch total; 0 = failed)", fontsize=9)
        ax.tick_params(labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# -- command line -----------------------------------------------------------------------------


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m compatmp bench",
        description=(
            "Benchmark compatmp against Keras' PyDataset workers and torch's DataLoader. Each "
            "configuration runs in a fresh process; prints a Markdown table."
        ),
    )
    p.add_argument("--workload", choices=[*WORKLOADS, "all"], default="all")
    p.add_argument("--workers", type=_positive_int, default=2, help="workers per loader (2)")
    p.add_argument(
        "--repeats",
        type=_positive_int,
        default=3,
        help="rounds: fresh timed processes per configuration, interleaved (3)",
    )
    p.add_argument(
        "--batches",
        type=_positive_int,
        default=None,
        help=f"batches per epoch (default per workload: {DEFAULT_BATCHES})",
    )
    p.add_argument(
        "--sections",
        default=",".join(SECTIONS),
        help=f"comma-separated subset of {','.join(SECTIONS)} (default: all)",
    )
    p.add_argument(
        "--configs",
        default=None,
        help="comma-separated configuration names to run (default: all; serial rows always run)",
    )
    p.add_argument(
        "--image-size",
        type=_positive_int,
        default=None,
        help=f"image side for the images workload, pixels ({IMAGES_DEFAULT_SIZE})",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help=f"smoke run: {QUICK_BATCHES} batches, 1 repeat, tiny arrays (no timing value)",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_CHILD_TIMEOUT,
        help=f"seconds one configuration may run before it is killed ({DEFAULT_CHILD_TIMEOUT:.0f})",
    )
    p.add_argument("--json", metavar="PATH", help="also write the full results as JSON")
    p.add_argument("--plot", metavar="PATH", help="also write a PNG bar chart (needs matplotlib)")
    return p


def _versions() -> dict[str, str | None]:
    from importlib import metadata

    out: dict[str, str | None] = {}
    for dist in ("numpy", "keras", "tensorflow-cpu", "tensorflow", "torch", "pillow"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark suite (``python -m compatmp bench``) and print a Markdown report.

    Args:
        argv (list[str] | None): command-line arguments (default: None, meaning
            ``sys.argv[1:]``); ``--help`` lists them.

    Returns:
        int: 0 when every child process reported a result (a loader that *fails* - e.g. Keras
        under spawn with a lock in the dataset - is a result), 1 when a child crashed or timed
        out.

    Raises:
        SystemExit: bad arguments (argparse), or ``--plot`` without matplotlib.
    """
    import platform

    from ._platform import available_methods

    args = _parser().parse_args(argv)
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown:
        _parser().error(f"--sections: unknown {unknown}; valid: {', '.join(SECTIONS)}")
    if args.timeout <= 0:
        _parser().error(f"--timeout must be > 0 seconds, got {args.timeout}")
    if args.plot:
        try:
            import matplotlib  # noqa: F401 - fail before an hour of benchmarking
        except ImportError:
            _parser().error(
                "--plot needs matplotlib: `pip install compatmp[bench]` or `pip install "
                "matplotlib`, or drop --plot"
            )
    workloads = list(WORKLOADS) if args.workload == "all" else [args.workload]
    wanted = None if args.configs is None else {c.strip() for c in args.configs.split(",")}
    methods = available_methods()
    have = {"keras": _installed("keras"), "torch": _installed("torch")}
    if "images" in workloads and not (have["keras"] and _installed("PIL")):
        _parser().error("the images workload needs the keras and demo extras (keras, pillow)")
    repeats = 1 if args.quick else args.repeats
    image_size = args.image_size or (QUICK_IMAGE_SIZE if args.quick else IMAGES_DEFAULT_SIZE)

    plan: list[tuple[str, _Config, dict[str, Any]]] = []
    for workload in workloads:
        for section in sections:
            for cfg in _configs(section, workload, methods, have):
                baseline = cfg.library == "serial"
                if wanted is not None and cfg.name not in wanted and not baseline:
                    continue
                if section == "lock":
                    batches = QUICK_BATCHES if args.quick else LOCK_BATCHES
                else:
                    default = QUICK_BATCHES if args.quick else DEFAULT_BATCHES[workload]
                    batches = args.batches or default
                spec = {
                    "section": section,
                    "workload": workload,
                    "config": cfg.name,
                    "library": cfg.library,
                    "method": cfg.method,
                    "processes": cfg.processes,
                    "dataset": _dataset_class_name(cfg, workload),
                    "workers": args.workers,
                    "repeats": 1,  # one timed lifecycle per child; rounds repeat it
                    "batches": batches,
                    "epochs": EPOCHS,
                    "warmup": section in ("loader", "fit"),
                    "quick": args.quick,
                    "image_size": image_size,
                }
                plan.append((workload, cfg, spec))
    if wanted is not None:
        known = {
            cfg.name
            for workload in WORKLOADS
            for section in SECTIONS
            for cfg in _configs(section, workload, methods, {"keras": True, "torch": True})
        }
        unknown_configs = sorted(wanted - known)
        if unknown_configs:
            _parser().error(
                f"--configs: unknown {unknown_configs}; valid names: {', '.join(sorted(known))}"
            )
    if not plan:
        _parser().error("nothing to run: check --workload, --sections and --configs")

    started = time.time()
    meta = {
        "command": "python -m compatmp bench " + " ".join(sys.argv[1:] if argv is None else argv),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "workers": args.workers,
        "repeats": repeats,
        "image_size": image_size,
        "available_methods": methods,
        "versions": _versions(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)),
        "loadavg_start": _loadavg(),
    }
    report: dict[str, Any] = {"meta": meta, "workloads": {}, "first_batch": []}
    collected: list[list[dict[str, Any]]] = [[] for _ in plan]
    with tempfile.TemporaryDirectory(prefix="compatmp-bench-") as tmp:
        launchers = _write_launchers(Path(tmp))
        # NOTE: rounds, not back-to-back repeats: on a shared machine the load drifts within
        # minutes, so each round runs every configuration once, and ratios are taken within a
        # round (see _add_ratios).
        for rnd in range(repeats):
            for k, (workload, cfg, spec) in enumerate(plan):
                if cfg.section == "lock" and rnd:
                    continue  # pass or fail: one round says it
                launcher = launchers[cfg.section == "first_batch"]
                if cfg.section == "first_batch" and rnd == 0:
                    _run_child(launcher, spec, args.timeout)  # warm-up: discarded
                result = _run_child(launcher, spec, args.timeout)
                for run in result.get("runs") or []:
                    run["round"] = rnd
                collected[k].append(result)
                shown = _shown_time(result)
                sys.stderr.write(
                    f"[round {rnd + 1}/{repeats}, {k + 1}/{len(plan)}] {workload} {cfg.section} "
                    f"{cfg.name}: {result.get('status')}"
                    f"{'' if shown is None else f' {shown:.3f} s'}\n"
                )
                sys.stderr.flush()
    crashed = False
    for (workload, cfg, spec), results in zip(plan, collected, strict=True):
        result = _merge_rounds(results)
        crashed |= result.get("status") in ("error", "timeout")
        row = _summarize(cfg, spec, result)
        if cfg.section == "first_batch":
            report["first_batch"].append(row)
        else:
            report["workloads"].setdefault(workload, {}).setdefault(cfg.section, []).append(row)
    for sections_out in report["workloads"].values():
        for rows in sections_out.values():
            _add_ratios(rows)
    meta["loadavg_end"] = _loadavg()
    meta["wall_s"] = time.time() - started
    report["targets"] = _evaluate_targets(report, args.workers)
    sys.stdout.write(_render(report) + "\n")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1, default=_jsonable) + "\n")
    if args.plot:
        _plot(report, args.plot)
    return 1 if crashed else 0


def _shown_time(result: dict[str, Any]) -> float | None:
    runs = result.get("runs") or []
    if not runs:
        return None
    epochs = runs[0].get("epochs_s") or []
    return sum(epochs) if len(epochs) >= 2 else runs[0].get("first_batch_s")


def _merge_rounds(results: list[dict[str, Any]]) -> dict[str, Any]:
    """One result from a configuration's children (one per round): all runs, worst status."""
    if not results:
        return {"status": "error", "error": "no child ran", "runs": []}
    failed = [r for r in results if r.get("status") != "ok"]
    merged = dict(failed[0] if failed else results[-1])
    merged["runs"] = [run for r in results for run in r.get("runs") or []]
    merged["warmup"] = results[0].get("warmup")
    for key in ("peak_rss_bytes", "peak_uss_bytes", "peak_own_bytes"):
        values = [r[key] for r in results if r.get(key)]
        merged[key] = max(values) if values else None
    merged["loadavg_start"] = results[0].get("loadavg_start")
    merged["loadavg_end"] = results[-1].get("loadavg_end")
    return merged


def _jsonable(obj: Any) -> Any:
    if hasattr(obj, "__dataclass_fields__"):
        return asdict(obj)
    return str(obj)
