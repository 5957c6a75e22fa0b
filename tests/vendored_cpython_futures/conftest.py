"""Run CPython's concurrent.futures process-pool tests with compatmp.get_context().

compatmp's own file (not vendored). The vendored files come from CPython's main branch
(commits in their headers) and run on Python 3.10+: the few ``test.support`` names they use
that the running Python lacks are provided by ``__init__.py`` (so that spawned workers, which
import these modules, have them too), and the tests that exercise Python features
newer than the running Python, or no context at all, are deselected with the reason
(``_NOT_RUN``). Everything else must pass with compatmp's contexts for fork, forkserver and
spawn; ``COMPATMP_FUTURES_SUITE=stdlib`` runs the same selection with the stdlib's contexts.
"""

from __future__ import annotations

import concurrent.futures
import sys
import threading

from . import support

# Without Python's test package (test.support) the vendored modules cannot even be imported.
collect_ignore_glob = ["test_*.py"] if support is None else []

_POOL = concurrent.futures.ProcessPoolExecutor
_NEWER_FIX = "a regression test of a ProcessPoolExecutor fix newer than this Python"
_NEW_API = "needs Python 3.14's ProcessPoolExecutor.terminate_workers/kill_workers"
_NOT_RUN: dict[str, str | None] = {
    # Not about contexts: the thread and interpreter pools of the generic mixins.
    "ThreadPool": "a thread pool takes no multiprocessing context",
    "InterpreterPool": "an interpreter pool takes no multiprocessing context",
    # Stops the process-wide resource tracker, which every later test of the session (and
    # compatmp's shared memory) uses; reads _exitcode, new in 3.12.
    "FailingInitializerResourcesTest": "stops the session's resource tracker",
    "test_terminate_workers": _NEW_API if not hasattr(_POOL, "terminate_workers") else None,
    "test_kill_workers": _NEW_API if not hasattr(_POOL, "kill_workers") else None,
    "test_force_shutdown": _NEW_API if not hasattr(_POOL, "terminate_workers") else None,
    # Regression tests of ProcessPoolExecutor fixes newer than the Pythons compatmp's CI runs
    # (3.10-3.13): they fail or hang with the stdlib's own contexts there (measured on
    # 3.11.7 with COMPATMP_FUTURES_SUITE=stdlib), and test the executor's bookkeeping, not
    # how a context pickles.
    **{
        name: _NEWER_FIX if sys.version_info < (3, 15) else None
        for name in (
            "test_broken_process_pool_traceback",  # one exception per future
            "test_sysconf_permission_error",  # gh-155912
            "test_traceback_when_child_process_terminates_abruptly",  # gh-139462
            "test_max_tasks_per_child_pending_tasks_gh115634",  # hangs on 3.11
            "test_shutdown_no_wait_max_tasks_gh119592",
            "test_gc_during_max_tasks_worker_exit_gh152967",
            "test_force_shutdown_during_max_tasks_worker_exit",
            "test_failed_worker_replacement_breaks_pool",  # mocks process._spawn_worker
        )
    },
    "test_python_finalization_error": (
        "mocks threading._start_joinable_thread, new in Python 3.13"
        if not hasattr(threading, "_start_joinable_thread")
        else None
    ),
}


def pytest_collection_modifyitems(config, items):
    keep, dropped = [], []
    for item in items:
        if "vendored_cpython_futures" not in str(item.fspath):
            keep.append(item)
            continue
        reason = next((why for key, why in _NOT_RUN.items() if why and key in item.nodeid), None)
        (dropped if reason else keep).append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = keep
