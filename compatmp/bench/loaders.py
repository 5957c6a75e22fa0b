"""The loaders under test, each driven the way its library is used, and timed.

A *lifecycle* is one loader over ``epochs`` epochs: its start, first batch, end of each epoch
and close are timestamped (:class:`_Lifecycle`). :func:`_runner` picks the driver of a
configuration: the serial loop, :class:`compatmp.OrderedPool`, Keras' own
``PyDatasetAdapter``, torch's ``DataLoader``, or ``model.fit`` (Keras' workers) against
:func:`compatmp.fit`. Keras and torch are imported only inside their drivers.

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
"""

from __future__ import annotations

import math
import time
from typing import Any

from .workloads import BIG_SHAPE, GIL_FEATURES, QUEUE_DEPTH, QUICK_BIG_SHAPE


def _now() -> float:
    return time.perf_counter()


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
    from .. import OrderedPool

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
            from .. import fit

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
