"""Tests for compatmp.fit / evaluate / predict (compatmp/_keras.py) against plain Keras.

Most tests compare compatmp with what plain Keras does on the same data and the same initial
weights: the same History (keys, epochs and values), the same batches in the same order, the
same predictions. Datasets live in tests/keras_datasets.py so worker processes can import them;
most are plain classes that import only NumPy, so a spawned worker starts in well under a
second. Every test that starts workers checks afterwards that none is left
(``no_leaked_workers`` in conftest.py).
"""

from __future__ import annotations

import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import functools
import importlib.util
import random
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import numpy as np
import pytest

keras = pytest.importorskip("keras", minversion="3")

import keras_datasets as kd  # noqa: E402

import compatmp  # noqa: E402
from compatmp import ThreadFallbackWarning, WorkerCrashedError, available_methods  # noqa: E402
from compatmp._feeder import _Feeder, _PoolState, _Source  # noqa: E402
from compatmp._fitargs import DEFAULT_MAX_WORKERS, Loader  # noqa: E402
from compatmp._pool import OrderedPool  # noqa: E402
from compatmp._worker import RemoteTraceback  # noqa: E402

pytestmark = [pytest.mark.keras, pytest.mark.usefixtures("no_leaked_workers")]

METHODS = [*available_methods(), "thread"]
PROCESS_METHODS = available_methods()
# Seconds within which a crashed worker must be reported: detection is immediate (sentinel),
# the rest is pool shutdown (~2 s at most) and Keras unwinding; a hang would blow far past it.
CRASH_REPORT_S = 30.0
REPO = Path(__file__).resolve().parents[1]


def tiny_model(seed: int = 1) -> keras.Model:
    """Dense(1) regression model, same initial weights for the same seed."""
    keras.utils.set_random_seed(seed)
    model = keras.Sequential([keras.Input((kd.N_FEATURES,)), keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse", metrics=["mae"])
    return model


def identity_model() -> keras.Model:
    """predict() returns exactly the inputs the workers produced."""
    return keras.Sequential([keras.Input((kd.N_FEATURES,)), keras.layers.Identity()])


class RecordingModel(keras.Sequential):
    """Records the sample ids of every training batch, in the order Keras trained on them."""

    def __init__(self, n_samples: int, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.n_samples = n_samples
        self.seen: list[np.ndarray] = []

    def train_step(self, data):
        x = data[0]
        self.seen.append(kd.ids_of(keras.ops.convert_to_numpy(x), self.n_samples))
        return super().train_step(data)


def recording_model(n_samples: int, seed: int = 1) -> RecordingModel:
    """A model that records its training batches; run eagerly so train_step sees arrays."""
    keras.utils.set_random_seed(seed)
    model = RecordingModel(n_samples, [keras.Input((kd.N_FEATURES,)), keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse", run_eagerly=True)
    return model


# --------------------------------------------------------------------------------------------
# fit: History, order, reshuffle


@pytest.mark.timeout(120)
@pytest.mark.parametrize("method", METHODS)
def test_fit_history_matches_plain_keras(method):
    expected = tiny_model().fit(
        kd.pydataset_class()(reshuffle=True), epochs=3, shuffle=False, verbose=0
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error", ThreadFallbackWarning)
        got = compatmp.fit(
            tiny_model(),
            kd.ArrayDataset(reshuffle=True),
            workers=2,
            start_method=method,
            epochs=3,
            shuffle=False,
            verbose=0,
        )
    assert isinstance(got, keras.callbacks.History)
    kd.assert_same_history(got, expected)
    assert got.history["loss"][-1] < got.history["loss"][0]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("method", METHODS)
def test_on_epoch_end_reshuffle_reaches_workers(method):
    n = 40
    plain = recording_model(n)
    plain.fit(kd.pydataset_class()(n, 8, reshuffle=True), epochs=3, shuffle=False, verbose=0)
    model = recording_model(n)
    dataset = kd.ArrayDataset(n, 8, reshuffle=True)
    compatmp.fit(model, dataset, workers=2, start_method=method, epochs=3, shuffle=False, verbose=0)

    epochs = [np.concatenate(model.seen[i : i + 5]) for i in range(0, 15, 5)]
    for ids in epochs:  # every sample exactly once per epoch
        assert sorted(ids) == list(range(n))
    assert not np.array_equal(epochs[0], epochs[1])  # the reshuffle took effect...
    # ...exactly as in plain Keras: same batches, same order, every epoch.
    assert len(model.seen) == len(plain.seen) == 15
    for got, expected in zip(model.seen, plain.seen, strict=True):
        np.testing.assert_array_equal(got, expected)
    # Keras calls on_epoch_end once before training (EpochIterator.reset) and after each epoch.
    assert dataset.epochs_ended == 4


class XRecordingModel(keras.Sequential):
    """Records every training batch's features, in the order Keras trained on them."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.seen: list[np.ndarray] = []

    def train_step(self, data):
        self.seen.append(keras.ops.convert_to_numpy(data[0]).copy())
        return super().train_step(data)


def x_recording_model() -> XRecordingModel:
    keras.utils.set_random_seed(1)
    model = XRecordingModel([keras.Input((kd.N_FEATURES,)), keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse", run_eagerly=True)
    return model


@pytest.mark.timeout(300)
@pytest.mark.parametrize("method", ["thread", PROCESS_METHODS[-1]])
def test_resumed_fit_sees_exactly_the_batches_of_the_uninterrupted_epoch(method):
    """issue 17.7: with seed=, epoch k's batches (order and augmentation) depend on
    (seed, k, index) only, so fit(initial_epoch=k) replays epoch k, validation or not."""
    n, per_epoch = 40, 5

    def run(initial_epoch, validation, seed=7):
        model = x_recording_model()
        random.seed(initial_epoch)  # the global RNG differs: it must not matter with seed=
        extra = {"validation_data": kd.AugmentedDataset(16, 8, seed=5)} if validation else {}
        compatmp.fit(
            model,
            kd.AugmentedDataset(n, 8),
            workers=2,
            start_method=method,
            seed=seed,
            epochs=3,
            initial_epoch=initial_epoch,
            verbose=0,
            **extra,
        )
        return model.seen

    full = run(0, validation=True)
    assert len(full) == 3 * per_epoch
    resumed = run(2, validation=False)
    assert len(resumed) == per_epoch
    for got, expected in zip(resumed, full[2 * per_epoch :], strict=True):
        np.testing.assert_array_equal(got, expected)
    # Epochs differ from each other (order and noise), and another seed differs too.
    assert not np.array_equal(np.concatenate(full[:per_epoch]), np.concatenate(full[-per_epoch:]))
    other = run(2, validation=False, seed=8)
    assert not all(np.array_equal(a, b) for a, b in zip(other, resumed, strict=True))


@pytest.mark.timeout(120)
def test_shuffle_true_visits_batches_in_the_order_keras_would():
    n = 48
    random.seed(123)
    plain = recording_model(n)
    plain.fit(kd.pydataset_class()(n, 8), epochs=3, verbose=0)  # shuffle=True: Keras' default
    random.seed(123)
    model = recording_model(n)
    compatmp.fit(
        model, kd.ArrayDataset(n, 8), workers=2, start_method="thread", epochs=3, verbose=0
    )

    batch_ids = [int(ids[0]) // 8 for ids in model.seen]
    epochs = [batch_ids[i : i + 6] for i in range(0, 18, 6)]
    assert all(sorted(e) == list(range(6)) for e in epochs)  # each batch once per epoch
    assert any(e != list(range(6)) for e in epochs)  # and not in index order
    for got, expected in zip(model.seen, plain.seen, strict=True):
        np.testing.assert_array_equal(got, expected)


@pytest.mark.timeout(120)
def test_steps_per_epoch_below_length_continues_the_pass_like_keras():
    # Keras keeps one pass across epochs when steps_per_epoch < len (epoch_iterator.py):
    # with 6 batches and steps_per_epoch=4, epochs get positions 0-3, 4-5 ("ran out of
    # data"), 0-3, 4-5. Which dataset state a batch near an epoch boundary sees depends on
    # TensorFlow's prefetch timing, in plain Keras too, so this compares positions, not states.
    n, batch = 48, 8
    model = recording_model(n)
    plain = recording_model(n)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # Keras' "ran out of data", in both
        plain.fit(
            kd.pydataset_class()(n, batch, reshuffle=True),
            epochs=4,
            steps_per_epoch=4,
            shuffle=False,
            verbose=0,
        )
        compatmp.fit(
            model,
            kd.ArrayDataset(n, batch, reshuffle=True),
            workers=2,
            start_method="thread",
            epochs=4,
            steps_per_epoch=4,
            shuffle=False,
            verbose=0,
        )
    replay = kd.ArrayDataset(n, batch, reshuffle=True)
    states = [replay.order.copy()]
    for _ in range(6):
        replay.on_epoch_end()
        states.append(replay.order.copy())

    def position(ids: np.ndarray) -> int:
        found = {
            p
            for order in states
            for p in range(n // batch)
            if np.array_equal(order[p * batch : (p + 1) * batch], ids)
        }
        assert len(found) == 1, ids
        return found.pop()

    assert [position(ids) for ids in model.seen] == [position(ids) for ids in plain.seen]
    assert [position(ids) for ids in model.seen] == [0, 1, 2, 3, 4, 5] * 2


@pytest.mark.timeout(60)
@pytest.mark.parametrize("method", ["spawn", "thread"])
def test_state_changed_in_on_epoch_end_reaches_prefetched_positions(method):
    # A pass interrupted by on_epoch_end (steps_per_epoch < len) resumes with the new state:
    # the batches the pool had prefetched with the old order are dropped.
    dataset = kd.ArrayDataset(48, 8, reshuffle=True)
    with OrderedPool(dataset, workers=2, start_method=method, max_queue_size=6) as pool:
        feeder = _Feeder(
            dataset, _Source(dataset, _PoolState(pool, dataset)), 6, shuffle=False, what="x"
        )
        feeder.epoch_begin()
        for p in range(4):  # positions 4 and 5 are prefetched meanwhile, with the old order
            np.testing.assert_array_equal(feeder.get(p)[0], dataset[p][0])
        old_rows = dataset.rows(4).copy()
        feeder.epoch_end()  # reshuffles dataset.order in this process
        feeder.epoch_begin()
        x4 = feeder.get(4)[0]
    assert not np.array_equal(dataset.rows(4), old_rows)
    np.testing.assert_array_equal(kd.ids_of(x4, 48), dataset.rows(4))


@pytest.mark.timeout(120)
@pytest.mark.parametrize("method", ["spawn", "thread"])
def test_validation_dataset_is_loaded_by_the_workers(method):
    expected = tiny_model().fit(
        kd.pydataset_class()(reshuffle=True),
        validation_data=kd.pydataset_class()(16, 8, seed=5),
        epochs=2,
        shuffle=False,
        verbose=0,
    )
    got = compatmp.fit(
        tiny_model(),
        kd.ArrayDataset(reshuffle=True),
        validation_data=kd.ArrayDataset(16, 8, seed=5),
        workers=2,
        start_method=method,
        epochs=2,
        shuffle=False,
        verbose=0,
    )
    assert "val_loss" in got.history
    kd.assert_same_history(got, expected)


@pytest.mark.timeout(60)
def test_validation_batches_come_from_worker_processes():
    # Both datasets refuse to load in this process: every batch, training and validation,
    # must come from the (shared) worker processes.
    got = compatmp.fit(
        tiny_model(),
        kd.MainProcessForbidden(os.getpid()),
        validation_data=kd.MainProcessForbidden(os.getpid(), 16, 8, seed=5),
        workers=2,
        start_method="spawn",
        epochs=2,
        verbose=0,
    )
    assert len(got.history["val_loss"]) == 2


def test_keras_sequence_is_pydataset():
    # Keras 3 exports PyDataset under both names (py_dataset_adapter.py, keras_export), so
    # legacy Sequence subclasses take the same path.
    assert keras.utils.Sequence is keras.utils.PyDataset


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_keras_pydataset_under_spawn_uses_its_own_workers_setting():
    # A real PyDataset subclass: spawned workers import Keras to unpickle it (~5 s here).
    dataset = kd.pydataset_class()(reshuffle=True, workers=2)
    assert _resolve_workers(dataset, None) == 2
    expected = tiny_model().fit(
        kd.pydataset_class()(reshuffle=True), epochs=2, shuffle=False, verbose=0
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error", ThreadFallbackWarning)
        got = compatmp.fit(
            tiny_model(), dataset, start_method="spawn", epochs=2, shuffle=False, verbose=0
        )
    kd.assert_same_history(got, expected)


def _resolve_workers(x, workers):
    return Loader.resolve(
        x,
        workers=workers,
        use_multiprocessing=None,
        max_queue_size=None,
        start_method="auto",
        timeout=None,
        seed=None,
        worker_init_fn=None,
    ).workers


def test_workers_none_resolution():
    cpus = min(DEFAULT_MAX_WORKERS, os.cpu_count() or 1)
    assert _resolve_workers(kd.ArrayDataset(), None) == cpus
    assert _resolve_workers(kd.ArrayDataset(), 3) == 3
    assert _resolve_workers(kd.pydataset_class()(workers=5), None) == 5
    assert _resolve_workers(kd.pydataset_class()(workers=1), None) == cpus  # 1 = Keras default


# --------------------------------------------------------------------------------------------
# predict / evaluate


@pytest.mark.timeout(120)
@pytest.mark.parametrize("method", METHODS)
def test_predict_rows_in_dataset_order(method):
    n = 50  # 7 batches, the last one smaller
    dataset = kd.InputsOnlyDataset(n, 8)
    got = compatmp.predict(identity_model(), dataset, workers=2, start_method=method, verbose=0)
    np.testing.assert_array_equal(kd.ids_of(got, n), np.arange(n))
    np.testing.assert_allclose(got, dataset.x)
    model = tiny_model()
    expected = model.predict(kd.pydataset_class()(n, 8), verbose=0)
    got = compatmp.predict(model, dataset, workers=2, start_method=method, verbose=0)
    np.testing.assert_allclose(got, expected, rtol=1e-6)


def test_workers_zero_loads_in_the_main_process_without_a_pool(monkeypatch):
    monkeypatch.setattr("compatmp._keras._open_pool", lambda *a, **k: pytest.fail("pool"))
    got = compatmp.predict(identity_model(), kd.PidDataset(24, 8), workers=0, verbose=0)
    assert set(got[:, 1].astype(int)) == {os.getpid()}
    with warnings.catch_warnings():
        warnings.simplefilter("error", ThreadFallbackWarning)  # no thread either
        history = compatmp.fit(
            tiny_model(), kd.batch_generator(6), workers=0, steps_per_epoch=3, epochs=2, verbose=0
        )
    assert len(history.history["loss"]) == 2


@pytest.mark.timeout(60)
def test_unpicklable_dataset_falls_back_to_threads_with_a_warning():
    with pytest.warns(ThreadFallbackWarning, match=r"dataset\.conn"):
        got = compatmp.predict(
            identity_model(), kd.SqliteDataset(24, 8), workers=2, start_method="spawn", verbose=0
        )
    assert set(got[:, 1].astype(int)) == {os.getpid()}  # threads of this process
    np.testing.assert_array_equal(kd.ids_of(got, 24), np.arange(24))


@pytest.mark.timeout(60)
def test_lock_and_lambda_dataset_runs_in_spawned_processes():
    dataset = kd.LockLambdaDataset(48, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ThreadFallbackWarning)
        got = compatmp.predict(identity_model(), dataset, workers=2, start_method="spawn")
    pids = set(got[:, 1].astype(int))
    assert os.getpid() not in pids
    assert len(pids) == 2  # both workers loaded batches
    np.testing.assert_array_equal(kd.ids_of(got, 48), np.arange(48))


@pytest.mark.timeout(120)
@pytest.mark.parametrize("method", ["spawn", "thread"])
def test_evaluate_matches_plain_keras(method):
    model = tiny_model()
    expected = model.evaluate(kd.pydataset_class()(40, 8), verbose=0, return_dict=True)
    got = compatmp.evaluate(
        model, kd.WeightedDataset(40, 8), workers=2, start_method=method, verbose=0
    )
    assert isinstance(got, list)
    np.testing.assert_allclose(got, [expected["loss"], expected["mae"]], rtol=1e-6)


# --------------------------------------------------------------------------------------------
# generators


@pytest.mark.timeout(60)
def test_generator_is_loaded_by_a_thread_in_order():
    expected = tiny_model().fit(
        kd.batch_generator(30), steps_per_epoch=5, epochs=3, shuffle=False, verbose=0
    )
    with pytest.warns(ThreadFallbackWarning, match="generator cannot be shared between processes"):
        got = compatmp.fit(
            tiny_model(), kd.batch_generator(30), steps_per_epoch=5, epochs=3, verbose=0
        )
    kd.assert_same_history(got, expected)  # same batches in the same order


@pytest.mark.timeout(60)
def test_generator_predict_keeps_order():
    gen = ((x,) for x, _ in kd.batch_generator(7))
    with warnings.catch_warnings(), pytest.warns(ThreadFallbackWarning):
        # Keras warns "ran out of data" at the end of any generator given without steps.
        warnings.filterwarnings("ignore", "Your input ran out of data", UserWarning)
        got = compatmp.predict(identity_model(), gen, verbose=0)
    np.testing.assert_array_equal(kd.ids_of(got, 56), np.arange(56))


@pytest.mark.timeout(60)
def test_generator_with_a_validation_dataset_loaded_by_processes():
    with pytest.warns(ThreadFallbackWarning):
        got = compatmp.fit(
            tiny_model(),
            kd.batch_generator(30),
            steps_per_epoch=5,
            epochs=2,
            validation_data=kd.MainProcessForbidden(os.getpid(), 16, 8, seed=5),
            workers=2,
            start_method="spawn",
            verbose=0,
        )
    assert len(got.history["val_loss"]) == 2


@pytest.mark.timeout(60)
def test_finite_generator_without_steps_per_epoch_behaves_as_in_keras():
    # Keras trains until the generator is exhausted, warns "ran out of data" and stops.
    with warnings.catch_warnings(record=True) as plain_warnings:
        warnings.simplefilter("always")
        expected = tiny_model().fit(kd.batch_generator(5), epochs=2, verbose=0)
    with warnings.catch_warnings(record=True) as got_warnings:
        warnings.simplefilter("always")
        got = compatmp.fit(tiny_model(), kd.batch_generator(5), epochs=2, verbose=0)
    kd.assert_same_history(got, expected)
    ran_out = [str(w.message) for w in plain_warnings if "ran out of data" in str(w.message)]
    assert ran_out == [str(w.message) for w in got_warnings if "ran out of data" in str(w.message)]


# --------------------------------------------------------------------------------------------
# failures: no hang, the right exception, no worker left


@pytest.mark.timeout(60)
@pytest.mark.parametrize("method", PROCESS_METHODS)
def test_worker_crash_raises_worker_crashed_error(method):
    start = time.monotonic()
    with pytest.raises(WorkerCrashedError) as info:
        compatmp.fit(
            tiny_model(),
            kd.CrashDataset(crash_at=3),
            workers=2,
            start_method=method,
            epochs=2,
            shuffle=False,
            verbose=0,
        )
    assert time.monotonic() - start < CRASH_REPORT_S
    assert info.value.exitcode == 7
    assert info.value.index == 3


@pytest.mark.timeout(60)
@pytest.mark.parametrize("method", ["spawn", "thread"])
def test_dataset_exception_keeps_its_type(method):
    # With the TF backend the error surfaces in a tf.data thread; compatmp re-raises the
    # original instead of TensorFlow's wrapper.
    with pytest.raises(KeyError, match="raised on purpose") as info:
        compatmp.fit(
            tiny_model(), kd.FailingDataset(fail_at=2), workers=2, start_method=method, verbose=0
        )
    assert isinstance(info.value.__cause__, RemoteTraceback)
    assert "in __getitem__" in str(info.value.__cause__)  # the worker's own traceback


@pytest.mark.timeout(60)
@pytest.mark.parametrize("method", ["spawn", "thread"])
def test_structure_change_is_a_clear_error(method):
    with pytest.raises(ValueError) as info:
        compatmp.fit(
            tiny_model(),
            kd.ChangingStructureDataset(change_at=3),
            workers=2,
            start_method=method,
            shuffle=False,
            verbose=0,
        )
    message = str(info.value)
    assert "x[3] returned (array(rank 2),)" in message
    assert "x[0] returned (array(rank 2), array(rank 2))" in message


class _Boom(keras.callbacks.Callback):
    def __init__(self, exc: BaseException) -> None:
        super().__init__()
        self.exc = exc

    def on_train_batch_end(self, batch, logs=None):
        if batch == 2:
            raise self.exc


@pytest.mark.timeout(60)
@pytest.mark.parametrize("exc", [RuntimeError("callback failed"), KeyboardInterrupt()])
def test_callback_exception_or_ctrl_c_stops_the_workers(exc):
    # no_leaked_workers checks that no worker process is left afterwards.
    with pytest.raises(type(exc)):
        compatmp.fit(
            tiny_model(),
            kd.SlowDataset(96, 8, delay=0.05),
            workers=2,
            start_method="spawn",
            epochs=3,
            callbacks=[_Boom(exc)],
            verbose=0,
        )


# --------------------------------------------------------------------------------------------
# bad input: clear errors before any worker starts


def _generator_function():
    yield from kd.batch_generator(2)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"workers": -1}, ValueError, "workers must be >= 0; received -1"),
        ({"workers": True}, TypeError, "workers must be an int >= 0; received True"),
        ({"workers": 1.5}, TypeError, "received 1.5 of type float"),
        ({"workers": "2"}, TypeError, "received '2' of type str"),
        ({"max_queue_size": 0}, ValueError, "max_queue_size must be >= 1"),
        ({"x": 42}, TypeError, "received builtins.int 42"),
        ({"x": _generator_function}, TypeError, r"pass its result, f\(\), instead"),
        ({"x": kd.EmptyDataset()}, ValueError, r"x is empty: len\(x\) == 0"),
        ({"y": np.zeros(4)}, ValueError, "`y` should not be passed. Instead, the targets"),
    ],
)
def test_bad_input_fails_before_workers_start(kwargs, error, match, monkeypatch):
    started = []
    monkeypatch.setattr(
        "compatmp._keras._open_pool", lambda *a, **k: started.append(a) or pytest.fail("pool")
    )
    kwargs = {"x": kd.ArrayDataset(), **kwargs}
    x = kwargs.pop("x")
    with pytest.raises(error, match=match):
        compatmp.fit(tiny_model(), x, verbose=0, **kwargs)
    assert started == []


def _function_not_generator():
    yield kd.ArrayDataset()[0]


# Issue 20: where compatmp rejects what Keras rejects, Keras' own message and type (NOTE [ Keras'
# own error messages ] in compatmp/_keras.py), checked against the Keras installed here.
def _pydataset():
    return kd.pydataset_class()()


def _generator():
    return kd.batch_generator(2)


_KERAS_REJECTS = {
    "y with a PyDataset": ("fit", _pydataset, {"y": np.zeros(48)}),
    "sample_weight with a PyDataset": ("fit", _pydataset, {"sample_weight": np.ones(48)}),
    "y with a PyDataset (evaluate)": ("evaluate", _pydataset, {"y": np.zeros(48)}),
    "y with a generator": ("fit", _generator, {"y": np.zeros(16)}),
    "sample_weight with a generator": ("evaluate", _generator, {"sample_weight": np.ones(16)}),
    "validation_split with a PyDataset": ("fit", _pydataset, {"validation_split": 0.5}),
    "x is an int": ("fit", lambda: 42, {}),
    "x is a generator function": ("predict", lambda: _function_not_generator, {}),
}


@pytest.mark.parametrize("case", sorted(_KERAS_REJECTS))
def test_rejections_carry_keras_own_message_and_type(case, monkeypatch):
    fn, make_x, kwargs = _KERAS_REJECTS[case]
    ours = kd.assert_rejected_with_keras_message(tiny_model, fn, make_x(), kwargs, monkeypatch)
    if case.startswith("x is"):
        assert isinstance(ours, compatmp.UnsupportedInputError)
        assert isinstance(ours, TypeError)  # what compatmp raised before


def test_validation_split_is_ignored_with_validation_data_as_in_keras():
    # Keras applies validation_split only when validation_data is None; so does compatmp.
    def run(fit, **loader):
        return fit(
            kd.pydataset_class()(48, 8),
            validation_data=kd.pydataset_class()(16, 8),
            validation_split=0.5,
            epochs=2,
            shuffle=False,
            verbose=0,
            **loader,
        )

    expected = run(tiny_model().fit)
    got = run(functools.partial(compatmp.fit, tiny_model()), workers=0)
    kd.assert_same_history(got, expected)


def test_bad_start_method_is_a_start_method_error():
    with pytest.raises(compatmp.StartMethodError):
        compatmp.fit(tiny_model(), kd.ArrayDataset(), start_method="fork-please", verbose=0)


# --------------------------------------------------------------------------------------------
# the feeder on its own (no Keras, no pool)


def test_feeder_resyncs_when_asked_out_of_order():
    dataset = kd.ArrayDataset(48, 8)
    feeder = _Feeder(dataset, _Source(dataset), len(dataset), shuffle=False, what="x")
    feeder.epoch_begin()
    for position in (0, 1, 4, 5, 2):
        np.testing.assert_array_equal(feeder.get(position)[0], dataset[position][0])
    assert feeder.restarts == 2  # at 4 and at 2
    feeder.epoch_end()
    with pytest.raises(IndexError, match="out of range"):
        feeder.get(6)


# --------------------------------------------------------------------------------------------
# other backends

_TORCH_SCRIPT = textwrap.dedent(
    """
    import os, sys
    import numpy as np
    import keras
    import compatmp
    import keras_datasets as kd

    assert keras.backend.backend() == "torch", keras.backend.backend()
    keras.utils.set_random_seed(1)
    model = keras.Sequential([keras.Input((kd.N_FEATURES,)), keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse")
    weights = model.get_weights()
    plain = model.fit(kd.pydataset_class()(reshuffle=True), epochs=3, shuffle=False, verbose=0)
    model.set_weights(weights)
    model.optimizer = keras.optimizers.SGD(0.05)
    model.compile(optimizer=model.optimizer, loss="mse")
    got = compatmp.fit(model, kd.ArrayDataset(reshuffle=True), workers=2,
                       start_method="spawn", epochs=3, shuffle=False, verbose=0)
    np.testing.assert_allclose(got.history["loss"], plain.history["loss"], rtol=1e-5)
    pred = compatmp.predict(model, kd.InputsOnlyDataset(50, 8), workers=2,
                            start_method="spawn", verbose=0)
    np.testing.assert_allclose(pred, model.predict(kd.InputsOnlyDataset(50, 8).x, verbose=0),
                               rtol=1e-5)
    print("torch backend ok", got.history["loss"])
    """
)


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_torch_backend_in_a_subprocess():
    # The backend is fixed when Keras is imported, so this runs in its own interpreter.
    if importlib.util.find_spec("torch") is None:
        pytest.skip("torch is not installed (pip install torch==2.13.0, the CPU wheel)")
    env = {**os.environ, "KERAS_BACKEND": "torch"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "tests"), str(REPO)])
    proc = subprocess.run(
        [sys.executable, "-c", _TORCH_SCRIPT],
        capture_output=True,
        text=True,
        timeout=220,
        env=env,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "torch backend ok" in proc.stdout


# --------------------------------------------------------------------------------------------
# Workers kept between calls (NOTE [ Reused workers ] in compatmp/_reuse.py)

KEPT_METHODS = [m for m in ("forkserver", "spawn") if m in PROCESS_METHODS]


def _idle_pool() -> OrderedPool:
    from compatmp import _reuse

    (pool,) = [entry[0] for entry in _reuse._idle.values()]
    return pool


@pytest.mark.timeout(300)
@pytest.mark.parametrize("method", KEPT_METHODS)
def test_fit_evaluate_predict_start_each_worker_once_and_give_fresh_workers_results(method):
    def script(idle_timeout):
        loader = dict(workers=2, start_method=method, seed=5, idle_timeout=idle_timeout)
        model = tiny_model()
        dataset = kd.ArrayDataset(48, 8, reshuffle=True)
        history = compatmp.fit(model, dataset, epochs=2, verbose=0, **loader)
        pools = [_idle_pool() if idle_timeout else None]
        metrics = compatmp.evaluate(model, kd.ArrayDataset(40, 8), verbose=0, **loader)
        pools.append(_idle_pool() if idle_timeout else None)
        got = compatmp.predict(identity_model(), kd.PidDataset(24, 8), verbose=0, **loader)
        pools.append(_idle_pool() if idle_timeout else None)
        return history, metrics, got, pools

    history, metrics, got, pools = script(idle_timeout=30)
    assert pools[0] is pools[1] is pools[2] and not pools[0].closed
    pids = {h.pid for h in pools[0]._core.handles}
    assert set(got[:, 1].astype(int)) <= pids and len(pids) == 2  # two workers, started once
    compatmp.shutdown()
    assert pools[0].closed

    fresh_history, fresh_metrics, fresh_got, _ = script(idle_timeout=0)
    assert_same_history = kd.assert_same_history
    assert_same_history(history, fresh_history)
    np.testing.assert_allclose(metrics, fresh_metrics, rtol=1e-6)
    np.testing.assert_array_equal(got[:, [0, 2]], fresh_got[:, [0, 2]])
    assert not set(fresh_got[:, 1].astype(int)) & pids


@pytest.mark.timeout(300)
@pytest.mark.parametrize("method", KEPT_METHODS)
def test_a_failed_call_closes_the_kept_workers_and_the_next_call_starts_fresh(method):
    from compatmp import _reuse

    loader = dict(workers=2, start_method=method)
    compatmp.predict(identity_model(), kd.PidDataset(24, 8), verbose=0, **loader)
    kept = _idle_pool()
    with pytest.raises(KeyError):
        compatmp.fit(tiny_model(), kd.FailingDataset(fail_at=2), verbose=0, **loader)
    assert kept.closed and _reuse.idle_pools() == 0  # taken by the failing call, then closed
    got = compatmp.predict(identity_model(), kd.PidDataset(24, 8), verbose=0, **loader)
    assert not set(got[:, 1].astype(int)) & {h.pid for h in kept._core.handles}
    assert _idle_pool() is not kept


def test_idle_timeout_is_checked_before_any_worker_starts():
    with pytest.raises(ValueError, match="idle_timeout"):
        compatmp.predict(identity_model(), kd.PidDataset(24, 8), workers=2, idle_timeout=-1)


@pytest.mark.timeout(300)
def test_keyboard_interrupt_mid_fit_closes_the_kept_workers():
    from compatmp import _reuse

    class Interrupt(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            if batch == 2:
                raise KeyboardInterrupt

    loader = dict(workers=2, start_method=KEPT_METHODS[-1])
    compatmp.predict(identity_model(), kd.PidDataset(24, 8), verbose=0, **loader)
    kept = _idle_pool()
    with pytest.raises(KeyboardInterrupt):
        compatmp.fit(tiny_model(), kd.ArrayDataset(), callbacks=[Interrupt()], verbose=0, **loader)
    assert kept.closed and _reuse.idle_pools() == 0


@pytest.mark.timeout(300)
def test_calls_benchmark_sees_each_worker_start_once_with_reuse_and_three_times_without():
    from compatmp.bench import calls

    method = KEPT_METHODS[-1]
    assert calls.run_script(method, "plain", None)["starts"] == 2
    assert calls.run_script(method, "plain", 0)["starts"] == 6
