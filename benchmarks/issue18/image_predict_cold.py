"""Issue 18: ``compatmp.predict`` on a ``flow_from_directory`` iterator from cold, under spawn.

Against ``model.predict`` on the same iterator, in the same fresh process. Usage, from the
repository root (DIR: a directory of class sub-directories of PNG images, e.g. written by
``tests/image_helpers.digits_directory``):
    PYTHONPATH=$PWD python benchmarks/issue18/image_predict_cold.py DIR            # Keras 3
    TF_USE_LEGACY_KERAS=1 PYTHONPATH=$PWD python benchmarks/issue18/image_predict_cold.py DIR
"""

import os
import sys
import time

import numpy as np

if os.environ.get("TF_USE_LEGACY_KERAS") == "1":
    import tf_keras as K
    from tf_keras.preprocessing.image import ImageDataGenerator
else:
    import keras as K
    from tensorflow.keras.preprocessing.image import ImageDataGenerator

import compatmp

if __name__ == "__main__":
    it = ImageDataGenerator(rescale=1 / 255.0).flow_from_directory(
        sys.argv[1], target_size=(8, 8), color_mode="grayscale", batch_size=8, shuffle=False
    )
    model = K.Sequential([K.Input((8, 8, 1)), K.layers.Flatten(), K.layers.Dense(10)])
    model.compile("sgd", "mse")
    t = time.perf_counter()
    a = model.predict(it, verbose=0)
    tm = time.perf_counter() - t
    t = time.perf_counter()
    b = compatmp.predict(model, it, workers=2, start_method="spawn", verbose=0)
    tc = time.perf_counter() - t
    print(f"model.predict {tm:.2f} s, compatmp.predict cold spawn {tc:.2f} s, "
          f"equal {np.allclose(a, b)}")
