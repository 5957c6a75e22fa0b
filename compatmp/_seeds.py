"""Per-batch seeds: the batch for index ``i`` in pass ``p`` draws the same numbers everywhere.

:func:`batch_rng` is public (``compatmp.batch_rng``); the worker loop (:mod:`compatmp._worker`)
calls :func:`enter_batch` before each ``dataset[i]`` and reseeds a worker process's global
RNGs from :meth:`BatchContext.seed_sequence` when the pool got ``seed=``.

NOTE [ Per-batch seeds ]
Batches go to the least-loaded worker, so which worker computes index i depends on timing;
a per-worker RNG therefore cannot make batches reproducible (measured on main before this:
with seed=1234, 23-30 of 40 batches differed between runs; PyTorch is reproducible only for a
fixed ``num_workers``). With an explicit ``seed=``, every batch is computed with RNGs seeded
from (seed, pass, index) alone:

- ``pass`` is the pass number sent with each task. ``OrderedPool.imap(...,
  pass_number=p)`` sets it; by default it is one more than the previous ``imap`` call's pass
  (0 for the pool's first ``imap``), so with one ``imap`` per epoch pass p is epoch p.
  ``compatmp.fit`` always sets it: pass = the Keras epoch number (absolute: a run resumed
  with ``initial_epoch=k``, or by ``BackupAndRestore``, starts at pass k), read from a
  callback compatmp adds to ``callbacks`` (its ``on_epoch_begin(epoch)`` runs before the
  epoch's first batch is asked for). Validation inside ``fit`` uses the epoch it follows
  (its indices are tagged ``(1, i)``, so its numbers differ from the training batch i);
  training indices are plain ``i`` whether or not validation shares the pool. Every
  ``evaluate``/``predict`` call is pass 0 (each has its own pool), as are batches fetched
  before the first epoch (TensorFlow's signature probe, torch's symbolic build). So with
  ``seed=``, the batches of epoch k of ``fit`` depend on (seed, k, index) only, and with
  ``shuffle=True`` the order of epoch k is :func:`epoch_order` (seed, k) instead of
  ``random.shuffle`` (without ``seed=`` compatmp shuffles with ``random.shuffle`` as Keras
  does). Limit: with ``steps_per_epoch`` below the dataset's length a pass runs across
  epochs (NOTE [ How Keras 3 drives a PyDataset ]); a stream restarted in epoch k uses pass
  k for its remaining batches.
- ``index`` is the batch index as given to ``imap``: a non-negative int, a tuple of them, or
  anything else (then a BLAKE2b hash of its ``repr``).
- Process workers reseed Python's ``random`` and NumPy's legacy global RNG
  (``numpy.random.seed``) before each such batch; worker threads share those with the main
  thread, so they are left alone there.
- :func:`batch_rng` gives a ``numpy.random.Generator`` seeded the same way, in processes and
  threads alike (the same numbers for the same batch, whatever the start method).

The seeds come from ``numpy.random.SeedSequence(seed, spawn_key=(_BATCH_TAG, pass, ...))``,
the same mechanism as the per-worker seeds (``_worker.derive_seed``), tagged so the two never
share a stream. Reseeding costs ~50 us per batch (47 us measured here; the first
``batch_rng()`` of a batch 13 us) and runs only with an explicit seed.
"""

from __future__ import annotations

import hashlib
import threading
from typing import Any

__all__ = [
    "BatchContext",
    "batch_rng",
    "batch_seed_sequence",
    "enter_batch",
    "epoch_order",
    "leave_thread",
]

_BATCH_TAG = 0xBA7C
_ORDER_TAG = 0x0DE5


def _index_key(index: Any) -> tuple[int, ...]:
    if type(index) is int and index >= 0:
        return (1, index)
    if type(index) is tuple and all(type(x) is int and x >= 0 for x in index):
        return (len(index) + 1, *index)
    digest = hashlib.blake2b(repr(index).encode(), digest_size=8).digest()
    return (0, int.from_bytes(digest, "little"))


def batch_seed_sequence(base_seed: int, pass_number: int, index: Any) -> Any:
    """The ``numpy.random.SeedSequence`` of the batch ``index`` in pass ``pass_number``.

    See NOTE [ Per-batch seeds ] in :mod:`compatmp._seeds`.

    Args:
        base_seed (int): the pool's seed (non-negative).
        pass_number (int): the pass (non-negative), see the NOTE.
        index (object): the batch index.

    Returns:
        numpy.random.SeedSequence: depends only on the three arguments.
    """
    import numpy as np

    return np.random.SeedSequence(
        base_seed, spawn_key=(_BATCH_TAG, pass_number, *_index_key(index))
    )


def epoch_order(base_seed: int, pass_number: int, n: int) -> list[int]:
    """The shuffled batch order of pass ``pass_number``: a permutation of ``range(n)``.

    Used by ``compatmp.fit`` with ``seed=`` and ``shuffle=True`` (NOTE [ Per-batch seeds ]),
    so that the order of epoch k, like its batches, depends on ``(seed, k)`` alone.

    Args:
        base_seed (int): the pool's seed (non-negative).
        pass_number (int): the pass (the epoch in ``fit``), non-negative.
        n (int): number of batches, >= 0.

    Returns:
        list[int]: each of ``0 .. n-1`` once.
    """
    import numpy as np

    rng = np.random.default_rng(
        np.random.SeedSequence(base_seed, spawn_key=(_ORDER_TAG, pass_number))
    )
    return [int(i) for i in rng.permutation(n)]


class BatchContext:
    """The batch a worker is computing now, and its lazily made Generator.

    Args:
        base_seed (int): the pool's seed.
        pass_number (int): the pass the batch belongs to.
        index (object): the batch index.
    """

    __slots__ = ("base_seed", "index", "pass_number", "rng")

    def __init__(self, base_seed: int, pass_number: int, index: Any) -> None:
        self.base_seed = base_seed
        self.pass_number = pass_number
        self.index = index
        self.rng: Any = None

    def seed_sequence(self) -> Any:
        """:func:`batch_seed_sequence` of this batch."""
        return batch_seed_sequence(self.base_seed, self.pass_number, self.index)


_process_batch: BatchContext | None = None  # in a worker process, the current batch
_thread_batch = threading.local()  # in a worker thread, the current batch


def enter_batch(base_seed: int, pass_number: int, index: Any, in_thread: bool) -> BatchContext:
    """Make the batch about to be computed the current one (for :func:`batch_rng`).

    Args:
        base_seed (int): the pool's seed.
        pass_number (int): the pass.
        index (object): the batch index.
        in_thread (bool): True in a worker thread (the context is thread-local), False in a
            worker process.

    Returns:
        BatchContext: the new current batch.
    """
    global _process_batch
    ctx = BatchContext(base_seed, pass_number, index)
    if in_thread:
        _thread_batch.ctx = ctx
    else:
        _process_batch = ctx
    return ctx


def leave_thread() -> None:
    """A worker thread ends: forget its batch."""
    _thread_batch.ctx = None


def batch_rng() -> Any:
    """A ``numpy.random.Generator`` for the batch being computed, seeded from the batch alone.

    Call it inside ``dataset[i]``. In a worker (process or thread) it is seeded from
    ``(seed, pass, index)`` (NOTE [ Per-batch seeds ] in :mod:`compatmp._seeds`), so the batch
    at index ``i`` of pass ``p`` gets the same numbers whatever the number of workers, the
    start method, or which worker computes it; with ``seed=None`` the pool's seed is random,
    so the numbers differ between pools. Calls within one batch return the same Generator
    (draws continue).

    Outside a worker (``dataset[i]`` called in the main process) it returns a new Generator
    seeded from NumPy's global RNG, so ``numpy.random.seed`` there makes it reproducible.

    Returns:
        numpy.random.Generator: the batch's generator (PCG64).
    """
    import numpy as np

    ctx = getattr(_thread_batch, "ctx", None) or _process_batch
    if ctx is None:
        return np.random.default_rng(np.random.randint(0, 2**32, size=4, dtype=np.uint64))
    if ctx.rng is None:
        ctx.rng = np.random.default_rng(ctx.seed_sequence())
    return ctx.rng
