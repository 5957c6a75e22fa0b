"""``compatmp.fit`` / ``evaluate`` / ``predict``: Keras training with compatmp workers.

The public wrappers: they bind and check the arguments and classify the inputs
(:mod:`compatmp._fitargs`, all before any worker starts), pass data Keras loads itself to
Keras unchanged, take one :class:`~compatmp._pool.OrderedPool` for the whole call (training
and validation share it; an idle one kept from an earlier call when it fits, NOTE [ Reused
workers ] in :mod:`compatmp._reuse`), hand Keras the proxies from :mod:`compatmp._feeder`
(Keras 3) or :mod:`compatmp._keras2` (Keras 2, chosen from the model), and when the call ends
give the pool back to be kept idle (the call ended normally) or stop every worker (it raised,
however). How Keras asks for batches, and how the feeder answers, is described in
NOTE [ How Keras 3 drives a PyDataset ], NOTE [ How Keras 2 drives a Sequence ] and
NOTE [ One pool for training and validation ].

Nothing here runs at ``import compatmp``: Keras is imported inside functions.
"""

from __future__ import annotations

import gc
import logging
import sys
import traceback
import warnings
from collections.abc import Callable
from typing import Any

from ._exceptions import ThreadFallbackWarning, UnsupportedInputError
from ._feeder import (
    _TRAIN,
    _VALIDATION,
    _checked_generator,
    _Feeder,
    _generator_feed,
    _GeneratorSource,
    _keras3_proxy_class,
    _PoolState,
    _Sized,
    _Source,
    _StructureCheck,
    _TrainAndValidation,
    epoch_callback,
)
from ._fitargs import (
    DEFAULT_MAX_WORKERS,
    LOADER_ARGS,
    Loader,
    bind_keras_args,
    classify,
    dataset_length,
)
from ._keras2 import keras2_proxy_class, keras_flavour
from ._stall import DEFAULT_STALL_TIMEOUT

__all__ = ["DEFAULT_MAX_WORKERS", "evaluate", "fit", "predict"]

# The pool's start-method decision is logged at INFO on the "compatmp" logger, e.g.
# ``logging.basicConfig(level=logging.INFO)`` or ``python -m compatmp demo`` shows it.
_log = logging.getLogger("compatmp")
_passthrough_logged = False


# --------------------------------------------------------------------------------------------
# Input checks (all of them run before any worker starts)


# NOTE [ Keras' own error messages ]
# Where compatmp rejects input that Keras would reject, the error has Keras' type and its
# message starts with Keras' own message for the model's Keras flavour, so code and tests
# written against Keras (``assertRaisesRegex(ValueError, "`y` argument is not supported")``
# in tf_keras' own tests) keep working; compatmp's explanation follows. The texts, copied from
# Keras 3.15 and tf_keras 2.21 (tests/test_keras.py and tests/test_keras2.py check them
# against the installed Keras):
# * ``y``/``sample_weight`` with a dataset or generator: Keras 3
#   ``keras/src/trainers/data_adapters/__init__.py`` ``raise_unsupported_arg`` (checks ``is
#   not None``); tf_keras ``tf_keras/src/engine/data_adapter.py``
#   ``KerasSequenceAdapter``/``GeneratorDataAdapter`` (checks ``is_none_or_empty``: ``[]``
#   passes).
# * ``validation_split`` with no ``validation_data``: Keras 3
#   ``keras/src/trainers/data_adapters/array_slicing.py`` ``train_validation_split``; tf_keras
#   ``data_adapter.train_validation_split``. With ``validation_data`` both ignore it.
# * an ``x`` or ``validation_data`` nobody can load: Keras 3 ``get_data_adapter`` ("Unrecognized
#   data type"), tf_keras ``select_data_adapter`` ("Failed to find data adapter"), raised as
#   :class:`~compatmp.UnsupportedInputError` (also the TypeError compatmp raised before).
# Not mirrored: compatmp's own pre-checks for input Keras accepts or fails on only later
# (an empty dataset, an infinite PyDataset without steps, the loader settings).


def _keras_type_name(x: object) -> str:
    """tf_keras' ``data_adapter._type_name``: the type, and the item types of containers."""
    if isinstance(x, dict):
        keys = {_keras_type_name(k) for k in x}
        values = {_keras_type_name(v) for v in x.values()}
        return f"({type(x)} containing {keys} keys and {values} values)"
    if isinstance(x, (list, tuple)):
        return f"({type(x)} containing values of types { ({_keras_type_name(v) for v in x}) })"
    return str(type(x))


def _keras_target_message(flavour: int, name: str, kind: str) -> str:
    """Keras' message for ``y=``/``sample_weight=`` passed with a dataset or a generator."""
    if flavour == 2:
        source = "`keras.utils.Sequence`" if kind == "dataset" else "python generator"
        return f"`{name}` argument is not supported when using {source} as input."
    input_type = "PyDataset" if kind == "dataset" else "generator"
    arg, what = ("y", "the targets") if name == "y" else ("sample_weights", "the sample weights")
    return (
        f"When providing `x` as a {input_type}, `{arg}` should not be passed. Instead, {what} "
        f"should be included as part of the {input_type}."
    )


def _none_or_empty(value: Any) -> bool:
    """tf_keras' ``is_none_or_empty`` for the plain containers a user passes."""
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (list, tuple)):
        return all(_none_or_empty(v) for v in value)
    return value is None


def _check_no_targets(kwargs: dict[str, Any], fn: str, flavour: int, kind: str, x: object) -> None:
    """Reject ``y``/``sample_weight``/``validation_split`` with a dataset or generator, as Keras
    does and with Keras' message (NOTE [ Keras' own error messages ]).

    Raises:
        ValueError: one of them was passed.
    """
    for name in ("y", "sample_weight"):
        value = kwargs.get(name)
        if value is None or (flavour == 2 and _none_or_empty(value)):
            continue
        raise ValueError(
            f"{_keras_target_message(flavour, name, kind)} (compatmp.{fn}: x is a {kind}, so "
            f"{name}= cannot be passed with it; its batches must carry it, as (x, y) or "
            "(x, y, sample_weight). Keras' own rule and message.)"
        )
    if fn == "fit" and kwargs.get("validation_split") and kwargs.get("validation_data") is None:
        if flavour == 2:
            said = (
                "`validation_split` is only supported for Tensors or NumPy arrays, found "
                f"following types in the input: {[type(x)]}"
            )
        else:  # sic: no space after the full stop, as in Keras
            said = (
                "Argument `validation_split` is only supported for tensors or NumPy arrays."
                f"Found incompatible type in the input: {[type(x)]}"
            )
        raise ValueError(
            f"{said} (compatmp.fit: validation_split only works with arrays, which Keras "
            "slices; pass validation_data=<another dataset> instead.)"
        )


def _classify(x: object, arg: str, flavour: int, y: object = None) -> str:
    """:func:`classify`, raising :class:`UnsupportedInputError` with Keras' message first."""
    try:
        return classify(x, arg)
    except TypeError as exc:
        if flavour == 2:
            said = (
                "Failed to find data adapter that can handle input: "
                f"{_keras_type_name(x)}, {_keras_type_name(y)}"
            )
        else:
            said = f"Unrecognized data type: x={x} (of type {type(x)})"
        raise UnsupportedInputError(f"{said} (compatmp: {exc})") from None


# --------------------------------------------------------------------------------------------
# The calls


def _open_pool(
    dataset: object, loader: Loader, workers: int, method: str, idle_timeout: float = 0.0
) -> Any:
    """The call's pool: with ``idle_timeout`` > 0 (seconds) a :class:`compatmp._reuse.Lease`
    (an idle pool kept from an earlier call if one fits; kept idle after the call), else a
    new :class:`~compatmp._pool.OrderedPool` the session closes. Every pool the wrappers
    start comes from here."""
    if idle_timeout > 0:
        from . import _reuse

        return _reuse.acquire(
            dataset,
            workers=workers,
            start_method=method,
            idle_timeout=idle_timeout,
            **loader.pool_options(),
        )
    from ._pool import OrderedPool

    return OrderedPool(dataset, workers=workers, start_method=method, **loader.pool_options())


def _log_decision(fn: str, pool: Any) -> None:
    decision = pool.decision
    if decision.method == "thread":
        how = f"{pool.workers} worker thread(s)"
    elif getattr(pool, "reused", False):
        how = f"{pool.workers} worker process(es) ({decision.method}) kept from the last call"
    else:
        how = f"{pool.workers} worker process(es) started with {decision.method}"
    _log.info("compatmp.%s: %s; %s", fn, how, decision.reason)


class _Session:
    """Everything one fit/evaluate/predict call starts; :meth:`close` stops all of it."""

    def __init__(self) -> None:
        self.pools: list[Any] = []  # OrderedPool or _reuse.Lease
        self.feeders: list[_Feeder] = []
        self.generator_errors: list[BaseException] = []

    def fail(self) -> None:
        """The call failed: its pools are closed, never kept (NOTE [ Reused workers ])."""
        for pool in self.pools:
            if hasattr(pool, "reusable"):
                pool.reusable = False

    def close(self) -> None:
        # Close the pools without taking the feeders' locks: a TensorFlow thread may still be
        # inside a feeder waiting for a batch, and OrderedPool.close() ends its stream. A
        # lease keeps its pool for the next call unless fail() ran (compatmp._reuse).
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


class _Call:
    """One checked call: the flavour, the kind of ``x``, its loader and Keras' arguments."""

    def __init__(
        self, fn: str, model: Any, x: Any, args: tuple, kwargs: dict, loader: dict
    ) -> None:
        self.fn = fn
        self.idle_timeout = 0.0  # seconds to keep the workers after the call (_run sets it)
        kwargs = bind_keras_args(model, fn, args, kwargs)
        for name in LOADER_ARGS:  # Keras 2 has them in its positional order
            if name in kwargs:
                if loader[name] is not None:
                    raise TypeError(f"compatmp.{fn}() got multiple values for argument {name!r}")
                loader[name] = kwargs.pop(name)
        self.kwargs = kwargs
        self.flavour = keras_flavour(model) or (3, "keras")
        self.ranks = self.flavour[0] == 2 or _keras3_backend() == "tensorflow"
        flavour = self.flavour[0]
        self.kind = _classify(x, "x", flavour, kwargs.get("y"))
        self.loader = Loader.resolve(x, **loader)
        self.validation = kwargs.get("validation_data") if fn == "fit" else None
        val_is_dataset = (
            self.validation is not None
            and _classify(self.validation, "validation_data", flavour) == "dataset"
        )
        self.datasets: list[tuple[object, int | None, str]] = []  # (dataset, length, name)
        if self.kind == "dataset":
            self.datasets.append((x, self._length(x, "x"), "x"))
        if val_is_dataset:
            self.datasets.append(
                (self.validation, self._length(self.validation, "validation_data"), "val")
            )
        if self.kind != "keras":
            _check_no_targets(kwargs, fn, flavour, self.kind, x)

    def _length(self, dataset: object, arg: str) -> int | None:
        n = dataset_length(dataset, arg)
        if n is None:
            steps = {"fit": "steps_per_epoch", "evaluate": "steps", "predict": "steps"}[self.fn]
            if arg == "validation_data":
                steps = "validation_steps"
            if self.kwargs.get(steps) is None:
                raise ValueError(
                    f"compatmp.{self.fn}: {arg} is an infinite PyDataset (num_batches is None); "
                    f"pass {steps}=<batches> so the call ends."
                )
            if self.flavour[0] == 2:
                raise TypeError(
                    f"{arg} is an infinite PyDataset (num_batches None), which Keras 2 "
                    "cannot iterate; give it a __len__."
                )
        return n

    @property
    def passthrough(self) -> bool:
        """Keras loads ``x`` itself and there is no dataset to load: no workers at all."""
        return self.kind == "keras" and not self.datasets


def _keras3_backend() -> str | None:
    """Keras 3's backend name, if Keras is imported (the model's Keras always is)."""
    keras = sys.modules.get("keras")
    try:
        return keras.backend.backend()  # type: ignore[union-attr]
    except AttributeError:
        return None


def _log_passthrough(fn: str) -> None:
    global _passthrough_logged
    if not _passthrough_logged:
        _passthrough_logged = True
        _log.info(
            "compatmp.%s: x is data Keras loads itself (arrays, tensors, tf.data, a torch "
            "DataLoader...): passed to model.%s unchanged, no workers needed. (Said once.)",
            fn,
            fn,
        )


def _prepare(session: _Session, call: _Call, x: object, shuffle: bool) -> tuple[Any, Any]:
    """Start the pool(s) and return what to pass to Keras as ``x`` and as
    ``validation_data`` (unchanged unless it is a dataset). Every check ran in :class:`_Call`."""
    loader = call.loader
    proxies = _dataset_proxies(session, call, shuffle)
    keras_x = proxies.pop(0) if call.kind == "dataset" else x
    keras_val = proxies.pop(0) if proxies else call.validation
    if call.kind != "generator":
        return keras_x, keras_val

    check = _StructureCheck("generator item", call.ranks)
    if loader.workers == 0:
        return _checked_generator(x, check, session.generator_errors), keras_val  # type: ignore[arg-type]
    if loader.start_method != "thread":
        warnings.warn(
            f"compatmp.{call.fn}: x is a generator, so one background thread loads it instead "
            f"of {loader.workers} worker process(es): a generator cannot be shared between "
            "processes (a suspended Python frame cannot be pickled), and it produces one item "
            "at a time whoever calls it. For parallel loading in processes, write the data as "
            "a keras.utils.PyDataset (__len__ and __getitem__).",
            ThreadFallbackWarning,
            stacklevel=4,
        )
    from ._threadsafe import threadsafe_iter

    # NOTE [ One thread for a generator ]: threadsafe_iter serializes next() anyway, so more
    # threads would not load faster - but they could take turns out of order, and the i-th
    # item would no longer be the i-th batch (the predict_generator disorder). One thread
    # keeps the generator's order and still loads ahead of the model.
    source = _GeneratorSource(threadsafe_iter(x))  # type: ignore[arg-type]
    pool = _open_pool(source, loader, 1, "thread")
    session.pools.append(pool)
    _log_decision(call.fn, pool)
    return _generator_feed(pool, check, session.generator_errors), keras_val


def _dataset_proxies(session: _Session, call: _Call, shuffle: bool) -> list[Any]:
    """One proxy per dataset; one pool for all of them, or none with ``workers == 0``.

    See NOTE [ One pool for training and validation ] in compatmp/_feeder.py.
    """
    datasets = call.datasets
    if not datasets:
        return []
    loader = call.loader
    sources: list[_Source]
    if loader.workers == 0:
        sources = [_Source(ds) for ds, *_ in datasets]
    else:
        if len(datasets) == 1:
            root = datasets[0][0]
            if not hasattr(type(root), "__len__"):
                root = _Sized(root)  # a num_batches-only PyDataset
        else:
            root = _TrainAndValidation(datasets[0][0], datasets[1][0])
        pool = _open_pool(root, loader, loader.workers, loader.start_method, call.idle_timeout)
        session.pools.append(pool)
        _log_decision(call.fn, pool)
        state = _PoolState(pool, root)
        if len(datasets) == 1:
            sources = [_Source(datasets[0][0], state)]
        else:
            sources = [
                _Source(datasets[0][0], state, _TRAIN),
                _Source(datasets[1][0], state, _VALIDATION),
            ]
    if call.flavour[0] == 2:
        proxy_cls = keras2_proxy_class(call.flavour[1])
    else:
        proxy_cls = _keras3_proxy_class()
    proxies = []
    for (dataset, length, name), source in zip(datasets, sources, strict=True):
        what = "validation_data" if name == "val" else name
        feeder = _Feeder(
            dataset,
            source,
            length,
            shuffle=shuffle and name == "x" and length is not None,
            what=what,
            ranks=call.ranks,
            seed=loader.seed,
        )
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
        session.fail()
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


def _run(
    fn: str,
    model: Any,
    x: Any,
    args: tuple,
    kwargs: dict[str, Any],
    loader: dict[str, Any],
    idle_timeout: float | None = None,
) -> Any:
    """Check everything, start (or reuse) the workers, call ``model.<fn>``, then stop the
    workers or keep them idle for the next call (NOTE [ Reused workers ] in _reuse)."""
    from ._reuse import resolve_idle_timeout

    idle = resolve_idle_timeout(idle_timeout)
    call = _Call(fn, model, x, args, kwargs, loader)
    call.idle_timeout = idle
    x, torch_loaders = _torch_loaders(call, x)
    try:
        return _run_call(call, model, x, bool(torch_loaders))
    finally:
        from ._context import close_dataloader

        for torch_loader in torch_loaders:
            close_dataloader(torch_loader)


def _torch_loaders(call: _Call, x: Any) -> tuple[Any, list[Any]]:
    """Give torch ``DataLoader`` inputs compatmp's context: NOTE [ torch DataLoader in
    compatmp.fit ] in compatmp/_context.py. Returns ``x`` and the copies made."""
    from ._context import dataloader_with_context

    made = []
    for name in ("x", "validation_data"):
        value = x if name == "x" else call.validation
        clone, ctx = dataloader_with_context(value, call.loader.start_method)
        if ctx is None:
            continue
        made.append(clone)
        if name == "x":
            x = clone
        else:
            call.validation = call.kwargs["validation_data"] = clone
        _log.info(
            "compatmp.%s: %s is a torch DataLoader with num_workers=%d and no "
            "multiprocessing_context: its workers start with compatmp.get_context() (%s); %s",
            call.fn,
            name,
            clone.num_workers,
            ctx.get_start_method(),
            ctx.decision.reason,
        )
    return x, made


def _run_call(call: _Call, model: Any, x: Any, loaders_adopted: bool) -> Any:
    fn = call.fn
    kwargs = call.kwargs
    method = getattr(model, fn)
    if call.passthrough:
        if not loaders_adopted:
            _log_passthrough(fn)
        return method(x, **kwargs)
    shuffle = False
    if fn == "fit" and call.kind == "dataset":
        shuffle = bool(kwargs.get("shuffle", True))
        kwargs["shuffle"] = False  # we shuffle (see NOTE [ How Keras 3 drives ... ])
    elif fn == "fit" and call.kind == "generator" and "shuffle" not in kwargs:
        # Keras ignores shuffle for generators and warns when it is True - its default - so
        # only pass on what the caller asked for.
        kwargs["shuffle"] = False
    session = _Session()
    try:
        keras_x, keras_val = _prepare(session, call, x, shuffle)
    except BaseException:
        session.fail()
        session.close()
        raise
    if "validation_data" in kwargs:
        kwargs["validation_data"] = keras_val
    if fn == "fit" and session.feeders:
        _add_epoch_callback(call, kwargs, session.feeders)
    return _call_keras(session, lambda: method(keras_x, **kwargs))


def _add_epoch_callback(call: _Call, kwargs: dict[str, Any], feeders: list[Any]) -> None:
    """Put the feeders' epoch callback first in ``callbacks`` (NOTE [ Per-batch seeds ]).

    A ``callbacks`` that is neither None nor a list/tuple (a ``CallbackList``) is left alone;
    the pass number then stays 0 in every epoch.
    """
    import importlib

    callbacks = kwargs.get("callbacks")
    if callbacks is not None and not isinstance(callbacks, (list, tuple)):
        return
    base = importlib.import_module(call.flavour[1]).callbacks.Callback  # keras or tf_keras
    kwargs["callbacks"] = [epoch_callback(base, feeders), *(callbacks or ())]


# The keyword arguments of fit/evaluate/predict that go to the loader (Loader.resolve), not to
# Keras: each wrapper declares them for its signature and docs, and hands them on by name.
_LOADER_SETTINGS = (
    "workers",
    "use_multiprocessing",
    "max_queue_size",
    "start_method",
    "timeout",
    "seed",
    "worker_init_fn",
    "stall_timeout",
)


def _loader_settings(arguments: dict[str, Any]) -> dict[str, Any]:
    """The loader settings among a wrapper's ``locals()``."""
    return {name: arguments[name] for name in _LOADER_SETTINGS}


_LOADER_DOC = """
        workers (int | None): worker count; 0 loads batches in the caller's thread (default:
            None: the dataset's own ``workers`` if above 1, else ``min(4, os.cpu_count())``).
        use_multiprocessing (bool | None): False: threads, as in Keras; True: processes
            (the start method still decided by ``start_method``); None (default): the
            dataset's own setting if it asks for ``workers > 1``, else compatmp decides.
        max_queue_size (int | None): batches loaded ahead of the model (default: None: the
            dataset's own ``max_queue_size``, else 10).
        start_method (str): ``"auto"``, ``"fork"``, ``"forkserver"``, ``"spawn"`` or
            ``"thread"`` (default: ``"auto"``; also ``COMPATMP_START_METHOD``).
        timeout (float | None): seconds to wait for each batch before
            ``compatmp.WorkerTimeoutError`` (default: None, no limit).
        seed (int | None): base seed of the workers' ``random``/``numpy.random``
            (default: None, a fresh seed per call); see :class:`compatmp.OrderedPool`. In
            ``fit`` the pass is the Keras epoch: epoch k's batches (and, with
            ``shuffle=True``, their order) depend on ``(seed, k, index)`` only, so
            ``initial_epoch=k`` replays them (NOTE [ Per-batch seeds ] in compatmp._seeds).
        worker_init_fn (Callable[[int], None] | None): called once in each worker with its
            id before its first batch (default: None).
        stall_timeout (float | None): seconds without a batch before a WARNING on the
            ``compatmp`` logger names the stuck worker, its index and its Python stack, then
            keeps waiting; 0 or None disables it (default: 60).
        idle_timeout (float | None): seconds the worker processes (spawn, forkserver) stay
            after the call, idle, for the next ``fit``/``evaluate``/``predict`` with the same
            start method, ``workers``, ``worker_init_fn`` and stall reports on or off, which
            then skips starting workers; 0: stop them when the call ends (default: None:
            ``COMPATMP_IDLE_TIMEOUT``, else 60). A call that fails stops them;
            ``compatmp.shutdown()`` stops idle ones now. What a reused worker keeps: NOTE
            [ Reused workers ] in compatmp._reuse."""


def fit(
    model: Any,
    x: Any = None,
    *args: Any,
    workers: int | None = None,
    use_multiprocessing: bool | None = None,
    max_queue_size: int | None = None,
    start_method: str = "auto",
    timeout: float | None = None,
    seed: int | None = None,
    worker_init_fn: Callable[[int], Any] | None = None,
    stall_timeout: float | None = DEFAULT_STALL_TIMEOUT,
    idle_timeout: float | None = None,
    **kwargs: Any,
) -> Any:
    """Train ``model`` on data loaded by worker processes (or threads where unsafe).

    A drop-in for ``model.fit(x, *args, **kwargs)`` on Keras 3 (any backend) and Keras 2
    (``tf_keras``, TensorFlow 2.12-2.15's built-in Keras): positional arguments follow the
    model's own ``fit``. A dataset's batches come from one :class:`compatmp.OrderedPool`
    that lives for the whole call - across epochs and validation, unlike Keras' enqueuer,
    which restarts its pool every epoch - started with a start method that is safe on this
    platform (:func:`compatmp.decide_start_method`), and kept idle for the next call
    (``idle_timeout``). Keras never pickles anything: it sees a
    proxy (``PyDataset`` or Keras 2 ``Sequence``) without workers.

    Data Keras loads itself - arrays, tensors, dicts, ``(x, y)`` tuples, ``tf.data``, a torch
    ``DataLoader``, with ``y=``/``sample_weight=`` - goes to ``model.fit`` unchanged (said
    once at INFO on the ``compatmp`` logger). Except: a torch ``DataLoader`` (``x`` or
    ``validation_data``) with ``num_workers > 0`` and no ``multiprocessing_context`` of its
    own is given to Keras as a shallow copy whose workers start with
    :func:`compatmp.get_context` (``start_method``, the same decision as compatmp's own
    workers; said at INFO); the caller's loader is not changed, and persistent workers of the
    copy stop when the call ends.

    Semantics kept from Keras (NOTE [ How Keras 3 drives a PyDataset ] in compatmp/_feeder.py,
    NOTE [ How Keras 2 drives a Sequence ] in compatmp/_keras2.py): every batch index is used
    exactly once per pass, in order, or in a random order per pass when ``shuffle=True``
    (Keras' default; ``random.shuffle`` like Keras); ``on_epoch_begin``/``on_epoch_end`` run
    in the main process where Keras calls them, and the state they change reaches the workers
    before the next batch is loaded.

    Args:
        model (keras.Model | tf_keras.Model): a compiled model.
        x (object): a ``keras.utils.PyDataset``/``Sequence`` (Keras 3 or 2), any object with
            ``__len__`` (number of batches) and ``__getitem__`` returning ``(x,)``,
            ``(x, y)`` or ``(x, y, sample_weight)``, a ``PyDataset`` with only
            ``num_batches`` (None: infinite, needs ``steps_per_epoch``), a generator (loaded
            by one background thread in its order, with a :class:`~compatmp.ThreadFallbackWarning`
            unless threads were asked for), or data Keras loads itself.
        *args: ``model.fit``'s positional arguments after ``x`` (``y``, ``batch_size``,
            ``epochs``, ...; Keras 2 also ``max_queue_size``, ``workers``,
            ``use_multiprocessing``, which go to compatmp's loader).
        {loader_args}
        **kwargs: passed to ``model.fit`` (``epochs``, ``callbacks``, ``validation_data``,
            ``steps_per_epoch``, ``class_weight``...). ``validation_data`` given as a dataset
            is loaded by the same workers.

    Returns:
        keras.callbacks.History: exactly what ``model.fit`` returns.

    Raises:
        compatmp.UnsupportedInputError: ``x`` or ``validation_data`` is none of the above
            (both a ``TypeError`` and, as in Keras, a ``ValueError``; the message starts with
            Keras' own).
        TypeError: a loader argument has the wrong type.
        ValueError: ``workers`` < 0, an empty dataset, ``y``/``sample_weight`` with a dataset
            or generator, or ``validation_split`` without ``validation_data`` (both with
            Keras' own message first, NOTE [ Keras' own error messages ]),
            an infinite dataset without ``steps_per_epoch``, ``use_multiprocessing``
            contradicting ``start_method``, or a batch whose structure differs from the
            first batch's. All argument errors are raised before any worker starts.
        compatmp.StartMethodError: ``start_method`` is not available here.
        compatmp.WorkerCrashedError: a worker process died (instead of hanging).
        Exception: whatever ``dataset[i]`` raised in a worker, same type, with the worker's
            traceback as ``__cause__`` (TensorFlow would wrap it in ``InvalidArgumentError``).
    """
    loader = _loader_settings(locals())
    return _run("fit", model, x, args, kwargs, loader, idle_timeout)


def evaluate(
    model: Any,
    x: Any = None,
    *args: Any,
    workers: int | None = None,
    use_multiprocessing: bool | None = None,
    max_queue_size: int | None = None,
    start_method: str = "auto",
    timeout: float | None = None,
    seed: int | None = None,
    worker_init_fn: Callable[[int], Any] | None = None,
    stall_timeout: float | None = DEFAULT_STALL_TIMEOUT,
    idle_timeout: float | None = None,
    **kwargs: Any,
) -> Any:
    """Evaluate ``model`` on data loaded by compatmp workers; a drop-in for ``model.evaluate``.

    Batches are loaded as in :func:`fit`, in order, never shuffled.

    Args:
        model (keras.Model | tf_keras.Model): a compiled model.
        x (object): see :func:`fit`; a generator runs until exhausted or for ``steps``
            batches; an infinite ``PyDataset`` needs ``steps``.
        *args: ``model.evaluate``'s positional arguments after ``x``.
        {loader_args}
        **kwargs: passed to ``model.evaluate`` (``steps``, ``return_dict``, ``verbose``...).

    Returns:
        float | list[float] | dict: exactly what ``model.evaluate`` returns.

    Raises:
        TypeError, ValueError, compatmp.StartMethodError, compatmp.WorkerCrashedError: as
            for :func:`fit`.
    """
    loader = _loader_settings(locals())
    return _run("evaluate", model, x, args, kwargs, loader, idle_timeout)


def predict(
    model: Any,
    x: Any = None,
    *args: Any,
    workers: int | None = None,
    use_multiprocessing: bool | None = None,
    max_queue_size: int | None = None,
    start_method: str = "auto",
    timeout: float | None = None,
    seed: int | None = None,
    worker_init_fn: Callable[[int], Any] | None = None,
    stall_timeout: float | None = DEFAULT_STALL_TIMEOUT,
    idle_timeout: float | None = None,
    **kwargs: Any,
) -> Any:
    """Predict on data loaded by compatmp workers; rows come back in dataset order.

    A drop-in for ``model.predict``: batch ``i`` of the output holds the predictions for
    ``x[i]``, whichever worker loaded it (the pool's reorder buffer restores the order; Keras
    2's ``predict_generator`` with several workers could reorder or deadlock).

    Args:
        model (keras.Model | tf_keras.Model): the model.
        x (object): see :func:`fit`; batches may be ``(x,)`` or ``x`` alone or carry
            targets, which are ignored, as in Keras.
        *args: ``model.predict``'s positional arguments after ``x``.
        {loader_args}
        **kwargs: passed to ``model.predict`` (``steps``, ``verbose``, ``callbacks``).

    Returns:
        numpy.ndarray | list | dict: exactly what ``model.predict`` returns.

    Raises:
        TypeError, ValueError, compatmp.StartMethodError, compatmp.WorkerCrashedError: as
            for :func:`fit`.
    """
    loader = _loader_settings(locals())
    return _run("predict", model, x, args, kwargs, loader, idle_timeout)


for _fn in (fit, evaluate, predict):
    # The loader arguments are documented once (python -OO strips docstrings: None).
    if _fn.__doc__:
        _fn.__doc__ = _fn.__doc__.replace("\n        {loader_args}", _LOADER_DOC)
del _fn
