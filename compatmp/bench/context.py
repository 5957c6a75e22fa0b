"""``python -m compatmp.bench.context``: compatmp's multiprocessing context, costed (issue 19).

Two tables, each configuration in a fresh Python process (``--child``), ``--repeats`` rounds,
medians:

* ``dataloader``: torch's ``DataLoader`` (``num_workers=2``, ``persistent_workers=True``)
  over :class:`TensorDataset` with ``multiprocessing_context=compatmp.get_context(method)``
  against torch's own context for the same method (``multiprocessing_context=method``), for
  spawn and fork. Columns: time to the first batch (from ``iter(loader)``), the per-batch
  cost over the rest of two epochs (seconds / batch), and the workers' RSS after the second
  epoch (MB, median of the workers; persistent workers are still alive then).
* ``executor``: one task round trip through ``ProcessPoolExecutor.map`` (``chunksize=1``,
  two workers, after a warm-up map that starts them): a module-level function and a lambda
  (a closure), with a small argument and with a 1 MiB NumPy array, for the stdlib's context,
  compatmp's, loky's ``ProcessPoolExecutor`` (cloudpickle, its own start method) and
  ``multiprocess``'s ``Pool.map`` (dill; it has no executor). A cell is "fails" when the
  library cannot send that task (the stdlib's pickle and a lambda).

The datasets and task functions live in this module so that workers import them by name.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any

__all__ = ["TensorDataset", "main"]

#: Samples per batch and batches per epoch of the DataLoader rows.
BATCH_SIZE = 32
BATCHES = 24
#: Tasks timed per executor row, and the size of the array argument (bytes).
TASKS = 400
ARRAY_BYTES = 1 << 20
CHILD_TIMEOUT = 600.0
RESULT_MARKER = "CONTEXT_BENCH "


class TensorDataset:
    """Map-style dataset: sample ``i`` is a 3x64x64 float32 image computed from ``i``.

    A little NumPy work per sample (about what a light augmentation costs), returned as a
    torch tensor, so that batches go back through torch's shared-memory reducers.
    """

    def __init__(self, n: int = BATCH_SIZE * BATCHES) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> Any:
        import numpy as np
        import torch

        rng = np.random.default_rng(i)
        img = rng.random((3, 64, 64), dtype=np.float32)
        img = (img - img.mean()) / (img.std() + 1e-6)
        return torch.from_numpy(img)


def square(x: Any) -> Any:
    """A module-level task (pickled by reference everywhere)."""
    return x * x if not hasattr(x, "shape") else x


# ---------------------------------------------------------------------------------------------
# Children
# ---------------------------------------------------------------------------------------------


def _rss_mb(pids: list[int]) -> float | None:
    import psutil

    values = []
    for pid in pids:
        try:
            values.append(psutil.Process(pid).memory_info().rss / 1e6)
        except psutil.Error:
            continue
    return statistics.median(values) if values else None


def _dataloader_child(spec: dict[str, Any]) -> dict[str, Any]:
    import torch  # noqa: F401 - imported before timing, as in a training script
    from torch.utils.data import DataLoader

    import compatmp
    from compatmp.bench import context as this  # by its name, not __main__'s

    method = spec["method"]
    ctx = compatmp.get_context(method) if spec["context"] == "compatmp" else method
    loader = DataLoader(
        this.TensorDataset(),
        batch_size=BATCH_SIZE,
        num_workers=2,
        persistent_workers=True,
        multiprocessing_context=ctx,
    )
    start = time.perf_counter()
    first = None
    batches = 0
    rss = None
    try:
        for _epoch in range(2):
            for _batch in loader:
                batches += 1
                if first is None:
                    first = time.perf_counter() - start
                    after_first = time.perf_counter()
        total = time.perf_counter() - after_first
        rss = _rss_mb([w.pid for w in loader._iterator._workers])
    finally:
        iterator = getattr(loader, "_iterator", None)
        if iterator is not None:
            iterator._shutdown_workers()
    return {"first_batch_s": first, "per_batch_s": total / (batches - 1), "worker_rss_mb": rss}


def _executor(library: str, method: str) -> Any:
    if library == "stdlib":
        import concurrent.futures
        import multiprocessing

        ctx = multiprocessing.get_context(method)
        return concurrent.futures.ProcessPoolExecutor(2, mp_context=ctx)
    if library == "compatmp":
        import concurrent.futures

        import compatmp

        return concurrent.futures.ProcessPoolExecutor(2, mp_context=compatmp.get_context(method))
    if library == "loky":
        try:
            import loky
        except ImportError:
            from joblib.externals import loky
        return loky.ProcessPoolExecutor(2)  # loky's own start method (spawn-like, loky_init)
    if library == "multiprocess":
        # multiprocess (dill) has no ProcessPoolExecutor, and the stdlib's pickles its call
        # queue with the stdlib's pickle whatever the context: its own Pool is the
        # equivalent (Pool.map with chunksize=1, like Executor.map).
        import multiprocess

        return multiprocess.get_context(method).Pool(2)
    raise ValueError(library)


def _executor_child(spec: dict[str, Any]) -> dict[str, Any]:
    import numpy as np

    from compatmp.bench import context as this  # by its name, not __main__'s

    square = this.square
    offset = 1
    tasks = {
        "function, int": (square, list(range(TASKS))),
        "lambda, int": (lambda x: x + offset, list(range(TASKS))),
        "function, 1 MiB": (square, [np.ones(ARRAY_BYTES // 8)] * (TASKS // 4)),
        "lambda, 1 MiB": (lambda x: x, [np.ones(ARRAY_BYTES // 8)] * (TASKS // 4)),
    }
    out: dict[str, Any] = {}
    with _executor(spec["library"], spec["method"]) as ex:
        list(ex.map(square, range(8), chunksize=1))  # start the workers
        for name, (fn, args) in tasks.items():
            start = time.perf_counter()
            try:
                list(ex.map(fn, args, chunksize=1))
            except Exception as exc:  # the stdlib's pickle and a lambda
                out[name] = f"fails: {type(exc).__name__}"
                continue
            out[name] = (time.perf_counter() - start) / len(args)
    return out


def child(spec: dict[str, Any]) -> dict[str, Any]:
    """Run one configuration in this (fresh) process and return its numbers."""
    if spec["table"] == "dataloader":
        return _dataloader_child(spec)
    return _executor_child(spec)


# ---------------------------------------------------------------------------------------------
# Parent
# ---------------------------------------------------------------------------------------------


def _plan(methods: list[str]) -> list[dict[str, Any]]:
    plan = []
    for method in methods:
        for context in ("torch", "compatmp"):
            plan.append({"table": "dataloader", "method": method, "context": context})
    for method in methods:
        for library in ("stdlib", "compatmp", "multiprocess"):
            plan.append({"table": "executor", "method": method, "library": library})
    plan.append({"table": "executor", "method": "loky", "library": "loky"})
    return plan


def _run(spec: dict[str, Any]) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, "-m", "compatmp.bench.context", "--child", json.dumps(spec)],
        capture_output=True,
        text=True,
        timeout=CHILD_TIMEOUT,
    )
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_MARKER):
            return json.loads(line[len(RESULT_MARKER) :])
    return {"error": (proc.stderr or proc.stdout)[-400:]}


def _median(values: list[Any]) -> Any:
    numbers = [v for v in values if isinstance(v, (int, float))]
    if numbers:
        return statistics.median(numbers)
    return values[0] if values else None


def _cell(value: Any, scale: float, unit: str) -> str:
    if isinstance(value, (int, float)):
        return f"{value * scale:.2f} {unit}"
    return str(value)


def _tables(rows: list[tuple[dict[str, Any], dict[str, Any]]]) -> str:
    lines = [
        "| DataLoader | method | first batch | per batch | worker RSS |",
        "|---|---|---|---|---|",
    ]
    for spec, res in rows:
        if spec["table"] != "dataloader":
            continue
        name = "compatmp.get_context()" if spec["context"] == "compatmp" else "torch's own"
        lines.append(
            f"| {name} | {spec['method']} | {_cell(res.get('first_batch_s'), 1, 's')} | "
            f"{_cell(res.get('per_batch_s'), 1e3, 'ms')} | "
            f"{_cell(res.get('worker_rss_mb'), 1, 'MB')} |"
        )
    names = ["function, int", "lambda, int", "function, 1 MiB", "lambda, 1 MiB"]
    lines += [
        "",
        "| ProcessPoolExecutor | method | " + " | ".join(names) + " |",
        "|---|---|" + "---|" * len(names),
    ]
    for spec, res in rows:
        if spec["table"] != "executor":
            continue
        cells = " | ".join(_cell(res.get(n), 1e6, "us") for n in names)
        lines.append(f"| {spec['library']} | {spec['method']} | {cells} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Measure and print the two tables; 1 if a configuration failed outright."""
    parser = argparse.ArgumentParser(prog="python -m compatmp.bench.context")
    parser.add_argument("--methods", default="spawn,fork", help="comma-separated start methods")
    parser.add_argument("--repeats", type=int, default=3, help="rounds (default: 3)")
    parser.add_argument("--json", help="write the raw results here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(RESULT_MARKER + json.dumps(child(json.loads(args.child))), flush=True)
        return 0
    methods = [m for m in args.methods.split(",") if m]
    plan = _plan(methods)
    results: list[list[dict[str, Any]]] = [[] for _ in plan]
    for _round in range(args.repeats):
        for i, spec in enumerate(plan):
            results[i].append(_run(spec))
    rows = []
    failed = False
    for spec, runs in zip(plan, results, strict=True):
        keys = {k for r in runs for k in r}
        failed |= "error" in keys
        rows.append((spec, {k: _median([r.get(k) for r in runs]) for k in keys}))
    print(f"load average: {os.getloadavg() if hasattr(os, 'getloadavg') else 'n/a'}")
    print(_tables(rows))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"plan": plan, "runs": results}, f, indent=1)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
