"""compatmp._settle: the walk that applies the settlers to a dataset and what it holds.

Keras' image-iterator settler itself is tested with real iterators in tests/test_keras_image.py;
here a recording settler stands in for it (no Keras), to check which objects the walk reaches.
"""

from __future__ import annotations

import numpy as np
import pytest

from compatmp import _settle
from compatmp._settle import MAX_DEPTH, MAX_ITEMS, settle


class Lazy:
    """Stands for a Keras image iterator: ``order`` is None until settled."""

    def __init__(self) -> None:
        self.order = None


class Holder:
    def __init__(self, **attrs: object) -> None:
        self.__dict__.update(attrs)


def _settle_lazy(obj: object) -> bool:
    if isinstance(obj, Lazy) and obj.order is None:
        obj.order = [2, 0, 1]
        return True
    return False


@pytest.fixture(autouse=True)
def lazy_settler(monkeypatch):
    monkeypatch.setattr(_settle, "SETTLERS", (_settle_lazy,))


def test_the_dataset_itself_and_what_it_holds_are_settled():
    inner = [Lazy(), Lazy()]
    dataset = Holder(parts={"train": Holder(it=inner[0]), "val": (inner[1],)}, x=np.zeros(3))
    assert settle(dataset) == 2
    assert [lazy.order for lazy in inner] == [[2, 0, 1], [2, 0, 1]]
    assert settle(dataset) == 0  # idempotent: nothing left to settle
    top = Lazy()
    assert settle(top) == 1 and top.order == [2, 0, 1]


def test_the_walk_is_bounded_and_survives_cycles():
    deep = Lazy()
    chain: object = deep
    for _ in range(MAX_DEPTH + 1):
        chain = Holder(next=chain)
    assert settle(chain) == 0 and deep.order is None  # deeper than MAX_DEPTH: not reached
    big = [Lazy() for _ in range(MAX_ITEMS + 1)]
    assert settle(Holder(items=big)) == 0  # a long list is not searched
    cyclic = Holder(lazy=Lazy())
    cyclic.self = cyclic
    assert settle(cyclic) == 1


def test_properties_and_classes_are_not_run_or_searched():
    class Trap:
        calls = 0
        lazy_on_class = Lazy()  # class attributes are not the dataset's state

        @property
        def lazy(self) -> Lazy:
            Trap.calls += 1
            return Lazy()

    assert settle(Trap()) == 0
    assert Trap.calls == 0 and Trap.lazy_on_class.order is None
