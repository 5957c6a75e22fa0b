"""How a worker process starts: without ``__main__``, SIGINT blocked, with a forkserver preload.

The process transport (:mod:`compatmp._processes`) calls :func:`start_processes` with one
:class:`compatmp._worker.WorkerConfig` per worker and owns the processes afterwards; what
happens in a worker after it starts is :mod:`compatmp._worker`'s job.

NOTE [ Workers do not re-run __main__ ]
A spawn or forkserver child normally re-imports the user's script as ``__mp_main__``
(``multiprocessing.spawn.get_preparation_data`` puts ``init_main_from_path`` or
``init_main_from_name`` in the data the child prepares from); a training script that imports
TensorFlow at the top then pays ~3 s and ~570 MB per worker before doing anything. compatmp's
workers need nothing from ``__main__``: the dataset travels by cloudpickle, which sends
``__main__`` code by value. loky solves this with its own ``Popen`` classes
(``loky/backend/popen_loky_posix.py``, ``init_main_module=False``). We keep the stdlib's Popen
classes and wrap ``multiprocessing.spawn.get_preparation_data`` (looked up at call time by
``popen_spawn_posix``, ``popen_spawn_win32``, ``popen_forkserver`` and ``forkserver``, 3.8 to
3.14): while :func:`start_processes` starts a worker (a thread-local flag), the two
``init_main_*`` keys are dropped; every other process start in the program is untouched.
``sys_path`` and the working directory are still sent, so the dataset's own modules import as
usual.

NOTE [ Forkserver preload ]
The forkserver process is started once per program; workers fork from it. By default it
imports ``__main__`` (the user's script) first. compatmp sets its preload list, before the
server starts, to ``compatmp._worker`` plus the top-level packages the dataset's pickle refers
to that the main process has already imported (e.g. ``numpy``, ``PIL``, ``tensorflow``):
they are imported once in the server instead of once per worker. The pool's dataset pickler
notes those packages as it pickles (``_preload.ModuleRecorder``, nearly free) and hands them
over through ``WorkerPayload.preload_modules()``; one list says what is never preloaded
(``_preload.NOT_PRELOADED``: ``__main__``, builtins, cloudpickle); only a
pickle given as bytes (``worker_init_fn``) is walked with ``pickletools``, which took 6.6 s
for a 61 MiB list of 1.28 M file paths. Measured: 2 workers ready
after 275 ms (first pool) and 28 ms (second) with the preload, 468 ms and 385 ms without.
``__main__`` is left out (see above). The list only matters when the server starts; it is
process-wide, so it also applies to other forkserver users in the program (who then import
``__main__`` per child, as spawn does).
"""

from __future__ import annotations

import contextlib
import multiprocessing
import pickletools
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any

from . import _worker
from ._preload import WorkerPayload, preloadable

__all__ = ["start_processes", "without_main"]

# ---------------------------------------------------------------------------------------------
# NOTE [ Workers do not re-run __main__ ]: the preparation-data hook
# ---------------------------------------------------------------------------------------------

_launching = threading.local()
_hook_lock = threading.Lock()


def _install_preparation_hook() -> None:
    from multiprocessing import spawn

    with _hook_lock:
        if getattr(spawn.get_preparation_data, "_compatmp_hook", False):
            return
        original = spawn.get_preparation_data

        def get_preparation_data(name: str) -> dict:
            data = original(name)
            if getattr(_launching, "active", False):
                data.pop("init_main_from_path", None)
                data.pop("init_main_from_name", None)
            return data

        get_preparation_data._compatmp_hook = True  # type: ignore[attr-defined]
        spawn.get_preparation_data = get_preparation_data


@contextlib.contextmanager
def without_main() -> Iterator[None]:
    """Within this block, processes started by this thread skip ``__main__`` in the child.

    Installs the preparation-data hook once (NOTE [ Workers do not re-run __main__ ]) and
    restores the thread's previous state on exit, so blocks nest. Used for compatmp's own
    workers and for the processes of :func:`compatmp.get_context` (``_context``).
    """
    _install_preparation_hook()
    before = getattr(_launching, "active", False)
    _launching.active = True
    try:
        yield
    finally:
        _launching.active = before


def _start_without_main(proc: Any, method: str) -> None:
    """``proc.start()`` without ``__main__`` in the child's preparation data, SIGINT blocked."""
    with without_main(), _sigint_blocked(method):
        proc.start()


class _sigint_blocked:
    """Block SIGINT in this thread while a fork or spawn worker starts.

    A child inherits the signal mask across ``fork()`` and ``exec()``, so the worker is born
    with SIGINT blocked: a Ctrl-C while it still imports NumPy (spawn: ~0.3 s) stays pending
    instead of killing it, and is discarded when the worker ignores SIGINT
    (``_worker.worker_main``, which then unblocks it). Here the signal is not lost: another
    thread takes it, or it is delivered when the mask is restored. Skipped for forkserver
    (its children inherit the *server's* mask; blocking here while the server starts would
    leak into every later child of other users), which leaves its children a window of a few
    milliseconds (fork in the server to ``worker_main``), and where ``pthread_sigmask`` is
    missing (Windows).
    """

    def __init__(self, method: str) -> None:
        self.active = method in ("fork", "spawn") and hasattr(signal, "pthread_sigmask")
        self.old: Any = None

    def __enter__(self) -> None:
        if self.active:
            self.old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})

    def __exit__(self, *exc: object) -> None:
        if self.active:
            signal.pthread_sigmask(signal.SIG_SETMASK, self.old)


def _pickled_modules(data: bytes) -> set[str]:
    """Top-level packages, already imported here, that unpickling ``data`` will import.

    Any string in the pickle that is a key of ``sys.modules`` counts: module names of
    ``GLOBAL``/``STACK_GLOBAL`` opcodes, and modules cloudpickle imports by name for code it
    sends by value (``subimport("numpy")``). A data string that happens to equal a module
    name only adds a harmless preload. A class referred to by name also brings the packages
    of its base classes (a ``keras.utils.PyDataset`` subclass defined in the user's module
    makes the worker import Keras, hence TensorFlow): :func:`_global_bases`.
    """
    found: set[str] = set()
    memo: dict[int, Any] = {}
    pushed: list[Any] = []  # recent values pushed by string and memo-get opcodes
    try:
        for op, arg, _pos in pickletools.genops(data):
            name = op.name
            if isinstance(arg, str):
                module = arg.split(" ")[0]  # GLOBAL's arg is "module qualname"
                if module in sys.modules:
                    found.add(module.split(".")[0])
                if name == "GLOBAL" and " " in arg:
                    found |= _global_bases(*arg.split(" ", 1))
                pushed.append(arg)
            elif name in ("BINGET", "LONG_BINGET", "GET"):
                pushed.append(memo.get(arg))
            elif name == "MEMOIZE":
                memo[len(memo)] = pushed[-1] if pushed else None
            elif name in ("BINPUT", "LONG_BINPUT", "PUT"):
                memo[arg] = pushed[-1] if pushed else None
            elif name == "STACK_GLOBAL" and len(pushed) >= 2:
                module, qualname = pushed[-2], pushed[-1]
                if isinstance(module, str) and isinstance(qualname, str):
                    found |= _global_bases(module, qualname)
            else:
                pushed.append(None)
            del pushed[:-2]
    except Exception:  # a truncated or odd pickle: preload what we found so far
        pass
    return found


def _global_bases(module: str, qualname: str) -> set[str]:
    """Top-level packages of the base classes of ``module.qualname``, if it is a class.

    Looked up without importing anything and without triggering a module ``__getattr__``
    (only ``vars()``), so it is safe on any pickle.
    """
    obj: Any = sys.modules.get(module)
    for part in qualname.split("."):
        if obj is None:
            return set()
        try:
            obj = vars(obj).get(part)
        except TypeError:  # no __dict__
            return set()
    if not isinstance(obj, type):
        return set()
    return {
        base.__module__.split(".")[0]
        for base in obj.__mro__
        if isinstance(getattr(base, "__module__", None), str) and base.__module__ in sys.modules
    }


def _forkserver_preload(ctx: Any, payloads: list[Any]) -> None:
    """Set the forkserver's preload list from the pickles workers will load (NOTE above)."""
    modules: set[str] = set()
    for payload in payloads:
        if isinstance(payload, WorkerPayload):
            modules.update(payload.preload_modules())  # noted while pickling: no walk
        elif isinstance(payload, bytes):
            modules |= _pickled_modules(payload)
    preload = ["compatmp._worker", *preloadable(modules)]
    ctx.set_forkserver_preload(preload)


# ---------------------------------------------------------------------------------------------
# Starting the worker processes
# ---------------------------------------------------------------------------------------------


def start_processes(
    method: str,
    configs: list[_worker.WorkerConfig],
    register: Callable[[_worker.WorkerConfig, Any, Any], None],
) -> None:
    """Start one worker process per config (the process transport's start-up).

    ``register(config, main_conn, proc)`` is called for each worker *before* its process
    starts, so the transport holds the main side of this one's pipe when a worker forked
    later runs the at-fork hook of :mod:`compatmp._core` (which closes it in the child).

    Args:
        method (str): ``"fork"``, ``"forkserver"`` or ``"spawn"``.
        configs (list[WorkerConfig]): one per worker; ``dataset`` is a
            :class:`compatmp._preload.WorkerPayload` (or the object itself under fork) and
            ``init_fn`` pickled bytes (the forkserver preload is read from the first config's).
        register (Callable[[WorkerConfig, Connection, BaseProcess], None]): receives each
            worker's main-side pipe end and its (not yet started) process.

    Raises:
        Exception: whatever starting a process raised; the workers registered so far are the
            caller's to shut down.
    """
    ctx = multiprocessing.get_context(method)
    if method != "fork":
        _install_preparation_hook()
    if method == "forkserver" and configs:
        first = configs[0]
        _forkserver_preload(ctx, [p for p in (first.dataset, first.init_fn) if p])
    for config in configs:
        main_conn, child_conn = ctx.Pipe(duplex=True)
        proc = ctx.Process(
            target=_worker.process_entry,
            args=(child_conn, config),
            name=f"compatmp-worker-{config.worker_id}",
            daemon=True,
        )
        register(config, main_conn, proc)
        try:
            _start_without_main(proc, method)
        finally:
            child_conn.close()
