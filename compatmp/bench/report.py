"""The benchmark's results: rows from the children's results, ratios, targets, Markdown, plot.

:func:`_merge_rounds` joins a configuration's children (one per round), :func:`_summarize`
makes its table row, :func:`_add_ratios` adds the ``x serial`` columns,
:func:`_evaluate_targets` checks the issue's targets, :func:`_render` prints the Markdown
report (the tables in ``benchmarks/RESULTS.md``) and :func:`_plot` the optional PNG.

NOTE [ Timing on a shared machine ]
The load of a shared machine drifts within minutes, and with it the CPU time a batch costs
(the same pure-Python batch took 25 ms or 44 ms of CPU an hour apart on the 2-vCPU VM this was
written on). So the configurations run in *rounds*: each round runs every configuration once,
each ``x serial`` ratio is taken between runs of the same round, and the table shows the
median over rounds (times: median over rounds too). The load average at the start and end of
the run, and of every child, is in the JSON. "cold first batch" is the first loader of a fresh
process (imports, forkserver start-up and all); "first batch" is the timed loader's, after the
warm-up in the same process.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Any

import numpy as np

#: Tolerance of the "epoch 2 no slower than epoch 1" verdict: 5 % covers timer and load noise.
EPOCH_TOLERANCE = 1.05

MB = 1e6


@dataclass(frozen=True)
class _Config:
    """One row: which library loads the batches, how, and with which dataset class.

    Defined here, below the command line (:mod:`compatmp.bench.cli`) that builds the rows.
    """

    section: str  # loader | fit | lock | first_batch
    name: str
    library: str  # serial | keras | torch | compatmp
    method: str | None  # start method (None: serial or Keras threads)
    processes: bool


# -- aggregation ------------------------------------------------------------------------------


def _merge_rounds(results: list[dict[str, Any]]) -> dict[str, Any]:
    """One result from a configuration's children (one per round): all runs, worst status."""
    if not results:
        return {"status": "error", "error": "no child ran", "runs": []}
    failed = [r for r in results if r.get("status") != "ok"]
    merged = dict(failed[0] if failed else results[-1])
    merged["runs"] = [run for r in results for run in r.get("runs") or []]
    merged["warmup"] = results[0].get("warmup")
    for key in ("peak_rss_bytes", "peak_uss_bytes", "peak_own_bytes"):
        values = [r[key] for r in results if r.get(key)]
        merged[key] = max(values) if values else None
    merged["loadavg_start"] = results[0].get("loadavg_start")
    merged["loadavg_end"] = results[-1].get("loadavg_end")
    return merged


def _median(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def _summarize(cfg: _Config, spec: dict[str, Any], result: dict[str, Any]) -> dict[str, Any]:
    """One table row from a configuration's merged results (medians over the rounds)."""
    runs = result.get("runs") or []
    row: dict[str, Any] = {
        "section": cfg.section,
        "config": cfg.name,
        "library": cfg.library,
        "method": cfg.method,
        "method_used": None,
        "workers": spec["workers"] if cfg.library != "serial" else None,
        "dataset": spec["dataset"],
        "status": result.get("status", "error"),
        "error": result.get("error"),
        "repeats": len(runs),
        "epoch1_s": None,
        "epoch2_s": None,
        "total_s": None,
        "first_batch_s": _median([r.get("first_batch_s") for r in runs]),
        "first_batch_all_s": [r.get("first_batch_s") for r in runs],
        "cold_first_batch_s": (result.get("warmup") or {}).get("first_batch_s"),
        "close_s": _median([r.get("close_s") for r in runs]),
        "peak_rss_mb": None,
        "peak_uss_mb": None,
        "peak_own_mb": None,
        "loadavg_start": result.get("loadavg_start"),
        "loadavg_end": result.get("loadavg_end"),
        "tensorflow_in_parent": result.get("tensorflow_in_parent"),
        "runs": runs,
    }
    epochs = [r["epochs_s"] for r in runs if r.get("epochs_s")]
    if epochs and len(epochs[0]) >= 2:
        row["epoch1_s"] = _median([e[0] for e in epochs])
        row["epoch2_s"] = _median([e[1] for e in epochs])
        row["total_s"] = _median([sum(e) for e in epochs])
    decisions = [r["decision"] for r in runs if r.get("decision")]
    if decisions:
        row["method_used"] = decisions[-1]["method"]
        row["decision_reason"] = decisions[-1]["reason"]
    elif cfg.library in ("keras", "torch"):
        row["method_used"] = cfg.method or "thread"
    if cfg.processes and result.get("peak_rss_bytes"):
        row["peak_rss_mb"] = result["peak_rss_bytes"] / MB
        row["peak_uss_mb"] = (result.get("peak_uss_bytes") or 0) / MB or None
        row["peak_own_mb"] = (result.get("peak_own_bytes") or 0) / MB or None
    return row


def _per_round(row: dict[str, Any], key: str) -> dict[int, float]:
    """``{round: seconds}`` of one metric (epoch1, epoch2 or total) of a row's runs."""
    out = {}
    for run in row.get("runs") or []:
        epochs = run.get("epochs_s") or []
        if len(epochs) >= 2:
            value = {"epoch1": epochs[0], "epoch2": epochs[1], "total": sum(epochs)}[key]
            out[run.get("round", 0)] = value
    return out


def _add_ratios(rows: list[dict[str, Any]]) -> None:
    """``x serial`` columns and efficiency, against the serial row of the same section.

    Each ratio is the median over rounds of ``serial time / this time`` within the same round,
    so a load change between rounds moves both sides of a ratio alike.
    """
    serial = next((r for r in rows if r["library"] == "serial" and r["status"] == "ok"), None)
    for row in rows:
        for key in ("epoch1", "epoch2", "total"):
            ratio = None
            if serial is not None and row["status"] == "ok":
                base, own = _per_round(serial, key), _per_round(row, key)
                common = [rnd for rnd in own if rnd in base and own[rnd] > 0]
                if common:
                    ratio = statistics.median(base[rnd] / own[rnd] for rnd in common)
            row[f"speedup_{key}"] = ratio
        workers = row["workers"] or 1
        total = row["speedup_total"]
        row["efficiency"] = None if total is None else total / workers


def _row_by(rows: list[dict[str, Any]], name: str) -> dict[str, Any] | None:
    return next((r for r in rows if r["config"] == name and r["status"] == "ok"), None)


def _time_ratio(slow: dict[str, Any], fast: dict[str, Any]) -> float | None:
    """Median over shared rounds of ``slow total / fast total`` (> 1: ``fast`` is faster)."""
    a, b = _per_round(slow, "total"), _per_round(fast, "total")
    common = [rnd for rnd in a if rnd in b and b[rnd] > 0]
    return statistics.median(a[rnd] / b[rnd] for rnd in common) if common else None


def _evaluate_targets(results: dict[str, Any], workers: int) -> list[dict[str, Any]]:
    """The issue's targets, each with the measured value and MET / NOT MET / not measured."""
    targets: list[dict[str, Any]] = []

    def add(name: str, measured: float | None, threshold: str, met: bool | None, detail: str):
        verdict = "not measured" if met is None else ("MET" if met else "NOT MET")
        targets.append(
            {
                "target": name,
                "measured": measured,
                "threshold": threshold,
                "verdict": verdict,
                "detail": detail,
            }
        )

    wl = results["workloads"]
    ours_rows = (
        ("loader", "compatmp-auto"),
        ("fit", "fit-compatmp-auto"),
        ("fit", "fit-compatmp-auto-plain"),
    )
    for section, name in ours_rows:
        rows = wl.get("gil", {}).get(section, [])
        ours = _row_by(rows, name)
        speed = ours and ours["speedup_total"]
        add(
            f"gil, {workers} workers: {name} vs serial",
            speed,
            ">= 1.7x",
            None if speed is None else speed >= 1.7,
            "two-epoch total, start-up included",
        )
        keras = [r for r in rows if r["library"] == "keras" and r["status"] == "ok"]
        best = min(keras, key=lambda r: r["total_s"], default=None)
        ratio = _time_ratio(best, ours) if best and ours else None
        add(
            f"gil: {name} vs Keras' best",
            ratio,
            ">= 1.5x",
            None if ratio is None else ratio >= 1.5,
            f"Keras' best: {best['config']}" if best else "no Keras row ran",
        )
    for section, name in ours_rows:
        prefix = "fit-" if section == "fit" else ""
        rows = wl.get("bigbatch", {}).get(section, [])
        ours = _row_by(rows, name)
        procs = [r for r in rows if r["library"] == "keras" and r["method"] and r["status"] == "ok"]
        best = min(procs, key=lambda r: r["total_s"], default=None)
        ratio = _time_ratio(best, ours) if best and ours else None
        add(
            f"bigbatch: {name} vs Keras' process workers",
            ratio,
            ">= 5x faster",
            None if ratio is None else ratio >= 5.0,
            f"Keras' fastest process row: {best['config']}" if best else "no Keras process row",
        )
        threads = _row_by(rows, f"{prefix}keras-threads")
        ratio = _time_ratio(ours, threads) if ours and threads else None
        add(
            f"bigbatch: {name} time / Keras threads time",
            ratio,
            "<= 1.3",
            None if ratio is None else ratio <= 1.3,
            "two-epoch totals",
        )
    slower = []
    checked = 0
    for name, sections in wl.items():
        for section in ("loader", "fit"):
            for r in sections.get(section, []):
                if r["library"] == "compatmp" and r["status"] == "ok" and r["epoch2_s"]:
                    checked += 1
                    if r["epoch2_s"] > r["epoch1_s"] * EPOCH_TOLERANCE:
                        slower.append(
                            f"{name}/{r['config']} ({r['epoch2_s']:.3f} s > {r['epoch1_s']:.3f} s)"
                        )
    add(
        "epoch 2 no slower than epoch 1 (every compatmp row)",
        float(checked - len(slower)) if checked else None,
        f"all {checked} rows, 5 % tolerance",
        None if not checked else not slower,
        "slower: " + "; ".join(slower) if slower else "rows passing shown as measured",
    )
    fb = results.get("first_batch", [])
    row = _row_by(fb, "first-compatmp-spawn")
    value = row and row["first_batch_s"]
    add(
        "first batch, spawn, TensorFlow imported in the parent",
        value,
        "<= 0.5 s",
        None if value is None else value <= 0.5,
        "median of fresh processes; plain (non-Keras) dataset class",
    )
    for key, title, note in (
        (
            "peak_rss_mb",
            "peak RSS per worker, dataset without TensorFlow (gil, bigbatch)",
            "; includes batches in shared-memory blocks, also counted in the main process",
        ),
        ("peak_own_mb", "same, without shared-memory batch blocks (RSS - RssShmem)", ""),
    ):
        over, peak = [], None
        for name in ("gil", "bigbatch"):
            for r in wl.get(name, {}).get("loader", []):
                mb = r.get(key)
                if r["library"] == "compatmp" and mb is not None:
                    peak = max(peak or 0.0, mb)
                    if mb > 200:
                        over.append(f"{name}/{r['config']} ({mb:.0f} MB)")
        add(
            title,
            peak,
            "<= 200 MB",
            None if peak is None else not over,
            ("over: " + "; ".join(over) if over else "largest compatmp worker shown") + note,
        )
    return targets


# -- rendering --------------------------------------------------------------------------------


def _fmt(value: Any, kind: str = "s") -> str:
    if value is None:
        return "n/a"
    if kind == "x":
        return f"{value:.2f}x"
    if kind == "mb":
        return f"{value:.0f}"
    if kind == "eff":
        return f"{value:.2f}"
    return f"{value:.3f}"


def _status(row: dict[str, Any]) -> str:
    if row["status"] == "ok":
        return "ok"
    return f"{row['status']}: {row['error']}".replace("|", "\\|")


def _method_cell(row: dict[str, Any]) -> str:
    method = row["method"]
    used = row.get("method_used")
    if method is None:
        return "thread" if row["library"] != "serial" else "main process"
    if method == "auto" and used:
        return f"auto -> {used}"
    if used and used != method:
        return f"{method} -> {used}"
    return method


def _table(headers: list[str], lines: list[list[str]]) -> str:
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(cells) + " |" for cells in lines]
    return "\n".join(out)


TIMING_COLUMNS = [
    "configuration",
    "dataset",
    "method",
    "workers",
    "epoch 1 (s)",
    "epoch 2 (s)",
    "x serial (epoch 1)",
    "x serial (epoch 2)",
    "x serial (total)",
    "efficiency",
    "first batch (s)",
    "cold first batch (s)",
    "peak RSS/worker (MB)",
    "without shm (MB)",
    "status",
]


def _timing_table(rows: list[dict[str, Any]]) -> str:
    lines = []
    for r in rows:
        lines.append(
            [
                r["config"],
                r["dataset"],
                _method_cell(r),
                "-" if r["workers"] is None else str(r["workers"]),
                _fmt(r["epoch1_s"]),
                _fmt(r["epoch2_s"]),
                _fmt(r.get("speedup_epoch1"), "x"),
                _fmt(r.get("speedup_epoch2"), "x"),
                _fmt(r.get("speedup_total"), "x"),
                _fmt(r.get("efficiency"), "eff"),
                _fmt(r["first_batch_s"]),
                _fmt(r["cold_first_batch_s"]),
                _fmt(r["peak_rss_mb"], "mb") if r["method_used"] != "thread" else "n/a",
                _fmt(r.get("peak_own_mb"), "mb") if r["method_used"] != "thread" else "n/a",
                _status(r),
            ]
        )
    return _table(TIMING_COLUMNS, lines)


def _lock_table(rows: list[dict[str, Any]]) -> str:
    headers = ["configuration", "dataset", "method", "total, 2 epochs (s)", "status"]
    lines = [
        [r["config"], r["dataset"], _method_cell(r), _fmt(r["total_s"]), _status(r)] for r in rows
    ]
    return _table(headers, lines)


def _first_batch_table(rows: list[dict[str, Any]]) -> str:
    headers = ["configuration", "dataset", "method", "median (s)", "min (s)", "max (s)", "status"]
    lines = []
    for r in rows:
        values = [v for v in r["first_batch_all_s"] if v is not None]
        lines.append(
            [
                r["config"],
                r["dataset"],
                _method_cell(r),
                _fmt(r["first_batch_s"]),
                _fmt(min(values) if values else None),
                _fmt(max(values) if values else None),
                _status(r),
            ]
        )
    return _table(headers, lines)


def _targets_table(targets: list[dict[str, Any]]) -> str:
    headers = ["target", "measured", "threshold", "verdict", "detail"]
    lines = []
    for t in targets:
        value = t["measured"]
        lines.append(
            [
                t["target"],
                "n/a" if value is None else f"{value:.3g}",
                t["threshold"],
                t["verdict"],
                t["detail"].replace("|", "\\|"),
            ]
        )
    return _table(headers, lines)


_SECTION_TITLES = {
    "loader": "loader only (two epochs through the loader)",
    "fit": "model.fit with a trivial model (two epochs)",
    "lock": "dataset holding a threading.Lock",
}


def _render(report: dict[str, Any]) -> str:
    meta = report["meta"]
    parts = [
        "## compatmp benchmark",
        "",
        f"Command: `{meta['command']}`  ",
        f"Python {meta['python']} on {meta['platform']}, {meta['cpu_count']} CPUs; "
        f"load average {meta['loadavg_start']} at start, {meta['loadavg_end']} at end; "
        f"{meta['repeats']} round(s), one fresh process per configuration per round, each "
        f"timing one loader after a warm-up; medians of per-round ratios to serial; "
        f"{meta['wall_s']:.0f} s.",
    ]
    for name, sections in report["workloads"].items():
        for section, rows in sections.items():
            if not rows:
                continue
            parts += ["", f"### {name}: {_SECTION_TITLES[section]}", ""]
            parts.append(_lock_table(rows) if section == "lock" else _timing_table(rows))
    if report["first_batch"]:
        parts += ["", "### Time to first batch, TensorFlow imported in the parent", ""]
        parts.append(_first_batch_table(report["first_batch"]))
    parts += ["", "### Targets", "", _targets_table(report["targets"]), ""]
    return "\n".join(parts)


def _plot(report: dict[str, Any], path: str) -> None:
    try:
        import matplotlib
    except ImportError as exc:
        raise SystemExit(
            "--plot needs matplotlib, which is not installed; install it with "
            "`pip install compatmp[bench]` (or `pip install matplotlib`), or drop --plot."
        ) from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        (name, section, rows)
        for name, sections in report["workloads"].items()
        for section, rows in sections.items()
        if section in ("loader", "fit") and rows
    ]
    if not panels:
        raise SystemExit("--plot: no timed rows to plot (the loader and fit sections did not run)")
    fig, axes = plt.subplots(len(panels), 1, figsize=(8, 0.35 * sum(len(p[2]) for p in panels) + 2))
    axes = np.atleast_1d(axes)
    for ax, (name, section, rows) in zip(axes, panels, strict=True):
        labels = [r["config"] for r in rows]
        values = [r.get("speedup_total") or 0.0 for r in rows]
        colors = [
            {"compatmp": "tab:green", "keras": "tab:orange", "torch": "tab:blue"}.get(
                r["library"], "tab:gray"
            )
            for r in rows
        ]
        ax.barh(labels, values, color=colors)
        ax.axvline(1.0, color="black", linewidth=0.8)
        ax.invert_yaxis()
        ax.set_title(f"{name}: {section} (x serial, two-epoch total; 0 = failed)", fontsize=9)
        ax.tick_params(labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
