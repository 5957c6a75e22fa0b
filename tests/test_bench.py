"""Smoke tests of ``python -m compatmp bench`` (no timing assertions: speed lives in
benchmarks/RESULTS.md, not in unit tests)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from compatmp import bench
from compatmp.bench import report as bench_report
from compatmp.bench import workloads

ROOT = Path(__file__).resolve().parent.parent

SMOKE_CONFIGS = ["serial", "compatmp-thread", "compatmp-auto"]


def _run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("COMPATMP_START_METHOD", None)
    return subprocess.run(
        [sys.executable, "-m", "compatmp", "bench", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.timeout(150)
def test_quick_cli_prints_table_and_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    proc = _run_cli(
        "--quick",
        "--workload",
        "gil",
        "--workers",
        "1",
        "--sections",
        "loader",
        "--configs",
        ",".join(SMOKE_CONFIGS),
        "--json",
        str(out),
    )
    assert proc.returncode == 0, proc.stderr[-2000:]

    # The Markdown table: header with every column, then one ok row per configuration.
    lines = proc.stdout.splitlines()
    header = "| " + " | ".join(bench_report.TIMING_COLUMNS) + " |"
    assert header in lines
    rows = {
        cells[0]: cells
        for line in lines
        if line.startswith("| ") and line != header
        for cells in [[c.strip() for c in line.strip("|").split("|")]]
    }
    for name in SMOKE_CONFIGS:
        assert name in rows, f"no table row for {name}:\n{proc.stdout}"
        cells = rows[name]
        assert len(cells) == len(bench_report.TIMING_COLUMNS)
        assert cells[-1] == "ok", cells
    assert rows["serial"][bench_report.TIMING_COLUMNS.index("x serial (total)")] == "1.00x"
    assert (
        rows["compatmp-thread"][bench_report.TIMING_COLUMNS.index("peak RSS/worker (MB)")] == "n/a"
    )
    assert rows["compatmp-auto"][bench_report.TIMING_COLUMNS.index("method")].startswith("auto -> ")
    assert "### Targets" in proc.stdout

    # The JSON: run metadata (load average at start and end), rows, targets.
    report = json.loads(out.read_text())
    assert set(report) == {"meta", "workloads", "first_batch", "targets"}
    meta = report["meta"]
    for key in ("command", "python", "cpu_count", "workers", "repeats", "versions"):
        assert key in meta
    assert meta["workers"] == 1 and meta["repeats"] == 1
    assert "loadavg_start" in meta and "loadavg_end" in meta
    loader = report["workloads"]["gil"]["loader"]
    assert [r["config"] for r in loader] == SMOKE_CONFIGS
    for row in loader:
        assert row["status"] == "ok", row
        assert row["epoch1_s"] > 0 and row["epoch2_s"] > 0
        assert row["total_s"] == pytest.approx(sum(row["runs"][0]["epochs_s"]))
        assert row["runs"][0]["batches"] == [workloads.QUICK_BATCHES, workloads.QUICK_BATCHES]
        assert row["speedup_total"] > 0 and row["efficiency"] > 0
    auto = loader[-1]
    assert auto["method_used"] in ("fork", "forkserver", "spawn", "thread")
    assert auto["decision_reason"]
    assert report["first_batch"] == []
    assert {t["verdict"] for t in report["targets"]} <= {"MET", "NOT MET", "not measured"}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--sections", "loader,bogus"], "unknown ['bogus']"),
        (["--workers", "0"], "expected an integer >= 1"),
        (["--workload", "nope"], "invalid choice"),
        (["--timeout", "0"], "--timeout must be > 0"),
        (["--configs", "serial,compatmp-bogus"], "unknown ['compatmp-bogus']"),
    ],
)
def test_bad_arguments_say_what_is_valid(args, message, capsys):
    with pytest.raises(SystemExit) as info:
        bench.main(args)
    assert info.value.code == 2
    assert message in capsys.readouterr().err


def _row(config, library, total, workers=2, e1=None, e2=None, rss=None, method="fork"):
    e1 = total / 2 if e1 is None else e1
    e2 = total - e1 if e2 is None else e2
    return {
        "config": config,
        "library": library,
        "method": method,
        "workers": None if library == "serial" else workers,
        "status": "ok",
        "epoch1_s": e1,
        "epoch2_s": e2,
        "total_s": total,
        "peak_rss_mb": rss,
        "runs": [{"round": 0, "epochs_s": [e1, e2]}],
    }


def test_ratios_are_against_the_serial_row_and_efficiency_divides_by_workers():
    rows = [_row("serial", "serial", 4.0), _row("compatmp-auto", "compatmp", 2.0)]
    failed = _row("keras-mp-spawn", "keras", 1.0)
    failed["status"] = "fails"
    rows.append(failed)
    bench_report._add_ratios(rows)
    assert rows[0]["speedup_total"] == 1.0 and rows[0]["efficiency"] == 1.0
    assert rows[1]["speedup_total"] == 2.0
    assert rows[1]["efficiency"] == 1.0  # 4 / (2 workers * 2 s)
    assert rows[2]["speedup_total"] is None and rows[2]["efficiency"] is None


def test_targets_report_met_and_not_met():
    gil = [
        _row("serial", "serial", 4.0),
        _row("keras-threads", "keras", 3.0, method=None),
        _row("keras-mp-fork", "keras", 2.5),
        _row("compatmp-auto", "compatmp", 2.0, e1=1.2, e2=0.8, rss=40.0),
    ]
    big = [
        _row("serial", "serial", 4.0),
        _row("keras-threads", "keras", 1.0, method=None),
        _row("keras-mp-fork", "keras", 8.0),
        _row("compatmp-auto", "compatmp", 1.5, e1=0.5, e2=1.0, rss=250.0),
    ]
    big[-1]["peak_own_mb"] = 150.0
    for rows in (gil, big):
        bench_report._add_ratios(rows)
    report = {"workloads": {"gil": {"loader": gil}, "bigbatch": {"loader": big}}}
    verdicts = {t["target"]: t for t in bench_report._evaluate_targets(report, 2)}

    def verdict(prefix):
        (match,) = [t for name, t in verdicts.items() if name.startswith(prefix)]
        return match

    assert verdict("gil, 2 workers: compatmp-auto vs")["verdict"] == "MET"  # 2.0x >= 1.7x
    assert verdict("gil: compatmp-auto vs Keras")["verdict"] == "NOT MET"  # 1.25x
    assert verdict("gil: compatmp-auto vs Keras")["measured"] == pytest.approx(1.25)
    assert verdict("bigbatch: compatmp-auto vs Keras' process")["verdict"] == "MET"
    assert verdict("bigbatch: compatmp-auto time / Keras threads")["verdict"] == (
        "NOT MET"  # 1.5 s / 1.0 s > 1.3
    )
    epochs = verdict("epoch 2 no slower")
    assert epochs["verdict"] == "NOT MET" and "bigbatch/compatmp-auto" in epochs["detail"]
    rss = verdict("peak RSS per worker")
    assert rss["verdict"] == "NOT MET" and rss["measured"] == 250.0
    own = verdict("same, without shared-memory")
    assert own["verdict"] == "MET" and own["measured"] == 150.0
    assert verdict("gil, 2 workers: fit-compatmp-auto vs")["verdict"] == "not measured"
    assert verdict("first batch")["verdict"] == "not measured"


@pytest.mark.timeout(150)
def test_fill_workload_counts_blocks_and_reuses_them_in_the_second_epoch():
    # The trivial-fill workload (issue 18 item 3): one pool, two epochs; every batch is
    # checked against its index inside run_one. Epoch 2 finds epoch 1's blocks (the free
    # list keeps the pipeline's peak), threads have none.
    from compatmp.bench import fill

    # The first epoch creates the pipeline's blocks (~10: queue depth 10 over 2 workers);
    # later ones at most one per worker as a worker's in-flight peak grows by chance. With
    # a fixed free list of 4 every epoch created 2-7 again (measured).
    shape = fill.QUICK_SHAPE
    proc = fill.run_one("spawn", 12, shape, epochs=4)
    new = [e["new_blocks"] for e in proc["epochs"]]
    assert new[0] >= 4 and sum(new[1:]) <= 2, new
    assert all(e["ms"] > 0 and e["cpu_ms"] >= 0 for e in proc["epochs"])
    thread = fill.run_one("thread", 3, shape)
    assert [e["new_blocks"] for e in thread["epochs"]] == [0, 0]


@pytest.mark.timeout(300)
def test_fill_cli_prints_one_row_per_method():
    env = dict(os.environ)
    proc = subprocess.run(
        [sys.executable, "-m", "compatmp.bench.fill", "--quick", "--methods", "thread", "fork"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=280,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| ")]
    assert [r.split(" | ")[0] for r in rows[1:]] == ["| thread", "| fork"]
    assert rows[1].split(" | ")[2] == "1.00"  # threads are the baseline
