"""How Keras drives a dataset, and the feeder that serves Keras batches from one pool.

:mod:`compatmp._keras` (the public ``fit``/``evaluate``/``predict``) checks the inputs, starts
the pool and calls Keras; everything that depends on how Keras asks for batches lives here.
Flavour-independent pieces: the batch structure check (:class:`_StructureCheck`), where
batches come from (:class:`_Source`, :class:`_PoolState`, :class:`_TrainAndValidation`) and
the generator feed. Keras 3 flavour: :class:`_Feeder` and the ``keras.utils.PyDataset`` proxy
(:func:`_keras3_proxy_class`); Keras 2's proxy is in :mod:`compatmp._keras2`.

One :class:`~compatmp._pool.OrderedPool` serves the whole call; Keras only ever sees a thin
``keras.utils.PyDataset`` proxy with ``workers=1`` and ``use_multiprocessing=False``, so
Keras' own enqueuer (``py_dataset_adapter.OrderedEnqueuer``, which pickles the dataset with
plain ``pickle`` and restarts its ``multiprocessing.Pool`` every epoch) never runs::

    model.fit(proxy)                           main process
      |  Keras asks proxy[p] for p = 0, 1, 2 ...  (shuffle=False: we shuffle ourselves)
      v
    _Feeder.get(p) --> index = order[p] --> next(pool.imap(order[p:]))   one stream per pass
      ^                                             |
      |   on_epoch_begin / on_epoch_end             v
      +-- forwarded to the user's dataset;   workers: dataset[index] (processes or threads)
          its new state is re-sent (pool.update_dataset) before the next batch is fetched

NOTE [ How Keras 3 drives a PyDataset ]
Read from ``keras/src/trainers/data_adapters/py_dataset_adapter.py`` and
``keras/src/trainers/epoch_iterator.py`` (Keras 3.15) and confirmed by logging the calls:

* ``PyDatasetAdapter.__init__`` reads ``workers``, ``use_multiprocessing`` and
  ``max_queue_size`` from the dataset (constructor arguments of ``PyDataset``; ``fit`` has no
  such arguments in Keras 3). ``workers > 1 or (workers > 0 and use_multiprocessing)``
  starts an ``OrderedEnqueuer``; the proxy's ``workers=1``, ``use_multiprocessing=False``
  keeps it off.
* ``_finite_generator`` asks ``dataset[i]`` for ``i in range(num_batches)``, **shuffled with
  ``random.shuffle`` when ``fit(shuffle=True)``** - Keras' default. So Keras 3 does *not* ask
  in order during ``fit``. compatmp passes ``shuffle=False`` to Keras and applies the same
  ``random.shuffle`` itself at the start of each pass, so batches still come in a random
  order, each index exactly once per pass, and the pool knows the order in advance and can
  prefetch it. ``evaluate`` and ``predict`` never shuffle.
* With the TensorFlow backend, ``get_tf_dataset`` first fetches ``dataset[0]`` and
  ``dataset[1]`` in the main thread to infer the output signature
  (``NUM_BATCHES_FOR_TENSOR_SPEC = 2``), outside any epoch; the epoch's batches are then
  pulled by ``tf.data.Dataset.from_generator`` in a TensorFlow thread, with
  ``prefetch(AUTOTUNE)`` on top. Exceptions raised there reach the caller wrapped in a
  ``tf.errors`` type; :func:`compatmp._keras._call_keras` re-raises compatmp's original
  exception instead.
* ``EpochIterator.reset()`` (called by ``fit``/``evaluate`` before the first epoch) calls
  ``on_epoch_end``; ``_enumerate_iterator`` calls ``on_epoch_begin`` before an epoch's first
  batch and ``on_epoch_end`` after its last. The torch backend's ``_symbolic_build`` also
  takes one batch inside a begin/end pair before training starts.
* With ``steps_per_epoch`` below ``len(dataset)`` the same pass continues across epochs
  (``_current_iterator`` is kept until ``num_batches`` were seen). compatmp drops the
  prefetched rest of a pass at ``on_epoch_end`` and resumes it at the same position with the
  dataset's new state.

NOTE [ One pool for training and validation ]
``validation_data`` given as a dataset shares the training pool: the pool holds a
:class:`_TrainAndValidation` pair and tasks are ``(part, index)``. Training and validation
never load at the same time (the training pass ends before Keras validates), so a second pool
would only double the start-up cost - importing Keras/TensorFlow in each spawned worker takes
~4-6 s and ~500 MB here - for workers that sit idle most of the time.

Nothing here runs at ``import compatmp``: Keras is imported inside functions and the proxy
class is built on first use (:func:`_keras3_proxy_class`).
"""

from __future__ import annotations

import collections.abc
import functools
import itertools
import random
import threading
from collections.abc import Iterable, Iterator
from typing import Any

from ._seeds import epoch_order

#: Parts of a :class:`_TrainAndValidation`: tasks on a shared pool are ``(part, index)``.
_TRAIN, _VALIDATION = 0, 1


# --------------------------------------------------------------------------------------------
# Batch structure


def _structure(obj: object, ranks: bool = True) -> str:
    """Describe a batch's nesting and (if ``ranks``) array ranks, ignoring sizes and dtypes."""
    if isinstance(obj, collections.abc.Mapping):
        items = ", ".join(f"{k!r}: {_structure(obj[k], ranks)}" for k in sorted(obj, key=repr))
        return "{" + items + "}"
    if isinstance(obj, tuple):
        inner = ", ".join(_structure(v, ranks) for v in obj)
        return f"({inner},)" if len(obj) == 1 else f"({inner})"
    if isinstance(obj, list):
        return "[" + ", ".join(_structure(v, ranks) for v in obj) + "]"
    if obj is None:
        return "None"
    shape = getattr(obj, "shape", None)
    if shape is not None and not ranks:
        return "array"
    if shape is not None:
        try:
            return f"array(rank {len(shape)})"
        except TypeError:  # shape of unknown rank (symbolic tensors)
            pass
    return type(obj).__name__


class _StructureCheck:
    """Remember the first batch's structure; raise ValueError when a later batch differs.

    Args:
        what (str): the dataset's name in messages.
        ranks (bool): compare array ranks too (default: True). TensorFlow fixes the ranks in
            the ``tf.data`` signature from the first batches, so a later rank change fails
            there (with a less clear error); Keras 3 on JAX and torch trains on it, so the
            wrappers pass False for those backends.
    """

    def __init__(self, what: str, ranks: bool = True) -> None:
        self.what = what
        self.ranks = ranks
        self.first: tuple[object, str] | None = None

    def __call__(self, batch: object, index: object) -> None:
        found = _structure(batch, self.ranks)
        if self.first is None:
            self.first = (index, found)
            return
        first_index, expected = self.first
        if found != expected:
            raise ValueError(
                f"the batch structure changed: {self.what}[{index!r}] returned {found}, but "
                f"{self.what}[{first_index!r}] returned {expected}. Every batch must have the "
                "same structure - (x,), (x, y) or (x, y, sample_weight) with the same nesting "
                + ("and array ranks" if self.ranks else "")
                + "; only array sizes may differ (e.g. a smaller last batch)."
            )


# --------------------------------------------------------------------------------------------
# Where batches come from


class _TrainAndValidation:
    """The training and validation datasets in one object, so one pool serves both.

    See NOTE [ One pool for training and validation ]. Module level: it crosses the process
    boundary.

    Args:
        train (object): the training dataset.
        validation (object): the validation dataset.
    """

    def __init__(self, train: object, validation: object) -> None:
        self.train = train
        self.validation = validation

    def __len__(self) -> int:
        return 0  # unused: OrderedPool only checks that len() exists; the feeders know lengths

    def __getitem__(self, key: int | tuple[int, int]) -> object:
        # Training tasks are the plain index (so their per-batch seeds do not depend on
        # whether validation shares the pool, NOTE [ Per-batch seeds ]); validation's are
        # (_VALIDATION, index).
        if type(key) is tuple:
            return self.validation[key[1]]  # type: ignore[index]
        return self.train[key]  # type: ignore[index]


class _Source:
    """Fetches batches for one dataset: through a (shared) pool, or in the caller's thread.

    Args:
        dataset (object): the dataset.
        state (_PoolState | None): the pool and what it holds; None loads in the caller.
        part (int | None): None when the pool holds ``dataset`` itself, else its part of the
            :class:`_TrainAndValidation` the pool holds.
    """

    def __init__(
        self, dataset: object, state: _PoolState | None = None, part: int | None = None
    ) -> None:
        self.dataset = dataset
        self.state = state
        self.pool = state.pool if state is not None else None
        self.part = part
        # One lock per pool: its imap and update_dataset are not thread-safe, and a TensorFlow
        # thread prefetching training batches may overlap a validation fetch in the main thread.
        self.lock = state.lock if state is not None else threading.RLock()

    def fetch(self, indices: Iterable[int], pass_number: int = 0) -> Iterator[object]:
        """Return an iterator over ``dataset[i] for i in indices``, in that order (``indices``
        may be infinite: the pool consumes it lazily); ``pass_number`` is the pass for the
        per-batch seeds (NOTE [ Per-batch seeds ] in compatmp._seeds)."""
        if self.pool is None:
            return (self.dataset[i] for i in indices)  # type: ignore[index]
        assert self.state is not None
        self.state.sync()
        keys: Iterable[Any] = indices
        if self.part == _VALIDATION:
            keys = ((_VALIDATION, i) for i in indices)
        return self.pool.imap(keys, pass_number=pass_number)

    def mark_dirty(self) -> None:
        """The dataset may have changed: re-send it before the next fetch."""
        if self.state is not None:
            self.state.dirty = True


class _PoolState:
    """Per-pool: the object the workers hold, and whether it must be re-sent."""

    def __init__(self, pool: Any, root: object) -> None:
        self.pool = pool
        self.root = root
        self.dirty = False
        self.lock = threading.RLock()

    def sync(self) -> None:
        if self.dirty:
            self.dirty = False
            # The pool pickles ``root`` and skips the send when the bytes did not change.
            self.pool.update_dataset(self.root)


# --------------------------------------------------------------------------------------------
# Keras 3: PyDataset positions and epoch hooks (NOTE [ How Keras 3 drives a PyDataset ])


class _Feeder:
    """Serve ``proxy[p]`` to Keras from a stream over the pass's index order.

    Keras asks positions ``p = 0, 1, ...`` (it gets ``shuffle=False``); ``order[p]`` is the
    dataset index, shuffled per pass when ``shuffle`` is true. Inside an epoch the feeder keeps
    one stream (``source.fetch(order[p:])``) and takes the next batch from it while Keras asks
    for the expected position; any other position (TensorFlow's signature probe outside an
    epoch, a restarted pass, a pass resumed after ``on_epoch_end``) drops the stream and starts
    again at the asked position. See NOTE [ How Keras 3 drives a PyDataset ].

    ``get`` runs in a TensorFlow thread with the TF backend while ``epoch_begin``/``epoch_end``
    run in the main thread, so all state is guarded by one lock.

    Args:
        dataset (object): the user's dataset (hooks are forwarded to it).
        source (_Source): where batches come from.
        length (int | None): ``len(dataset)``, or None for an infinite ``PyDataset``
            (``num_batches`` None): positions are then unbounded and never shuffled, as in
            ``PyDatasetAdapter._infinite_generator``.
        shuffle (bool): shuffle the batch order per pass like Keras' ``fit(shuffle=True)``.
        what (str): name used in error messages ("x", "validation_data").
        ranks (bool): the structure check compares array ranks (default: True; see
            :class:`_StructureCheck`).
        seed (int | None): the call's explicit ``seed=``: the shuffled order of pass p is
            then :func:`compatmp._seeds.epoch_order` (default: None, ``random.shuffle`` as
            Keras does).
    """

    def __init__(
        self,
        dataset: object,
        source: _Source,
        length: int | None,
        *,
        shuffle: bool,
        what: str,
        ranks: bool = True,
        seed: int | None = None,
    ) -> None:
        self.dataset = dataset
        self.source = source
        self.length = length
        self.shuffle = shuffle
        self.check = _StructureCheck(what, ranks)
        self.error: BaseException | None = None
        self.restarts = 0  # streams started somewhere other than where the last one stood
        self._lock = source.lock
        self._order: list[int] = list(range(length or 0))
        self._stream: Iterator[object] | None = None
        self._next = 0  # the position the stream yields next
        self._in_epoch = False
        self._probed = False
        self.seed = seed
        self.pass_number = 0  # the Keras epoch (set_epoch); 0 outside fit's epochs

    def set_epoch(self, epoch: int) -> None:
        """Keras starts epoch ``epoch`` (absolute: counts ``initial_epoch``); batches fetched
        from now on belong to pass ``epoch`` (NOTE [ Per-batch seeds ] in compatmp._seeds).

        Args:
            epoch (int): the epoch number Keras passes to ``Callback.on_epoch_begin``.
        """
        with self._lock:
            self.pass_number = epoch

    def get(self, position: int, *, implicit_epoch: bool = False) -> object:
        """Return the batch for Keras' position ``position`` (see the class docstring).

        ``implicit_epoch=True`` is for Keras 2, which has no ``on_epoch_begin``: the first
        call ever is its structure probe (outside any epoch), and any later call outside an
        epoch begins one (NOTE [ How Keras 2 drives a Sequence ] in compatmp/_keras2.py).
        """
        with self._lock:
            if implicit_epoch and not self._in_epoch:
                if self._probed:
                    self._in_epoch = True
                self._probed = True
            if isinstance(position, bool) or not isinstance(position, int):
                raise TypeError(f"batch position must be an int; received {position!r}")
            if position < 0 or (self.length is not None and position >= self.length):
                raise IndexError(f"batch position {position} out of range [0, {self.length})")
            try:
                batch = self._get(position)
                self.check(batch, self._index(position) if self._in_epoch else position)
            except BaseException as exc:
                self._drop_stream()
                self.error = exc
                raise
            return batch

    def _get(self, position: int) -> object:
        if self._stream is not None and position == self._next:
            try:
                batch = next(self._stream)
            except StopIteration:
                # Another feeder started an imap on the shared pool, which abandons ours
                # (OrderedPool.imap); resume below at this position.
                self._stream = None
            else:
                self._next += 1
                return batch
        if not self._in_epoch:
            # Outside an epoch: TensorFlow's signature probe, dataset[0] and dataset[1] in
            # order (get_tf_dataset). Fetch only what is asked, unshuffled, as Keras does.
            self._drop_stream()
            (batch,) = list(self.source.fetch([position], self.pass_number))
            return batch
        if self._stream is not None or position != 0:
            self.restarts += 1
        self._drop_stream()
        if self.length is None:  # infinite: index == position, never shuffled
            self._stream = self.source.fetch(itertools.count(position), self.pass_number)
            self._next = position + 1
            return next(self._stream)
        if position == 0:
            # A new pass. Shuffle like PyDatasetAdapter._finite_generator: random.shuffle of
            # range(n), so keras.utils.set_random_seed gives the order plain Keras would use.
            self._order = list(range(self.length))
            if self.shuffle and self.seed is not None:  # depends on (seed, epoch) only
                self._order = epoch_order(self.seed, self.pass_number, self.length)
            elif self.shuffle:
                random.shuffle(self._order)
        self._stream = self.source.fetch(self._order[position:], self.pass_number)
        self._next = position + 1
        return next(self._stream)

    def _index(self, position: int) -> int:
        return position if self.length is None else self._order[position]

    def _drop_stream(self) -> None:
        stream, self._stream = self._stream, None
        close = getattr(stream, "close", None)
        if close is not None:
            close()

    def epoch_begin(self) -> None:
        """Forward ``on_epoch_begin`` to the dataset; its new state goes out before the next
        batch."""
        with self._lock:
            hook = getattr(self.dataset, "on_epoch_begin", None)
            if callable(hook):
                hook()
            self.source.mark_dirty()
            self._in_epoch = True

    def epoch_end(self) -> None:
        """Forward ``on_epoch_end``; drop prefetched batches of the old state."""
        with self._lock:
            self._in_epoch = False
            self._drop_stream()
            hook = getattr(self.dataset, "on_epoch_end", None)
            if callable(hook):
                hook()
            self.source.mark_dirty()


def epoch_callback(base: type, feeders: list[_Feeder]) -> Any:
    """A Keras callback telling ``feeders`` which epoch ``fit`` is in (for the pass number).

    ``Callback.on_epoch_begin(epoch)`` gets the absolute epoch - ``fit`` loops over
    ``range(initial_epoch, epochs)``, and ``BackupAndRestore`` sets the model's
    ``_initial_epoch`` (``keras/src/backend/*/trainer.py``) - before the epoch's first batch
    is asked for. NOTE [ Per-batch seeds ] in compatmp._seeds.

    Args:
        base (type): ``keras.callbacks.Callback`` (or Keras 2's).
        feeders (list[_Feeder]): the call's feeders (training and validation).

    Returns:
        keras.callbacks.Callback: the callback instance.
    """

    class _EpochCallback(base):  # type: ignore[misc, valid-type]
        def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
            for feeder in feeders:
                feeder.set_epoch(int(epoch))

    return _EpochCallback()


@functools.cache
def _keras3_proxy_class() -> type:
    """Build the ``keras.utils.PyDataset`` subclass Keras 3 sees (imports Keras once)."""
    import keras

    class _ProxyDataset(keras.utils.PyDataset):
        """What Keras 3 iterates: batches from a :class:`_Feeder`, no Keras workers."""

        def __init__(self, feeder: _Feeder) -> None:
            # workers=1, use_multiprocessing=False: PyDatasetAdapter starts no enqueuer.
            super().__init__(workers=1, use_multiprocessing=False)
            self.feeder = feeder

        @property
        def num_batches(self) -> int | None:
            # None: an infinite dataset (PyDatasetAdapter._infinite_generator).
            return self.feeder.length

        def __len__(self) -> int:
            if self.feeder.length is None:
                raise TypeError("an infinite dataset (num_batches None) has no len()")
            return self.feeder.length

        def __getitem__(self, index: int) -> object:
            return self.feeder.get(index)

        def on_epoch_begin(self) -> None:
            self.feeder.epoch_begin()

        def on_epoch_end(self) -> None:
            self.feeder.epoch_end()

    _ProxyDataset.__qualname__ = "_ProxyDataset"
    return _ProxyDataset


class _Sized:
    """A dataset without ``__len__`` (a ``num_batches``-only ``PyDataset``), given the
    ``__len__`` :class:`~compatmp._pool.OrderedPool` checks for. Module level: it crosses the
    process boundary.

    Args:
        dataset (object): the dataset; ``self[i]`` is ``dataset[i]``.
    """

    def __init__(self, dataset: object) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return 0  # unused: the feeder knows the number of batches (or that there is no end)

    def __getitem__(self, index: Any) -> object:
        return self.dataset[index]  # type: ignore[index]


# --------------------------------------------------------------------------------------------
# Generators (threads only)


class _End:
    """Returned in place of a batch once the generator is exhausted (thread mode: by identity)."""


_END = _End()


class _GeneratorSource:
    """Index-addressed view of a thread-safe iterator: ``self[i]`` is simply the next item."""

    def __init__(self, iterator: Iterator[object]) -> None:
        self.iterator = iterator

    def __len__(self) -> int:
        return 0  # unknown; OrderedPool only checks that len() exists, imap gets the indices

    def __getitem__(self, index: int) -> object:
        try:
            return next(self.iterator)
        except StopIteration:
            return _END


def _generator_feed(pool: Any, check: _StructureCheck, errors: list[BaseException]) -> Any:
    """Yield the generator's items, in its order, from the loading thread; then stop."""
    try:
        for position, batch in enumerate(pool.imap(itertools.count())):
            if batch is _END:
                return
            check(batch, position)
            yield batch
    except GeneratorExit:  # Keras stopped early: not an error
        raise
    except BaseException as exc:
        errors.append(exc)
        raise


def _checked_generator(gen: Iterator[object], check: _StructureCheck, errors: list) -> Any:
    """workers=0: pass the generator through, checking structure."""
    try:
        for position, batch in enumerate(gen):
            check(batch, position)
            yield batch
    except GeneratorExit:
        raise
    except BaseException as exc:
        errors.append(exc)
        raise
