"""A Keras-free stand-in for ``keras.utils.PyDataset``, for datasets sent by value.

NOTE [ PyDataset stand-in ]
Most users define their dataset in their training script::

    class Images(keras.utils.PyDataset):      # in __main__
        def __getitem__(self, i): ...

cloudpickle sends such a class *by value* (it cannot be imported by name in a child), but
its base classes by reference, so unpickling it in a worker imports ``keras`` - and with it
TensorFlow: 3-6 s and ~570 MB per spawn worker, measured in ``benchmarks/RESULTS.md``, for a
base class whose worker-side behaviour is six attributes and two empty hooks. compatmp's
pickler therefore rebuilds a by-value class that derives *directly* from
``keras.utils.PyDataset`` (alias ``keras.utils.Sequence``) on :class:`PyDatasetStandIn`
instead (``CompatPickler.reducer_override``). The stand-in copies the worker-side API of
Keras 3's ``PyDataset`` (``keras/src/trainers/data_adapters/py_dataset_adapter.py``):
``workers``, ``use_multiprocessing`` and ``max_queue_size`` with their setters,
``num_batches``, ``__iter__``, ``on_epoch_begin`` and ``on_epoch_end``.

What stays the same: every method the user wrote, the instance's attributes, ``super()``
calls into the base. What differs in the worker: ``isinstance(self, keras.utils.PyDataset)``
is False there. Code that needs Keras in the worker still gets it: a method that uses the
``keras`` module makes cloudpickle send that module by name, and the worker imports it.
Classes defined in an importable module would be pickled by reference (the worker imports
their module, hence Keras); for the pool's dataset pickle, compatmp sends such a module by
value instead, so the same stand-in applies (NOTE [ Workers without Keras ] in
:mod:`compatmp._by_value`). The main process never sees the stand-in: Keras gets the
user's own object.

Measured (this 2-core machine, TensorFlow imported in the parent, a ``PyDataset`` subclass
defined in ``__main__``, 2 spawn workers): first batch 3.5-4.4 s and 585 MB per worker with
Keras' base, 0.31-0.35 s and 37 MB with the stand-in.
"""

from __future__ import annotations

import itertools
import sys
from collections.abc import Iterator
from typing import Any

__all__ = ["PyDatasetStandIn", "keras_pydataset"]

# Where Keras 3 defines PyDataset (keras.utils.PyDataset and keras.utils.Sequence name it).
_KERAS_PYDATASET_MODULE = "keras.src.trainers.data_adapters.py_dataset_adapter"


def keras_pydataset() -> type | None:
    """``keras.utils.PyDataset`` if Keras 3 is already imported here, else None.

    Never imports Keras: a dataset can only derive from a class that is already loaded.

    Returns:
        type | None: the class, or None when Keras (3) is not imported.
    """
    module = sys.modules.get(_KERAS_PYDATASET_MODULE)
    cls = getattr(module, "PyDataset", None) if module is not None else None
    return cls if isinstance(cls, type) else None


class PyDatasetStandIn:
    """Worker-side base of a by-value ``PyDataset`` subclass; see NOTE [ PyDataset stand-in ].

    Same constructor and attributes as Keras 3's ``PyDataset``; nothing else.

    Args:
        workers (int): as in Keras (default: 1).
        use_multiprocessing (bool): as in Keras (default: False).
        max_queue_size (int): as in Keras (default: 10).
    """

    def __init__(
        self, workers: int = 1, use_multiprocessing: bool = False, max_queue_size: int = 10
    ) -> None:
        self._workers = workers
        self._use_multiprocessing = use_multiprocessing
        self._max_queue_size = max_queue_size

    @property
    def workers(self) -> int:
        """Workers the dataset asked Keras for (``__init__(workers=...)``)."""
        return getattr(self, "_workers", 1)

    @workers.setter
    def workers(self, value: int) -> None:
        self._workers = value

    @property
    def use_multiprocessing(self) -> bool:
        """Whether the dataset asked Keras for processes."""
        return getattr(self, "_use_multiprocessing", False)

    @use_multiprocessing.setter
    def use_multiprocessing(self, value: bool) -> None:
        self._use_multiprocessing = value

    @property
    def max_queue_size(self) -> int:
        """The dataset's prefetch queue size for Keras."""
        return getattr(self, "_max_queue_size", 10)

    @max_queue_size.setter
    def max_queue_size(self, value: int) -> None:
        self._max_queue_size = value

    def __getitem__(self, index: Any) -> Any:
        raise NotImplementedError

    def __iter__(self) -> Iterator[Any]:
        try:
            num_batches = self.num_batches
        except NotImplementedError:
            num_batches = None
        indices = range(num_batches) if num_batches is not None else itertools.count()
        for index in indices:
            yield self[index]

    @property
    def num_batches(self) -> int | None:
        """``len(self)``; raises NotImplementedError if the class defines neither."""
        if hasattr(self, "__len__"):
            return len(self)  # type: ignore[arg-type]
        raise NotImplementedError(
            "You need to implement the `num_batches` property:\n\n"
            "@property\ndef num_batches(self):\n  return ..."
        )

    def on_epoch_begin(self) -> None:
        """Called at the beginning of every epoch (does nothing)."""

    def on_epoch_end(self) -> None:
        """Called at the end of every epoch (does nothing)."""
