"""compatmp.fit/evaluate/predict take everything model.fit takes (issue 10, items 2 and 3).

Each case compares with plain Keras on the same data and initial weights: arrays, tuples,
dicts and tf.data go to Keras unchanged (no pool), positional arguments follow the model's
signature, num_batches-only PyDatasets (finite and infinite) are loaded by the pool, and
Keras' loader arguments (workers, use_multiprocessing, max_queue_size) plus the pool's
timeout/seed/worker_init_fn are honoured - all argument errors before any worker starts.
Keras 3 on the TensorFlow backend here; tests/test_keras_ported.py runs every backend.
"""

from __future__ import annotations

import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import logging
import warnings

import numpy as np
import pytest

keras = pytest.importorskip("keras", minversion="3")

import keras_datasets as kd  # noqa: E402

import compatmp  # noqa: E402
import compatmp._keras as ck  # noqa: E402
from compatmp import ThreadFallbackWarning  # noqa: E402
from compatmp._pool import OrderedPool  # noqa: E402

pytestmark = [pytest.mark.keras, pytest.mark.usefixtures("no_leaked_workers")]


def tiny_model(seed: int = 1) -> keras.Model:
    keras.utils.set_random_seed(seed)
    model = keras.Sequential([keras.Input((kd.N_FEATURES,)), keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse", metrics=["mae"])
    return model


@pytest.fixture
def no_pool(monkeypatch):
    """Fail if a pool starts."""
    monkeypatch.setattr(ck, "_open_pool", lambda *a, **k: pytest.fail("a pool was started"))


@pytest.fixture
def pool_kwargs(monkeypatch):
    """Record the keyword arguments of every OrderedPool the wrappers start."""
    calls: list[dict] = []
    original = ck._open_pool

    def recording(dataset, loader, workers, method, *idle_timeout):
        calls.append({"workers": workers, "start_method": method, **loader.pool_options()})
        return original(dataset, loader, workers, method, *idle_timeout)

    monkeypatch.setattr(ck, "_open_pool", recording)
    return calls


# --------------------------------------------------------------------------------------------
# Data Keras loads itself: unchanged, no workers


def _tf_dataset():
    import tensorflow as tf

    x, y = kd.make_arrays(48)
    return tf.data.Dataset.from_tensor_slices((x, y)).batch(8)


X, Y = kd.make_arrays(48)


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    ("x", "kwargs"),
    [
        (X, {"y": Y, "batch_size": 8}),
        (X, {"y": Y, "batch_size": 8, "sample_weight": np.linspace(0.5, 1.5, 48)}),
        ((X, Y), {"batch_size": 8}),
        ({"x": X}, {"y": Y, "batch_size": 8}),
        ("tf.data", {}),
    ],
    ids=["arrays", "sample_weight", "tuple", "dict", "tf.data"],
)
def test_data_keras_loads_itself_goes_to_model_fit_unchanged(x, kwargs, no_pool, caplog):
    if isinstance(x, str):
        x = _tf_dataset()
    if isinstance(x, dict):
        # A dict input needs a model with a named input.
        def model_fn():
            keras.utils.set_random_seed(1)
            inp = keras.Input((kd.N_FEATURES,), name="x")
            model = keras.Model(inp, keras.layers.Dense(1)(inp))
            model.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse")
            return model
    else:
        model_fn = tiny_model
    ck._passthrough_logged = False

    def outcome(fit):
        # Keras 3 reads a tuple x as a multi-input x and fails on this model: compatmp must
        # give the same failure, not a different one.
        try:
            return fit(model_fn(), x, epochs=2, shuffle=False, verbose=0, **kwargs)
        except Exception as exc:
            return type(exc)

    expected = outcome(lambda model, *a, **k: model.fit(*a, **k))
    with caplog.at_level(logging.INFO, logger="compatmp"):
        got = outcome(compatmp.fit)
        outcome(compatmp.fit)
    if isinstance(expected, type):
        assert got is expected
    else:
        kd.assert_same_history(got, expected)
    said = [r.getMessage() for r in caplog.records if "no workers needed" in r.getMessage()]
    assert len(said) == 1  # once


def test_evaluate_and_predict_on_arrays(no_pool):
    model = tiny_model()
    np.testing.assert_allclose(
        compatmp.evaluate(model, X, Y, batch_size=8, verbose=0),
        model.evaluate(X, Y, batch_size=8, verbose=0),
    )
    np.testing.assert_allclose(
        compatmp.predict(model, X, 8, 0), model.predict(X, batch_size=8, verbose=0)
    )


# --------------------------------------------------------------------------------------------
# Positional arguments in Keras' order


@pytest.mark.timeout(120)
def test_positional_arguments_follow_model_fit():
    # fit(x, y, batch_size, epochs, verbose, callbacks, validation_split, validation_data,
    #     shuffle): keras/src/trainers/trainer.py
    val = kd.ArrayDataset(16, 8, seed=5)
    expected = tiny_model().fit(
        kd.pydataset_class()(),
        None,
        None,
        2,
        0,
        None,
        0.0,
        kd.pydataset_class()(16, 8, seed=5),
        False,
    )
    got = compatmp.fit(
        tiny_model(),
        kd.ArrayDataset(),
        None,
        None,
        2,
        0,
        None,
        0.0,
        val,
        False,
        start_method="thread",
    )
    kd.assert_same_history(got, expected)
    assert len(got.history["val_loss"]) == 2


@pytest.mark.parametrize(
    ("args", "kwargs", "match"),
    [
        ((None,) * 16, {}, "takes only 15 after x"),
        ((None, None, 2), {"epochs": 3}, "multiple values for argument 'epochs'"),
    ],
)
def test_bad_positional_arguments_fail_before_workers_start(args, kwargs, match, no_pool):
    with pytest.raises(TypeError, match=match):
        compatmp.fit(tiny_model(), kd.ArrayDataset(), *args, **kwargs)


# --------------------------------------------------------------------------------------------
# num_batches-only PyDatasets


def _num_batches_class():
    class NumBatchesDataset(keras.utils.PyDataset):
        """Keras' own style: num_batches instead of __len__ (None: infinite)."""

        def __init__(self, n_batches, **kwargs):
            super().__init__(**kwargs)
            self.n_batches = n_batches
            self.data = kd.ArrayDataset(48, 8)

        @property
        def num_batches(self):
            return self.n_batches

        def __getitem__(self, index):
            return self.data[index % len(self.data)]

    return NumBatchesDataset


@pytest.mark.timeout(180)
@pytest.mark.parametrize("method", ["thread", "spawn"])
@pytest.mark.parametrize("n_batches", [6, None], ids=["finite", "infinite"])
def test_num_batches_pydataset_is_loaded_by_the_pool(method, n_batches, pool_kwargs):
    cls = _num_batches_class()
    steps = {"steps_per_epoch": 4} if n_batches is None else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "ran out of data", in both
        expected = tiny_model().fit(cls(n_batches), epochs=2, shuffle=False, verbose=0, **steps)
        warnings.simplefilter("error", ThreadFallbackWarning)
        got = compatmp.fit(
            tiny_model(),
            cls(n_batches),
            workers=2,
            start_method=method,
            epochs=2,
            shuffle=False,
            verbose=0,
            **steps,
        )
    kd.assert_same_history(got, expected)
    assert [c["start_method"] for c in pool_kwargs] == [method]


def test_infinite_pydataset_without_steps_fails_before_workers_start(no_pool):
    with pytest.raises(ValueError, match=r"infinite PyDataset.*steps_per_epoch"):
        compatmp.fit(tiny_model(), _num_batches_class()(None), epochs=2, verbose=0)
    with pytest.raises(ValueError, match="pass steps="):
        compatmp.predict(tiny_model(), _num_batches_class()(None), verbose=0)


# --------------------------------------------------------------------------------------------
# Keras' loader arguments and the pool's options


@pytest.mark.timeout(120)
def test_dataset_own_loader_settings_apply(pool_kwargs):
    dataset = kd.pydataset_class()(workers=2, use_multiprocessing=False, max_queue_size=3)
    compatmp.fit(tiny_model(), dataset, epochs=1, verbose=0)
    # Keras would use 2 threads (py_dataset_adapter.py: use_multiprocessing=False).
    assert pool_kwargs[-1]["workers"] == 2
    assert pool_kwargs[-1]["start_method"] == "thread"
    assert pool_kwargs[-1]["max_queue_size"] == 3
    # The call's own settings win.
    compatmp.fit(tiny_model(), dataset, workers=1, max_queue_size=5, epochs=1, verbose=0)
    assert pool_kwargs[-1]["workers"] == 1
    assert pool_kwargs[-1]["max_queue_size"] == 5


@pytest.mark.timeout(120)
def test_use_multiprocessing_false_means_threads(pool_kwargs):
    compatmp.fit(
        tiny_model(), kd.ArrayDataset(), workers=2, use_multiprocessing=False, epochs=1, verbose=0
    )
    assert pool_kwargs[-1]["start_method"] == "thread"


@pytest.mark.timeout(120)
def test_timeout_seed_and_worker_init_fn_reach_the_pool(pool_kwargs, monkeypatch):
    seen = []
    compatmp.predict(
        tiny_model(),
        kd.InputsOnlyDataset(),
        workers=2,
        start_method="thread",
        timeout=30,
        seed=7,
        worker_init_fn=seen.append,
        verbose=0,
    )
    assert pool_kwargs[-1]["timeout"] == 30
    assert pool_kwargs[-1]["seed"] == 7
    assert sorted(seen) == [0, 1]


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"use_multiprocessing": "yes"}, TypeError, "use_multiprocessing must be True, False"),
        ({"use_multiprocessing": True, "start_method": "thread"}, ValueError, "pass one of"),
        ({"use_multiprocessing": False, "start_method": "spawn"}, ValueError, "pass one of"),
        ({"timeout": -1}, ValueError, "timeout must be None"),
        ({"seed": "7"}, TypeError, "seed must be an int"),
        ({"worker_init_fn": 3}, TypeError, "worker_init_fn must be a callable"),
        ({"max_queue_size": 0}, ValueError, "max_queue_size must be >= 1"),
    ],
)
def test_bad_loader_arguments_fail_before_workers_start(kwargs, error, match, no_pool):
    with pytest.raises(error, match=match):
        compatmp.fit(tiny_model(), kd.ArrayDataset(), verbose=0, **kwargs)


def test_open_pool_passes_the_options_to_ordered_pool():
    loader = ck.Loader(1, "thread", 3, timeout=5.0, seed=2, worker_init_fn=None)
    with ck._open_pool(kd.ArrayDataset(), loader, 1, "thread") as pool:
        assert isinstance(pool, OrderedPool)
        assert pool._timeout == 5.0 and pool._seed == 2 and pool._max_queue_size == 3


@pytest.mark.timeout(120)
def test_torch_dataloader_goes_to_model_fit_unchanged(no_pool):
    torch = pytest.importorskip("torch")
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(torch.from_numpy(X), torch.from_numpy(Y)), batch_size=8
    )
    expected = tiny_model().fit(loader, epochs=2, verbose=0)
    got = compatmp.fit(tiny_model(), loader, epochs=2, verbose=0)
    kd.assert_same_history(got, expected)
