# Copyright 2024 The Keras team (keras-team/keras), Apache License 2.0.
# Copyright 2026 the compatmp authors: ported onto compatmp.fit/evaluate/predict.
#
# Licensed under the Apache License, Version 2.0 (the "License"); you may not use this file
# except in compliance with the License. You may obtain a copy of the License at
#
#     http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software distributed under the
# License is distributed on an "AS IS" BASIS, WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND,
# either express or implied. See the License for the specific language governing permissions
# and limitations under the License.
#
# Ported from keras-team/keras at commit 3422977a5e38fb2f7709aaa9a08e47f0c43d0f60:
#   keras/src/trainers/data_adapters/py_dataset_adapter_test.py (ExamplePyDataset,
#     DictPyDataset, ExceptionPyDataset; test_basic_flow, test_class_weight, test_dict_inputs,
#     test_with_different_shapes, test_exception_reported)
#   keras/src/trainers/trainer_test.py (TestPyDataset; the py_dataset cases of
#     test_fit_with_data_adapter)
# Changes: the dataset classes are Keras' own, unchanged but for imports (keras.utils.PyDataset,
# keras.ops, keras.backend); each case runs through compatmp and is compared with plain Keras
# *without* workers on the same data and initial weights (Keras' own workers path reorders,
# duplicates and drops batches when shuffling on torch and JAX), instead of iterating
# PyDatasetAdapter directly. Not ported: test_speedup (a timing assertion), the
# iterate_* cases (PyDataset.__iter__, no loader involved), test_sharding (distribution).
"""Keras' own PyDataset test cases, ported onto compatmp.fit/predict, on every Keras 3 backend.

The cases and Keras' dataset classes live in tests/keras_ported_cases.py, which runs as a
script in a fresh interpreter per backend (``KERAS_BACKEND`` is read once, when Keras is
imported) and reports each case; this module runs it for TensorFlow, JAX and torch, with the
start methods spread over the cases (every available one on every backend).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from compatmp import available_methods

pytestmark = [pytest.mark.keras]

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "tests" / "keras_ported_cases.py"


@pytest.mark.timeout(600)
@pytest.mark.parametrize("backend", ["tensorflow", "jax", "torch"])
def test_keras_pydataset_cases_through_compatmp(backend, tmp_path):
    for module in ("keras", backend):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"{module} is not installed")
    env = {
        **os.environ,
        "KERAS_BACKEND": backend,
        "TF_CPP_MIN_LOG_LEVEL": "2",
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    env.pop("COMPATMP_START_METHOD", None)  # the cases choose their methods
    methods = ",".join(available_methods())
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), methods],
        capture_output=True,
        text=True,
        timeout=560,
        env=env,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["backend"] == backend
    results = report["results"]
    assert len(results) >= 20, results
    failed = {name: r for name, r in results.items() if not r.startswith("ok")}
    assert not failed, "\n\n".join(f"{name}:\n{r}" for name, r in failed.items())
