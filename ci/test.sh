#!/usr/bin/env bash
# Run compatmp's test suite with the `python` first on PATH.
#
# Usage: ci/test.sh [PYTEST_ARG...]   e.g. ci/test.sh -m "not slow"
#   Arguments go to pytest unchanged; PYTEST_ADDOPTS (read by pytest itself) adds more, which is
#   how the workflow passes per-job options such as "-W error::DeprecationWarning".
# Environment:
#   CI_FORBID_MODULES  space-separated module names that must NOT be importable, e.g.
#                      "tensorflow keras" for the core-only job: a job that meant to test
#                      without TensorFlow fails here if TensorFlow slipped in.
#   COMPATMP_START_METHOD, KERAS_BACKEND  read by compatmp and Keras; shown in the log. Set
#                      but empty (a workflow matrix entry without the key) means unset.
set -euo pipefail

cd "$(dirname "$0")/.."

for var in COMPATMP_START_METHOD KERAS_BACKEND; do
    if [ -z "${!var:-}" ]; then
        unset "$var"
    fi
done

if [ -n "${CI_FORBID_MODULES:-}" ]; then
    # shellcheck disable=SC2086  # word splitting intended: one module name per argument
    python - $CI_FORBID_MODULES <<'PY'
import importlib.util
import sys

found = [name for name in sys.argv[1:] if importlib.util.find_spec(name) is not None]
if found:
    sys.exit(
        f"ci/test.sh: CI_FORBID_MODULES lists {found}, but they are importable from "
        f"{sys.executable}; this job must run without them. Uninstall them or fix the install step."
    )
print(f"ci/test.sh: confirmed not importable: {sys.argv[1:]}")
PY
fi

echo "ci/test.sh: COMPATMP_START_METHOD=${COMPATMP_START_METHOD:-(unset)}" \
    "KERAS_BACKEND=${KERAS_BACKEND:-(unset)} PYTEST_ADDOPTS=${PYTEST_ADDOPTS:-}"
# The platform report (facts and start-method decision) heads every CI log.
python -m compatmp doctor
# ${1+"$@"}: see ci/install.sh.
python -m pytest ${1+"$@"}
