"""Keras' ImageDataGenerator iterators in worker processes (issue 10, item 4; issue 20).

``flow``, ``flow_from_directory`` and ``flow_from_dataframe`` iterators hold a lock and an
``index_generator`` (a generator object); compatmp sends them without the generator
(NOTE [ ImageDataGenerator iterators ] in compatmp/_keras_image.py), so they reach spawn
workers without a ThreadFallbackWarning and give the main process's predictions. The images
are scikit-learn's bundled digits written as PNG files (tests/image_helpers.py). Keras 3's
legacy module (``tensorflow.keras.preprocessing.image`` on Keras 3) and tf_keras' are both
checked; the iterator module is imported inside the tests.

Issue 20: shuffled iterators (Keras' default, ``seed=None``) draw their epoch order lazily; the
pool settles it in the main process (NOTE [ Settling Keras' image iterators ]), so every sample
is served exactly once per epoch under every start method - checked here against plain Keras
in one process, for fit (with validation), evaluate and predict.
"""

from __future__ import annotations

import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pickle
import warnings

import numpy as np
import pytest

keras = pytest.importorskip("keras")
pytest.importorskip("PIL")
pytest.importorskip("sklearn")

import image_helpers as ih  # noqa: E402
import keras2_datasets  # noqa: E402

import compatmp  # noqa: E402
from compatmp import ThreadFallbackWarning, available_methods  # noqa: E402
from compatmp._keras_image import NotSentGenerator, settle_image_iterator  # noqa: E402
from compatmp._settle import settle  # noqa: E402

pytestmark = [pytest.mark.keras, pytest.mark.usefixtures("no_leaked_workers")]

SIZE = ih.IMAGE_SIZE
METHODS = ["thread", *available_methods()]
N_IMAGES = 60


def _flavour(name):
    """(ImageDataGenerator, the Keras package) of Keras 3's legacy module or of Keras 2."""
    if name == "keras3":
        if not keras.__version__.startswith("3."):
            pytest.skip(f"Keras {keras.__version__} is not Keras 3")
        from keras.src.legacy.preprocessing.image import ImageDataGenerator

        return ImageDataGenerator, keras
    k2 = keras2_datasets.keras2_module()
    if k2 is None:
        pytest.skip("no Keras 2 here: pip install tf_keras (or TF <= 2.15)")
    return k2.preprocessing.image.ImageDataGenerator, k2


def _model(k):
    k.utils.set_random_seed(0)
    model = k.Sequential([k.Input((SIZE, SIZE, 1)), k.layers.Flatten(), k.layers.Dense(10)])
    model.compile("adam", k.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    return ih.digits_directory(tmp_path_factory.mktemp("digits"), 60)


def _iterators(image_data_generator, digits, **common):
    """``{kind: iterator}`` for the three kinds (``flow_from_dataframe`` if pandas is here);
    ``common``: ``batch_size``, ``shuffle``, ``seed`` (default: 8, False, None)."""
    root, names, classes = digits
    gen = image_data_generator(rescale=1 / 255.0)
    common = {"batch_size": 8, "shuffle": False, **common}
    out = {
        "flow_from_directory": gen.flow_from_directory(
            root, target_size=(SIZE, SIZE), color_mode="grayscale", class_mode="sparse", **common
        ),
    }
    x, y = ih.digits_arrays(N_IMAGES)
    out["flow"] = gen.flow(x, y, **common)
    try:
        import pandas
    except ImportError:  # flow_from_dataframe needs pandas (the test extra installs it)
        return out
    frame = pandas.DataFrame({"filename": names, "class": classes})
    out["flow_from_dataframe"] = gen.flow_from_dataframe(
        frame,
        directory=str(root),
        target_size=(SIZE, SIZE),
        color_mode="grayscale",
        class_mode="sparse",
        **common,
    )
    return out


@pytest.mark.timeout(300)
@pytest.mark.parametrize("flavour", ["keras3", "keras2"])
def test_image_iterators_train_and_predict_in_spawn_workers(flavour, digits):
    image_data_generator, k = _flavour(flavour)
    for name, iterator in _iterators(image_data_generator, digits).items():
        assert compatmp.find_unpicklable(iterator) == [], name
        model = _model(k)
        expected = model.predict(iterator, verbose=0)
        with warnings.catch_warnings():
            warnings.simplefilter("error", ThreadFallbackWarning)
            history = compatmp.fit(
                _model(k), iterator, workers=2, start_method="spawn", epochs=1, verbose=0
            )
            got = compatmp.predict(model, iterator, workers=2, start_method="spawn", verbose=0)
        assert np.isfinite(history.history["loss"]).all(), name
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6, err_msg=name)


def test_index_generator_is_replaced_and_next_still_works_in_the_main_process(digits):
    image_data_generator, _ = _flavour("keras3" if keras.__version__[0] == "3" else "keras2")
    iterator = _iterators(image_data_generator, digits)["flow"]
    copy = pickle.loads(compatmp.dumps(iterator))
    assert isinstance(copy.index_generator, NotSentGenerator)
    np.testing.assert_array_equal(copy[1][0], iterator[1][0])
    with pytest.raises(RuntimeError, match="index_generator was not sent to this worker"):
        next(copy)
    x, _ = next(iterator)  # the original keeps its generator
    assert x.shape == (8, SIZE, SIZE, 1)


def test_other_generator_attributes_are_still_reported():
    class Holder:
        def __init__(self):
            self.index_generator = (i for i in range(3))

    found = compatmp.find_unpicklable(Holder())
    assert [u.path for u in found] == ["dataset.index_generator"]


# --------------------------------------------------------------------------------------------
# issue 20: every sample exactly once per epoch, shuffled, under every start method


def _sample_ids(iterator_of_kind):
    """``{flattened image bytes: sample number}`` from the unshuffled iterator, in one process."""
    rows = np.concatenate([iterator_of_kind[i][0] for i in range(len(iterator_of_kind))])
    rows = rows.reshape(len(rows), -1)
    ids = {row.tobytes(): i for i, row in enumerate(rows)}
    assert len(ids) == N_IMAGES, "the digits must be distinct images to identify samples"
    return ids


def _recording_model(k, ids):
    """A model that records, per call kind, the sample numbers of every batch it is given."""

    def record(kind, data):
        x = data[0] if isinstance(data, (tuple, list)) else data
        rows = np.asarray(x).reshape(len(x), -1)
        model.seen[kind].extend(ids[row.tobytes()] for row in rows)

    # The batch is the last argument: JAX's steps take (state, data), the others (data).
    class Recording(k.Sequential):
        def train_step(self, *args):
            record("fit", args[-1])
            return super().train_step(*args)

        def test_step(self, *args):
            record("evaluate", args[-1])
            return super().test_step(*args)

        def predict_step(self, *args):
            record("predict", args[-1])
            return super().predict_step(*args)

    k.utils.set_random_seed(0)
    model = Recording([k.Input((SIZE, SIZE, 1)), k.layers.Flatten(), k.layers.Dense(1)])
    model.seen = {"fit": [], "evaluate": [], "predict": []}
    model.compile("sgd", "mse", run_eagerly=True)
    return model


def _epochs(seen, epochs):
    """Split a record into epochs of N_IMAGES samples; each must hold every sample once."""
    assert len(seen) == epochs * N_IMAGES, f"{len(seen)} samples for {epochs} epoch(s)"
    chunks = [seen[e * N_IMAGES : (e + 1) * N_IMAGES] for e in range(epochs)]
    for e, chunk in enumerate(chunks):
        twice = sorted({i for i in chunk if chunk.count(i) > 1})
        never = sorted(set(range(N_IMAGES)) - set(chunk))
        assert not twice and not never, f"epoch {e}: served twice {twice}, never {never}"
    return chunks


def _run(k, ids, fresh, method, evaluate):
    """fit (2 epochs, with validation), evaluate if asked, and predict on fresh shuffled
    iterators of one kind, through ``method`` with 2 workers (None: plain Keras in one
    process). Returns what the model saw."""
    model = _recording_model(k, ids)
    np.random.seed(1234)  # the iterators draw their order from NumPy's global RNG
    if method is None:
        model.fit(fresh(), validation_data=fresh(), epochs=2, verbose=0)
        if evaluate:
            model.evaluate(fresh(), verbose=0)
        np.random.seed(99)
        predictions = model.predict(fresh(), verbose=0)
    else:
        options = {"workers": 2, "start_method": method, "verbose": 0}
        with warnings.catch_warnings():
            warnings.simplefilter("error", ThreadFallbackWarning)
            compatmp.fit(model, fresh(), validation_data=fresh(), epochs=2, **options)
            if evaluate:
                compatmp.evaluate(model, fresh(), **options)
            np.random.seed(99)
            predictions = compatmp.predict(model, fresh(), **options)
    assert predictions.shape == (N_IMAGES, 1)
    return model.seen


# Every kind shuffled without a seed (Keras' default) under every method; with seed= and a
# separate evaluate call for flow only (the same Iterator base class; each case starts 2-3
# pools, which costs several seconds per spawn pool).
def _case(kind, method, seed):
    # Spawn and forkserver workers import TensorFlow (the iterator classes are Keras'): slow.
    slow = [pytest.mark.slow] if method in ("spawn", "forkserver") else []
    return pytest.param(kind, method, seed, marks=slow)


_EXACTLY_ONCE_CASES = [
    _case(kind, method, None)
    for kind in ("flow", "flow_from_directory", "flow_from_dataframe")
    for method in METHODS
] + [_case("flow", method, 7) for method in METHODS]


@pytest.mark.timeout(600)
@pytest.mark.parametrize("flavour", ["keras3", "keras2"])
@pytest.mark.parametrize(("kind", "method", "seed"), _EXACTLY_ONCE_CASES)
def test_shuffled_iterators_serve_every_sample_exactly_once(flavour, kind, method, seed, digits):
    image_data_generator, k = _flavour(flavour)
    if kind not in _iterators(image_data_generator, digits):
        pytest.skip("flow_from_dataframe needs pandas")
    ids = _sample_ids(_iterators(image_data_generator, digits)[kind])

    def fresh():
        return _iterators(image_data_generator, digits, shuffle=True, seed=seed)[kind]

    evaluate = seed is not None
    expected = _run(k, ids, fresh, None, evaluate)
    got = _run(k, ids, fresh, method, evaluate)
    for seen in (expected, got):  # plain Keras too: the premise of the comparison
        _epochs(seen["fit"], 2)
        _epochs(seen["evaluate"], 3 if evaluate else 2)  # validation of 2 epochs (+ evaluate)
        _epochs(seen["predict"], 1)
    # Same global RNG state before the call: the same order as plain Keras (the iterator's
    # order is drawn once, in the main process, exactly as its first __getitem__ would).
    assert got["predict"] == expected["predict"]
    if seed is None:
        assert got["predict"] != sorted(got["predict"]), "the iterator did not shuffle"


@pytest.mark.timeout(300)
@pytest.mark.parametrize("method", METHODS)
def test_the_pool_settles_the_order_before_sending_the_iterator(method, digits):
    # OrderedPool alone (no on_epoch_end, no update_dataset): the order is drawn when the pool
    # starts, so the batches of both workers come from one permutation.
    image_data_generator, _ = _flavour("keras3" if keras.__version__[0] == "3" else "keras2")
    ids = _sample_ids(_iterators(image_data_generator, digits)["flow"])
    iterator = _iterators(image_data_generator, digits, shuffle=True)["flow"]
    assert iterator.index_array is None  # Keras draws it lazily
    with compatmp.OrderedPool(iterator, workers=2, start_method=method) as pool:
        assert iterator.index_array is not None  # drawn here, in the main process
        batches = list(pool.imap(range(len(iterator))))
    rows = np.concatenate([x for x, _ in batches]).reshape(N_IMAGES, -1)
    served = [ids[row.tobytes()] for row in rows]
    assert served == [int(i) for i in iterator.index_array]


@pytest.mark.parametrize("flavour", ["keras3", "keras2"])
def test_settle_draws_like_the_first_getitem_and_keeps_the_global_rng(flavour, digits):
    image_data_generator, _ = _flavour(flavour)

    def fresh(seed):
        return _iterators(image_data_generator, digits, shuffle=True, seed=seed)["flow"]

    # seed=None: from the global RNG, as iterator[0] would in this process.
    np.random.seed(5)
    plain = fresh(None)
    plain[0]
    np.random.seed(5)
    settled = fresh(None)
    assert settle_image_iterator(settled) is True
    np.testing.assert_array_equal(settled.index_array, plain.index_array)
    # seed=7: np.random.seed(7 + total_batches_seen) first, then the global RNG is restored.
    plain = fresh(7)
    plain[0]
    np.random.seed(11)
    expected_next = np.random.RandomState(11).random_sample()
    settled = fresh(7)
    wrapped = {"train": [settled]}  # found inside containers and objects, too
    assert settle(type("Holder", (), {})()) == 0
    holder = type("Holder", (), {})()
    holder.parts = wrapped
    assert settle(holder) == 1
    np.testing.assert_array_equal(settled.index_array, plain.index_array)
    assert np.random.random_sample() == expected_next
    # Idempotent: a settled order is kept (on_epoch_end's redraw is never overwritten).
    before = settled.index_array.copy()
    assert settle(holder) == 0
    np.testing.assert_array_equal(settled.index_array, before)
    # Not an image iterator: nothing happens.
    assert settle_image_iterator(object()) is False


# Issue 18: spawn workers of an image iterator import no TensorFlow and no Keras (NOTE [ Image
# iterators without TensorFlow ] in compatmp/_keras_image.py); a preprocessing_function that
# calls TensorFlow still works there. A fresh interpreter: this session imported both. The
# marker function writes what the worker has imported into the first pixels of each image.
NO_TF_SCRIPT = """
import os, sys
import numpy as np
import tensorflow as tf
import compatmp

if os.environ["FLAVOUR"] == "keras3":
    from keras.src.legacy.preprocessing.image import ImageDataGenerator
else:
    from tf_keras.preprocessing.image import ImageDataGenerator

def mark(x):
    x = x.copy()
    x[0, 0, 0] = float("tensorflow" in sys.modules)
    x[0, 1, 0] = float("keras" in sys.modules or "tf_keras" in sys.modules)
    return x

def uses_tf(x):
    return tf.image.flip_left_right(x).numpy() + float("tensorflow" in sys.modules)

def batches(it, method):
    with compatmp.OrderedPool(it, workers=2, start_method=method) as pool:
        return list(pool.imap(range(len(it))))

if __name__ == "__main__":
    root = sys.argv[1]
    kw = dict(target_size=(8, 8), color_mode="grayscale", batch_size=8, shuffle=False)
    plain = ImageDataGenerator(rescale=1 / 255.0).flow_from_directory(root, **kw)
    want = [plain[i] for i in range(len(plain))]
    got = batches(plain, "spawn")
    same = all(
        np.array_equal(g[0], w[0]) and np.array_equal(g[1], w[1]) for g, w in zip(got, want)
    )
    print("directory", len(got) == len(want) and same)
    x = np.random.default_rng(0).random((16, 8, 8, 1)).astype("float32")
    marked = ImageDataGenerator(preprocessing_function=mark, rotation_range=10).flow(
        x, np.arange(16), batch_size=4, shuffle=False
    )
    flags = {(float(b[0][k, 0, 0, 0]), float(b[0][k, 0, 1, 0])) for b in batches(marked, "spawn")
             for k in range(4)}
    print("flags", sorted(flags))
    tf_it = ImageDataGenerator(preprocessing_function=uses_tf).flow(
        x, np.arange(16), batch_size=4, shuffle=False
    )
    got = batches(tf_it, "spawn")
    print("uses_tf", all(np.allclose(g[0], x[4 * i:4 * i + 4, :, ::-1] + 1) for i, g in
                         enumerate(got)))
"""


@pytest.mark.slow
@pytest.mark.timeout(400)
@pytest.mark.parametrize("flavour", ["keras3", "keras2"])
def test_spawn_workers_of_image_iterators_import_no_tensorflow(flavour, digits, tmp_path):
    import subprocess
    import sys
    import textwrap

    _flavour(flavour)  # skips when that Keras is not here
    if flavour == "keras2":
        pytest.importorskip("tf_keras")
    script = tmp_path / "images.py"
    script.write_text(textwrap.dedent(NO_TF_SCRIPT))
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": root, "FLAVOUR": flavour}
    out = subprocess.run(
        [sys.executable, str(script), str(digits[0])],
        capture_output=True,
        text=True,
        timeout=380,
        env=env,
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    lines = dict(line.split(" ", 1) for line in out.stdout.splitlines() if " " in line)
    assert lines["directory"] == "True"  # the same bytes as the main process's batches
    assert lines["flags"] == "[(0.0, 0.0)]"  # neither TensorFlow nor Keras in any worker
    assert lines["uses_tf"] == "True"  # code that calls TensorFlow gets it
