"""The start-method decision table, row by row, with hand-built facts (any OS, any Python)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

import compatmp
from compatmp import Decision, PlatformFacts, StartMethodError, decide_start_method
from compatmp._platform import ENV_VAR

LINUX_312 = PlatformFacts(
    os="linux", python_version=(3, 12, 4), available_methods=("fork", "forkserver", "spawn")
)
WINDOWS = PlatformFacts(os="windows", python_version=(3, 12, 4), available_methods=("spawn",))
MACOS = PlatformFacts(
    os="darwin", python_version=(3, 12, 4), available_methods=("fork", "forkserver", "spawn")
)


@pytest.fixture(autouse=True)
def _no_env_override(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)


def test_linux_single_thread_forks():
    d = decide_start_method(facts=LINUX_312)
    assert d == Decision("fork", d.reason)
    assert "single-threaded" in d.reason
    assert d.facts is LINUX_312


def test_linux_numpy_blas_threads_do_not_prevent_fork():
    # import numpy: 2 OS threads, one of them OpenBLAS's worker (NOTE [ Start-method decision ]).
    facts = LINUX_312.with_(thread_count=2, blas_threads=1)
    assert facts.other_threads == 0
    assert decide_start_method(facts=facts).method == "fork"


def test_linux_312_with_other_threads_uses_forkserver():
    facts = LINUX_312.with_(thread_count=4, blas_threads=1)
    d = decide_start_method(facts=facts)
    assert d.method == "forkserver"
    assert "2 thread(s)" in d.reason and "deadlock" in d.reason


def test_linux_tf_initialized_uses_forkserver():
    facts = LINUX_312.with_(
        tf_imported=True, tf_eager_initialized=True, thread_count=8, blas_threads=1
    )
    d = decide_start_method(facts=facts)
    assert d.method == "forkserver"
    assert "TensorFlow" in d.reason


def test_linux_tf_imported_but_not_initialized_still_forks():
    facts = LINUX_312.with_(tf_imported=True, thread_count=3, blas_threads=2)
    assert decide_start_method(facts=facts).method == "fork"


def test_linux_cuda_initialized_uses_forkserver():
    d = decide_start_method(facts=LINUX_312.with_(torch_cuda_initialized=True))
    assert d.method == "forkserver"
    assert "CUDA" in d.reason


def test_threads_without_forkserver_fall_back_to_spawn():
    facts = LINUX_312.with_(available_methods=("fork", "spawn"), thread_count=5)
    assert decide_start_method(facts=facts).method == "spawn"


def test_linux_314_defaults_to_forkserver():
    d = decide_start_method(facts=LINUX_312.with_(python_version=(3, 14, 0)))
    assert d.method == "forkserver"
    assert "3.14" in d.reason


def test_windows_spawns():
    d = decide_start_method(facts=WINDOWS)
    assert d.method == "spawn"
    assert "Windows" in d.reason


def test_windows_with_threads_and_tf_still_spawns():
    facts = WINDOWS.with_(thread_count=12, tf_eager_initialized=True)
    assert decide_start_method(facts=facts).method == "spawn"


def test_macos_spawns_even_single_threaded():
    d = decide_start_method(facts=MACOS)
    assert d.method == "spawn"
    assert "bpo-33725" in d.reason


def test_frozen_uses_threads_and_says_how_to_get_processes():
    d = decide_start_method(facts=WINDOWS.with_(frozen=True))
    assert d.method == "thread"
    assert "freeze_support" in d.reason


def test_free_threaded_without_gil_uses_threads():
    d = decide_start_method(facts=LINUX_312.with_(python_version=(3, 13, 1), gil_disabled=True))
    assert d.method == "thread"
    assert "GIL" in d.reason


def test_free_threaded_wins_over_frozen_and_os():
    facts = MACOS.with_(gil_disabled=True, frozen=True)
    assert decide_start_method(facts=facts).method == "thread"


@pytest.mark.parametrize("method", ["fork", "forkserver", "spawn", "thread"])
def test_explicit_request_wins_over_every_fact(method):
    facts = LINUX_312.with_(tf_eager_initialized=True, thread_count=9)
    d = decide_start_method(method, facts=facts)
    assert d.method == method
    assert repr(method) in d.reason


def test_env_var_overrides_auto(monkeypatch):
    monkeypatch.setenv(ENV_VAR, "spawn")
    d = decide_start_method(facts=LINUX_312)
    assert d.method == "spawn"
    assert ENV_VAR in d.reason


def test_program_start_method_is_respected_by_auto():
    # Issue 12 item 4: multiprocessing.set_start_method("spawn") in the program wins over
    # compatmp's own choice (fork here), and the reason says so.
    d = decide_start_method(facts=LINUX_312.with_(program_start_method="spawn"))
    assert d.method == "spawn"
    assert "set_start_method" in d.reason


def test_program_asking_for_fork_gets_fork_even_where_unsafe_with_the_risk_named():
    facts = LINUX_312.with_(
        python_version=(3, 14, 0), program_start_method="fork", tf_eager_initialized=True
    )
    d = decide_start_method(facts=facts)
    assert d.method == "fork"
    assert "set_start_method" in d.reason and "TensorFlow" in d.reason


def test_python_default_fixed_implicitly_does_not_count_as_a_request():
    # multiprocessing fixes its context to the default on first use (e.g. a Lock()); that
    # cannot be told apart from set_start_method("fork"), so unsafe fork is still refused.
    facts = LINUX_312.with_(program_start_method="fork", tf_eager_initialized=True)
    assert decide_start_method(facts=facts).method == "forkserver"


def test_program_start_method_read_from_multiprocessing():
    code = (
        "import multiprocessing as mp, compatmp\n"
        "mp.set_start_method('spawn')\n"
        "print(compatmp.decide_start_method().method)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != ENV_VAR}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[-1] == "spawn"


def test_explicit_argument_beats_env_var(monkeypatch):
    monkeypatch.setenv(ENV_VAR, "spawn")
    assert decide_start_method("fork", facts=LINUX_312).method == "fork"


def test_env_var_auto_means_decide(monkeypatch):
    monkeypatch.setenv(ENV_VAR, "auto")
    assert decide_start_method(facts=LINUX_312).method == "fork"


def test_unavailable_request_lists_available_methods():
    with pytest.raises(StartMethodError) as info:
        decide_start_method("fork", facts=WINDOWS)
    msg = str(info.value)
    assert "'fork'" in msg and "windows" in msg and "['spawn', 'thread']" in msg
    assert isinstance(info.value, ValueError)


def test_unavailable_env_var_names_the_variable(monkeypatch):
    monkeypatch.setenv(ENV_VAR, "forkserver")
    with pytest.raises(StartMethodError, match=ENV_VAR):
        decide_start_method(facts=WINDOWS)


@pytest.mark.parametrize("bad", ["Spawn", "process", "", None, 3])
def test_unknown_request_is_rejected_with_the_valid_names(bad):
    with pytest.raises(StartMethodError) as info:
        decide_start_method(bad, facts=LINUX_312)
    assert repr(bad) in str(info.value)
    assert "'forkserver'" in str(info.value)


def test_current_facts_describe_this_process():
    facts = PlatformFacts.current()
    assert facts.os == "linux"
    assert facts.python_version == tuple(sys.version_info[:3])
    assert set(facts.available_methods) == {"fork", "forkserver", "spawn"}
    assert facts.thread_count >= 1
    assert facts.frozen is False


def _run_fresh(code: str) -> list[str]:
    """Run ``code`` in a fresh interpreter (no threads left by other tests) and split stdout."""
    env = {k: v for k, v in os.environ.items() if k != ENV_VAR}
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=True,
    ).stdout.split()


def test_current_counts_native_threads_not_just_python_ones():
    # In a fresh process: in this one, TensorFlow's pools start and stop threads at will.
    code = (
        "import threading, compatmp\n"
        "before = compatmp.PlatformFacts.current().thread_count\n"
        "stop = threading.Event(); t = threading.Thread(target=stop.wait); t.start()\n"
        "f = compatmp.PlatformFacts.current()\n"
        "print(before, f.thread_count, f.other_threads, compatmp.decide_start_method().method)\n"
        "stop.set(); t.join()\n"
    )
    before, after, other, method = _run_fresh(code)
    assert int(after) == int(before) + 1
    assert int(other) >= 1
    assert method in ("forkserver", "spawn")


def test_python_threads_are_a_floor_that_blas_cannot_cancel():
    # threadpoolctl reports a pool's size, not its live threads; a real thread must count.
    facts = LINUX_312.with_(thread_count=2, blas_threads=1, python_threads=2)
    assert facts.other_threads == 1
    assert decide_start_method(facts=facts).method == "forkserver"


def test_thread_started_after_a_fork_is_not_mistaken_for_blas():
    # After fork() the parent's OpenBLAS worker can be gone while threadpoolctl still reports
    # it; a Python thread started then must still rule fork out.
    code = (
        "import numpy, os, threading, multiprocessing as mp, compatmp\n"
        "p = mp.get_context('fork').Process(target=int); p.start(); p.join()\n"
        "stop = threading.Event(); t = threading.Thread(target=stop.wait); t.start()\n"
        "f = compatmp.PlatformFacts.current()\n"
        "print(f.python_threads, f.other_threads, compatmp.decide_start_method().method)\n"
        "stop.set(); t.join()\n"
    )
    python_threads, other, method = _run_fresh(code)
    assert int(python_threads) == 2
    assert int(other) >= 1
    assert method in ("forkserver", "spawn")


def test_fresh_process_with_numpy_decides_fork():
    # A fresh interpreter that imported numpy has an OpenBLAS thread, and must still fork.
    code = (
        "import numpy, compatmp, os; f = compatmp.PlatformFacts.current(); "
        "print(f.thread_count, f.blas_threads, compatmp.decide_start_method().method)"
    )
    out = _run_fresh(code)
    threads, blas, method = int(out[0]), int(out[1]), out[2]
    assert threads - 1 - blas == 0
    assert method == "fork"


def test_diagnose_reports_facts_decision_and_risks():
    report = compatmp.diagnose(MACOS.with_(thread_count=3))
    assert "Decision: spawn" in report
    assert "bpo-33725" in report
    for method in ("fork", "forkserver", "thread"):
        assert f"  {method}" in report
    assert "darwin" in report


def test_diagnose_windows_marks_fork_unavailable():
    report = compatmp.diagnose(WINDOWS)
    assert "Decision: spawn" in report
    fork_line = next(line for line in report.splitlines() if line.strip().startswith("fork "))
    assert "not available" in fork_line


def test_doctor_command_prints_the_report():
    env = {k: v for k, v in __import__("os").environ.items() if k != ENV_VAR}
    proc = subprocess.run(
        [sys.executable, "-m", "compatmp", "doctor"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    assert "Decision: fork" in proc.stdout
    assert "the decision becomes: forkserver" in proc.stdout
    assert "Other methods here:" in proc.stdout
    if os.path.isdir("/dev/shm"):  # the free space and this user's blocks (Linux)
        assert "Shared memory (/dev/shm):" in proc.stdout
