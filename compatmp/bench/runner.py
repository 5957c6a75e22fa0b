"""Fresh-process runner: one configuration per child interpreter, and its workers' memory.

Parent side: :func:`_run_child` writes the configuration as JSON on the command line of a
launcher script (:data:`_LAUNCHER`, a stand-in for a user's training script: spawn workers
re-run it as ``__mp_main__``), runs it in its own session under a timeout, and reads back the
one result line. Child side: :func:`child_main` builds the dataset, warms up once (a short
epoch through a loader), then times one fresh loader, while :class:`_RssSampler` - a sampler
*process* - records the peak memory of the loader's worker processes (psutil).
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from .loaders import _now, _runner
from .workloads import _make_dataset

#: How often the sampler process reads the worker processes' memory (seconds). Workers live for
#: an epoch or more and their RSS plateaus after loading the dataset, so 0.1 s sees the peak;
#: faster sampling would spend a visible share of a shared 2-core machine on /proc reads.
RSS_SAMPLE_INTERVAL = 0.1

#: How long the memory sampler process may take to start or to stop (seconds): it imports
#: psutil and NumPy (~0.3 s idle, a few seconds on a loaded machine).
SAMPLER_START_TIMEOUT = 20.0

#: Longest a single configuration's child process may run (seconds; ``--timeout``). Keras'
#: spawn rows restart TensorFlow-importing workers every epoch (~5-10 s each on 2 busy cores)
#: for a warm-up epoch and 2 timed epochs, plus TensorFlow in the child: ~60 s; 600 s is 10x
#: that, and a hang ends as "timeout" instead of stalling the run.
DEFAULT_CHILD_TIMEOUT = 600.0

#: How long to wait for a killed child's pipes to close after a timeout (seconds).
KILL_GRACE = 10.0

#: Prefix of the one stdout line a child prints with its result.
RESULT_MARKER = "COMPATMP_BENCH_RESULT "

# ---------------------------------------------------------------------------------------------
# Child side: one configuration in a fresh process
# ---------------------------------------------------------------------------------------------


def _loadavg() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (AttributeError, OSError):  # not offered on every OS
        return None


class _RssSampler:
    """Peak memory of this process's worker processes, read by a separate sampler process.

    A process, not a thread: a sampler thread would make this process multi-threaded, which
    changes the very decision ``start_method="auto"`` makes (fork becomes forkserver) and
    risks forking while that thread holds a lock (an import lock held at fork time deadlocked
    a forked worker in the first version of this benchmark). Use as a context manager; the
    peaks are in :attr:`peak_rss`, :attr:`peak_uss` and :attr:`peak_own` (RSS without
    shared-memory pages) in bytes by pid after it exits.
    """

    def __init__(self, interval: float = RSS_SAMPLE_INTERVAL) -> None:
        self.interval = interval
        self.peak_rss: dict[int, int] = {}
        self.peak_uss: dict[int, int] = {}
        self.peak_own: dict[int, int] = {}
        self._dir: tempfile.TemporaryDirectory | None = None
        self._proc: subprocess.Popen | None = None

    def __enter__(self) -> _RssSampler:
        self._dir = tempfile.TemporaryDirectory(prefix="compatmp-bench-rss-")
        base = Path(self._dir.name)
        code = "from compatmp.bench.runner import _sampler_main; _sampler_main()"
        args = [str(os.getpid()), str(self.interval), str(base / "stop"), str(base / "out.json")]
        self._proc = subprocess.Popen(
            [sys.executable, "-c", code, *args], stdin=subprocess.DEVNULL, env=_child_env()
        )
        deadline = _now() + SAMPLER_START_TIMEOUT
        while not (base / "ready").exists() and _now() < deadline:
            if self._proc.poll() is not None:
                break  # it failed to start: no peaks, the benchmark goes on
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._dir is not None and self._proc is not None
        base = Path(self._dir.name)
        (base / "stop").touch()
        try:
            self._proc.wait(timeout=SAMPLER_START_TIMEOUT)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait(timeout=KILL_GRACE)
        with contextlib.suppress(OSError, ValueError):
            data = json.loads((base / "out.json").read_text(encoding="utf-8"))
            self.peak_rss = {int(k): v for k, v in data["rss"].items()}
            self.peak_uss = {int(k): v for k, v in data["uss"].items()}
            self.peak_own = {int(k): v for k, v in data.get("own", {}).items()}
        self._dir.cleanup()


def _sampler_main(argv: list[str] | None = None) -> None:
    """Sampler process: record peak RSS/USS of ``root``'s worker processes until told to stop.

    Args:
        argv (list[str] | None): ``root_pid interval_s stop_path out_path`` (default: None,
            meaning ``sys.argv[1:]``). Stops when ``stop_path`` exists or ``root_pid`` is
            gone; writes ``{"rss": {pid: bytes}, "uss": {pid: bytes}}`` to ``out_path``.
    """
    import psutil

    root_pid, interval, stop_path, out_path = (sys.argv[1:] if argv is None else argv)[:4]
    root = psutil.Process(int(root_pid))
    me = os.getpid()
    rss: dict[int, int] = {}
    uss: dict[int, int] = {}
    own: dict[int, int] = {}  # RSS without shared-memory pages (compatmp's batch blocks)
    Path(out_path).with_name("ready").touch()
    while not os.path.exists(stop_path) and root.is_running():
        try:
            children = root.children(recursive=True)
        except psutil.Error:
            children = []
        for proc in children:
            try:
                if proc.pid == me or _is_helper(proc):
                    continue
                info = proc.memory_full_info()
            except (psutil.Error, OSError):
                continue
            rss[proc.pid] = max(rss.get(proc.pid, 0), info.rss)
            uss[proc.pid] = max(uss.get(proc.pid, 0), getattr(info, "uss", 0))
            own[proc.pid] = max(own.get(proc.pid, 0), info.rss - _rss_shmem(proc.pid))
        time.sleep(float(interval))
    tmp = out_path + ".tmp"
    Path(tmp).write_text(json.dumps({"rss": rss, "uss": uss, "own": own}), encoding="utf-8")
    os.replace(tmp, out_path)


def _rss_shmem(pid: int) -> int:
    """Resident shared-memory pages of ``pid`` in bytes (``RssShmem``, Linux >= 4.5), else 0.

    compatmp's workers hand batches over in shared-memory blocks; those pages count in the
    RSS of the worker *and* of the main process. RSS minus this is the worker's own memory.
    """
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("RssShmem:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _cmdline(proc: Any) -> str:
    import psutil

    try:
        return " ".join(proc.cmdline()) if proc is not None else ""
    except psutil.Error:
        return ""


def _is_helper(proc: Any) -> bool:
    """multiprocessing's forkserver and resource tracker, which are not workers.

    Workers forked by the forkserver share its command line; they are told apart by their
    parent, the forkserver itself.
    """
    cmd = _cmdline(proc)
    if "multiprocessing.resource_tracker" in cmd:
        return True
    if "multiprocessing.forkserver" in cmd:
        return "multiprocessing.forkserver" not in _cmdline(proc.parent())
    return False


def _error_text(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip().splitlines()
    line = text[0] if text else type(exc).__name__
    return line[:300]


def _run_spec(spec: dict[str, Any]) -> dict[str, Any]:
    """Run one configuration as ``spec`` describes; never raises for a loader's failure."""
    if spec["library"] == "keras" and spec["method"] is not None:
        # Keras' Pool comes from the global default context (NOTE [ How Keras 3 runs ... ]).
        multiprocessing.set_start_method(spec["method"], force=True)
    out: dict[str, Any] = {"status": "ok", "error": None, "runs": [], "warmup": None}
    try:
        run = _runner(spec)
        batches = spec["batches"]
        if spec["section"] == "first_batch":
            ds = _make_dataset(spec, batches)
            out["runs"].append(run(ds, 1, True))
            return out
        if spec["warmup"]:
            warm = _make_dataset(spec, min(batches, max(2, 2 * spec["workers"])))
            out["warmup"] = run(warm, 1, False)
        with _RssSampler() as sampler:
            for _ in range(spec["repeats"]):
                ds = _make_dataset(spec, batches)
                result = run(ds, spec["epochs"], False)
                if any(n != len(ds) for n in result["batches"]):
                    raise RuntimeError(
                        f"expected {len(ds)} batches per epoch, got {result['batches']}"
                    )
                out["runs"].append(result)
        out["peak_rss_bytes"] = max(sampler.peak_rss.values(), default=None)
        out["peak_uss_bytes"] = max(sampler.peak_uss.values(), default=None)
        out["peak_own_bytes"] = max(sampler.peak_own.values(), default=None)
        out["worker_pids_seen"] = len(sampler.peak_rss)
    except Exception as exc:
        out["status"] = "fails"
        out["error"] = _error_text(exc)
    return out


def child_main(argv: list[str] | None = None) -> int:
    """Entry point of a benchmark child process: run one configuration, print its result.

    Args:
        argv (list[str] | None): one argument, the configuration as JSON (the parent writes
            it; keys ``section``, ``workload``, ``config``, ``library``, ``method``,
            ``processes``, ``dataset``, ``workers``, ``repeats``, ``batches``, ``epochs``,
            ``warmup``, ``quick``, ``image_size``) (default: None, meaning ``sys.argv[1:]``).

    Returns:
        int: 0; a loader that fails is reported in the result (``"status": "fails"``), and
        the one line starting with :data:`RESULT_MARKER` on stdout holds the JSON result.

    Raises:
        ValueError: ``argv`` is not exactly one JSON object.
    """
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        raise ValueError(f"child_main takes one JSON argument, got {len(argv)}: {argv!r}")
    spec = json.loads(argv[0])
    if not isinstance(spec, dict):
        raise ValueError(f"child_main needs a JSON object, got {type(spec).__name__}")
    start_load = _loadavg()
    started = _now()
    result = _run_spec(spec)
    result["child_wall_s"] = _now() - started
    result["loadavg_start"] = start_load
    result["loadavg_end"] = _loadavg()
    result["tensorflow_in_parent"] = "tensorflow" in sys.modules
    sys.stdout.write(RESULT_MARKER + json.dumps(result) + "\n")
    sys.stdout.flush()
    return 0


# ---------------------------------------------------------------------------------------------
# Parent side: start a child, read its result
# ---------------------------------------------------------------------------------------------

_LAUNCHER = '''"""Stand-in for a user's training script (spawn workers re-run it as __mp_main__)."""
{tf_import}import sys

from compatmp.bench.runner import child_main

if __name__ == "__main__":
    sys.exit(child_main())
'''


def _write_launchers(directory: Path) -> dict[bool, Path]:
    """Launcher scripts: ``{False: plain, True: imports TensorFlow at the top}``."""
    out = {}
    for with_tf in (False, True):
        path = directory / ("train_tf.py" if with_tf else "train.py")
        tf_import = "import tensorflow  # noqa: F401 - as training scripts do\n" if with_tf else ""
        path.write_text(_LAUNCHER.format(tf_import=tf_import), encoding="utf-8")
        out[with_tf] = path
    return out


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("COMPATMP_START_METHOD", None)  # each row names its method; auto must mean auto
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    package_root = str(Path(__file__).resolve().parents[2])  # holds compatmp/
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
    return env


def _kill_tree(proc: subprocess.Popen) -> None:
    """Kill a timed-out child and the workers it started (its own session)."""
    if hasattr(os, "killpg"):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, 9)  # SIGKILL; the child leads its own process group
    proc.kill()


def _run_child(launcher: Path, spec: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Run one configuration in a fresh interpreter; the result dict, or a failure record."""
    cmd = [sys.executable, str(launcher), json.dumps(spec)]
    proc = subprocess.Popen(
        cmd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=_child_env(),
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_tree(proc)
        try:
            proc.communicate(timeout=KILL_GRACE)
        except subprocess.TimeoutExpired:
            pass
        return {"status": "timeout", "error": f"no result within {timeout:.0f} s (killed)"}
    for line in stdout.splitlines():
        if line.startswith(RESULT_MARKER):
            return json.loads(line[len(RESULT_MARKER) :])
    tail = " | ".join(stderr.strip().splitlines()[-3:])[:300]
    return {"status": "error", "error": f"child exited with code {proc.returncode}: {tail}"}
