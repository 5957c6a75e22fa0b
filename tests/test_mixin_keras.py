"""PickleSafeMixin on a Keras PyDataset, pickled by plain pickle as Keras' own workers do."""

from __future__ import annotations

import pickle
import threading

import pytest

keras = pytest.importorskip("keras", minversion="3")

from compatmp import PickleSafeMixin  # noqa: E402

pytestmark = pytest.mark.keras


class LockedImages(PickleSafeMixin, keras.utils.PyDataset):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self._lock = threading.Lock()
        self._lock.acquire()
        self.transform = lambda i: i * 10

    def __len__(self):
        return 2

    def __getitem__(self, i):
        with self._lock:
            return self.transform(i)


def test_mixin_with_keras_pydataset_under_plain_pickle():
    ds = LockedImages(workers=3, use_multiprocessing=True)
    with pytest.raises(TypeError, match="lock"):
        pickle.dumps(ds.__dict__)  # the state alone is what Keras' spawn workers choke on
    out = pickle.loads(pickle.dumps(ds))
    assert out[1] == 10
    assert out.workers == 3 and out.use_multiprocessing is True
