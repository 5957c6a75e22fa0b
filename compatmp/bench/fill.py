"""``python -m compatmp.bench.fill``: big batches filled in place, threads against processes.

The ``bigbatch`` workload spends ~4 ms per batch computing, which hides the fixed cost of
moving a 19 MB batch. Here the dataset does almost nothing: each batch is a
:func:`compatmp.empty` array of 32x224x224x3 float32 (19.3 MB) filled with ``x[...] = i``
(~0.5 ms), plus a small label array, so what is timed is the loader itself: block reuse,
mapping, page faults, messages and leases (issue 18 item 3; target: processes within 1.3x
of threads).

Every (round, start method) runs in a fresh Python process (``--child``), so that threads
do not find the heap a previous run left behind and no run inherits another's workers; the
rounds interleave the start methods, so a burst of load from other programs hits all of
them alike. One child builds one :class:`compatmp.OrderedPool` (2 workers, queue depth 10,
as the benchmark's other workloads), loads 2 batches (start-up), then times two epochs of
``--batches`` batches. The consumer checks two values of every batch and drops it.

Per epoch it reports wall milliseconds per batch, the main process's CPU milliseconds per
batch, and ``new blocks``: shared-memory blocks the workers created during the epoch (block
names the main process had not seen before; creating and first touching a 19 MB block costs
~15 ms here, refilling a mapped one ~0.5 ms). The first epoch of a fresh pool must create its
pipeline's blocks, as a fresh thread process must fault in its first buffers; later epochs
should create none (NOTE [ Shared-memory ownership ] in ``compatmp._batch_blocks``).
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

import numpy as np

__all__ = ["FillDataset", "main", "measure", "run_one"]

#: One batch: 32 x 224 x 224 x 3 float32 = 19.3 MB (the ``bigbatch`` workload's shape).
SHAPE = (32, 224, 224, 3)

#: ``--quick``: a shape just above the shared-memory threshold (CI smoke runs, no timing value).
QUICK_SHAPE = (32, 32, 32, 3)

#: Workers and queue depth of every run (the benchmark's other workloads use the same).
WORKERS = 2
QUEUE_DEPTH = 10

#: Seconds a child may take before it is killed (a run takes ~2-10 s).
CHILD_TIMEOUT = 300.0


class FillDataset:
    """``dataset[i]`` is ``(x, y)``: ``x`` a :func:`compatmp.empty` float32 array filled with
    ``i``, ``y`` an int64 array of 32 ``i``.

    Args:
        n (int): batches.
        shape (tuple[int, ...]): the shape of ``x`` (default: :data:`SHAPE`, 19.3 MB).
    """

    def __init__(self, n: int, shape: tuple[int, ...] = SHAPE) -> None:
        self.n = int(n)
        self.shape = tuple(shape)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        from compatmp import empty

        x = empty(self.shape, np.float32)
        x[...] = i
        return x, np.full((32,), i, np.int64)


def run_one(
    method: str, batches: int, shape: tuple[int, ...] = SHAPE, epochs: int = 2
) -> dict[str, Any]:
    """Time ``epochs`` epochs of :class:`FillDataset` through one pool, in this process.

    Args:
        method (str): start method (``"thread"``, ``"fork"``, ``"forkserver"``, ``"spawn"``).
        batches (int): batches per epoch, >= 1.
        shape (tuple[int, ...]): the batch's big array shape.
        epochs (int): epochs timed (default: 2).

    Returns:
        dict: ``method``, and ``epochs``: per epoch ``ms`` (wall milliseconds per batch),
        ``cpu_ms`` (main process CPU milliseconds per batch) and ``new_blocks`` (blocks first
        seen in that epoch; always 0 for threads).

    Raises:
        AssertionError: a batch did not hold its own values (the loader returned a wrong or
            overwritten batch).
    """
    from compatmp import OrderedPool, _batch_blocks

    ds = FillDataset(batches + 2, shape)
    seen: set[str] = set()
    timed = []
    with OrderedPool(
        ds, workers=WORKERS, start_method=method, max_queue_size=QUEUE_DEPTH, seed=0
    ) as pool:
        core = pool._core
        view = core.attachments.view

        def counting_view(encoded: Any, key: Any) -> Any:
            seen.update(_batch_blocks.names(encoded))
            return view(encoded, key)

        core.attachments.view = counting_view  # type: ignore[method-assign]
        for x, _ in pool.imap(range(2)):  # start-up: workers running, 2 batches through
            del x
        for _epoch in range(epochs):
            before = len(seen)
            t0, c0 = time.perf_counter(), time.process_time()
            for i, (x, y) in enumerate(pool.imap(range(2, batches + 2))):
                assert x.flat[0] == i + 2 and x.flat[-1] == i + 2 and y[0] == i + 2, i
                del x, y
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            timed.append(
                {
                    "ms": wall / batches * 1e3,
                    "cpu_ms": cpu / batches * 1e3,
                    "new_blocks": len(seen) - before,
                }
            )
    return {"method": method, "epochs": timed}


def measure(
    methods: list[str], rounds: int, batches: int, shape: tuple[int, ...] = SHAPE
) -> list[dict[str, Any]]:
    """Run every start method ``rounds`` times, interleaved, each run in a fresh process.

    Args:
        methods (list[str]): start methods, ``"thread"`` included for the baseline.
        rounds (int): runs per method, >= 1.
        batches (int): batches per epoch.
        shape (tuple[int, ...]): the batch's big array shape.

    Returns:
        list[dict]: one :func:`run_one` result per run, with ``round`` and ``load`` (the
        1-minute load average when it ended) added.

    Raises:
        RuntimeError: a child failed or took longer than :data:`CHILD_TIMEOUT` seconds.
    """
    out = []
    for r in range(rounds):
        for method in methods:
            spec = json.dumps({"method": method, "batches": batches, "shape": list(shape)})
            cmd = [sys.executable, "-m", "compatmp.bench.fill", "--child", spec]
            proc = subprocess.run(
                cmd, capture_output=True, text=True, timeout=CHILD_TIMEOUT, check=False
            )
            if proc.returncode != 0:
                raise RuntimeError(
                    f"fill benchmark child for {method!r} exited with {proc.returncode}:\n"
                    f"{proc.stderr[-2000:]}"
                )
            result = json.loads(proc.stdout.strip().splitlines()[-1])
            result["round"] = r
            result["load"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
            out.append(result)
    return out


def _table(results: list[dict[str, Any]], methods: list[str]) -> str:
    def med(method: str, epoch: int, key: str) -> float:
        return statistics.median(r["epochs"][epoch][key] for r in results if r["method"] == method)

    loads = [r["load"] for r in results if r["load"] is not None]
    rows = [
        f"Big batches filled in place: {len(results) // len(methods)} rounds, median per "
        f"method; load average {min(loads):.1f}-{max(loads):.1f}"
        if loads
        else "",
        "",
        "| method | epoch 1 ms/batch | x threads | epoch 2 ms/batch | x threads "
        "| main CPU ms/batch (ep. 2) | new blocks (ep. 1 / ep. 2) |",
        "|---|---|---|---|---|---|---|",
    ]
    base = [med("thread", e, "ms") if "thread" in methods else float("nan") for e in (0, 1)]
    for m in methods:
        e1, e2 = med(m, 0, "ms"), med(m, 1, "ms")
        rows.append(
            f"| {m} | {e1:.2f} | {e1 / base[0]:.2f} | {e2:.2f} | {e2 / base[1]:.2f} "
            f"| {med(m, 1, 'cpu_ms'):.2f} | {med(m, 0, 'new_blocks'):.0f} / "
            f"{med(m, 1, 'new_blocks'):.0f} |"
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    """Measure and print a Markdown table (and each run's numbers with ``--raw``).

    Args:
        argv (list[str] | None): ``--rounds N`` (default 5), ``--batches N`` (default 100),
            ``--methods m ...`` (default: ``thread`` and every process start method here),
            ``--quick`` (3 batches of a small shape, one round: a smoke run), ``--raw``.

    Returns:
        int: 0.
    """
    parser = argparse.ArgumentParser(prog="python -m compatmp.bench.fill")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batches", type=int, default=100)
    parser.add_argument("--methods", nargs="+", default=None)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--raw", action="store_true")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        spec = json.loads(args.child)
        result = run_one(spec["method"], spec["batches"], tuple(spec["shape"]))
        print(json.dumps(result))
        return 0
    from compatmp import available_methods

    methods = args.methods or ["thread", *available_methods()]
    rounds, batches, shape = max(1, args.rounds), max(1, args.batches), SHAPE
    if args.quick:
        rounds, batches, shape = 1, 3, QUICK_SHAPE
    results = measure(methods, rounds, batches, shape)
    print(_table(results, methods))
    if args.raw:
        print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
