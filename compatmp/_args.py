"""Argument checks shared by the pool and the Keras wrappers.

One place decides what a valid ``workers``, ``max_queue_size``, ``timeout`` or ``seed`` is, so
``OrderedPool(workers="2")`` and ``compatmp.fit(model, ds, workers="2")`` raise the same error:
``TypeError`` for a value of the wrong type, ``ValueError`` for one out of range. Every message
says what was received, what is valid and how to fix it.

Imports nothing from compatmp: every other module may use it.
"""

from __future__ import annotations

import math
from typing import Any

#: Batches dispatched ahead of the consumer when nothing else says (Keras' own default for a
#: ``PyDataset``, keras/src/trainers/data_adapters/py_dataset_adapter.py).
DEFAULT_MAX_QUEUE_SIZE = 10


def describe(obj: object, width: int = 80) -> str:
    """Return ``"<module>.<type> <repr>"`` for error messages, the repr cut to ``width`` chars."""
    text = repr(obj)
    if len(text) > width:
        text = text[: width - 3] + "..."
    cls = type(obj)
    return f"{cls.__module__}.{cls.__qualname__} {text}"


def check_int(value: Any, name: str, minimum: int, hint: str) -> int:
    """Return ``value`` if it is an ``int`` (not a ``bool``) >= ``minimum``.

    Args:
        value (Any): what the caller passed.
        name (str): the argument's name, for the message.
        minimum (int): smallest valid value.
        hint (str): how to fix it, appended to the message.

    Raises:
        TypeError: ``value`` is not an int (``bool`` counts as not an int).
        ValueError: ``value`` < ``minimum``.
    """
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(
            f"{name} must be an int >= {minimum}; received {value!r} of type "
            f"{type(value).__name__}. {hint}"
        )
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}; received {value}. {hint}")
    return value


def check_workers(value: Any, minimum: int = 1, *, allow_none: bool = False) -> int | None:
    """Check a worker count: an int >= ``minimum`` (1 for a pool, 0 for the Keras wrappers).

    Args:
        value (Any): what the caller passed.
        minimum (int): smallest valid count (default: 1).
        allow_none (bool): None is valid and returned as is (default: False); the Keras
            wrappers use it for "the dataset's own setting, else compatmp decides".

    Raises:
        TypeError: not an int (nor None where allowed).
        ValueError: below ``minimum``.
    """
    if value is None and allow_none:
        return None
    hint = (
        "Use workers=0 to load batches in the main process"
        if minimum == 0
        else "Use workers=1 for a single background worker"
    )
    hint += ", or workers=None to let compatmp decide." if allow_none else "."
    return check_int(value, "workers", minimum, hint)


def check_max_queue_size(value: Any) -> int:
    """Check ``max_queue_size``: an int >= 1, the batches dispatched ahead of the consumer.

    Raises:
        TypeError: not an int.
        ValueError: below 1.
    """
    return check_int(
        value, "max_queue_size", 1, "It bounds the batches computed ahead (Keras' default: 10)."
    )


def check_seconds(value: Any, name: str, *, allow_zero: bool = False) -> float | None:
    """Check an optional duration in seconds: None, or a finite number > 0 (>= 0 if allowed).

    Returns:
        float | None: ``value`` as a float, or None.

    Raises:
        TypeError: not None, an int or a float.
        ValueError: negative, zero (unless ``allow_zero``), NaN or infinite.
    """
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(
            f"{name} must be None or a number of seconds; received {value!r} of type "
            f"{type(value).__name__}."
        )
    low_ok = value >= 0 if allow_zero else value > 0
    if not low_ok or not math.isfinite(value):
        bound = ">= 0 (0 disables it)" if allow_zero else "> 0"
        raise ValueError(
            f"{name} must be None (no limit) or a finite number of seconds {bound}; "
            f"received {value!r}."
        )
    return float(value)


def check_seed(value: Any) -> int | None:
    """Check a base seed: None (a fresh random seed) or an int >= 0.

    Raises:
        TypeError: not an int (nor None).
        ValueError: negative.
    """
    if value is None:
        return None
    return check_int(value, "seed", 0, "Or pass seed=None for a random seed.")


def check_worker_init_fn(value: Any) -> Any:
    """Check ``worker_init_fn``: None or a callable taking the worker id (an int).

    Raises:
        TypeError: neither None nor callable.
    """
    if value is not None and not callable(value):
        raise TypeError(
            "worker_init_fn must be a callable taking the worker id, or None; received "
            f"{describe(value)}."
        )
    return value
