# Copyright 2024 The Keras team (keras-team/keras), Apache License 2.0.
# Copyright 2026 the compatmp authors: ported onto compatmp.fit/evaluate/predict.
#
# Licensed under the Apache License, Version 2.0 (the "License"); you may not use this file
# except in compliance with the License. You may obtain a copy of the License at
#
#     http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software distributed under the
# License is distributed on an "AS IS" BASIS, WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND,
# either express or implied. See the License for the specific language governing permissions
# and limitations under the License.
#
# Ported from keras-team/keras at commit 3422977a5e38fb2f7709aaa9a08e47f0c43d0f60:
#   keras/src/trainers/data_adapters/py_dataset_adapter_test.py (ExamplePyDataset,
#     DictPyDataset, ExceptionPyDataset; test_basic_flow, test_class_weight, test_dict_inputs,
#     test_with_different_shapes, test_exception_reported)
#   keras/src/trainers/trainer_test.py (TestPyDataset; the py_dataset cases of
#     test_fit_with_data_adapter)
# Changes: the dataset classes are Keras' own, unchanged but for imports (keras.utils.PyDataset,
# keras.ops, keras.backend); each case runs through compatmp and is compared with plain Keras
# *without* workers on the same data and initial weights (Keras' own workers path reorders,
# duplicates and drops batches when shuffling on torch and JAX), instead of iterating
# PyDatasetAdapter directly. Not ported: test_speedup (a timing assertion), the
# iterate_* cases (PyDataset.__iter__, no loader involved), test_sharding (distribution).
"""Keras' own PyDataset test cases on compatmp.fit, for one backend (run as a script).

``KERAS_BACKEND`` must be set before this script starts (tests/test_keras_ported.py runs one
interpreter per backend). Run as ``__main__``, so the dataset classes travel to workers by
value on the PyDataset stand-in (NOTE [ PyDataset stand-in ]). Prints one JSON line:
``{"backend": ..., "results": {case: "ok" | "FAIL ..."}}``.

Usage: python tests/keras_ported_cases.py METHOD[,METHOD...]
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
import traceback
import warnings

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np
from keras import backend, ops  # keras.src.backend in Keras' test

import compatmp


# --- Keras' dataset classes (py_dataset_adapter_test.py) ------------------------------------
class ExamplePyDataset(keras.utils.PyDataset):
    def __init__(
        self,
        x_set,
        y_set,
        sample_weight=None,
        batch_size=32,
        delay=0,
        infinite=False,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.x, self.y = x_set, y_set
        self.batch_size = batch_size
        self.sample_weight = sample_weight
        self.delay = delay
        self.infinite = infinite

    @property
    def num_batches(self):
        if self.infinite:
            return None
        return math.ceil(len(self.x) / self.batch_size)

    def __getitem__(self, idx):
        # Create artificial delay to test multiprocessing
        time.sleep(self.delay)

        if self.infinite:
            idx = idx % math.ceil(len(self.x) / self.batch_size)
        # Return x, y for batch idx.
        low = idx * self.batch_size
        # Cap upper bound at array length; the last batch may be smaller
        # if the total number of items is not a multiple of batch size.
        high = min(low + self.batch_size, len(self.x))
        batch_x = self.x[low:high]
        batch_y = self.y[low:high]
        if self.sample_weight is not None:
            return batch_x, batch_y, self.sample_weight[low:high]
        return batch_x, batch_y


class DictPyDataset(keras.utils.PyDataset):
    def __init__(self, inputs, batch_size=32, **kwargs):
        super().__init__(**kwargs)
        self.inputs = inputs
        self.batch_size = batch_size

    @property
    def num_batches(self):
        return math.ceil(len(self.inputs["x"]) / self.batch_size)

    def __getitem__(self, idx):
        low = idx * self.batch_size
        high = min(low + self.batch_size, len(self.inputs["x"]))
        batch_x = self.inputs["x"][low:high]
        batch_y = self.inputs["y"][low:high]
        batch = {"x": batch_x, "y": batch_y}
        return batch


class ExceptionPyDataset(keras.utils.PyDataset):
    @property
    def num_batches(self):
        return 4

    def __getitem__(self, index):
        if index < 2:
            return (
                np.random.random((8, 4)).astype("float32"),
                np.random.random((8, 2)).astype("float32"),
            )
        raise ValueError("Expected exception")


class DifferentShapesPyDataset(keras.utils.PyDataset):
    # test_with_different_shapes' local TestPyDataset.
    @property
    def num_batches(self):
        return 3

    def __getitem__(self, idx):
        if idx == 0:
            return np.ones([16, 4], "float32"), np.ones([16, 2], "float32")
        if idx == 1:
            return np.ones([16, 5], "float32"), np.ones([16, 2], "float32")
        else:
            return np.ones([2, 6], "float32"), np.ones([2, 2], "float32")


# --- Keras' dataset class (trainer_test.py) --------------------------------------------------
class TestPyDataset(keras.utils.PyDataset):
    def __init__(self, infinite=False, **kwargs):
        super().__init__(**kwargs)
        self.infinite = infinite

    @property
    def num_batches(self):
        return None if self.infinite else 20

    def __getitem__(self, idx):
        CPU_DEVICES = {
            "tensorflow": "CPU:0",
            "jax": "cpu:0",
            "torch": "cpu",
        }
        with keras.device(CPU_DEVICES[backend.backend()]):
            return ops.ones((5, 4)), ops.zeros((5, 3))


# --- helpers ---------------------------------------------------------------------------------
def assert_same_fit(plain, got, plain_model, got_model):
    assert plain.history.keys() == got.history.keys(), (plain.history, got.history)
    for key, values in plain.history.items():
        np.testing.assert_allclose(got.history[key], values, rtol=1e-5, atol=1e-6, err_msg=key)
    for a, b in zip(plain_model.get_weights(), got_model.get_weights(), strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)


def dense_model(units, inputs, loss="mse", seed=1):
    keras.utils.set_random_seed(seed)
    model = keras.Sequential([keras.Input((inputs,)), keras.layers.Dense(units)])
    model.compile(optimizer=keras.optimizers.SGD(0.01), loss=loss)
    return model


def native(array, dataset_type):
    if dataset_type == "np":
        return array
    return ops.convert_to_tensor(array)


# --- cases -----------------------------------------------------------------------------------
def basic_flow(method, shuffle, infinite, loader, dataset_type):
    """test_basic_flow: order, shuffling under a seed, infinite datasets; + predictions."""
    keras.utils.set_random_seed(1337)
    x = np.random.random((64, 4)).astype("float32")
    y = np.array([[i, i] for i in range(64)], dtype="float32") / 64
    x, y = native(x, dataset_type), native(y, dataset_type)
    fit_kwargs = {"epochs": 2, "shuffle": shuffle, "verbose": 0}
    if infinite:
        fit_kwargs["steps_per_epoch"] = 6  # a pass and a half: carries over into epoch 2
    plain_model = dense_model(2, 4)
    keras.utils.set_random_seed(7)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        plain = plain_model.fit(
            ExamplePyDataset(x, y, batch_size=16, infinite=infinite), **fit_kwargs
        )
        got_model = dense_model(2, 4)
        keras.utils.set_random_seed(7)
        dataset = ExamplePyDataset(x, y, batch_size=16, infinite=infinite, **loader)
        got = compatmp.fit(got_model, dataset, start_method=method, **fit_kwargs)
    assert_same_fit(plain, got, plain_model, got_model)
    if not infinite:
        expected = plain_model.predict(ExamplePyDataset(x, y, batch_size=16), verbose=0)
        predicted = compatmp.predict(got_model, dataset, start_method=method, verbose=0)
        np.testing.assert_allclose(predicted, expected, rtol=1e-5, atol=1e-6)


def class_weight(method):
    """test_class_weight: class weights apply to the batches compatmp loads."""
    x = np.random.default_rng(0).integers(1, 100, (4, 5)).astype("float32") / 100
    y = np.array([0, 1, 2, 1])
    class_w = {0: 2, 1: 1, 2: 3}
    loss = "sparse_categorical_crossentropy"
    plain_model = dense_model(3, 5, loss)
    plain = plain_model.fit(
        ExamplePyDataset(x, y, batch_size=2),
        class_weight=class_w,
        epochs=2,
        shuffle=False,
        verbose=0,
    )
    got_model = dense_model(3, 5, loss)
    got = compatmp.fit(
        got_model,
        ExamplePyDataset(x, y, batch_size=2),
        class_weight=class_w,
        epochs=2,
        shuffle=False,
        verbose=0,
        workers=2,
        start_method=method,
    )
    assert_same_fit(plain, got, plain_model, got_model)


def dict_inputs(method):
    """test_dict_inputs: dict batches reach the model by name."""
    rng = np.random.default_rng(0)
    inputs = {"x": rng.random((40, 4), "float32"), "y": rng.random((40, 2), "float32")}
    keras.utils.set_random_seed(1)
    ix, iy = keras.Input((4,), name="x"), keras.Input((2,), name="y")
    out = keras.layers.Dense(1)(keras.layers.Concatenate()([ix, iy]))
    model = keras.Model({"x": ix, "y": iy}, out)
    expected = model.predict(DictPyDataset(inputs, batch_size=4), verbose=0)
    got = compatmp.predict(
        model, DictPyDataset(inputs, batch_size=4), workers=2, start_method=method, verbose=0
    )
    np.testing.assert_allclose(got, expected, rtol=1e-6)


def different_shapes(method):
    """test_with_different_shapes: batches whose feature size changes are accepted."""
    model = keras.Sequential(
        [keras.Input((None,)), keras.layers.Lambda(lambda t: ops.sum(t, axis=-1, keepdims=True))]
    )
    expected = model.predict(DifferentShapesPyDataset(), verbose=0)
    got = compatmp.predict(
        model, DifferentShapesPyDataset(), workers=2, start_method=method, verbose=0
    )
    np.testing.assert_allclose(got, expected)
    np.testing.assert_allclose(got[:, 0], [4] * 16 + [5] * 16 + [6] * 2)


def exception_reported(method, loader):
    """test_exception_reported: the dataset's ValueError arrives as ValueError on every
    backend (plain Keras on TensorFlow raises tf.errors.InvalidArgumentError)."""
    model = dense_model(2, 4)
    try:
        compatmp.fit(model, ExceptionPyDataset(**loader), start_method=method, verbose=0)
    except ValueError as exc:
        assert "Expected exception" in str(exc), exc
    else:
        raise AssertionError("no exception")


def fit_with_data_adapter(method, dataset_kwargs, fit_kwargs):
    """trainer_test.test_fit_with_data_adapter, py_dataset cases: same history as plain Keras
    (whose own multiprocessing path the Keras test skips on TensorFlow and JAX)."""

    def model():
        keras.utils.set_random_seed(1)
        m = keras.Sequential(
            [
                keras.Input((4,)),
                keras.layers.Dense(3, use_bias=False, kernel_initializer="ones"),
            ]
        )
        m.compile(
            optimizer=keras.optimizers.Adagrad(),
            loss=keras.losses.MeanSquaredError(),
            metrics=[keras.metrics.MeanSquaredError()],
        )
        return m

    plain_kwargs = {"infinite": dataset_kwargs.get("infinite", False)}
    plain_model, got_model = model(), model()
    plain = plain_model.fit(TestPyDataset(**plain_kwargs), epochs=3, verbose=0, **fit_kwargs)
    got = compatmp.fit(
        got_model,
        TestPyDataset(**dataset_kwargs),
        epochs=3,
        verbose=0,
        start_method=method,
        **fit_kwargs,
    )
    assert_same_fit(plain, got, plain_model, got_model)


MP = {"workers": 2, "use_multiprocessing": True, "max_queue_size": 10}
MT = {"workers": 2, "use_multiprocessing": False, "max_queue_size": 10}
CW = {"class_weight": {0: 1, 1: 2}}
INF = {"infinite": True}
STEPS = {"steps_per_epoch": 20}


def cases(methods):
    """(name, function) for every case, the start methods spread across them.

    The trainer cases run first: their dataset refers to ``keras``, so the first forkserver
    pool makes the server preload Keras (NOTE [ Forkserver preload ]) and later forkserver
    pools start in well under a second. Spawn workers import Keras each time (~5 s), so only
    some cases use spawn.
    """
    out = []
    process_methods = [m for m in methods if m != "fork"] or methods
    server = "forkserver" if "forkserver" in methods else process_methods[0]
    trainer = [
        ("py_dataset", {}, {}),
        ("py_dataset_cw", {}, CW),
        ("py_dataset_infinite", INF, STEPS),
        ("py_dataset_infinite_cw", INF, {**STEPS, **CW}),
        ("py_dataset_multithreading", {"workers": 2}, {}),
        ("py_dataset_multithreading_cw", {"workers": 2}, CW),
        ("py_dataset_multithreading_infinite", {**INF, "workers": 2}, STEPS),
        ("py_dataset_multiprocessing", {"workers": 2, "use_multiprocessing": True}, {}),
        ("py_dataset_multiprocessing_cw", {"workers": 2, "use_multiprocessing": True}, CW),
        (
            "py_dataset_multiprocessing_infinite",
            {**INF, "workers": 2, "use_multiprocessing": True},
            STEPS,
        ),
    ]
    for i, (name, dataset_kwargs, fit_kwargs) in enumerate(trainer):
        # "auto" for the threaded ones: their own use_multiprocessing=False picks threads.
        if "multithreading" in name:
            m = "auto"
        else:
            m = process_methods[-1] if i == len(trainer) - 1 else server
        out.append(
            (
                f"fit_with_data_adapter[{name}-{m}]",
                lambda m=m, d=dataset_kwargs, f=fit_kwargs: fit_with_data_adapter(m, d, f),
            )
        )
    rotation = iter(methods * 100)
    for loader_name, loader in (("mp", MP), ("mt", MT), ("single", {})):
        for infinite in (False, True):
            for shuffle in (False, True):
                if loader_name != "mp" and (infinite or shuffle):
                    continue  # fewer variants, as Keras does for processes
                m = next(rotation)
                name = f"basic_flow[{loader_name}-inf{infinite:d}-shuf{shuffle:d}-np-{m}]"
                out.append(
                    (
                        name,
                        lambda m=m, s=shuffle, i=infinite, lo=loader: basic_flow(m, s, i, lo, "np"),
                    )
                )
    # The backend's own tensors in the dataset (not with fork: the child would use them).
    out.append(
        (
            f"basic_flow[mp-inf0-shuf1-native-{server}]",
            lambda: basic_flow(server, True, False, MP, "native"),
        )
    )
    for case, fn in (
        ("class_weight", class_weight),
        ("dict_inputs", dict_inputs),
        ("different_shapes", different_shapes),
    ):
        m = next(rotation)
        out.append((f"{case}[{m}]", lambda m=m, fn=fn: fn(m)))
    for loader_name, loader in (("mp", MP), ("mt", MT)):
        m = next(rotation)
        out.append(
            (
                f"exception_reported[{loader_name}-{m}]",
                lambda m=m, lo=loader: exception_reported(m, lo),
            )
        )
    return out


def main(argv):
    methods = argv[1].split(",")
    results = {}
    for name, case in cases(methods):
        start = time.monotonic()
        try:
            case()
        except Exception:
            results[name] = "FAIL " + traceback.format_exc()[-1500:]
        else:
            results[name] = f"ok {time.monotonic() - start:.1f}s"
    print(json.dumps({"backend": backend.backend(), "results": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
