"""Command line: ``python -m compatmp doctor | demo | bench``.

* ``doctor``: print the platform facts, the start method compatmp would use here and why,
  and what each other method would risk (:func:`compatmp.diagnose`); then, on Linux, the
  free space in ``/dev/shm`` and this user's compatmp blocks there. ``doctor
  --remove-blocks-without-namespace`` removes this user's blocks whose names have no PID
  namespace (left by compatmp before issue 17), which no sweep removes.
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
    doctor = sub.add_parser(
        "doctor", help="show the start-method decision for this machine and why"
    )
    doctor.add_argument(
        "--remove-blocks-without-namespace",
        action="store_true",
        help="remove this user's compatmp blocks in /dev/shm whose names have no PID namespace "
        "(left by compatmp before issue 17; no sweep removes them), except those of live "
        "local processes; only when no compatmp run in a container sharing /dev/shm is alive",
    )
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
            parser.error(
                f"doctor takes no arguments but --remove-blocks-without-namespace, got {rest}"
            )
        from . import _shm_names
        from ._platform import diagnose

        if args.remove_blocks_without_namespace:
            removed = _shm_names.remove_blocks_without_namespace()
            sys.stdout.write(
                f"Removed {len(removed)} block(s) without a PID namespace: "
                f"{' '.join(removed) or '(none)'}\n"
            )
            return 0
        sys.stdout.write(diagnose())
        lines = _shm_names.report()
        sys.stdout.write("".join(f"\n{line}" for line in lines) + ("\n" if lines else ""))
        return 0
    if args.command == "bench":
        from .bench import main as bench_main

        return bench_main(rest)
    from ._demo import main as demo_main

    return demo_main(rest)


if __name__ == "__main__":
    sys.exit(main())
