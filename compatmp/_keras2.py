"""Keras 2 (``tf_keras`` 2.x, TensorFlow 2.12-2.15's built-in Keras): flavour and proxy.

:mod:`compatmp._keras` tells the flavour from the model (:func:`keras_flavour`) and, for a
Keras 2 model, hands ``model.fit`` a ``Sequence`` proxy built here instead of Keras 3's
``PyDataset`` proxy (:func:`compatmp._feeder._keras3_proxy_class`). Both proxies serve
batches from the same :class:`compatmp._feeder._Feeder`, so order, shuffling, hook forwarding,
error types and worker shutdown are shared.

NOTE [ How Keras 2 drives a Sequence ]
Read from ``tf_keras/src/engine/data_adapter.py`` (``KerasSequenceAdapter``,
``GeneratorDataAdapter``, ``DataHandler``) and ``tf_keras/src/utils/data_utils.py``
(``Sequence``, ``OrderedEnqueuer``), tf_keras 2.21; TensorFlow 2.15's ``keras/src/engine``
is the same code:

* ``fit``/``evaluate``/``predict`` take ``workers`` (default 1), ``use_multiprocessing``
  (False) and ``max_queue_size`` (10). ``workers > 1 or (workers > 0 and
  use_multiprocessing)`` starts an ``OrderedEnqueuer`` (a ``multiprocessing.Pool`` per epoch,
  pickling the dataset - the ``_thread.lock`` error). compatmp passes ``workers=1,
  use_multiprocessing=False``: the adapter then iterates ``x[i]`` itself.
* ``KerasSequenceAdapter`` is chosen by ``isinstance(x, keras.utils.Sequence)`` of the model's
  own Keras package (a ``tf_keras`` model does not accept a Keras 3 ``PyDataset``: the
  "Failed to find data adapter" error), hence a proxy per package (:func:`keras2_proxy_class`).
* At construction it peeks ``x[0]`` in the calling thread to infer the output signature
  (``_peek_and_restore``), outside any epoch. Each epoch then creates a new ``tf.data``
  iterator (``should_recreate_iterator`` is True for a ``Sequence``, even with
  ``steps_per_epoch``), whose generator asks ``x[i]`` for ``i in range(len(x))`` in a
  TensorFlow thread, shuffled with ``random.shuffle`` when ``shuffle=True`` (the default
  in ``fit``), with ``prefetch`` on top. So, unlike Keras 3, each epoch restarts at
  position 0: ``steps_per_epoch < len`` never carries a pass over.
* There is no ``on_epoch_begin``; ``DataHandler.enumerate_epochs`` calls
  ``adapter.on_epoch_end()`` -> ``x.on_epoch_end()`` after every epoch (also after each
  validation run and after ``evaluate``/``predict``), never before the first.

So the Keras 2 proxy calls :meth:`_Feeder.get` with ``implicit_epoch=True``: its first call is
the peek, any later call outside an epoch begins one, and ``on_epoch_end`` is forwarded as
for Keras 3. compatmp shuffles (``shuffle=False`` goes to Keras) with the same
``random.shuffle`` call at position 0, so ``tf.keras.utils.set_random_seed`` gives the order
plain Keras 2 would use. A batch TensorFlow prefetched past ``steps_per_epoch`` is dropped by
Keras when it destroys the epoch's iterator; if the generator thread still asks for one after
``on_epoch_end``, it is served with the new state, and the next position 0 starts a new pass.
"""

from __future__ import annotations

import functools
import importlib
from typing import Any

__all__ = ["keras2_proxy_class", "keras_flavour"]

# Module prefixes of the classes a model derives from, per Keras flavour: Keras 3 keeps its
# Model in keras/src/models and the trainers in keras/src/trainers and keras/src/backend; Keras
# 2 keeps them in <package>/engine (keras.engine up to 2.12, keras.src.engine in 2.13-2.15,
# tf_keras.src.engine).
_KERAS2_PREFIXES = ("tf_keras.", "keras.engine.", "keras.src.engine.")
_KERAS3_PREFIXES = ("keras.src.models.", "keras.src.trainers.", "keras.src.backend.")


def keras_flavour(model: Any) -> tuple[int, str] | None:
    """Tell Keras 2 from Keras 3 by the classes ``model`` derives from.

    The packages that happen to be importable do not decide (TensorFlow 2.16+ installs Keras
    3 and tf_keras side by side): the model's own class hierarchy does.

    Args:
        model (object): what the caller passed as the model.

    Returns:
        tuple[int, str] | None: ``(3, "keras")``, ``(2, "tf_keras")`` or ``(2, "keras")``
        (TensorFlow 2.12-2.15's built-in Keras 2), or None when no Keras class is found
        (a duck-typed model: treated as Keras 3 by the caller).
    """
    for cls in type(model).__mro__:
        module = cls.__module__ or ""
        if module.startswith(_KERAS2_PREFIXES):
            return 2, module.split(".", 1)[0]
        if module.startswith(_KERAS3_PREFIXES):
            return 3, "keras"
    return None


@functools.cache
def keras2_proxy_class(package: str) -> type:
    """Build the ``<package>.utils.Sequence`` subclass a Keras 2 model sees.

    Args:
        package (str): ``"tf_keras"`` or ``"keras"`` (Keras 2.12-2.15), from
            :func:`keras_flavour`.

    Returns:
        type: a ``Sequence`` subclass taking a :class:`compatmp._feeder._Feeder`.
    """
    sequence = importlib.import_module(package).utils.Sequence

    class _ProxySequence(sequence):  # type: ignore[misc, valid-type]
        """What Keras 2 iterates: batches from a feeder; see NOTE [ How Keras 2 drives a
        Sequence ]."""

        def __init__(self, feeder: Any) -> None:
            self.feeder = feeder

        def __len__(self) -> int:
            return self.feeder.length

        def __getitem__(self, index: int) -> object:
            return self.feeder.get(index, implicit_epoch=True)

        def on_epoch_end(self) -> None:
            self.feeder.epoch_end()

    _ProxySequence.__qualname__ = "_ProxySequence"
    return _ProxySequence
