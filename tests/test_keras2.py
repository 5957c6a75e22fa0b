"""compatmp.fit/evaluate/predict with Keras 2 models (tf_keras), against plain Keras 2.

Issue 10's seed: a Keras 2 ``Sequence`` holding a ``threading.Lock``, trained with
``use_multiprocessing=True`` - under spawn, plain Keras 2 fails to pickle it; compatmp trains,
evaluates and predicts with it. The flavour comes from the model: Keras 3 (imported by other
test modules in the same session) and tf_keras live side by side here. How Keras 2 asks for
batches: NOTE [ How Keras 2 drives a Sequence ] in compatmp/_keras2.py. ``.ci/run`` also runs
this file in a second venv with ``TF_USE_LEGACY_KERAS=1``, where ``tf.keras`` is tf_keras.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import random
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import keras2_datasets as k2
import numpy as np
import pytest

tf_keras = k2.keras2_module()  # tf_keras, or TF 2.15's built-in Keras 2.15
if tf_keras is None:
    pytest.skip("no Keras 2 here: pip install tf_keras (or TF <= 2.15)", allow_module_level=True)
import keras_datasets as kd  # noqa: E402

import compatmp  # noqa: E402
from compatmp import ThreadFallbackWarning, available_methods  # noqa: E402
from compatmp._keras2 import keras_flavour  # noqa: E402
from compatmp._worker import RemoteTraceback  # noqa: E402

pytestmark = [pytest.mark.keras, pytest.mark.usefixtures("no_leaked_workers")]

PROCESS_METHODS = available_methods()
REPO = Path(__file__).resolve().parents[1]


def tiny_model(seed: int = 1):
    tf_keras.utils.set_random_seed(seed)
    model = tf_keras.Sequential([tf_keras.Input((kd.N_FEATURES,)), tf_keras.layers.Dense(1)])
    model.compile(optimizer=tf_keras.optimizers.SGD(0.05), loss="mse", metrics=["mae"])
    return model


def recording_model(n_samples: int, seed: int = 1):
    """A Keras 2 model that records the sample ids of its training batches, in order."""

    class Recording(tf_keras.Sequential):
        def train_step(self, data):
            self.seen.append(kd.ids_of(data[0].numpy(), n_samples))
            return super().train_step(data)

    tf_keras.utils.set_random_seed(seed)
    model = Recording([tf_keras.Input((kd.N_FEATURES,)), tf_keras.layers.Dense(1)])
    model.seen = []
    model.compile(optimizer=tf_keras.optimizers.SGD(0.05), loss="mse", run_eagerly=True)
    return model


def test_flavour_comes_from_the_model():
    assert keras_flavour(tiny_model()) == (2, tf_keras.__name__)
    assert keras_flavour(object()) is None


@pytest.mark.timeout(240)
@pytest.mark.parametrize("method", PROCESS_METHODS)
def test_locked_sequence_trains_evaluates_and_predicts_in_processes(method):
    # The seed: model.fit(seq, workers=2, use_multiprocessing=True, max_queue_size=4).
    seq = k2.sequence_class()
    expected = tiny_model().fit(
        seq(48, 8, reshuffle=True),
        validation_data=seq(16, 8, seed=5),
        epochs=2,
        shuffle=False,
        verbose=0,
    )
    model = tiny_model()
    with warnings.catch_warnings():
        warnings.simplefilter("error", ThreadFallbackWarning)
        got = compatmp.fit(
            model,
            seq(48, 8, reshuffle=True),
            validation_data=seq(16, 8, seed=5),
            epochs=2,
            shuffle=False,
            verbose=0,
            workers=2,
            use_multiprocessing=True,
            max_queue_size=4,
            start_method=method,
        )
        kd.assert_same_history(got, expected)
        loss = compatmp.evaluate(model, seq(48, 8), workers=2, start_method=method, verbose=0)
        np.testing.assert_allclose(loss, model.evaluate(seq(48, 8), verbose=0), rtol=1e-6)
        predicted = compatmp.predict(model, seq(48, 8), workers=2, start_method=method, verbose=0)
    np.testing.assert_allclose(
        predicted, model.predict(k2.inputs(48), batch_size=8, verbose=0), rtol=1e-6
    )


@pytest.mark.timeout(120)
def test_keras2_positional_loader_arguments():
    # Keras 2's fit(x, y, batch_size, epochs, verbose, callbacks, validation_split,
    # validation_data, shuffle, class_weight, sample_weight, initial_epoch, steps_per_epoch,
    # validation_steps, validation_batch_size, validation_freq, max_queue_size, workers,
    # use_multiprocessing): the last three go to compatmp's loader.
    seq = k2.sequence_class()
    args = [
        None,
        None,
        2,
        0,
        None,
        0.0,
        None,
        False,
        None,
        None,
        0,
        None,
        None,
        None,
        1,
        4,
        2,
        False,
    ]
    got = compatmp.fit(tiny_model(), seq(48, 8), *args)
    expected = tiny_model().fit(seq(48, 8), epochs=2, shuffle=False, verbose=0)
    kd.assert_same_history(got, expected)
    with pytest.raises(TypeError, match="multiple values for argument 'workers'"):
        compatmp.fit(tiny_model(), seq(48, 8), *args, workers=2)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("method", ["thread", "spawn"])
def test_shuffle_and_on_epoch_end_state_match_plain_keras2(method):
    n = 40
    seq = k2.sequence_class()
    random.seed(7)
    plain = recording_model(n)
    plain.fit(seq(n, 8, reshuffle=True), epochs=3, verbose=0)  # shuffle=True: Keras' default
    random.seed(7)
    model = recording_model(n)
    dataset = seq(n, 8, reshuffle=True)
    compatmp.fit(model, dataset, workers=2, start_method=method, epochs=3, verbose=0)
    assert len(model.seen) == len(plain.seen) == 15
    for got, expected in zip(model.seen, plain.seen, strict=True):
        np.testing.assert_array_equal(got, expected)
    epochs = [np.concatenate(model.seen[i : i + 5]) for i in range(0, 15, 5)]
    assert all(sorted(e) == list(range(n)) for e in epochs)  # each sample once per epoch
    assert dataset.epochs_ended == 3  # Keras 2 never calls on_epoch_end before the first epoch


@pytest.mark.timeout(120)
def test_steps_per_epoch_below_length_restarts_each_epoch_like_keras2():
    n = 48
    seq = k2.sequence_class()
    plain = recording_model(n)
    plain.fit(seq(n, 8), epochs=3, steps_per_epoch=4, shuffle=False, verbose=0)
    model = recording_model(n)
    compatmp.fit(
        model,
        seq(n, 8),
        workers=2,
        start_method="thread",
        epochs=3,
        steps_per_epoch=4,
        shuffle=False,
        verbose=0,
    )
    got = [int(ids[0]) // 8 for ids in model.seen]
    assert got == [int(ids[0]) // 8 for ids in plain.seen] == [0, 1, 2, 3] * 3


@pytest.mark.timeout(120)
def test_validation_and_plain_classes_come_from_worker_processes():
    # A plain __len__/__getitem__ class works with a Keras 2 model too (the proxy is a
    # Sequence); both datasets refuse to load in this process.
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


@pytest.mark.timeout(120)
@pytest.mark.parametrize("method", ["spawn", "thread"])
def test_dataset_exception_keeps_its_type(method):
    with pytest.raises(KeyError, match="raised on purpose") as info:
        compatmp.fit(
            tiny_model(),
            kd.FailingDataset(fail_at=2),
            workers=2,
            start_method=method,
            shuffle=False,
            verbose=0,
        )
    assert isinstance(info.value.__cause__, RemoteTraceback)


# Issue 20: where compatmp rejects what Keras 2 rejects, tf_keras' own message and type (NOTE
# [ Keras' own error messages ] in compatmp/_keras.py); tf_keras' own test
# test_sequence_input_to_fit_eval_predict expects ValueError matching "`y` argument is not
# supported" for y= with a Sequence.
def _sequence():
    return k2.sequence_class()(48, 8)


def _generator():
    return kd.batch_generator(2)


_KERAS2_REJECTS = {
    "y with a Sequence": ("fit", _sequence, {"y": np.zeros(48)}),
    "sample_weight with a Sequence": ("fit", _sequence, {"sample_weight": np.ones(48)}),
    "y with a Sequence (evaluate)": ("evaluate", _sequence, {"y": np.zeros(48)}),
    "y with a generator": ("fit", _generator, {"y": np.zeros(16)}),
    "sample_weight with a generator": ("evaluate", _generator, {"sample_weight": np.ones(16)}),
    "validation_split with a Sequence": ("fit", _sequence, {"validation_split": 0.5}),
    # (an int is no example here: tf_keras takes it for a tensor, then fails with IndexError)
    "x is an object": ("fit", object, {}),
    "x is a generator function": ("predict", lambda: _generator, {}),
}


@pytest.mark.parametrize("case", sorted(_KERAS2_REJECTS))
def test_rejections_carry_keras2_own_message_and_type(case, monkeypatch):
    fn, make_x, kwargs = _KERAS2_REJECTS[case]
    kd.assert_rejected_with_keras_message(tiny_model, fn, make_x(), kwargs, monkeypatch)


@pytest.mark.parametrize("fn", ["fit", "evaluate"])
def test_y_argument_message_of_tf_keras_own_sequence_test(fn):
    # The assertion of tf_keras' test_sequence_input_to_fit_eval_predict, on compatmp.
    with pytest.raises(ValueError, match="`y` argument is not supported"):
        getattr(compatmp, fn)(tiny_model(), _sequence(), np.zeros(48), verbose=0)


def test_empty_y_is_accepted_as_in_keras2():
    # tf_keras checks is_none_or_empty(y): y=[] is no target at all.
    expected = tiny_model().evaluate(_sequence(), y=[], verbose=0)
    got = compatmp.evaluate(tiny_model(), _sequence(), y=[], workers=0, verbose=0)
    np.testing.assert_allclose(got, expected, rtol=1e-6)


@pytest.mark.timeout(120)
def test_generator_and_arrays():
    expected = tiny_model().fit(kd.batch_generator(30), steps_per_epoch=5, epochs=3, verbose=0)
    with pytest.warns(ThreadFallbackWarning):
        got = compatmp.fit(
            tiny_model(), kd.batch_generator(30), steps_per_epoch=5, epochs=3, verbose=0
        )
    kd.assert_same_history(got, expected)
    x, y = kd.make_arrays(48)
    expected = tiny_model().fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0)
    got = compatmp.fit(tiny_model(), x, y, 8, 2, 0, shuffle=False)
    kd.assert_same_history(got, expected)


_LEGACY_SCRIPT = textwrap.dedent(
    """
    # README "Coming from Keras 2 / fit_generator", with TF_USE_LEGACY_KERAS=1.
    import threading

    import numpy as np
    import tensorflow as tf

    import compatmp


    class MySequence(tf.keras.utils.Sequence):
        def __init__(self, x, y, batch_size):
            self.x, self.y, self.batch_size = x, y, batch_size
            self.lock = threading.Lock()  # "cannot pickle '_thread.lock'" in plain Keras

        def __len__(self):
            return -(-len(self.x) // self.batch_size)

        def __getitem__(self, i):
            with self.lock:
                s = slice(i * self.batch_size, (i + 1) * self.batch_size)
                return self.x[s], self.y[s]


    if __name__ == "__main__":
        x = np.random.default_rng(0).normal(size=(64, 3)).astype("float32")
        y = x.sum(axis=1, keepdims=True)
        model = tf.keras.Sequential([tf.keras.Input((3,)), tf.keras.layers.Dense(1)])
        model.compile("sgd", "mse")
        assert type(model).__module__.startswith("tf_keras"), type(model)
        seq = MySequence(x, y, 16)
        # was: model.fit(seq, epochs=2, workers=2, use_multiprocessing=True)
        compatmp.fit(model, seq, epochs=2, workers=2, use_multiprocessing=True, verbose=0,
                     start_method="spawn")
        got = compatmp.predict(model, seq, workers=2, start_method="spawn", verbose=0)
        np.testing.assert_allclose(got, model.predict(x, verbose=0), rtol=1e-5, atol=1e-6)
        print("legacy keras ok")
    """
)


@pytest.mark.timeout(240)
def test_readme_snippet_in_legacy_mode(tmp_path):
    script = tmp_path / "legacy.py"
    script.write_text(_LEGACY_SCRIPT)
    env = {**os.environ, "TF_USE_LEGACY_KERAS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=200
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "legacy keras ok" in proc.stdout


# Issue 18: a Keras 2 Sequence subclass travels on compatmp._standin.SequenceStandIn, so a spawn
# worker imports neither tf_keras nor TensorFlow unless the dataset's own code uses them (NOTE
# [ PyDataset stand-in ]). Checked in a fresh interpreter: the test session imported both.
K2_MODULE = """
import sys
import tf_keras

class ModuleSequence(tf_keras.utils.Sequence):
    def __len__(self):
        return 4

    def __getitem__(self, i):
        return i, "tensorflow" in sys.modules, "tf_keras" in sys.modules
"""

K2_SCRIPT = """
import sys
import numpy as np
import tensorflow as tf
import tf_keras
import compatmp
from k2data import ModuleSequence

class ScriptSequence(tf_keras.utils.Sequence):
    def __len__(self):
        return 4

    def __getitem__(self, i):
        return i, "tensorflow" in sys.modules, "tf_keras" in sys.modules

class UsesTF(ScriptSequence):
    def __getitem__(self, i):
        return int(tf.add(i, 1).numpy()), "tensorflow" in sys.modules

class Batches(tf_keras.utils.Sequence):
    def __len__(self):
        return 4

    def __getitem__(self, i):
        flag = float("tensorflow" in sys.modules)
        return np.full((2, 3), flag, "float32"), np.full((2, 1), float(i), "float32")

if __name__ == "__main__":
    for name, ds in [("script", ScriptSequence()), ("module", ModuleSequence())]:
        with compatmp.OrderedPool(ds, workers=2, start_method="spawn") as pool:
            print(name, list(pool.imap(range(4))))
    with compatmp.OrderedPool(UsesTF(), workers=1, start_method="spawn") as pool:
        print("uses", list(pool.imap(range(2))))
    model = tf_keras.Sequential([tf_keras.Input((3,)), tf_keras.layers.Dense(1)])
    model.compile("sgd", "mse")
    compatmp.fit(model, Batches(), epochs=1, workers=2, start_method="spawn", verbose=0)
    out = compatmp.predict(model, Batches(), workers=2, start_method="spawn", verbose=0)
    print("predict", out.shape)
"""


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_spawn_workers_of_a_keras2_sequence_import_no_tensorflow(tmp_path):
    pytest.importorskip("tf_keras")
    (tmp_path / "k2data.py").write_text(textwrap.dedent(K2_MODULE))
    script = tmp_path / "train.py"
    script.write_text(textwrap.dedent(K2_SCRIPT))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(tmp_path)])}
    out = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        timeout=280,
        env=env,
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    lines = dict(line.split(" ", 1) for line in out.stdout.splitlines() if " " in line)
    assert lines["script"] == str([(i, False, False) for i in range(4)])
    assert lines["module"] == str([(i, False, False) for i in range(4)])
    # Code that calls TensorFlow still works: cloudpickle sends `tf` by name, the worker
    # imports it.
    assert lines["uses"] == str([(1, True), (2, True)])
    assert lines["predict"] == "(8, 1)"


@pytest.mark.timeout(300)
def test_keras2_calls_keep_their_workers_and_match_fresh_ones():
    """NOTE [ Reused workers ]: the Keras 2 path leases the same pool; fit -> evaluate ->
    predict start each spawn worker once and give what fresh workers give."""
    from compatmp import _reuse

    def script(idle_timeout):
        loader = dict(workers=2, start_method="spawn", seed=3, idle_timeout=idle_timeout)
        model = tiny_model()
        pools = []
        history = compatmp.fit(model, k2.sequence_class()(48, 8), epochs=2, verbose=0, **loader)
        pools.append(list(_reuse._idle.values()))
        metrics = compatmp.evaluate(model, kd.ArrayDataset(40, 8), verbose=0, **loader)
        pools.append(list(_reuse._idle.values()))
        got = compatmp.predict(model, kd.InputsOnlyDataset(24, 8), verbose=0, **loader)
        pools.append(list(_reuse._idle.values()))
        return history, metrics, got, pools

    history, metrics, got, pools = script(30)
    (kept,) = {entry[0] for entries in pools for entry in entries}
    assert all(len(entries) == 1 for entries in pools)
    compatmp.shutdown()
    assert kept.closed
    fresh_history, fresh_metrics, fresh_got, fresh_pools = script(0)
    assert fresh_pools == [[], [], []]
    kd.assert_same_history(history, fresh_history)
    np.testing.assert_allclose(metrics, fresh_metrics, rtol=1e-6)
    np.testing.assert_allclose(got, fresh_got, rtol=1e-6)
