"""NOTE [ PyDataset stand-in ]: by-value PyDataset subclasses do not make workers import Keras."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

keras = pytest.importorskip("keras", minversion="3")

from compatmp import dumps, loads  # noqa: E402
from compatmp._standin import keras_pydataset  # noqa: E402

pytestmark = pytest.mark.keras

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS_DIR)


def _local_dataset_class():
    # Defined in a function: cloudpickle sends it by value, like a class in __main__.
    class Squares(keras.utils.PyDataset):
        def __init__(self, n, **kwargs):
            super().__init__(**kwargs)
            self.n = n
            self.epochs = 0

        def __len__(self):
            return self.n

        def __getitem__(self, i):
            return i * i

        def on_epoch_end(self):
            super().on_epoch_end()
            self.epochs += 1

    return Squares


def test_keras_pydataset_is_found_without_importing():
    assert keras_pydataset() is keras.utils.PyDataset is keras.utils.Sequence


# Unpickled in a fresh interpreter: in this one, cloudpickle's class tracker hands back the
# original class (same tracker id), exactly as it should in the main process.
CHILD = """
import json, pickle, sys
out = pickle.loads(sys.stdin.buffer.read())
report = {
    "bases": [b.__name__ for b in type(out).__bases__],
    "keras_imported": "keras" in sys.modules,
    "attrs": [out.workers, out.use_multiprocessing, out.max_queue_size],
    "num_batches": out.num_batches,
    "items": list(out),
}
if hasattr(out, "epochs"):
    out.on_epoch_end()  # the user's override, calling super() into the stand-in
    report["epochs"] = out.epochs
if hasattr(out, "hello"):
    report["hello"] = out.hello()
out.workers = 5
report["workers_set"] = out.workers
print(json.dumps(report))
"""


def _load_in_fresh_interpreter(data: bytes) -> dict:
    env = {**os.environ, "PYTHONPATH": ROOT}
    out = subprocess.run(
        [sys.executable, "-c", CHILD],
        input=data,
        capture_output=True,
        timeout=120,
        env=env,
        check=False,
    )
    assert out.returncode == 0, out.stderr.decode()[-3000:]
    return json.loads(out.stdout)


@pytest.mark.timeout(150)
def test_by_value_subclass_is_rebuilt_on_the_stand_in_with_its_state():
    ds = _local_dataset_class()(5, workers=3, use_multiprocessing=True, max_queue_size=7)
    ds.on_epoch_end()
    report = _load_in_fresh_interpreter(dumps(ds))
    assert report == {
        "bases": ["PyDatasetStandIn"],
        "keras_imported": False,
        "attrs": [3, True, 7],
        "num_batches": 5,
        "items": [0, 1, 4, 9, 16],
        "epochs": 2,
        "workers_set": 5,
    }
    # The main process's object and class are untouched.
    assert isinstance(ds, keras.utils.PyDataset)
    assert type(loads(dumps(ds))) is type(ds)


@pytest.mark.timeout(150)
def test_other_bases_are_kept_and_by_reference_classes_untouched():
    class Mixin:
        def hello(self):
            return "hi"

    class Both(Mixin, keras.utils.PyDataset):
        def __len__(self):
            return 1

        def __getitem__(self, i):
            return i

    report = _load_in_fresh_interpreter(dumps(Both()))
    assert report["bases"] == ["Mixin", "PyDatasetStandIn"]
    assert report["hello"] == "hi" and report["items"] == [0]
    assert report["keras_imported"] is False
    # A class importable by name (here Keras' own) is pickled by reference, as before.
    assert b"PyDatasetStandIn" not in dumps(keras.utils.PyDataset())
    assert b"PyDatasetStandIn" in dumps(Both())


SCRIPT = """
import sys
import keras
import compatmp

class NoKeras(keras.utils.PyDataset):
    def __len__(self):
        return 4

    def __getitem__(self, i):
        return i, "keras" in sys.modules, "tensorflow" in sys.modules

class UsesKeras(NoKeras):
    def __getitem__(self, i):
        return int(keras.ops.convert_to_numpy(keras.ops.add(i, 1))), "keras" in sys.modules

if __name__ == "__main__":
    with compatmp.OrderedPool(NoKeras(), workers=2, start_method="spawn") as pool:
        print("plain", list(pool.imap(range(4))))
    with compatmp.OrderedPool(UsesKeras(), workers=1, start_method="spawn") as pool:
        print("uses", list(pool.imap(range(2))))
"""


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_spawn_workers_of_a_main_script_dataset_import_keras_only_when_used(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(textwrap.dedent(SCRIPT))
    env = {**os.environ, "PYTHONPATH": ROOT}
    out = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        timeout=200,
        env=env,
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    lines = dict(line.split(" ", 1) for line in out.stdout.splitlines() if " " in line)
    assert lines["plain"] == str([(i, False, False) for i in range(4)])
    # A method that uses keras gets it: cloudpickle sends the module by name.
    assert lines["uses"] == str([(1, True), (2, True)])


def test_module_standin_offers_only_what_was_sent_and_pickles():
    import pickle

    from compatmp._standin import Constant, ModuleStandIn

    backend = ModuleStandIn("keras.src.backend", {"floatx": Constant("float32")})
    back = pickle.loads(dumps(backend))
    assert back.floatx() == "float32"
    assert back.__name__ == "keras.src.backend"
    with pytest.raises(AttributeError, match=r"'image_data_format'.*only \['floatx'\]"):
        back.image_data_format  # noqa: B018
    assert not hasattr(back, "__wrapped__")  # dunder lookups stay plain AttributeErrors
    assert pickle.loads(pickle.dumps(back)).floatx() == "float32"


def test_image_modules_go_by_value_only_for_image_iterators():
    import numpy as np
    from keras.src.legacy.preprocessing.image import ImageDataGenerator

    from compatmp._keras_image import image_module_reduce, image_modules_by_value

    it = ImageDataGenerator().flow(np.zeros((4, 2, 2, 1)), batch_size=2)
    names = [m.__name__ for m in image_modules_by_value(it)]
    assert names[0] == "keras.src.legacy.preprocessing.image"
    assert "keras.src.utils.image_utils" in names

    class Holder:
        def __init__(self):
            self.it = it

    assert image_modules_by_value(Holder())  # held directly by the user's dataset
    assert image_modules_by_value(_local_dataset_class()(3)) == []
    # The backend a worker gets: this process's values now.
    backend = sys.modules["keras.src.backend"]
    _, (_, attrs) = image_module_reduce(backend)
    assert attrs["floatx"]() == keras.backend.floatx()
    assert attrs["image_data_format"]() == keras.backend.image_data_format()
    assert image_module_reduce(np) is NotImplemented
