"""Which way of running dataset code in parallel is safe here, and why.

Every ``sys.platform``, Python-version, frozen-executable and thread-state check of compatmp
lives in this module; nothing else branches on the platform. :class:`PlatformFacts` collects
the facts, :func:`decide_start_method` turns them into a :class:`Decision` with a reason a
user can read, and :func:`diagnose` (``python -m compatmp doctor``) prints both.

NOTE [ Start-method decision ]
The first matching row wins:

1. ``start_method=`` argument, else the ``COMPATMP_START_METHOD`` environment variable: used
   if available here, otherwise :class:`StartMethodError` lists what is. ``"ray"`` (Ray
   actors, :mod:`compatmp._ray`) is only ever used this way, when Ray is installed.
1a. A daemonic process (``multiprocessing.current_process().daemon``: a
   ``multiprocessing.Pool`` worker, a compatmp worker process making a nested pool) cannot
   start child processes (``Process.start`` asserts "daemonic processes are not allowed to
   have children", CPython ``multiprocessing/process.py``): fork, forkserver or spawn asked
   for by name raise :class:`StartMethodError` naming the fix; otherwise threads, whatever
   ``COMPATMP_START_METHOD`` says (children inherit it), and the pool warns
   (``ThreadFallbackWarning``). ``"ray"`` by name is allowed (Ray's processes are not
   multiprocessing children).
1b. A start method the program chose with ``multiprocessing.set_start_method(...)``
   (``multiprocessing.get_start_method(allow_none=True)``), as Keras and torch respect it: used
   as asked, fork included (the program asked for it; the reason names the risk). A method
   equal to Python's own default for the platform (:func:`python_default_method`) does not
   count: ``multiprocessing`` also fixes its context to the default on first use
   (``multiprocessing.Lock()``, ``Process()``), and the two are indistinguishable, so the
   rows below still apply and may refuse fork where it is unsafe.
2. Free-threaded CPython with the GIL disabled (PEP 703, ``sys._is_gil_enabled()``):
   threads run Python code in parallel and share the dataset without pickling.
3. Frozen executable (``sys.frozen``, PyInstaller/cx_Freeze): a spawned child re-runs the
   executable, which starts the whole program again unless it calls
   ``multiprocessing.freeze_support()`` first; threads are the safe default.
4. Windows: spawn, the only method. macOS: spawn; fork can crash in the Objective-C runtime
   (bpo-33725) and spawn has been the default since Python 3.8.
5. Linux (and other POSIX) with TensorFlow's eager context or CUDA initialized, or with
   threads other than BLAS/OpenMP pools running: forkserver (else spawn). A forked child
   inherits locks held by threads that do not exist in it and can deadlock; CPython 3.12+
   warns "This process ... is multi-threaded, use of fork() may lead to deadlocks in the
   child" (gh-100228), and CUDA cannot be used in a forked child at all.
6. Linux with Python >= 3.14: forkserver, the new default there (gh-84559). Otherwise fork,
   the cheapest, when the process has a single thread.

Thread counting: ``threading.active_count()`` misses threads started by C libraries
(TensorFlow's pools are invisible to it), so we count OS threads (``/proc/self/task``, or
psutil elsewhere). ``import numpy`` alone adds an OpenBLAS worker thread, yet fork is safe
then: OpenBLAS parks its pool in a ``pthread_atfork`` handler. So threads of BLAS pools that
threadpoolctl reports (``num_threads - 1`` workers each; the caller is the other) are not
counted. OpenMP pools start lazily, so their threads stay counted, which errs towards safety.
threadpoolctl reports a pool's configured size, not its live threads: after a ``fork()`` the
parent's OpenBLAS workers may be gone while still reported, which would hide a real thread. So
Python-level threads (``threading.active_count()``) give a floor that BLAS can never cancel.
"""

from __future__ import annotations

import importlib.util
import multiprocessing
import os
import sys
import threading
from dataclasses import dataclass, field, replace
from typing import Any

from ._exceptions import StartMethodError

__all__ = [
    "ENV_VAR",
    "EXPLICIT_METHODS",
    "METHODS",
    "Decision",
    "PlatformFacts",
    "available_methods",
    "decide_start_method",
    "diagnose",
    "python_default_method",
]

# Name of the environment variable that overrides ``start_method="auto"``.
ENV_VAR = "COMPATMP_START_METHOD"

# Every method compatmp knows, cheapest first. "thread" is always available.
METHODS = ("fork", "forkserver", "spawn", "thread")

# The start methods that make worker processes with multiprocessing (a daemonic process
# cannot: NOTE [ Start-method decision ], row 1a).
PROCESS_METHODS = ("fork", "forkserver", "spawn")

# Methods used only when asked for by name (argument or COMPATMP_START_METHOD), never by
# "auto": "ray" runs the workers as Ray actors, possibly on other machines (compatmp._ray).
EXPLICIT_METHODS = ("ray",)

# threadpoolctl ``internal_api`` names whose worker threads start when the library loads and
# park across fork() in a pthread_atfork handler.
_FORK_SAFE_BLAS = frozenset({"openblas", "blis", "mkl"})


def _os_name(platform: str) -> str:
    if platform.startswith("win") or platform == "cygwin":
        return "windows"
    if platform == "darwin":
        return "darwin"
    if platform.startswith("linux"):
        return "linux"
    return platform  # freebsd13, ... : POSIX, handled like Linux


def available_methods() -> list[str]:
    """The ``multiprocessing`` start methods this platform offers, cheapest first.

    Returns:
        list[str]: a subset of ``["fork", "forkserver", "spawn"]`` in that order: all three
        on Linux and macOS (where fork is offered but unsafe), ``["spawn"]`` on Windows.
        Threads (``"thread"``) are always available and not listed.
    """
    offered = set(multiprocessing.get_all_start_methods())
    return [m for m in METHODS if m in offered]


def _native_thread_count() -> int:
    """OS threads of this process, including those C libraries started."""
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        import psutil

        return psutil.Process().num_threads()


def _blas_pool_threads() -> int:
    """Worker threads of BLAS pools (OpenBLAS, BLIS, MKL) that park themselves across fork."""
    import threadpoolctl

    try:
        pools = threadpoolctl.threadpool_info()
    except Exception:  # threadpoolctl inspects loaded libraries; never let that break us
        return 0
    return sum(
        max(0, int(p.get("num_threads", 1)) - 1)
        for p in pools
        if p.get("internal_api") in _FORK_SAFE_BLAS
    )


def _tf_eager_initialized() -> bool:
    tf_context = sys.modules.get("tensorflow.python.eager.context")
    if tf_context is None:
        return False
    ctx = getattr(tf_context, "_context", None)
    return bool(ctx is not None and getattr(ctx, "_initialized", False))


def _torch_cuda_initialized() -> bool:
    torch = sys.modules.get("torch")
    if torch is None:
        return False
    try:
        return bool(torch.cuda.is_initialized())
    except Exception:
        return False


@dataclass(frozen=True)
class PlatformFacts:
    """What the start-method decision depends on, read once from this process.

    Build one with :meth:`current`, or by hand in tests to simulate another platform::

        PlatformFacts(os="windows", python_version=(3, 12, 0), available_methods=("spawn",))

    Attributes:
        os (str): ``"linux"``, ``"darwin"``, ``"windows"``, or another ``sys.platform`` value
            for other POSIX systems (handled like Linux).
        python_version (tuple[int, int, int]): major, minor, micro.
        available_methods (tuple[str, ...]): start methods multiprocessing offers here.
        thread_count (int): native OS threads of the process, main thread included
            (default: 1).
        blas_threads (int): of those, worker threads of BLAS pools that are safe across fork,
            as threadpoolctl reports them (default: 0).
        python_threads (int): threads the ``threading`` module knows, main thread included
            (``threading.active_count()``; default: 1). A floor for :attr:`other_threads`.
        tf_imported (bool): ``tensorflow`` is in ``sys.modules`` (default: False).
        tf_eager_initialized (bool): TensorFlow's eager context exists, i.e. TensorFlow has
            started its thread pools (default: False).
        torch_cuda_initialized (bool): ``torch.cuda.is_initialized()`` (default: False).
        frozen (bool): running as a frozen executable, ``sys.frozen`` (default: False).
        gil_disabled (bool): free-threaded build with the GIL off (default: False).
        program_start_method (str | None): the start method the program fixed with
            ``multiprocessing.set_start_method`` (or that ``multiprocessing`` fixed on first
            use), ``multiprocessing.get_start_method(allow_none=True)``; None if not fixed
            (default: None).
        daemonic (bool): this process is a daemonic ``multiprocessing`` process
            (``multiprocessing.current_process().daemon``: a ``multiprocessing.Pool`` worker,
            a compatmp worker process), which may not start child processes (default: False).
    """

    os: str
    python_version: tuple[int, int, int]
    available_methods: tuple[str, ...]
    thread_count: int = 1
    blas_threads: int = 0
    python_threads: int = 1
    tf_imported: bool = False
    tf_eager_initialized: bool = False
    torch_cuda_initialized: bool = False
    frozen: bool = False
    gil_disabled: bool = False
    program_start_method: str | None = None
    daemonic: bool = False

    @property
    def other_threads(self) -> int:
        """Threads besides the main thread and BLAS pool workers: the ones fork endangers.

        ``max(thread_count - 1 - blas_threads, python_threads - 1)``: BLAS threads are
        subtracted from the native count, but never below the Python threads, which are
        certainly not BLAS workers (threadpoolctl can over-report after a fork).
        """
        return max(0, self.thread_count - 1 - self.blas_threads, self.python_threads - 1)

    @classmethod
    def current(cls) -> PlatformFacts:
        """Read the facts of this process now.

        Cheap (a directory listing and a look at loaded libraries); never imports TensorFlow
        or torch, only inspects them if already imported.

        Returns:
            PlatformFacts: the facts of the calling process.
        """
        is_gil_enabled = getattr(sys, "_is_gil_enabled", None)
        return cls(
            os=_os_name(sys.platform),
            python_version=tuple(sys.version_info[:3]),
            available_methods=tuple(available_methods()),
            thread_count=_native_thread_count(),
            blas_threads=_blas_pool_threads(),
            python_threads=threading.active_count(),
            tf_imported="tensorflow" in sys.modules,
            tf_eager_initialized=_tf_eager_initialized(),
            torch_cuda_initialized=_torch_cuda_initialized(),
            frozen=bool(getattr(sys, "frozen", False)),
            gil_disabled=is_gil_enabled is not None and not is_gil_enabled(),
            program_start_method=multiprocessing.get_start_method(allow_none=True),
            daemonic=bool(multiprocessing.current_process().daemon),
        )

    def with_(self, **changes: Any) -> PlatformFacts:
        """A copy with some facts changed (``dataclasses.replace``); handy in tests."""
        return replace(self, **changes)


@dataclass(frozen=True)
class Decision:
    """How compatmp will run dataset code, and why.

    Attributes:
        method (str): ``"fork"``, ``"forkserver"``, ``"spawn"``, ``"thread"``, or ``"ray"``
            (only when requested by name).
        reason (str): one sentence naming the fact that decided it.
        facts (PlatformFacts | None): the facts the decision was made from.
    """

    method: str
    reason: str
    facts: PlatformFacts | None = field(default=None, repr=False, compare=False)

    @property
    def uses_processes(self) -> bool:
        """True for fork, forkserver, spawn and ray; False for threads."""
        return self.method != "thread"


def python_default_method(facts: PlatformFacts) -> str:
    """The start method ``multiprocessing`` uses when the program picks none.

    From the ``multiprocessing`` documentation ("Contexts and start methods"): spawn on Windows
    and on macOS (since Python 3.8), forkserver on other POSIX systems since Python 3.14
    (gh-84559), fork before.

    Args:
        facts (PlatformFacts): the platform to answer for.

    Returns:
        str: ``"fork"``, ``"forkserver"`` or ``"spawn"``.
    """
    if facts.os in ("windows", "darwin"):
        return "spawn"
    return "forkserver" if facts.python_version >= (3, 14) else "fork"


def _validate_requested(requested: object, source: str, facts: PlatformFacts) -> str:
    if requested in EXPLICIT_METHODS:
        if importlib.util.find_spec("ray") is None:
            raise StartMethodError(
                f"{source}={requested!r} needs Ray, which is not installed: install it with "
                "`pip install 'compatmp[ray]'` (or `pip install 'ray>=2.9'`), or choose "
                f"another start method: {['auto', *METHODS]}."
            )
        return requested
    if not isinstance(requested, str) or requested not in (*METHODS, "auto"):
        raise StartMethodError(
            f"{source} must be one of {['auto', *METHODS, *EXPLICIT_METHODS]}, "
            f"got {requested!r}. "
            f"Available on this platform ({facts.os}): {[*facts.available_methods, 'thread']}."
        )
    if requested not in ("auto", "thread") and requested not in facts.available_methods:
        raise StartMethodError(
            f"{source}={requested!r} is not available on this platform ({facts.os}); "
            f"available here: {[*facts.available_methods, 'thread']}. "
            "Use start_method='auto' to let compatmp choose."
        )
    return requested


def _daemonic_refusal(what: str) -> str:
    return (
        f"{what} needs worker processes, but this is a daemonic process (a "
        "multiprocessing.Pool worker, a compatmp worker process, or another Process(daemon="
        "True)), and Python refuses to let it start children ('daemonic processes are not "
        "allowed to have children', multiprocessing/process.py). Pass start_method='thread' "
        "or 'auto' (which uses threads here), or create the pool in the main process."
    )


def _process_fallback(facts: PlatformFacts, preferred: str) -> str:
    if preferred in facts.available_methods:
        return preferred
    if "spawn" in facts.available_methods:
        return "spawn"
    return "thread"


def decide_start_method(requested: str = "auto", *, facts: PlatformFacts | None = None) -> Decision:
    """Choose fork, forkserver, spawn or threads for this process, with the reason.

    Applies the table in NOTE [ Start-method decision ] (module docstring) to ``facts``.

    Args:
        requested (str): ``"auto"`` (default) to decide from the facts, or one of ``"fork"``,
            ``"forkserver"``, ``"spawn"``, ``"thread"``, ``"ray"`` to force it (``"ray"``: Ray
            actors as workers, never chosen by ``"auto"``). With ``"auto"``, the
            ``COMPATMP_START_METHOD`` environment variable, when set, is used instead.
        facts (PlatformFacts | None): the facts to decide from (default: None, meaning
            :meth:`PlatformFacts.current`).

    Returns:
        Decision: ``method``, a one-sentence ``reason`` and the ``facts``.

    Raises:
        StartMethodError: ``requested`` (or the environment variable) is not a known method
            or is unavailable here, e.g. ``"fork"`` on Windows; the message lists what is.
    """
    if facts is None:
        facts = PlatformFacts.current()
    _validate_requested(requested, "start_method", facts)
    if requested != "auto":
        if facts.daemonic and requested in PROCESS_METHODS:
            raise StartMethodError(_daemonic_refusal(f"start_method={requested!r}"))
        return Decision(requested, f"start_method={requested!r} was requested.", facts)
    env = os.environ.get(ENV_VAR, "").strip()
    if facts.daemonic:  # row 1a: before the environment variable, which children inherit
        return Decision(
            "thread",
            "this is a daemonic process (a multiprocessing.Pool worker or a compatmp worker "
            "process), which Python does not let start worker processes; threads run the "
            "batches instead"
            + (f" ({ENV_VAR}={env} is ignored here)." if env and env != "auto" else "."),
            facts,
        )
    if env and env != "auto":
        _validate_requested(env, ENV_VAR, facts)
        return Decision(env, f"the environment variable {ENV_VAR}={env} is set.", facts)
    chosen = facts.program_start_method
    if chosen in facts.available_methods and chosen != python_default_method(facts):
        risk = _risks(chosen, facts) if chosen == "fork" else ""
        return Decision(
            chosen,
            f"the program chose {chosen!r} with multiprocessing.set_start_method()"
            + (f"; fork here: {risk}" if risk else "."),
            facts,
        )

    if facts.gil_disabled:
        return Decision(
            "thread",
            "free-threaded Python with the GIL disabled: threads run dataset code in "
            "parallel without pickling it or starting processes.",
            facts,
        )
    if facts.frozen:
        return Decision(
            "thread",
            "this is a frozen executable (sys.frozen): worker processes would start the "
            "program again unless it calls multiprocessing.freeze_support() first; call it "
            "and pass start_method='spawn' to use processes.",
            facts,
        )
    if facts.os == "windows":
        return Decision(
            _process_fallback(facts, "spawn"),
            "Windows offers only the spawn start method.",
            facts,
        )
    if facts.os == "darwin":
        return Decision(
            _process_fallback(facts, "spawn"),
            "macOS: fork can crash in the Objective-C runtime (bpo-33725), and spawn is "
            "Python's default there since 3.8.",
            facts,
        )
    danger = []
    if facts.tf_eager_initialized:
        danger.append("TensorFlow's eager context is initialized (its thread pools are running)")
    if facts.torch_cuda_initialized:
        danger.append("CUDA is initialized (a forked child cannot use it)")
    if facts.other_threads > 0:
        danger.append(
            f"the process has {facts.other_threads} thread(s) besides the main thread and "
            "BLAS pools"
        )
    if danger:
        method = _process_fallback(facts, "forkserver")
        return Decision(
            method,
            f"{'; '.join(danger)}, so fork could deadlock the workers (CPython 3.12+ warns "
            f"about fork in a multi-threaded process); {method} starts them from a clean "
            "process.",
            facts,
        )
    if facts.python_version >= (3, 14):
        return Decision(
            _process_fallback(facts, "forkserver"),
            "Python 3.14+ on Linux: forkserver is the default start method (gh-84559).",
            facts,
        )
    if "fork" in facts.available_methods:
        return Decision(
            "fork",
            "Linux, single-threaded process: fork is safe and starts workers fastest.",
            facts,
        )
    return Decision(_process_fallback(facts, "forkserver"), "fork is not available here.", facts)


def _risks(method: str, facts: PlatformFacts) -> str:
    """What ``method`` would risk given ``facts``: one sentence for the doctor report."""
    if method != "thread" and method not in facts.available_methods:
        return "not available on this platform."
    if method == "fork":
        if facts.os == "darwin":
            return "can crash in the Objective-C runtime on macOS (bpo-33725)."
        risks = []
        if facts.tf_eager_initialized:
            risks.append("TensorFlow's thread pools are running: children can deadlock")
        if facts.torch_cuda_initialized:
            risks.append("CUDA is initialized: children cannot use it")
        if facts.other_threads:
            risks.append(f"{facts.other_threads} non-BLAS thread(s): children can deadlock")
        return ("; ".join(risks) + ".") if risks else "safe now (single-threaded process)."
    if method == "forkserver":
        return (
            "the dataset must be picklable; the server process starts once (about as slow as "
            "one spawn), then workers fork from it quickly."
        )
    if method == "spawn":
        return (
            "the dataset must be picklable; every worker starts a fresh interpreter and "
            "imports the dataset's modules (TensorFlow: ~3 s and ~570 MB per worker)."
        )
    if facts.gil_disabled:
        return "none: the GIL is disabled, threads run in parallel."
    return (
        "pure-Python dataset code is serialized by the GIL; NumPy/Pillow work that releases "
        "the GIL still runs in parallel."
    )


def diagnose(facts: PlatformFacts | None = None) -> str:
    """A human-readable report: the facts, the decision and what each method would risk.

    This is what ``python -m compatmp doctor`` prints.

    Args:
        facts (PlatformFacts | None): facts to report on (default: None, meaning
            :meth:`PlatformFacts.current`).

    Returns:
        str: a multi-line report ending in a newline.
    """
    if facts is None:
        facts = PlatformFacts.current()
    lines = ["compatmp doctor", "", "Facts:"]
    rows = [
        ("os", facts.os),
        ("python", ".".join(map(str, facts.python_version))),
        ("start methods available", ", ".join(facts.available_methods) or "none"),
        (
            "OS threads",
            f"{facts.thread_count} ({facts.blas_threads} in BLAS pools, "
            f"{facts.python_threads} known to Python, "
            f"{facts.other_threads} others besides main)",
        ),
        ("tensorflow imported", facts.tf_imported),
        ("tensorflow eager context initialized", facts.tf_eager_initialized),
        ("torch CUDA initialized", facts.torch_cuda_initialized),
        ("frozen executable", facts.frozen),
        ("GIL disabled", facts.gil_disabled),
        (f"{ENV_VAR}", os.environ.get(ENV_VAR, "(not set)")),
    ]
    width = max(len(k) for k, _ in rows)
    lines += [f"  {k.ljust(width)}  {v}" for k, v in rows]
    try:
        decision = decide_start_method(facts=facts)
        lines += ["", f"Decision: {decision.method}", f"  because {decision.reason}"]
        if decision.method == "fork" and not facts.tf_eager_initialized:
            later = decide_start_method(facts=facts.with_(tf_eager_initialized=True))
            lines.append(
                f"  Once TensorFlow runs its first op (building a Keras model does), the "
                f"decision becomes: {later.method}."
            )
    except StartMethodError as exc:
        decision = None
        lines += ["", f"Decision: error: {exc}"]
    lines += ["", "Other methods here:"]
    for method in METHODS:
        if decision is not None and method == decision.method:
            continue
        lines.append(f"  {method.ljust(10)}  {_risks(method, facts)}")
    return "\n".join(lines) + "\n"
