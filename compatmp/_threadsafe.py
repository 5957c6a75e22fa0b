"""Thread-safe wrappers for iterators and generators shared between threads.

Why this exists
---------------
A Python generator may run in one thread at a time. When a second thread calls ``next()`` on a
generator whose frame is already executing in another thread, CPython raises
``ValueError: generator already executing`` (``Objects/genobject.c``, ``gen_send_ex2()``: the
check on the running frame that ``gen.gi_running`` exposes). Keras' thread workers
(``workers > 1`` without multiprocessing) and any hand-rolled thread pool that pulls batches
from one generator hit exactly this.

The fix is the recipe posted in keras-team/keras#1638 (after anandology.com's "Using
iterators and generators"): wrap the generator in an object whose ``next`` holds a lock while
it advances the generator. That recipe was written for Python 2 (``def next(self)``); many
Python 3 copies in circulation keep ``self.lock = threading.Lock()`` but advance the generator
with a bare ``next(self.it)``, so the lock is defined and never taken and the error remains.
:class:`threadsafe_iter` takes it.

NOTE [ Threads only ]
---------------------
A generator cannot be pickled (CPython has no way to serialize a suspended frame), so a
generator can be shared between *threads* of one process and never between *processes*: a
worker process cannot receive it, with or without this wrapper. Datasets that must go to
worker processes should be index-based (``keras.utils.PyDataset``); compatmp falls back to
threads, with a :class:`~compatmp.ThreadFallbackWarning`, when handed a generator.

NOTE [ No timeout on the lock ]
-------------------------------
``__next__`` waits for the lock without a timeout. The only holder is another thread of this
process that is inside ``next()`` of the wrapped iterator, so the wait lasts as long as
producing one item; a timeout would turn a slow item into a spurious error in whichever thread
happened to be second. The lock is re-entrant (``threading.RLock``) so that an iterator that
calls ``next()`` on its own wrapper from inside itself gets CPython's ``ValueError``
immediately instead of deadlocking on a plain ``Lock``.
"""

from __future__ import annotations

import functools
import inspect
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Generic, ParamSpec, TypeVar

from ._args import describe

__all__ = ["threadsafe_generator", "threadsafe_iter"]

_T = TypeVar("_T")
_P = ParamSpec("_P")


class threadsafe_iter(Iterator[_T], Generic[_T]):  # lower case: the recipe's name users know
    """Wrap an iterator so several threads can call ``next()`` on it at the same time.

    Each ``next()`` holds a lock while it advances the wrapped iterator, so one item is
    produced at a time and every item goes to exactly one caller. Threads that call ``next()``
    while another thread is producing an item wait for it (see NOTE [ No timeout on the lock ]
    in this module). Once the iterator is exhausted, every caller gets ``StopIteration``; an
    exception raised by the iterator goes to the thread whose ``next()`` raised it (for a
    generator, later calls then get ``StopIteration``, as usual).

    Fixes ``ValueError: generator already executing`` (raised by CPython's
    ``Objects/genobject.c`` when a generator is resumed while it runs in another thread). The
    widely copied recipe from keras-team/keras#1638 is often ported to Python 3 with the lock
    created but not taken; this class takes it.

    Threads only: a generator cannot be pickled, so a wrapped generator cannot be sent to a
    worker process either (NOTE [ Threads only ] in this module). The wrapper itself does not
    add pickling support.

    Args:
        iterable (Iterable[T]): a generator, any iterator, or any iterable (``iter()`` is
            called on it once, so a list is consumed through a single shared iterator).

    Raises:
        TypeError: ``iterable`` is not iterable, e.g. a generator *function* passed without
            calling it, or a number.

    Example::

        batches = threadsafe_iter(make_batches(files))
        # 8 threads may now run ``for batch in batches: ...`` concurrently.
    """

    __slots__ = ("__weakref__", "_it", "_lock")

    def __init__(self, iterable: Iterable[_T]) -> None:
        if inspect.isgeneratorfunction(iterable):
            name = getattr(iterable, "__qualname__", repr(iterable))
            raise TypeError(
                f"threadsafe_iter() received the generator function {name}, not a generator. "
                f"Call it first: threadsafe_iter({name}(...)), or decorate the function with "
                "@threadsafe_generator."
            )
        try:
            it = iter(iterable)
        except TypeError:
            raise TypeError(
                f"threadsafe_iter() needs an iterable or iterator (a generator object, a list, "
                f"a file, any object with __iter__ or __getitem__); received {describe(iterable)}."
            ) from None
        self._it: Iterator[_T] = it
        self._lock = threading.RLock()

    def __iter__(self) -> threadsafe_iter[_T]:
        """Return ``self``: the wrapper is its own iterator, shared by all threads."""
        return self

    def __next__(self) -> _T:
        """Return the next item, holding the lock while the wrapped iterator produces it.

        Returns:
            T: the next item of the wrapped iterator.

        Raises:
            StopIteration: the wrapped iterator is exhausted (raised in every thread that
                calls ``next()`` from then on).
            Exception: whatever the wrapped iterator raises, in the calling thread.
        """
        with self._lock:
            return next(self._it)

    def send(self, value: Any) -> _T:
        """Send ``value`` into the wrapped generator and return its next item, under the lock.

        Args:
            value (Any): the value the suspended ``yield`` expression evaluates to.

        Returns:
            T: the next item the generator yields.

        Raises:
            TypeError: the wrapped iterator is not a generator (it has no ``send``).
            StopIteration: the generator is exhausted.
        """
        send = getattr(self._it, "send", None)
        if send is None:
            raise TypeError(
                f"send() needs a wrapped generator; this threadsafe_iter wraps "
                f"{type(self._it).__qualname__}, which has no send(). Use next() instead."
            )
        with self._lock:
            return send(value)

    def close(self) -> None:
        """Close the wrapped iterator, waiting for an item in progress in another thread.

        Calls the wrapped iterator's ``close()`` (a generator then runs its ``finally`` blocks)
        while holding the lock, so it never collides with a running ``next()``. A no-op for
        iterators without ``close()``, such as a list iterator. Later ``next()`` calls on a
        closed generator raise ``StopIteration``.

        Returns:
            None
        """
        close = getattr(self._it, "close", None)
        if close is not None:
            with self._lock:
                close()

    def __repr__(self) -> str:
        return f"threadsafe_iter({self._it!r})"


def threadsafe_generator(
    func: Callable[_P, Iterable[_T]],
) -> Callable[_P, threadsafe_iter[_T]]:
    """Decorate a generator function so that each call returns a :class:`threadsafe_iter`.

    The decorated function keeps ``__name__``, ``__qualname__``, ``__doc__`` and
    ``__wrapped__`` (``functools.wraps``). Each call creates a new generator, wrapped in its
    own lock; share the *returned object* between threads, not the function.

    Args:
        func (Callable[..., Iterable[T]]): a generator function, or any callable returning an
            iterable.

    Returns:
        Callable[..., threadsafe_iter[T]]: a function with the same signature as ``func``.

    Raises:
        TypeError: ``func`` is not callable (e.g. a generator object was passed; wrap that
            with ``threadsafe_iter(gen)`` instead). A call of the returned function raises
            TypeError if ``func`` returns something that is not iterable.

    Example::

        @threadsafe_generator
        def batches(files):
            for f in files:
                yield load(f)
    """
    if not callable(func):
        hint = (
            " To wrap an existing generator or iterator, use threadsafe_iter(obj)."
            if isinstance(func, Iterable)
            else ""
        )
        raise TypeError(
            "threadsafe_generator() decorates a generator function (a def containing yield); "
            f"received {describe(func)}, which is not callable.{hint}"
        )

    @functools.wraps(func)
    def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> threadsafe_iter[_T]:
        return threadsafe_iter(func(*args, **kwargs))

    return wrapper
