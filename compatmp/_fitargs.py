"""Arguments of ``compatmp.fit``/``evaluate``/``predict``: binding, classification, loader.

All of it runs before any worker starts, so a bad argument never costs a pool start.

* :func:`bind_keras_args` maps positional arguments onto the names of the model's own
  ``fit``/``evaluate``/``predict`` (Keras 2 and Keras 3 differ after the 7th argument of
  ``evaluate``, and Keras 2 has ``max_queue_size``/``workers``/``use_multiprocessing`` there).
* :func:`classify` sorts ``x`` into what Keras loads itself (``"keras"``), a dataset and a
  generator.
* :class:`Loader` resolves ``workers``/``use_multiprocessing``/``max_queue_size`` from the
  call, else the dataset's own settings, else compatmp's defaults; the table is in the README
  ("Keras' loader arguments").
"""

from __future__ import annotations

import collections.abc
import dataclasses
import inspect
import os
import sys
import types
from collections.abc import Callable
from typing import Any

from ._args import (
    DEFAULT_MAX_QUEUE_SIZE,
    check_max_queue_size,
    check_seconds,
    check_seed,
    check_worker_init_fn,
    check_workers,
    describe,
)
from ._stall import DEFAULT_STALL_TIMEOUT

#: ``workers=None`` and the dataset has no ``workers`` setting above 1: use up to this many.
#: Four keeps a typical augmentation pipeline ahead of a small model without oversubscribing
#: laptops; each process worker costs memory (one copy of the dataset, plus Keras if the
#: dataset's class needs it).
DEFAULT_MAX_WORKERS = 4

#: Keras' loader arguments (Keras 2: of fit/evaluate/predict; Keras 3: of PyDataset).
LOADER_ARGS = ("workers", "use_multiprocessing", "max_queue_size")

# The positional order of model.fit/evaluate/predict when the model's signature cannot be read
# (Keras 3.15, keras/src/trainers/trainer.py; Keras 2's is the same up to validation_freq).
_FALLBACK_ORDER = {
    "fit": (
        "x y batch_size epochs verbose callbacks validation_split validation_data shuffle "
        "class_weight sample_weight initial_epoch steps_per_epoch validation_steps "
        "validation_batch_size validation_freq"
    ).split(),
    "evaluate": "x y batch_size verbose sample_weight steps callbacks return_dict".split(),
    "predict": "x batch_size verbose steps callbacks".split(),
}


def bind_keras_args(
    model: Any, fn: str, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> dict[str, Any]:
    """Return ``kwargs`` plus ``args`` (the positional arguments after ``x``) by name.

    The names come from ``inspect.signature(getattr(model, fn))``, so they follow the Keras
    version of ``model``.

    Raises:
        TypeError: more positional arguments than ``model.<fn>`` takes, or an argument given
            both positionally and by keyword.
    """
    try:
        params = inspect.signature(getattr(model, fn)).parameters.values()
        names = [
            p.name
            for p in params
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.name != "self"
        ]
    except (TypeError, ValueError, AttributeError):
        names = []
    if not names or names[0] != "x":
        names = _FALLBACK_ORDER[fn]
    rest = names[1:]
    if len(args) > len(rest):
        raise TypeError(
            f"compatmp.{fn}(model, x, ...) received {len(args)} more positional argument(s), "
            f"but model.{fn} takes only {len(rest)} after x ({', '.join(rest)}). Pass the "
            "others by keyword."
        )
    out = dict(kwargs)
    for name, value in zip(rest, args, strict=False):
        if name in out:
            raise TypeError(f"compatmp.{fn}() got multiple values for argument {name!r}")
        out[name] = value
    return out


# --------------------------------------------------------------------------------------------
# What x is


def is_pydataset(obj: object) -> bool:
    """True for a Keras 3 ``keras.utils.PyDataset`` (never imports Keras)."""
    keras = sys.modules.get("keras")
    utils = getattr(keras, "utils", None)
    cls = getattr(utils, "PyDataset", None)
    return isinstance(cls, type) and isinstance(obj, cls)


def keras_loads_itself(obj: object) -> bool:
    """True for data Keras loads without Python workers: arrays, tensors, dicts, lists,
    tuples, ``tf.data`` datasets and torch ``DataLoader`` objects."""
    if obj is None or isinstance(obj, (str, bytes, tuple, list, collections.abc.Mapping)):
        return True
    if hasattr(obj, "__array__") or (hasattr(obj, "shape") and hasattr(obj, "dtype")):
        return True  # numpy, tf/torch/jax tensors, pandas
    if hasattr(obj, "element_spec"):
        return True  # tf.data.Dataset
    torch_data = sys.modules.get("torch.utils.data")
    loader = getattr(torch_data, "DataLoader", None)
    return isinstance(loader, type) and isinstance(obj, loader)


def classify(x: object, arg: str = "x") -> str:
    """Return ``"keras"``, ``"dataset"`` or ``"generator"``; raise TypeError for the rest."""
    if isinstance(x, types.GeneratorType):
        return "generator"
    if keras_loads_itself(x):
        return "keras"
    if hasattr(type(x), "__getitem__") and (hasattr(type(x), "__len__") or is_pydataset(x)):
        return "dataset"
    if isinstance(x, collections.abc.Iterator):
        return "generator"
    hint = ""
    if callable(x):
        hint = " It is callable: if it is a generator function, pass its result, f(), instead."
    raise TypeError(
        f"{arg} must be a keras.utils.PyDataset (or keras.utils.Sequence), an object with "
        f"__len__ and __getitem__ returning batches, a generator, or data Keras loads itself "
        f"(arrays, tensors, dicts, tf.data, a torch DataLoader); received {describe(x)}." + hint
    )


def dataset_length(x: object, arg: str = "x") -> int | None:
    """Number of batches: ``len(x)``, or a ``PyDataset``'s ``num_batches`` (None: infinite).

    Raises:
        TypeError: neither works.
        ValueError: zero batches.
    """
    if hasattr(type(x), "__len__"):
        try:
            n = len(x)  # type: ignore[arg-type]
        except TypeError as exc:
            raise TypeError(f"len({arg}) failed for {describe(x)}: {exc}") from exc
    else:
        try:
            n = x.num_batches  # type: ignore[attr-defined]
        except NotImplementedError as exc:
            raise TypeError(
                f"{arg} is a keras.utils.PyDataset with neither __len__ nor a num_batches "
                f"property ({describe(x)}); define one of them (num_batches may return None "
                "for an infinite dataset)."
            ) from exc
        if n is None:
            return None
        if isinstance(n, bool) or not isinstance(n, int):
            raise TypeError(f"{arg}.num_batches must be an int or None; received {n!r}")
    if n == 0:
        raise ValueError(
            f"{arg} is empty: len({arg}) == 0 batches ({describe(x)}). A dataset's __len__ "
            "must return the number of batches, at least 1."
        )
    return n


# --------------------------------------------------------------------------------------------
# Loader settings


def _own(x: object, name: str) -> Any:
    # PyDataset keeps the constructor arguments in ``_workers`` etc.; reading the ``workers``
    # property of a subclass that skipped super().__init__() would warn (py_dataset_adapter.py,
    # _warn_if_super_not_called).
    return getattr(x, "_" + name, None) if is_pydataset(x) else getattr(x, name, None)


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


@dataclasses.dataclass(frozen=True)
class Loader:
    """How batches are loaded: worker count, start method and the pool's options.

    Build with :meth:`resolve`. ``workers == 0``: in the caller's thread, no pool.
    """

    workers: int
    start_method: str
    max_queue_size: int
    timeout: float | None = None
    seed: int | None = None
    worker_init_fn: Callable[[int], Any] | None = None
    stall_timeout: float | None = DEFAULT_STALL_TIMEOUT

    def pool_options(self) -> dict[str, Any]:
        """Keyword arguments for :class:`compatmp._pool.OrderedPool` besides the dataset."""
        return {
            "max_queue_size": self.max_queue_size,
            "timeout": self.timeout,
            "seed": self.seed,
            "worker_init_fn": self.worker_init_fn,
            "stall_timeout": self.stall_timeout,
        }

    @classmethod
    def resolve(
        cls,
        x: object,
        *,
        workers: Any,
        use_multiprocessing: Any,
        max_queue_size: Any,
        start_method: str,
        timeout: Any,
        seed: Any,
        worker_init_fn: Any,
        stall_timeout: Any = DEFAULT_STALL_TIMEOUT,
    ) -> Loader:
        """Combine the call's settings with the dataset's own (README table).

        Raises:
            TypeError: a setting of the wrong type.
            ValueError: a setting out of range, or ``use_multiprocessing`` contradicting
                ``start_method``.
        """
        check_workers(workers, 0, allow_none=True)
        if use_multiprocessing is not None and not isinstance(use_multiprocessing, bool):
            raise TypeError(
                f"use_multiprocessing must be True, False or None (compatmp decides); "
                f"received {use_multiprocessing!r} of type {type(use_multiprocessing).__name__}."
            )
        if max_queue_size is not None:
            check_max_queue_size(max_queue_size)
        timeout = check_seconds(timeout, "timeout")
        stall_timeout = check_seconds(stall_timeout, "stall_timeout", allow_zero=True)
        check_seed(seed)
        check_worker_init_fn(worker_init_fn)
        if use_multiprocessing is True and start_method == "thread":
            raise ValueError(
                "use_multiprocessing=True asks for worker processes, but start_method='thread' "
                "asks for threads; pass one of them."
            )
        if use_multiprocessing is False and start_method not in ("auto", "thread"):
            raise ValueError(
                f"use_multiprocessing=False asks for threads (as in Keras), but start_method="
                f"{start_method!r} asks for processes; pass one of them."
            )
        own_workers = _own(x, "workers")
        own_asks = _positive_int(own_workers) and own_workers > 1
        if workers is None:
            workers = own_workers if own_asks else min(DEFAULT_MAX_WORKERS, os.cpu_count() or 1)
        if max_queue_size is None:
            own_queue = _own(x, "max_queue_size")
            max_queue_size = own_queue if _positive_int(own_queue) else DEFAULT_MAX_QUEUE_SIZE
        method = start_method
        if use_multiprocessing is None and own_asks and start_method == "auto":
            # A dataset that asks Keras for workers gets its use_multiprocessing honoured.
            use_multiprocessing = _own(x, "use_multiprocessing")
        if use_multiprocessing is False:
            method = "thread"
        return cls(workers, method, max_queue_size, timeout, seed, worker_init_fn, stall_timeout)
