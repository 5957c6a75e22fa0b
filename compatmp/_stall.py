"""Stall reports: when no batch arrives for a while, say who holds what and where it is stuck.

A worker blocked inside ``dataset[i]`` (a dead NFS mount, a deadlocked library) is alive, so
crash detection never fires; without a ``timeout=`` training would wait forever with no
message. The pool's ``stall_timeout`` (default 60 s) makes the main side log a WARNING on the
``"compatmp"`` logger every time it has waited that long for the next batch, naming the
worker's pid, the index it is computing, and that worker's Python stack; then it keeps
waiting. With ``timeout=``, the pool raises :class:`compatmp.WorkerTimeoutError` instead once
that limit is reached.

NOTE [ Stall reports ]
How the main process gets a stuck worker's stack:

- Worker processes (POSIX): the worker registers ``faulthandler.register(SIGUSR1, file=...,
  all_threads=True)`` on a file the main process created (:class:`StackFile`). The main sends
  SIGUSR1 and reads what was appended. The file never outlives the main process, however it
  ends (SIGKILL before the first batch included): on Linux it has no name at all
  (``tempfile.TemporaryFile``: ``O_TMPFILE``, or unlinked at once), and each worker opens the
  main's descriptor through ``/proc/<main pid>/fd/<fd>`` (proc(5): opening that link opens the
  file itself, unlinked or not); where there is no such ``/proc`` (macOS), it is a named
  temporary file that the worker unlinks as soon as it has opened it and the main unlinks when
  the worker reports ready, so only a main killed while a worker is still starting leaves it.
  faulthandler writes from the C signal handler, without the GIL, so the dump works even
  while the worker is blocked in C code holding the GIL (CPython docs, ``faulthandler``:
  "dump the traceback ... on a user signal"). A worker is only signalled once it reported
  ready (handler installed): SIGUSR1's default action would kill a worker still starting.
- Worker threads: ``sys._current_frames()[thread.ident]``, formatted with ``traceback``.
- Windows has neither SIGUSR1 nor ``faulthandler.register``: the report names pid and index
  and says that the stack is not available there.

If the dataset installs its own SIGUSR1 handler in a worker, that handler gets our request
instead (and the report says no stack arrived).
"""

from __future__ import annotations

import faulthandler
import logging
import os
import signal
import sys
import tempfile
import time
import traceback
from typing import Any

__all__ = [
    "DEFAULT_STALL_TIMEOUT",
    "STACK_WAIT",
    "StackFile",
    "install_in_worker",
    "process_stack",
    "report",
    "supported",
    "thread_stack",
]

# Seconds without a batch, while one is awaited, before the first stall warning (and between
# later ones). Long enough that a slow but healthy batch (image decoding, a cold cache) does
# not warn; short enough that a hung training run says why within a minute.
DEFAULT_STALL_TIMEOUT = 60.0

# How long the main side waits for a worker's stack dump to arrive in its file (seconds).
STACK_WAIT = 2.0

_STACK_SIGNAL = getattr(signal, "SIGUSR1", None)
_log = logging.getLogger("compatmp")
_worker_file: Any = None  # in a worker process: kept open for faulthandler


def supported() -> bool:
    """True if worker processes can dump their stacks on request here (POSIX)."""
    return _STACK_SIGNAL is not None and hasattr(faulthandler, "register")


def _proc_fd_dir() -> str | None:
    """``/proc/<pid>/fd`` of this process if workers can reopen its descriptors there."""
    try:
        if os.readlink("/proc/self") != str(os.getpid()):  # /proc of another PID namespace
            return None
    except (OSError, AttributeError):
        return None
    path = f"/proc/{os.getpid()}/fd"
    return path if os.path.isdir(path) else None


class StackFile:
    """Main side: a temporary file one worker process dumps its stacks into.

    Linux: an unnamed file (``tempfile.TemporaryFile``), reached by the worker through
    ``/proc/<main pid>/fd/<fd>``, so nothing is ever left on disk, even when the main process
    is killed. Elsewhere (macOS): ``tempfile.mkstemp``, unlinked by the worker once opened and
    by :meth:`unlink`. NOTE [ Stall reports ].

    Attributes:
        path (str): what the worker opens (:func:`install_in_worker`).
    """

    def __init__(self) -> None:
        fd_dir = _proc_fd_dir()
        if fd_dir is not None:
            self._file = tempfile.TemporaryFile("rb", prefix="compatmp-stack-")
            self.path = f"{fd_dir}/{self._file.fileno()}"
            self._unlinked = True  # it never had a name (or lost it at once)
        else:
            fd, self.path = tempfile.mkstemp(prefix="compatmp-stack-", suffix=".txt")
            self._file = os.fdopen(fd, "rb")
            self._unlinked = False

    def unlink(self) -> None:
        """Remove the file's name (the worker has it open); idempotent."""
        if not self._unlinked:
            self._unlinked = True
            try:
                os.unlink(self.path)
            except OSError:
                pass

    def read_new(self) -> str:
        """What the worker appended since the last call."""
        return self._file.read().decode("utf-8", "replace")

    def close(self) -> None:
        """Unlink and close; idempotent."""
        self.unlink()
        self._file.close()


def install_in_worker(path: str) -> None:
    """In a worker process: dump every thread's stack to ``path`` on SIGUSR1.

    A named file (not under ``/proc``) is unlinked once open: only this worker's descriptor
    needs it. If it cannot be opened (the main process closed the pool meanwhile, ``/proc``
    refused), the worker runs without stack dumps and ignores SIGUSR1; stall reports then say
    no stack arrived. Call from the worker's main thread (signal handlers live there).

    Args:
        path (str): the :attr:`StackFile.path` the main process created.
    """
    global _worker_file
    if not supported():
        return
    try:
        _worker_file = open(path, "ab", buffering=0)
    except OSError:
        # No dumps, and the main's SIGUSR1 must not kill us (its default action terminates).
        signal.signal(_STACK_SIGNAL, signal.SIG_IGN)
        return
    if not path.startswith("/proc/"):
        try:
            os.unlink(path)
        except OSError:
            pass
    faulthandler.register(_STACK_SIGNAL, file=_worker_file, all_threads=True, chain=False)


def process_stack(pid: int, stack_file: StackFile, wait: float = STACK_WAIT) -> str:
    """Ask worker process ``pid`` for its stack (SIGUSR1) and return what it wrote.

    Args:
        pid (int): the worker's pid; it must have called :func:`install_in_worker`.
        stack_file (StackFile): that worker's file.
        wait (float): most seconds to wait for the dump (default: :data:`STACK_WAIT`).

    Returns:
        str: faulthandler's dump (``File "...", line N in function`` lines, most recent call
        first), or a sentence saying why there is none.
    """
    stack_file.read_new()  # whatever an earlier, late dump left
    try:
        os.kill(pid, _STACK_SIGNAL)
    except OSError as exc:
        return f"(no stack: cannot signal pid {pid}: {exc})"
    text = ""
    deadline = time.monotonic() + wait
    quiet = 0
    while time.monotonic() < deadline:
        chunk = stack_file.read_new()
        text += chunk
        quiet = 0 if chunk else quiet + 1
        if text and quiet >= 2:  # the dump is written in one go; two empty reads: done
            break
        time.sleep(0.05)
    return text or f"(no stack: the worker did not answer SIGUSR1 within {wait} s)"


def thread_stack(ident: int | None) -> str:
    """The formatted stack of the thread ``ident`` of this process.

    Returns:
        str: ``traceback.format_stack`` lines (most recent call last), or why there are none.
    """
    frame = sys._current_frames().get(ident) if ident is not None else None
    if frame is None:
        return "(no stack: the worker thread is not running)"
    return "".join(traceback.format_stack(frame))


def report(who: str, waited: float, awaited: Any, holding: Any, stack: str) -> None:
    """Log the stall warning on the ``"compatmp"`` logger.

    Args:
        who (str): the worker, e.g. ``"worker 1 (pid 1234)"``.
        waited (float): seconds waited so far for the batch.
        awaited (object): the index the consumer waits for.
        holding (object): the index the worker is computing (may differ from ``awaited``
            when it has earlier batches queued).
        stack (str): the worker's stack.
    """
    _log.warning(
        "compatmp: no batch for %.1f s: waiting for the batch at index %r; %s is computing "
        "index %r. The pool keeps waiting (pass timeout= to fail instead, stall_timeout=0 to "
        "silence this). Its stack:\n%s",
        waited,
        awaited,
        who,
        holding,
        stack.rstrip(),
    )
