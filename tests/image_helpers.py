"""Real images for the ImageDataGenerator tests: scikit-learn's bundled digits as PNG files.

:func:`digits_directory` writes a ``flow_from_directory`` layout (one sub-directory per class)
under a given directory; the 8x8 images are scaled to 0..255 and upscaled like
``compatmp._demo.prepare_images``. No download.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

#: Side of the written images, in pixels.
IMAGE_SIZE = 16


def digits_arrays(n: int) -> tuple[np.ndarray, np.ndarray]:
    """The first ``n`` digits as (n, 16, 16, 1) float32 in 0..255, and their labels."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = []
    for image in digits.images[:n]:
        pixels = np.round(image * (255.0 / 16.0)).astype(np.uint8)
        big = Image.fromarray(pixels, mode="L").resize(
            (IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BICUBIC
        )
        images.append(np.asarray(big, dtype=np.float32)[..., None])
    return np.stack(images), digits.target[:n].astype(np.int32)


def digits_directory(root: Path, n: int) -> tuple[Path, list[str], list[str]]:
    """Write the first ``n`` digits as ``root/<label>/<i>.png``.

    Returns:
        tuple[Path, list[str], list[str]]: ``root``, the file names relative to it and their
        labels as strings (for ``flow_from_dataframe``).
    """
    from PIL import Image

    images, labels = digits_arrays(n)
    names, classes = [], []
    for i, (image, label) in enumerate(zip(images, labels, strict=True)):
        folder = root / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        name = f"{label}/{i:04d}.png"
        Image.fromarray(image[..., 0].astype(np.uint8), mode="L").save(root / name)
        names.append(name)
        classes.append(str(label))
    return root, names, classes
