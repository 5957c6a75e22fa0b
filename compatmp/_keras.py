"""``compatmp.fit`` / ``evaluate`` / ``predict``: Keras training with compatmp workers.

The public wrappers: they check and classify the inputs (all before any worker starts), start
one :class:`~compatmp._pool.OrderedPool` for the whole call (training and validation share it),
hand Keras the proxies from :mod:`compatmp._feeder`, and stop every worker when the call ends,
however it ends. How Keras asks for batches, and how the feeder answers, is described in
:mod:`compatmp._feeder`: NOTE [ How Keras 3 drives a PyDataset ] and
NOTE [ One pool for training and validation ].

Nothing here runs at ``import compatmp``: Keras is imported inside functions.
"""

from __future__ import annotations

import collections.abc
import gc
import logging
import os
import sys
import traceback
import types
import warnings
from collections.abc import Callable
from typing import Any

from ._args import DEFAULT_MAX_QUEUE_SIZE, check_max_queue_size, check_workers, describe
from ._exceptions import ThreadFallbackWarning
from ._feeder import (
    _TRAIN,
    _VALIDATION,
    _checked_generator,
    _Feeder,
    _generator_feed,
    _GeneratorSource,
    _PoolState,
    _proxy_class,
    _Source,
    _StructureCheck,
    _TrainAndValidation,
)

__all__ = ["evaluate", "fit", "predict"]

# The pool's start-method decision is logged at INFO on the "compatmp" logger, e.g.
# ``logging.basicConfig(level=logging.INFO)`` or ``python -m compatmp demo`` shows it.
_log = logging.getLogger("compatmp")

#: ``workers=None`` and the dataset has no ``workers`` setting above 1: use up to this many.
#: Four keeps a typical augmentation pipeline ahead of a small model without oversubscribing
#: laptops; each process worker costs memory (one copy of the dataset, plus Keras if the
#: dataset's class needs it).
DEFAULT_MAX_WORKERS = 4


# --------------------------------------------------------------------------------------------
# Input checks (all of them run before any worker starts)


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
            f"{describe(x)}. Arrays, tensors, dicts, lists and tf.data datasets need no "
            f"Python workers: pass them to model.fit/evaluate/predict directly."
        )
    if hasattr(type(x), "__getitem__") and hasattr(type(x), "__len__"):
        return "dataset"
    if _is_pydataset(x):
        raise TypeError(
            f"{arg} is a keras.utils.PyDataset without __len__ ({describe(x)}); compatmp "
            f"needs the number of batches. Define __len__ (infinite datasets are not supported)."
        )
    if isinstance(x, collections.abc.Iterator):
        return "generator"
    hint = ""
    if callable(x):
        hint = " It is callable: if it is a generator function, pass its result, f(), instead."
    raise TypeError(
        f"{arg} must be a keras.utils.PyDataset (or keras.utils.Sequence), an object with "
        f"__len__ and __getitem__ returning batches, or a generator; received {describe(x)}." + hint
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
        raise TypeError(f"len({arg}) failed for {describe(x)}: {exc}") from exc
    if n == 0:
        raise ValueError(
            f"{arg} is empty: len({arg}) == 0 batches ({describe(x)}). A dataset's __len__ "
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
    check_workers(workers, 0, allow_none=True)  # None: the dataset's own setting
    check_max_queue_size(max_queue_size)
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
    """One proxy per dataset; one pool for all of them, or none with ``n_workers == 0``.

    See NOTE [ One pool for training and validation ] in compatmp/_feeder.py.
    """
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
    max_queue_size: int = DEFAULT_MAX_QUEUE_SIZE,
    **fit_kwargs: Any,
) -> Any:
    """Train ``model`` on a dataset loaded by worker processes (or threads where unsafe).

    Same as ``model.fit(x, **fit_kwargs)``, but the batches come from one
    :class:`compatmp._pool.OrderedPool` that lives for the whole call - across epochs and
    validation, unlike Keras' enqueuer, which restarts its pool every epoch - started with a
    start method that is safe on this platform (:func:`compatmp.decide_start_method`). Keras
    itself never pickles anything: it sees a proxy ``PyDataset`` with ``workers=1``.

    Semantics kept from Keras 3 (NOTE [ How Keras 3 drives a PyDataset ] in compatmp/_feeder.py):
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
    max_queue_size: int = DEFAULT_MAX_QUEUE_SIZE,
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
    max_queue_size: int = DEFAULT_MAX_QUEUE_SIZE,
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
