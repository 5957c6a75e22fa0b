#!/usr/bin/env bash
# Install compatmp (editable) and its extras into the `python` first on PATH.
#
# Usage: ci/install.sh [EXTRAS] [REQUIREMENT...]
#   EXTRAS        comma-separated extras from setup.cfg, e.g. "keras,test" (default: $CI_EXTRAS,
#                 else "test"); "" installs the core alone.
#   REQUIREMENT   more pip requirements installed in the same resolve, e.g. "keras".
# Environment:
#   CI_PRE_INSTALL  pip arguments installed first, in their own pip call, e.g.
#                   "torch --index-url https://download.pytorch.org/whl/cpu" on GitHub or
#                   "torch==2.13.0" on the dev machine. Split on spaces on purpose.
#
# No venv is created here: GitHub runners install into setup-python's interpreter, and
# .ci/run activates (or calls with) the project's .venv before calling this script.
# The same script runs on Linux, macOS and Windows (Git Bash).
set -euo pipefail

cd "$(dirname "$0")/.."

if [ "$#" -gt 0 ]; then
    extras="$1"
    shift
else
    extras="${CI_EXTRAS-test}"
fi

case "$extras" in
    *[!A-Za-z0-9,_-]*)
        echo "ci/install.sh: extras must be comma-separated names like 'keras,test'," \
            "got '$extras'" >&2
        exit 2
        ;;
esac

python -c 'import sys; print("ci/install.sh: installing with", sys.executable, sys.version)'

if [ -n "${CI_PRE_INSTALL:-}" ]; then
    echo "ci/install.sh: pre-install: pip install $CI_PRE_INSTALL"
    # shellcheck disable=SC2086  # word splitting intended: a list of pip arguments
    python -m pip install $CI_PRE_INSTALL
fi

if [ -n "$extras" ]; then
    target=".[$extras]"
else
    target="."
fi
echo "ci/install.sh: pip install -e $target ${*:-}"
# ${1+"$@"}: empty-argument expansion that is safe under `set -u` in every bash, old ones
# such as macOS's /bin/bash 3.2 included.
python -m pip install -e "$target" ${1+"$@"}
