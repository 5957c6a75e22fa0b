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
is False there.

Keras 2's ``Sequence`` (``tf.keras.utils.Sequence`` under TensorFlow <= 2.15 or
``TF_USE_LEGACY_KERAS=1``, ``tf_keras.utils.Sequence``) gets the same treatment with
:class:`SequenceStandIn`: its module, ``tf_keras/src/utils/data_utils.py``, imports TensorFlow
at module level, so without the swap every spawn worker of a script-defined ``Sequence``
imports tf_keras and TensorFlow (issue 18: 11.4 s for a one-epoch fit of 8 tiny batches).
:func:`keras_dataset_bases` lists the loaded Keras base classes and their stand-ins.

Code that needs Keras in the worker still gets it: a method that uses the
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

__all__ = [
    "Constant",
    "ModuleStandIn",
    "PyDatasetStandIn",
    "SequenceStandIn",
    "keras_dataset_bases",
    "keras_pydataset",
]

# Where Keras 3 defines PyDataset (keras.utils.PyDataset and keras.utils.Sequence name it).
_KERAS_PYDATASET_MODULE = "keras.src.trainers.data_adapters.py_dataset_adapter"

# Where Keras 2 defines Sequence (tf.keras.utils.Sequence, tf_keras.utils.Sequence): tf_keras
# 2.x, TensorFlow 2.13-2.15's built-in Keras 2, TensorFlow 2.12's. Keras 3 has none of them.
_KERAS2_SEQUENCE_MODULES = (
    "tf_keras.src.utils.data_utils",
    "keras.src.utils.data_utils",
    "keras.utils.data_utils",
)


def keras_pydataset() -> type | None:
    """``keras.utils.PyDataset`` if Keras 3 is already imported here, else None.

    Never imports Keras: a dataset can only derive from a class that is already loaded.

    Returns:
        type | None: the class, or None when Keras (3) is not imported.
    """
    module = sys.modules.get(_KERAS_PYDATASET_MODULE)
    cls = getattr(module, "PyDataset", None) if module is not None else None
    return cls if isinstance(cls, type) else None


def keras_dataset_bases() -> dict[type, type]:
    """Keras' dataset base classes already imported here, each with its Keras-free stand-in.

    Keras 3's ``PyDataset`` maps to :class:`PyDatasetStandIn`; Keras 2's ``Sequence`` (each
    loaded copy: tf_keras, TensorFlow 2.12-2.15's ``keras``) to :class:`SequenceStandIn`.
    Never imports Keras.

    Returns:
        dict[type, type]: ``{keras_class: stand_in}``; empty when no Keras is imported.
    """
    found: dict[type, type] = {}
    pydataset = keras_pydataset()
    if pydataset is not None:
        found[pydataset] = PyDatasetStandIn
    for name in _KERAS2_SEQUENCE_MODULES:
        cls = getattr(sys.modules.get(name), "Sequence", None)
        # The class must be defined there (Keras 3 has no such module; guard an alias anyway).
        if isinstance(cls, type) and cls.__module__ == name and cls not in found:
            found[cls] = SequenceStandIn
    return found


class SequenceStandIn:
    """Worker-side base of a by-value Keras 2 ``Sequence`` subclass (NOTE [ PyDataset stand-in ]).

    The whole of Keras 2's ``Sequence`` (``tf_keras/src/utils/data_utils.py``, tf_keras 2.21;
    TensorFlow 2.12-2.15's ``keras/src/utils/data_utils.py`` is the same): no constructor and
    no state; ``__getitem__`` and ``__len__`` raise NotImplementedError, ``on_epoch_end`` does
    nothing, ``__iter__`` yields ``self[i]`` for ``i in range(len(self))``.
    """

    def __getitem__(self, index: Any) -> Any:
        raise NotImplementedError

    def __len__(self) -> int:
        raise NotImplementedError

    def on_epoch_end(self) -> None:
        """Called at the end of every epoch (does nothing)."""

    def __iter__(self) -> Iterator[Any]:
        for index in range(len(self)):
            yield self[index]


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


class ModuleStandIn:
    """A worker's stand-in for a Keras module: the few attributes by-value code uses from it.

    NOTE [ Image iterators without TensorFlow ] in :mod:`compatmp._keras_image`: Keras' image
    module refers to ``backend``, ``image_utils`` and ``io_utils``; sending those modules by
    name would make the worker import Keras and TensorFlow, so each becomes one of these,
    holding only what the image code reads from it.

    Args:
        name (str): the module's ``__name__`` (for messages).
        attrs (dict[str, object]): the attributes it offers.

    Raises:
        AttributeError: on any other attribute, naming the module and what was sent.
    """

    def __init__(self, name: str, attrs: dict[str, Any]) -> None:
        self.__dict__.update(attrs)
        self.__dict__["__name__"] = name
        self.__dict__["_compatmp_attrs"] = tuple(sorted(attrs))

    def __getattr__(self, attr: str) -> Any:
        if attr.startswith("__") or attr == "_compatmp_attrs":
            raise AttributeError(attr)
        raise AttributeError(
            f"module {self.__dict__.get('__name__')!r} has no attribute {attr!r} in this "
            f"compatmp worker: only {list(self.__dict__.get('_compatmp_attrs', ()))} were sent "
            "with Keras' image iterator (so that the worker does not import TensorFlow). Use "
            "the module by its public name (keras.backend, tf.keras.backend) in your own code."
        )

    def __reduce__(self) -> tuple:
        attrs = {k: self.__dict__[k] for k in self.__dict__["_compatmp_attrs"]}
        return ModuleStandIn, (self.__dict__["__name__"], attrs)

    def __repr__(self) -> str:
        return f"<compatmp stand-in for module {self.__dict__.get('__name__')!r}>"


class Constant:
    """A callable returning one value: a stand-in for ``backend.floatx`` and friends.

    Args:
        value (object): what every call returns.
    """

    def __init__(self, value: Any) -> None:
        self.value = value

    def __call__(self) -> Any:
        return self.value

    def __repr__(self) -> str:
        return f"Constant({self.value!r})"
