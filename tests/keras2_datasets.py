"""Keras 2 datasets for tests/test_keras2.py, at module level so spawned workers import them.

The seed case of issue 10: a Keras 2 ``Sequence`` subclass holding a ``threading.Lock``, as
written for ``model.fit(seq, workers=4, use_multiprocessing=True)`` - the class that fails with
"cannot pickle '_thread.lock'" under spawn. Imports Keras 2 (``tf_keras``, or TensorFlow
2.15's built-in Keras) lazily, like keras_datasets.pydataset_class.
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
from keras_datasets import ArrayDataset

_LOCK = threading.Lock()


def keras2_module() -> Any:
    """The Keras 2 package here: ``tf_keras``, else TensorFlow <= 2.15's ``keras`` 2.x, else
    None. Imports it."""
    try:
        import tf_keras

        return tf_keras
    except ImportError:
        pass
    try:
        import keras
    except ImportError:
        return None
    return keras if keras.__version__.startswith("2.") else None


def sequence_class() -> type:
    """``LockedSequence``: ArrayDataset as a ``tf_keras.utils.Sequence`` with a lock."""
    return __getattr__("LockedSequence")


def __getattr__(name: str) -> Any:
    # PEP 562, as in keras_datasets: one class object, found by name in the workers.
    if name != "LockedSequence":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    with _LOCK:
        cls = globals().get(name)
        if cls is None:
            k2 = keras2_module()

            class LockedSequence(ArrayDataset, k2.utils.Sequence):
                def __init__(self, *args: Any, **kwargs: Any) -> None:
                    ArrayDataset.__init__(self, *args, **kwargs)
                    self.lock = threading.Lock()  # what plain Keras 2 cannot pickle

                def __getitem__(self, index: int) -> Any:
                    with self.lock:
                        return ArrayDataset.__getitem__(self, index)

            LockedSequence.__module__ = __name__
            LockedSequence.__qualname__ = name
            cls = globals()[name] = LockedSequence
    return cls


def inputs(n: int) -> np.ndarray:
    """The features of ArrayDataset(n) in row order (for model.predict on arrays)."""
    return ArrayDataset(n).x
