"""Settle a dataset in the main process before it is sent: lazy random state drawn once.

NOTE [ Settling a dataset ]
Every worker must see the same dataset. A dataset that creates some state lazily, at random,
on first use inside ``__getitem__`` breaks that silently: each worker process (and, racing,
each worker thread) creates its own, and batches served by different workers disagree - for
an epoch order, some samples twice and others never (issue 20). So :class:`OrderedPool` calls
:func:`settle` on the dataset in the main process before it pickles it (or hands it to worker
threads) and before every ``update_dataset``: each settler in :data:`SETTLERS` creates, on the
object in the main process, the state the dataset would otherwise create per process. The
workers then receive it with the dataset.

What can be settled is only what compatmp knows the shape of: Keras' image iterators
(NOTE [ Settling Keras' image iterators ] in ``compatmp/_keras_image.py``). A user's own
dataset that draws state at random on first use inside ``__getitem__`` cannot be recognised;
the README ("Random state in your dataset") says how to write it safely: draw it in
``__init__`` or ``on_epoch_end`` (both run in the main process), or per batch with
:func:`compatmp.batch_rng`.

The settlers are applied to the dataset and to what it holds, so a Keras iterator wrapped by a
user's dataset, or held by compatmp's own train/validation pair, is settled too: a walk over
instance ``__dict__`` values and the items of lists, tuples and dicts, at most
:data:`MAX_DEPTH` levels deep and :data:`MAX_OBJECTS` objects in all (a dataset holding a
million file names costs nothing: strings, numbers and arrays are not walked, and a container
is walked only when it has at most :data:`MAX_ITEMS` items). Settling is idempotent: a
settled iterator is left as it is.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ._keras_image import settle_image_iterator

__all__ = ["MAX_DEPTH", "MAX_ITEMS", "MAX_OBJECTS", "SETTLERS", "settle"]

#: Each takes one object and settles it in place if it knows its kind; returns True if it did.
SETTLERS: tuple[Callable[[Any], bool], ...] = (settle_image_iterator,)

#: Levels below the dataset that are searched (the dataset itself is level 0).
MAX_DEPTH = 4
#: Objects looked at in one :func:`settle` call, at most.
MAX_OBJECTS = 2000
#: A list, tuple or dict with more items than this is not searched.
MAX_ITEMS = 64

# Leaves: never searched (the common large or immutable attribute values of a dataset).
_LEAVES = (str, bytes, bytearray, memoryview, int, float, complex, bool, type(None), range)


def settle(dataset: Any) -> int:
    """Create the dataset's lazily drawn random state now, in this (the main) process.

    NOTE [ Settling a dataset ]. Applies every settler of :data:`SETTLERS` to ``dataset`` and
    to the objects it holds (bounded by :data:`MAX_DEPTH`, :data:`MAX_OBJECTS`,
    :data:`MAX_ITEMS`). Reading the attributes runs no user code (``__dict__`` only, no
    properties).

    Args:
        dataset (object): the dataset about to be sent to workers.

    Returns:
        int: how many objects were settled (0: nothing needed it).

    Raises:
        Exception: whatever a dataset's own method called by a settler raises (for Keras'
            image iterators, ``_set_index_array()``).
    """
    settled = 0
    seen: set[int] = set()
    stack: list[tuple[Any, int]] = [(dataset, 0)]
    while stack and len(seen) < MAX_OBJECTS:
        obj, depth = stack.pop()
        if isinstance(obj, _LEAVES) or id(obj) in seen:
            continue
        seen.add(id(obj))
        for settler in SETTLERS:
            if settler(obj):
                settled += 1
                break
        if depth >= MAX_DEPTH:
            continue
        stack.extend((child, depth + 1) for child in _children(obj))
    return settled


def _children(obj: Any) -> list[Any]:
    if isinstance(obj, (list, tuple)):
        return list(obj) if len(obj) <= MAX_ITEMS else []
    if isinstance(obj, dict):
        return list(obj.values()) if len(obj) <= MAX_ITEMS else []
    if isinstance(obj, type) or hasattr(obj, "__array_interface__"):
        return []  # classes (their attributes are not the dataset's state), arrays
    try:
        state = object.__getattribute__(obj, "__dict__")
    except AttributeError:
        return []
    if not isinstance(state, dict) or len(state) > MAX_ITEMS:
        return []
    return list(state.values())
