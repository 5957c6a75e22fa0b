"""Keras' ImageDataGenerator iterators in worker processes (issue 10, item 4).

``flow``, ``flow_from_directory`` and ``flow_from_dataframe`` iterators hold a lock and an
``index_generator`` (a generator object); compatmp sends them without the generator
(NOTE [ ImageDataGenerator iterators ] in compatmp/_keras_image.py), so they reach spawn
workers without a ThreadFallbackWarning and give the main process's predictions. The images
are scikit-learn's bundled digits written as PNG files (tests/image_helpers.py). Keras 3's
legacy module (``tensorflow.keras.preprocessing.image`` on Keras 3) and tf_keras' are both
checked; the iterator module is imported inside the tests.
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
from compatmp import ThreadFallbackWarning  # noqa: E402
from compatmp._keras_image import NotSentGenerator  # noqa: E402

pytestmark = [pytest.mark.keras, pytest.mark.usefixtures("no_leaked_workers")]

SIZE = ih.IMAGE_SIZE


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


def _iterators(image_data_generator, digits):
    root, names, classes = digits
    gen = image_data_generator(rescale=1 / 255.0)
    common = {"batch_size": 8, "shuffle": False}
    out = {
        "flow_from_directory": gen.flow_from_directory(
            root, target_size=(SIZE, SIZE), color_mode="grayscale", class_mode="sparse", **common
        ),
    }
    x, y = ih.digits_arrays(60)
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
