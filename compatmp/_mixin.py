"""PickleSafeMixin: compatmp's pickling rules for a class, under *plain* ``pickle``.

:class:`PickleSafeMixin` gives a class the treatment :func:`compatmp.dumps` gives everything
(locks rebuilt unlocked, queues with their items, read-only files reopened, lambdas by value),
so it also works with Keras' own ``use_multiprocessing=True`` and with ``torch.utils.data``.
The state is written with :class:`compatmp._pickler.CompatPickler`, which recognises mixin
objects by their ``__compatmp_reduce__`` method, not by class, so this module imports the
pickler and never the other way round.
"""

from __future__ import annotations

import io
import pickle
from typing import Any

from ._exceptions import serialization_error
from ._pickler import CompatPickler
from ._serialize import failure_message
from ._unpicklable import search

__all__ = ["PickleSafeMixin"]

# The mixin overrides __reduce_ex__ rather than __getstate__, so that it composes with a
# subclass's own __getstate__/__setstate__: the subclass decides *what* its state is, the
# mixin makes that state picklable (at any depth: a lock inside a dict inside a helper object)
# by pickling it with CompatPickler, and hands the rebuilt state to the subclass's
# __setstate__ (or to the default __dict__ update). A reference back to the object itself
# inside its state is kept as a reference (persistent id), not pickled twice.

_SELF_PID = "compatmp:self"


class _StateUnpickler(pickle.Unpickler):
    def __init__(self, file: Any, owner: Any) -> None:
        super().__init__(file)
        self._owner = owner

    def persistent_load(self, pid: Any) -> Any:
        if pid == _SELF_PID:
            return self._owner
        raise pickle.UnpicklingError(f"unknown persistent id {pid!r}")


def _natural_reduce(obj: Any, protocol: int) -> tuple:
    """The reduction ``object.__reduce_ex__`` gives, i.e. ignoring PickleSafeMixin's."""
    return object.__reduce_ex__(obj, protocol)


class _StatePickler(CompatPickler):
    """Pickles a PickleSafeMixin object's state; the object itself becomes a reference."""

    def __init__(self, file: Any, owner: Any) -> None:
        super().__init__(file)
        self._owner = owner

    def persistent_id(self, obj: Any) -> str | None:
        return _SELF_PID if obj is self._owner else None


def _make_pickle_safe(func: Any, args: tuple, blob: bytes) -> Any:
    obj = func(*args)
    state, listitems, dictitems = _StateUnpickler(io.BytesIO(blob), obj).load()
    if state is not None:
        setstate = getattr(obj, "__setstate__", None)
        if setstate is not None:
            setstate(state)
        else:  # Python 3.10: object has no default __setstate__
            if isinstance(state, tuple) and len(state) == 2:
                state, slotstate = state
            else:
                slotstate = None
            if state:
                obj.__dict__.update(state)
            if slotstate:
                for key, value in slotstate.items():
                    setattr(obj, key, value)
    if listitems:
        obj.extend(listitems)
    if dictitems:
        for key, value in dictitems:
            obj[key] = value
    return obj


class PickleSafeMixin:
    """Make a class picklable with plain ``pickle``, locks and all, at any depth.

    Inherit it (first, or anywhere in the bases) and instances pickle with ``pickle.dumps``,
    Keras' own ``use_multiprocessing=True`` workers and ``torch.utils.data.DataLoader``
    under ``spawn``, even when they hold ``threading`` locks, conditions, semaphores, events,
    barriers, queues, read-only files or lambdas - directly or deep inside helper objects and
    containers. In the unpickled copy, every lock is new and unlocked, events keep their
    state, queues their items, files their path and offset.

    It composes with your own ``__getstate__``/``__setstate__``: whatever ``__getstate__``
    returns is what gets made safe, and ``__setstate__`` receives it with fresh locks. It
    works with ``keras.utils.PyDataset`` as a base too::

        class Images(compatmp.PickleSafeMixin, keras.utils.PyDataset):
            def __init__(self, paths, **kwargs):
                super().__init__(**kwargs)
                self._lock = threading.Lock()
                ...

    ``copy.copy`` stays a plain shallow copy; ``copy.deepcopy`` goes through pickling and
    therefore also gets fresh locks. Unpickling needs ``cloudpickle`` importable (the state is
    written with :class:`CompatPickler`).

    Raises:
        SerializationError: on pickling, when something in the state still cannot be pickled
            (e.g. a generator or an sqlite3 connection); the message names its path.
    """

    __slots__ = ()

    def __reduce_ex__(self, protocol: int) -> tuple:
        rv = _natural_reduce(self, protocol)
        func, args = rv[0], rv[1]
        state = rv[2] if len(rv) > 2 else None
        listitems = list(rv[3]) if len(rv) > 3 and rv[3] is not None else None
        dictitems = list(rv[4]) if len(rv) > 4 and rv[4] is not None else None
        buf = io.BytesIO()
        try:
            _StatePickler(buf, self).dump((state, listitems, dictitems))
        except Exception as exc:
            root = type(self).__name__
            if isinstance(state, dict):
                found, complete = [], True
                for key, value in state.items():
                    more, done = search(value, f"{root}.{key}")
                    found += more
                    complete = complete and done
            else:
                found, complete = search(state, f"{root}.<state>")
            message = failure_message(root, exc, found, complete)
            raise serialization_error(type(exc), message, found) from exc
        return _make_pickle_safe, (func, args, buf.getvalue())

    def __compatmp_reduce__(self, protocol: int) -> tuple:
        """The reduction :class:`compatmp.CompatPickler` uses: the natural one.

        That pickler already applies every rule the mixin exists for, so objects shared
        inside and outside this one keep one identity in a single pickle.
        """
        return _natural_reduce(self, protocol)

    def __copy__(self) -> Any:
        cls = type(self)
        new = cls.__new__(cls)
        if hasattr(self, "__dict__"):
            new.__dict__.update(self.__dict__)
        for klass in cls.__mro__:
            for name in getattr(klass, "__slots__", ()):
                if name not in ("__dict__", "__weakref__") and hasattr(self, name):
                    setattr(new, name, getattr(self, name))
        return new
