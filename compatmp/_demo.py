"""``python -m compatmp demo``: train a small Keras CNN on real images with worker processes.

The data is scikit-learn's bundled handwritten digits (``sklearn.datasets.load_digits``: 1,797
grey 8x8 images, no download). They are written once as upscaled PNG files to a cache
directory, then read back per batch with Pillow and augmented in Python (random rotation,
shift and Gaussian noise), like a real image pipeline. The dataset is a ``keras.utils.PyDataset``
that keeps what real user code keeps: a ``threading.Lock``-protected image cache and a lambda
transform. Plain Keras with ``use_multiprocessing=True`` cannot send that object to ``spawn``
workers (``TypeError: cannot pickle '_thread.lock' object``; try ``--loader keras-processes``);
:func:`compatmp.fit` can, and the demo uses ``spawn`` by default because that is what Windows and
macOS users get.

Output: the start-method decision and its reason, the Keras progress bar, the test accuracy
(on a held-out 20 % split, measured as ``val_accuracy`` after the last epoch) and images per
second. ``main`` returns 0 when the accuracy reaches ``--min-accuracy`` (default 0.9).

Nothing here imports Keras until it is needed: ``DigitsDataset`` is built on first attribute
access (PEP 562 module ``__getattr__``), so ``--help`` is instant and worker processes that
unpickle the dataset import this module by reference.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import re
import shutil
import stat
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "DEFAULT_IMAGE_SIZE",
    "DigitsDataset",
    "build_model",
    "default_cache_dir",
    "main",
    "make_datasets",
    "prepare_images",
]

#: Side of the square PNG files, in pixels. 28 is MNIST's size: big enough for rotation and
#: shift to be visible, small enough that a 2-core machine trains several epochs in seconds.
DEFAULT_IMAGE_SIZE = 28

#: Largest random rotation, in degrees (either direction).
MAX_ROTATION_DEGREES = 12.0
#: Largest random shift, in pixels (either direction, each axis).
MAX_SHIFT_PIXELS = 2
#: Standard deviation of the Gaussian noise added to pixel values scaled to [0, 1].
NOISE_STD = 0.05

#: Fraction of the images held out as the test set.
TEST_FRACTION = 0.2

_MANIFEST = "labels.csv"
_N_IMAGES = 1797  # sklearn.datasets.load_digits()
_LABELS = frozenset(str(d) for d in range(10))


def default_cache_dir() -> Path:
    """Return the default directory for the demo's PNG files: private to this user.

    A fixed name in the shared temp directory (``/tmp/compatmp-demo``, as before) let another
    user create it first and hand the demo whatever files they liked. The default is now the
    user's cache directory, following the conventions ``platformdirs.user_cache_dir`` uses:
    ``$XDG_CACHE_HOME/compatmp/demo`` or ``~/.cache/compatmp/demo`` (Linux and other POSIX),
    ``~/Library/Caches/compatmp/demo`` (macOS), ``%LOCALAPPDATA%\\compatmp\\Cache\\demo``
    (Windows). Without a usable home directory it is ``<temp dir>/compatmp-demo-<uid>``, which
    :func:`prepare_images` creates with mode 0700 and refuses if another user owns it.

    Returns:
        Path: the directory (not created here). Override with ``--cache-dir`` or the
        ``COMPATMP_DEMO_CACHE`` environment variable.
    """
    env = os.environ.get("COMPATMP_DEMO_CACHE")
    if env:
        return Path(env)
    if sys.platform == "win32":
        base = os.environ.get("LOCALAPPDATA")
        if base:
            return Path(base) / "compatmp" / "Cache" / "demo"
    elif sys.platform == "darwin":
        home = _home()
        if home is not None:
            return home / "Library" / "Caches" / "compatmp" / "demo"
    else:
        xdg = os.environ.get("XDG_CACHE_HOME")
        if xdg and os.path.isabs(xdg):  # the XDG spec: a relative value is invalid, ignore it
            return Path(xdg) / "compatmp" / "demo"
        home = _home()
        if home is not None:
            return home / ".cache" / "compatmp" / "demo"
    user = os.geteuid() if hasattr(os, "geteuid") else os.environ.get("USERNAME", "user")
    return Path(tempfile.gettempdir()) / f"compatmp-demo-{user}"


def _home() -> Path | None:
    """The user's home directory if it exists and is a directory, else None."""
    home = Path(os.path.expanduser("~"))
    return home if home.is_absolute() and home.is_dir() else None


def _check_private(path: Path, what: str) -> None:
    """Raise unless ``path`` is a real directory of this user that no one else can write.

    POSIX only (Windows has no uid; its per-user cache directory is private by ACL).

    Raises:
        PermissionError: ``path`` is a symlink, not a directory, owned by another user, or
            writable by group or others.
    """
    if not hasattr(os, "geteuid"):
        return
    st = os.lstat(path)
    problem = None
    if stat.S_ISLNK(st.st_mode):
        problem = "is a symbolic link"
    elif not stat.S_ISDIR(st.st_mode):
        problem = "is not a directory"
    elif st.st_uid != os.geteuid():
        problem = f"belongs to uid {st.st_uid}, not to you (uid {os.geteuid()})"
    elif st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        problem = f"is writable by other users (mode {stat.filemode(st.st_mode)})"
    if problem is not None:
        raise PermissionError(
            f"compatmp demo: the {what} {str(path)!r} {problem}, so its files cannot be "
            "trusted. Remove it, or pass --cache-dir (or COMPATMP_DEMO_CACHE) naming a "
            "directory of your own."
        )


def _read_manifest(target: Path, manifest: Path) -> tuple[list[str], np.ndarray] | None:
    """The image paths and labels of a built image set, or None if it is not one we made.

    Valid means: ``target`` is a private directory of this user (:func:`_check_private`);
    the manifest is a regular file listing ``0000.png`` ... ``1796.png`` in order with a label
    0..9 each; and every image is a regular file (not a symlink) of this user.

    Raises:
        PermissionError: ``target`` exists but another user owns it or can write it.
    """
    try:
        if not stat.S_ISREG(os.lstat(manifest).st_mode):
            return None
    except OSError:
        return None
    _check_private(target, "image directory")
    try:
        lines = manifest.read_text(encoding="ascii").splitlines()
    except (OSError, UnicodeDecodeError):
        return None
    if len(lines) != _N_IMAGES:
        return None
    uid = os.geteuid() if hasattr(os, "geteuid") else None
    paths, labels = [], []
    for i, line in enumerate(lines):
        name, _, label = line.partition(",")
        if name != f"{i:04d}.png" or label not in _LABELS:
            return None
        path = target / name
        try:
            st = os.lstat(path)
        except OSError:
            return None
        if not stat.S_ISREG(st.st_mode) or (uid is not None and st.st_uid != uid):
            return None
        paths.append(str(path))
        labels.append(int(label))
    return paths, np.asarray(labels, dtype=np.int32)


def prepare_images(
    cache_dir: str | os.PathLike[str] | None = None, *, image_size: int = DEFAULT_IMAGE_SIZE
) -> tuple[list[str], np.ndarray]:
    """Write the scikit-learn digits once as PNG files and return their paths and labels.

    The 8x8 images (values 0..16) are scaled to 0..255 and upscaled with bicubic resampling
    to ``image_size`` x ``image_size``. The files go to ``<cache_dir>/digits-<size>px/`` with a
    ``labels.csv`` manifest written last. A set is reused only if it is provably one this user
    made: the directory is this user's and nobody else can write it, the manifest lists the
    1,797 files in order with labels 0..9, and every file is a regular file of this user;
    anything else of this user's is rebuilt, anything of another user's is refused. The
    default cache directory is created private (mode 0700) and refused if it is not. The
    directory is built under a temporary name and renamed into place, so concurrent runs
    (parallel tests) never see a half-written set.

    Args:
        cache_dir (str | PathLike | None): parent directory (default:
            :func:`default_cache_dir`).
        image_size (int): side of the written images, in pixels (default: 28).

    Returns:
        tuple[list[str], numpy.ndarray]: the 1,797 file paths, and their labels (int32, 0..9)
        in the same order.

    Raises:
        ValueError: ``image_size`` is not an int >= 8.
        PermissionError: the cache directory or the image directory is a symlink, another
            user's, or writable by others (the message says which and what to do).
    """
    from PIL import Image

    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 8:
        raise ValueError(f"image_size must be an int >= 8 (pixels); received {image_size!r}")
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = root / f"digits-{image_size}px"
    manifest = target / _MANIFEST
    if cache_dir is None and not os.environ.get("COMPATMP_DEMO_CACHE"):
        # The default is ours to create private; a directory the user named is theirs.
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
        _check_private(root, "cache directory")
    found = _read_manifest(target, manifest)
    if found is not None:
        return found
    from sklearn.datasets import load_digits

    digits = load_digits()
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".digits-{image_size}px-", dir=root))  # mode 0700
    lines = []
    for i, (image, label) in enumerate(zip(digits.images, digits.target, strict=True)):
        pixels = np.round(image * (255.0 / 16.0)).astype(np.uint8)
        big = Image.fromarray(pixels, mode="L").resize(
            (image_size, image_size), Image.Resampling.BICUBIC
        )
        name = f"{i:04d}.png"
        big.save(staging / name)
        lines.append(f"{name},{int(label)}\n")
    (staging / _MANIFEST).write_text("".join(lines), encoding="ascii")
    # Another process may have finished a valid set meanwhile: keep it (it may be reading it).
    if _read_manifest(target, manifest) is None:
        if os.path.lexists(target):  # an incomplete or damaged set of ours: replace it
            _check_private(target, "image directory")
            stale = Path(tempfile.mkdtemp(prefix=f".stale-{image_size}px-", dir=root))
            with contextlib.suppress(OSError):  # another process may have replaced it already
                os.replace(target, stale / "old")
            shutil.rmtree(stale, ignore_errors=True)
        with contextlib.suppress(OSError):  # another process won the race: it is theirs
            os.replace(staging, target)
    shutil.rmtree(staging, ignore_errors=True)  # gone if it became the target
    found = _read_manifest(target, manifest)
    if found is None:
        raise RuntimeError(
            f"compatmp demo: could not build the image set in {str(target)!r} (another "
            "process keeps replacing it?); pass another --cache-dir"
        )
    return found


# --------------------------------------------------------------------------------------------
# Per-worker random numbers
#
# Each worker (process or thread) draws augmentation parameters from its own numpy Generator,
# seeded from compatmp.get_worker_info().seed, which differs per worker. The Generators live
# at module level, not on the dataset: compatmp re-sends the dataset to the workers after
# on_epoch_end reshuffles it, and a Generator stored on the dataset would restart from the same
# seed every epoch (the same "random" augmentation each epoch). Outside compatmp workers (plain
# Keras threads, the main process), each thread gets a Generator seeded from the dataset seed
# and the thread id.

_RNGS: dict[tuple[Any, ...], np.random.Generator] = {}
_RNGS_LOCK = threading.Lock()


def _worker_rng(dataset_seed: int) -> np.random.Generator:
    """Return this worker's (or this thread's) augmentation Generator, creating it once."""
    from ._worker import get_worker_info

    info = get_worker_info()
    if info is not None:
        key: tuple[Any, ...] = ("worker", os.getpid(), info.id, info.seed)
        entropy = [dataset_seed, info.seed]
    else:
        ident = threading.get_ident()
        key = ("thread", os.getpid(), ident)
        entropy = [dataset_seed, os.getpid(), ident % (2**32)]
    with _RNGS_LOCK:
        rng = _RNGS.get(key)
        if rng is None:
            rng = _RNGS[key] = np.random.default_rng(entropy)
        return rng


def augment(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Randomly rotate, shift and add noise to one grey image.

    Args:
        image (numpy.ndarray): uint8 array of shape (H, W), values 0..255.
        rng (numpy.random.Generator): source of the random parameters.

    Returns:
        numpy.ndarray: float32 array of shape (H, W), values in [0, 1].
    """
    from PIL import Image

    angle = float(rng.uniform(-MAX_ROTATION_DEGREES, MAX_ROTATION_DEGREES))
    dx, dy = (int(v) for v in rng.integers(-MAX_SHIFT_PIXELS, MAX_SHIFT_PIXELS + 1, size=2))
    moved = Image.fromarray(image, mode="L").rotate(
        angle, resample=Image.Resampling.BILINEAR, translate=(dx, dy), fillcolor=0
    )
    out = np.asarray(moved, dtype=np.float32) / 255.0
    out += rng.normal(0.0, NOISE_STD, size=out.shape).astype(np.float32)
    return np.clip(out, 0.0, 1.0, out=out)


def _make_digits_dataset_class() -> type:
    """Build ``DigitsDataset`` (a ``keras.utils.PyDataset`` subclass); imports Keras."""
    import keras
    from PIL import Image

    class DigitsDataset(keras.utils.PyDataset):
        """Batches of digit images read from PNG files, augmented in Python.

        Written like typical user code: it holds a ``threading.Lock`` that guards a dict of
        decoded images and a lambda that scales them, which is why plain ``pickle`` (and so
        Keras' ``use_multiprocessing=True`` under ``spawn``) cannot ship it to a worker.
        ``on_epoch_end`` reshuffles the sample order when ``shuffle`` is true.

        Args:
            paths (list[str]): PNG files (grey, square).
            labels (numpy.ndarray): int labels, one per path.
            batch_size (int): images per batch (default: 32); the last batch may be smaller.
            augment (bool): apply random rotation, shift and noise (default: False).
            shuffle (bool): reshuffle the samples in ``on_epoch_end`` (default: False).
            seed (int): seed for the shuffle and, mixed with each worker's seed, for the
                augmentation (default: 0).
            **kwargs: ``workers``, ``use_multiprocessing``, ``max_queue_size`` for
                ``keras.utils.PyDataset``.

        Returns from ``__getitem__``: ``(x, y)`` with ``x`` float32 of shape
        ``(batch, H, W, 1)`` in [0, 1] and ``y`` int32 of shape ``(batch,)``.
        """

        def __init__(
            self,
            paths: list[str],
            labels: np.ndarray,
            batch_size: int = 32,
            *,
            augment: bool = False,
            shuffle: bool = False,
            seed: int = 0,
            **kwargs: Any,
        ) -> None:
            super().__init__(**kwargs)
            if len(paths) != len(labels):
                raise ValueError(
                    f"paths and labels must have the same length; received {len(paths)} "
                    f"paths and {len(labels)} labels"
                )
            self.paths = list(paths)
            self.labels = np.asarray(labels, dtype=np.int32)
            self.batch_size = int(batch_size)
            self.augment = augment
            self.shuffle = shuffle
            self.seed = seed
            self.order = np.arange(len(self.paths))
            self._shuffle_rng = np.random.default_rng(seed)
            self._cache: dict[str, np.ndarray] = {}
            self._cache_lock = threading.Lock()
            self.transform = lambda a: a.astype(np.float32) / 255.0

        def __len__(self) -> int:
            return (len(self.paths) + self.batch_size - 1) // self.batch_size

        def _load(self, path: str) -> np.ndarray:
            with self._cache_lock:
                cached = self._cache.get(path)
            if cached is None:
                with Image.open(path) as img:
                    cached = np.asarray(img.convert("L"), dtype=np.uint8)
                with self._cache_lock:
                    self._cache[path] = cached
            return cached

        def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
            if not 0 <= index < len(self):
                raise IndexError(f"batch index {index} out of range [0, {len(self)})")
            rows = self.order[index * self.batch_size : (index + 1) * self.batch_size]
            rng = _worker_rng(self.seed) if self.augment else None
            from ._alloc import empty

            x = None
            for k, row in enumerate(rows):
                image = self._load(self.paths[row])
                image = augment(image, rng) if rng is not None else self.transform(image)
                if x is None:  # born in the worker's shared memory when big enough
                    x = empty((len(rows), *image.shape, 1), np.float32)
                x[k, ..., 0] = image
            return x, self.labels[rows]

        def on_epoch_end(self) -> None:
            if self.shuffle:
                self._shuffle_rng.shuffle(self.order)

    DigitsDataset.__module__ = __name__
    DigitsDataset.__qualname__ = "DigitsDataset"
    return DigitsDataset


_CLASS_LOCK = threading.Lock()

# Declared for readers and linters; the class itself is built by __getattr__ below.
DigitsDataset: type


def __getattr__(name: str) -> Any:
    # PEP 562: build the Keras-dependent class on first use; cache it so pickling by
    # reference (module + qualname lookup) finds the very same class object.
    if name == "DigitsDataset":
        with _CLASS_LOCK:
            cls = globals().get("DigitsDataset")
            if cls is None:
                cls = globals()["DigitsDataset"] = _make_digits_dataset_class()
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def make_datasets(
    cache_dir: str | os.PathLike[str] | None = None,
    *,
    limit: int | None = None,
    batch_size: int = 32,
    image_size: int = DEFAULT_IMAGE_SIZE,
    seed: int = 0,
    **pydataset_kwargs: Any,
) -> tuple[Any, Any]:
    """Return ``(train, test)`` :class:`DigitsDataset` objects over a fixed random split.

    Args:
        cache_dir (str | PathLike | None): see :func:`prepare_images`.
        limit (int | None): use only the first ``limit`` images (default: all 1,797).
        batch_size (int): images per batch (default: 32).
        image_size (int): image side in pixels (default: 28).
        seed (int): seed of the split, the shuffle and the augmentation (default: 0).
        **pydataset_kwargs: passed to both datasets (``workers``, ``use_multiprocessing``...).

    Returns:
        tuple: the training set (augmented, reshuffled every epoch) and the test set (neither).

    Raises:
        ValueError: ``limit`` leaves fewer than 10 images.
    """
    paths, labels = prepare_images(cache_dir, image_size=image_size)
    if limit is not None:
        if limit < 10:
            raise ValueError(f"limit must be at least 10 images; received {limit}")
        paths, labels = paths[:limit], labels[:limit]
    perm = np.random.default_rng(seed).permutation(len(paths))
    n_test = max(1, round(len(paths) * TEST_FRACTION))
    test_rows, train_rows = perm[:n_test], perm[n_test:]
    cls = __getattr__("DigitsDataset")
    train = cls(
        [paths[i] for i in train_rows],
        labels[train_rows],
        batch_size,
        augment=True,
        shuffle=True,
        seed=seed,
        **pydataset_kwargs,
    )
    test = cls([paths[i] for i in test_rows], labels[test_rows], batch_size, **pydataset_kwargs)
    return train, test


def build_model(image_size: int = DEFAULT_IMAGE_SIZE, *, learning_rate: float = 2e-3) -> Any:
    """Return a small compiled CNN for 10 classes (two conv blocks, one dense layer).

    Args:
        image_size (int): input side in pixels (default: 28).
        learning_rate (float): Adam learning rate (default: 0.002).

    Returns:
        keras.Model: compiled with sparse categorical cross-entropy and accuracy.
    """
    import keras

    layers = keras.layers
    model = keras.Sequential(
        [
            keras.Input((image_size, image_size, 1)),
            layers.Conv2D(16, 3, activation="relu"),
            layers.MaxPooling2D(),
            layers.Conv2D(32, 3, activation="relu"),
            layers.MaxPooling2D(),
            layers.Flatten(),
            layers.Dense(64, activation="relu"),
            layers.Dense(10, activation="softmax"),
        ]
    )
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    return model


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m compatmp demo",
        description=(
            "Train a small Keras CNN on scikit-learn's handwritten digits, read from PNG files "
            "and augmented in Python by worker processes started with compatmp."
        ),
    )
    parser.add_argument(
        "--start-method",
        default="spawn",
        help="fork, forkserver, spawn, thread or auto (default: spawn, as on Windows and macOS)",
    )
    parser.add_argument("--workers", type=int, default=2, help="worker count (default: 2)")
    parser.add_argument("--epochs", type=int, default=8, help="training epochs (default: 8)")
    parser.add_argument("--batch-size", type=int, default=32, help="images per batch (default: 32)")
    parser.add_argument(
        "--cache-dir",
        default=None,
        help=f"where the PNG files are written once (default: {default_cache_dir()})",
    )
    parser.add_argument(
        "--limit", type=int, default=None, help="use only the first N images (default: all)"
    )
    parser.add_argument("--seed", type=int, default=0, help="split/shuffle/augment seed")
    parser.add_argument(
        "--min-accuracy",
        type=float,
        default=0.9,
        help="exit status 1 below this test accuracy (default: 0.9)",
    )
    parser.add_argument(
        "--loader",
        choices=["compatmp", "keras-threads", "keras-processes"],
        default="compatmp",
        help="compatmp.fit (default), or plain model.fit with the PyDataset's own workers "
        "using threads or multiprocessing (the latter, with --start-method spawn, shows the "
        "pickling error compatmp avoids)",
    )
    parser.add_argument("--verbose", type=int, default=1, help="Keras verbosity (default: 1)")
    return parser


class _EpochTimer:
    """Collect per-epoch wall times (seconds) through a Keras callback built lazily."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def callback(self) -> Any:
        import keras

        timer = self

        class _Cb(keras.callbacks.Callback):
            def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
                self._t0 = time.perf_counter()

            def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
                timer.times.append(time.perf_counter() - self._t0)

        return _Cb()


@contextlib.contextmanager
def _print_compatmp_log() -> Iterator[None]:
    """Print compatmp's INFO messages (the pool's start-method decision) while active."""
    logger = logging.getLogger("compatmp")
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(message)s"))
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)


def _summary(exc: BaseException) -> str:
    """First line of an error plus the innermost ``SomeError: ...`` line TensorFlow wraps."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    head = f"{type(exc).__name__}: {lines[0] if lines else ''}"
    inner = [line for line in lines[1:] if re.match(r"^[A-Za-z_.]*(Error|Exception): ", line)]
    return f"{head} ... {inner[-1]}" if inner else head


def main(argv: list[str] | None = None) -> int:
    """Run the demo; the entry point of ``python -m compatmp demo``.

    Args:
        argv (list[str] | None): command-line arguments after ``demo`` (default:
            ``sys.argv[1:]``). See ``--help``.

    Returns:
        int: 0 when the test accuracy reaches ``--min-accuracy``, 1 when it does not or when
        training failed (the error is printed), 2 for bad arguments (argparse).
    """
    args = _parser().parse_args(argv)
    if args.workers < 0:
        _parser().error(f"--workers must be >= 0; received {args.workers}")
    if args.epochs < 1:
        _parser().error(f"--epochs must be >= 1; received {args.epochs}")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # hide TensorFlow's start-up banner
    t_start = time.perf_counter()
    paths, _ = prepare_images(args.cache_dir)
    print(f"images: {len(paths)} PNG files in {Path(paths[0]).parent}")

    import keras

    keras.utils.set_random_seed(args.seed)
    train, test = make_datasets(
        args.cache_dir, limit=args.limit, batch_size=args.batch_size, seed=args.seed
    )
    model = build_model()
    timer = _EpochTimer()
    n_train = len(train.paths)
    print(
        f"train: {n_train} images ({len(train)} batches), test: {len(test.paths)} images; "
        f"backend: {keras.backend.backend()}"
    )
    fit_kwargs = dict(
        epochs=args.epochs,
        validation_data=test,
        callbacks=[timer.callback()],
        verbose=args.verbose,
    )
    t_fit = time.perf_counter()
    try:
        if args.loader == "compatmp":
            from ._keras import fit
            from ._platform import decide_start_method

            auto = decide_start_method("auto")
            print(f"compatmp's automatic choice here would be {auto.method}: {auto.reason}")
            with _print_compatmp_log():
                history = fit(
                    model, train, workers=args.workers, start_method=args.start_method, **fit_kwargs
                )
        else:
            import multiprocessing

            use_mp = args.loader == "keras-processes"
            # Keras' enqueuer uses multiprocessing's default context: set it (process-wide,
            # which is fine for a command-line run).
            if use_mp and args.start_method not in ("auto", "thread"):
                multiprocessing.set_start_method(args.start_method, force=True)
            for ds in (train, test):
                ds.workers, ds.use_multiprocessing = args.workers, use_mp
            print(
                f"plain Keras: workers={args.workers}, use_multiprocessing={use_mp}, "
                f"start method {multiprocessing.get_start_method()}"
            )
            history = model.fit(train, **fit_kwargs)
    except Exception as exc:  # the demo reports and exits; tests look for this text
        print(f"training failed: {_summary(exc)}")
        return 1
    fit_seconds = time.perf_counter() - t_fit
    accuracy = float(history.history["val_accuracy"][-1])
    total = n_train * args.epochs
    print(f"test accuracy: {accuracy:.4f}")
    print(
        f"images/second: {total / fit_seconds:.0f} (training images over the {fit_seconds:.1f} s "
        "of fit(), worker start-up and validation included)"
    )
    if len(timer.times) > 1:
        steady = timer.times[1:]
        print(
            f"images/second after the first epoch (workers running): "
            f"{n_train * len(steady) / sum(steady):.0f}"
        )
    print(f"total time: {time.perf_counter() - t_start:.1f} s")
    if accuracy < args.min_accuracy:
        print(f"test accuracy {accuracy:.4f} is below --min-accuracy {args.min_accuracy}")
        return 1
    return 0
