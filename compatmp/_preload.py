"""What a worker is sent to build an object from, and which modules are worth preloading for it.

:class:`WorkerPayload` is the interface the worker loop (:mod:`compatmp._worker`) and the
forkserver preload (:func:`compatmp._launch._forkserver_preload`) use for anything that is not
plain pickled bytes: :meth:`~WorkerPayload.load` builds the object in the worker, and
:meth:`~WorkerPayload.preload_modules` names the packages unpickling it imports (NOTE
[ Forkserver preload ] in :mod:`compatmp._launch`). :class:`ModuleRecorder` notes those
packages while the payload is pickled (nearly free, no second walk over the pickle);
:func:`preloadable` filters them through the one list of modules never preloaded,
:data:`NOT_PRELOADED`.

This module imports nothing from compatmp: the worker loop imports it in every worker.
"""

from __future__ import annotations

import abc
import sys
import types
from collections.abc import Iterable
from typing import Any

__all__ = ["NOT_PRELOADED", "ModuleRecorder", "WorkerPayload", "preloadable"]

# Top-level modules never worth preloading in the forkserver: ``__main__`` (NOTE [ Workers do
# not re-run __main__ ] in compatmp._launch), modules every interpreter has loaded anyway, and
# cloudpickle (compatmp._worker, preloaded first, imports it).
NOT_PRELOADED = frozenset(
    {"__main__", "__builtin__", "builtins", "copyreg", "_codecs", "cloudpickle"}
)


def preloadable(modules: Iterable[str], skip: Iterable[str] = ()) -> tuple[str, ...]:
    """The top-level packages of ``modules`` worth preloading in the forkserver, sorted.

    Args:
        modules (Iterable[str]): module names (dotted names are cut to their top level).
        skip (Iterable[str]): top-level names to leave out as well (e.g. modules sent by
            value, which the worker never imports).

    Returns:
        tuple[str, ...]: names already imported in this process (``sys.modules``), without
        :data:`NOT_PRELOADED` and ``skip``.
    """
    skipped = NOT_PRELOADED | set(skip)
    top = {m.split(".")[0] for m in modules}
    return tuple(sorted(m for m in top if m in sys.modules and m not in skipped))


class ModuleRecorder:
    """Notes the top-level package of every module, class, function and object it is shown.

    A pickler calls :meth:`note` from ``reducer_override`` (which sees every object it
    pickles), so the packages a worker will import come for free with the pickle.
    """

    def __init__(self) -> None:
        self.modules: set[str] = set()

    def note(self, obj: Any) -> None:
        """Record the package ``obj`` belongs to (a module, a class or function, an instance).

        Args:
            obj (object): anything the pickler meets.
        """
        if isinstance(obj, types.ModuleType):
            name: Any = obj.__name__
        elif isinstance(obj, (type, types.FunctionType)):
            name = getattr(obj, "__module__", None)  # may be missing or None on odd objects
        else:
            name = type(obj).__module__
        if isinstance(name, str):
            self.modules.add(name.split(".")[0])


class WorkerPayload(abc.ABC):
    """Something a worker process builds an object from (other than pickled bytes).

    The main process sends it (pickled) in :class:`compatmp._worker.WorkerConfig` or in a
    ``("dataset", version, payload)`` message; the worker calls :meth:`load`.
    """

    @abc.abstractmethod
    def load(self) -> Any:
        """Build the object in the worker process.

        Returns:
            object: the object the main process described.
        """

    @abc.abstractmethod
    def preload_modules(self) -> tuple[str, ...]:
        """Top-level packages loading this payload imports (for the forkserver preload).

        Returns:
            tuple[str, ...]: package names, already filtered with :func:`preloadable`.
        """
