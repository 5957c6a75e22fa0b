"""Issue 18.2, Keras 2: one-epoch spawn fit of 8 tiny batches, predict, crash detection.

Run in a venv with tf_keras, from the repository root:
    TF_USE_LEGACY_KERAS=1 PYTHONPATH=$PWD python benchmarks/issue18/keras2_spawn.py
Prints ``fit1`` (s, first ``compatmp.fit`` epoch, workers started included), ``predict`` (s)
and ``crash`` (s until ``WorkerCrashedError`` when batch 3's worker exits). The batches carry
``"tensorflow" in sys.modules`` of the worker that made them (0.0 when it is not imported).
"""

import os
import sys
import time

import numpy as np
import tensorflow as tf

import compatmp


class Seq(tf.keras.utils.Sequence):
    def __len__(self):
        return 8

    def __getitem__(self, i):
        flag = float("tensorflow" in sys.modules)
        return np.full((4, 3), flag, "float32"), np.zeros((4, 1), "float32")


class Crash(Seq):
    def __getitem__(self, i):
        if i == 3:
            os._exit(3)
        return super().__getitem__(i)


if __name__ == "__main__":
    model = tf.keras.Sequential([tf.keras.Input((3,)), tf.keras.layers.Dense(1)])
    model.compile("sgd", "mse")
    model.predict(np.zeros((4, 3), "float32"), verbose=0)  # build outside the timing
    t = time.perf_counter()
    compatmp.fit(model, Seq(), epochs=1, workers=2, start_method="spawn", verbose=0)
    print(f"fit1 {time.perf_counter() - t:.2f}")
    t = time.perf_counter()
    compatmp.predict(model, Seq(), workers=2, start_method="spawn", verbose=0)
    print(f"predict {time.perf_counter() - t:.2f}")
    t = time.perf_counter()
    try:
        compatmp.predict(model, Crash(), workers=2, start_method="spawn", verbose=0)
    except compatmp.WorkerCrashedError as e:
        print(f"crash {time.perf_counter() - t:.2f} {type(e).__name__}")
