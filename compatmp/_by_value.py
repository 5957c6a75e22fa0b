"""The dataset's pickler: module-defined Keras datasets go by value, on the PyDataset stand-in.

:func:`dump_dataset` is what :class:`compatmp._shared_data.DatasetSharer` pickles the dataset
with: compatmp's pickler (:class:`compatmp._serialize.CompatPickler`), pickle protocol 5 with
a ``buffer_callback`` for the big buffers, plus the two things only the dataset needs: the
packages it refers to are noted for the forkserver preload (:class:`compatmp._preload.
ModuleRecorder`), and the module of a ``keras.utils.PyDataset`` subclass is sent by value.

NOTE [ Workers without Keras ]
A ``keras.utils.PyDataset`` (alias ``keras.utils.Sequence``, also reached as
``tf.keras.utils.Sequence``) subclass defined in an importable module - ``from mydata import
Images``, the usual layout on Windows and macOS - is pickled by reference: a spawn worker
imports ``mydata``, which imports Keras and TensorFlow (seconds and ~575 MB per worker) even
when ``__getitem__`` needs only NumPy. For the pool's dataset pickle, compatmp therefore sends
such a module *by value* (``cloudpickle.register_pickle_by_value`` for the duration of the
dump): the class, its methods and the module-level helpers they call travel as code, and the
worker never imports ``mydata``. Every reference to Keras' ``PyDataset`` class itself - the
base, or ``PyDataset.__init__(self, ...)`` in a method - becomes the Keras-free
:class:`compatmp._standin.PyDatasetStandIn` (NOTE [ PyDataset stand-in ]); Keras 2's
``Sequence`` (tf_keras, TensorFlow <= 2.15's ``keras``) likewise becomes
:class:`compatmp._standin.SequenceStandIn`. A method that
uses ``keras`` or ``tf`` makes cloudpickle send that module by name: the worker imports it
when the dataset is loaded, so such code still works, it just pays the import.

Limits: only the modules of the dataset's own classes (those in its MRO before
``PyDataset`` or ``Sequence``, not from Keras, TensorFlow or compatmp) go by value, and Keras'
image modules (NOTE [ Image iterators without TensorFlow ]); a helper from *another*
module that imports Keras still makes the worker import it. Module-level state is copied as
it is when the pool starts or updates, as for ``__main__`` classes. In the worker,
``isinstance(ds, keras.utils.PyDataset)`` is False.
"""

from __future__ import annotations

import io
import sys
import threading
import types
from collections.abc import Callable
from typing import Any

import cloudpickle

from ._exceptions import SerializationError
from ._keras_image import image_module_reduce, image_modules_by_value
from ._preload import ModuleRecorder, preloadable
from ._serialize import CompatPickler, dumps
from ._standin import PyDatasetStandIn, SequenceStandIn, keras_dataset_bases

__all__ = ["dump_dataset"]

# Packages never sent by value (NOTE [ Workers without Keras ]); compatmp's own private
# modules (``compatmp._*``) neither.
_FRAMEWORKS = frozenset({"keras", "tensorflow", "tf_keras"})

# register_pickle_by_value is process-wide: one dump at a time registers modules.
_by_value_lock = threading.Lock()


def _is_framework(module: str) -> bool:
    return (
        module.split(".")[0] in _FRAMEWORKS
        or module == "compatmp"
        or module.startswith("compatmp._")
    )


def _standin_class() -> type:
    return PyDatasetStandIn


def _sequence_standin_class() -> type:
    return SequenceStandIn


# What a swapped Keras base class is pickled as: a module-level function returning the stand-in
# (a plain reference to compatmp._standin, importable in every worker).
_STANDIN_REDUCERS = {PyDatasetStandIn: _standin_class, SequenceStandIn: _sequence_standin_class}


def _by_value_modules(obj: Any) -> list[types.ModuleType]:
    """The modules of ``obj``'s own classes, if it is a Keras ``PyDataset`` or Keras 2
    ``Sequence`` (NOTE above)."""
    bases = keras_dataset_bases()
    cls = type(obj)
    if not any(issubclass(cls, base) for base in bases):
        return []
    found = []
    for c in cls.__mro__:
        if c in bases:
            break
        name = getattr(c, "__module__", None)  # classes made by type() may lack it
        module = sys.modules.get(name) if isinstance(name, str) else None
        if module is None or name == "__main__" or _is_framework(name):
            continue
        if module not in found:
            found.append(module)
    return found


class _DatasetPickler(CompatPickler):
    """CompatPickler that notes the packages it meets and swaps Keras' dataset base classes."""

    def __init__(
        self,
        *args: Any,
        swap_bases: dict[type, type] | None = None,
        image: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.recorder = ModuleRecorder()
        self._swap = swap_bases or {}
        self._image = image

    def reducer_override(self, obj: Any) -> Any:
        standin = self._swap.get(obj) if isinstance(obj, type) else None
        if standin is not None:
            return _STANDIN_REDUCERS[standin], ()
        if self._image:  # NOTE [ Image iterators without TensorFlow ] in _keras_image
            rv = image_module_reduce(obj)
            if rv is not NotImplemented:
                return rv
        self.recorder.note(obj)
        return super().reducer_override(obj)


def dump_dataset(
    obj: Any,
    buffer_callback: Callable[[Any], bool] | None,
    on_retry: Callable[[], None] | None = None,
) -> tuple[bytes, tuple[str, ...]]:
    """Pickle the dataset ``obj`` (protocol 5); also return the packages worth preloading.

    Module-defined Keras datasets go by value (NOTE [ Workers without Keras ]), and so does
    Keras' image code when ``obj`` is or directly holds an image iterator (NOTE [ Image
    iterators without TensorFlow ] in :mod:`compatmp._keras_image`); if that fails, by
    reference as before.

    Args:
        obj (object): the dataset.
        buffer_callback (Callable[[pickle.PickleBuffer], bool] | None): pickle's
            ``buffer_callback``: return False to take a buffer out of band.
        on_retry (Callable[[], None] | None): called before the by-reference attempt, so the
            callback's owner forgets the buffers the failed attempt reported (default: None).

    Returns:
        tuple[bytes, tuple[str, ...]]: the pickle and :func:`compatmp._preload.preloadable`
        packages it refers to (modules sent by value left out).

    Raises:
        SerializationError: as :func:`compatmp._serialize.dumps`, with attribute paths.
    """
    image = image_modules_by_value(obj)
    by_value = _by_value_modules(obj)
    by_value += [m for m in image if m not in by_value]
    attempts = [by_value, []] if by_value else [[]]
    for k, modules in enumerate(attempts):
        try:
            return _dump_once(obj, buffer_callback, modules, image=bool(modules and image))
        except Exception as exc:
            if k + 1 < len(attempts):
                if on_retry is not None:
                    on_retry()
                continue  # by value failed (e.g. module state cloudpickle refuses)
            dumps(obj, root="dataset")  # raises SerializationError naming the culprits
            raise SerializationError(
                f"cannot pickle dataset to send it to worker processes: "
                f"{type(exc).__name__}: {exc}",
                [],
            ) from exc
    raise AssertionError("unreachable")  # pragma: no cover


def _dump_once(
    obj: Any, buffer_callback: Any, by_value: list[types.ModuleType], image: bool = False
) -> tuple[bytes, tuple[str, ...]]:
    buf = io.BytesIO()
    with _by_value_lock:
        added = []
        for module in by_value:
            if not cloudpickle.cloudpickle._is_registered_pickle_by_value(module):
                cloudpickle.register_pickle_by_value(module)
                added.append(module)
        try:
            pickler = _DatasetPickler(
                buf,
                None,
                buffer_callback=buffer_callback,
                swap_bases=keras_dataset_bases() if by_value else None,
                image=image,
            )
            pickler.dump(obj)
        finally:
            for module in added:
                cloudpickle.unregister_pickle_by_value(module)
    skip = {m.__name__.split(".")[0] for m in by_value}  # sent by value: never imported
    return buf.getvalue(), preloadable(pickler.recorder.modules, skip)
