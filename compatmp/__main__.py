"""Command line: ``python -m compatmp doctor | demo | bench``.

* ``doctor``: print the platform facts, the start method compatmp would use here and why,
  and what each other method would risk (:func:`compatmp.diagnose`).
* ``demo``: train a small Keras CNN on real digit images through compatmp workers
  (needs the ``keras`` and ``demo`` extras); ``python -m compatmp demo --help`` for options.
* ``bench``: time compatmp against Keras' own workers and torch's DataLoader, each
  configuration in a fresh process, and print a Markdown table (``--plot`` needs the
  ``bench`` extra); ``python -m compatmp bench --help`` for options.
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    """Run the ``compatmp`` command line.

    Args:
        argv (list[str] | None): arguments after ``python -m compatmp`` (default: None,
            meaning ``sys.argv[1:]``).

    Returns:
        int: the process exit code (0 on success).
    """
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="python -m compatmp", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="{doctor,demo,bench}")
    sub.add_parser("doctor", help="show the start-method decision for this machine and why")
    sub.add_parser(
        "demo", help="train a small CNN on real digit images with compatmp workers", add_help=False
    )
    sub.add_parser(
        "bench",
        help="benchmark compatmp against Keras' workers and torch's DataLoader",
        add_help=False,
    )
    args, rest = parser.parse_known_args(argv)
    if args.command == "doctor":
        if rest:
            parser.error(f"doctor takes no arguments, got {rest}")
        from ._platform import diagnose

        sys.stdout.write(diagnose())
        return 0
    if args.command == "bench":
        from .bench import main as bench_main

        return bench_main(rest)
    from ._demo import main as demo_main

    return demo_main(rest)


if __name__ == "__main__":
    sys.exit(main())
