"""The benchmark's command line: which configurations run, in which order, and the report.

Every configuration runs in its own fresh Python process, so no loader inherits another's
imports, forkserver or leaked workers; the parent only starts children and compares::

    parent: main()                                 child: python <launcher.py> '<spec JSON>'
      for each round (--repeats, default 3)          (launcher.py stands in for a user's
        for each workload (gil, bigbatch, images)     training script; for the first-batch
          for each section (loader, fit, lock)        runs it does `import tensorflow` at
            for each configuration  -- spec -->       the top, as such scripts do)
              (subprocess, own session, timeout)   child_main(): build the dataset, warm up
                                                   once (a short epoch through a loader),
                                   <-- one JSON --  then time one fresh loader for two
                                       line         epochs; a sampler *process* records the
      per-round ratios to that round's serial row;  worker processes' peak RSS (psutil)
      medians; Markdown table, JSON, PNG, verdicts

Sections: ``loader`` iterates batches through each loader with nothing else running;
``fit`` drives ``model.fit`` (a trivial model) through Keras' workers and through
:func:`compatmp.fit`; ``lock`` shows which loaders can ship a dataset that holds a
``threading.Lock`` to ``spawn`` workers (one round); ``first_batch`` times the first batch
of the first loader in a fresh process whose script imported TensorFlow at the top (one
discarded warm-up process, then one process per round).
(NOTE [ Timing on a shared machine ] in ``report.py`` says why rounds.)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from .report import (
    _add_ratios,
    _Config,
    _evaluate_targets,
    _merge_rounds,
    _plot,
    _render,
    _summarize,
)
from .runner import DEFAULT_CHILD_TIMEOUT, _loadavg, _run_child, _write_launchers
from .workloads import (
    DEFAULT_BATCHES,
    IMAGES_DEFAULT_SIZE,
    QUICK_BATCHES,
    QUICK_IMAGE_SIZE,
    WORKLOADS,
)

#: Batches of the ``lock`` section's runs: enough for every worker to load a few.
LOCK_BATCHES = 8

#: Epochs per lifecycle: the second one shows whether workers persist (no restart cost).
EPOCHS = 2

SECTIONS = ("loader", "fit", "lock", "first_batch")

# ---------------------------------------------------------------------------------------------
# Configurations
# ---------------------------------------------------------------------------------------------


def _installed(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def _configs(section: str, workload: str, methods: list[str], have: dict[str, bool]) -> list:
    """The configurations of one section, in table order."""
    c = _Config
    rows: list[_Config] = []
    keras_mp = [m for m in ("fork", "spawn") if m in methods]
    if section == "loader":
        rows.append(c(section, "serial", "serial", None, False))
        if have["keras"]:
            rows.append(c(section, "keras-threads", "keras", None, False))
            rows += [c(section, f"keras-mp-{m}", "keras", m, True) for m in keras_mp]
        if have["torch"]:
            rows += [c(section, f"torch-{m}", "torch", m, True) for m in keras_mp]
        rows += [c(section, f"compatmp-{m}", "compatmp", m, True) for m in methods]
        rows.append(c(section, "compatmp-thread", "compatmp", "thread", False))
        rows.append(c(section, "compatmp-auto", "compatmp", "auto", True))
        if have.get("ray") and workload in ("gil", "bigbatch"):
            # Workers as Ray actors on a local Ray the pool starts: its first batch includes
            # starting Ray (NOTE [ Ray workers ] in compatmp/_ray.py).
            rows.append(c(section, "compatmp-ray", "compatmp", "ray", True))
    elif section == "fit" and have["keras"]:
        rows.append(c(section, "fit-serial", "serial", None, False))
        rows.append(c(section, "fit-keras-threads", "keras", None, False))
        rows += [c(section, f"fit-keras-mp-{m}", "keras", m, True) for m in keras_mp]
        rows.append(c(section, "fit-compatmp-auto", "compatmp", "auto", True))
        if workload != "images":  # the demo's dataset has no plain (non-Keras) class
            rows.append(c(section, "fit-compatmp-auto-plain", "compatmp", "auto", True))
        if "spawn" in methods:
            rows.append(c(section, "fit-compatmp-spawn", "compatmp", "spawn", True))
        rows.append(c(section, "fit-compatmp-thread", "compatmp", "thread", False))
    elif section == "lock" and workload in ("gil", "images"):
        if have["keras"]:
            rows += [c(section, f"lock-keras-mp-{m}", "keras", m, True) for m in keras_mp]
        if have["torch"] and "spawn" in methods:
            rows.append(c(section, "lock-torch-spawn", "torch", "spawn", True))
        if "spawn" in methods:
            rows.append(c(section, "lock-compatmp-spawn", "compatmp", "spawn", True))
        rows.append(c(section, "lock-compatmp-auto", "compatmp", "auto", True))
    elif section == "first_batch" and workload == "gil":
        spawnlike = [m for m in ("spawn", "forkserver") if m in methods]
        rows += [c(section, f"first-compatmp-{m}", "compatmp", m, True) for m in spawnlike]
        rows.append(c(section, "first-compatmp-auto", "compatmp", "auto", True))
        if have["keras"]:
            rows += [
                c(section, f"first-compatmp-{m}-pydataset", "compatmp", m, True) for m in spawnlike
            ]
            rows += [
                c(section, f"first-compatmp-{m}-pydataset-script", "compatmp", m, True)
                for m in spawnlike
            ]
            if "spawn" in methods:
                rows.append(c(section, "first-keras-mp-spawn", "keras", "spawn", True))
        if have["torch"] and "spawn" in methods:
            rows.append(c(section, "first-torch-spawn", "torch", "spawn", True))
    return rows


def _dataset_class_name(cfg: _Config, workload: str) -> str:
    """Which dataset class a configuration gets (see NOTE [ Benchmark datasets ])."""
    if cfg.name.endswith("-pydataset-script"):
        return "ScriptKerasGilDataset"
    keras_class = cfg.library == "keras" or cfg.name.endswith("-pydataset")
    keras_class |= cfg.section == "fit" and not cfg.name.endswith("-plain")
    if workload == "images":
        if cfg.section != "lock" and cfg.method == "spawn" and cfg.library in ("keras", "torch"):
            return "PicklableDigitsDataset"
        return "DigitsDataset"
    base = {"gil": "GilDataset", "bigbatch": "BigBatchDataset"}[workload]
    if cfg.section == "lock":
        base = "LockedGilDataset"
    return f"Keras{base}" if keras_class else base


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m compatmp bench",
        description=(
            "Benchmark compatmp against Keras' PyDataset workers and torch's DataLoader. Each "
            "configuration runs in a fresh process; prints a Markdown table."
        ),
    )
    p.add_argument(
        "--workload",
        choices=[*WORKLOADS, "bigdata", "all"],
        default="all",
        help="bigdata has its own options: --workload bigdata --help (all: the others)",
    )
    p.add_argument("--workers", type=_positive_int, default=2, help="workers per loader (2)")
    p.add_argument(
        "--repeats",
        type=_positive_int,
        default=3,
        help="rounds: fresh timed processes per configuration, interleaved (3)",
    )
    p.add_argument(
        "--batches",
        type=_positive_int,
        default=None,
        help=f"batches per epoch (default per workload: {DEFAULT_BATCHES})",
    )
    p.add_argument(
        "--sections",
        default=",".join(SECTIONS),
        help=f"comma-separated subset of {','.join(SECTIONS)} (default: all)",
    )
    p.add_argument(
        "--configs",
        default=None,
        help="comma-separated configuration names to run (default: all; serial rows always run)",
    )
    p.add_argument(
        "--image-size",
        type=_positive_int,
        default=None,
        help=f"image side for the images workload, pixels ({IMAGES_DEFAULT_SIZE})",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help=f"smoke run: {QUICK_BATCHES} batches, 1 repeat, tiny arrays (no timing value)",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_CHILD_TIMEOUT,
        help=f"seconds one configuration may run before it is killed ({DEFAULT_CHILD_TIMEOUT:.0f})",
    )
    p.add_argument("--json", metavar="PATH", help="also write the full results as JSON")
    p.add_argument("--plot", metavar="PATH", help="also write a PNG bar chart (needs matplotlib)")
    return p


def _versions() -> dict[str, str | None]:
    from importlib import metadata

    out: dict[str, str | None] = {}
    for dist in ("numpy", "keras", "tensorflow-cpu", "tensorflow", "torch", "pillow"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark suite (``python -m compatmp bench``) and print a Markdown report.

    Args:
        argv (list[str] | None): command-line arguments (default: None, meaning
            ``sys.argv[1:]``); ``--help`` lists them.

    Returns:
        int: 0 when every child process reported a result (a loader that *fails* - e.g. Keras
        under spawn with a lock in the dataset - is a result), 1 when a child crashed or timed
        out.

    Raises:
        SystemExit: bad arguments (argparse), or ``--plot`` without matplotlib.
    """
    import platform

    from .. import available_methods

    argv = sys.argv[1:] if argv is None else list(argv)
    if "bigdata" in argv and ("--workload" in argv or "--workload=bigdata" in argv):
        from .bigdata import main as bigdata_main  # its own options: --workload bigdata --help

        return bigdata_main(argv)
    args = _parser().parse_args(argv)
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown:
        _parser().error(f"--sections: unknown {unknown}; valid: {', '.join(SECTIONS)}")
    if args.timeout <= 0:
        _parser().error(f"--timeout must be > 0 seconds, got {args.timeout}")
    if args.plot:
        try:
            import matplotlib  # noqa: F401 - fail before an hour of benchmarking
        except ImportError:
            _parser().error(
                "--plot needs matplotlib: `pip install compatmp[bench]` or `pip install "
                "matplotlib`, or drop --plot"
            )
    workloads = list(WORKLOADS) if args.workload == "all" else [args.workload]
    wanted = None if args.configs is None else {c.strip() for c in args.configs.split(",")}
    methods = available_methods()
    have = {"keras": _installed("keras"), "torch": _installed("torch"), "ray": _installed("ray")}
    if "images" in workloads and not (have["keras"] and _installed("PIL")):
        _parser().error("the images workload needs the keras and demo extras (keras, pillow)")
    repeats = 1 if args.quick else args.repeats
    image_size = args.image_size or (QUICK_IMAGE_SIZE if args.quick else IMAGES_DEFAULT_SIZE)

    plan: list[tuple[str, _Config, dict[str, Any]]] = []
    for workload in workloads:
        for section in sections:
            for cfg in _configs(section, workload, methods, have):
                baseline = cfg.library == "serial"
                if wanted is not None and cfg.name not in wanted and not baseline:
                    continue
                if section == "lock":
                    batches = QUICK_BATCHES if args.quick else LOCK_BATCHES
                else:
                    default = QUICK_BATCHES if args.quick else DEFAULT_BATCHES[workload]
                    batches = args.batches or default
                spec = {
                    "section": section,
                    "workload": workload,
                    "config": cfg.name,
                    "library": cfg.library,
                    "method": cfg.method,
                    "processes": cfg.processes,
                    "dataset": _dataset_class_name(cfg, workload),
                    "workers": args.workers,
                    "repeats": 1,  # one timed lifecycle per child; rounds repeat it
                    "batches": batches,
                    "epochs": EPOCHS,
                    "warmup": section in ("loader", "fit"),
                    "quick": args.quick,
                    "image_size": image_size,
                }
                plan.append((workload, cfg, spec))
    if wanted is not None:
        known = {
            cfg.name
            for workload in WORKLOADS
            for section in SECTIONS
            for cfg in _configs(
                section, workload, methods, {"keras": True, "torch": True, "ray": True}
            )
        }
        unknown_configs = sorted(wanted - known)
        if unknown_configs:
            _parser().error(
                f"--configs: unknown {unknown_configs}; valid names: {', '.join(sorted(known))}"
            )
    if not plan:
        _parser().error("nothing to run: check --workload, --sections and --configs")

    started = time.time()
    meta = {
        "command": "python -m compatmp bench " + " ".join(sys.argv[1:] if argv is None else argv),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "workers": args.workers,
        "repeats": repeats,
        "image_size": image_size,
        "available_methods": methods,
        "versions": _versions(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)),
        "loadavg_start": _loadavg(),
    }
    report: dict[str, Any] = {"meta": meta, "workloads": {}, "first_batch": []}
    collected: list[list[dict[str, Any]]] = [[] for _ in plan]
    with tempfile.TemporaryDirectory(prefix="compatmp-bench-") as tmp:
        launchers = _write_launchers(Path(tmp))
        # NOTE: rounds, not back-to-back repeats: on a shared machine the load drifts within
        # minutes, so each round runs every configuration once, and ratios are taken within a
        # round (see _add_ratios).
        for rnd in range(repeats):
            for k, (workload, cfg, spec) in enumerate(plan):
                if cfg.section == "lock" and rnd:
                    continue  # pass or fail: one round says it
                launcher = launchers[cfg.section == "first_batch"]
                if cfg.section == "first_batch" and rnd == 0:
                    _run_child(launcher, spec, args.timeout)  # warm-up: discarded
                result = _run_child(launcher, spec, args.timeout)
                for run in result.get("runs") or []:
                    run["round"] = rnd
                collected[k].append(result)
                shown = _shown_time(result)
                sys.stderr.write(
                    f"[round {rnd + 1}/{repeats}, {k + 1}/{len(plan)}] {workload} {cfg.section} "
                    f"{cfg.name}: {result.get('status')}"
                    f"{'' if shown is None else f' {shown:.3f} s'}\n"
                )
                sys.stderr.flush()
    crashed = False
    for (workload, cfg, spec), results in zip(plan, collected, strict=True):
        result = _merge_rounds(results)
        crashed |= result.get("status") in ("error", "timeout")
        row = _summarize(cfg, spec, result)
        if cfg.section == "first_batch":
            report["first_batch"].append(row)
        else:
            report["workloads"].setdefault(workload, {}).setdefault(cfg.section, []).append(row)
    for sections_out in report["workloads"].values():
        for rows in sections_out.values():
            _add_ratios(rows)
    meta["loadavg_end"] = _loadavg()
    meta["wall_s"] = time.time() - started
    report["targets"] = _evaluate_targets(report, args.workers)
    sys.stdout.write(_render(report) + "\n")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1, default=_jsonable) + "\n")
    if args.plot:
        _plot(report, args.plot)
    return 1 if crashed else 0


def _shown_time(result: dict[str, Any]) -> float | None:
    runs = result.get("runs") or []
    if not runs:
        return None
    epochs = runs[0].get("epochs_s") or []
    return sum(epochs) if len(epochs) >= 2 else runs[0].get("first_batch_s")


def _jsonable(obj: Any) -> Any:
    if hasattr(obj, "__dataclass_fields__"):
        return asdict(obj)
    return str(obj)
