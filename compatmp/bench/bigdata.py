"""The ``bigdata`` workload: a dataset holding ~1 GB of in-memory arrays (issue 11).

``python -m compatmp bench --workload bigdata [--megabytes 1000] [--workers 1,2,4]
[--methods fork,forkserver,spawn] [--loaders compatmp,keras,torch]`` runs each configuration in
a fresh process (``python -m compatmp.bench.bigdata --child '<spec JSON>'``) and prints a
Markdown table.

NOTE [ The bigdata workload ]
:class:`BigDataDataset` holds ``x``, float32 ``(rows, 256)`` of ``--megabytes`` MiB, and int32
labels; a batch is 256 consecutive rows (256 KiB, built in a :func:`compatmp.empty` array)
starting at ``order[i] * stride``; ``on_epoch_end`` reshuffles ``order``, a 64-element
permutation - the small state change after which compatmp's ``update_dataset`` must not
re-send the big array. Each child builds the dataset, then measures (outside the build):

* ``first batch``: from creating the loader to the first batch (start-up, sending the
  dataset, loading it in the workers);
* ``epoch 1`` / ``epoch 2``: the two epochs, from loader creation and from the end of epoch 1
  (for compatmp, epoch 2 includes ``update_dataset``, also reported alone as ``update``);
* ``1-element resync`` (compatmp): after the epochs, one float32 of ``x`` written in place,
  then ``update_dataset``, three times, the median: the exact re-sync (issue 17's target:
  <= 0.5 s for 512 MiB);
* per-worker RSS and USS (psutil; USS counts only the pages no other process shares, so a
  read-only mapping of the shared dataset is not in it), taken in the middle of each epoch
  (Keras' workers only live during an epoch), the largest;
* ``added``: system memory in use (``total - available``) in the middle of each epoch and
  every 0.1 s, minus the same before the loader was created, the largest. The machine is
  shared, so this is noisy by a few hundred MB; ``PSS added`` is steadier: the summed
  proportional set size of the main process and its workers minus the main's before.

Keras' rows use the same class with ``keras.utils.PyDataset`` mixed in (``model.fit``'s
adapter requires one), driven like ``compatmp.bench.loaders._run_keras``; torch rows a
``DataLoader(persistent_workers=True)``, which never sees ``on_epoch_end``'s changes.
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import threading
import time
from typing import Any

import numpy as np

__all__ = ["BigDataDataset", "main"]

#: Features per row (float32): a row is 1 KiB.
FEATURES = 256
#: Rows per batch: 256 KiB batches, at compatmp's shared-memory threshold.
ROWS_PER_BATCH = 256
#: Batches per epoch, and the length of the permutation ``on_epoch_end`` reshuffles.
N_BATCHES = 64
#: Seconds one child may run before it is killed.
CHILD_TIMEOUT = 900.0
RESULT_MARKER = "BIGDATA_RESULT "


class BigDataDataset:
    """In-memory float32 rows and int32 labels of ``megabytes`` MiB (NOTE above).

    Args:
        megabytes (float): size of ``x`` in MiB.
        n_batches (int): batches per epoch (default: :data:`N_BATCHES`).
        seed (int): seed of the shuffle (default: 0).
    """

    def __init__(self, megabytes: float, n_batches: int = N_BATCHES, seed: int = 0) -> None:
        rows = max(int(megabytes * 2**20) // (FEATURES * 4), n_batches * ROWS_PER_BATCH)
        self.x = np.empty((rows, FEATURES), dtype=np.float32)
        self.x[:] = np.arange(rows, dtype=np.float32)[:, None]  # touch every page
        self.y = (np.arange(rows) % 10).astype(np.int32)
        self.order = np.arange(n_batches)
        self.stride = rows // n_batches
        self._rng = np.random.default_rng(seed)

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        from .. import empty

        start = int(self.order[i]) * self.stride
        out = empty((ROWS_PER_BATCH, FEATURES), np.float32)
        np.multiply(self.x[start : start + ROWS_PER_BATCH], 2.0, out=out)
        return out, self.y[start : start + ROWS_PER_BATCH]

    def on_epoch_end(self) -> None:
        self._rng.shuffle(self.order)


def __getattr__(name: str) -> Any:
    if name == "KerasBigDataDataset":  # built on first use: importing this module is Keras-free
        import keras

        def __init__(self: Any, megabytes: float, workers: int = 1, **kwargs: Any) -> None:
            BigDataDataset.__init__(self, megabytes, **kwargs)
            keras.utils.PyDataset.__init__(
                self, workers=workers, use_multiprocessing=True, max_queue_size=10
            )

        cls = type(
            name,
            (BigDataDataset, keras.utils.PyDataset),
            {"__init__": __init__, "__module__": __name__, "__qualname__": name},
        )
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ---------------------------------------------------------------------------------------------
# Child: one configuration
# ---------------------------------------------------------------------------------------------


def _used() -> int:
    import psutil

    vm = psutil.virtual_memory()
    return vm.total - vm.available


def _workers() -> list[Any]:
    import psutil

    from .runner import _is_helper

    return [p for p in psutil.Process().children(recursive=True) if not _is_helper(p)]


class _Memory:
    """Checkpoints of worker RSS/USS and memory added, plus a 0.1 s sampler of the latter."""

    def __init__(self) -> None:
        import psutil

        self.base_used = _used()
        self.base_pss = psutil.Process().memory_full_info().pss
        self.peak_used = 0
        self.rss: list[int] = []
        self.uss: list[int] = []
        self.pss_added = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(0.1):
            self.peak_used = max(self.peak_used, _used() - self.base_used)

    def checkpoint(self) -> None:
        import psutil

        pss = psutil.Process().memory_full_info().pss
        rss, uss = [], []
        for proc in _workers():
            try:
                info = proc.memory_full_info()
            except psutil.Error:
                continue
            rss.append(info.rss)
            uss.append(info.uss)
            pss += info.pss
        self.rss = max(self.rss, rss, key=lambda v: sum(v))
        self.uss = max(self.uss, uss, key=lambda v: sum(v))
        self.pss_added = max(self.pss_added, pss - self.base_pss)
        self.peak_used = max(self.peak_used, _used() - self.base_used)

    def result(self) -> dict[str, Any]:
        self._stop.set()
        self._thread.join(1.0)
        return {
            "worker_rss": self.rss,
            "worker_uss": self.uss,
            "added": self.peak_used,
            "pss_added": self.pss_added,
        }


def _epochs(make: Any, ds: Any, update: Any, mem: _Memory) -> dict[str, Any]:
    """Two epochs through ``make()``'s iterator; ``update()`` between them (may be None).

    With ``update``, also the exact re-sync after one element of ``x`` is written in place
    (``resync_s``, the median of 3; NOTE [ Shared dataset buffers ] in compatmp._shared_data).
    """
    out: dict[str, Any] = {"update_s": None, "resync_s": None}
    t0 = time.perf_counter()
    loader = make()
    marks = []
    for epoch in range(2):
        if epoch:
            ds.on_epoch_end()
            if update is not None:
                t = time.perf_counter()
                update(loader)
                out["update_s"] = time.perf_counter() - t
        for k, _batch in enumerate(loader.epoch()):
            if epoch == 0 and k == 0:
                out["first_batch_s"] = time.perf_counter() - t0
            if k == len(ds) // 2:
                mem.checkpoint()
            del _batch
        marks.append(time.perf_counter())
    out["epochs_s"] = [marks[0] - t0, marks[1] - marks[0]]
    if update is not None:
        times = []
        for k in range(3):
            ds.x[(k + 1) * len(ds.x) // 4, k] += 1.0  # one float32, in place
            t = time.perf_counter()
            update(loader)
            times.append(time.perf_counter() - t)
        out["resync_s"] = sorted(times)[1]
    loader.close()
    return out


class _CompatmpLoader:
    def __init__(self, ds: Any, workers: int, method: str) -> None:
        from .. import OrderedPool

        self.ds = ds
        self.pool = OrderedPool(ds, workers=workers, start_method=method, max_queue_size=10)

    def epoch(self) -> Any:
        return self.pool.imap(range(len(self.ds)))

    def close(self) -> None:
        self.pool.close()


class _KerasLoader:
    def __init__(self, ds: Any) -> None:
        from keras.src.trainers.data_adapters.py_dataset_adapter import PyDatasetAdapter

        self.adapter = PyDatasetAdapter(ds, shuffle=False)
        self.began = False

    def epoch(self) -> Any:
        if self.began:
            self.adapter.on_epoch_end()
        self.adapter.on_epoch_begin()
        self.began = True
        return self.adapter.get_numpy_iterator()

    def close(self) -> None:
        if self.began:
            self.adapter.on_epoch_end()


class _TorchLoader:
    def __init__(self, ds: Any, workers: int, method: str) -> None:
        from torch.utils.data import DataLoader

        self.loader = DataLoader(
            ds,
            batch_size=None,
            num_workers=workers,
            multiprocessing_context=method,
            persistent_workers=True,
            prefetch_factor=max(2, 10 // workers),
        )

    def epoch(self) -> Any:
        return iter(self.loader)

    def close(self) -> None:
        self.loader._iterator = None  # ends the persistent workers
        gc.collect()


def child(spec: dict[str, Any]) -> dict[str, Any]:
    """Run one configuration (in a fresh process) and return its measurements."""
    library, method, workers = spec["library"], spec["method"], spec["workers"]
    t = time.perf_counter()
    if library == "keras":
        import multiprocessing

        multiprocessing.set_start_method(method, force=True)
        ds = __getattr__("KerasBigDataDataset")(spec["megabytes"], workers=workers)
    else:
        ds = BigDataDataset(spec["megabytes"])
    build_s = time.perf_counter() - t
    gc.collect()
    mem = _Memory()
    if library == "compatmp":
        out = _epochs(
            lambda: _CompatmpLoader(ds, workers, method),
            ds,
            lambda loader: loader.pool.update_dataset(ds),
            mem,
        )
    elif library == "keras":
        out = _epochs(lambda: _KerasLoader(ds), ds, None, mem)
    else:
        out = _epochs(lambda: _TorchLoader(ds, workers, method), ds, None, mem)
    out.update(mem.result())
    out["build_s"] = build_s
    return out


# ---------------------------------------------------------------------------------------------
# Parent: the plan and the table
# ---------------------------------------------------------------------------------------------


def _list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m compatmp bench --workload bigdata",
        description="A dataset holding big in-memory arrays: start-up, memory, re-sync cost.",
    )
    p.add_argument("--workload", choices=["bigdata"], default="bigdata")
    p.add_argument("--megabytes", type=float, default=1000.0, help="size of x in MiB (1000)")
    p.add_argument("--workers", default="1,2,4", help="comma-separated worker counts (1,2,4)")
    p.add_argument(
        "--methods",
        default="fork,forkserver,spawn",
        help="start methods, comma-separated (fork,forkserver,spawn; unavailable ones skipped)",
    )
    p.add_argument(
        "--loaders",
        default="compatmp",
        help="comma-separated subset of compatmp,keras,torch (compatmp); Keras runs fork and "
        "spawn only",
    )
    p.add_argument("--timeout", type=float, default=CHILD_TIMEOUT, help="seconds per child")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    p.add_argument("--child", metavar="SPEC", help=argparse.SUPPRESS)
    return p


def _plan(args: argparse.Namespace) -> list[dict[str, Any]]:
    from .._platform import available_methods

    methods = [m for m in _list(args.methods) if m in available_methods()]
    plan = []
    for library in _list(args.loaders):
        for method in methods:
            if library == "keras" and method == "forkserver":
                continue
            for workers in (int(w) for w in _list(args.workers)):
                plan.append(
                    {
                        "library": library,
                        "method": method,
                        "workers": workers,
                        "megabytes": args.megabytes,
                    }
                )
    return plan


def _run(spec: dict[str, Any], timeout: float) -> dict[str, Any]:
    from .runner import _child_env

    cmd = [sys.executable, "-m", "compatmp.bench.bigdata", "--child", json.dumps(spec)]
    try:
        proc = subprocess.run(
            cmd,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=_child_env(),
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired:
        return {"error": f"no result within {timeout:.0f} s"}
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_MARKER):
            return json.loads(line[len(RESULT_MARKER) :])
    tail = " | ".join(proc.stderr.strip().splitlines()[-3:])[:300]
    return {"error": f"child exited with code {proc.returncode}: {tail}"}


def _mb(n: float | None) -> str:
    return "-" if n is None else f"{n / 1e6:,.0f}"


def _s(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def _table(rows: list[tuple[dict[str, Any], dict[str, Any]]]) -> str:
    head = (
        "| loader | MiB | workers | first batch s | epoch 1 s | epoch 2 s | update s "
        "| 1-element resync s | worker RSS MB (max) | worker USS MB (sum) | added MB "
        "| PSS added MB |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    lines = []
    for spec, r in rows:
        name = f"{spec['library']}-{spec['method']}"
        if "error" in r:
            lines.append(f"| {name} | {spec['megabytes']:.0f} | {spec['workers']} | {r['error']} |")
            continue
        lines.append(
            f"| {name} | {spec['megabytes']:.0f} | {spec['workers']} | {_s(r['first_batch_s'])} "
            f"| {_s(r['epochs_s'][0])} | {_s(r['epochs_s'][1])} | {_s(r['update_s'])} "
            f"| {_s(r.get('resync_s'))} "
            f"| {_mb(max(r['worker_rss'], default=None))} | {_mb(sum(r['worker_uss']))} "
            f"| {_mb(r['added'])} | {_mb(r['pss_added'])} |"
        )
    return head + "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Run the bigdata workload (``python -m compatmp bench --workload bigdata``).

    Args:
        argv (list[str] | None): command-line arguments (default: ``sys.argv[1:]``).

    Returns:
        int: 0 when every configuration reported a result, 1 otherwise.
    """
    args = _parser().parse_args(argv)
    if args.child:
        result = child(json.loads(args.child))
        print(RESULT_MARKER + json.dumps(result), flush=True)
        return 0
    rows = []
    for k, spec in enumerate(_plan(args)):
        print(f"[{k + 1}] {spec}", file=sys.stderr, flush=True)
        result = _run(spec, args.timeout)
        print(f"    {result}", file=sys.stderr, flush=True)
        rows.append((spec, result))
    print(_table(rows))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump([{"spec": s, "result": r} for s, r in rows], f, indent=1)
    return 0 if all("error" not in r for _, r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
