"""Tests for ``python -m compatmp demo`` (compatmp/_demo.py): its data pipeline and CLI.

The pipeline tests use a small subset (``limit=200``) in a temporary cache directory. The
end-to-end runs (the full demo, and plain Keras failing under spawn) are marked slow.
"""

from __future__ import annotations

import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("keras", minversion="3")
pytest.importorskip("sklearn")
Image = pytest.importorskip("PIL.Image")

from compatmp import _demo, available_methods  # noqa: E402
from compatmp._pool import OrderedPool  # noqa: E402
from compatmp._worker import get_worker_info  # noqa: E402

pytestmark = [pytest.mark.keras, pytest.mark.usefixtures("no_leaked_workers")]

REPO = Path(__file__).resolve().parents[1]
LIMIT = 200
SIZE = _demo.DEFAULT_IMAGE_SIZE


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("demo-cache")


def test_prepare_images_writes_the_pngs_once(cache_dir):
    paths, labels = _demo.prepare_images(cache_dir)
    assert len(paths) == len(labels) == 1797
    assert labels.dtype == np.int32 and set(labels.tolist()) == set(range(10))
    with Image.open(paths[0]) as img:
        assert img.format == "PNG" and img.mode == "L" and img.size == (SIZE, SIZE)
    mtime = os.stat(paths[0]).st_mtime_ns
    again, _ = _demo.prepare_images(cache_dir)
    assert again == paths and os.stat(paths[0]).st_mtime_ns == mtime  # reused, not rewritten
    assert not [p for p in Path(cache_dir).iterdir() if p.name.startswith(".digits")]


def test_prepare_images_rejects_a_bad_size(cache_dir):
    with pytest.raises(ValueError, match="image_size must be an int >= 8"):
        _demo.prepare_images(cache_dir, image_size=4)


def test_batches_have_the_right_shapes_types_and_ranges(cache_dir):
    train, test = _demo.make_datasets(cache_dir, limit=LIMIT, batch_size=16)
    assert len(train.paths) + len(test.paths) == LIMIT
    assert len(test.paths) == round(LIMIT * _demo.TEST_FRACTION)
    assert len(train) == -(-len(train.paths) // 16)
    for ds in (train, test):
        x, y = ds[0]
        assert x.shape == (16, SIZE, SIZE, 1) and x.dtype == np.float32
        assert y.shape == (16,) and y.dtype == np.int32
        assert 0.0 <= x.min() and x.max() <= 1.0 and x.max() > 0.5
        assert set(y.tolist()) <= set(range(10))
    last_x, last_y = train[len(train) - 1]
    assert 1 <= len(last_x) == len(last_y) <= 16  # the smaller last batch


def test_test_set_is_the_plain_pngs_and_train_set_is_augmented(cache_dir):
    train, test = _demo.make_datasets(cache_dir, limit=LIMIT, batch_size=8)
    with Image.open(test.paths[0]) as img:
        raw = np.asarray(img, dtype=np.float32) / 255.0
    np.testing.assert_allclose(test[0][0][0, :, :, 0], raw)  # no augmentation
    with Image.open(train.paths[0]) as img:
        raw = np.asarray(img, dtype=np.float32) / 255.0
    first, second = train[0][0][0, :, :, 0], train[0][0][0, :, :, 0]
    assert not np.allclose(first, raw)  # rotated/shifted/noisy
    assert not np.allclose(first, second)  # and differently each time


def test_on_epoch_end_reshuffles_the_training_set(cache_dir):
    train, _ = _demo.make_datasets(cache_dir, limit=LIMIT)
    before = train.order.copy()
    train.on_epoch_end()
    assert sorted(train.order) == list(range(len(train.paths)))
    assert not np.array_equal(before, train.order)


class _Tagged:
    """``(worker id, images)`` for batch i of the wrapped dataset (thread mode only)."""

    def __init__(self, dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        return get_worker_info().id, self.dataset[index][0]


@pytest.mark.timeout(60)
def test_augmentation_differs_across_workers(cache_dir):
    # The same batch, augmented by two workers: each draws from its own seeded generator.
    train, _ = _demo.make_datasets(cache_dir, limit=LIMIT, batch_size=8)
    with OrderedPool(_Tagged(train), workers=2, start_method="thread", seed=0) as pool:
        results = list(pool.imap([0] * 6))
    by_worker: dict[int, list[np.ndarray]] = {}
    for worker_id, images in results:
        by_worker.setdefault(worker_id, []).append(images)
    assert sorted(by_worker) == [0, 1]
    assert not np.allclose(by_worker[0][0], by_worker[1][0])


@pytest.mark.timeout(120)
@pytest.mark.skipif("fork" not in available_methods(), reason="needs the fork start method")
def test_pipeline_in_worker_processes_ships_the_lock_and_lambda(cache_dir):
    # DigitsDataset holds a threading.Lock and a lambda; fork keeps this test fast (spawned
    # workers would import Keras to unpickle the PyDataset subclass: ~5 s each here).
    train, _ = _demo.make_datasets(cache_dir, limit=LIMIT, batch_size=16)
    with OrderedPool(train, workers=2, start_method="fork", seed=0) as pool:
        assert pool.decision.method == "fork"
        batches = list(pool.imap(range(len(train))))
    assert len(batches) == len(train)
    for (x, y), index in zip(batches, range(len(train)), strict=True):
        np.testing.assert_array_equal(y, train.labels[train.order[index * 16 : (index + 1) * 16]])
        assert x.dtype == np.float32 and 0.0 <= x.min() and x.max() <= 1.0


@pytest.mark.timeout(180)
def test_demo_main_small_run_in_threads(cache_dir, capsys):
    code = _demo.main(
        [
            "--limit",
            str(LIMIT),
            "--epochs",
            "1",
            "--start-method",
            "thread",
            "--min-accuracy",
            "0",
            "--verbose",
            "0",
            "--cache-dir",
            str(cache_dir),
        ]
    )
    out = capsys.readouterr().out
    assert code == 0, out
    assert "worker thread(s)" in out
    assert "test accuracy: " in out and "images/second: " in out


def test_demo_rejects_bad_arguments(capsys):
    with pytest.raises(SystemExit) as info:
        _demo.main(["--workers", "-1"])
    assert info.value.code == 2
    assert "--workers must be >= 0" in capsys.readouterr().err


def _run_demo(args: list[str], timeout: float) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "compatmp", "demo", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=REPO,
    )


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_plain_keras_multiprocessing_fails_under_spawn(cache_dir):
    # What compatmp fixes: Keras' own workers pickle the dataset with plain pickle.
    proc = _run_demo(
        [
            "--loader",
            "keras-processes",
            "--start-method",
            "spawn",
            "--limit",
            "100",
            "--epochs",
            "1",
            "--verbose",
            "0",
            "--cache-dir",
            str(cache_dir),
        ],
        timeout=220,
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "cannot pickle '_thread.lock' object" in proc.stdout


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_demo_end_to_end_with_default_arguments(cache_dir):
    proc = _run_demo(["--cache-dir", str(cache_dir), "--verbose", "2"], timeout=280)
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr  # 0 means test accuracy >= 0.9
    assert "worker process(es) started with spawn" in out
    assert "test accuracy: " in out and "images/second: " in out


# ---------------------------------------------------------------------------------------------
# Issue 17.5: a private per-user cache, and nothing reused that this user did not make
# ---------------------------------------------------------------------------------------------


def test_default_cache_dir_is_per_user(monkeypatch, tmp_path):
    monkeypatch.delenv("COMPATMP_DEMO_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    if sys.platform.startswith("linux"):
        assert _demo.default_cache_dir() == tmp_path / "xdg" / "compatmp" / "demo"
        monkeypatch.delenv("XDG_CACHE_HOME")
        monkeypatch.setenv("HOME", str(tmp_path))
        assert _demo.default_cache_dir() == tmp_path / ".cache" / "compatmp" / "demo"
        monkeypatch.setenv("HOME", str(tmp_path / "missing"))  # e.g. nobody's /nonexistent
        fallback = _demo.default_cache_dir()
        assert fallback.name == f"compatmp-demo-{os.geteuid()}"
    monkeypatch.setenv("COMPATMP_DEMO_CACHE", str(tmp_path / "mine"))
    assert _demo.default_cache_dir() == tmp_path / "mine"
    assert "compatmp-demo" != _demo.default_cache_dir().name  # never the old shared name


@pytest.mark.skipif(os.name != "posix", reason="modes and owners: POSIX")
def test_default_cache_dir_is_created_private(monkeypatch, tmp_path, cache_dir):
    monkeypatch.delenv("COMPATMP_DEMO_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "private"))
    monkeypatch.setenv("HOME", str(tmp_path))
    root = _demo.default_cache_dir()
    assert str(root).startswith(str(tmp_path))
    old_umask = os.umask(0o022)  # the usual default: new folders would be 0755
    try:
        paths, labels = _demo.prepare_images()
    finally:
        os.umask(old_umask)
    assert len(paths) == 1797 and labels.tolist() == _demo.prepare_images(cache_dir)[1].tolist()
    assert (os.stat(root).st_mode & 0o777) == 0o700
    assert (os.stat(root / f"digits-{SIZE}px").st_mode & 0o077) == 0


def _copy_set(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src / f"digits-{SIZE}px", dst / f"digits-{SIZE}px")
    os.chmod(dst / f"digits-{SIZE}px", 0o700)
    return dst / f"digits-{SIZE}px"


@pytest.mark.skipif(os.name != "posix", reason="modes and owners: POSIX")
def test_a_set_others_can_write_or_own_is_refused(tmp_path, cache_dir):
    _demo.prepare_images(cache_dir)
    target = _copy_set(cache_dir, tmp_path)
    os.chmod(target, 0o777)  # e.g. made in /tmp by someone else, or by a careless umask
    with pytest.raises(PermissionError, match="writable by other users"):
        _demo.prepare_images(tmp_path)
    os.chmod(target, 0o700)
    assert len(_demo.prepare_images(tmp_path)[0]) == 1797
    if os.geteuid() == 0:
        os.chown(target, 65534, 65534)  # nobody's
        with pytest.raises(PermissionError, match="belongs to uid 65534"):
            _demo.prepare_images(tmp_path)
        os.chown(target, 0, 0)
    link_root = tmp_path / "via-link"
    link_root.mkdir()
    os.symlink(target, link_root / f"digits-{SIZE}px")
    with pytest.raises(PermissionError, match="symbolic link"):
        _demo.prepare_images(link_root)


@pytest.mark.skipif(os.name != "posix", reason="symlinks and owners: POSIX")
def test_a_damaged_or_planted_set_of_ours_is_rebuilt(tmp_path, cache_dir):
    paths, labels = _demo.prepare_images(cache_dir)
    target = _copy_set(cache_dir, tmp_path)
    planted = tmp_path / "elsewhere.png"
    planted.write_bytes(b"not a png")
    os.unlink(target / "0007.png")
    os.symlink(planted, target / "0007.png")  # a file we did not write
    again, again_labels = _demo.prepare_images(tmp_path)
    assert not os.path.islink(again[7])
    with Image.open(again[7]) as img, Image.open(paths[7]) as ref:
        assert np.array_equal(np.asarray(img), np.asarray(ref))
    assert again_labels.tolist() == labels.tolist()
    (target / "labels.csv").write_text("0000.png,1\n", encoding="ascii")  # truncated manifest
    assert _demo.prepare_images(tmp_path)[1].tolist() == labels.tolist()
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"digits-{SIZE}px", "elsewhere.png"]
