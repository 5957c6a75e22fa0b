"""``compatmp.empty``: batch arrays allocated straight in the worker's shared memory.

A worker process sends each big array of a batch (>= 256 KiB) through one of its reusable
shared-memory blocks (:mod:`compatmp._batch_blocks`): normally the dataset builds the array in
private memory and the worker copies it into a block. An array from :func:`empty` already *is* a
view of a free block, so :meth:`compatmp._batch_blocks.BlockPool.encode` recognises it (same data
address, contiguous) and sends its descriptor without copying. For a 19 MB batch that is one memcpy
of 19 MB and the page faults of a fresh private buffer saved per batch.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["empty"]


def empty(shape: Any, dtype: Any = float, order: str = "C") -> np.ndarray:
    """A new uninitialized array, in the worker's shared memory when that saves a copy.

    Use it for the big arrays a dataset returns from ``__getitem__``::

        def __getitem__(self, i):
            x = compatmp.empty((32, 224, 224, 3), np.float32)
            np.take(self.images, rows, axis=0, out=x)   # or x[...] = ...
            return x, labels

    In a compatmp worker *process*, an array of at least 256 KiB
    (``compatmp._batch_blocks.SHM_THRESHOLD``) is a view of one of the worker's reusable
    shared-memory blocks: returned as (part of) the batch, it reaches the main process without being
    copied. Everywhere else - the main process, worker threads, Keras' or torch's workers, small
    arrays - it is ``numpy.empty(shape, dtype, order)``.

    Contract: the array belongs to the batch being computed. Return it (whole, not a strided
    slice, which is copied as usual) or drop it; do not keep it in the dataset for a later
    batch: once the batch is sent, its block may be reused for another batch.

    Args:
        shape (int | tuple[int, ...]): the array's shape.
        dtype (numpy.dtype | type | str): its dtype (default: ``float``, i.e. float64, as
            ``numpy.empty``); object dtypes always get ``numpy.empty``.
        order (str): ``"C"`` (default) or ``"F"`` memory order.

    Returns:
        numpy.ndarray: uninitialized and writable, like ``numpy.empty``.

    Raises:
        TypeError: ``shape`` or ``dtype`` is not valid for ``numpy.empty``.
        ValueError: ``order`` is not ``"C"`` or ``"F"``, or a dimension is negative.
    """
    if order not in ("C", "F"):
        raise ValueError(f"order must be 'C' or 'F'; got {order!r}")
    dt = np.dtype(dtype)
    shape_t = (int(shape),) if np.ndim(shape) == 0 else tuple(int(n) for n in shape)
    if any(n < 0 for n in shape_t):
        raise ValueError(f"negative dimensions are not allowed; got shape {shape_t}")
    from . import _worker

    blocks = _worker._process_blocks
    nbytes = int(np.prod(shape_t, dtype=np.int64)) * dt.itemsize
    if blocks is None or dt.hasobject or nbytes == 0 or nbytes < blocks.threshold:
        return np.empty(shape_t, dtype=dt, order=order)
    return blocks.allocate(shape_t, dt, order)
