"""``python -m compatmp.bench.latency``: how quickly a dead, stuck or slow worker is noticed.

Unit tests assert only "no hang" bounds (30 s and more), so that load on a shared CI machine
cannot fail them (issue 12 item 6); the latencies themselves are measured here, per start
method, over ``--repeats`` runs (median and max, seconds):

* ``crash``: a worker computing a batch is SIGKILLed while the consumer waits for that batch;
  from the kill until :class:`compatmp.WorkerCrashedError` reaches the consumer (detection
  through the worker's sentinel, then the pool's shutdown).
* ``timeout``: a worker stuck in ``dataset[i]``, ``timeout=1``; from the consumer asking for
  the batch until :class:`compatmp.WorkerTimeoutError` reaches it, minus the 1 s (polling
  granularity, then ``close()``: the 1 s grace and SIGTERM of the stuck worker).
* ``stall``: a worker stuck for 4 s, ``stall_timeout=1``; from the consumer asking until the
  stall warning is logged, minus the 1 s (polling granularity and the SIGUSR1 stack dump).

The datasets live in this module so that spawn and forkserver workers can import them.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import statistics
import sys
import threading
import time
from typing import Any

__all__ = ["StuckDataset", "main", "measure"]

_LIMIT = 1.0  # timeout= and stall_timeout= of the runs (seconds)


class StuckDataset:
    """``dataset[0]`` returns the worker's pid at once; ``dataset[1]`` sleeps ``seconds``.

    Args:
        seconds (float): how long index 1 blocks.
    """

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def __len__(self) -> int:
        return 2

    def __getitem__(self, i: int) -> int:
        if i == 1:
            time.sleep(self.seconds)
        return os.getpid()


def _crash(method: str) -> float:
    from compatmp import OrderedPool, WorkerCrashedError

    with OrderedPool(StuckDataset(60), workers=1, start_method=method) as pool:
        it = pool.imap(range(2))
        pid = next(it)
        killed: list[float] = []

        def kill() -> None:
            killed.append(time.monotonic())
            os.kill(pid, signal.SIGKILL)

        timer = threading.Timer(0.3, kill)  # the consumer waits inside next() by then
        timer.start()
        try:
            next(it)
        except WorkerCrashedError:
            return time.monotonic() - killed[0]
        finally:
            timer.cancel()
    raise RuntimeError("the killed worker was not reported")


def _timeout(method: str) -> float:
    from compatmp import OrderedPool, WorkerTimeoutError

    with OrderedPool(StuckDataset(60), workers=1, start_method=method, timeout=_LIMIT) as pool:
        it = pool.imap(range(2))
        next(it)
        asked = time.monotonic()
        try:
            next(it)
        except WorkerTimeoutError:
            return time.monotonic() - asked - _LIMIT
    raise RuntimeError("the stuck worker did not time out")


class _When(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.times: list[float] = []

    def emit(self, record: logging.LogRecord) -> None:
        if "no batch for" in record.getMessage():
            self.times.append(time.monotonic())


def _stall(method: str) -> float:
    from compatmp import OrderedPool

    logger = logging.getLogger("compatmp")
    handler = _When()
    logger.addHandler(handler)
    try:
        with OrderedPool(
            StuckDataset(4), workers=1, start_method=method, stall_timeout=_LIMIT
        ) as pool:
            it = pool.imap(range(2))
            next(it)
            asked = time.monotonic()
            next(it)
    finally:
        logger.removeHandler(handler)
    if not handler.times:
        raise RuntimeError("no stall warning was logged")
    return handler.times[0] - asked - _LIMIT


_KINDS = {"crash": _crash, "timeout": _timeout, "stall": _stall}


def measure(methods: list[str], repeats: int) -> dict[tuple[str, str], list[float]]:
    """Run every kind of measurement ``repeats`` times per start method.

    Args:
        methods (list[str]): start methods (``"fork"``, ``"forkserver"``, ``"spawn"``).
        repeats (int): runs per (kind, method), >= 1.

    Returns:
        dict[tuple[str, str], list[float]]: ``(kind, method) -> latencies`` in seconds.
    """
    out: dict[tuple[str, str], list[float]] = {}
    for _ in range(repeats):
        for kind, run in _KINDS.items():
            for method in methods:
                out.setdefault((kind, method), []).append(run(method))
    return out


def main(argv: list[str] | None = None) -> int:
    """Measure and print a Markdown table (median and max per kind and start method).

    Args:
        argv (list[str] | None): ``--repeats N`` (default 3), ``--methods m ...`` (default:
            every process start method available here).

    Returns:
        int: 0.
    """
    from compatmp import available_methods

    parser = argparse.ArgumentParser(prog="python -m compatmp.bench.latency")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--methods", nargs="+", default=available_methods())
    args = parser.parse_args(argv)
    logging.getLogger("compatmp").setLevel(logging.WARNING)
    logging.getLogger("compatmp").propagate = False  # the stacks would flood the output
    results = measure(args.methods, max(1, args.repeats))
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    rows: list[Any] = [
        f"Detection latency, seconds ({args.repeats} runs; load average {load:.1f})",
        "",
        "| kind | method | median | max |",
        "|---|---|---|---|",
    ]
    for (kind, method), values in results.items():
        rows.append(f"| {kind} | {method} | {statistics.median(values):.2f} | {max(values):.2f} |")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
