"""Keras' ``ImageDataGenerator`` iterators in worker processes: the ``index_generator`` rule.

NOTE [ ImageDataGenerator iterators ]
``ImageDataGenerator.flow``, ``flow_from_directory`` and ``flow_from_dataframe`` return
``NumpyArrayIterator``, ``DirectoryIterator`` and ``DataFrameIterator``, subclasses of the
image ``Iterator`` of ``keras/src/legacy/preprocessing/image.py`` (Keras 3, exported as
``tensorflow.keras.preprocessing.image``), ``tf_keras/src/preprocessing/image.py`` (Keras 2)
and ``keras/src/preprocessing/image.py`` (TensorFlow 2.13-2.15's Keras 2). Their
``__init__`` stores ``self.lock = threading.Lock()`` - which compatmp's pickler rebuilds - and
``self.index_generator = self._flow_index()``, a generator object, which no pickler can send
(a suspended frame). Read in those files: ``index_generator`` is used only by ``__next__``
(iterating the iterator by hand, ``for x, y in datagen.flow(...)``); ``__getitem__``, the
only thing a worker calls, uses ``index_array``, ``batch_size`` and the image arguments.

So :func:`image_iterator_reduce` pickles these iterators with their ``__dict__`` as is,
except ``index_generator``, which becomes a :class:`NotSentGenerator`: in the worker,
``next()`` on it raises a ``RuntimeError`` saying what happened and what to do. The main
process keeps the real generator. Why not every generator attribute, whatever the class: a
dataset whose ``__getitem__`` does use its generator would then fail in the worker instead of
running on threads (the fallback when pickling fails), so the rule is limited to classes whose
source shows the generator is unused by ``__getitem__``.

Batches equal the main process's when they are deterministic (``shuffle=False``, or the order
set in the main process by ``on_epoch_end``, which Keras calls before the first epoch). With
random augmentation and ``seed``, each worker seeds NumPy from ``seed + total_batches_seen``
with its own counter - as in Keras' own ``use_multiprocessing=True`` - so augmented batches
differ from a single process's.
"""

from __future__ import annotations

import copyreg
import sys
import types
from typing import Any

__all__ = ["NotSentGenerator", "image_iterator_reduce"]

# Modules defining the image Iterator base class, per Keras version (see the NOTE).
_ITERATOR_MODULES = (
    "keras.src.legacy.preprocessing.image",  # Keras 3
    "tf_keras.src.preprocessing.image",  # tf_keras 2.x
    "keras.src.preprocessing.image",  # TensorFlow 2.13-2.15's Keras 2
    "keras.preprocessing.image",  # TensorFlow 2.12's Keras 2
)


class NotSentGenerator:
    """Stands in a worker for an image iterator's ``index_generator``, which was not sent.

    Args:
        owner (str): ``module.Class`` of the iterator, for the message.
    """

    def __init__(self, owner: str) -> None:
        self.owner = owner

    def _fail(self) -> RuntimeError:
        return RuntimeError(
            f"{self.owner}.index_generator was not sent to this worker process: it is a "
            "generator, which cannot be pickled, and Keras' image iterators use it only in "
            "next(). Workers load batches with iterator[i]; call next() in the main process."
        )

    def __iter__(self) -> NotSentGenerator:
        return self

    def __next__(self) -> Any:
        raise self._fail()

    def send(self, value: Any) -> Any:
        """Raise RuntimeError: the generator was not sent."""
        raise self._fail()


def _iterator_classes() -> tuple[type, ...]:
    found = []
    for name in _ITERATOR_MODULES:
        cls = getattr(sys.modules.get(name), "Iterator", None)
        if isinstance(cls, type):
            found.append(cls)
    return tuple(found)


def image_iterator_reduce(obj: Any) -> Any:
    """Reduce a Keras image iterator without its ``index_generator``; else NotImplemented.

    Never imports Keras: only classes of already imported Keras modules match.

    Args:
        obj (object): any object being pickled.

    Returns:
        tuple | NotImplemented: ``(copyreg.__newobj__, (cls,), state)`` with
        ``state["index_generator"]`` replaced by a :class:`NotSentGenerator`.
    """
    classes = _iterator_classes()
    if not classes or not isinstance(obj, classes):
        return NotImplemented
    state = getattr(obj, "__dict__", None)
    if not isinstance(state, dict) or not isinstance(
        state.get("index_generator"), types.GeneratorType
    ):
        return NotImplemented
    cls = type(obj)
    state = dict(state)
    state["index_generator"] = NotSentGenerator(f"{cls.__module__}.{cls.__qualname__}")
    return copyreg.__newobj__, (cls,), state
