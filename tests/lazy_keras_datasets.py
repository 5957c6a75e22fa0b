"""Keras datasets defined in an importable module, as users lay them out (``from mydata import``).

Importing this module imports TensorFlow and Keras; compatmp's spawn workers must not, when
the batch code needs only NumPy (NOTE [ Workers without Keras ] in ``compatmp._by_value``).
"""

from __future__ import annotations

import sys

import keras
import numpy as np
import tensorflow as tf

SCALE = 3  # module-level state the batch code reads


def _scaled(i: int) -> np.ndarray:
    """A module-level helper the batch code calls (travels by value with the class)."""
    return np.full(4, i * SCALE, dtype=np.float32)


def loaded_frameworks() -> tuple[bool, bool]:
    """Whether Keras and TensorFlow are imported in the calling process."""
    return "keras" in sys.modules, "tensorflow" in sys.modules


class NumpyOnlyPyDataset(keras.utils.PyDataset):
    """A ``keras.utils.PyDataset`` whose batches need only NumPy."""

    def __init__(self, n: int = 4, **kwargs) -> None:
        super().__init__(**kwargs)
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        return _scaled(i), loaded_frameworks()


class NumpyOnlyTfSequence(tf.keras.utils.Sequence):
    """The seeds' spelling: ``import tensorflow as tf; class S(tf.keras.utils.Sequence)``."""

    def __init__(self, n: int = 4) -> None:
        super().__init__()
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        return _scaled(i), loaded_frameworks()


class KerasUsingSequence(tf.keras.utils.Sequence):
    """Batch code that does use Keras and TensorFlow: must still work (imported on use)."""

    def __init__(self, n: int = 4) -> None:
        super().__init__()
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        x = keras.ops.convert_to_numpy(keras.ops.ones((2,)) * i)
        y = tf.constant([i, i]).numpy()
        return x, y, isinstance(self, keras.utils.PyDataset)
