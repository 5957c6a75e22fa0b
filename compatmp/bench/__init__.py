"""``python -m compatmp bench``: compatmp against Keras' own workers and PyTorch's DataLoader.

The benchmark lives inside the installed package, not in a script under ``benchmarks/``, for
two reasons: ``python -m compatmp bench`` must work from an installed wheel as well as from a
clone, and its child processes and their spawn/forkserver workers import the workloads by
name (a dataset is pickled by reference, e.g. ``compatmp.bench.workloads.GilDataset``), which
needs a module importable wherever compatmp is. Its results are in ``benchmarks/RESULTS.md``.

Modules, by job:

* ``workloads``: the datasets (``gil``, ``bigbatch``, ``images``) and their sizes;
* ``loaders``: each library's loader driven the way that library is used, and timed;
* ``runner``: one configuration per fresh child process, and its workers' peak memory;
* ``report``: rows, ``x serial`` ratios, the issue's targets, Markdown tables, plot;
* ``cli``: the configurations, the rounds, and :func:`main`;
* ``latency``: ``python -m compatmp.bench.latency``, how quickly a killed, stuck or stalled
  worker is noticed (the unit tests only assert "no hang" bounds);
* ``context``: ``python -m compatmp.bench.context``, :func:`compatmp.get_context` under torch's
  ``DataLoader`` and ``ProcessPoolExecutor``, against torch's context, the stdlib's, loky and
  ``multiprocess``.
"""

from __future__ import annotations

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark suite (``python -m compatmp bench``): :func:`compatmp.bench.cli.main`.

    Imports the command line on call, so that a worker process importing
    ``compatmp.bench.workloads`` loads nothing else of the benchmark. Arguments, return value
    (0, or 1 when a child crashed or timed out) and errors are those of ``cli.main``.
    """
    from .cli import main as cli_main

    return cli_main(argv)
