"""``python -m compatmp.bench.calls``: a script's ``fit`` -> ``evaluate`` -> ``predict``.

Issue 18 item 1: each call used to start its own workers (6 spawn worker starts for three
2-worker calls). With workers kept between calls (NOTE [ Reused workers ] in
``compatmp._reuse``) each worker starts once. This measures, per start method and dataset,
in a fresh interpreter per run (so the first call is cold, as in a user's script):

* ``starts``: distinct worker processes seen during the three calls (a sampler thread lists
  this process's children every 20 ms with psutil; multiprocessing's helpers excluded);
* the wall time of each call and of the three (seconds), with ``idle_timeout=0`` (workers
  started and stopped by every call: the behaviour before issue 18) and with the default
  (kept).

Datasets: ``plain`` - a NumPy-only class (``__len__``/``__getitem__``), ``pydataset`` - a
``keras.utils.PyDataset`` subclass defined in this module. 16 batches of 32 x 8 float32 each,
a Dense(1) model, ``fit`` for 2 epochs. Median of ``--repeats`` runs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from typing import Any

__all__ = ["PlainDataset", "main", "run_script"]

N_BATCHES = 16
BATCH = 32
FEATURES = 8


class PlainDataset:
    """``(x, y)`` float32 batches computed from the index; NumPy only."""

    def __len__(self) -> int:
        return N_BATCHES

    def __getitem__(self, i: int) -> Any:
        import numpy as np

        rng = np.random.default_rng(i)
        x = rng.normal(size=(BATCH, FEATURES)).astype("float32")
        return x, x.sum(axis=1, keepdims=True)


_classes: dict[str, type] = {}


def __getattr__(name: str) -> Any:
    """``KerasDataset``: a ``keras.utils.PyDataset`` subclass, built when first asked for
    (so importing this module imports no Keras; a worker unpickling it by reference gets it)."""
    if name != "KerasDataset":
        raise AttributeError(name)
    if name not in _classes:
        import keras

        class KerasDataset(keras.utils.PyDataset):
            """The same batches from a ``keras.utils.PyDataset`` subclass."""

            def __len__(self) -> int:
                return N_BATCHES

            def __getitem__(self, i: int) -> Any:
                return PlainDataset()[i]

        KerasDataset.__module__ = __name__
        KerasDataset.__qualname__ = "KerasDataset"
        _classes[name] = KerasDataset
    return _classes[name]


def _pydataset() -> Any:
    return __getattr__("KerasDataset")()


class _Sampler(threading.Thread):
    """Collects (pid, create time) of this process's worker children until stopped."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.seen: set[tuple[int, float]] = set()
        self.done = threading.Event()

    def run(self) -> None:
        import psutil

        from .runner import _is_helper

        me = psutil.Process()
        while not self.done.wait(0.02):
            for p in me.children(recursive=True):
                try:
                    if not _is_helper(p):
                        self.seen.add((p.pid, p.create_time()))
                except psutil.Error:
                    continue


def run_script(method: str, dataset: str, idle_timeout: float | None) -> dict[str, Any]:
    """Run fit (2 epochs) -> evaluate -> predict once, in this process.

    Args:
        method (str): the start method.
        dataset (str): ``"plain"`` or ``"pydataset"``.
        idle_timeout (float | None): passed to each call (0: no reuse; None: the default).

    Returns:
        dict: ``starts`` (worker processes seen), ``fit``/``evaluate``/``predict``/``total``
        (seconds).
    """
    import keras

    import compatmp

    make = PlainDataset if dataset == "plain" else _pydataset
    model = keras.Sequential([keras.Input((FEATURES,)), keras.layers.Dense(1)])
    model.compile("sgd", "mse")
    loader = {"workers": 2, "start_method": method, "idle_timeout": idle_timeout}
    sampler = _Sampler()
    sampler.start()
    out: dict[str, Any] = {}
    start = time.perf_counter()
    t = start
    compatmp.fit(model, make(), epochs=2, verbose=0, **loader)
    out["fit"] = time.perf_counter() - t
    t = time.perf_counter()
    compatmp.evaluate(model, make(), verbose=0, **loader)
    out["evaluate"] = time.perf_counter() - t
    t = time.perf_counter()
    compatmp.predict(model, make(), verbose=0, **loader)
    out["predict"] = time.perf_counter() - t
    out["total"] = time.perf_counter() - start
    time.sleep(0.1)
    sampler.done.set()
    sampler.join()
    out["starts"] = len(sampler.seen)
    compatmp.shutdown()
    return out


def _child(args: list[str]) -> None:
    method, dataset, idle = args
    result = run_script(method, dataset, None if idle == "default" else float(idle))
    print("RESULT " + json.dumps(result), flush=True)


def main(argv: list[str] | None = None) -> int:
    """Run every (start method, dataset, reuse) combination ``--repeats`` times.

    Args:
        argv (list[str] | None): command-line arguments (default: ``sys.argv[1:]``).

    Returns:
        int: 0 when every run reported a result, else 1.
    """
    parser = argparse.ArgumentParser(prog="python -m compatmp.bench.calls")
    parser.add_argument("--methods", default="spawn,forkserver")
    parser.add_argument("--datasets", default="plain,pydataset")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per run")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    status = 0
    print(
        "| method | dataset | workers kept | worker starts | fit s | evaluate s | predict s "
        "| total s |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for method in args.methods.split(","):
        for dataset in args.datasets.split(","):
            for idle in ("0", "default"):
                runs = []
                for _ in range(args.repeats):
                    cmd = [
                        sys.executable,
                        "-m",
                        "compatmp.bench.calls",
                        "--child",
                        method,
                        dataset,
                        idle,
                    ]
                    try:
                        proc = subprocess.run(
                            cmd, capture_output=True, text=True, env=env, timeout=args.timeout
                        )
                    except subprocess.TimeoutExpired:
                        status = 1
                        continue
                    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
                    if not lines:
                        status = 1
                        print(proc.stderr[-2000:], file=sys.stderr)
                        continue
                    runs.append(json.loads(lines[-1][7:]))
                if not runs:
                    continue

                def med(key: str, runs: list = runs) -> str:
                    return f"{statistics.median(r[key] for r in runs):.2f}"

                starts = "/".join(str(r["starts"]) for r in runs)
                kept = "no (idle_timeout=0)" if idle == "0" else "yes (default)"
                print(
                    f"| {method} | {dataset} | {kept} | {starts} | {med('fit')} | "
                    f"{med('evaluate')} | {med('predict')} | {med('total')} |",
                    flush=True,
                )
    return status


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        _child(sys.argv[2:])
    else:
        sys.exit(main())
