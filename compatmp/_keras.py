"""``compatmp.fit`` / ``evaluate`` / ``predict``: Keras training with compatmp workers.

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
  ``tf.errors`` type; :func:`_call_keras` re-raises compatmp's original exception instead.
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
class is built on first use (:func:`_proxy_class`).
"""

from __future__ import annotations

import collections.abc
import functools
import gc
import itertools
import logging
import os
import random
import sys
import threading
import traceback
import types
import warnings
from collections.abc import Callable, Iterator
from typing import Any

from ._exceptions import ThreadFallbackWarning

__all__ = ["evaluate", "fit", "predict"]

# The pool's start-method decision is logged at INFO on the "compatmp" logger, e.g.
# ``logging.basicConfig(level=logging.INFO)`` or ``python -m compatmp demo`` shows it.
_log = logging.getLogger("compatmp")

#: ``workers=None`` and the dataset has no ``workers`` setting above 1: use up to this many.
#: Four keeps a typical augmentation pipeline ahead of a small model without oversubscribing
#: laptops; each process worker costs memory (one copy of the dataset, plus Keras if the
#: dataset's class needs it).
DEFAULT_MAX_WORKERS = 4

_TRAIN, _VALIDATION = 0, 1


# --------------------------------------------------------------------------------------------
# Input checks (all of them run before any worker starts)


def _describe(obj: object) -> str:
    text = repr(obj)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{type(obj).__module__}.{type(obj).__qualname__} {text}"


def _is_array_like(obj: object) -> bool:
    """True for data Keras loads itself: arrays, tensors, tf.data, dicts, lists of arrays."""
    if isinstance(obj, (str, bytes, tuple, list, collections.abc.Mapping)):
        return True
    if hasattr(obj, "__array__") or (hasattr(obj, "shape") and hasattr(obj, "dtype")):
        return True  # numpy, tf/torch/jax tensors, pandas
    return hasattr(obj, "element_spec")  # tf.data.Dataset


def _is_pydataset(obj: object) -> bool:
    keras = sys.modules.get("keras")
    return keras is not None and isinstance(obj, keras.utils.PyDataset)


def _classify(x: object, arg: str = "x") -> str:
    """Return ``"dataset"`` or ``"generator"``; raise TypeError for anything else."""
    if isinstance(x, types.GeneratorType):
        return "generator"
    if _is_array_like(x):
        raise TypeError(
            f"{arg} must be a keras.utils.PyDataset (or keras.utils.Sequence), an object with "
            f"__len__ and __getitem__ returning batches, or a generator; received "
            f"{_describe(x)}. Arrays, tensors, dicts, lists and tf.data datasets need no "
            f"Python workers: pass them to model.fit/evaluate/predict directly."
        )
    if hasattr(type(x), "__getitem__") and hasattr(type(x), "__len__"):
        return "dataset"
    if _is_pydataset(x):
        raise TypeError(
            f"{arg} is a keras.utils.PyDataset without __len__ ({_describe(x)}); compatmp "
            f"needs the number of batches. Define __len__ (infinite datasets are not supported)."
        )
    if isinstance(x, collections.abc.Iterator):
        return "generator"
    hint = ""
    if callable(x):
        hint = " It is callable: if it is a generator function, pass its result, f(), instead."
    raise TypeError(
        f"{arg} must be a keras.utils.PyDataset (or keras.utils.Sequence), an object with "
        f"__len__ and __getitem__ returning batches, or a generator; received {_describe(x)}."
        + hint
    )


def _check_workers(workers: object) -> None:
    if workers is None:
        return
    if isinstance(workers, bool) or not isinstance(workers, int):
        raise TypeError(
            f"workers must be an int >= 0 or None; received {workers!r} of type "
            f"{type(workers).__name__}. Use workers=0 to load batches in the main process, "
            f"None for the dataset's own setting or min({DEFAULT_MAX_WORKERS}, CPU count)."
        )
    if workers < 0:
        raise ValueError(
            f"workers must be >= 0; received {workers}. Use workers=0 to load batches in the "
            "main process without workers."
        )


def _check_queue_size(max_queue_size: object) -> None:
    if isinstance(max_queue_size, bool) or not isinstance(max_queue_size, int):
        raise TypeError(
            f"max_queue_size must be an int >= 1 (batches prefetched); received "
            f"{max_queue_size!r} of type {type(max_queue_size).__name__}"
        )
    if max_queue_size < 1:
        raise ValueError(
            f"max_queue_size must be >= 1 (batches prefetched); received {max_queue_size}"
        )


def _resolve_workers(x: object, workers: int | None) -> int:
    """``workers`` if given, else the dataset's own ``workers`` (> 1), else min(4, CPUs)."""
    if workers is not None:
        return workers
    # PyDataset keeps the constructor argument in ``_workers``; reading the ``workers``
    # property of a subclass that skipped super().__init__() would warn (py_dataset_adapter.py,
    # _warn_if_super_not_called).
    own = getattr(x, "_workers", None) if _is_pydataset(x) else getattr(x, "workers", None)
    if isinstance(own, int) and not isinstance(own, bool) and own > 1:
        return own
    return min(DEFAULT_MAX_WORKERS, os.cpu_count() or 1)


def _dataset_length(x: object, arg: str = "x") -> int:
    try:
        n = len(x)  # type: ignore[arg-type]
    except TypeError as exc:
        raise TypeError(f"len({arg}) failed for {_describe(x)}: {exc}") from exc
    if n == 0:
        raise ValueError(
            f"{arg} is empty: len({arg}) == 0 batches ({_describe(x)}). A dataset's __len__ "
            "must return the number of batches, at least 1."
        )
    return n


def _check_no_targets(kwargs: dict[str, Any], fn: str) -> None:
    for name in ("y", "sample_weight"):
        if kwargs.get(name) is not None:
            raise ValueError(
                f"compatmp.{fn}: {name}= cannot be passed with a dataset or generator; the "
                f"dataset's batches must carry it, as (x, y) or (x, y, sample_weight) "
                f"(same rule as Keras, data_adapters/__init__.py raise_unsupported_arg)."
            )
    if kwargs.get("validation_split"):
        raise ValueError(
            "compatmp.fit: validation_split only works with arrays (Keras slices them); pass "
            "validation_data=<another dataset> instead."
        )


# --------------------------------------------------------------------------------------------
# Batch structure


def _structure(obj: object) -> str:
    """Describe a batch's nesting and array ranks, ignoring sizes and dtypes."""
    if isinstance(obj, collections.abc.Mapping):
        items = ", ".join(f"{k!r}: {_structure(obj[k])}" for k in sorted(obj, key=repr))
        return "{" + items + "}"
    if isinstance(obj, tuple):
        inner = ", ".join(_structure(v) for v in obj)
        return f"({inner},)" if len(obj) == 1 else f"({inner})"
    if isinstance(obj, list):
        return "[" + ", ".join(_structure(v) for v in obj) + "]"
    if obj is None:
        return "None"
    shape = getattr(obj, "shape", None)
    if shape is not None:
        try:
            return f"array(rank {len(shape)})"
        except TypeError:  # shape of unknown rank (symbolic tensors)
            pass
    return type(obj).__name__


class _StructureCheck:
    """Remember the first batch's structure; raise ValueError when a later batch differs."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.first: tuple[object, str] | None = None

    def __call__(self, batch: object, index: object) -> None:
        found = _structure(batch)
        if self.first is None:
            self.first = (index, found)
            return
        first_index, expected = self.first
        if found != expected:
            raise ValueError(
                f"the batch structure changed: {self.what}[{index!r}] returned {found}, but "
                f"{self.what}[{first_index!r}] returned {expected}. Every batch must have the "
                "same structure - (x,), (x, y) or (x, y, sample_weight) with the same nesting "
                "and array ranks; only the batch size may differ (e.g. a smaller last batch)."
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
        return len(self.train)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]) -> object:
        part, index = key
        return (self.train if part == _TRAIN else self.validation)[index]  # type: ignore[index]


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

    def fetch(self, indices: list[int]) -> Iterator[object]:
        """Return an iterator over ``dataset[i] for i in indices``, in that order."""
        if self.pool is None:
            return (self.dataset[i] for i in indices)  # type: ignore[index]
        assert self.state is not None
        self.state.sync()
        keys: list[Any] = indices if self.part is None else [(self.part, i) for i in indices]
        return self.pool.imap(keys)

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
        length (int): ``len(dataset)``.
        shuffle (bool): shuffle the batch order per pass like Keras' ``fit(shuffle=True)``.
        what (str): name used in error messages ("x", "validation_data").
    """

    def __init__(
        self, dataset: object, source: _Source, length: int, *, shuffle: bool, what: str
    ) -> None:
        self.dataset = dataset
        self.source = source
        self.length = length
        self.shuffle = shuffle
        self.check = _StructureCheck(what)
        self.error: BaseException | None = None
        self.restarts = 0  # streams started somewhere other than where the last one stood
        self._lock = source.lock
        self._order: list[int] = list(range(length))
        self._stream: Iterator[object] | None = None
        self._next = 0  # the position the stream yields next
        self._in_epoch = False

    def get(self, position: int) -> object:
        """Return the batch for Keras' position ``position`` (see the class docstring)."""
        with self._lock:
            if isinstance(position, bool) or not isinstance(position, int):
                raise TypeError(f"batch position must be an int; received {position!r}")
            if not 0 <= position < self.length:
                raise IndexError(f"batch position {position} out of range [0, {self.length})")
            try:
                batch = self._get(position)
                self.check(batch, self._order[position] if self._in_epoch else position)
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
            (batch,) = list(self.source.fetch([position]))
            return batch
        if self._stream is not None or position != 0:
            self.restarts += 1
        self._drop_stream()
        if position == 0:
            # A new pass. Shuffle like PyDatasetAdapter._finite_generator: random.shuffle of
            # range(n), so keras.utils.set_random_seed gives the order plain Keras would use.
            self._order = list(range(self.length))
            if self.shuffle:
                random.shuffle(self._order)
        self._stream = self.source.fetch(self._order[position:])
        self._next = position + 1
        return next(self._stream)

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


@functools.cache
def _proxy_class() -> type:
    """Build the ``keras.utils.PyDataset`` subclass Keras sees (imports Keras once)."""
    import keras

    class _ProxyDataset(keras.utils.PyDataset):
        """What Keras iterates: batches from a :class:`_Feeder`, no Keras workers."""

        def __init__(self, feeder: _Feeder) -> None:
            # workers=1, use_multiprocessing=False: PyDatasetAdapter starts no enqueuer.
            super().__init__(workers=1, use_multiprocessing=False)
            self.feeder = feeder

        def __len__(self) -> int:
            return self.feeder.length

        def __getitem__(self, index: int) -> object:
            return self.feeder.get(index)

        def on_epoch_begin(self) -> None:
            self.feeder.epoch_begin()

        def on_epoch_end(self) -> None:
            self.feeder.epoch_end()

    _ProxyDataset.__qualname__ = "_ProxyDataset"
    return _ProxyDataset


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


# --------------------------------------------------------------------------------------------
# The calls


def _open_pool(dataset: object, workers: int, start_method: str, max_queue_size: int) -> Any:
    from ._pool import OrderedPool

    return OrderedPool(
        dataset, workers=workers, start_method=start_method, max_queue_size=max_queue_size
    )


def _log_decision(fn: str, pool: Any) -> None:
    decision = pool.decision
    if decision.method == "thread":
        how = f"{pool.workers} worker thread(s)"
    else:
        how = f"{pool.workers} worker process(es) started with {decision.method}"
    _log.info("compatmp.%s: %s; %s", fn, how, decision.reason)


class _Session:
    """Everything one fit/evaluate/predict call starts; :meth:`close` stops all of it."""

    def __init__(self) -> None:
        self.pools: list[Any] = []
        self.feeders: list[_Feeder] = []
        self.generator_errors: list[BaseException] = []

    def close(self) -> None:
        # Close the pools without taking the feeders' locks: a TensorFlow thread may still be
        # inside a feeder waiting for a batch, and OrderedPool.close() ends its stream.
        for pool in self.pools:
            pool.close()
        # Drop the errors kept for _call_keras: a feeder is reachable from the generator in
        # TensorFlow's py_func registry, and an error's traceback holds Keras' fit frame and
        # its tf.data iterator; kept here they would pin both for good.
        for feeder in self.feeders:
            feeder.error = None
        self.generator_errors.clear()

    def first_error(self) -> BaseException | None:
        for feeder in self.feeders:
            if feeder.error is not None:
                return feeder.error
        return self.generator_errors[0] if self.generator_errors else None


def _prepare(
    session: _Session,
    x: object,
    *,
    validation: object,
    workers: int | None,
    start_method: str,
    max_queue_size: int,
    shuffle: bool,
    fn: str,
    steps: int | None,
    steps_name: str,
) -> tuple[Any, Any]:
    """Check the inputs, start the pool(s), and return what to pass to Keras as ``x`` and as
    ``validation_data`` (``validation`` unchanged unless it is a dataset)."""
    _check_workers(workers)
    _check_queue_size(max_queue_size)
    kind = _classify(x)
    n_workers = _resolve_workers(x, workers)
    if kind == "generator" and fn == "fit" and steps is None:
        raise ValueError(
            f"compatmp.fit with a generator needs {steps_name}=<batches per epoch>: a "
            "generator has no length, and without it the first epoch would consume the "
            "whole generator and later epochs would get nothing."
        )
    datasets: list[tuple[object, int, bool, str]] = []  # (dataset, length, shuffle, name)
    if kind == "dataset":
        datasets.append((x, _dataset_length(x), shuffle, "x"))
    has_val = validation is not None and not _is_array_like(validation)
    if has_val and _classify(validation, "validation_data") == "dataset":
        val_length = _dataset_length(validation, "validation_data")
        datasets.append((validation, val_length, False, "validation_data"))
    # All checks passed: from here on workers start.

    proxies = _dataset_proxies(session, datasets, n_workers, start_method, max_queue_size, fn)
    keras_x = proxies.pop(0) if kind == "dataset" else None
    keras_val = proxies.pop(0) if proxies else validation
    if keras_x is not None:
        return keras_x, keras_val

    check = _StructureCheck("generator item")
    if n_workers == 0:
        return _checked_generator(x, check, session.generator_errors), keras_val  # type: ignore[arg-type]
    warnings.warn(
        f"compatmp.{fn}: x is a generator, so one background thread loads it instead of "
        f"{n_workers} worker process(es): a generator cannot be shared between processes "
        "(a suspended Python frame cannot be pickled), and it produces one item at a time "
        "whoever calls it. For parallel loading in processes, write the data as a "
        "keras.utils.PyDataset (__len__ and __getitem__).",
        ThreadFallbackWarning,
        stacklevel=4,
    )
    from ._threadsafe import threadsafe_iter

    # NOTE [ One thread for a generator ]: threadsafe_iter serializes next() anyway, so more
    # threads would not load faster - but they could take turns out of order, and the i-th
    # item would no longer be the i-th batch (the predict_generator disorder). One thread
    # keeps the generator's order and still loads ahead of the model.
    source = _GeneratorSource(threadsafe_iter(x))  # type: ignore[arg-type]
    pool = _open_pool(source, 1, "thread", max_queue_size)
    session.pools.append(pool)
    _log_decision(fn, pool)
    return _generator_feed(pool, check, session.generator_errors), keras_val


def _dataset_proxies(
    session: _Session,
    datasets: list[tuple[object, int, bool, str]],
    n_workers: int,
    start_method: str,
    max_queue_size: int,
    fn: str,
) -> list[Any]:
    """One proxy per dataset; one pool for all of them (NOTE [ One pool for training and
    validation ]), or none with ``n_workers == 0``."""
    if not datasets:
        return []
    sources: list[_Source]
    if n_workers == 0:
        sources = [_Source(ds) for ds, *_ in datasets]
    else:
        if len(datasets) == 1:
            root = datasets[0][0]
        else:
            root = _TrainAndValidation(datasets[0][0], datasets[1][0])
        pool = _open_pool(root, n_workers, start_method, max_queue_size)
        session.pools.append(pool)
        _log_decision(fn, pool)
        state = _PoolState(pool, root)
        if len(datasets) == 1:
            sources = [_Source(datasets[0][0], state)]
        else:
            sources = [
                _Source(datasets[0][0], state, _TRAIN),
                _Source(datasets[1][0], state, _VALIDATION),
            ]
    proxy_cls = _proxy_class()
    proxies = []
    for (dataset, length, shuffle, name), source in zip(datasets, sources, strict=True):
        feeder = _Feeder(dataset, source, length, shuffle=shuffle, what=name)
        session.feeders.append(feeder)
        proxies.append(proxy_cls(feeder))
    return proxies


def _call_keras(session: _Session, call: Callable[[], Any]) -> Any:
    """Run the Keras call; whatever happens, stop every worker before returning.

    With the TensorFlow backend, an exception raised while Keras pulls a batch (in a
    ``tf.data`` thread) reaches us wrapped in a ``tf.errors`` type; the feeder kept the
    original (``WorkerCrashedError``, the dataset's own ``KeyError``, our ``ValueError``...),
    which is raised instead, with the TensorFlow error as ``__context__``.
    """
    try:
        return call()
    except BaseException as exc:
        original = session.first_error() if isinstance(exc, Exception) else None
        session.close()
        _release_keras_frames(exc, original)
        if original is not None and original is not exc and _wraps(exc, original):
            raise original  # noqa: B904 - keep the worker traceback as __cause__
        raise
    finally:
        session.close()


def _release_keras_frames(*errors: BaseException | None) -> None:
    """Free what the frames of a failed Keras call hold, now, while Python still runs.

    NOTE [ Freeing tf.data after a failed call ]
    When ``model.fit`` raises, the traceback keeps Keras' frames alive, and they hold the
    ``tf.data`` iterator. Left to interpreter exit, that iterator is destroyed after Python
    has stopped the tf.data thread that was inside our batch generator, and its destructor
    waits for that thread forever: the program hangs at exit (plain Keras does the same,
    e.g. after Ctrl-C). A caller who catches the error and retries would also keep one
    iterator and its TensorFlow threads per failed call. Clearing the locals of the finished
    frames (``traceback.clear_frames``; the caller's own frames are not in this traceback)
    and collecting now releases the iterator on this thread. Cost: one ``gc.collect()``
    (~0.3-0.5 s) on the error path only; Keras-internal locals are gone from post-mortem
    debugging. Found by tests/test_hostile.py.
    """
    seen: set[int] = set()
    stack = [e for e in errors if e is not None]
    while stack:
        err = stack.pop()
        if id(err) in seen:
            continue
        seen.add(id(err))
        if err.__traceback__ is not None:
            traceback.clear_frames(err.__traceback__)
        stack += [e for e in (err.__cause__, err.__context__) if e is not None]
    gc.collect()


def _wraps(exc: BaseException, original: BaseException) -> bool:
    """True if ``exc`` is TensorFlow's wrapper of ``original`` (raised in a tf.data thread),
    not an unrelated later error (e.g. from a callback) after a prefetch failure Keras never
    consumed."""
    return type(exc).__module__.startswith("tensorflow") or (
        bool(str(original)) and str(original) in str(exc)
    )


def fit(
    model: Any,
    x: Any,
    *,
    workers: int | None = None,
    start_method: str = "auto",
    max_queue_size: int = 10,
    **fit_kwargs: Any,
) -> Any:
    """Train ``model`` on a dataset loaded by worker processes (or threads where unsafe).

    Same as ``model.fit(x, **fit_kwargs)``, but the batches come from one
    :class:`compatmp._pool.OrderedPool` that lives for the whole call - across epochs and
    validation, unlike Keras' enqueuer, which restarts its pool every epoch - started with a
    start method that is safe on this platform (:func:`compatmp.decide_start_method`). Keras
    itself never pickles anything: it sees a proxy ``PyDataset`` with ``workers=1``.

    Semantics kept from Keras 3 (NOTE [ How Keras 3 drives a PyDataset ] in this module):
    every batch index is used exactly once per pass, in order, or in a random order per pass
    when ``shuffle=True`` (Keras' default; shuffled with ``random.shuffle`` like
    ``PyDatasetAdapter``); ``on_epoch_begin``/``on_epoch_end`` run in the main process at the
    points Keras calls them (including the ``on_epoch_end`` Keras calls once before the first
    epoch), and the state they change reaches the workers before the next batch is loaded
    (the pool skips the send when the pickled dataset did not change).

    Args:
        model (keras.Model): a compiled model (any Keras 3 backend).
        x (keras.utils.PyDataset | object | generator): a ``PyDataset`` (also under its
            ``keras.utils.Sequence`` alias), any object with ``__len__`` (number of batches)
            and ``__getitem__`` returning ``(x,)``, ``(x, y)`` or ``(x, y, sample_weight)``,
            or a Python generator/iterator of such batches. A generator is loaded by one
            background thread (through :class:`compatmp._threadsafe.threadsafe_iter`, in the
            generator's order) with a :class:`~compatmp.ThreadFallbackWarning`, and needs
            ``steps_per_epoch``. A ``PyDataset``'s own ``use_multiprocessing`` and
            ``max_queue_size`` settings are not used: ``start_method`` and ``max_queue_size``
            here decide.
        workers (int | None): worker count; 0 loads batches in the main process (default:
            None: the dataset's own ``workers`` if above 1, else ``min(4, os.cpu_count())``).
        start_method (str): ``"auto"``, ``"fork"``, ``"forkserver"``, ``"spawn"`` or
            ``"thread"`` (default: ``"auto"``; also ``COMPATMP_START_METHOD``).
        max_queue_size (int): batches loaded ahead of the model (default: 10).
        **fit_kwargs: passed to ``model.fit`` (``epochs``, ``callbacks``, ``validation_data``,
            ``steps_per_epoch``, ``initial_epoch``, ``verbose``, ``class_weight``, ...).
            ``validation_data`` given as a dataset is loaded by the same workers.

    Returns:
        keras.callbacks.History: exactly what ``model.fit`` returns.

    Raises:
        TypeError: ``x`` is neither dataset nor generator, or ``workers``/``max_queue_size``
            is not an int.
        ValueError: ``workers`` < 0, an empty dataset, ``y``/``sample_weight`` given with a
            dataset, a generator without ``steps_per_epoch``, or a batch whose structure
            differs from the first batch's.
        compatmp.StartMethodError: ``start_method`` is not available here.
        compatmp.WorkerCrashedError: a worker process died (instead of hanging).
        Exception: whatever ``dataset[i]`` raised in a worker, same type, with the worker's
            traceback as ``__cause__``.
    """
    _check_no_targets(fit_kwargs, "fit")
    session = _Session()
    try:
        kind = _classify(x)
        explicit_shuffle = "shuffle" in fit_kwargs
        shuffle = fit_kwargs.pop("shuffle", True)
        keras_x, keras_val = _prepare(
            session,
            x,
            validation=fit_kwargs.get("validation_data"),
            workers=workers,
            start_method=start_method,
            max_queue_size=max_queue_size,
            shuffle=bool(shuffle) if kind == "dataset" else False,
            fn="fit",
            steps=fit_kwargs.get("steps_per_epoch"),
            steps_name="steps_per_epoch",
        )
    except BaseException:
        session.close()
        raise
    if kind == "dataset":
        fit_kwargs["shuffle"] = False  # we shuffle (see NOTE [ How Keras 3 drives ... ])
    else:
        # Keras ignores shuffle for generators and warns when it is True - its default - so
        # only pass on what the caller asked for.
        fit_kwargs["shuffle"] = shuffle if explicit_shuffle else False
    if "validation_data" in fit_kwargs:
        fit_kwargs["validation_data"] = keras_val
    return _call_keras(session, lambda: model.fit(keras_x, **fit_kwargs))


def evaluate(
    model: Any,
    x: Any,
    *,
    workers: int | None = None,
    start_method: str = "auto",
    max_queue_size: int = 10,
    **kwargs: Any,
) -> Any:
    """Evaluate ``model`` on a dataset loaded by compatmp workers.

    Same as ``model.evaluate(x, **kwargs)`` with the batches loaded as in :func:`fit` (in
    order, never shuffled).

    Args:
        model (keras.Model): a compiled model.
        x (keras.utils.PyDataset | object | generator): see :func:`fit`; a generator runs
            until exhausted or for ``steps`` batches.
        workers (int | None): see :func:`fit` (default: None).
        start_method (str): see :func:`fit` (default: ``"auto"``).
        max_queue_size (int): batches loaded ahead (default: 10).
        **kwargs: passed to ``model.evaluate`` (``steps``, ``return_dict``, ``verbose``...).

    Returns:
        float | list[float] | dict: exactly what ``model.evaluate`` returns.

    Raises:
        TypeError, ValueError, compatmp.StartMethodError, compatmp.WorkerCrashedError: as
            for :func:`fit`.
    """
    return _run_inference("evaluate", model, x, workers, start_method, max_queue_size, kwargs)


def predict(
    model: Any,
    x: Any,
    *,
    workers: int | None = None,
    start_method: str = "auto",
    max_queue_size: int = 10,
    **kwargs: Any,
) -> Any:
    """Predict on a dataset loaded by compatmp workers; rows come back in dataset order.

    Same as ``model.predict(x, **kwargs)``: batch ``i`` of the output holds the predictions
    for ``x[i]``, whichever worker loaded it (the reorder buffer of the pool restores the
    order; Keras 2's ``predict_generator`` with several workers could reorder or deadlock).

    Args:
        model (keras.Model): the model.
        x (keras.utils.PyDataset | object | generator): see :func:`fit`; batches may be
            ``(x,)`` or ``x`` alone or carry targets, which are ignored, as in Keras.
        workers (int | None): see :func:`fit` (default: None).
        start_method (str): see :func:`fit` (default: ``"auto"``).
        max_queue_size (int): batches loaded ahead (default: 10).
        **kwargs: passed to ``model.predict`` (``steps``, ``verbose``, ``callbacks``).

    Returns:
        numpy.ndarray | list | dict: exactly what ``model.predict`` returns.

    Raises:
        TypeError, ValueError, compatmp.StartMethodError, compatmp.WorkerCrashedError: as
            for :func:`fit`.
    """
    return _run_inference("predict", model, x, workers, start_method, max_queue_size, kwargs)


def _run_inference(
    fn: str,
    model: Any,
    x: Any,
    workers: int | None,
    start_method: str,
    max_queue_size: int,
    kwargs: dict[str, Any],
) -> Any:
    if fn == "evaluate":
        _check_no_targets(kwargs, fn)
    session = _Session()
    try:
        keras_x, _ = _prepare(
            session,
            x,
            validation=None,
            workers=workers,
            start_method=start_method,
            max_queue_size=max_queue_size,
            shuffle=False,
            fn=fn,
            steps=kwargs.get("steps"),
            steps_name="steps",
        )
    except BaseException:
        session.close()
        raise
    method = getattr(model, fn)
    return _call_keras(session, lambda: method(keras_x, **kwargs))
