"""Keras' ``ImageDataGenerator`` iterators in workers: the ``index_generator`` rule, and the
epoch's ``index_array`` settled in the main process.

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
drawn in the main process: NOTE [ Settling Keras' image iterators ], and by ``on_epoch_end``). With
random augmentation and ``seed``, each worker seeds NumPy from ``seed + total_batches_seen``
with its own counter - as in Keras' own ``use_multiprocessing=True`` - so augmented batches
differ from a single process's.

NOTE [ Settling Keras' image iterators ]
The same ``Iterator`` base class draws the order of an epoch lazily and at random, per
process: ``index_array`` is None after ``__init__``; the first ``__getitem__`` (after
``np.random.seed(seed + total_batches_seen)`` when ``seed`` is set) calls
``_set_index_array()``, which with ``shuffle=True`` - the default of ``flow``,
``flow_from_directory`` and ``flow_from_dataframe``, with ``seed=None`` - is
``np.random.permutation(n)`` from NumPy's global RNG. Sent before that first call, every worker
process drew its own permutation (compatmp seeds each worker's NumPy differently; a forked one
inherits the main's RNG, then is reseeded), so worker A served positions 0-3 of one order and
worker B positions 4-7 of another: ``compatmp.predict`` over 48 images returned about a quarter
of them twice and never the others, under fork, forkserver and spawn (issue 20). Threads share
the object, but two threads can both find ``index_array`` None and draw twice.

:func:`settle_image_iterator` (run by :func:`compatmp._settle.settle` before the pool pickles
the dataset and before every ``update_dataset``) draws it once, in the main process, exactly as
the first ``__getitem__`` would there: the iterator's own ``_set_index_array()`` (a subclass
override is honoured), from the global RNG when ``seed`` is None - so ``np.random.seed(s)``
before the call gives plain Keras' order - and from ``np.random.seed(seed +
total_batches_seen)`` when ``seed`` is set, with the main's global RNG state restored after.
Later epochs need nothing: ``on_epoch_end`` (Keras calls it; compatmp forwards it in the main
process) redraws ``index_array`` there and the new state is sent before the next batch. With
``seed`` set, that redraw uses the main's global RNG, which in one process Keras' own
``__getitem__`` would just have reseeded; so the order of epochs after the first differs from a
single process's, while every sample is still served exactly once per epoch.

Checked for the same lazy, per-process random state (Keras 3.15, tf_keras 2.21,
keras-preprocessing 1.1):
``NumpyArrayIterator``, ``DirectoryIterator``, ``DataFrameIterator`` (all three inherit
``index_array`` from ``Iterator``; ``BatchFromFilesMixin`` adds only file lists and the
augmentation draws per sample, which are per-batch randomness, not state); the image modules of
:data:`_ITERATOR_MODULES`; ``TimeseriesGenerator`` (``keras/src/legacy/preprocessing/sequence.py``,
``tf_keras/src/preprocessing/sequence.py``): with ``shuffle=True`` each ``__getitem__`` draws its
rows with ``np.random.randint`` - sampling with replacement per batch even in one process, no
stored state, nothing to settle; ``keras.utils.PyDataset`` and tf_keras' ``Sequence`` (no random
state; ``OrderedEnqueuer`` shuffles the batch order with ``random.shuffle`` in the main process,
as compatmp's feeder does); ``keras.utils.*_dataset_from_directory`` and
``timeseries_dataset_from_array`` return ``tf.data`` datasets, which Keras loads itself.
"""

from __future__ import annotations

import copyreg
import sys
import types
from typing import Any

__all__ = ["NotSentGenerator", "image_iterator_reduce", "settle_image_iterator"]

# Modules defining the image Iterator base class, per Keras version (see the NOTE).
_ITERATOR_MODULES = (
    "keras.src.legacy.preprocessing.image",  # Keras 3
    "tf_keras.src.preprocessing.image",  # tf_keras 2.x
    "keras.src.preprocessing.image",  # TensorFlow 2.13-2.15's Keras 2
    "keras.preprocessing.image",  # TensorFlow 2.12's Keras 2
    "keras_preprocessing.image.iterator",  # the standalone keras-preprocessing package
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


def settle_image_iterator(obj: Any) -> bool:
    """Draw a Keras image iterator's ``index_array`` now, in this process, if it is unset.

    NOTE [ Settling Keras' image iterators ]. Never imports Keras: only instances of classes
    from already imported Keras modules match. Draws from NumPy's global RNG like the first
    ``__getitem__`` would: as is when ``obj.seed`` is None; seeded with ``obj.seed +
    obj.total_batches_seen`` otherwise, and the global RNG's state is then restored.

    Args:
        obj (object): any object reachable from a dataset.

    Returns:
        bool: True if ``obj`` is a Keras image iterator whose ``index_array`` was None and is
        now drawn; False otherwise (nothing changed).

    Raises:
        Exception: whatever the iterator's own ``_set_index_array()`` raises.
    """
    classes = _iterator_classes()
    if not classes or not isinstance(obj, classes):
        return False
    state = getattr(obj, "__dict__", None)
    if not isinstance(state, dict) or state.get("index_array", 0) is not None:
        return False
    draw = getattr(obj, "_set_index_array", None)
    if not callable(draw):
        return False
    seed = state.get("seed")
    if seed is None:
        draw()
        return True
    import numpy as np  # the iterator's module imported it already

    saved = np.random.get_state()
    try:
        np.random.seed(seed + state.get("total_batches_seen", 0))
        draw()
    finally:
        np.random.set_state(saved)
    return True
