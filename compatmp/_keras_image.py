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

NOTE [ Image iterators without TensorFlow ]
Pickled by reference, an image iterator makes its worker import its module: Keras 3's
``keras/src/legacy/preprocessing/image.py`` imports ``keras.src.backend`` (the package, and
with it the TensorFlow backend), tf_keras' ``tf_keras/src/preprocessing/image.py`` imports
TensorFlow at module level - 3-6 s and ~500 MB per spawn worker (issue 18), for batch code that
needs only NumPy, SciPy and PIL. (Keras 3 with ``KERAS_BACKEND=numpy`` in the worker was
measured too: 3.5 s and 320 MB - its NumPy backend imports JAX - and it would change what
``keras.ops`` in a user's own code returns.) So when the dataset is an image iterator or
``ImageDataGenerator`` of those two modules (or holds one directly in its ``__dict__``),
:func:`compatmp._by_value.dump_dataset` sends the image module by value, as it sends a user's
module (NOTE [ Workers without Keras ]), with :func:`image_modules_by_value`'s companions:
``image_utils`` (``load_img``, ``img_to_array``, ``array_to_img``) and, for Keras 3,
``keras.src.backend.config`` (``standardize_data_format``). The Keras modules that code
refers to become :class:`compatmp._standin.ModuleStandIn` objects holding exactly what the
four files read from them (every ``backend.``, ``image_utils.``, ``io_utils.`` there):
``backend.floatx``, ``image_data_format`` and ``epsilon`` return the main process's values at
sending time (what a forked worker reads), ``io_utils.print_msg`` prints (called only in
``__init__``, in the main process), Keras 3's lazy ``scipy`` is ``scipy``; the ``PyDataset``
and tf_keras ``Sequence`` bases become their stand-ins (NOTE [ PyDataset stand-in ]). The
batch code itself is Keras' own, so batches are the same bytes (the differential test
compares them with the main process's). A ``preprocessing_function`` that uses TensorFlow
still works: cloudpickle sends ``tf`` by name and the worker imports it. If the by-value
dump fails, the iterator goes by reference as before. Measured in ``benchmarks/RESULTS.md``.

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
import importlib
import sys
import types
from typing import Any

from ._standin import Constant, ModuleStandIn

__all__ = [
    "NotSentGenerator",
    "image_iterator_reduce",
    "image_module_reduce",
    "image_modules_by_value",
    "settle_image_iterator",
]

# NOTE [ Image iterators without TensorFlow ]: Keras' image modules sent by value, each with
# the Keras modules whose functions go by value alongside it (read in Keras 3.15's
# keras/src/legacy/preprocessing/image.py and keras/src/utils/image_utils.py; tf_keras 2.21's
# tf_keras/src/preprocessing/image.py and tf_keras/src/utils/image_utils.py).
_IMAGE_BY_VALUE = {
    "keras.src.legacy.preprocessing.image": (
        "keras.src.utils.image_utils",
        "keras.src.backend.config",  # standardize_data_format, used by image_utils
    ),
    "tf_keras.src.preprocessing.image": ("tf_keras.src.utils.image_utils",),
}
# The Keras modules that by-value image code refers to, and what it reads from each: every
# ``backend.``, ``image_utils.`` and ``io_utils.`` in those four files.
_BACKEND_MODULES = frozenset({"keras.src.backend", "tf_keras.src.backend"})
_BACKEND_CONSTANTS = ("floatx", "image_data_format", "epsilon")
_IMAGE_UTILS_MODULES = frozenset({"keras.src.utils.image_utils", "tf_keras.src.utils.image_utils"})
_IMAGE_UTILS_ATTRS = ("load_img", "img_to_array", "array_to_img")
_IO_UTILS_MODULES = frozenset({"keras.src.utils.io_utils", "tf_keras.src.utils.io_utils"})
# Keras 3's image module reaches SciPy through this lazy wrapper (keras/src/utils/module_utils.py).
_LAZY_MODULE = ("keras.src.utils.module_utils", "LazyModule")


def print_msg(message: str, line_break: bool = True) -> None:
    """What ``io_utils.print_msg`` becomes in a worker: ``print`` to stdout.

    Keras' image iterators call it only in ``__init__`` (the "Found N images" line), which runs
    in the main process; Keras' own routes to absl logging when interactive logging is off.

    Args:
        message (str): the text.
        line_break (bool): end with a newline (default: True).
    """
    print(message, end="\n" if line_break else "", flush=True)


def image_modules_by_value(obj: Any) -> list[types.ModuleType]:
    """Keras' image modules to send by value with ``obj``; see NOTE [ Image iterators without
    TensorFlow ].

    Never imports Keras. Looks at ``obj`` and the values of its ``__dict__`` (an iterator held
    directly by the user's dataset); an iterator deeper inside is sent by reference (its worker
    imports Keras, and it still works).

    Args:
        obj (object): the dataset.

    Returns:
        list[types.ModuleType]: the image modules of the Keras versions ``obj`` uses, and the
        modules whose functions they call; empty when ``obj`` holds no image iterator.
    """
    loaded = [name for name in _IMAGE_BY_VALUE if name in sys.modules]
    if not loaded:
        return []
    candidates = [obj]
    state = getattr(obj, "__dict__", None)
    if isinstance(state, dict):
        candidates.extend(state.values())
    found: list[types.ModuleType] = []
    for candidate in candidates:
        for cls in type(candidate).__mro__:
            name = getattr(cls, "__module__", None)
            if name in loaded:
                for module_name in (name, *_IMAGE_BY_VALUE[name]):
                    module = sys.modules.get(module_name)
                    if module is not None and module not in found:
                        found.append(module)
                break
    return found


def _make_lazy_module(name: str) -> types.ModuleType:
    return importlib.import_module(name)


def image_module_reduce(obj: Any) -> Any:
    """While image modules go by value: the reduction of a Keras module their code refers to.

    ``<keras>.src.backend`` becomes a :class:`compatmp._standin.ModuleStandIn` with
    ``floatx``, ``image_data_format`` and ``epsilon`` returning this process's values now
    (what a forked worker would read) and Keras 3's ``standardize_data_format`` (by value);
    ``image_utils`` one with ``load_img``, ``img_to_array``, ``array_to_img`` (by value);
    ``io_utils`` one with :func:`print_msg`; Keras 3's lazy ``scipy`` the ``scipy`` module.

    Args:
        obj (object): any object being pickled.

    Returns:
        tuple | NotImplemented: a reduction, or NotImplemented for anything else.
    """
    if isinstance(obj, types.ModuleType):
        name = obj.__name__
        if name in _BACKEND_MODULES:
            attrs: dict[str, Any] = {
                attr: Constant(getattr(obj, attr)())
                for attr in _BACKEND_CONSTANTS
                if callable(getattr(obj, attr, None))
            }
            standardize = getattr(obj, "standardize_data_format", None)
            if callable(standardize):
                attrs["standardize_data_format"] = standardize
            return ModuleStandIn, (name, attrs)
        if name in _IMAGE_UTILS_MODULES:
            attrs = {a: getattr(obj, a) for a in _IMAGE_UTILS_ATTRS if hasattr(obj, a)}
            return ModuleStandIn, (name, attrs)
        if name in _IO_UTILS_MODULES:
            return ModuleStandIn, (name, {"print_msg": print_msg})
        return NotImplemented
    cls = type(obj)
    if (cls.__module__, cls.__qualname__) == _LAZY_MODULE and isinstance(
        getattr(obj, "name", None), str
    ):
        return _make_lazy_module, (obj.name,)
    return NotImplemented


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
